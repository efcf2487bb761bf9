"""soft_embed vs torch: embedding_bag with per_sample_weights (the fastest torch way) and the reference.

python bench/bench_soft_embed.py [--device cpu|cuda] [--batch 1 4 32] [--k 1 16 50] [--dim 576 896 4096]
"""
from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F

import dlmom
from bench_common import copy_gbps, print_table, time_us, write_results

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--batch", type=int, nargs="+", default=[1, 4, 32])
    ap.add_argument("--k", type=int, nargs="+", default=[1, 16, 50])
    ap.add_argument("--dim", type=int, nargs="+", default=[576, 896, 4096])
    ap.add_argument("--vocab", type=int, default=49152)
    ap.add_argument("--dtypes", nargs="+", default=["fp32", "bf16"], choices=list(DTYPES))
    args = ap.parse_args()
    dev = args.device
    bound = copy_gbps(dev)
    print(f"copy bandwidth on {dev}: {bound:.1f} GB/s")
    rows = []
    for name in args.dtypes:
        dtype = DTYPES[name]
        for D in args.dim:
            weight = torch.randn(args.vocab, D, device=dev).to(dtype)
            for B in args.batch:
                for k in args.k:
                    ids = torch.randint(0, args.vocab, (B, k), device=dev)
                    probs = torch.softmax(torch.randn(B, k, device=dev), -1).to(dtype)
                    kernel = time_us(lambda: dlmom.soft_embed(ids, probs, weight), device=dev)
                    bag = time_us(lambda: F.embedding_bag(ids, weight, per_sample_weights=probs, mode="sum"),
                                  device=dev)
                    ref = time_us(lambda: dlmom.reference.soft_embed(ids, probs, weight), device=dev)
                    nbytes = B * k * D * weight.element_size() + B * D * weight.element_size() + B * k * 12
                    gbps = nbytes / (kernel * 1e-6) / 1e9
                    rows.append(dict(B=B, k=k, D=D, dtype=name, device=dev, kernel_us=kernel, torch_us=bag,
                                     reference_us=ref, speedup=bag / kernel, gbps=gbps,
                                     pct_of_copy=100 * gbps / bound))
    print_table(rows)
    print("wrote", write_results("soft_embed", dev, rows, extra={"copy_gbps": bound}))


if __name__ == "__main__":
    main()
