"""Evaluation items read from JSONL files, each turned into the prompt a method answers.

Three formats, as published (one JSON object per line; blank lines are skipped):

- ``gsm8k``: ``question`` and ``answer``, the answer's last line ``#### <number>`` (the reference). The prompt
  is the question, a blank line, then ``GSM8K_INSTRUCTION`` (reason step by step, end with "The answer is N").
- ``humaneval``: ``task_id``, ``prompt`` (imports, signature and docstring), ``entry_point`` (the function's
  name) and ``test`` (defines ``check(candidate)``). The prompt asks for the completed function in one
  Python code block, then shows the function prompt in one (``HUMANEVAL_INSTRUCTION``).
- ``jsonl``: ``prompt`` (sent as it is) and ``answer`` (a JSON string or number). An answer that reads as a
  number is compared as a number with the completion's final number, any other answer exactly after
  normalisation (see dlmom.evaluation.scoring).

Items are named by ``task_id`` (humaneval), by an optional ``id`` (gsm8k and jsonl: a string or an integer),
else ``line-<N>`` (N: the line number in the file), so a subset of a file keeps its items' names. A line that is not valid is a ValueError naming the file, the line and what is wrong.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import re

TASKS = ("gsm8k", "humaneval", "jsonl")
GSM8K_INSTRUCTION = ("Solve the problem step by step. End your reply with a last line of the form "
                     "\"The answer is N\", where N is the final number.")
HUMANEVAL_INSTRUCTION = ("Complete the following Python function. Reply with the whole function, its signature and "
                         "body, in one ```python code block.")


@dataclasses.dataclass(frozen=True)
class Item:
    """One problem: ``id``, the ``prompt`` a method answers, the ``reference`` answer (gsm8k: the number as
    written after ####; jsonl: the answer as text; humaneval: the test code) and, for humaneval,
    ``code_prompt`` (the function prompt) and ``entry_point``."""

    id: str
    prompt: str
    reference: str
    code_prompt: str = ""
    entry_point: str = ""

    def fingerprint(self) -> str:
        """A short hash of what the item asks and expects: a resumed run checks it is the same problem."""
        text = json.dumps([self.prompt, self.reference, self.code_prompt, self.entry_point])
        return hashlib.sha256(text.encode()).hexdigest()[:16]


def gsm8k_prompt(question: str) -> str:
    return f"{question.strip()}\n\n{GSM8K_INSTRUCTION}"


def humaneval_prompt(code_prompt: str) -> str:
    return f"{HUMANEVAL_INSTRUCTION}\n\n```python\n{code_prompt.rstrip()}\n```"


class _Line:
    """One line's JSON object and where it came from, for errors that say where."""

    def __init__(self, path: str, number: int, obj: dict):
        self.path, self.number, self.obj = path, number, obj

    def fail(self, what: str) -> ValueError:
        return ValueError(f"{self.path}, line {self.number}: {what}")

    def text(self, key: str, *, allow_empty: bool = False) -> str:
        if key not in self.obj:
            raise self.fail(f"missing the field {key!r} (fields: {', '.join(sorted(self.obj)) or 'none'})")
        value = self.obj[key]
        if not isinstance(value, str):
            raise self.fail(f"field {key!r} must be a string, got {type(value).__name__}")
        if not allow_empty and not value.strip():
            raise self.fail(f"field {key!r} is empty")
        return value


_GSM8K_REFERENCE = re.compile(r"####\s*(\S+)\s*$")


def _gsm8k(line: _Line) -> Item:
    from .scoring import parse_number

    question, answer = line.text("question"), line.text("answer")
    found = _GSM8K_REFERENCE.search(answer)
    if not found or parse_number(found.group(1)) is None:
        raise line.fail(f"field 'answer' must end with '#### <number>', got ...{answer[-40:]!r}")
    return Item(_item_id(line), gsm8k_prompt(question), found.group(1))


def _humaneval(line: _Line) -> Item:
    task_id, code_prompt, entry_point, test = (line.text(k) for k in ("task_id", "prompt", "entry_point", "test"))
    if not entry_point.isidentifier():
        raise line.fail(f"field 'entry_point' must be a Python identifier, got {entry_point!r}")
    if not re.search(rf"^\s*def\s+{re.escape(entry_point)}\s*\(", code_prompt, re.MULTILINE):
        raise line.fail(f"field 'prompt' does not define the entry point {entry_point!r}")
    if not re.search(r"^\s*def\s+check\s*\(", test, re.MULTILINE):
        raise line.fail("field 'test' must define check(candidate)")
    for source, key in ((code_prompt, "prompt"), (test, "test")):
        try:
            compile(source + ("\n    pass\n" if key == "prompt" else ""), f"{task_id}:{key}", "exec")
        except SyntaxError as err:
            raise line.fail(f"field {key!r} is not valid Python ({err.msg}, its line {err.lineno})") from None
    return Item(task_id, humaneval_prompt(code_prompt), test, code_prompt=code_prompt, entry_point=entry_point)


def _jsonl(line: _Line) -> Item:
    prompt = line.text("prompt")
    if "answer" not in line.obj:
        raise line.fail(f"missing the field 'answer' (fields: {', '.join(sorted(line.obj))})")
    answer = line.obj["answer"]
    if isinstance(answer, bool) or not isinstance(answer, (str, int, float)) or (isinstance(answer, str)
                                                                                 and not answer.strip()):
        raise line.fail(f"field 'answer' must be a non-empty string or a number, got {answer!r}")
    return Item(_item_id(line), prompt, str(answer))


def _item_id(line: _Line) -> str:
    """The line's optional ``id`` (a non-empty string or an integer), else ``line-<N>``."""
    item_id = line.obj.get("id", f"line-{line.number}")
    if isinstance(item_id, bool) or not isinstance(item_id, (str, int)) or not str(item_id):
        raise line.fail(f"field 'id' must be a non-empty string or an integer, got {item_id!r}")
    return str(item_id)


_READERS = {"gsm8k": _gsm8k, "humaneval": _humaneval, "jsonl": _jsonl}


def read_items(task: str, path: str | os.PathLike, *, limit: int | None = None, split: str | None = None
               ) -> list[Item]:
    """The items of ``path`` in the format of ``task`` (one of TASKS), in file order; with ``split`` only the
    lines whose ``"split"`` field is that name (data/dev's files hold "dev" and "test" items); the first
    ``limit`` when given. ValueError naming the file and line for a line that is not a valid item, that has
    no ``"split"`` field when one is asked for, or for an id seen twice."""
    if task not in TASKS:
        raise ValueError(f"task must be one of {TASKS}, got {task!r}")
    if limit is not None and (isinstance(limit, bool) or not isinstance(limit, int) or limit < 1):
        raise ValueError(f"limit must be an integer >= 1 or None, got {limit!r}")
    path = os.fspath(path)
    items: list[Item] = []
    seen: dict[str, int] = {}
    with open(path, "rb") as f:
        for number, raw in enumerate(f, 1):
            if limit is not None and len(items) == limit:
                break
            if not raw.strip():
                continue
            line = _Line(path, number, {})
            try:
                obj = json.loads(raw.decode("utf-8"))
            except UnicodeDecodeError as err:
                raise line.fail(f"not UTF-8 text (byte {err.start})") from None
            except json.JSONDecodeError as err:
                raise line.fail(f"not valid JSON ({err.msg} at column {err.colno})") from None
            if not isinstance(obj, dict):
                raise line.fail(f"expected a JSON object, got {type(obj).__name__}")
            line.obj = obj
            if split is not None:
                if "split" not in obj:
                    raise line.fail(f'has no "split" field (asked for split {split!r})')
                if obj["split"] != split:
                    continue
            item = _READERS[task](line)
            if item.id in seen:
                raise line.fail(f"item id {item.id!r} already used on line {seen[item.id]}")
            seen[item.id] = number
            items.append(item)
    if not items:
        raise ValueError(f"{path}: no items" + (f" of split {split!r}" if split is not None else " (an empty file?)"))
    return items
