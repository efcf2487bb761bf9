"""The CUDA kernels at the sizes and in the settings a GPU run meets and the emulator (tests/test_cuda_emu.py)
cannot reach (issue #16), each against the CPU reference (dlmom.reference on the CPU):

- inputs over 2^31 elements (int32 index overflow): topk_packet, soft_embed (weight and out), ties_merge,
  kv_quant2 / kv_dequant2, each under ~10 GiB of GPU memory, checked on sampled rows (first, middle, last, the
  row that holds element 2^31, the rows at grid.y's 65535 boundary);
- grids with B > 65535 rows (grid.y is capped at 65535 and the kernels loop over the rest), checked whole;
- a non-default stream behind a slow producer: torch.cuda._sleep and then the inputs' copy on a side stream, the
  op on that stream; an op launched on another stream would read the inputs before they are written;
- concurrent calls from several host threads, each on its own stream (one on the default stream);
- fp16 / bf16 rows that start off a 16-byte boundary (x[:, 1:]), which the kernels must read without their
  16-byte loads (a misaligned vector load faults on a GPU).

The CUDA cases skip without a GPU. The size tests also run on the CPU at small shapes (ids ``cpu-small``): that
runs this file's own sampling and comparisons in CI, so the GPU run finds the kernels' faults, not the test's.
bench/gpu_check.sh runs this file without CUDA_LAUNCH_BLOCKING (which would serialise the streams).
"""
import concurrent.futures
import contextlib
import os

import pytest
import torch

import dlmom
from dlmom import reference

HAS_CUDA = torch.cuda.is_available()
NO_CUDA = "needs a CUDA GPU (torch.cuda.is_available() is False on this machine)"
GPU_SIZES = ["cpu-small", pytest.param("cuda", marks=pytest.mark.skipif(not HAS_CUDA, reason=NO_CUDA))]
TWO_31 = 2 ** 31
TOL = {torch.float32: dict(atol=1e-5, rtol=1e-5), torch.float16: dict(atol=2e-3, rtol=2e-3),
       torch.bfloat16: dict(atol=1.6e-2, rtol=1.6e-2)}


def device_of(param: str) -> str:
    return "cuda" if param == "cuda" else "cpu"


def need_gpu_memory(device: str, gib: float) -> None:
    """Skip (with the reason) where the GPU has less than `gib` GiB free."""
    if device == "cuda":
        torch.cuda.empty_cache()  # the previous big test's blocks, still cached by torch, count as used
        free, _ = torch.cuda.mem_get_info()
        if free < gib * 2 ** 30:
            pytest.skip(f"needs {gib} GiB of free GPU memory, {free / 2 ** 30:.1f} GiB free")


