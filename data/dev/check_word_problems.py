"""Checks data/dev/word_problems.jsonl: every answer against a Python expression written from its question.

For each id, EXPRESSIONS holds an expression computed from the question text alone (not copied from the
worked solution). The checker asserts that
- every line is {"id", "split", "steps", "question", "answer"} with the GSM8K answer format
  ("<worked solution>\\n#### <integer>", no units, no thousands separators);
- the final number equals the expression's value (which must be a whole number);
- the worked solution holds at least one plain equation ("3 * 4 = 12") and every one of them is true;
- the ids in the file and in EXPRESSIONS are the same.

Run: python3 data/dev/check_word_problems.py [path]  (exit status 1 and one line per problem on failure)
"""
import json
import math
import re
import sys
from pathlib import Path

DEFAULT_PATH = Path(__file__).with_name("word_problems.jsonl")
FIELDS = {"id", "split", "steps", "question", "answer"}
FINAL = re.compile(r"\n#### (-?\d+)\Z")
# An equation in a worked solution: arithmetic on plain numbers on one line, "=", a number (a word, a
# line break or a full stop breaks a match).
NUMBER = r"\d+(?:\.\d+)?"
EQUATION = re.compile(rf"((?:\(|{NUMBER})(?:{NUMBER}|[ +\-*/()])*?) *= *(-?{NUMBER})")

EXPRESSIONS = {
    # one step
    "wp-001": "7 + 5",
    "wp-002": "48 - 19",
    "wp-003": "6 * 8",
    "wp-004": "72 / 9",
    "wp-005": "45 - 25",
    "wp-006": "5 * 3",
    "wp-007": "11 + 27",
    "wp-008": "14 * 3",
    "wp-009": "96 / 4",
    "wp-010": "58 / 2",
    "wp-011": "0.25 * 80",
    "wp-012": "125 - 60",
    "wp-013": "7 * 12",
    "wp-014": "15 * 9",
    "wp-015": "35 - 18",
    "wp-016": "240 / 3",
    "wp-017": "26 + 18",
    "wp-018": "96 / 24",
    "wp-019": "2 * 60",
    "wp-020": "3 * 13",
    "wp-021": "0.4 * 30",
    "wp-022": "14 + 9",
    # two steps
    "wp-023": "3 * 4 + 2",
    "wp-024": "5 * 12 - 38",
    "wp-025": "50 % 8",
    "wp-026": "9 + 2 * 9",
    "wp-027": "60 * 2 + 35",
    "wp-028": "40 * 0.9",
    "wp-029": "(19 * 60 + 45) - 18 * 60",
    "wp-030": "300 * 10 / 4",
    "wp-031": "48 - 48 * 3 / 4",
    "wp-032": "(54 - 12) / 6",
    "wp-033": "100 % 7",
    "wp-034": "4 * 28 + 25",
    "wp-035": "8 * 750 / 1000",
    "wp-036": "15 + 6 * 3",
    "wp-037": "45 - 12 - 8",
    "wp-038": "18 * 2 / 3",
    "wp-039": "(7 * 60 + 50 + 25) - 8 * 60",
    "wp-040": "3 * 6 - 5",
    "wp-041": "350 * 8 / 100",
    "wp-042": "5 * 36 / 20",
    "wp-043": "2000 * 1.15",
    "wp-044": "2 * (12 + 7)",
    # three to four steps
    "wp-045": "50 - (2 * 15 + 3 * 4)",
    "wp-046": "4 * (5 * 5 + 8)",
    "wp-047": "math.ceil(7 * 2 / 6) * 6 - 7 * 2",
    "wp-048": "7 + 2 * 7 + (2 * 7 + 4)",
    "wp-049": "210 / 70 * 60 + 15",
    "wp-050": "600 * 1.1 * 0.9",
    "wp-051": "32 - 32 / 4 - 32 * 3 / 8",
    "wp-052": "12 * 3 - (12 / 4) * 10",
    "wp-053": "(300 - 100) / (12 + 8)",
    "wp-054": "40 * 3 + 25 * 2 + 50",
    "wp-055": "6 * 9 * 7 * 2",
    "wp-056": "100 - 8 * 5 + 15 * 2",
    "wp-057": "5 * 4 * 12 + 60",
    "wp-058": "math.ceil((130 + 10) / 45)",
    "wp-059": "(6 + 4) * 12 * (1 - 1 / 4)",
    "wp-060": "480 * 2 / 3 + 45",
    "wp-061": "2 * 36 * 5 / 12",
    "wp-062": "240 / 12 * 3 / 4 * 5",
    "wp-063": "next(3 * b for b in range(1, 200) if 3 * b + 6 == 2 * (b + 6))",
    "wp-064": "(100 + 50) / (13 - 8)",
    "wp-065": "sum(3 + 2 * d for d in range(4))",
    "wp-066": "500 - 15 * 8 + 70",
    "wp-067": "4 * 3 + 2 * 9 - 5",
    "wp-068": "100 - (2 * 25 + 3 * 15)",
    "wp-069": "1200 * 0.65 * 0.6",
    "wp-070": "86 * 4 - (78 + 85 + 92)",
}


def load(path=DEFAULT_PATH):
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def expected(item_id):
    value = eval(EXPRESSIONS[item_id], {"math": math})  # noqa: S307 - our own literal expressions
    if abs(value - round(value)) > 1e-9:
        raise ValueError(f"{item_id}: the expression {EXPRESSIONS[item_id]!r} gives {value}, not a whole number")
    return round(value)


def equation_errors(item_id, solution):
    equations = EQUATION.findall(solution)
    errors = [] if equations else [f"{item_id}: the worked solution holds no equation such as '3 * 4 = 12'"]
    for left, right in equations:
        try:
            value = eval(left, {"__builtins__": {}})  # noqa: S307 - digits and operators only (EQUATION)
        except SyntaxError:
            errors.append(f"{item_id}: cannot read the equation {left.strip()!r} = {right}")
            continue
        if abs(value - float(right)) > 1e-9:
            errors.append(f"{item_id}: the solution says {left.strip()} = {right}, but it is {value}")
    return errors


def check(items):
    """Every problem found in items (a list of dicts), one line each; empty when all is right."""
    errors = []
    for item in items:
        item_id = item.get("id")
        if set(item) != FIELDS:
            errors.append(f"{item_id}: fields {sorted(item)}, expected {sorted(FIELDS)}")
            continue
        if item_id not in EXPRESSIONS:
            errors.append(f"{item_id}: no expression in EXPRESSIONS")
            continue
        match = FINAL.search(item["answer"])
        if not match or not item["answer"][: match.start()].strip():
            errors.append(f"{item_id}: answer must be '<worked solution>\\n#### <integer>', got {item['answer']!r}")
            continue
        if int(match.group(1)) != expected(item_id):
            errors.append(f"{item_id}: the file says {match.group(1)}, {EXPRESSIONS[item_id]} = {expected(item_id)}")
        errors += equation_errors(item_id, item["answer"][: match.start()])
    missing = set(EXPRESSIONS) - {item.get("id") for item in items}
    errors += [f"{item_id}: in EXPRESSIONS but not in the file" for item_id in sorted(missing)]
    return errors


def main(argv):
    path = argv[1] if len(argv) > 1 else DEFAULT_PATH
    items = load(path)
    errors = check(items)
    for line in errors:
        print(line)
    print(f"{path}: {len(items)} problems, {len(errors)} problems found")
    return 1 if errors else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
