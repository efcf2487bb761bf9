"""generate's guards: the model's context length, one generation at a time per object, each generation's own
random stream (concurrent seeded runs reproduce), and Ctrl-C keeping the partial answer."""
import threading

import pytest
import torch

from dlmom import DLMoM, DLMoMConfig
from dlmom.baselines import run
from dlmom.engine import GenerationInterrupted

NOISY = DLMoMConfig(controller="latent", noise="gumbel", do_sample=True, max_latent_steps=6, top_k=8,
                    temperature=1.0)


def count_forwards(model):
    calls = []
    handle = model.register_forward_pre_hook(lambda *a: calls.append(1))
    return calls, handle


def long_prompt(tok, n_tokens):
    # "7 " is one token or two in the tiny byte-level BPE: grow until the templated prompt passes n_tokens.
    text = "7 " * n_tokens
    while len(tok.encode(text)) < n_tokens:
        text += "7 "
    return text


def test_prompt_past_the_models_positions_is_refused_before_any_forward(model, tok):
    assert model.config.max_position_embeddings == 512
    calls, handle = count_forwards(model)
    try:
        with pytest.raises(ValueError, match=r"prompts\[1\] is \d+ tokens for expert .* more than the 512 positions"):
            DLMoM([(model, tok)]).generate(["hi", long_prompt(tok, 600)], max_new_tokens=4)
        with pytest.raises(ValueError, match="more than the 512 positions"):
            run("single", [(model, tok)], [long_prompt(tok, 600)], max_new_tokens=4)
    finally:
        handle.remove()
    assert not calls


def test_budget_past_the_models_positions_is_cut_with_a_warning(model, tok):
    prompt = long_prompt(tok, 490)
    n = len(DLMoM([(model, tok)]).experts[0].prompt_ids(prompt, chat=True))
    room = 512 - n + 1
    moe = DLMoM([(model, tok)], config=DLMoMConfig(controller="explicit"))
    with pytest.warns(UserWarning, match=f"max_new_tokens=100 would run past the 512 positions .* at most {room} tokens"):
        res = moe.generate([prompt], max_new_tokens=100)[0]
    assert len(res.trace) <= room
    with pytest.warns(UserWarning, match=f"at most {room} tokens"):
        run("single", [(model, tok)], [prompt], max_new_tokens=100)


def test_concurrent_seeded_generations_reproduce(model, tok):
    prompts = ["What is 12 * 7?", "Add 3 to 5."]
    a, b = DLMoM([(model, tok)], config=NOISY), DLMoM([(model, tok)], config=NOISY)
    want = {1: [r.text for r in a.generate(prompts, max_new_tokens=16, seed=1)],
            2: [r.text for r in b.generate(prompts, max_new_tokens=16, seed=2)]}
    assert want[1] != want[2]
    got, errors = {1: [], 2: []}, []

    def worker(moe, seed):
        try:
            for _ in range(4):
                got[seed].append([r.text for r in moe.generate(prompts, max_new_tokens=16, seed=seed)])
        except Exception as err:  # noqa: BLE001 - reported below
            errors.append(err)

    threads = [threading.Thread(target=worker, args=(a, 1)), threading.Thread(target=worker, args=(b, 2))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    assert got[1] == [want[1]] * 4 and got[2] == [want[2]] * 4
    # and the caller's global RNG is neither used nor disturbed by a seeded call
    torch.manual_seed(5)
    before = torch.rand(3)
    torch.manual_seed(5)
    a.generate(prompts, max_new_tokens=4, seed=3)
    assert torch.equal(torch.rand(3), before)


def test_one_object_refuses_a_second_concurrent_generation(model, tok):
    moe = DLMoM([(model, tok)])
    entered, release = threading.Event(), threading.Event()

    def block(*args):
        entered.set()
        release.wait(30)

    handle = model.register_forward_pre_hook(block)
    first = threading.Thread(target=moe.generate, args=(["hi"],), kwargs=dict(max_new_tokens=2))
    first.start()
    try:
        assert entered.wait(30)
        with pytest.raises(RuntimeError, match="already generating"):
            moe.generate(["hello"], max_new_tokens=2)
    finally:
        handle.remove()
        release.set()
        first.join()
    assert moe.generate(["hello"], max_new_tokens=2)[0].trace  # free again afterwards


def test_ctrl_c_keeps_the_partial_answer(model, tok):
    moe = DLMoM([(model, tok)], config=DLMoMConfig(controller="explicit"))
    full = moe.generate(["What is 12 * 7?"], max_new_tokens=12)[0].text
    forwards = []

    def interrupt(*args):
        forwards.append(1)
        if len(forwards) == 6:  # the prefill, then the 5th decode step
            raise KeyboardInterrupt

    handle = model.register_forward_pre_hook(interrupt)
    try:
        with pytest.raises(GenerationInterrupted) as caught:
            moe.generate(["What is 12 * 7?"], max_new_tokens=12)
    finally:
        handle.remove()
    assert isinstance(caught.value, KeyboardInterrupt)
    (partial,) = caught.value.texts
    assert partial and full.startswith(partial) and len(partial) < len(full)
    assert moe.generate(["What is 12 * 7?"], max_new_tokens=12)[0].text == full  # usable again
