"""dlmom.evaluation end to end with tiny random models, through the API and `dlmom eval`: records, summary,
resume after an interruption, errors kept, batches, the time outside generation."""
import dataclasses
import json
import os
import re
import signal
import subprocess
import sys
import time

import pytest

from dlmom import DLMoMConfig, Expert, Result, baselines
from dlmom.evaluation import Limits, evaluate, read_items

from test_eval_scoring import GSM8K, HUMANEVAL, write_jsonl

# Problems written for these tests (not from any benchmark).
MORE = [{"question": f"Lena packs {a} bags with {b} apples each. How many apples?",
         "answer": f"{a} * {b} = {a * b}\n#### {a * b}"} for a, b in ((2, 5), (3, 4), (6, 7), (9, 2))]
CONFIG = DLMoMConfig(preview_tokens=2)
REAL_RUN = baselines.run


@pytest.fixture(scope="module")
def roles(model, tok):
    return [Expert(model, tok, name=f"role{i}", system_prompt=f"You are agent {i}.") for i in range(2)]


@pytest.fixture
def gsm8k(tmp_path):
    return write_jsonl(tmp_path / "gsm8k.jsonl", GSM8K + MORE[:1])


class Calls:
    """Wraps baselines.run: counts calls per method, and can fail or be interrupted on a given call."""

    def __init__(self, monkeypatch, *, fail=None, interrupt_at=None, answers=None, sleep=0.0):
        self.real, self.calls, self.fail, self.interrupt_at = REAL_RUN, [], fail, interrupt_at
        self.answers, self.sleep = answers, sleep
        monkeypatch.setattr(baselines, "run", self)

    def __call__(self, method, experts, prompts, **kwargs):
        self.calls.append((method, list(prompts)))
        if self.interrupt_at is not None and len(self.calls) == self.interrupt_at:
            raise KeyboardInterrupt
        if self.fail and self.fail(method, prompts):
            raise RuntimeError("the expert fell over")
        if self.answers is None:
            return self.real(method, experts, prompts, **kwargs)
        time.sleep(self.sleep)
        return [Result(self.answers(method, p), [], [], {"tokens": 15, "wall_s": self.sleep}) for p in prompts]


def lines(path):
    with open(path) as f:
        return [json.loads(line) for line in f]


def test_api_runs_every_method_on_every_item_and_resumes_without_redoing(roles, gsm8k, tmp_path, monkeypatch):
    out = tmp_path / "out.jsonl"
    methods = "single,text-mas,dlmom,dlmom:latent"
    ev = evaluate("gsm8k", gsm8k, roles, methods, out=out, max_new_tokens=5, config=CONFIG, seed=0)
    assert [(r["item"], r["method"]) for r in ev.records] == [
        (f"line-{i}", m) for i in range(1, 4) for m in methods.split(",")]
    assert lines(out) == ev.records
    for r in ev.records:
        assert r["error"] is None and r["tokens"] > 0 and r["wall_s"] > 0 and r["batch"] == 1
        assert isinstance(r["correct"], bool) and isinstance(r["text"], str)
    assert set(ev.summary["methods"]) == set(methods.split(","))
    assert [(p["a"], p["b"]) for p in ev.summary["paired"]] == [
        ("dlmom", "single"), ("dlmom", "text-mas"), ("dlmom:latent", "single"), ("dlmom:latent", "text-mas")]
    calls = Calls(monkeypatch)
    again = evaluate("gsm8k", gsm8k, roles, methods, out=out, max_new_tokens=5, config=CONFIG, seed=0)
    assert calls.calls == [] and again.records == ev.records and len(lines(out)) == 12


def test_bracket_settings_make_variants_of_one_method(roles, gsm8k, tmp_path):
    # Two dlmom variants in one run: each its own records (with usage and trace), paired against the baselines.
    methods = "single,dlmom:explicit[gate=1.0],dlmom[controller=explicit,consensus=contrastive,contrast=0.0]"
    ev = evaluate("gsm8k", gsm8k, roles, methods, max_new_tokens=5, config=CONFIG, seed=0)
    names = [m.strip() for m in ("single", "dlmom:explicit[gate=1.0]",
                                 "dlmom[controller=explicit,consensus=contrastive,contrast=0.0]")]
    assert list(ev.summary["methods"]) == names
    by = {(r["item"], r["method"]): r for r in ev.records}
    for i in range(1, 4):
        gated = by[(f"line-{i}", names[1])]
        assert gated["usage"]["merged_steps"] == 0 and len(gated["trace"]) == gated["usage"]["generated_tokens"]
        assert all(not t["merged"] and t["mode"] in ("preview", "explicit") for t in gated["trace"])
        assert [t["agent"] for t in by[(f"line-{i}", "single")]["trace"]] == ["role0"]  # a baseline: its agents
    assert [(p["a"], p["b"]) for p in ev.summary["paired"]] == [(names[1], "single"), (names[2], "single")]


