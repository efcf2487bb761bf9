"""dlmom.evaluation without models: reading the formats (and refusing bad lines), extracting answers and
code from completions, the statistics against hand-computed values, and the summary table."""
import json
from decimal import Decimal

import pytest

from dlmom.evaluation import formats, read_items
from dlmom.evaluation.methods import Method, parse_methods
from dlmom.evaluation.report import format_table, summarize
from dlmom.evaluation.scoring import extract_code, final_number, final_text, normalise, parse_number, program, score
from dlmom.evaluation.stats import mcnemar_exact, paired, paired_difference, wilson

# Problems written for these tests (not from any benchmark).
GSM8K = [{"question": "A crate holds 6 rows of 7 jars. How many jars are in 3 crates?",
          "answer": "One crate holds 6 * 7 = 42 jars.\nThree hold 3 * 42 = 126.\n#### 126"},
         {"question": "Ana had 1,250 stamps and gave away 300. How many are left?", "answer": "1250-300=950\n#### 950"}]
HUMANEVAL = [{"task_id": "Dev/0", "entry_point": "twice",
              "prompt": "import math\n\n\ndef twice(x: int) -> int:\n    \"\"\"Return x doubled.\n    >>> twice(3)\n    6\n    \"\"\"\n",
              "test": "def check(candidate):\n    assert candidate(3) == 6\n    assert candidate(-2) == -4\n"}]


def write_jsonl(path, rows):
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


@pytest.mark.parametrize("text, expected", [
    ("so the total is 126 jars", "126"),
    ("Step: 3 * 42 = 126\nThe answer is 126.", "126"),
    ("The answer is $1,250.50 in all. Then 7 more lines with 3 numbers", "1250.50"),
    ("we get \\boxed{-7} and later 12", "-7"),
    ("calc 5-3 = 2, final: 2", "2"),
    ("It is −4 degrees", "-4"),
    ("Total 1,234,567 people", "1234567"),
    ("#### 950\nsome trailing 12", "950"),
    ("The answer is: 0.5", "0.5"),
    ("Answer: 40% of them", "40"),
    ("no digits here", None),
])
def test_final_number(text, expected):
    got = final_number(text)
    assert (got is None and expected is None) or got == Decimal(expected)


def test_parse_number_only_takes_one_number():
    assert parse_number("1,250") == 1250 and parse_number("-3.50") == Decimal("-3.5") and parse_number("18.") == 18
    assert parse_number("12 apples") is None and parse_number("") is None


def test_text_answers_are_normalised():
    assert final_text("thinking...\nThe answer is: Paris.\nbye") == "Paris."
    assert final_text("line one\n\n  **Blue**  \n") == "  **Blue**  "
    assert normalise("  **Blue**  ") == normalise('"blue".') == "blue"


@pytest.mark.parametrize("completion", [
    "```python\ndef twice(x: int) -> int:\n    return 2 * x\n```\nThis doubles.",      # the whole function
    "Sure:\n```\ndef twice(x):\n    return x + x\n```",                             # repeated signature, plain fence
    "    return x * 2\n",                                                            # the body alone
    "return x * 2",                                                                  # the body, not indented
    "```python\ndef twice(x: int) -> int:\n    return math.floor(2 * x)\n",          # fence cut by the budget
])
def test_humaneval_completions_that_pass(completion, tmp_path):
    item = read_items("humaneval", write_jsonl(tmp_path / "h.jsonl", HUMANEVAL))[0]
    assert score("humaneval", item, completion) == {"correct": True, "answer": None, "reason": None}, \
        program(item, completion)


def test_humaneval_wrong_code_fails_with_its_reason(tmp_path):
    item = read_items("humaneval", write_jsonl(tmp_path / "h.jsonl", HUMANEVAL))[0]
    out = score("humaneval", item, "```python\ndef twice(x):\n    return x + 1\n```")
    assert out["correct"] is False and out["reason"].startswith("AssertionError")


def test_extract_code_takes_the_first_block():
    assert extract_code("a\n```py\nx = 1\n```\n```\ny = 2\n```") == "x = 1\n"


