"""topk_packet vs torch: topk + softmax over the k + top-p + entropy of the full softmax, and the reference.

python bench/bench_topk_packet.py [--device cpu|cuda] [--batch 1 4 32] [--vocab 151936 50257] [--k 16 50]
                                  [--dtypes fp32 bf16] [--temperature 0.7] [--top-p 0.95] [--threads N]
"""
from __future__ import annotations

import argparse
import math

import torch

import dlmom
from bench_common import copy_gbps, print_table, time_us, write_results

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def torch_composite(x: torch.Tensor, k: int, temperature: float, top_p: float):
    """What a user would write with plain torch ops (one pass each: topk, softmax, entr, sum)."""
    vals, ids = torch.topk(x, k)
    probs = torch.softmax(vals.float() / temperature, -1)
    if top_p < 1.0:
        before = torch.cumsum(probs, -1) - probs
        probs = torch.where(before < top_p, probs, torch.zeros_like(probs))
        probs = probs / probs.sum(-1, keepdim=True)
    entropy = torch.special.entr(torch.softmax(x, -1, dtype=torch.float32)).sum(-1) / math.log(x.shape[-1])
    return ids, probs, entropy


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    ap.add_argument("--batch", type=int, nargs="+", default=[1, 4, 32])
    ap.add_argument("--vocab", type=int, nargs="+", default=[151936, 50257])
    ap.add_argument("--k", type=int, nargs="+", default=[16, 50])
    ap.add_argument("--dtypes", nargs="+", default=["fp32", "bf16"], choices=list(DTYPES))
    ap.add_argument("--temperature", type=float, default=0.7)
    ap.add_argument("--top-p", type=float, default=0.95)
    ap.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (the kernels follow it)")
    ap.add_argument("--min-time", type=float, default=0.2, help="seconds of timing per measurement")
    args = ap.parse_args()
    dev = args.device
    if args.threads:
        torch.set_num_threads(args.threads)
    T, p = args.temperature, args.top_p
    bound = copy_gbps(dev)
    print(f"copy bandwidth on {dev}: {bound:.1f} GB/s; temperature {T}, top_p {p}, "
          f"{torch.get_num_threads()} CPU threads")
    rows = []
    for name in args.dtypes:
        dtype = DTYPES[name]
        for V in args.vocab:
            for B in args.batch:
                x = (3 * torch.randn(B, V, device=dev)).to(dtype)
                for k in args.k:
                    def timed(fn):
                        return time_us(fn, device=dev, min_time_s=args.min_time)

                    kernel = timed(lambda: dlmom.topk_packet(x, k, temperature=T, top_p=p))
                    composite = timed(lambda: torch_composite(x, k, T, p))
                    ref = timed(lambda: dlmom.reference.topk_packet(x, k, temperature=T, top_p=p))
                    nbytes = B * V * x.element_size()  # the logits, read once; the packet is tiny
                    gbps = nbytes / (kernel * 1e-6) / 1e9
                    rows.append(dict(B=B, V=V, k=k, dtype=name, device=dev, kernel_us=kernel,
                                     torch_us=composite, reference_us=ref, speedup=composite / kernel,
                                     gbps=gbps, pct_of_copy=100 * gbps / bound))
    print()
    print_table(rows)
    print("wrote", write_results("topk_packet", dev, rows,
                                 extra={"copy_gbps": bound, "temperature": T, "top_p": p,
                                        "threads": torch.get_num_threads()}))


if __name__ == "__main__":
    main()
