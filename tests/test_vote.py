"""The self-consistency vote (run("vote", ...)) on tiny random models: seeds, the tally and its tie-break
by bits per byte, what each sample costs, errors."""
import pytest
import torch

import dlmom.baselines as baselines
from dlmom import DLMoMConfig, Expert
from dlmom.answers import final_answer
from dlmom.baselines import run
from dlmom.router import bits_per_byte
from dlmom.soft_thinking import SoftThinkingRunner

PROMPTS = ["What is 12 * 7?", "Add 3 to 5."]


@pytest.fixture(scope="module")
def roles(model, tok):
    return [Expert(model, tok, name=f"role{i}", system_prompt=f"You are agent number {i}.") for i in range(3)]


def test_same_seed_same_votes(roles):
    a, b, c = (run("vote", roles, PROMPTS, max_new_tokens=8, vote_samples=2, seed=s) for s in (0, 0, 1))
    assert [r.trace for r in a] == [r.trace for r in b] and [r.text for r in a] == [r.text for r in b]
    assert [t["text"] for r in a for t in r.trace[:-1]] != [t["text"] for r in c for t in r.trace[:-1]]


def test_trace_records_every_sample_and_the_tally(roles):
    res = run("vote", roles, PROMPTS, max_new_tokens=8, vote_samples=2, seed=0)
    for r in res:
        samples, tally = r.trace[:-1], r.trace[-1]["vote"]
        assert [(t["agent"], t["sample"]) for t in samples] == [(e.name, s) for e in roles for s in range(2)]
        assert all(t["answer"] == final_answer(t["text"]) for t in samples)
        counted = {}
        for t in samples:
            if t["answer"] is not None:
                counted[t["answer"]] = counted.get(t["answer"], 0) + 1
        assert tally["tally"] == counted
        winner = next(t for t in samples if (t["agent"], t["sample"]) == (tally["agent"], tally["sample"]))
        assert r.text == winner["text"] and tally["answer"] == winner["answer"]


def _fixed_answers(monkeypatch, texts_by_expert: dict[str, list[str]]):
    """_answer replaced: expert name -> its texts for the rows (prompt-major, samples inside)."""
    def fake(expert, prompts, *, max_new_tokens, config, clock):
        assert config.do_sample  # the vote always samples
        clock[0] += 1e-6
        texts = list(texts_by_expert[expert.name])
        return texts, [{"expert": expert.name, "prefill_tokens": 1, "decode_tokens": 1}] * len(texts), [1] * len(texts)
    monkeypatch.setattr(baselines, "_answer", fake)


def test_majority_wins(monkeypatch, roles):
    # Per expert its texts for prompt 0 and prompt 1.
    _fixed_answers(monkeypatch, {"role0": ["So it is 84.", "I think 80"], "role1": ["The answer is 84", "Paris."],
                                 "role2": ["Paris\n", "paris"]})
    res = run("vote", roles, PROMPTS, max_new_tokens=4)
    assert [r.text for r in res] == ["So it is 84.", "Paris."]
    assert res[0].trace[-1]["vote"] == {"tally": {"84": 2, "paris": 1}, "answer": "84", "tied": [],
                                        "decided_by": "majority", "agent": "role0", "sample": 0}
    assert res[1].trace[-1]["vote"]["answer"] == "paris" and res[1].trace[-1]["vote"]["agent"] == "role1"
    assert "bits_per_byte" not in res[0].trace[0]  # no tie, no scoring


def test_tie_goes_to_the_lowest_bits_per_byte(monkeypatch, model, tok, roles):
    texts = {"role0": ["It is 3."], "role1": ["Surely 4 apples"], "role2": ["   "]}
    _fixed_answers(monkeypatch, texts)
    res = run("vote", roles, PROMPTS[:1], max_new_tokens=4)[0]
    scores = [float(bits_per_byte(SoftThinkingRunner([e]), PROMPTS[:1], texts[e.name], chat=True)[0, 0])
              for e in roles[:2]]
    vote = res.trace[-1]["vote"]
    assert vote["tally"] == {"3": 1, "4": 1} and sorted(vote["tied"]) == ["3", "4"]
    assert vote["decided_by"] == "bits_per_byte" and res.trace[2]["answer"] is None  # blank text abstains
    best = min(range(2), key=lambda i: scores[i])
    assert vote["agent"] == roles[best].name and res.text == texts[roles[best].name][0]
    assert [t["bits_per_byte"] for t in res.trace[:2]] == pytest.approx(scores, abs=1e-5)
    # The scoring forwards count as prefilled tokens of the expert that scored.
    assert res.usage["experts"][0]["prefill_tokens"] > 1 and res.usage["experts"][2]["prefill_tokens"] == 1


def test_nobody_answers(monkeypatch, roles):
    _fixed_answers(monkeypatch, {e.name: [""] for e in roles})
    res = run("vote", roles, PROMPTS[:1], max_new_tokens=4)[0]
    assert res.text == "" and res.trace[-1]["vote"]["decided_by"] == "none" and res.trace[-1]["vote"]["answer"] is None


def test_usage_is_one_generate_per_expert_over_the_samples(roles):
    k, n = 3, 6
    res = run("vote", roles, PROMPTS, max_new_tokens=n, vote_samples=k, seed=1)
    for p, r in zip(PROMPTS, res):
        usage = r.usage
        assert usage["method"] == "vote" and usage["latent_steps"] == usage["bus_bytes"] == 0
        tied = len(r.trace[-1]["vote"]["tied"]) > 1
        for e, counts in zip(roles, usage["experts"]):
            prompt_tokens = k * len(e.prompt_ids(p, chat=True))
            assert counts["prefill_tokens"] == prompt_tokens or tied and counts["prefill_tokens"] > prompt_tokens
            assert 0 < counts["decode_tokens"] <= (n - 1) * k
        assert 0 < usage["generated_tokens"] <= n * k * len(roles)
    assert res.usage["tokens"] == sum(r.usage["tokens"] for r in res)


def test_default_budget_is_one_sample_per_expert(roles):
    # DL-MoM processes at most, per expert, its prompt and max_new_tokens steps; so does one sample each.
    res = run("vote", roles, PROMPTS[:1], max_new_tokens=5, seed=0)[0]
    assert len(res.trace) == len(roles) + 1
    bound = sum(len(e.prompt_ids(PROMPTS[0], chat=True)) + 5 for e in roles)
    assert res.usage["tokens"] <= bound or res.trace[-1]["vote"]["tied"]


@pytest.mark.parametrize("kwargs, message", [
    (dict(vote_samples=0), "vote_samples must be an integer >= 1, got 0"),
    (dict(vote_samples=2.0), "vote_samples must be an integer >= 1, got 2.0"),
    (dict(config=DLMoMConfig(temperature=0)), "temperature must be > 0 for method 'vote'"),
])
def test_bad_arguments(roles, kwargs, message):
    with pytest.raises(ValueError, match=message):
        run("vote", roles, PROMPTS, max_new_tokens=4, **kwargs)


def test_leaves_the_global_rng_alone(roles):
    torch.manual_seed(5)
    expected = torch.rand(2)
    torch.manual_seed(5)
    run("vote", roles, PROMPTS[:1], max_new_tokens=3, seed=3)
    assert torch.equal(torch.rand(2), expected)
