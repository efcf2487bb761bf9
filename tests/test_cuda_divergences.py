"""The CPU / CUDA divergences of the issue #16 audit, pinned down: topk_packet at exact top-p ties and on rows
whose finite logits are more than FLT_MAX apart, and the CUDA top-k scratch taken from torch's allocator.

Every case runs on the CPU here; the CUDA cases (skipped without a GPU) compare the GPU kernel with the CPU
reference and the CPU kernel, not with the reference on the GPU: torch's CUDA cumsum sums float32 in float32,
so at exact ties the reference itself keeps a different number of entries on CUDA than on the CPU.
"""
import math

import pytest
import torch

import dlmom
from dlmom import ops, reference

HAS_CUDA = torch.cuda.is_available()
DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(not HAS_CUDA, reason="no CUDA GPU on this machine"))]
FMAX = torch.finfo(torch.float32).max


def against_cpu_reference(x, k, entropy_tol=1e-5, **kw):
    """dlmom.topk_packet of x on its device vs dlmom.reference on the CPU: ids exactly, probs and entropy to
    the fp32 tolerance. Returns the packet, on the CPU."""
    got = dlmom.topk_packet(x, k, **kw)
    want = reference.topk_packet(x.cpu(), k, **kw)
    ids, probs, entropy = got.ids.cpu(), got.probs.cpu(), got.entropy.cpu()
    torch.testing.assert_close(ids, want.ids, atol=0, rtol=0)
    torch.testing.assert_close(probs, want.probs, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(entropy, want.entropy, atol=entropy_tol, rtol=entropy_tol)
    return type(got)(ids, probs, entropy)


# ---- finite logits more than FLT_MAX apart: online-softmax rescale by exp(-inf) ----

def extreme_rows(V, far):
    """Rows of random logits holding huge finite values at positions `far` apart (CPU chunks are 1024 logits,
    CUDA thread items 8 and segments 4096): x - max overflows to -inf there."""
    g = torch.Generator().manual_seed(5)
    x = 3.0 * torch.randn(5, V, generator=g)
    x[0, 3], x[0, far] = -3e38, 3e38  # the small one first: the state at -3e38 is rescaled to 3e38
    x[1, 3], x[1, far] = 3e38, -3e38  # the large one first: the small one adds exp(-inf) = 0
    x[2, 3], x[2, far], x[2, V - 1] = -FMAX, FMAX, FMAX  # two maxima: entropy log 2 / log V
    x[3] = -3e38  # a whole row near -FLT_MAX except one near +FLT_MAX at the end
    x[3, V - 1] = 3e38
    x[4, : V // 2] = -FMAX  # a half of -FLT_MAX, then ordinary logits
    return x


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("V, far", [(5000, 7), (5000, 1500), (5000, 4500), (151936, 100000)])
@pytest.mark.parametrize("k, top_p", [(1, 1.0), (50, 0.9)])
def test_finite_logits_beyond_flt_max_apart(device, dtype, V, far, k, top_p):
    # Before the fix the rescale computed 0 * -inf = NaN: a valid row raised "holds NaN, +inf or only -inf"
    # (CPU: when the two values sat in different chunks; CUDA: in different threads' items or segments).
    x = extreme_rows(V, far).to(dtype)  # bf16 holds 3e38 (as 2.99e38) and FLT_MAX rounds to inf: keep it finite
    x = torch.where(torch.isinf(x), torch.sign(x) * torch.finfo(dtype).max, x)
    got = against_cpu_reference(x.to(device), k, temperature=0.7, top_p=top_p)
    assert bool(torch.isfinite(got.entropy).all())
    assert got.entropy[0] == 0 and got.entropy[1] == 0 and got.entropy[3] == 0  # one value takes all the mass
    torch.testing.assert_close(got.entropy[2], torch.tensor(math.log(2) / math.log(V)), atol=1e-6, rtol=1e-5)


def test_finite_logits_beyond_flt_max_apart_split_rows():
    # A long row cut into pieces over threads (CPU): the pieces' states meet in online_merge.
    before = torch.get_num_threads()
    torch.set_num_threads(4)
    try:
        x = extreme_rows(70001, 60000)[:2]
        got = against_cpu_reference(x, 8, top_p=0.9)
        assert bool((got.entropy == 0).all())
    finally:
        torch.set_num_threads(before)


# ---- top-p at exact ties: the mass before an entry equals top_p exactly ----

def kept_at_ties(k, top_p):
    """Entries top-p keeps of k equal probabilities, in the spec's arithmetic (dlmom.reference on the CPU,
    topk::packet_probs): p = float32(1 / k), the mass before entry j = float32(exact sum of j + 1 p's) - p,
    kept while < float32(top_p). In exact arithmetic that is ceil(top_p * k); the float rounding of p and top_p
    may move it by one (k = 3000, top_p = 0.5 keeps 1501)."""
    p = torch.tensor(1.0, dtype=torch.float32) / k
    cum = torch.arange(1, k + 1, dtype=torch.float64) * float(p)  # exact: k < 2^29 multiples of one float
    before = cum.float() - p
    return int((before < torch.tensor(top_p, dtype=torch.float32)).sum())


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("V, k, top_p", [
    (1000, 50, 0.8),      # the audit's case: 50 probabilities of 1/50, top_p * k = 40
    (1000, 20, 0.5),
    (20000, 50, 0.8),     # several CUDA segments
    (5000, 2049, 0.25),   # k above one finish block (1024 threads): a tiled scan
    (5000, 2000, 0.3),
    (151936, 3000, 0.5),  # the CUDA rank merge (the row's candidate lists exceed shared memory)
])
def test_top_p_exact_ties(device, V, k, top_p):
    # The mass before an entry equals top_p (up to float rounding of p and top_p). Float partial sums drift
    # below that boundary and keep one entry more (the CUDA kernel summed in float before the fix: 41 of 50
    # at top_p 0.8); double sums of equal floats are exact in any order, so the GPU's tree order and the
    # CPU's serial loop agree bit for bit.
    x = torch.zeros(3, V)
    x[:, ::2] = 1.0  # half the row at 1: the top k are all 1 (ties), lower ids first
    x[1, 7] = -math.inf
    # (entropy: float sums over V equal terms drift the same way, 4.5e-5 at V = 151936 on the CPU)
    got = against_cpu_reference(x.to(device), k, entropy_tol=1e-4, temperature=0.5, top_p=top_p)
    n = kept_at_ties(k, top_p)
    assert (k, top_p) != (50, 0.8) or n == 40
    assert bool((got.ids == torch.arange(0, 2 * k, 2)).all())
    assert bool(((got.probs > 0).sum(-1) == n).all())
    torch.testing.assert_close(got.probs[:, :n], torch.full((3, n), 1.0 / n), atol=0, rtol=1e-6)
    cpu = dlmom.topk_packet(x, k, temperature=0.5, top_p=top_p)  # the CPU kernel: the same bits
    assert torch.equal(got.probs, cpu.probs) and torch.equal(got.ids, cpu.ids)


@pytest.mark.parametrize("device", DEVICES)
def test_random_ties_match_the_cpu_kernel(device):
    # tests/test_topk_packet.py::test_ties_lower_id_first's data (5 values, ties everywhere) at every k it
    # uses, against the CPU reference and the CPU kernel bit for bit.
    g = torch.Generator().manual_seed(3)
    for V, k in [(1000, 1), (1000, 50), (1000, 1000), (20000, 50)]:
        x = torch.randint(-2, 3, (4, V), generator=g).float()
        got = against_cpu_reference(x.to(device), k, temperature=0.5, top_p=0.8)
        cpu = dlmom.topk_packet(x, k, temperature=0.5, top_p=0.8)
        assert torch.equal(got.ids, cpu.ids)
        torch.testing.assert_close(got.probs, cpu.probs, atol=1e-7, rtol=1e-6)
        assert torch.equal(got.probs > 0, cpu.probs > 0)  # the same entries kept


# ---- the CUDA binding's scratch ----

def cuda_module():
    mod = ops.native_module("cuda")
    if mod is None:
        pytest.skip("dlmom was built without CUDA kernels")
    return mod


def binding_args(B=4, V=9, k=2):
    # Only the views' metadata is read before the checks fail: CPU tensors stand in for device memory here.
    x, ids = torch.randn(B, V), torch.empty(B, k, dtype=torch.int64)
    probs, entropy = torch.empty(B, k), torch.empty(B)
    return [ops._view(t) if isinstance(t, torch.Tensor) else t for t in (x, k, 1.0, 1.0, ids, probs, entropy)]


def test_cuda_workspace_bytes():
    mod = cuda_module()
    seg = 512 * 8  # csrc/cuda/topk_packet.cu: kSeg
    assert mod.topk_workspace_bytes(3, 5000, 50) == 3 * 2 * (16 + 50 * 8)
    assert mod.topk_workspace_bytes(1, 151936, 8000) == 38 * (16 + seg * 8)  # kk = min(k, kSeg)
    assert mod.topk_workspace_bytes(0, 151936, 50) == 0


@pytest.mark.parametrize("case, message", [
    ("missing", "workspace is required on CUDA"),
    ("small", "workspace must hold at least 64 bytes, got 63"),
    ("float", "workspace must be uint8, got float32"),
    ("2-d", "workspace must have 1 dims, got 2"),
    ("unaligned", "workspace must be 16-byte aligned"),
    ("in probs", "workspace must not overlap probs"),
])
def test_cuda_binding_checks_the_workspace(case, message):
    # Host-side checks of the CUDA entry point: they run before any CUDA call, so they run without a GPU too.
    mod = cuda_module()
    args = binding_args(B=4, V=9, k=2)  # need: 4 rows * 1 segment * (16 + 2 * 8) = 128 bytes
    need = mod.topk_workspace_bytes(4, 9, 2)
    buf = torch.empty(need + 32, dtype=torch.uint8)
    ws = {"missing": None, "small": buf[: need - 1], "float": torch.empty(need // 4 + 1),
          "2-d": buf[:need].view(2, -1), "unaligned": buf[1 : need + 1]}.get(case)
    if case == "small":
        args = binding_args(B=2, V=9, k=2)  # 2 * (16 + 16) = 64 bytes
        ws = buf[:63]
    if case == "in probs":
        probs = torch.empty(need + 64, dtype=torch.uint8)
        args[5] = ops._view(probs[:32].view(torch.float32).view(4, 2))
        ws = probs[:need]
    with pytest.raises(ValueError, match=f"topk_packet: {message}"):
        mod.topk_packet(*args, None if ws is None else ops._view(ws), status=0, stream=0)


@pytest.mark.skipif(not HAS_CUDA, reason="no CUDA GPU on this machine")
def test_cuda_scratch_comes_from_torch():
    # The segments' states and candidate lists live in torch's caching allocator: torch.cuda.memory_* sees them.
    mod = cuda_module()
    B, V, k = 4, 151936, 4096
    x = torch.randn(B, V, device="cuda")
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    got = dlmom.topk_packet(x, k, top_p=0.9)
    torch.cuda.synchronize()
    outputs = B * k * (8 + 4) + B * 4
    assert torch.cuda.max_memory_allocated() - base >= mod.topk_workspace_bytes(B, V, k) + outputs
    against_cpu_reference(x, k, top_p=0.9)
    del got


# ---- ties_merge: the weights are checked on both devices even when no row is merged ----

@pytest.mark.parametrize("device", DEVICES)
def test_ties_merge_checks_weights_without_rows(device):
    # B == 0: the CPU checked every weight, the CUDA entry point returned before any kernel saw them.
    x = torch.randn(3, 0, 10, device=device)
    with pytest.raises(ValueError, match="weights must be finite and >= 0"):
        dlmom.ties_merge(x, weights=torch.tensor([1.0, math.nan, 1.0], device=device))
    assert dlmom.ties_merge(x, weights=torch.tensor([1.0, 0.5, 1.0], device=device)).shape == (0, 10)
