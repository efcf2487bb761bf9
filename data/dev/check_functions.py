"""Checks data/dev/functions.jsonl (HumanEval format): every canonical solution passes its test and its
docstring example, and a wrong body fails every test.

For each item, one fresh, isolated Python process (with a timeout) runs
- prompt + canonical_solution + test + check(entry_point), then the examples of the prompt's docstring
  (">>> call" and the repr of its value on the next line; at least one): all must pass;
- prompt + `    return None` + test + check(entry_point), in a namespace of its own: it must fail an
  assert (an AssertionError, not a syntax error).

Run: python3 data/dev/check_functions.py [path]  (exit status 1 and one line per problem on failure)
"""
import json
import os
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

DEFAULT_PATH = Path(__file__).with_name("functions.jsonl")
FIELDS = {"task_id", "split", "prompt", "entry_point", "canonical_solution", "test"}
WRONG_BODY = "    return None\n"
TIMEOUT_S = 20
# The child reads one item on stdin and prints [what the canonical run raised, what the wrong run raised]
# (None when it passed).
CHILD = r'''
import json, re, sys
item = json.loads(sys.stdin.read())
# A docstring example: ">>> call" and, on the next line, the repr of its value (as doctest reads it; doctest
# itself is not imported: its imports cost more than the rest of the check).
EXAMPLE = re.compile(r"^ *>>> (.+)\n *(\S.*)$", re.MULTILINE)

def run(body, with_examples):
    source = item["prompt"] + body + "\n\n" + item["test"] + "\n\ncheck(" + item["entry_point"] + ")\n"
    names = {"__name__": "__devset__"}
    try:
        exec(compile(source, item["task_id"], "exec"), names)
        if with_examples:
            examples = EXAMPLE.findall(item["prompt"])
            assert examples, "the docstring holds no example"
            for call, shown in examples:
                got = repr(eval(call, names))
                assert got == shown.strip(), f"the docstring example {call} shows {shown.strip()}, but gives {got}"
    except Exception as error:
        return f"{type(error).__name__}: {error}".strip().rstrip(":")
    return None

print(json.dumps([run(item["canonical_solution"], True), run(WRONG_BODY, False)]))
'''


def load(path=DEFAULT_PATH):
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def run_item(item):
    """(what the canonical run raised, what the wrong run raised), None for a pass; or an error line."""
    child = f"WRONG_BODY = {WRONG_BODY!r}\n{CHILD}"
    try:
        done = subprocess.run([sys.executable, "-I", "-S", "-c", child], input=json.dumps(item),
                              capture_output=True, text=True, timeout=TIMEOUT_S)
    except subprocess.TimeoutExpired:
        return f"timed out after {TIMEOUT_S} s"
    if done.returncode != 0:
        return f"the checking process failed: {(done.stderr.strip().splitlines() or [''])[-1]}"
    return tuple(json.loads(done.stdout))


def item_errors(item):
    task_id = item.get("task_id")
    if set(item) != FIELDS:
        return [f"{task_id}: fields {sorted(item)}, expected {sorted(FIELDS)}"]
    outcome = run_item(item)
    if isinstance(outcome, str):
        return [f"{task_id}: {outcome}"]
    canonical, wrong = outcome
    errors = [f"{task_id}: the canonical solution fails: {canonical}"] if canonical else []
    if not (wrong or "").startswith("AssertionError"):
        errors.append(f"{task_id}: a body that returns None must fail an assert of the test, got {wrong or 'a pass'}")
    return errors


def check(items):
    """Every problem found in items (a list of dicts), one line each; empty when all is right."""
    # The processes mostly wait on their start-up, so more of them than CPUs still saves time.
    with ThreadPoolExecutor(max_workers=2 * (os.cpu_count() or 1) + 4) as pool:
        return [line for errors in pool.map(item_errors, items) for line in errors]


def main(argv):
    path = argv[1] if len(argv) > 1 else DEFAULT_PATH
    items = load(path)
    errors = check(items)
    for line in errors:
        print(line)
    print(f"{path}: {len(items)} functions, {len(errors)} problems found")
    return 1 if errors else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
