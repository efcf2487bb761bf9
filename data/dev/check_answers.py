"""Checks data/dev/answers.jsonl: every answer against a Python expression written from its prompt.

Each id is either in EXPRESSIONS (an expression computed from the prompt alone, not copied from the
answer) or in HAND_CHECKED (the few syllogisms, with the reasoning that settles them). The checker
asserts that
- every line is {"id", "split", "kind", "prompt", "answer"}; kind "number" has a JSON number as answer,
  kind "exact" a short string;
- every answer equals its expression's value (numbers to a relative 1e-9);
- every id is in exactly one of EXPRESSIONS and HAND_CHECKED, and both name only ids of the file.

Run: python3 data/dev/check_answers.py [path]  (exit status 1 and one line per problem on failure)
"""
import itertools
import json
import math
import sys
from pathlib import Path

DEFAULT_PATH = Path(__file__).with_name("answers.jsonl")
FIELDS = {"id", "split", "kind", "prompt", "answer"}
MAX_EXACT_CHARS = 40
DAYS = ("Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday", "Sunday")


def _always(orders, holds):
    """'yes' when holds(order) for every order in orders (oldest / tallest first), else 'no'."""
    return "yes" if all(holds(o) for o in orders) else "no"


def _orders(names, *chains):
    """The orderings of names (first = most) that keep each chain (a, b, ...) in that order."""
    return [o for o in itertools.permutations(names)
            if all(o.index(a) < o.index(b) for chain in chains for a, b in zip(chain, chain[1:]))]


EXPRESSIONS = {
    "ans-001": "3.5 * 1000",
    "ans-002": "4 * 60",
    "ans-003": "2.25 * 1000",
    "ans-004": "7 * 60",
    "ans-005": "1.8 * 100",
    "ans-006": "3 * 24",
    "ans-007": "0.75 * 1000",
    "ans-008": "5 * 12",
    "ans-009": "6 * 7",
    "ans-010": "2400 / 1000",
    "ans-011": "'excellence'.count('e')",
    "ans-012": "len('window')",
    "ans-013": "'possession'.count('s')",
    "ans-014": "sum(c in 'aeiou' for c in 'education')",
    "ans-015": "len('my red kite flew over the hill'.split())",
    "ans-016": "'banana bread'.count('a')",
    "ans-017": "'lantern'[::-1]",
    "ans-018": "'garden'[2]",
    "ans-019": "min('pear', 'peach')",
    "ans-020": "'umbrella'[-1]",
    "ans-021": "''.join(sorted('dacb'))",
    "ans-022": "'mountain'[:3]",
    "ans-023": "max(0.7, 0.65)",
    "ans-024": "'1.2 kilograms' if 1.2 * 1000 > 950 else '950 grams'",
    "ans-025": "'90 minutes' if 90 > 60 + 20 else '1 hour and 20 minutes'",
    "ans-026": "min([14, 9.5, 23, 11, 9])",
    "ans-027": "max([-3, -8, -1, -5])",
    "ans-028": "sum(x % 2 == 0 for x in [3, 8, 12, 15, 20, 7])",
    "ans-029": "15 + (15 - 11)",
    "ans-030": "54 * (54 // 18)",
    "ans-031": "6 ** 2",
    "ans-033": "_orders(('Anna', 'Ben', 'Cara'), ('Anna', 'Ben', 'Cara'))[0][-1]",
    "ans-034": "DAYS[(DAYS.index('Wednesday') + 3) % 7]",
    "ans-035": "5 - 2",
    "ans-037": "_always(_orders(('Tom', 'Mia', 'Raj'), ('Tom', 'Mia', 'Raj')), lambda o: o.index('Raj') < o.index('Tom'))",
    "ans-038": "(10 + 5 - 1) % 12 + 1",
}

HAND_CHECKED = {
    "ans-032": "yes: Tiko is a glorp and every glorp is blue.",
    "ans-036": "no: only some zents are red; a zent that is not red need not be round.",
}


def load(path=DEFAULT_PATH):
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def expected(item_id):
    names = {"DAYS": DAYS, "_orders": _orders, "_always": _always}
    return eval(EXPRESSIONS[item_id], names)  # noqa: S307 - our own literal expressions


def format_error(item):
    if set(item) != FIELDS:
        return f"fields {sorted(item)}, expected {sorted(FIELDS)}"
    answer = item["answer"]
    if item["kind"] == "number":
        if isinstance(answer, bool) or not isinstance(answer, (int, float)) or not math.isfinite(answer):
            return f"kind 'number' needs a JSON number as answer, got {answer!r}"
    elif item["kind"] == "exact":
        if not isinstance(answer, str) or not answer.strip() or answer != answer.strip() or len(answer) > MAX_EXACT_CHARS:
            return f"kind 'exact' needs a trimmed string of 1 to {MAX_EXACT_CHARS} characters, got {answer!r}"
    else:
        return f"kind must be 'number' or 'exact', got {item['kind']!r}"
    return None


def check(items):
    """Every problem found in items (a list of dicts), one line each; empty when all is right."""
    errors = [f"{i}: in both EXPRESSIONS and HAND_CHECKED" for i in sorted(set(EXPRESSIONS) & set(HAND_CHECKED))]
    ids = {item.get("id") for item in items}
    errors += [f"{i}: checked here but not in the file" for i in sorted((set(EXPRESSIONS) | set(HAND_CHECKED)) - ids)]
    for item in items:
        item_id = item.get("id")
        problem = format_error(item)
        if problem:
            errors.append(f"{item_id}: {problem}")
        elif item_id in HAND_CHECKED:
            continue
        elif item_id not in EXPRESSIONS:
            errors.append(f"{item_id}: neither in EXPRESSIONS nor in HAND_CHECKED")
        else:
            value, answer = expected(item_id), item["answer"]
            same = (math.isclose(value, answer, rel_tol=1e-9) if item["kind"] == "number" and not isinstance(value, str)
                    else value == answer)
            if not same:
                errors.append(f"{item_id}: the file says {answer!r}, {EXPRESSIONS[item_id]} = {value!r}")
    return errors


def main(argv):
    path = argv[1] if len(argv) > 1 else DEFAULT_PATH
    items = load(path)
    errors = check(items)
    for line in errors:
        print(line)
    print(f"{path}: {len(items)} items ({len(HAND_CHECKED)} checked by hand), {len(errors)} problems found")
    return 1 if errors else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
