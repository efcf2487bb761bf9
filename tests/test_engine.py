"""The DL-MoM loop on tiny random models: exactness against transformers, batching, seeds, consensus,
the Text-Bridge, and argument errors."""
import copy
import math

import pytest
import torch

import dlmom
from dlmom import DLMoM, DLMoMConfig, Expert
from dlmom.soft_thinking import SoftThinkingRunner
from tiny_models import gemma3, hf_greedy, llama, tokenizer

PROMPTS = ["What is 12 * 7?", "Add 3 to 5.", "Write a function that returns the sum of a list of numbers."]


@pytest.mark.parametrize("prompt", PROMPTS[:2])
def test_explicit_greedy_equals_transformers_generate(model, tok, prompt):
    moe = DLMoM([(model, tok)], config=DLMoMConfig(controller="explicit"))
    assert moe.generate([prompt], max_new_tokens=24)[0].text == hf_greedy(model, tok, prompt, 24)


@pytest.mark.parametrize("build", [llama, gemma3], ids=["llama", "gemma3-scaled-embeddings"])
def test_latent_one_hot_packets_equal_generate(tok, build):
    # top_k = 1 makes every latent packet one-hot: the soft-embedding path (and Gemma's embedding scale)
    # must then reproduce plain greedy decoding exactly.
    m = build(tok, seed=1)
    moe = DLMoM([(m, tok)], config=DLMoMConfig(controller="latent", top_k=1, max_latent_steps=1000))
    res = moe.generate([PROMPTS[0]], max_new_tokens=20)[0]
    assert all(r["mode"] == "latent" for r in res.trace)
    assert res.text == hf_greedy(m, tok, PROMPTS[0], 20)


def test_gemma_embedding_scale_is_read_from_the_model(tok):
    m = gemma3(tok)
    assert Expert(m, tok).embed_scale == pytest.approx(64 ** 0.5, rel=1e-2)
    assert Expert(llama(tok), tok).embed_scale == 1.0


@pytest.mark.parametrize("controller", ["swir", "latent"])
def test_batch_equals_one_prompt_at_a_time(model, tok, controller):
    moe = DLMoM([(model, tok)], config=DLMoMConfig(controller=controller, top_k=4))
    batch = [r.text for r in moe.generate(PROMPTS, max_new_tokens=16)]
    single = [moe.generate([p], max_new_tokens=16)[0].text for p in PROMPTS]
    assert batch == single


@pytest.mark.parametrize("noise", ["gumbel", "dirichlet"])
def test_same_seed_same_output_different_seed_differs(model, tok, noise):
    moe = DLMoM([(model, tok)], config=DLMoMConfig(controller="swir", noise=noise, do_sample=True, top_k=8))
    runs = {seed: [moe.generate([PROMPTS[0]], max_new_tokens=16, seed=seed)[0] for _ in range(2)] for seed in (0, 1)}
    for seed, (a, b) in runs.items():
        assert a.text == b.text and [r["top"] for r in a.trace] == [r["top"] for r in b.trace], seed
    assert runs[0][0].text != runs[1][0].text


def test_seed_leaves_the_global_rng_alone(model, tok):
    moe = DLMoM([(model, tok)], config=DLMoMConfig(do_sample=True))
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    moe.generate([PROMPTS[0]], max_new_tokens=3, seed=7)
    assert torch.equal(torch.rand(3), expected)


def test_identical_experts_agree_with_one(model, tok):
    one = DLMoM([(model, tok)], config=DLMoMConfig(controller="explicit"))
    expected = one.generate([PROMPTS[0]], max_new_tokens=16)[0].text
    # Three roles of one model (one batched forward) and three separate copies (three forwards).
    roles = DLMoM([Expert(model, tok, name=f"r{i}") for i in range(3)], config=DLMoMConfig(controller="explicit"))
    copies = DLMoM([(copy.deepcopy(model), tok) for _ in range(3)], config=DLMoMConfig(controller="explicit"))
    assert len(roles.groups) == 1 and len(copies.groups) == 3
    for moe in (roles, copies):
        res = moe.generate([PROMPTS[0]], max_new_tokens=16)[0]
        assert res.text == expected
        assert all(r["agreement"] == 1.0 for r in res.trace)


def test_switches_and_their_reasons_are_in_the_trace(model, tok):
    # A low threshold makes a flat entropy "high", a zero latent cap then forces the switch back.
    moe = DLMoM([(model, tok)], config=DLMoMConfig(controller="swir", start_mode="explicit", block_size=2,
                                                   entropy_threshold=0.0, max_latent_steps=3))
    res = moe.generate([PROMPTS[0]], max_new_tokens=12)[0]
    switches = [(t["step"], t["switch"]) for t in res.trace if "switch" in t]
    assert switches and switches[0][1].startswith("to latent: entropy")
    assert any("latent cap 3 reached" in reason for _, reason in switches), switches
    assert res.trace[-1]["switches"] >= 1


