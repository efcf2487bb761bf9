"""The router ranks experts by bits per byte of a preview."""
import math

import pytest
import torch

from dlmom import DLMoM, DLMoMConfig, Expert, router
from dlmom.soft_thinking import SoftThinkingRunner
from tiny_models import hf_greedy, llama, tokenizer


def fit(model, tok, prompts, answers, steps=25):
    """A few Adam steps so the model's own greedy answer is the given text (a random model writes bytes
    that do not survive decoding)."""
    rows = [Expert(model, tok).prompt_ids(p, chat=True) + tok.encode(a) for p, a in zip(prompts, answers)]
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    model.train()
    for _ in range(steps):
        for row in rows:
            ids = torch.tensor([row])
            loss = model(input_ids=ids, labels=ids).loss
            opt.zero_grad()
            loss.backward()
            opt.step()
    model.eval()


def test_the_expert_that_wrote_the_preview_ranks_first():
    tok, other_tok = tokenizer("bytes", 300), tokenizer("words", 420)
    author, stranger = llama(tok, seed=3), llama(other_tok, seed=4)
    prompts = ["What is 12 * 7?", "Add 3 to 5."]
    torch.manual_seed(0)
    fit(author, tok, prompts, ["The answer is 84.", "The answer is 8."])
    previews = [hf_greedy(author, tok, p, 6) for p in prompts]
    assert previews[0].startswith("The answer"), previews
    runners = [SoftThinkingRunner([Expert(stranger, other_tok, name="stranger")]),
               SoftThinkingRunner([Expert(author, tok, name="author")])]
    bpb = router.score(runners, prompts, previews, chat=True)
    assert bpb.shape == (2, 2) and bool((bpb > 0).all())
    assert bool((bpb[1] < bpb[0]).all()), bpb  # per byte: comparable across the two tokenizers
    kept, weights = router.select(bpb, top_m=1)
    assert kept.tolist() == [[False, False], [True, True]]
    assert weights[1].tolist() == [1.0, 1.0] and weights[0].tolist() == [0.0, 0.0]


def test_select_keeps_all_and_weights_by_distance_to_best():
    bpb = torch.tensor([[1.0], [1.5], [3.0]])
    kept, weights = router.select(bpb, None)
    assert kept.all()
    torch.testing.assert_close(weights[:, 0], torch.exp(-torch.tensor([0.0, 0.5, 2.0])))


def direct_prompt_bits(model, tok, expert, prompt, chat):
    """-log2 p(prompt | head) per byte, from transformers' logits of the whole row."""
    head = expert.prompt_head_ids(chat=chat)
    body = tok.encode(prompt, add_special_tokens=False)
    ids = torch.tensor([head + body])
    with torch.no_grad():
        logp = torch.log_softmax(model(input_ids=ids).logits[0].double(), dim=-1)
    first = len(head) if head else 1  # no head: the first token has no context
    bits = -sum(float(logp[t - 1, ids[0, t]]) for t in range(first, ids.shape[1])) / math.log(2)
    scored = body[first - len(head):]
    return bits / len(tok.decode(scored).encode())


@pytest.mark.parametrize("chat", [True, False])
@pytest.mark.parametrize("system", [None, "You are careful."])
def test_prompt_bits_per_byte_equals_a_direct_computation(tok, model, chat, system):
    expert = Expert(model, tok, system_prompt=system)
    prompts = ["What is 12 * 7?", "Add 3 to 5, then double it."]
    got = router.prompt_bits_per_byte(SoftThinkingRunner([expert]), prompts, chat=chat)
    want = [direct_prompt_bits(model, tok, expert, p, chat) for p in prompts]
    torch.testing.assert_close(got[0].double(), torch.tensor(want, dtype=torch.double), rtol=1e-4, atol=1e-4)
    # the head is what prompt_ids puts before the prompt's text
    ids = expert.prompt_ids(prompts[0], chat=chat)
    assert ids[:len(expert.prompt_head_ids(chat=chat))] == expert.prompt_head_ids(chat=chat)


def test_route_by_prompt_weighs_experts_before_the_first_step(tok):
    a, b = llama(tok, seed=3), llama(tok, seed=4)
    prompts = ["What is 12 * 7?", "Add 3 to 5."]
    moe = DLMoM([(a, tok), (b, tok)], config=DLMoMConfig(route_by="prompt", router_temperature=0.5,
                                                         controller="explicit"))
    gen = moe.start(prompts, max_new_tokens=4)
    results = gen.run()
    bpb = torch.cat([router.prompt_bits_per_byte(SoftThinkingRunner([e]), prompts, chat=True) for e in moe.experts])
    torch.testing.assert_close(gen.weights.cpu(), router.select(bpb, None, 0.5)[1])
    for res, b in zip(results, range(len(prompts))):
        assert [r["scored"] for r in res.route] == ["prompt", "prompt"]
        assert [r["bits_per_byte"] for r in res.route] == [round(float(x), 4) for x in bpb[:, b]]
        assert all(t["mode"] != "preview" for t in res.trace)  # no preview


def test_route_by_prompt_drops_the_worse_reader_before_it_decodes(tok):
    prompts = ["What is 12 * 7?"]
    reader, stranger = llama(tok, seed=3), llama(tok, seed=4)
    torch.manual_seed(0)
    fit(reader, tok, prompts, ["The answer is 84."])  # trained on the prompt: it reads it far better
    moe = DLMoM([(stranger, tok), (reader, tok)], config=DLMoMConfig(route_by="prompt", top_m=1,
                                                                     controller="explicit"))
    res = moe.generate(prompts, max_new_tokens=6)[0]
    assert [r["kept"] for r in res.route] == [False, True]
    assert res.usage["experts"][0]["decode_tokens"] == 0  # the dropped expert never decodes
    assert res.text == hf_greedy(reader, tok, prompts[0], 6)  # the reader alone


def test_router_settings_are_checked():
    with pytest.raises(ValueError, match="route_by must be one of"):
        DLMoMConfig(route_by="answer")
    with pytest.raises(ValueError, match="router_temperature must be a number in \\(0"):
        DLMoMConfig(router_temperature=0.0)