def test_formats_build_the_documented_prompts(tmp_path):
    g = read_items("gsm8k", write_jsonl(tmp_path / "g.jsonl", GSM8K))
    assert [i.id for i in g] == ["line-1", "line-2"] and [i.reference for i in g] == ["126", "950"]
    assert g[0].prompt == GSM8K[0]["question"] + "\n\n" + formats.GSM8K_INSTRUCTION
    h = read_items("humaneval", write_jsonl(tmp_path / "h.jsonl", HUMANEVAL))[0]
    assert h.id == "Dev/0" and h.entry_point == "twice" and HUMANEVAL[0]["prompt"].rstrip() in h.prompt
    assert h.prompt.startswith(formats.HUMANEVAL_INSTRUCTION)
    j = read_items("jsonl", write_jsonl(tmp_path / "j.jsonl", [{"prompt": "Capital of Peru?", "answer": "Lima"},
                                                               {"id": 7, "prompt": "2+2?", "answer": 4}]))
    assert [(i.id, i.prompt, i.reference) for i in j] == [("line-1", "Capital of Peru?", "Lima"), ("7", "2+2?", "4")]
    assert len(read_items("gsm8k", tmp_path / "g.jsonl", limit=1)) == 1
    named = read_items("gsm8k", write_jsonl(tmp_path / "n.jsonl", [dict(GSM8K[1], id="wp-9")]))
    assert [i.id for i in named] == ["wp-9"]  # a subset of a file keeps its items' names
    rows = [dict(row, split=s) for row, s in zip(GSM8K, ["dev", "test"] * len(GSM8K))]
    path = write_jsonl(tmp_path / "s.jsonl", rows)
    assert [i.prompt for i in read_items("gsm8k", path, split="dev")] == \
        [i.prompt for i in read_items("gsm8k", path)][::2]
    with pytest.raises(ValueError, match="no items of split 'train'"):
        read_items("gsm8k", path, split="train")
    with pytest.raises(ValueError, match=r'g.jsonl, line 1: has no "split" field'):
        read_items("gsm8k", tmp_path / "g.jsonl", split="dev")


@pytest.mark.parametrize("task, rows, message", [
    ("gsm8k", [GSM8K[0], "{not json"], r"line 2: not valid JSON"),
    ("gsm8k", [{"question": "q?", "answer": "no marker"}], r"line 1: field 'answer' must end with '#### <number>'"),
    ("gsm8k", [{"answer": "#### 3"}], r"line 1: missing the field 'question'"),
    ("gsm8k", ["[1, 2]"], r"line 1: expected a JSON object, got list"),
    ("humaneval", [{**HUMANEVAL[0], "entry_point": "thrice"}], r"line 1: field 'prompt' does not define the entry "
                                                               r"point 'thrice'"),
    ("humaneval", [{**HUMANEVAL[0], "test": "assert True"}], r"line 1: field 'test' must define check\(candidate\)"),
    ("humaneval", [{**HUMANEVAL[0], "test": "def check(c):\n  assert (\n"}], r"field 'test' is not valid Python"),
    ("humaneval", [HUMANEVAL[0], HUMANEVAL[0]], r"line 2: item id 'Dev/0' already used on line 1"),
    ("jsonl", [{"prompt": "x", "answer": None}], r"line 1: field 'answer' must be a non-empty string or a number"),
    ("jsonl", [{"prompt": 3, "answer": "3"}], r"line 1: field 'prompt' must be a string, got int"),
    ("jsonl", [], r"no items"),
])
def test_bad_lines_name_the_file_line_and_problem(tmp_path, task, rows, message):
    path = write_jsonl(tmp_path / "data.jsonl", rows)
    with pytest.raises(ValueError, match=f"{tmp_path}/data.jsonl.*{message}" if rows else message):
        read_items(task, path)


def test_file_that_is_not_utf8(tmp_path):
    (tmp_path / "d.jsonl").write_bytes(b'{"prompt": "\xff", "answer": "1"}\n')
    with pytest.raises(ValueError, match="line 1: not UTF-8"):
        read_items("jsonl", tmp_path / "d.jsonl")


def test_score_numbers_and_text(tmp_path):
    g = read_items("gsm8k", write_jsonl(tmp_path / "g.jsonl", GSM8K))
    assert score("gsm8k", g[1], "1250 - 300 leaves 950.\nThe answer is 950.")["correct"] is True
    assert score("gsm8k", g[1], "The answer is 1,250.") == {"correct": False, "answer": "1250", "reason": "wrong number"}
    assert score("gsm8k", g[0], "I do not know")["reason"] == "no number in the completion"
    j = read_items("jsonl", write_jsonl(tmp_path / "j.jsonl", [{"prompt": "Capital of Peru?", "answer": "Lima"}]))[0]
    assert score("jsonl", j, "Let me think.\nThe answer is **lima**.")["correct"] is True
    assert score("jsonl", j, "Cusco")["correct"] is False