def test_resume_after_an_interruption(roles, gsm8k, tmp_path, monkeypatch):
    out = tmp_path / "out.jsonl"
    Calls(monkeypatch, interrupt_at=4)
    with pytest.raises(KeyboardInterrupt):
        evaluate("gsm8k", gsm8k, roles, "single,dlmom", out=out, max_new_tokens=4, config=CONFIG)
    first = lines(out)
    assert [(r["item"], r["method"]) for r in first] == [("line-1", "single"), ("line-1", "dlmom"),
                                                         ("line-2", "single")]
    calls = Calls(monkeypatch)
    ev = evaluate("gsm8k", gsm8k, roles, "single,dlmom", out=out, max_new_tokens=4, config=CONFIG)
    assert len(calls.calls) == 6 - 3  # nothing finished is done again
    assert ev.records[:3] == first and sorted((r["item"], r["method"]) for r in lines(out)) == sorted(
        (f"line-{i}", m) for i in range(1, 4) for m in ("single", "dlmom"))


def test_a_torn_last_line_is_redone(roles, gsm8k, tmp_path, monkeypatch):
    out = tmp_path / "out.jsonl"
    evaluate("gsm8k", gsm8k, roles, "single", out=out, max_new_tokens=3, config=CONFIG)
    text, before = out.read_text(), lines(out)
    out.write_text(text[:-40])  # killed while writing the last record
    calls = Calls(monkeypatch)
    evaluate("gsm8k", gsm8k, roles, "single", out=out, max_new_tokens=3, config=CONFIG)
    after = lines(out)
    assert len(calls.calls) == 1 and after[:2] == before[:2] and len(after) == 3
    assert {**after[2], "wall_s": 0} == {**before[2], "wall_s": 0}  # the same answer again


def test_other_settings_or_data_are_refused(roles, gsm8k, tmp_path):
    out = tmp_path / "out.jsonl"
    evaluate("gsm8k", gsm8k, roles, "single", out=out, max_new_tokens=3, config=CONFIG)
    with pytest.raises(ValueError, match=r"out.jsonl, line 1: made with other settings \(max_new_tokens is 3 in "
                                         r"the file, 4 in this run\)"):
        evaluate("gsm8k", gsm8k, roles, "single", out=out, max_new_tokens=4, config=CONFIG)
    other = dataclasses.replace(CONFIG, gate=0.5, top_k=CONFIG.top_k + 1)
    with pytest.raises(ValueError, match=rf"\(config.gate is {CONFIG.gate} in the file, 0.5 in this run; config.top_k "
                                         rf"is {CONFIG.top_k} in the file, {CONFIG.top_k + 1} in this run\)"):
        evaluate("gsm8k", gsm8k, roles, "single", out=out, max_new_tokens=3, config=other)
    # records written before they held their settings: the refusal names the two hashes
    out.write_text("".join(json.dumps({k: v for k, v in r.items() if k != "run"}) + "\n" for r in lines(out)))
    with pytest.raises(ValueError, match=r"made with other settings \(settings [0-9a-f]{16} in the file, [0-9a-f]{16} "
                                         r"in this run\)"):
        evaluate("gsm8k", gsm8k, roles, "single", out=out, max_new_tokens=4, config=CONFIG)
    changed = write_jsonl(tmp_path / "changed.jsonl", [{**GSM8K[0], "question": "Another question?"}])
    with pytest.raises(ValueError, match=r"item 'line-1' is another problem"):
        evaluate("gsm8k", changed, roles, "single", out=out, max_new_tokens=3, config=CONFIG)


def test_placement_settings_do_not_change_the_records_settings(roles, gsm8k, tmp_path, monkeypatch):
    out = tmp_path / "out.jsonl"
    evaluate("gsm8k", gsm8k, roles, "single", out=out, max_new_tokens=3, config=CONFIG, seed=0)
    calls = Calls(monkeypatch)
    again = evaluate("gsm8k", gsm8k, roles, "single", out=out, max_new_tokens=3, seed=0,
                     config=dataclasses.replace(CONFIG, ray_timeout_s=5.0, ray_address="auto"))
    assert calls.calls == [] and len(again.records) == 3  # resumed, nothing redone