def test_result_shape_trace_route_usage(tok):
    experts = [Expert(llama(tok, seed=s), tok, name=f"e{s}") for s in (0, 1)]
    moe = DLMoM(experts, config=DLMoMConfig(top_k=5, preview_tokens=3, top_m=1))
    res = moe.generate(PROMPTS[:2], max_new_tokens=12)
    assert len(res) == 2
    r = res[0]
    assert isinstance(r.text, str) and len(r.trace) >= 1
    assert [t["mode"] for t in r.trace[:3]] == ["preview"] * 3
    assert {"step", "mode", "entropy", "id", "token", "top", "agreement", "switches", "bus_bytes"} <= set(r.trace[0])
    assert 0.0 <= r.trace[0]["entropy"] <= 1.0 and len(r.trace[0]["top"]) == 5
    assert [x["expert"] for x in r.route] == ["e0", "e1"] and sum(x["kept"] for x in r.route) == 1
    assert {x["expert"] for x in r.usage["experts"]} == {"e0", "e1"}
    assert res.usage["wall_s"] >= res.usage["expert_forward_s"] > 0 and r.usage["wall_s"] == res.usage["wall_s"]
    assert r.usage["bus_bytes"] > 0 and r.to_dict()["text"] == r.text
    # Per prompt: its own tokens; the batch's totals are their sums, reported once on the list.
    assert r.usage["tokens"] == r.usage["prefill_tokens"] + r.usage["decode_tokens"] > 0
    assert r.usage["generated_tokens"] == len(r.trace)
    for key in ("tokens", "bus_bytes", "latent_steps", "switches", "generated_tokens"):
        assert res.usage[key] == sum(x.usage[key] for x in res)
    assert res.usage["prompts"] == len(res)


def test_router_scores_from_the_preview_steps_equal_teacher_forcing(tok):
    experts = [Expert(llama(tok, seed=s), tok, name=f"e{s}") for s in (0, 1)]
    moe = DLMoM(experts, config=DLMoMConfig(controller="explicit", preview_tokens=4))
    res = moe.generate([PROMPTS[0]], max_new_tokens=6)[0]
    ids = [t["id"] for t in res.trace if t["mode"] == "preview"]
    nbytes = len(tok.decode(ids, skip_special_tokens=True).encode())
    for e, r in zip(experts, res.route):
        row = torch.tensor([e.prompt_ids(PROMPTS[0], chat=True) + ids])
        with torch.no_grad():
            logp = torch.log_softmax(e.model(row).logits[0, :-1].float(), -1).gather(-1, row[0, 1:, None])
        expected = -float(logp[-len(ids):].sum()) / math.log(2) / nbytes
        assert r["bits_per_byte"] == pytest.approx(expected, rel=1e-3, abs=1e-3)


def test_text_bridge_between_different_tokenizers():
    a, b = tokenizer("bytes", 300), tokenizer("words", 420)
    assert a.get_vocab() != b.get_vocab()
    moe = DLMoM([(llama(a, seed=0), a), (llama(b, seed=1, extra_rows=13), b)],
                config=DLMoMConfig(controller="explicit", preview_tokens=0))
    assert moe.bridged == [False, True]
    generation = moe.start(PROMPTS[:2], max_new_tokens=12)
    res = generation.run()
    bridged = generation.runners[1]
    assert sum(u["decode_tokens"] for u in res[0].usage["experts"] if u["expert"] == moe.experts[1].name) > 0
    # The bridged expert's cache holds its prompt plus the re-encoded text of what was generated (all of
    # it but the last token, which no forward needed).
    for row, r in enumerate(res):
        prompt = moe.experts[1].prompt_ids(PROMPTS[row], chat=True)
        assert bridged.fed[row][:len(prompt)] == prompt
        followed = b.decode(bridged.fed[row][len(prompt):], skip_special_tokens=True)
        assert followed and r.text.startswith(followed), (followed, r.text)


