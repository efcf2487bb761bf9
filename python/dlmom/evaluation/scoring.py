"""Turning a completion into an answer and scoring it against the item's reference.

Numbers (gsm8k, and jsonl items whose answer is a number): the final number of the completion is
``dlmom.answers.final_number``'s (the vote's rules: the number inside the last ``\\boxed{...}``, the first
number after the last ``####``, the first after the last "answer is" / "answer:" (any case), else the last
number in the text; signs, thousands separators, decimals, currency signs, fractions), compared with the
reference as decimals: ``18``, ``18.0`` and ``18.00`` are equal.

Text (jsonl items whose answer is not a number): the final answer is what follows the last "answer is" /
"answer:" up to the end of that line, else the last non-empty line. Both it and the reference are
normalised (case folded, whitespace collapsed, surrounding quotes, ``*`` and ``.,;:!`` stripped) and must
be equal.

Code (humaneval): the code is the first fenced block of the completion (```python or ```; a fence left
open by the token budget runs to the end), else the whole completion. When it defines the entry point the
program is the function prompt (its imports and helpers) followed by that code, so a model that repeats
the signature, or writes the whole function, is fine; otherwise the code continues the prompt's body
(indented by 4 spaces when its first line is not indented). The program, the item's test and
``check(<entry_point>)`` run in dlmom.evaluation.sandbox; the item passes when they finish without error.
"""
from __future__ import annotations

import decimal
import re

from .. import answers
from .formats import Item
from .sandbox import Limits, run_program

_NUMBER = re.compile(r"(?<![\w.])([-−]?)\$?(\d{1,3}(?:,\d{3})+|\d+)(\.\d+)?(?![\d])")
_ANSWER_IS = re.compile(r"answer\s*(?:is|:)\s*:?", re.IGNORECASE)


def _decimal(sign: str, whole: str, fraction: str | None) -> decimal.Decimal:
    return decimal.Decimal(("-" if sign else "") + whole.replace(",", "") + (fraction or ""))


def parse_number(text: str) -> decimal.Decimal | None:
    """``text`` as a number when it is one number and nothing else (``"1,234"``, ``"-3.5"``, ``"$12"``, ``"40%"``)."""
    m = _NUMBER.fullmatch(text.strip().rstrip("%").rstrip(".")) if text else None
    if not m:
        return None
    return _decimal(*m.groups())


def final_number(text: str) -> decimal.Decimal | None:
    """The completion's final answer as a number: ``dlmom.answers.final_number`` (the rules the vote uses too),
    as a Decimal (a fraction a/b as its quotient); None when it holds none."""
    found = answers.final_number(text)
    if found is None:
        return None
    numerator, _, denominator = found.partition("/")
    if not denominator:
        return decimal.Decimal(numerator)
    return decimal.Decimal(numerator) / decimal.Decimal(denominator) if int(denominator) else None


def normalise(text: str) -> str:
    """Case folded, whitespace collapsed, surrounding quotes / ``*`` / ``.,;:!`` stripped."""
    text = " ".join(text.split()).casefold()
    return text.strip(" \"'`*.,;:!")


def final_text(text: str) -> str:
    """The completion's final answer as text: after the last "answer is" / "answer:" to the end of its line,
    else the last non-empty line."""
    hits = list(_ANSWER_IS.finditer(text))
    if hits:
        rest = text[hits[-1].end():].strip().splitlines()
        if rest:
            return rest[0]
    lines = [line for line in text.splitlines() if line.strip()]
    return lines[-1] if lines else ""


_FENCE = re.compile(r"```[ \t]*([\w+-]*)[ \t]*\n(.*?)(?:```|\Z)", re.DOTALL)


def extract_code(text: str) -> str:
    """The first fenced code block of ``text`` (an unclosed fence runs to the end), else ``text``."""
    m = _FENCE.search(text)
    return m.group(2) if m else text


def program(item: Item, completion: str) -> str:
    """The Python source that defines the item's function from ``completion`` (see the module docstring)."""
    code = extract_code(completion)
    if re.search(rf"^\s*def\s+{re.escape(item.entry_point)}\s*\(", code, re.MULTILINE):
        return f"{item.code_prompt.rstrip()}\n    pass\n\n\n{code}"
    lines = code.splitlines()
    first = next((line for line in lines if line.strip()), "")
    if first and not first[0].isspace():
        code = "\n".join(("    " + line) if line.strip() else line for line in lines)
    return f"{item.code_prompt.rstrip()}\n{code}\n"


def score(task: str, item: Item, completion: str, *, limits: Limits | None = None) -> dict:
    """{"correct": bool, "answer": what was extracted, "reason": why it is wrong (None when right)}."""
    if task == "humaneval":
        source = f"{program(item, completion)}\n\n{item.reference}\n\ncheck({item.entry_point})\n"
        outcome = run_program(source, limits=limits or Limits())
        return {"correct": outcome.passed, "answer": None, "reason": outcome.reason}
    reference = parse_number(item.reference)
    if reference is not None:
        got = final_number(completion)
        if got is None:
            return {"correct": False, "answer": None, "reason": "no number in the completion"}
        right = got == reference
        return {"correct": right, "answer": _plain(got), "reason": None if right else "wrong number"}
    got = final_text(completion)
    right = normalise(got) == normalise(item.reference)
    return {"correct": right, "answer": got, "reason": None if right else "wrong answer"}


def _plain(number: decimal.Decimal) -> str:
    """A number as plain text without exponent or trailing zeros after the point (``18.50`` -> ``18.5``)."""
    text = format(number, "f")
    return text.rstrip("0").rstrip(".") if "." in text else text
