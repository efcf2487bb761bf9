"""Summarise `dlmom eval` runs for docs/findings.md: per run (a mixture of experts on one dev set) every
method's accuracy with its Wilson 95% interval, cost per item, the traces' shares (latent steps, merged
steps, expert agreement), and each dlmom variant paired against the strongest single expert of that run.

    python bench/eval_findings.py NAME=RECORDS.jsonl[,MORE.jsonl ...][@BUDGET] ... [--json bench/results/eval-cpu.json]

NAME labels a run (e.g. qwen-0.5b+1.5b/word_problems); RECORDS is the --out file of `dlmom eval`. Several
files after one NAME pool their items (runs of one mixture on other items of one dev set), with the methods
that every file has; a later file's record of an item and method replaces an earlier one (answers cut off by
one budget, again with a larger one). A NAME given again adds that run's methods (a variant run later on the
same items: NAME=A,B,C NAME=D pools A, B and C, then adds D's methods). BUDGET: the run's --max-new-tokens, for the share
of answers cut off. The grid that made bench/results/eval-cpu.json is bench/eval_findings.sh. Prints one table
per run.
"""
from __future__ import annotations

import argparse
import json
import re
import statistics
import sys

from dlmom.evaluation.methods import parse_methods
from dlmom.evaluation.report import summarize
from dlmom.evaluation.stats import paired


def read_records(path: str) -> list[dict]:
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def pool(files: list[list[dict]]) -> list[dict]:
    """The records of several runs, restricted to the methods every run has. Runs on other items add them; a
    later run's record of an item and method already there replaces it (the item again with a larger budget)."""
    common = set.intersection(*({r["method"] for r in records} for records in files))
    return join([r for r in records if r["method"] in common] for records in files)


def join(runs) -> list[dict]:
    """The records of runs of other methods on the same items, in one list (a later run's record of an item and
    method already there replaces it). summarise_run keeps the items every method answered."""
    return list({(r["item"], r["method"]): r for records in runs for r in records}.values())


def _mean(values) -> float | None:
    values = [v for v in values if v is not None]
    return statistics.fmean(values) if values else None


def _trace_shares(rows: list[dict]) -> dict:
    """Over a method's records with a step trace: the share of steps latent, merged (consensus engaged) and
    where every expert's own argmax was the chosen token (of the steps that have the others' logits); mean
    switches."""
    steps = [t for r in rows for t in r.get("trace") or [] if "step" in t]
    if not steps:
        return {}
    seen = [t["agreement"] for t in steps if t.get("agreement") is not None]  # None: the others were deferred
    return {"latent_share": sum(t["mode"] == "latent" for t in steps) / len(steps),
            "merged_share": sum(t.get("merged", True) for t in steps) / len(steps),
            "agree_share": sum(a >= 1.0 for a in seen) / len(seen) if seen else None,
            "switches_mean": _mean(r.get("usage", {}).get("switches") for r in rows)}


def nominal_size(expert: str) -> float:
    """An expert's parameter count as its name states it (``...-1.5b-...``, ``SmolLM2-135M...``), in billions."""
    found = re.findall(r"(?<![0-9.])(\d+(?:\.\d+)?)([bm])(?![a-z])", expert.lower())
    if not found:
        raise ValueError(f"no model size (like 1.5b or 135M) in the expert name {expert!r}")
    number, unit = found[-1]
    return float(number) * (1.0 if unit == "b" else 1e-3)


def compute(record: dict) -> float:
    """One answer's token work in billions of parameters x tokens, summed over its experts: prompt tokens plus,
    for a single expert, its generated tokens (a batched generate keeps feeding rows that ended; the engine
    drops them, so only the tokens the answer needed are counted), else each expert's decode tokens. An upper
    bound of the cost on a memory-bound device, where a forward costs about one read of the weights however many
    rows or tokens it carries: roles of one model share each forward, and a gate's deferred tokens are fed in one
    catch-up forward."""
    usage = record.get("usage") or {}
    experts = usage.get("experts") or []
    single = record["method"].split("[")[0].split(":")[0] == "single"
    return sum(nominal_size(e["expert"]) * (e["prefill_tokens"] + (usage["generated_tokens"] if single
                                                                     else e["decode_tokens"])) for e in experts)