def sample_rows(B: int, row_len: int) -> list[int]:
    """Rows to check against the CPU: the ends, the middle, the row holding element 2^31 of a [B, row_len] tensor,
    and the rows around 65535 (where a grid.y-capped kernel starts its second pass)."""
    rows = {0, 1, B // 2, B - 2, B - 1, min(TWO_31 // row_len, B - 1), 65534, 65535, 65536}
    return sorted(r for r in rows if 0 <= r < B)


def assert_packet(got, want, rows=None) -> None:
    """got (a Packet on any device, rows `rows` of it when given) equals want (the CPU reference's)."""
    ids, probs, entropy = (t if rows is None else t[rows] for t in got)
    torch.testing.assert_close(ids.cpu(), want.ids, atol=0, rtol=0)
    torch.testing.assert_close(probs.cpu(), want.probs, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(entropy.cpu(), want.entropy, atol=1e-4, rtol=1e-4)


def grid_values(t: torch.Tensor, generator) -> torch.Tensor:
    """t filled in place with multiples of 1/8 in [-8, 8]: exact in every float dtype, and every row sum of up to
    2^20 of them is exact in fp32, so the kernels' and the reference's row means are the same number."""
    return t.random_(-64, 65, generator=generator).div_(8)


# ---- inputs over 2^31 elements ----

@pytest.mark.parametrize("where", GPU_SIZES)
def test_topk_packet_over_2_31_elements(where):
    device = device_of(where)
    need_gpu_memory(device, 6)
    B, V = (TWO_31 // 131072 + 1, 131072) if device == "cuda" else (5, 9000)  # 2^31 + 2^17 bf16 logits (4 GiB)
    g = torch.Generator(device=device).manual_seed(0)
    x = torch.randn(B, V, device=device, generator=g).bfloat16() if device == "cpu" else \
        torch.randn(B, V, device=device, generator=g, dtype=torch.bfloat16)
    got = dlmom.topk_packet(x, 50, temperature=0.7, top_p=0.9)
    rows = sample_rows(B, V)
    assert_packet(got, reference.topk_packet(x[rows].cpu(), 50, temperature=0.7, top_p=0.9), rows)


@pytest.mark.parametrize("where", GPU_SIZES)
def test_soft_embed_over_2_31_elements(where):
    # weight [V, D] and out [B, D] each past 2^31 elements (4 GiB of bf16); B = 524289 rows also runs the
    # grid.y loop (65535 rows a pass) eight times.
    device = device_of(where)
    need_gpu_memory(device, 10)
    D, k = (4096, 4) if device == "cuda" else (64, 4)
    V = B = TWO_31 // D + 1 if device == "cuda" else 300
    g = torch.Generator(device=device).manual_seed(1)
    weight = torch.empty(V, D, device=device, dtype=torch.bfloat16).normal_(generator=g)
    ids = torch.randint(0, V, (B, k), device=device, generator=g)
    ids[:, 0] = V - 1 - torch.arange(B, device=device) % 7  # rows at the far end of weight
    probs = torch.rand(B, k, device=device, generator=g)
    got = dlmom.soft_embed(ids, probs, weight)
    rows = sample_rows(B, D)
    ids_r = ids[rows].cpu()
    used, at = torch.unique(ids_r, return_inverse=True)  # only the weight rows these ids read go to the CPU
    want = reference.soft_embed(at.view_as(ids_r), probs[rows].cpu(), weight[used.to(device)].cpu())
    torch.testing.assert_close(got[rows].cpu(), want, **TOL[torch.bfloat16])


@pytest.mark.parametrize("where", GPU_SIZES)
def test_ties_merge_over_2_31_elements(where):
    device = device_of(where)
    need_gpu_memory(device, 10)
    E, B, V = (2, TWO_31 // (2 * 131072) + 1, 131072) if device == "cuda" else (2, 5, 3000)
    g = torch.Generator(device=device).manual_seed(2)
    x = grid_values(torch.empty(E, B, V, device=device, dtype=torch.bfloat16), g)  # 2^31 + 2^18 (4 GiB)
    got = dlmom.ties_merge(x, theta=0.5)  # out: [B, V] float32, 4 GiB
    rows = sample_rows(B, V)
    want = reference.ties_merge(x[:, rows].cpu(), theta=0.5)
    torch.testing.assert_close(got[rows].cpu(), want, **TOL[torch.float32])


@pytest.mark.parametrize("where", GPU_SIZES)
def test_kv_quant2_over_2_31_elements(where):
    # Groups over tokens (axis=-2, KIVI's keys): x [2, 65537, 16384] fp16 is 2^31 + 2^15 elements; the dequant
    # kernel's 537M threads (one per byte of codes and column) also run its grid-stride loop (2^20 blocks).
    device = device_of(where)
    need_gpu_memory(device, 10)
    shape = (2, 65537, 16384) if device == "cuda" else (2, 67, 24)
    g = torch.Generator(device=device).manual_seed(3)
    x = torch.empty(shape, device=device, dtype=torch.float16).normal_(generator=g)
    q = dlmom.kv_quant2(x, group_size=32, axis=-2)
    back = dlmom.kv_dequant2(q)
    cols = sorted({0, 1, shape[-1] // 2, shape[-1] - 2, shape[-1] - 1})
    want = reference.kv_quant2(x[..., cols].cpu(), group_size=32, axis=-2)
    for name in ("codes", "scale", "zero"):
        torch.testing.assert_close(getattr(q, name)[..., cols].cpu(), getattr(want, name), atol=0, rtol=0)
    torch.testing.assert_close(back[..., cols].cpu(), reference.kv_dequant2(want), atol=0, rtol=0)


# ---- the four ops on small inputs, for the grid, stream and thread tests ----

def op_inputs(op: str, B: int, seed: int) -> tuple:
    """CPU inputs of `op` with B short rows (E = 3 experts for ties_merge, B heads for kv_quant2): the reference
    stays quick at B = 70000."""
    g = torch.Generator().manual_seed(seed)
    if op == "soft_embed":
        return (torch.randint(0, 1000, (B, 8), generator=g), torch.rand(B, 8, generator=g),
                torch.randn(1000, 40, generator=g))
    if op == "topk_packet":
        return (torch.randn(B, 100, generator=g),)
    if op == "ties_merge":
        return (grid_values(torch.empty(3, B, 40), g),)
    return (torch.randn(B, 20, 4, generator=g),)  # kv_quant2: [heads, tokens, channels], groups over tokens


def op_run(op: str, args: tuple, ops=dlmom) -> tuple:
    """The op (dlmom's, or dlmom.reference's with ops=reference) on args: its outputs as a tuple."""
    if op == "soft_embed":
        return (ops.soft_embed(*args),)
    if op == "topk_packet":
        return tuple(ops.topk_packet(args[0], 8, temperature=0.7, top_p=0.9))
    if op == "ties_merge":
        return (ops.ties_merge(args[0], theta=0.25, elect="mass"),)
    q = ops.kv_quant2(args[0], group_size=8, axis=-2)
    return q.codes, q.scale, q.zero, ops.kv_dequant2(q)


def assert_outputs(op: str, got: tuple, want: tuple) -> None:
    tol = {"soft_embed": TOL[torch.float32], "ties_merge": TOL[torch.float32], "kv_quant2": dict(atol=0, rtol=0)}
    if op == "topk_packet":
        assert_packet(got, dlmom.Packet(*want))
        return
    for g, w in zip(got, want, strict=True):
        torch.testing.assert_close(g.cpu(), w, **tol[op])


OPS = ["soft_embed", "topk_packet", "ties_merge", "kv_quant2"]


@pytest.mark.parametrize("op", OPS)
@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(not HAS_CUDA,
                                                                                        reason=NO_CUDA))])
def test_more_than_65535_rows(op, device):
    # grid.y is capped at 65535 (soft_embed, ties_merge): rows past it run in the kernels' second pass.
    args = op_inputs(op, 70000, seed=4)
    got = op_run(op, tuple(a.to(device) for a in args))
    assert_outputs(op, got, op_run(op, args, ops=reference))


@pytest.mark.skipif(not HAS_CUDA, reason=NO_CUDA)
@pytest.mark.parametrize("op", OPS)
def test_side_stream_behind_a_slow_producer(op):
    if os.environ.get("CUDA_LAUNCH_BLOCKING", "0") == "1":
        pytest.skip("CUDA_LAUNCH_BLOCKING=1 runs every launch to its end: no stream can be behind")
    args = op_inputs(op, 64, seed=5)
    want = op_run(op, args, ops=reference)
    src = [a.cuda() for a in args]
    dst = [torch.zeros_like(s) for s in src]  # zeros: valid inputs with another answer
    torch.cuda.synchronize()
    side = torch.cuda.Stream()
    with torch.cuda.stream(side):
        torch.cuda._sleep(200_000_000)  # ~0.1 s of GPU clock: the producer is still running when the op launches
        for d, s in zip(dst, src):
            d.copy_(s)
        got = op_run(op, tuple(dst))
    side.synchronize()
    assert_outputs(op, got, want)


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(not HAS_CUDA,
                                                                                        reason=NO_CUDA))])