def test_a_field_added_later_keeps_earlier_records_at_its_neutral_value():
    from dlmom.evaluation.harness import _ADDED_FIELDS, _answer_settings

    plain = _answer_settings(CONFIG)
    assert not set(_ADDED_FIELDS) & set(plain)  # the settings records written before these fields existed
    routed = _answer_settings(dataclasses.replace(CONFIG, route_by="prompt"))
    assert routed["route_by"] == "prompt" and {**plain, "route_by": "prompt"} == routed  # it changes answers
    for name, neutral in _ADDED_FIELDS.items():
        assert DLMoMConfig.__dataclass_fields__[name].default == neutral


def test_a_gguf_expert_elsewhere_continues_the_run(tmp_path, monkeypatch):
    """The same GGUF file at another path (another checkout's package, a reinstall: a new mtime too) continues
    a run; records written before experts were named by their file (by the converted cache folder) still do at
    the path they were made with."""
    import shutil

    from dlmom.loading import load_pretrained
    from test_loading import write_tiny_gguf

    monkeypatch.setenv("DLMOM_CACHE", str(tmp_path / "cache"))
    first = tmp_path / "a" / "tiny.gguf"
    first.parent.mkdir()
    write_tiny_gguf(first)
    (tmp_path / "b").mkdir()
    moved = shutil.copy(first, tmp_path / "b" / "tiny.gguf")
    data = write_jsonl(tmp_path / "d.jsonl", GSM8K[:2])
    experts = [Expert(*load_pretrained(path), name="tiny") for path in (first, moved)]
    assert experts[0].model.config.dlmom_source == f"tiny.gguf ({os.path.getsize(first)} bytes)"
    assert experts[0].model.config._name_or_path != experts[1].model.config._name_or_path  # two cache entries

    def run(expert, out, **kw):
        return evaluate("gsm8k", data, [expert], "single", out=out, max_new_tokens=2, config=CONFIG, **kw)

    Calls(monkeypatch, answers=lambda method, prompt: "The answer is 5.")
    run(experts[0], tmp_path / "out.jsonl")
    calls = Calls(monkeypatch)
    assert len(run(experts[1], tmp_path / "out.jsonl").records) == 2 and calls.calls == []

    source = experts[0].model.config.dlmom_source
    del experts[0].model.config.dlmom_source  # as an earlier dlmom loaded it
    Calls(monkeypatch, answers=lambda method, prompt: "The answer is 5.")
    run(experts[0], tmp_path / "legacy.jsonl")
    experts[0].model.config.dlmom_source = source
    calls = Calls(monkeypatch)
    assert len(run(experts[0], tmp_path / "legacy.jsonl").records) == 2 and calls.calls == []
    with pytest.raises(ValueError, match="made with other settings"):  # the earlier id held the path
        run(experts[1], tmp_path / "legacy.jsonl")


# The config fields in the records' settings hash when the dev-set records (bench/results/eval-records) were made.
RECORDED_FIELDS = {
    "block_size", "chat", "consensus", "contrast", "controller", "do_sample", "elect", "entropy_threshold", "gate",
    "kv", "kv_group_size", "kv_merge_start", "kv_merge_t", "kv_merge_threshold", "kv_residual_length", "lead",
    "max_latent_steps", "max_switches", "noise", "noise_strength", "plausibility", "preview_tokens",
    "share_prefill", "slope_threshold", "start_mode", "temperature", "theta", "top_k", "top_m", "top_p",
    "variance_threshold"}


def test_a_new_config_field_is_listed_with_its_neutral_value():
    """A field added to DLMoMConfig must join _ADDED_FIELDS (or PlacementSettings): otherwise every record file
    written before it is refused as "made with other settings"."""
    from dlmom.evaluation.harness import _answer_settings

    new = set(_answer_settings(DLMoMConfig())) - RECORDED_FIELDS
    assert not new, f"add {sorted(new)} to dlmom.evaluation.harness._ADDED_FIELDS with the value that keeps " \
                    "the earlier answers"