def summarise_run(records: list[dict], budget: int | None = None) -> dict:
    """One run's table: items answered by every method only (so every row is on the same items). ``budget``:
    the run's --max-new-tokens; an answer that generated that many tokens was cut off (``cut_share``)."""
    methods = list(dict.fromkeys(r["method"] for r in records))
    by = {m: {r["item"]: r for r in records if r["method"] == m} for m in methods}
    items = sorted(set.intersection(*(set(v) for v in by.values()))) if methods else []
    # accuracy, Wilson interval, tokens and wall per method: dlmom eval's own summary of these records
    table = summarize(records, parse_methods(methods, experts=len(records)), items)["methods"]
    for m in methods:
        rows = [by[m][i] for i in items]
        table[m].update(generated_mean=_mean(r.get("usage", {}).get("generated_tokens") for r in rows),
                        compute_mean=_mean(compute(r) for r in rows),
                        cut_share=None if budget is None else sum(
                            (r.get("usage") or {}).get("generated_tokens", 0) >= budget for r in rows) / len(rows),
                        **_trace_shares(rows))
    singles = [m for m in methods if m.split("[")[0].split(":")[0] == "single"]
    # The strongest single expert: most items right; on a tie the one listed first.
    best = max(singles, key=lambda m: (table[m]["correct"], -singles.index(m))) if singles else None
    pairs = []
    for m in methods:
        if best is None or not m.startswith("dlmom"):
            continue
        p = paired(m, best, {i: bool(by[m][i]["correct"]) for i in items},
                   {i: bool(by[best][i]["correct"]) for i in items})
        cost = table[m]["wall_s_mean"] / table[best]["wall_s_mean"] if table[best]["wall_s_mean"] else None
        work = table[m]["compute_mean"] / table[best]["compute_mean"] if table[best]["compute_mean"] else None
        pairs.append({**p.__dict__, "wall_ratio": cost, "compute_ratio": work})
    return {"items": len(items), "budget": budget, "methods": table, "strongest_single": best,
            "paired_vs_strongest": pairs}


def _pct(x) -> str:
    return "-" if x is None else f"{x:.0%}"


def markdown(name: str, run: dict) -> str:
    lines = [f"#### {name} ({run['items']} items)", "",
             "| method | right | accuracy [95% CI] | tokens/item | wall/item | cut at budget | latent | merged "
             "| all agree |",
             "|---|---|---|---|---|---|---|---|---|"]
    for m, t in run["methods"].items():
        acc = f"{_pct(t['accuracy'])} [{_pct(t['ci_low'])}, {_pct(t['ci_high'])}]"
        lines.append(f"| `{m}` | {t['correct']}/{t['items']} | {acc} | {t['tokens_mean']:.0f} | "
                     f"{t['wall_s_mean']:.1f} s | {_pct(t.get('cut_share'))} | {_pct(t.get('latent_share'))} | "
                     f"{_pct(t.get('merged_share'))} | {_pct(t.get('agree_share'))} |")
    if run["paired_vs_strongest"]:
        lines += ["", f"Paired against the strongest single expert, `{run['strongest_single']}`:", "",
                  "| method | wins | losses | ties | difference [95% CI] | McNemar p | wall ratio | token work ratio |",
                  "|---|---|---|---|---|---|---|---|"]
        for p in run["paired_vs_strongest"]:
            lines.append(f"| `{p['a']}` | {p['wins']} | {p['losses']} | {p['ties']} | {p['difference']:+.0%} "
                         f"[{p['low']:+.0%}, {p['high']:+.0%}] | {p['p']:.3g} | {p['wall_ratio']:.2f}x | "
                         f"{p['compute_ratio']:.2f}x |")
    return "\n".join(lines)


def candidates(result: dict) -> str:
    """One row per dlmom variant, one column per run: its wins / losses against that run's strongest single
    expert, the paired difference with its 95% interval, and the token work ratio (the table that chose the
    defaults)."""
    names = list(result)
    variants = list(dict.fromkeys(p["a"] for run in result.values() for p in run["paired_vs_strongest"]))
    lines = ["| variant | " + " | ".join(f"{n} (vs `{result[n]['strongest_single']}`)" for n in names) + " |",
             "|---|" + "---|" * len(names)]
    for v in variants:
        cells = []
        for n in names:
            p = next((p for p in result[n]["paired_vs_strongest"] if p["a"] == v), None)
            cells.append("-" if p is None else f"{p['wins']}W/{p['losses']}L, {p['difference']:+.0%} "
                         f"[{p['low']:+.0%}, {p['high']:+.0%}], {p['compute_ratio']:.1f}x")
        lines.append(f"| `{v}` | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("runs", nargs="+", metavar="NAME=RECORDS", help="a run's label and its dlmom eval --out "
                        "file, or several (comma-separated) whose items are pooled; a NAME given again adds that "
                        "run's methods (other methods on the same items); @BUDGET: its --max-new-tokens")
    parser.add_argument("--json", metavar="FILE", help="write every run's summary here")
    args = parser.parse_args(argv)
    result = {}
    runs: dict[str, tuple[list[list[dict]], int | None]] = {}  # name -> (each spec's pooled records, budget)
    for spec in args.runs:
        name, eq, path = spec.partition("=")
        path, at, budget = path.partition("@")
        if not eq or not name or not path or (at and not budget.isdigit()):
            parser.error(f"runs: expected NAME=RECORDS.jsonl[@BUDGET], got {spec!r}")
        try:
            records = pool([read_records(p) for p in path.split(",")])
        except (OSError, json.JSONDecodeError) as err:
            parser.error(f"runs: {path}: {err}")
        parts, first_budget = runs.setdefault(name, ([], int(budget) if budget else None))
        if budget and int(budget) != first_budget:
            parser.error(f"runs: {name} was given with @{first_budget} before, and @{budget} in {spec!r}")
        parts.append(records)
    for name, (parts, budget) in runs.items():
        result[name] = summarise_run(join(parts), budget)
        print(markdown(name, result[name]), end="\n\n")
    print("#### Every variant against each run's strongest single expert", "", candidates(result), sep="\n", end="\n\n")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=1)
        print(f"wrote {args.json}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
