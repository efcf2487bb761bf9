"""Settings fields that validate themselves and become command-line flags.

Each layer declares its settings as a dataclass of ``setting(...)`` fields (controller.py, packets.py,
consensus.py, router.py, soft_thinking.py, kv/); ``DLMoMConfig`` is all of them in one flat class. A field
carries its default, its help text and its rule (choices, or a number range), so there is one validator
(``check_fields``) and one place per default, and ``dlmom run`` gets one flag per field (``add_flags``).
"""
from __future__ import annotations

import argparse
import dataclasses
import math


def setting(default, help: str, *, choices: tuple | None = None, integer: bool = False, number: bool = False,
            lo: float | None = None, hi: float = math.inf, lo_open: bool = False, optional: bool = False,
            flag: str | None = None):
    """A dataclass field with its rule: ``choices``, an integer >= ``lo``, or a number in [lo, hi] ((lo, hi] with
    ``lo_open``); ``optional``: None is allowed too. A bool default makes a True / False field. ``flag``: the
    command-line flag when it is not ``--`` + the name with dashes."""
    rule = dict(help=help, choices=choices, integer=integer, number=number, lo=lo, hi=hi, lo_open=lo_open,
                optional=optional, flag=flag)
    return dataclasses.field(default=default, metadata={"dlmom": rule})


def _rules(cls_or_obj):
    return [(f, f.metadata["dlmom"]) for f in dataclasses.fields(cls_or_obj) if "dlmom" in f.metadata]


def check_fields(obj) -> None:
    """ValueError naming the first field of ``obj`` that breaks its rule: '<Class>: <name> must be ..., got ...'."""
    owner = type(obj).__name__
    for f, rule in _rules(obj):
        value = getattr(obj, f.name)
        if value is None and rule["optional"]:
            continue
        expected = _broken(value, f.default, rule)
        if expected:
            raise ValueError(f"{owner}: {f.name} must be {expected}, got {value!r}")


def _broken(value, default, rule) -> str | None:
    """What ``value`` was expected to be, or None when it keeps the rule."""
    if rule["choices"] is not None:
        return None if value in rule["choices"] else f"one of {rule['choices']}"
    if isinstance(default, bool):
        return None if isinstance(value, bool) else "True or False"
    lo, hi = rule["lo"], rule["hi"]
    if rule["integer"]:
        ok = isinstance(value, int) and not isinstance(value, bool) and value >= lo
        return None if ok else f"an integer >= {lo}"
    if rule["number"]:
        ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value) and \
            value <= hi and (value > lo if rule["lo_open"] else value >= lo)
        return None if ok else f"a number in {'(' if rule['lo_open'] else '['}{lo}, {hi}]"
    return None


def flag_of(cls, name: str) -> str | None:
    """The command-line flag of field ``name`` of the settings dataclass ``cls`` (None: no such field)."""
    for f, rule in _rules(cls):
        if f.name == name:
            dashed = f.name.replace("_", "-")
            return rule["flag"] or (f"--no-{dashed}" if f.default is True else f"--{dashed}")
    return None


def add_flags(parser: argparse.ArgumentParser, cls) -> None:
    """One flag per field of the settings dataclass ``cls``, with its help and default. Values are not checked
    here: ``cls(**flags)`` checks them, with the same messages as the Python API."""
    for f, rule in _rules(cls):
        name, text = flag_of(cls, f.name), rule["help"]
        if isinstance(f.default, bool):
            if f.default:
                parser.add_argument(name, dest=f.name, action="store_false", help=f"{text} (default: on)")
            else:
                parser.add_argument(name, dest=f.name, action="store_true", help=f"{text} (default: off)")
            continue
        kind = int if rule["integer"] else float if rule["number"] else str
        choices = [c for c in rule["choices"] if c is not None] if rule["choices"] is not None else None
        metavar = None if choices else "N" if rule["integer"] else "X" if rule["number"] else "TEXT"
        shown = "none" if f.default is None else f.default
        parser.add_argument(name, dest=f.name, type=kind, choices=choices, default=f.default, metavar=metavar,
                            help=f"{text} (default: {shown})")


def field_names(cls) -> list[str]:
    return [f.name for f, _ in _rules(cls)]
