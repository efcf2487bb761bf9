"""Final answers pulled out of generated text, for votes and for scoring.

``final_number(text)`` is the number an answer commits to, GSM8K style, looked for in this order:

1. the last ``\\boxed{...}`` that holds a number (nested braces and ``\\frac{a}{b}`` understood);
2. the first number after the last ``####``;
3. the first number after the last "answer is" / "answer:" (any case, "The final answer is" included);
4. else the last number anywhere in the text.

Numbers are written one way, so equal values compare equal as strings: thousands separators dropped
("1,234" -> "1234"), a leading "+" or currency sign dropped, trailing decimal zeros dropped
("12.50" -> "12.5", "3.0" -> "3"), ".5" -> "0.5", "-0" -> "0", a Unicode minus read as "-";
a fraction "a/b" stays "a/b". A minus sign counts only where it does not follow a letter or digit
("5-3" holds 5 and 3). None when the text holds no number.

``final_answer(text)`` is ``final_number(text)`` when there is one, else the last non-blank line
normalised (``normalise_line``); None for blank text.
"""
from __future__ import annotations

import re

# A number not glued to a word ("x2", "v1.2" hold none): optional sign and currency, digits with or
# without thousands separators, an optional decimal part, an optional "/denominator".
_NUMBER = re.compile(r"(?<![\w./])([-\u2212+]?)[$\u20ac\u00a3]?((?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?|\.\d+)"
                     r"(?:/(\d+))?(?!\w)")
_ANSWER_IS = re.compile(r"answer\s*(?:is|:)", re.IGNORECASE)
_FRAC = re.compile(r"\\d?frac\{([^{}]*)\}\{([^{}]*)\}")


def _normalise_number(sign: str, digits: str, denominator: str | None) -> str:
    digits = digits.replace(",", "")
    if digits.startswith("."):
        digits = "0" + digits
    whole, _, decimals = digits.partition(".")
    whole = whole.lstrip("0") or "0"
    decimals = decimals.rstrip("0")
    value = f"{whole}.{decimals}" if decimals else whole
    if denominator is not None:
        value = f"{value}/{denominator.lstrip('0') or '0'}"
    negative = sign in ("-", "\u2212") and value.strip("0./") != ""
    return f"-{value}" if negative else value


def numbers(text: str) -> list[str]:
    """Every number in ``text``, in order, normalised (see the module docstring)."""
    return [_normalise_number(*m.groups()) for m in _NUMBER.finditer(text)]


def _boxed_contents(text: str) -> list[str]:
    """The contents of every ``\\boxed{...}`` (``\\fbox`` too), in order, nested braces matched."""
    found = []
    for m in re.finditer(r"\\(?:boxed|fbox)\s*\{", text):
        depth, i = 1, m.end()
        while i < len(text) and depth:
            depth += {"{": 1, "}": -1}.get(text[i], 0)
            i += 1
        if depth == 0:
            found.append(text[m.end():i - 1])
    return found


def final_number(text: str) -> str | None:
    """The number ``text`` gives as its final answer, normalised; None when it holds none (see the module
    docstring for the order of the rules)."""
    if not isinstance(text, str):
        raise ValueError(f"final_number: text must be a string, got {type(text).__name__}")
    for content in reversed(_boxed_contents(text)):
        found = numbers(_FRAC.sub(r"\1/\2", content))
        if found:
            return found[-1]
    for marker in (text.rfind("####"), *[m.end() for m in list(_ANSWER_IS.finditer(text))[-1:]]):
        if marker >= 0:
            found = numbers(text[marker:].lstrip("#"))
            if found:
                return found[0]
    found = numbers(text)
    return found[-1] if found else None


def normalise_line(line: str) -> str:
    """A line as a vote compares it: markdown emphasis and surrounding punctuation stripped, whitespace
    collapsed, lower case."""
    line = re.sub(r"[*_`]+", "", line)
    line = " ".join(line.split()).lower()
    return line.strip(" .,;:!?\"'()[]")


def final_answer(text: str) -> str | None:
    """``final_number(text)``, else the last non-blank line normalised; None when there is neither."""
    number = final_number(text)
    if number is not None:
        return number
    lines = [normalise_line(line) for line in text.splitlines()]
    lines = [line for line in lines if line]
    return lines[-1] if lines else None
