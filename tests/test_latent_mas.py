"""LatentMAS (dlmom.latent_mas, run("latent-mas", ...)) on tiny random models: the realignment matrix against
a direct solve, the hidden state it maps, the latent steps against a hand-built input sequence, m = 0 as
greedy decoding after the concatenated prompts, batching, usage, errors."""
import pytest
import torch

from dlmom import DLMoMConfig, Expert
from dlmom.baselines import run
from dlmom.latent_mas import LAMBDA, SharedCache, realignment
from tiny_models import llama

PROMPTS = ["What is 12 * 7?", "Add 3 to 5 and then double it, please."]


@pytest.fixture(scope="module")
def roles(model, tok):
    return [Expert(model, tok, name=f"role{i}", system_prompt=f"You are agent number {i}.") for i in range(3)]


def test_realignment_solves_the_ridge_problem(model):
    w_in = model.get_input_embeddings().weight.double()
    w_out = model.get_output_embeddings().weight.double()
    D = w_in.shape[1]
    # min ||W_out X - W_in||^2 + lam ||X||^2 as one least-squares problem: [W_out; sqrt(lam) I] X = [W_in; 0].
    a = torch.cat([w_out, LAMBDA ** 0.5 * torch.eye(D, dtype=torch.float64)])
    b = torch.cat([w_in, torch.zeros(D, D, dtype=torch.float64)])
    expected = torch.linalg.lstsq(a, b, driver="gelsd").solution
    w_a = realignment(model)
    assert w_a.shape == (D, D) and w_a.dtype == torch.float32
    torch.testing.assert_close(w_a.double(), expected, atol=1e-5, rtol=1e-4)
    assert realignment(model) is w_a  # kept while the weights are unchanged


def test_realignment_of_tied_embeddings_is_nearly_identity(tok):
    tied = llama(tok, seed=3)
    tied.lm_head.weight = tied.get_input_embeddings().weight
    torch.testing.assert_close(realignment(tied), torch.eye(64), atol=1e-3, rtol=0)


def test_hidden_state_is_what_the_lm_head_reads(model, tok, roles):
    cache = SharedCache(model, 1, tok.pad_token_id, [0.0])
    logits, h = cache.append_tokens([roles[0].prompt_ids(PROMPTS[0], chat=True)])
    # After the final norm: the LM head turns h into exactly the logits.
    torch.testing.assert_close(logits, h @ model.get_output_embeddings().weight.detach().T)
    with torch.no_grad():
        raw = model(torch.tensor([roles[0].prompt_ids(PROMPTS[0], chat=True)]), output_hidden_states=True)
    torch.testing.assert_close(h, raw.hidden_states[-1][:, -1], atol=1e-5, rtol=1e-5)


def _greedy_from_embeds(model, embeds: torch.Tensor, n: int, eos: set[int]) -> list[int]:
    """Greedy decoding by re-running the whole input each step, no cache: the slow, obvious way."""
    out = []
    for _ in range(n):
        with torch.no_grad():
            t = int(model(inputs_embeds=embeds[None]).logits[0, -1].argmax())
        if t in eos:
            break
        out.append(t)
        embeds = torch.cat([embeds, model.get_input_embeddings().weight.detach()[t][None]])
    return out


def test_latent_steps_feed_the_realigned_hidden_state(model, tok, roles):
    agents, m, n = roles[:2], 2, 8
    got = run("latent-mas", agents, PROMPTS[:1], max_new_tokens=n, latent_steps=m)[0]
    emb = model.get_input_embeddings().weight.detach()
    w_a = realignment(model)
    target = emb[:len(tok)].norm(dim=-1).mean()
    seq = emb[agents[0].prompt_ids(PROMPTS[0], chat=True)]
    for _ in range(m):
        with torch.no_grad():
            h = model(inputs_embeds=seq[None], output_hidden_states=True).hidden_states[-1][0, -1]
        e = h @ w_a
        seq = torch.cat([seq, (e * target / e.norm())[None]])
    seq = torch.cat([seq, emb[agents[1].prompt_ids(PROMPTS[0], chat=True)]])
    expected = tok.decode(_greedy_from_embeds(model, seq, n, agents[1].eos_ids()), skip_special_tokens=True)
    assert got.text == expected
    assert [t["latent_steps"] for t in got.trace] == [m, 0]


