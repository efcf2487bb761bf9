"""dlmom.soft_embed as a whole op (Python wrapper included) vs F.embedding_bag(per_sample_weights, mode="sum").

The ratio is measured in one run, interleaved: every round times each contender over a short burst of calls, in
turn, and the table reports medians over many rounds, so that a noisy machine slows all of them alike.
``--before REV`` also times dlmom/ops.py as it was at git revision REV (loaded beside the current one; the C++
binding of soft_embed on the CPU is unchanged), for before / after numbers from the same run.

python bench/bench_soft_embed_overhead.py [--batch 4] [--k 16] [--dim 896] [--vocab 49152 151936] [--before 7ace2f4]
    [--threads 1]
"""
from __future__ import annotations

import argparse
import importlib.util
import statistics
import subprocess
import sys
import time

import torch
import torch.nn.functional as F

import dlmom
from bench_common import print_table, write_results


def ops_at(rev: str):
    """dlmom/ops.py at git revision rev, as module dlmom._ops_<rev> (its relative imports resolve in dlmom)."""
    source = subprocess.run(["git", "show", f"{rev}:python/dlmom/ops.py"], capture_output=True, text=True,
                            check=True).stdout
    name = f"dlmom._ops_{rev}"
    spec = importlib.util.spec_from_loader(name, loader=None)
    module = importlib.util.module_from_spec(spec)
    module.__package__ = "dlmom"
    sys.modules[name] = module
    exec(compile(source, f"ops.py@{rev}", "exec"), module.__dict__)
    return module


def interleaved_us(fns: dict, *, rounds: int, burst: int) -> dict:
    """Per contender: the median over rounds of the mean time of one call in a burst, in microseconds."""
    times = {name: [] for name in fns}
    for fn in fns.values():  # warm up
        for _ in range(burst):
            fn()
    for _ in range(rounds):
        for name, fn in fns.items():
            t0 = time.perf_counter()
            for _ in range(burst):
                fn()
            times[name].append((time.perf_counter() - t0) / burst * 1e6)
    return {name: statistics.median(ts) for name, ts in times.items()}, times


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batch", type=int, nargs="+", default=[4])
    ap.add_argument("--k", type=int, nargs="+", default=[16])
    ap.add_argument("--dim", type=int, nargs="+", default=[896])
    ap.add_argument("--vocab", type=int, nargs="+", default=[49152, 151936])
    ap.add_argument("--rounds", type=int, default=400)
    ap.add_argument("--burst", type=int, default=20)
    ap.add_argument("--before", default=None, help="a git revision whose ops.py to time as well")
    ap.add_argument("--threads", type=int, default=1,
                    help="torch intra-op threads (0: torch's default). 1 by default: at these sizes the work is a few "
                         "microseconds, and embedding_bag's thread pool on a shared, loaded machine measured 100x "
                         "slower than one thread, which would flatter dlmom")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    before = ops_at(args.before) if args.before else None
    rows = []
    for V in args.vocab:
        for D in args.dim:
            weight = torch.randn(V, D)
            for B in args.batch:
                for k in args.k:
                    ids = torch.randint(0, V, (B, k))
                    probs = torch.softmax(torch.randn(B, k), -1)
                    fns = {"dlmom": lambda: dlmom.soft_embed(ids, probs, weight),
                           "bag": lambda: F.embedding_bag(ids, weight, per_sample_weights=probs, mode="sum")}
                    if before is not None:
                        fns["before"] = lambda: before.soft_embed(ids, probs, weight)
                    med, times = interleaved_us(fns, rounds=args.rounds, burst=args.burst)
                    # The ratio per round, then its median: both contenders saw the same moment of the machine.
                    ratio = statistics.median(b / d for b, d in zip(times["bag"], times["dlmom"]))
                    row = dict(B=B, k=k, D=D, V=V, dtype="fp32", device="cpu", kernel_us=med["dlmom"],
                               torch_us=med["bag"], speedup=ratio)
                    if before is not None:
                        row.update(before_us=med["before"], before_speedup=statistics.median(
                            b / d for b, d in zip(times["bag"], times["before"])))
                    rows.append(row)
    print_table(rows)
    print("wrote", write_results("soft_embed_overhead", "cpu", rows,
                                 extra={"rounds": args.rounds, "burst": args.burst, "before": args.before,
                                        "threads": torch.get_num_threads()}))


if __name__ == "__main__":
    main()
