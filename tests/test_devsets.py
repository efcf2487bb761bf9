"""data/dev: the project's own development sets parse, keep their format and split, and pass their checkers.

The checkers (data/dev/check_*.py) hold an independent computation of every answer; here they run on the
files, and once on a planted mistake each, to show they can fail.
"""
import copy
import importlib.util
import json
import re
from pathlib import Path

import pytest

DEV = Path(__file__).resolve().parent.parent / "data" / "dev"
# file -> (id field, id of the n-th item (0-based), least number of items)
SETS = {
    "word_problems.jsonl": ("id", lambda n: f"wp-{n + 1:03d}", 60),
    "functions.jsonl": ("task_id", lambda n: f"dev/{n}", 25),
    "answers.jsonl": ("id", lambda n: f"ans-{n + 1:03d}", 30),
}


def load_checker(name):
    spec = importlib.util.spec_from_file_location(name, DEV / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def read(name):
    lines = (DEV / name).read_text(encoding="utf-8").splitlines()
    assert all(line.strip() for line in lines), f"{name}: blank line"
    items = [json.loads(line) for line in lines]
    assert all(isinstance(item, dict) for item in items), f"{name}: a line that is not an object"
    return items


def split_of(n):
    """The documented split: every third item (the 3rd, 6th, ...) is held out for the final test."""
    return "test" if n % 3 == 2 else "dev"


@pytest.mark.parametrize("name", sorted(SETS))
def test_ids_and_split(name):
    id_field, id_of, least = SETS[name]
    items = read(name)
    assert len(items) >= least, f"{name}: {len(items)} items, expected at least {least}"
    ids = [item[id_field] for item in items]
    assert ids == [id_of(n) for n in range(len(items))], f"{name}: ids must be unique and in order"
    assert [item["split"] for item in items] == [split_of(n) for n in range(len(items))], f"{name}: split"


def test_word_problems_format_and_mix():
    items = read("word_problems.jsonl")
    for item in items:
        assert re.fullmatch(r"(?s).+\S\n#### -?\d+", item["answer"]), item["id"]
        assert item["steps"] in (1, 2, 3, 4), item["id"]
        assert item["question"].rstrip().endswith("?"), item["id"]
    # about a third each of one-step, two-step and three-to-four-step problems, in both splits
    for split in ("dev", "test"):
        steps = [min(item["steps"], 3) for item in items if item["split"] == split]
        for group in (1, 2, 3):
            assert 0.25 <= steps.count(group) / len(steps) <= 0.42, (split, group, steps.count(group), len(steps))


def test_functions_format():
    for item in read("functions.jsonl"):
        name, task = item["entry_point"], item["task_id"]
        assert item["prompt"].startswith(f"def {name}(") and ">>> " in item["prompt"], task
        assert item["prompt"].endswith('"""\n'), task
        assert all(line.startswith("    ") for line in item["canonical_solution"].splitlines() if line), task
        assert item["test"].startswith("def check(candidate):\n"), task
        asserts = item["test"].count("\n    assert ")
        assert 4 <= asserts <= 8, f"{task}: {asserts} asserts, expected 4 to 8"


def test_answers_kinds():
    kinds = [item["kind"] for item in read("answers.jsonl")]
    assert set(kinds) == {"number", "exact"}, set(kinds)


@pytest.mark.parametrize("name", ["check_word_problems", "check_answers", "check_functions"])
def test_checker_passes(name):
    checker = load_checker(name)
    assert checker.check(checker.load()) == []


def test_word_problem_checker_fails_on_a_wrong_answer():
    checker = load_checker("check_word_problems")
    items = checker.load()
    wrong = copy.deepcopy(items)
    wrong[0]["answer"] = re.sub(r"#### (\d+)$", lambda m: f"#### {int(m.group(1)) + 1}", wrong[0]["answer"])
    assert [line.split(":")[0] for line in checker.check(wrong)] == [items[0]["id"]]
    wrong = copy.deepcopy(items)
    wrong[1]["answer"] = wrong[1]["answer"].replace(" = ", " = 1", 1)
    assert [line.split(":")[0] for line in checker.check(wrong)] == [items[1]["id"]]


def test_answer_checker_fails_on_a_wrong_answer():
    checker = load_checker("check_answers")
    items = checker.load()
    number = next(item for item in items if item["kind"] == "number" and item["id"] in checker.EXPRESSIONS)
    exact = next(item for item in items if item["kind"] == "exact" and item["id"] in checker.EXPRESSIONS)
    wrong = copy.deepcopy(items)
    for item in wrong:
        if item["id"] == number["id"]:
            item["answer"] += 1
        if item["id"] == exact["id"]:
            item["answer"] += "x"
    assert sorted(line.split(":")[0] for line in checker.check(wrong)) == sorted([number["id"], exact["id"]])


def test_function_checker_fails_on_a_wrong_solution():
    checker = load_checker("check_functions")
    item = copy.deepcopy(checker.load()[0])
    item["canonical_solution"] = "    return 0\n"
    assert [line.split(":")[0] for line in checker.check([item])] == [item["task_id"]]
