"""The baselines (single expert, text pipeline) on tiny random models: exactness against transformers'
generate, what each pipeline agent reads, the Result shape shared with the engine, and the CLI."""
import json
import os
import subprocess
import sys

import pytest
import torch

from dlmom import DLMoMConfig, Expert, Result
from dlmom.baselines import METHODS, _pipeline_prompt, run
from tiny_models import hf_greedy, llama

PROMPTS = ["What is 12 * 7?", "Add 3 to 5."]


@pytest.fixture(scope="module")
def roles(model, tok):
    """One model in three roles, as the embedded default is."""
    return [Expert(model, tok, name=f"role{i}", system_prompt=f"You are agent number {i}.") for i in range(3)]


def test_single_equals_transformers_generate(model, tok, roles):
    res = run("single", roles, PROMPTS, max_new_tokens=10, expert=1)
    # Batched with left padding, yet each answer is what generate gives the prompt alone.
    assert [r.text for r in res] == [hf_greedy(model, tok, p, 10, system=roles[1].system_prompt) for p in PROMPTS]
    usage = res.usage
    assert [e["expert"] for e in usage["experts"]] == ["role1"]
    prompt_tokens = sum(len(roles[1].prompt_ids(p, chat=True)) for p in PROMPTS)
    assert usage["experts"][0]["prefill_tokens"] == prompt_tokens
    # 10 steps without an end-of-sequence token: 9 decode forwards over both rows.
    assert usage["experts"][0]["decode_tokens"] == 9 * len(PROMPTS)
    assert usage["generated_tokens"] == 10 * len(PROMPTS)
    for p, r in zip(PROMPTS, res):  # each prompt's own share
        own = len(roles[1].prompt_ids(p, chat=True))
        assert r.usage["experts"] == [{"expert": "role1", "prefill_tokens": own, "decode_tokens": 9}]
        assert r.usage["tokens"] == own + 9 and r.usage["generated_tokens"] == 10


def test_single_sampling_follows_the_seed(roles):
    config = DLMoMConfig(do_sample=True, temperature=1.0, top_p=1.0)
    a, b, c = (run("single", roles, PROMPTS[:1], max_new_tokens=12, config=config, seed=s)[0].text for s in (0, 0, 1))
    assert a == b != c


def test_text_mas_feeds_each_agent_the_earlier_answers(model, tok, roles):
    res = run("text-mas", roles, PROMPTS, max_new_tokens=6)
    for b, r in enumerate(res):
        assert [t["agent"] for t in r.trace] == ["role0", "role1", "role2"]
        earlier = []
        for i, step in enumerate(r.trace):
            assert step["prompt"] == _pipeline_prompt(PROMPTS[b], earlier)
            # Each agent's answer is plain greedy generate on what it read, under its own role.
            assert step["text"] == hf_greedy(model, tok, step["prompt"], 6, system=roles[i].system_prompt)
            earlier.append((roles[i].name, step["text"]))
        assert r.text == r.trace[-1]["text"]
        assert all(t["text"] in r.trace[-1]["prompt"] for t in r.trace[:-1])
    usage = res.usage
    for i, counts in enumerate(usage["experts"]):
        read = sum(len(roles[i].prompt_ids(r.trace[i]["prompt"], chat=True)) for r in res)
        assert counts["prefill_tokens"] == read
        assert counts["decode_tokens"] == 5 * len(PROMPTS)
    # Later agents read more: the pipeline's cost grows with every answer passed on.
    prefill = [c["prefill_tokens"] for c in usage["experts"]]
    assert prefill[0] < prefill[1] < prefill[2]
    passed = sum(len(t["text"].encode()) * (len(r.trace) - 1 - i) for r in res for i, t in enumerate(r.trace))
    assert usage["bus_bytes"] == passed > 0
    for r in res:
        read = [len(t["text"].encode()) * (len(r.trace) - 1 - i) for i, t in enumerate(r.trace)]
        assert r.usage["bus_bytes"] == sum(read)
        assert [c["prefill_tokens"] for c in r.usage["experts"]] == [
            len(roles[i].prompt_ids(t["prompt"], chat=True)) for i, t in enumerate(r.trace)]