def test_concurrent_calls_from_host_threads(device):
    # 8 threads, each op on its own inputs, 3 rounds; on CUDA each thread on its own stream, thread 0 on the
    # default stream. Every result is checked against the CPU reference.
    threads, rounds = 8, 3
    work = [(op, op_inputs(op, 32, seed=100 + i)) for i in range(threads) for op in OPS]
    wants = [op_run(op, args, ops=reference) for op, args in work]

    def thread(i: int) -> list[tuple]:
        stream = torch.cuda.Stream() if device == "cuda" and i > 0 else None
        with torch.cuda.stream(stream) if stream is not None else contextlib.nullcontext():
            mine = [(n, op, tuple(a.to(device) for a in args)) for n, (op, args) in enumerate(work)
                    if n % threads == i]
            out = [(n, op_run(op, args)) for _ in range(rounds) for n, op, args in mine]
            return [(n, tuple(t.cpu() for t in got)) for n, got in out]  # (.cpu() waits for this stream)

    with concurrent.futures.ThreadPoolExecutor(threads) as pool:
        results = [r for rs in pool.map(thread, range(threads)) for r in rs]
    assert len(results) == rounds * len(work)
    for n, got in results:
        assert_outputs(work[n][0], got, wants[n])


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(not HAS_CUDA,
                                                                                        reason=NO_CUDA))])
def test_rows_that_start_off_16_bytes(device, dtype):
    # x[:, 1:] goes to the kernels as it is (unit-stride rows): rows start 2, 4, ... 14 and 0 bytes past a
    # 16-byte boundary, so the vectorised kernels (topk_packet, ties_merge) must switch to scalar loads per row.
    g = torch.Generator().manual_seed(6)
    wide = torch.randn(8, 4201, generator=g).to(dtype)
    x = wide.to(device)[:, 1:]
    assert x.data_ptr() % 16 != 0
    assert_packet(dlmom.topk_packet(x, 50, temperature=0.7, top_p=0.9),
                  reference.topk_packet(wide[:, 1:], 50, temperature=0.7, top_p=0.9))
    t = grid_values(torch.empty(3, 8, 1002), g).to(dtype)
    torch.testing.assert_close(dlmom.ties_merge(t.to(device)[..., 1:], theta=0.25).cpu(),
                               reference.ties_merge(t[..., 1:], theta=0.25), **TOL[torch.float32])
    weight = torch.randn(500, 97, generator=g).to(dtype)
    ids, probs = torch.randint(0, 500, (8, 5), generator=g), torch.rand(8, 5, generator=g)
    torch.testing.assert_close(dlmom.soft_embed(ids.to(device), probs.to(device), weight.to(device)[:, 1:]).cpu(),
                               reference.soft_embed(ids, probs, weight[:, 1:]), **TOL[dtype])