def test_an_item_that_errors_is_recorded_and_kept(roles, gsm8k, tmp_path, monkeypatch):
    out = tmp_path / "out.jsonl"
    Calls(monkeypatch, fail=lambda method, prompts: method == "text-mas" and "Ana had" in prompts[0])
    ev = evaluate("gsm8k", gsm8k, roles, "single,text-mas", out=out, max_new_tokens=3, config=CONFIG)
    bad = [r for r in ev.records if r["error"]]
    assert [(r["item"], r["method"], r["error"], r["correct"]) for r in bad] == [
        ("line-2", "text-mas", "RuntimeError: the expert fell over", False)]
    assert ev.summary["methods"]["text-mas"]["errors"] == 1 and ev.summary["methods"]["text-mas"]["items"] == 3
    calls = Calls(monkeypatch)
    evaluate("gsm8k", gsm8k, roles, "single,text-mas", out=out, max_new_tokens=3, config=CONFIG)
    assert calls.calls == []  # an error is a record like any other ...
    ev = evaluate("gsm8k", gsm8k, roles, "single,text-mas", out=out, max_new_tokens=3, config=CONFIG,
                  retry_errors=True)  # ... unless asked to retry
    assert [c[0] for c in calls.calls] == ["text-mas"] and not any(r["error"] for r in lines(out))
    assert len(lines(out)) == 6


def test_scripted_answers_give_the_hand_computed_summary(roles, tmp_path, monkeypatch):
    right = {"single": {1, 3}, "dlmom": {1, 2, 3, 4, 5}}  # items (1-based) each method answers right
    items = read_items("gsm8k", write_jsonl(tmp_path / "six.jsonl", GSM8K + MORE))

    def answers(method, prompt):
        i = next(n for n, it in enumerate(items, 1) if it.prompt == prompt)
        return f"Thinking.\nThe answer is {items[i - 1].reference if i in right[method] else -1}."
    Calls(monkeypatch, answers=answers)
    ev = evaluate("gsm8k", items, roles, "single,dlmom", batch_size=4)
    s = ev.summary["methods"]
    assert (s["single"]["correct"], s["dlmom"]["correct"]) == (2, 5)
    assert s["dlmom"]["ci_low"] == pytest.approx(0.4365, abs=5e-4)  # Wilson 5/6
    assert s["dlmom"]["tokens_mean"] == 15 and [r["batch"] for r in ev.records] == [4] * 8 + [2] * 4
    (p,) = ev.summary["paired"]
    assert (p["wins"], p["losses"], p["ties"]) == (3, 0, 3) and p["p"] == pytest.approx(0.25)


def test_time_outside_generation_is_under_two_percent(roles, tmp_path, monkeypatch):
    """Scoring, writing and bookkeeping against generation that takes 0.1 s a call (real models take
    seconds): under 2% of the run."""
    many = write_jsonl(tmp_path / "many.jsonl", [{"question": f"What is {n} + 1?", "answer": f"#### {n + 1}"}
                                                 for n in range(15)])
    Calls(monkeypatch, answers=lambda method, prompt: "The answer is 3.", sleep=0.1)
    ev = evaluate("gsm8k", many, roles, "single,dlmom", out=tmp_path / "out.jsonl")
    assert ev.summary["generation_s"] >= 3.0
    assert 0 <= ev.summary["overhead_fraction"] < 0.02, ev.summary


def test_humaneval_through_the_sandbox(roles, tmp_path, monkeypatch):
    data = write_jsonl(tmp_path / "he.jsonl", HUMANEVAL + [{**HUMANEVAL[0], "task_id": "Dev/1"}])
    script = {"single": "```python\ndef twice(x):\n    return 2 * x\n```",
              "dlmom": "```python\nimport os\ndef twice(x):\n    while True:\n        os.fork()\n```"}
    Calls(monkeypatch, answers=lambda method, prompt: script[method])
    ev = evaluate("humaneval", data, roles, "single,dlmom", limits=Limits(timeout_s=3))
    by = {(r["item"], r["method"]): r for r in ev.records}
    assert by["Dev/0", "single"]["correct"] and by["Dev/1", "single"]["correct"]
    assert by["Dev/0", "dlmom"]["reason"].startswith("blocked by the sandbox: os.fork")


# ---- the command line ----

def dlmom_eval(*args, timeout=300):
    return subprocess.run([sys.executable, "-m", "dlmom", "eval", *args], capture_output=True, text=True,
                          timeout=timeout, env=dict(os.environ, TRANSFORMERS_VERBOSITY="error"))


