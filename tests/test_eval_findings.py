"""bench/eval_findings.py, the script behind docs/findings.md: how it pools record files of one mixture on other
items (a dev set run in thirds) and joins runs of other methods on the same items (a variant run later)."""
import importlib.util
import json
import pathlib

import pytest

_SPEC = importlib.util.spec_from_file_location(
    "eval_findings", pathlib.Path(__file__).resolve().parents[1] / "bench" / "eval_findings.py")
eval_findings = importlib.util.module_from_spec(_SPEC)
_SPEC.loader.exec_module(eval_findings)

BEST, MIX, OTHER, VARIANT = "single:1", "dlmom:explicit", "vote", "dlmom:explicit[gate=0.1]"


def record(item, method, correct, tokens=10):
    return {"item": item, "method": method, "correct": correct, "settings": "s", "item_sha": "h", "tokens": tokens,
            "wall_s": 1.0, "usage": {"generated_tokens": tokens,
                      "experts": [{"expert": "coder-1.5b.gguf", "prefill_tokens": 5, "decode_tokens": tokens}]}}


def write(path, records):
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return str(path)


def summary(tmp_path, *specs):
    out = tmp_path / "summary.json"
    assert eval_findings.main([f"run={spec}" for spec in specs] + ["--json", str(out)]) == 0
    return json.loads(out.read_text())["run"]


@pytest.fixture
def thirds(tmp_path):
    """Two thirds of a dev set: both ran the best single and the mixture, only the first ran vote."""
    first = write(tmp_path / "first.jsonl", [record("a", BEST, True), record("a", MIX, True), record("a", OTHER, True),
                                             record("b", BEST, False), record("b", MIX, True),
                                             record("b", OTHER, False)])
    second = write(tmp_path / "second.jsonl", [record("c", BEST, True), record("c", MIX, False)])
    return first, second


def test_pooled_files_keep_the_methods_every_file_ran_on_all_their_items(tmp_path, thirds):
    run = summary(tmp_path, ",".join(thirds))
    assert run["items"] == 3 and list(run["methods"]) == [BEST, MIX]
    assert run["methods"][BEST]["correct"] == 2 and run["methods"][MIX]["correct"] == 2
    (pair,) = run["paired_vs_strongest"]
    assert (pair["a"], pair["wins"], pair["losses"]) == (MIX, 1, 1)


def test_a_later_pooled_file_replaces_the_records_it_redoes(tmp_path, thirds):
    redone = write(tmp_path / "512.jsonl", [record("b", BEST, True, tokens=300), record("b", MIX, True, 300)])
    run = summary(tmp_path, ",".join(thirds) + "," + redone + "@256")
    assert run["items"] == 3 and run["methods"][BEST]["correct"] == 3
    assert run["methods"][BEST]["cut_share"] == pytest.approx(1 / 3)  # b's 300 tokens ran past 256


def test_a_joined_run_adds_its_method_on_the_items_it_answered(tmp_path, thirds):
    variant = write(tmp_path / "next.jsonl", [record("a", VARIANT, True), record("b", VARIANT, True)])
    run = summary(tmp_path, ",".join(thirds), variant)
    assert list(run["methods"]) == [BEST, MIX, VARIANT]
    assert run["items"] == 2  # c has no variant record yet: every row is on the same items
    assert [(p["a"], p["wins"], p["losses"]) for p in run["paired_vs_strongest"]] == [(MIX, 1, 0), (VARIANT, 1, 0)]


def test_a_run_given_again_with_another_budget_is_refused(tmp_path, thirds, capsys):
    with pytest.raises(SystemExit):
        eval_findings.main([f"run={thirds[0]}@256", f"run={thirds[1]}@512"])
    assert "run was given with @256 before, and @512" in capsys.readouterr().err


def test_a_malformed_run_names_what_was_expected(capsys):
    with pytest.raises(SystemExit):
        eval_findings.main(["records.jsonl"])
    assert "expected NAME=RECORDS.jsonl" in capsys.readouterr().err