@pytest.mark.parametrize("make, message", [
    (lambda m, t: DLMoM([]), "at least one expert"),
    (lambda m, t: DLMoM([(m, t)]).generate([], max_new_tokens=4), "prompts must be a non-empty list"),
    (lambda m, t: DLMoM([(m, t)]).generate([""], max_new_tokens=4), "non-empty strings"),
    (lambda m, t: DLMoM([(m, t)]).generate(["hi"], max_new_tokens=0), "max_new_tokens must be an integer >= 1"),
    (lambda m, t: DLMoM([(m, t)]).generate(["hi"], max_new_tokens=2, stop=[""]), "stop must be"),
    (lambda m, t: DLMoM([(m, t)]).generate(["hi"], max_new_tokens=2, seed="x"), "seed must be an integer"),
    (lambda m, t: DLMoM([(m, t)]).generate(["hi"], max_new_tokens=2, seed=2 ** 70), r"seed must be an integer in \[0, 2\*\*64\)"),
    (lambda m, t: DLMoM([(m, t)]).generate(["hi"], max_new_tokens=2, seed=-1), r"seed must be an integer in"),
    (lambda m, t: DLMoM([(m, t)]).generate(["ok", "bad \udcff bytes"], max_new_tokens=2), r"prompts\[1\] is not valid UTF-8"),
    (lambda m, t: DLMoMConfig(controller="magic"), "controller must be one of"),
    (lambda m, t: DLMoMConfig(top_k=0), "top_k must be an integer >= 1"),
    (lambda m, t: DLMoMConfig(top_p=0), r"top_p must be a number in \(0, 1\]"),
    (lambda m, t: DLMoMConfig(temperature=-1), "temperature must be"),
    (lambda m, t: DLMoMConfig(noise="pink"), "noise must be one of"),
    (lambda m, t: DLMoMConfig(elect="max"), "elect must be"),
    (lambda m, t: DLMoMConfig(top_m=0), "top_m must be"),
    (lambda m, t: DLMoMConfig(kv="zip"), "kv must be one of"),
    (lambda m, t: DLMoMConfig(kv="kivi", kv_group_size=0), "kv_group_size must be an integer >= 1"),
    (lambda m, t: DLMoMConfig(kv="kivi", kv_residual_length=100), "kv_residual_length must be a multiple"),
    (lambda m, t: DLMoM([(m, t), (copy.deepcopy(m).to("meta"), t)]), "experts must all be on one device"),
    (lambda m, t: DLMoM([(m, t)], config={"top_k": 3}), "config must be a DLMoMConfig"),
    (lambda m, t: DLMoM([42]), r"experts\[0\] must be an Expert"),
    (lambda m, t: DLMoM(["/no/such/model.gguf"]), None),
])
def test_bad_arguments(model, tok, make, message):
    if message is None:
        with pytest.raises(FileNotFoundError, match="no such GGUF file"):
            make(model, tok)
    else:
        with pytest.raises(ValueError, match=message):
            make(model, tok)


def test_stop_string_ends_the_answer(model, tok):
    moe = DLMoM([(model, tok)], config=DLMoMConfig(controller="explicit"))
    full = moe.generate([PROMPTS[0]], max_new_tokens=24)[0].text
    stop = full[5:8]
    cut = moe.generate([PROMPTS[0]], max_new_tokens=24, stop=stop)[0].text
    assert cut == full[:full.index(stop)]
    assert dlmom.DLMoM is DLMoM


def _cache_bytes(result) -> dict:
    return {u["expert"]: u["cache_bytes"] for u in result.usage["experts"]}


def test_kivi_cache_equals_full_while_nothing_is_quantised(model, tok):
    roles = [Expert(model, tok, name=f"r{i}") for i in range(2)]
    full = DLMoM(roles, config=DLMoMConfig(top_k=4)).generate(PROMPTS[:2], max_new_tokens=16)
    kivi = DLMoM(roles, config=DLMoMConfig(top_k=4, kv="kivi", kv_residual_length=512)).generate(
        PROMPTS[:2], max_new_tokens=16)
    assert [r.text for r in kivi] == [r.text for r in full]
    assert [t["top"] for t in kivi[0].trace] == [t["top"] for t in full[0].trace]
    assert full.usage["kv"] == "full" and kivi.usage["kv"] == "kivi"
    assert _cache_bytes(kivi) == _cache_bytes(full) and all(_cache_bytes(full).values())


def test_kivi_cache_in_the_loop_holds_fewer_bytes(model, tok):
    roles = [Expert(model, tok, name=f"r{i}") for i in range(2)]
    moe = DLMoM(roles, config=DLMoMConfig(top_k=4, kv="kivi", kv_group_size=8, kv_residual_length=16))
    generation = moe.start(PROMPTS, max_new_tokens=24)
    kivi = generation.run()
    full = DLMoM(roles, config=DLMoMConfig(top_k=4)).generate(PROMPTS, max_new_tokens=24)
    cache = generation.runners[0].cache
    assert isinstance(cache, dlmom.KIVICache)
    assert cache.layers[0].quantized_keys, "prompts longer than 16 tokens must be quantised"
    assert all(len(r.trace) == 24 for r in kivi)
    small, big = _cache_bytes(kivi), _cache_bytes(full)
    assert all(0 < small[name] < 0.6 * big[name] for name in big), (small, big)


