"""Consensus modes and the gate: contrastive decoding against a direct computation, the gate's threshold,
the lead expert, and end to end that a closed gate or contrast 0 decodes as the lead alone."""
import math

import pytest
import torch

from dlmom import DLMoM, DLMoMConfig
from dlmom import consensus
from tiny_models import hf_greedy, llama

PROMPT = "What is 12 * 7?"


def test_contrastive_equals_direct_computation():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(3, 4, 37, generator=g) * 3
    lead = torch.tensor([2, 0, 1, 2])
    w = torch.tensor([[1.0, 0.5, 0.0, 1.0], [0.2, 1.0, 1.0, 0.0], [1.0, 1.0, 0.3, 1.0]])
    got = consensus.contrastive(x, lead, w, contrast=0.7, plausibility=0.05)
    logp = torch.log_softmax(x, -1)
    for b in range(4):
        strong = logp[lead[b], b]
        others = [e for e in range(3) if e != lead[b] and w[e, b] > 0]
        total = sum(float(w[e, b]) for e in others)
        weak = sum(float(w[e, b]) * logp[e, b] for e in others) / total
        want = strong - 0.7 * weak
        want[strong.exp() < 0.05 * strong.exp().max()] = -math.inf
        assert torch.equal(torch.isinf(got[b]), torch.isinf(want))
        torch.testing.assert_close(got[b][~torch.isinf(want)], want[~torch.isinf(want)])


def test_contrastive_with_no_other_expert_is_the_lead():
    x = torch.randn(2, 3, 11)
    w = torch.tensor([[1.0, 1.0, 1.0], [0.0, 0.0, 0.0]])
    got = consensus.contrastive(x, torch.zeros(3, dtype=torch.long), w, contrast=0.5, plausibility=0.0)
    torch.testing.assert_close(got, torch.log_softmax(x[0], -1))


def test_contrast_zero_keeps_the_lead_argmax():
    x = torch.randn(2, 5, 50)
    lead = torch.tensor([1, 0, 1, 1, 0])
    got = consensus.contrastive(x, lead, None, contrast=0.0, plausibility=0.1)
    assert torch.equal(got.argmax(-1), consensus.lead_logits(x, lead).argmax(-1))


def test_gate_opens_exactly_at_its_threshold():
    x = torch.randn(2, 3, 40) * 2
    lead = torch.tensor([0, 1, 0])
    h = consensus.normalised_entropy(consensus.lead_logits(x, lead))
    cfg = DLMoMConfig(gate=float(h[1]))
    merged, alone = consensus.combine(x, lead, None, cfg, mode="ties")
    assert not alone[1]  # at the threshold: the consensus engages
    assert torch.equal(alone, h < h[1])
    torch.testing.assert_close(merged[1], consensus.merge(x, theta=0.0, elect="vote", weights=None)[1])
    above = DLMoMConfig(gate=math.nextafter(float(h[1]), 1.0))
    merged, alone = consensus.combine(x, lead, None, above, mode="ties")
    assert alone[1]  # just above it: the lead alone
    torch.testing.assert_close(merged[1], x[1, 1])


def test_normalised_entropy_bounds():
    assert float(consensus.normalised_entropy(torch.zeros(1, 64))[0]) == pytest.approx(1.0)
    assert float(consensus.normalised_entropy(torch.tensor([[0.0, -1e9, -1e9]]))[0]) == pytest.approx(0.0, abs=1e-6)


@pytest.fixture(scope="module")
def pair(tok):
    """A 2-layer and a 4-layer model on one tokenizer: the 4-layer one is the largest (the lead)."""
    return llama(tok, seed=3), llama(tok, seed=4, layers=4)


def test_lead_is_the_largest_expert(pair, tok):
    small, big = pair
    assert DLMoM([(small, tok), (big, tok)]).largest == 1
    assert DLMoM([(big, tok), (small, tok)]).largest == 0
    assert DLMoM([(small, tok), (small, tok)]).largest == 0  # ties: the first listed


@pytest.mark.parametrize("settings", [dict(consensus="contrastive", contrast=0.0),
                                      dict(gate=1.0), dict(gate=1.0, consensus="contrastive", contrast=2.0)],
                         ids=["contrast-0", "gate-closed", "gate-closed-contrastive"])
def test_lead_alone_decodes_as_the_largest_expert(pair, tok, settings):
    # Contrast 0 or a gate that never opens (normalised entropy is below 1 unless uniform): greedy decoding
    # follows the largest expert token for token, the preview included.
    small, big = pair
    moe = DLMoM([(small, tok), (big, tok)], config=DLMoMConfig(controller="explicit", **settings))
    res = moe.generate([PROMPT], max_new_tokens=20)
    assert res[0].text == hf_greedy(big, tok, PROMPT, 20)
    merged = res[0].usage["merged_steps"]
    assert merged == (0 if "gate" in settings else len(res[0].trace))
    assert merged == sum(r["merged"] for r in res[0].trace)


def test_gate_keeps_latent_packets_out_of_confident_steps(pair, tok):
    small, big = pair
    moe = DLMoM([(small, tok), (big, tok)], config=DLMoMConfig(controller="latent", gate=1.0, preview_tokens=0))
    res = moe.generate([PROMPT], max_new_tokens=12)[0]
    assert all(r["mode"] == "explicit" and not r["merged"] for r in res.trace)
    assert res.usage["latent_steps"] == 0


