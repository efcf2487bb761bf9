"""ties_merge: the fused kernel vs the plain-torch composite a user would write (dlmom.reference.ties_merge).

One row per (E, B, V, dtype): kernel_us, torch_us, speedup, and the bandwidth of the bytes that must move
(read the E logit rows once, write the fp32 merge: E*B*V*elem + B*V*4) against a plain copy in the same run.

    python bench/bench_ties_merge.py --device cpu
    python bench/bench_ties_merge.py --device cuda --B 1 4 32 128
"""
import argparse
import os

import torch

import dlmom
from bench_common import copy_gbps, print_table, time_us, write_results
from dlmom import reference

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def make_logits(E: int, B: int, V: int, dtype: torch.dtype, device: str) -> torch.Tensor:
    """LM-like logits: a per-row offset, unit-ish spread, and a few masked (-inf) tokens."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(E, B, V, generator=g) * 2 + torch.randn(E, B, 1, generator=g) * 4
    x[:, :, V - 64:] = float("-inf")  # e.g. padded vocabulary entries
    return x.to(dtype=dtype, device=device)


def bench_one(E: int, B: int, V: int, dtype: torch.dtype, device: str, args, copy: float) -> dict:
    x = make_logits(E, B, V, dtype, device)
    kw = dict(theta=args.theta, elect=args.elect)
    kernel_us = time_us(lambda: dlmom.ties_merge(x, **kw), device=device, min_time_s=args.min_time)
    # The composite is slow on a CPU: fewer warm-up calls keep the run short without changing the median.
    torch_us = time_us(lambda: reference.ties_merge(x, **kw), device=device, warmup=1,
                       min_time_s=args.min_time)
    nbytes = E * B * V * x.element_size() + B * V * 4
    gbps = nbytes / (kernel_us * 1e-6) / 1e9
    return {"E": E, "B": B, "V": V, "dtype": str(dtype).replace("torch.", ""), "device": device,
            "kernel_us": kernel_us, "torch_us": torch_us, "speedup": torch_us / kernel_us, "gbps": gbps,
            "pct_of_copy": 100 * gbps / copy}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    p.add_argument("--E", type=int, nargs="+", default=[2, 3, 4], help="numbers of experts")
    p.add_argument("--B", type=int, nargs="+", default=[1, 4, 32], help="batch sizes")
    p.add_argument("--V", type=int, nargs="+", default=[151936, 50257], help="vocabulary sizes")
    p.add_argument("--dtypes", nargs="+", choices=list(DTYPES), default=["float32", "bfloat16"])
    p.add_argument("--theta", type=float, default=0.5)
    p.add_argument("--elect", choices=["vote", "mass"], default="vote")
    p.add_argument("--min-time", type=float, default=0.2, help="seconds of timing per measurement")
    p.add_argument("--no-write", action="store_true", help="print only, do not write bench/results/")
    args = p.parse_args()
    if args.device == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda: no CUDA GPU visible")

    copy = copy_gbps(args.device)
    backend = dlmom.backend_info()["ops"]["ties_merge"][args.device]
    print(f"copy bandwidth on {args.device}: {copy:.1f} GB/s; ties_merge runs the {backend}")
    rows = [bench_one(E, B, V, DTYPES[dt], args.device, args, copy)
            for V in args.V for dt in args.dtypes for E in args.E for B in args.B]
    print_table(rows)
    if not args.no_write:
        # The OpenMP settings change CPU numbers a lot on a shared machine (spinning vs sleeping waits).
        env = {k: os.environ[k] for k in ("OMP_NUM_THREADS", "OMP_WAIT_POLICY") if k in os.environ}
        path = write_results("ties_merge", args.device, rows,
                             extra={"copy_gbps": copy, "theta": args.theta, "elect": args.elect, "env": env})
        print(f"wrote {path}")


if __name__ == "__main__":
    main()
