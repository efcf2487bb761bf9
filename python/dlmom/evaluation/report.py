"""The summary of an evaluation's records: per method accuracy (Wilson 95% interval), mean tokens and wall
per item; every dlmom variant paired against every other method on the items both answered."""
from __future__ import annotations

import dataclasses
import statistics

from .stats import Paired, paired, wilson


def summarize(records: list[dict], methods: list, item_ids: list[str]) -> dict:
    """{"methods": {name: {"items", "correct", "errors", "accuracy", "ci_low", "ci_high", "tokens_mean",
    "wall_s_mean"}}, "paired": [Paired as a dict]} over the records of ``item_ids`` x ``methods`` (an item that
    errored counts as wrong). Accuracy is None for a method with no record yet."""
    wanted = set(item_ids)
    right: dict[str, dict[str, bool]] = {m.name: {} for m in methods}
    by_method: dict[str, list[dict]] = {m.name: [] for m in methods}
    for r in records:
        if r["item"] in wanted and r["method"] in by_method:
            by_method[r["method"]].append(r)
            right[r["method"]][r["item"]] = bool(r["correct"])
    table = {}
    for name, rows in by_method.items():
        n, correct = len(rows), sum(bool(r["correct"]) for r in rows)
        low, high = wilson(correct, n)
        tokens = [r["tokens"] for r in rows if r.get("tokens") is not None]
        table[name] = {"items": n, "correct": correct, "errors": sum(r.get("error") is not None for r in rows),
                       "accuracy": correct / n if n else None, "ci_low": low, "ci_high": high,
                       "tokens_mean": statistics.fmean(tokens) if tokens else None,
                       "wall_s_mean": statistics.fmean(r["wall_s"] for r in rows) if rows else None}
    pairs = [dataclasses.asdict(paired(a.name, b.name, right[a.name], right[b.name]))
             for a in methods if a.is_dlmom for b in methods if not b.is_dlmom]
    return {"methods": table, "paired": pairs}


def _cell(value, fmt: str) -> str:
    return "-" if value is None else format(value, fmt)


def format_table(summary: dict) -> str:
    """The summary as plain-text tables (one per method, then the paired comparisons)."""
    width = max([len("method")] + [len(n) for n in summary["methods"]])
    lines = [f"{'method':<{width}}  items  correct  accuracy  95% CI            errors  tokens/item  wall/item"]
    for name, m in summary["methods"].items():
        ci = f"[{m['ci_low']:.1%}, {m['ci_high']:.1%}]" if m["items"] else "-"
        lines.append(f"{name:<{width}}  {m['items']:>5}  {m['correct']:>7}  {_cell(m['accuracy'], '.1%'):>8}  "
                     f"{ci:<16}  {m['errors']:>6}  {_cell(m['tokens_mean'], '.1f'):>11}  "
                     f"{_cell(m['wall_s_mean'], '.2f'):>7} s")
    if summary["paired"]:
        names = [f"{p['a']} vs {p['b']}" for p in summary["paired"]]
        width = max(len("paired, on the same items"), *map(len, names))
        lines += ["", f"{'paired, on the same items':<{width}}  wins  losses  ties  McNemar exact p  "
                      "difference [95% CI]"]
        for name, p in zip(names, summary["paired"]):
            lines.append(f"{name:<{width}}  {p['wins']:>4}  {p['losses']:>6}  {p['ties']:>4}  {p['p']:<15.3g}  "
                         f"{p['difference']:+.1%} [{p['low']:+.1%}, {p['high']:+.1%}]")
    return "\n".join(lines)


__all__ = ["summarize", "format_table", "Paired"]