# ---------------------------------------------------------------- shared prefill and rows leaving the batch

ROLES = ["You plan the steps.", "You solve it.", "You check each step."]


def _roles(model, tok):
    return [Expert(model, tok, name=f"r{i}", system_prompt=s) for i, s in enumerate(ROLES)]


def _greedy_ids(model, ids: list[int], n: int, eos: set[int]) -> list[int]:
    out = []
    with torch.inference_mode():
        for _ in range(n):
            nxt = int(model(torch.tensor([ids + out])).logits[0, -1].argmax())
            out.append(nxt)
            if nxt in eos:
                break
    return out


def test_shared_prefill_equals_separate_prefill(model, tok):
    experts = _roles(model, tok)
    shared = DLMoM(experts, config=DLMoMConfig(controller="explicit"))
    alone = DLMoM(experts, config=DLMoMConfig(controller="explicit", share_prefill=False))
    runner_s, runner_a = SoftThinkingRunner(experts), SoftThinkingRunner(experts)
    logits_s = runner_s.prefill(PROMPTS, chat=True)
    logits_a = runner_a.prefill(PROMPTS, chat=True, share_prefix=False)
    torch.testing.assert_close(logits_s, logits_a, rtol=1e-4, atol=1e-4)
    # The shared part is the chat template's opening up to where the system prompts differ.
    rows = [[e.prompt_ids(p, chat=True) for e in experts] for p in PROMPTS]
    common = [next(i for i, col in enumerate(zip(*r)) if len(set(col)) > 1) for r in rows]
    assert min(common) > 0
    assert runner_s.shared_prefill_tokens.tolist() == [[0] * len(PROMPTS)] + [common] * 2
    assert runner_s.prefill_tokens[0].tolist() == runner_a.prefill_tokens[0].tolist()
    assert (runner_s.prefill_tokens[1:] + runner_s.shared_prefill_tokens[1:]).tolist() == \
        runner_a.prefill_tokens[1:].tolist()
    res_s, res_a = shared.generate(PROMPTS, max_new_tokens=10), alone.generate(PROMPTS, max_new_tokens=10)
    assert [r.text for r in res_s] == [r.text for r in res_a]
    assert res_s.usage["shared_prefill_tokens"] == 2 * sum(common) and res_a.usage["shared_prefill_tokens"] == 0
    assert [r.usage["shared_prefill_tokens"] for r in res_s] == [2 * c for c in common]


def test_routed_out_roles_leave_the_batch_and_the_kept_role_continues_alone(model, tok):
    # top_m=1: after the preview each prompt keeps one role; the others stop running. The kept role then
    # decodes alone from its own cache, so the rest of the answer is that role's own greedy continuation.
    experts, preview, steps = _roles(model, tok), 3, 12
    moe = DLMoM(experts, config=DLMoMConfig(controller="explicit", preview_tokens=preview, top_m=1))
    res = moe.generate(PROMPTS, max_new_tokens=steps)
    eos = experts[0].eos_ids()
    kept_roles = set()
    for p, r in zip(PROMPTS, res):
        (kept,) = [i for i, x in enumerate(r.route) if x["kept"]]
        kept_roles.add(kept)
        ids = [t["id"] for t in r.trace]
        head = experts[kept].prompt_ids(p, chat=True) + ids[:preview]
        assert ids[preview:] == _greedy_ids(model, head, len(ids) - preview, eos)
    decoded = [u["decode_tokens"] for u in res.usage["experts"]]
    for i, n in enumerate(decoded):
        if i not in kept_roles:  # fed only the preview steps before routing
            assert n <= (preview - 1) * len(PROMPTS)
    assert sum(decoded) < len(experts) * (steps - 1) * len(PROMPTS)


def test_finished_prompts_leave_the_batch(model, tok):
    # Every role is fed once per step after which its prompt is still running: len(trace) - 1 per prompt.
    moe = DLMoM(_roles(model, tok), config=DLMoMConfig(controller="explicit", preview_tokens=0))
    first = moe.generate(PROMPTS, max_new_tokens=12)
    stop = first[0].trace[3]["token"]  # makes prompt 0 (at least) stop early
    res = moe.generate(PROMPTS, max_new_tokens=12, stop=stop)
    lengths = [len(r.trace) for r in res]
    assert min(lengths) < max(lengths)
    for u in res.usage["experts"]:
        assert u["decode_tokens"] == sum(n - 1 for n in lengths)
    for r, n in zip(res, lengths):  # and per prompt: its own steps
        assert [u["decode_tokens"] for u in r.usage["experts"]] == [n - 1] * len(moe.experts)
    single = [moe.generate([p], max_new_tokens=12, stop=stop)[0].text for p in PROMPTS]
    assert [r.text for r in res] == single
