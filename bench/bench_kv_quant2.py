"""kv_quant2 / kv_dequant2 vs torch: a tuned plain-torch composite and dlmom.reference, on KV-cache shapes.

python bench/bench_kv_quant2.py [--device cpu|cuda] [--heads 8 32] [--tokens 512 2048 4096] [--dim 128]
                                [--axes -1 -2] [--group 32] [--dtypes fp32 fp16 bf16] [--no-reference]

One row per (op, shape, axis, dtype): kernel_us is the public op (dlmom.kv_quant2 / kv_dequant2, with its
Python checks: for quant a torch.isfinite pass over x), native_us the bare kernel call, torch_us the composite
below, reference_us dlmom.reference. Bytes that must move, for both ops: x (or the output) + codes + scale
+ zero.
"""
from __future__ import annotations

import argparse

import torch

import dlmom
from dlmom import ops, reference
from dlmom.op_types import QuantizedKV
from bench_common import copy_gbps, print_table, time_us, write_results

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def torch_quant(x: torch.Tensor, G: int, axis: int) -> QuantizedKV:
    """What a user would write in torch (L a multiple of lcm(G, 4)): one aminmax, broadcast scale / zero."""
    R, L, C = reference.canonical_3d(x.shape, axis)
    ng = L // G
    x4 = x.reshape(R, ng, G, C)
    lo, hi = torch.aminmax(x4, dim=2)
    scale, zero = reference.kv_scale_zero(lo.float(), hi.float(), x.dtype)
    s, z = scale.float().unsqueeze(2), zero.float().unsqueeze(2)
    q = torch.where(s > 0, ((x4.float() - z) / torch.where(s > 0, s, 1.0)).round_(), 0.0).clamp_(0, 3)
    q = q.to(torch.uint8).view(R, L // 4, 4, C)
    packed = q[:, :, 0] | (q[:, :, 1] << 2) | (q[:, :, 2] << 4) | (q[:, :, 3] << 6)
    lead = x.shape[:-1] if axis == -1 else x.shape[:-2]
    tail = (L // 4,) if axis == -1 else (L // 4, C)
    gtail = (ng,) if axis == -1 else (ng, C)
    return QuantizedKV(packed.view(*lead, *tail), scale.view(*lead, *gtail), zero.view(*lead, *gtail),
                       x.shape, axis, G)


def torch_dequant(q: QuantizedKV, shifts: torch.Tensor) -> torch.Tensor:
    R, L, C = reference.canonical_3d(q.shape, q.axis)
    G = q.group_size
    codes = ((q.codes.reshape(R, L // 4, 1, C) >> shifts) & 3).view(R, L // G, G, C)
    s = q.scale.reshape(R, L // G, 1, C).float()
    z = q.zero.reshape(R, L // G, 1, C).float()
    return (codes.float() * s + z).to(q.scale.dtype).view(q.shape)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    ap.add_argument("--heads", type=int, nargs="+", default=[8, 32])
    ap.add_argument("--tokens", type=int, nargs="+", default=[512, 2048, 4096])
    ap.add_argument("--dim", type=int, default=128)
    ap.add_argument("--axes", type=int, nargs="+", default=[-1, -2], choices=[-1, -2])
    ap.add_argument("--group", type=int, default=32)
    ap.add_argument("--dtypes", nargs="+", default=list(DTYPES), choices=list(DTYPES))
    ap.add_argument("--no-reference", action="store_true", help="skip the (slow) dlmom.reference timings")
    args = ap.parse_args()
    dev, G = args.device, args.group
    bound = copy_gbps(dev)
    print(f"copy bandwidth on {dev}: {bound:.1f} GB/s")
    mod = ops.native_module(dev)
    kw = {"stream": torch.cuda.current_stream().cuda_stream} if dev == "cuda" else {}
    shifts = torch.tensor([0, 2, 4, 6], dtype=torch.uint8, device=dev).view(1, 1, 4, 1)
    rows = []
    for name in args.dtypes:
        dtype = DTYPES[name]
        for H in args.heads:
            for N in args.tokens:
                x = torch.randn(1, H, N, args.dim, device=dev).to(dtype)
                for axis in args.axes:
                    q = dlmom.kv_quant2(x, group_size=G, axis=axis)
                    # the composite must compute what the kernel does, or its time means nothing
                    tq = torch_quant(x, G, axis)
                    assert all(torch.equal(a, b) for a, b in zip(tq[:3], q[:3])), "torch composite differs"
                    assert torch.equal(torch_dequant(q, shifts), dlmom.kv_dequant2(q)), "composite differs"
                    R, L, C = reference.canonical_3d(x.shape, axis)
                    x3 = x.reshape(R, L, C)
                    v = ops._view
                    c3, s3, z3 = (t.reshape(R, -1, C) for t in q[:3])
                    out = torch.empty_like(x3)
                    native = {
                        "quant": lambda: mod.kv_quant2(v(x3), G, v(c3), v(s3), v(z3), **kw),
                        "dequant": lambda: mod.kv_dequant2(v(c3), v(s3), v(z3), G, v(out), **kw),
                    }
                    calls = {
                        "quant": (lambda: dlmom.kv_quant2(x, group_size=G, axis=axis),
                                  lambda: torch_quant(x, G, axis),
                                  lambda: reference.kv_quant2(x, group_size=G, axis=axis)),
                        "dequant": (lambda: dlmom.kv_dequant2(q), lambda: torch_dequant(q, shifts),
                                    lambda: reference.kv_dequant2(q)),
                    }
                    nbytes = x.numel() * x.element_size() + q.nbytes()
                    for op, (kernel_fn, torch_fn, ref_fn) in calls.items():
                        kernel = time_us(kernel_fn, device=dev)
                        bare = time_us(native[op], device=dev)
                        composite = time_us(torch_fn, device=dev)
                        ref = float("nan") if args.no_reference else \
                            time_us(ref_fn, device=dev, warmup=1, min_time_s=0.05)
                        gbps = nbytes / (kernel * 1e-6) / 1e9
                        rows.append(dict(op=op, H=H, N=N, D=args.dim, axis=axis, G=G, dtype=name, device=dev,
                                         kernel_us=kernel, native_us=bare, torch_us=composite,
                                         reference_us=ref, speedup=composite / kernel,
                                         speedup_vs_reference=ref / kernel, gbps=gbps,
                                         pct_of_copy=100 * gbps / bound))
                        print(f"{op} H={H} N={N} axis={axis} {name}: {kernel:.0f} us", flush=True)
    print()
    print_table(rows)
    print("wrote", write_results("kv_quant2", dev, rows, extra={"copy_gbps": bound}))


if __name__ == "__main__":
    main()