def test_cli_prints_the_table_and_continues(model_folder, gsm8k, tmp_path):
    out = tmp_path / "out.jsonl"
    common = ["--task", "gsm8k", "--data", str(gsm8k), "--experts", model_folder, model_folder, "--methods",
              "single,dlmom", "--max-new-tokens", "4", "--preview-tokens", "2", "--out", str(out)]
    done = dlmom_eval(*common, "--limit", "2")
    assert done.returncode == 0, done.stderr
    assert "dlmom vs single" in done.stdout and "McNemar" in done.stdout and "95% CI" in done.stdout
    assert "4 records in" in done.stdout and "time outside generation" in done.stdout
    first = lines(out)
    assert len(first) == 4
    with open(out, "a") as f:
        f.write('{"item": "line-3", "meth')  # torn by a kill
    done = dlmom_eval(*common, "--limit", "3", "--json")
    assert done.returncode == 0, done.stderr
    summary = json.loads(done.stdout)
    assert summary["methods"]["dlmom"]["items"] == 3 and lines(out)[:4] == first and len(lines(out)) == 6
    done = dlmom_eval(*common, "--limit", "3")
    assert done.returncode == 0 and "dlmom vs single" in done.stdout, done.stderr
    assert "6 records in" in done.stdout and "nothing left to answer" in done.stdout and len(lines(out)) == 6


def test_cli_ctrl_c_then_the_same_command_finishes(model_folder, tmp_path):
    data = write_jsonl(tmp_path / "d.jsonl", [{"prompt": f"Say {n}.", "answer": n} for n in range(16)])
    out = tmp_path / "out.jsonl"
    command = ["--task", "jsonl", "--data", str(data), "--experts", model_folder, "--methods", "single,dlmom",
               "--max-new-tokens", "16", "--preview-tokens", "2", "--out", str(out), "--quiet"]
    # A run started in the background (nohup, `&`) inherits SIGINT ignored, and Python then installs no
    # KeyboardInterrupt handler: restore the default so the interrupt lands as a user's Ctrl-C would.
    proc = subprocess.Popen([sys.executable, "-m", "dlmom", "eval", *command], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    deadline = time.time() + 240
    while time.time() < deadline and (not out.exists() or len(out.read_text().splitlines()) < 3):
        time.sleep(0.05)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130 and "the same command continues" in err, err
    before = lines(out)
    assert 3 <= len(before) < 32
    done = dlmom_eval(*command)
    assert done.returncode == 0, done.stderr
    after = lines(out)
    assert after[:len(before)] == before and len(after) == 32
    assert len({(r["item"], r["method"]) for r in after}) == 32


@pytest.mark.parametrize("rows, args, message", [
    ([GSM8K[0], {"question": "Why?"}], [], r"d.jsonl, line 2: missing the field 'answer'"),
    ([GSM8K[0]], ["--methods", "single,debate"], r"argument --methods: 'debate' is not one of"),
    ([GSM8K[0]], ["--methods", "dlmom:slow"], r"argument --methods: 'dlmom:slow': controller must be one of"),
    ([GSM8K[0]], ["--methods", "dlmom[gate=2]"], r"argument --methods: 'dlmom\[gate=2\]': gate must be a number"),
    ([GSM8K[0]], ["--methods", "dlmom[gates=1]"], r"expected FIELD=VALUE with a DLMoMConfig field, got 'gates=1'"),
    ([GSM8K[0]], ["--limit", "0"], r"argument --limit: must be an integer >= 1"),
    ([GSM8K[0]], ["--top-k", "0"], r"argument --top-k"),
    ([GSM8K[0]], ["--timeout", "nan"], r"argument --timeout"),
    ([GSM8K[0]], ["--experts", "/no/such/model"], r"/no/such/model"),
    ([GSM8K[0]], ["--roles", "--methods", "single:3"], r"argument --methods: .*single:3"),
    ([GSM8K[0]], ["--roles", "--expert", "3"], r"argument --expert: an index in \[0, 2\], got 3"),
])
def test_cli_bad_input_is_one_line_before_loading(model_folder, tmp_path, rows, args, message):
    data = write_jsonl(tmp_path / "d.jsonl", rows)
    done = dlmom_eval("--task", "gsm8k", "--data", str(data), "--experts", model_folder, *args,
                      "--out", str(tmp_path / "o.jsonl"))
    assert done.returncode == 2 and done.stdout == "", done.stderr
    (line,) = [x for x in done.stderr.splitlines() if x.strip()]
    assert line.startswith("dlmom: error:") and re.search(message, line), line


def test_cli_help_explains_formats_and_methods():
    done = dlmom_eval("--help")
    assert done.returncode == 0
    for text in ("#### <number>", "check(candidate)", "dlmom:CONTROLLER", "--batch-size", "--controller", "Wilson"):
        assert text in done.stdout, text