def test_router_lead_follows_the_router(pair, tok):
    small, big = pair
    moe = DLMoM([(small, tok), (big, tok)], config=DLMoMConfig(lead="router", preview_tokens=3))
    gen = moe.start([PROMPT, "Add 3 to 5."], max_new_tokens=6)
    gen.run()
    assert torch.equal(gen.lead, torch.argmax(gen.weights.cpu(), dim=0))


def test_consensus_settings_are_checked():
    with pytest.raises(ValueError, match="gate must be a number in \\[0, 1\\]"):
        DLMoMConfig(gate=1.5)
    with pytest.raises(ValueError, match="consensus must be one of"):
        DLMoMConfig(consensus="mean")
    with pytest.raises(ValueError, match="contrast must be"):
        DLMoMConfig(contrast=-1.0)


def test_a_closed_gate_defers_the_other_experts_forwards(pair, tok):
    # gate=1: after the preview the lead decodes alone, and the small expert runs no forward at all.
    small, big = pair
    moe = DLMoM([(small, tok), (big, tok)], config=DLMoMConfig(controller="explicit", gate=1.0, preview_tokens=3))
    res = moe.generate([PROMPT], max_new_tokens=20)[0]
    assert res.text == hf_greedy(big, tok, PROMPT, 20)
    small_usage, big_usage = res.usage["experts"]
    assert small_usage["decode_tokens"] == 3  # the preview's steps only (the last one feeds the first deferred)
    assert big_usage["decode_tokens"] == len(res.trace) - 1
    # step 3 still has the small expert's logits (fed at step 2); from step 4 on it has none
    assert all(t["agreement"] is None for t in res.trace[4:]) and all(t["agreement"] is not None
                                                                     for t in res.trace[:4])


@pytest.mark.parametrize("controller", ["explicit", "swir"])
def test_deferred_experts_catch_up_to_the_same_answers(pair, tok, controller, monkeypatch):
    # A gate that opens at some steps: the deferred expert catches up on the tokens it missed in one forward
    # and the answers equal those of a run that feeds it every step.
    small, big = pair
    prompts = [PROMPT, "Add 3 to 5.", "Write a function that returns the sum of a list of numbers."]
    text = tok.apply_chat_template([{"role": "user", "content": PROMPT}], add_generation_prompt=True, tokenize=False)
    ids = tok(text + hf_greedy(big, tok, PROMPT, 24), return_tensors="pt").input_ids
    with torch.no_grad():
        h = consensus.normalised_entropy(big(ids).logits[0])  # the lead's entropies along its own answer
    cfg = DLMoMConfig(controller=controller, gate=float(h.median()), max_latent_steps=1000)
    lazy = DLMoM([(small, tok), (big, tok)], config=cfg).generate(prompts, max_new_tokens=24, seed=0)
    from dlmom.generation import Generation
    monkeypatch.setattr(Generation, "deferrable", lambda self, alone, in_preview: frozenset())
    eager = DLMoM([(small, tok), (big, tok)], config=cfg).generate(prompts, max_new_tokens=24, seed=0)
    assert [r.text for r in lazy] == [r.text for r in eager]
    assert [[t["merged"] for t in r.trace] for r in lazy] == [[t["merged"] for t in r.trace] for r in eager]
    assert 0 < sum(r.usage["merged_steps"] for r in lazy) < sum(len(r.trace) for r in lazy)
    # the small expert ran fewer forwards, the same tokens
    assert lazy.usage["experts"][0]["decode_tokens"] <= eager.usage["experts"][0]["decode_tokens"]


def test_auto_consensus_resolves_by_the_experts_sizes():
    assert consensus.resolve("auto", [100, 300]) == "contrastive"  # 3x: a strong and a weak expert
    assert consensus.resolve("auto", [300, 100, 150]) == "contrastive"  # exactly 2x the next largest
    assert consensus.resolve("auto", [100, 199]) == "ties"  # under 2x
    assert consensus.resolve("auto", [100, 100, 100]) == "ties"  # roles of one model
    assert consensus.resolve("auto", [100]) == "ties"
    assert consensus.resolve("contrastive", [100, 100]) == "contrastive"  # an explicit mode stays
    with pytest.raises(ValueError, match="mode must be 'ties' or 'contrastive'"):
        consensus.combine(torch.zeros(2, 1, 8), torch.zeros(1, dtype=torch.long), None, DLMoMConfig(),
                          mode="auto")


def test_auto_consensus_is_contrastive_for_a_strong_and_a_weak_expert(pair, tok):
    small, _ = pair
    big = llama(tok, seed=5, layers=12)
    assert big.num_parameters() >= 2 * small.num_parameters()
    runs = {}
    for mode in ("auto", "contrastive", "ties"):
        moe = DLMoM([(small, tok), (big, tok)], config=DLMoMConfig(controller="explicit", consensus=mode))
        res = moe.generate([PROMPT], max_new_tokens=16)
        runs[mode] = (moe.consensus, res[0].text, res.usage["consensus"])
    assert runs["auto"] == ("contrastive", runs["contrastive"][1], "contrastive")
    assert runs["auto"][1] != runs["ties"][1]  # the test can tell the two modes apart
    same = DLMoM([(small, tok), (small, tok)], config=DLMoMConfig(consensus="auto"))
    assert same.consensus == "ties"