def test_wilson_against_hand_computed_values():
    # p = 0.8, n = 10, z = 1.96: centre (0.8 + 0.19207) / 1.38415 = 0.71676, half 0.22657.
    low, high = wilson(8, 10)
    assert low == pytest.approx(0.490, abs=5e-4) and high == pytest.approx(0.943, abs=5e-4)
    # p = 0: low is 0, high z² / (n + z²) = 3.8415 / 23.8415 = 0.16113.
    assert wilson(0, 20) == (0.0, pytest.approx(0.16113, abs=1e-5))
    assert wilson(20, 20) == (pytest.approx(1 - 0.16113, abs=1e-5), 1.0)
    assert wilson(0, 0) == (0.0, 1.0)


def test_mcnemar_exact_against_hand_computed_values():
    assert mcnemar_exact(1, 9) == pytest.approx(2 * (1 + 10) / 1024)   # 0.021484375
    assert mcnemar_exact(0, 5) == pytest.approx(2 / 32)                 # 0.0625
    assert mcnemar_exact(3, 3) == 1.0 and mcnemar_exact(0, 0) == 1.0
    assert mcnemar_exact(2, 5) == pytest.approx(2 * (1 + 7 + 21) / 128)  # 0.453125


def test_paired_difference_against_hand_computed_values():
    # 8 wins, 2 losses: Wilson(8, 10) = [0.4902, 0.9433]; on 10 items the difference is 0.6 in
    # [2 * 0.4902 - 1, 2 * 0.9433 - 1] = [-0.0196, 0.8866]; on 20 items half of that.
    diff, low, high = paired_difference(8, 2, 10)
    assert diff == pytest.approx(0.6) and low == pytest.approx(-0.0196, abs=5e-4)
    assert high == pytest.approx(0.8866, abs=5e-4)
    assert paired_difference(8, 2, 20) == pytest.approx((0.3, low / 2, high / 2))
    assert paired_difference(0, 0, 7) == (0.0, 0.0, 0.0)
    with pytest.raises(ValueError, match="paired_difference"):
        paired_difference(3, 3, 5)


def test_paired_counts_only_shared_items():
    a = {"1": True, "2": True, "3": False, "4": False, "5": True}
    b = {"1": False, "2": True, "3": True, "4": False}
    p = paired("dlmom", "single", a, b)
    assert (p.wins, p.losses, p.ties) == (1, 1, 2) and p.p == 1.0


def test_summary_and_table():
    methods = parse_methods("single,dlmom,dlmom:latent", experts=3)
    truth = {"single": [1, 0, 0, 1], "dlmom": [1, 1, 0, 1], "dlmom:latent": [0, 0, 0, 1]}
    records = [{"item": str(i), "method": m, "correct": bool(c), "tokens": 10 * (i + 1), "wall_s": 0.5,
                "error": "RuntimeError: x" if (m, i) == ("dlmom:latent", 0) else None}
               for m, cs in truth.items() for i, c in enumerate(cs)]
    s = summarize(records, methods, ["0", "1", "2", "3"])
    assert s["methods"]["dlmom"]["accuracy"] == 0.75 and s["methods"]["dlmom:latent"]["errors"] == 1
    assert s["methods"]["single"]["tokens_mean"] == 25.0
    pairs = {(p["a"], p["b"]): p for p in s["paired"]}
    assert set(pairs) == {("dlmom", "single"), ("dlmom:latent", "single")}
    assert (pairs["dlmom", "single"]["wins"], pairs["dlmom", "single"]["losses"]) == (1, 0)
    assert (pairs["dlmom:latent", "single"]["wins"], pairs["dlmom:latent", "single"]["losses"]) == (0, 1)
    table = format_table(s)
    assert "dlmom vs single" in table and "75.0%" in table and "[30.1%, 95.4%]" in table


@pytest.mark.parametrize("spec, message", [
    ("single,beam", "'beam' is not one of"),
    ("dlmom:greedy", "controller must be one of"),
    ("single:3", r"expert index must be an integer in \[0, 2\]"),
    ("text-mas:1", "only dlmom .* and single .* take a suffix"),
    ("dlmom,dlmom", "dlmom given twice"),
    ("", "expected a comma-separated list of dlmom, single"),
    ("single,,dlmom", "expected a comma-separated list"),
])
def test_bad_methods(spec, message):
    with pytest.raises(ValueError, match=message):
        parse_methods(spec, experts=3)


def test_methods_follow_baselines(monkeypatch):
    from dlmom import baselines

    monkeypatch.setattr(baselines, "METHODS", baselines.METHODS + ("vote",))
    assert parse_methods("vote,single:1,dlmom:latent", experts=2) == [
        Method("vote", "vote"), Method("single:1", "single", expert=1), Method("dlmom:latent", "dlmom", "latent")]