def test_no_latent_steps_is_greedy_after_the_concatenated_prompts(model, tok, roles):
    res = run("latent-mas", roles, PROMPTS, max_new_tokens=9, latent_steps=0)
    for p, r in zip(PROMPTS, res):
        ids = torch.tensor([sum((e.prompt_ids(p, chat=True) for e in roles), [])])
        out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=9, do_sample=False,
                             pad_token_id=tok.pad_token_id)
        assert r.text == tok.decode(out[0, ids.shape[1]:], skip_special_tokens=True)
        assert r.usage["latent_steps"] == 0


def test_latent_steps_change_the_answer(roles):
    a, b = (run("latent-mas", roles, PROMPTS[:1], max_new_tokens=8, latent_steps=m)[0].text for m in (0, 4))
    assert a != b


def test_batch_equals_one_by_one_and_seed_changes_nothing(roles):
    both = run("latent-mas", roles, PROMPTS, max_new_tokens=8, latent_steps=3, seed=0)
    alone = [run("latent-mas", roles, [p], max_new_tokens=8, latent_steps=3, seed=s)[0] for s, p in enumerate(PROMPTS)]
    assert [r.text for r in both] == [r.text for r in alone]
    assert [r.trace for r in both] == [r.trace for r in alone]


def test_usage_and_trace(roles):
    m, n = 3, 6
    res = run("latent-mas", roles, PROMPTS, max_new_tokens=n, latent_steps=m)
    for p, r in zip(PROMPTS, res):
        usage = r.usage
        assert usage["method"] == "latent-mas" and usage["bus_bytes"] == 0
        assert usage["latent_steps"] == m * (len(roles) - 1)
        assert [c["expert"] for c in usage["experts"]] == [e.name for e in roles]
        assert [c["prefill_tokens"] for c in usage["experts"]] == [len(e.prompt_ids(p, chat=True)) for e in roles]
        # Latent steps are decode tokens; no end-of-sequence token from random weights in 6 steps: 5 decode forwards.
        assert [c["decode_tokens"] for c in usage["experts"]] == [m] * (len(roles) - 1) + [n - 1]
        assert usage["generated_tokens"] == n
        assert usage["tokens"] == usage["prefill_tokens"] + usage["decode_tokens"]
        assert [t["agent"] for t in r.trace] == [e.name for e in roles]
        assert all(t["prompt"] == p for t in r.trace) and r.trace[-1]["text"] == r.text
    assert res.usage["latent_steps"] == m * (len(roles) - 1) * len(PROMPTS)
    assert res.usage["wall_s"] >= res.usage["expert_forward_s"] > 0


def test_roles_must_share_one_model(tok, roles):
    other = Expert(llama(tok, seed=1), tok, name="other")
    with pytest.raises(ValueError, match=r"latent-mas: every expert must share one model object.*\['other'\]"):
        run("latent-mas", [roles[0], other], PROMPTS, max_new_tokens=4)


@pytest.mark.parametrize("steps", [-1, 1.5, True, "3"])
def test_bad_latent_steps(roles, steps):
    with pytest.raises(ValueError, match="latent_steps must be an integer >= 0"):
        run("latent-mas", roles, PROMPTS, max_new_tokens=4, latent_steps=steps)


def test_too_many_latent_steps_for_the_positions(roles):
    with pytest.raises(ValueError, match=r"latent-mas: prompts\[1\] takes \d+ positions on the shared cache"):
        run("latent-mas", roles, PROMPTS, max_new_tokens=4, latent_steps=300)


def test_no_chat_runs_the_raw_prompts(model, tok, roles):
    res = run("latent-mas", roles, PROMPTS[:1], max_new_tokens=5, latent_steps=0, config=DLMoMConfig(chat=False))
    ids = torch.tensor([sum((e.prompt_ids(PROMPTS[0], chat=False) for e in roles), [])])
    out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=5, do_sample=False,
                         pad_token_id=tok.pad_token_id)
    assert res[0].text == tok.decode(out[0, ids.shape[1]:], skip_special_tokens=True)