@pytest.mark.parametrize("method", METHODS)
def test_every_method_returns_the_engine_result_shape(roles, method):
    res = run(method, roles, PROMPTS, max_new_tokens=5, config=DLMoMConfig(preview_tokens=2), seed=0)
    assert len(res) == len(PROMPTS) and all(isinstance(r, Result) for r in res)
    r = res[0]
    assert isinstance(r.text, str) and isinstance(r.trace, list) and isinstance(r.route, list)
    keys = {"method", "experts", "tokens", "prefill_tokens", "decode_tokens", "generated_tokens", "wall_s", "bus_bytes",
            "latent_steps", "switches"}
    assert keys <= set(r.usage) and keys <= set(res.usage) and r.usage["method"] == method
    assert res.usage["wall_s"] >= res.usage["expert_forward_s"] > 0 and r.usage["wall_s"] == res.usage["wall_s"]
    assert res.usage["tokens"] == sum(x.usage["tokens"] for x in res)
    for e in r.usage["experts"]:
        assert e["prefill_tokens"] > 0 and e["decode_tokens"] > 0
    assert json.loads(json.dumps(r.to_dict()))["text"] == r.text


def test_stop_string_cuts_the_answer(roles):
    full = run("single", roles, PROMPTS[:1], max_new_tokens=16)[0].text
    stop = full[4:7]
    assert run("single", roles, PROMPTS[:1], max_new_tokens=16, stop=stop)[0].text == full[:full.index(stop)]


@pytest.mark.parametrize("kwargs, message", [
    (dict(method="beam"), "method must be one of"),
    (dict(method="single", expert=3), r"expert must be an index in \[0, 2\]"),
    (dict(method="text-mas", prompts=[]), "prompts must be a non-empty list"),
    (dict(method="single", max_new_tokens=0), "max_new_tokens must be an integer >= 1"),
    (dict(method="single", config={"chat": False}), "config must be a DLMoMConfig"),
    (dict(method="text-mas", experts=[]), "at least one expert"),
])
def test_bad_arguments(roles, kwargs, message):
    kwargs = {"experts": roles, "prompts": PROMPTS, **kwargs}
    with pytest.raises(ValueError, match=message):
        run(kwargs.pop("method"), kwargs.pop("experts"), kwargs.pop("prompts"), **kwargs)


# ---- the command line ----

@pytest.fixture(scope="module")
def model_folder(tmp_path_factory, tok):
    folder = tmp_path_factory.mktemp("tiny-llama")
    llama(tok).save_pretrained(folder)
    tok.save_pretrained(folder)
    return str(folder)


def dlmom(*args):
    return subprocess.run([sys.executable, "-m", "dlmom", *args], capture_output=True, text=True, timeout=300,
                          env=dict(os.environ, TRANSFORMERS_VERBOSITY="error"))


def test_cli_methods(model_folder, model, tok):
    done = dlmom("run", PROMPTS[0], "--experts", model_folder, "--max-new-tokens", "7", "--method", "single",
                 "--json")
    assert done.returncode == 0, done.stderr
    single = json.loads(done.stdout)["results"][0]
    assert single["usage"]["method"] == "single" and single["text"] == hf_greedy(model, tok, PROMPTS[0], 7)
    done = dlmom("run", PROMPTS[0], "--experts", model_folder, model_folder, "--max-new-tokens", "5",
                 "--method", "text-mas")
    assert done.returncode == 0, done.stderr
    assert "text-mas:" in done.stderr and "text-mas:" not in done.stdout


def test_cli_bad_method_is_one_line(model_folder):
    done = dlmom("run", "hi", "--experts", model_folder, "--method", "debate")
    assert done.returncode == 2 and done.stdout == ""
    lines = [line for line in done.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and "invalid choice" in lines[0] and "text-mas" in lines[0], done.stderr


def test_cli_help_explains_methods():
    done = dlmom("run", "--help")
    assert done.returncode == 0 and "--method" in done.stdout and "text-mas" in done.stdout


def test_seed_leaves_the_global_rng_alone(roles):
    torch.manual_seed(5)
    expected = torch.rand(2)
    torch.manual_seed(5)
    run("single", roles, PROMPTS[:1], max_new_tokens=3, config=DLMoMConfig(do_sample=True), seed=3)
    assert torch.equal(torch.rand(2), expected)
