"""topk_packet kernels vs dlmom.reference over dtype x shape x k x layout, plus the spec's edge cases."""
import math

import pytest
import torch

import dlmom
from dlmom import ops, reference
from conftest import DEVICES, DTYPES, TOL, layout

# probs and entropy are float32 results computed from the logits upcast to float32, in every input dtype,
# exactly as the reference computes them: the float32 tolerance holds for fp16 / bf16 inputs too.
OUT_TOL = TOL[torch.float32]


def make(B, V, dtype, device, *, scale=3.0, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (scale * torch.randn(B, V, generator=g)).to(dtype).to(device)


def rows(x, contiguous):
    """conftest.layout, also for one row: torch calls its strided view contiguous, which conftest rejects."""
    if contiguous or x.dim() < 2 or x.shape[0] > 1:
        return layout(x, contiguous)
    wide = torch.zeros(*x.shape[:-1], x.shape[-1] + 7, dtype=x.dtype, device=x.device)
    wide[..., : x.shape[-1]] = x
    return wide[..., : x.shape[-1]]  # row stride V + 7: the kernels see a strided row


def check(x, k, *, temperature=1.0, top_p=1.0):
    """The packet of x against the reference: ids exactly, probs and entropy to fp32 tolerance."""
    got = dlmom.topk_packet(x, k, temperature=temperature, top_p=top_p)
    V, lead = x.shape[-1], x.shape[:-1]
    assert got.ids.dtype == torch.int64 and got.probs.dtype == torch.float32
    assert got.entropy.dtype == torch.float32
    assert got.ids.shape == (*lead, k) and got.probs.shape == (*lead, k) and got.entropy.shape == lead
    x2 = x.reshape(-1, V)
    want = reference.topk_packet(x2, k, temperature=temperature, top_p=top_p)
    ids = got.ids.reshape(-1, k)
    # The values first (the right k logits, best first), then the ids: ties are exact in the stored dtype
    # and both sides compare the same fp32 values, so even fp16 / bf16 ties resolve alike (lower id first).
    torch.testing.assert_close(x2.float().gather(-1, ids), x2.float().gather(-1, want.ids), atol=0, rtol=0)
    torch.testing.assert_close(ids, want.ids, atol=0, rtol=0)
    torch.testing.assert_close(got.probs.reshape(-1, k), want.probs, **OUT_TOL)
    torch.testing.assert_close(got.entropy.reshape(-1), want.entropy, **OUT_TOL)
    return got


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("B", [1, 5])
@pytest.mark.parametrize("V", [7, 1000])
@pytest.mark.parametrize("k", [1, 50, "V"])
@pytest.mark.parametrize("contiguous", [True, False])
def test_matches_reference(device, dtype, B, V, k, contiguous):
    k = V if k == "V" else min(k, V)
    check(rows(make(B, V, dtype, device), contiguous), k)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("B, V", [(1, 151936), (5, 50257)])
@pytest.mark.parametrize("k", [1, 50])
@pytest.mark.parametrize("contiguous", [True, False])
def test_large_vocab(device, dtype, B, V, k, contiguous):
    # Real vocabularies: many chunks (CPU), many segments per row (CUDA), odd V -> unaligned rows.
    check(rows(make(B, V, dtype, device, seed=1), contiguous), k, temperature=0.7, top_p=0.95)


@pytest.mark.parametrize("B, V, k", [(1, 151936, 50), (3, 40000, 7), (2, 70001, 3000)])
def test_cpu_rows_split_over_threads(B, V, k):
    # With fewer rows than threads the CPU kernel cuts rows into pieces and merges their states and
    # candidates. Force several threads so this path runs on any machine (the kernels share torch's
    # OpenMP runtime where torch uses libgomp, as the PyPI wheels do).
    before = torch.get_num_threads()
    torch.set_num_threads(4)
    try:
        x = make(B, V, torch.float32, "cpu", seed=10)
        x[0, : V // 2] = -math.inf  # a piece that holds only masked logits
        check(x, k, top_p=0.9)
    finally:
        torch.set_num_threads(before)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("V, k", [(5000, 511), (5000, 512), (5000, 513), (5000, 2049), (5000, 5000),
                                  (151936, 3000)])
def test_large_k(device, dtype, V, k):
    # Large k is a slower path: CPU heaps of k, CUDA whole-segment sorts (k > 512) and the rank merge
    # (when the row's candidate lists exceed shared memory).
    check(make(3 if V < 10000 else 1, V, dtype, device, seed=2), k, top_p=0.9)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("V, k", [(1000, 1), (1000, 50), (1000, 1000), (20000, 50)])
def test_ties_lower_id_first(device, dtype, V, k):
    g = torch.Generator().manual_seed(3)
    x = torch.randint(-2, 3, (4, V), generator=g).to(dtype).to(device)  # 5 values: ties everywhere
    got = check(x, k, temperature=0.5, top_p=0.8)
    # Independent of the reference: among equal logits the ids ascend.
    vals = x.float().gather(-1, got.ids)
    same = vals[:, 1:] == vals[:, :-1]
    assert bool((got.ids[:, 1:] > got.ids[:, :-1])[same].all())


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_constant_row(device, dtype):
    x = torch.full((2, 5000), 1.5, dtype=dtype, device=device)
    got = check(x, 64)
    assert got.ids.tolist() == [list(range(64))] * 2
    torch.testing.assert_close(got.probs, torch.full((2, 64), 1 / 64, device=device), **OUT_TOL)
    torch.testing.assert_close(got.entropy, torch.ones(2, device=device), **OUT_TOL)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("order", ["ascending", "descending"])
@pytest.mark.parametrize("k", [50, 500])
def test_sorted_rows(device, order, k):
    # Ascending rows make every chunk raise the k-th value and defeat the CUDA threshold filter.
    x = torch.linspace(-5, 5, 9000, device=device).repeat(2, 1)
    check(x if order == "ascending" else x.flip(-1), k, top_p=0.5)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_subnormal_logits(device, dtype):
    # Mostly subnormal values of the dtype (and zeros of both signs): the fp16 / bf16 conversions and the
    # order of tiny values must be exact for the ids to match.
    tiny = {torch.float32: 1e-39, torch.float16: 1e-5, torch.bfloat16: 1e-39}[dtype]
    x = make(3, 3000, torch.float32, "cpu", scale=tiny, seed=9).to(dtype)
    x[:, :4] = torch.tensor([0.0, -0.0, 0.0, -0.0], dtype=dtype)
    assert bool((x != 0).any()) and bool((x.abs() < torch.finfo(dtype).tiny).any()), "no subnormals"
    check(x.to(device), 50)


@pytest.mark.parametrize("device", DEVICES)
def test_negative_zero_equals_zero(device):
    # -0.0 == 0.0 as floats: a tie, so the lower id comes first whatever the sign bit.
    x = torch.tensor([[0.0, -0.0, 0.0, -0.0, -1.0, 1.0, -0.0]], device=device)
    got = dlmom.topk_packet(x, 7)
    assert got.ids.tolist() == [[5, 0, 1, 2, 3, 6, 4]]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("V", [1000, 20000])
@pytest.mark.parametrize("contiguous", [True, False])
def test_masked_logits(device, dtype, V, contiguous):
    x = make(5, V, dtype, device, seed=4)
    g = torch.Generator().manual_seed(5)
    x[(torch.rand(5, V, generator=g) < 0.9).to(device)] = -math.inf
    got = check(layout(x, contiguous), 50, temperature=0.8, top_p=0.9)
    assert bool(torch.isfinite(x.float().gather(-1, got.ids)).all()), "a -inf logit chosen over a finite one"


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("V", [1000, 10000])
@pytest.mark.parametrize("temperature, top_p", [(1.0, 1.0), (0.0, 1.0), (0.5, 0.6)])
def test_fewer_finite_than_k(device, dtype, V, temperature, top_p):
    # Finite logits only at a few ids, the last one in the last segment; -inf fills the tail, lower id
    # first, with probability 0.
    x = torch.full((2, V), -math.inf, dtype=dtype)
    finite = [7, V // 2, 3, V - 1]
    x[0, finite] = torch.tensor([1.0, 2.0, -1.0, 0.5], dtype=dtype)
    x[1, V - 1] = 4.0
    x = x.to(device)
    got = check(x, 50, temperature=temperature, top_p=top_p)
    rest = [i for i in range(V) if i not in finite]
    assert got.ids[0].tolist() == [V // 2, 7, V - 1, 3] + rest[:46]
    assert got.ids[1].tolist() == [V - 1] + list(range(49))
    assert bool((got.probs[0, 4:] == 0).all()) and bool((got.probs[1, 1:] == 0).all())
    torch.testing.assert_close(got.probs.sum(-1), torch.ones(2, device=device), **OUT_TOL)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("temperature", [0.0, 0.1, 0.7, 2.0])
@pytest.mark.parametrize("top_p", [0.05, 0.5, 0.9, 1.0])
def test_temperature_and_top_p(device, dtype, temperature, top_p):
    x = make(5, 1000, dtype, device, seed=6)
    got = check(x, 50, temperature=temperature, top_p=top_p)
    if temperature == 0.0:  # the one-hot packet of the argmax, ids still the top-k
        assert bool((got.probs[:, 0] == 1).all()) and bool((got.probs[:, 1:] == 0).all())
    if top_p == 0.05 and temperature == 0.1:  # the top entry alone already holds more than 5%
        assert bool((got.probs[:, 0] == 1).all()) and bool((got.probs[:, 1:] == 0).all())
    if top_p < 1.0 and temperature > 0.0:  # kept entries form a prefix and sum to 1
        kept = got.probs > 0
        assert bool((kept[:, 1:] <= kept[:, :-1]).all())
        torch.testing.assert_close(got.probs.sum(-1), torch.ones(5, device=device), **OUT_TOL)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("backend", ["auto", "reference"])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("temperature", [1e-45, 1e-40, 1e-30, 1e-12, 1e-60])
@pytest.mark.parametrize("top_p", [1.0, 0.5])
def test_tiny_temperature_is_the_argmax_limit(device, backend, dtype, temperature, top_p, monkeypatch):
    # logits / temperature overflows float32 for a tiny temperature; the packet must still be the limit:
    # one-hot on the argmax, or shared evenly between tied maxima (row 1). 1e-60 is 0 in float32.
    monkeypatch.setenv("DLMOM_BACKEND", backend)
    x = make(3, 500, torch.float32, "cpu", seed=11) * 10
    x[0, 11] = 2048.0  # a clear maximum
    x[1, [3, 7]] = 4096.0  # two tied maxima
    x[2, ::2] = -math.inf
    x[2, 21] = 2048.0
    got = check(x.to(dtype).to(device), 5, temperature=temperature, top_p=top_p)
    tied = [0.5, 0.5] if temperature > 1e-46 and top_p == 1.0 else [1.0, 0.0]
    want = torch.tensor([[1.0, 0, 0, 0, 0], [*tied, 0, 0, 0], [1.0, 0, 0, 0, 0]], device=device)
    torch.testing.assert_close(got.probs, want, atol=0, rtol=0)
    assert got.ids[:, 0].tolist() == [11, 3, 21] and got.ids[1, 1] == 7


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_entropy_known_values(device, dtype):
    V = 1000
    x = torch.zeros(4, V, dtype=dtype)
    x[1, 17] = 30.0  # one-hot-ish: the other 999 hold e^-30 each
    x[2, 10:] = -math.inf  # uniform over 10 ids
    x[3, :500] = -math.inf  # uniform over 500 ids, the first 500 masked
    got = check(x.to(device), 5)
    want = torch.tensor([1.0, 0.0, math.log(10) / math.log(V), math.log(500) / math.log(V)], device=device)
    torch.testing.assert_close(got.entropy, want, atol=1e-6, rtol=1e-6)
    assert got.ids[1, 0] == 17 and got.ids[3].tolist() == [500, 501, 502, 503, 504]


@pytest.mark.parametrize("device", DEVICES)
def test_single_token_vocabulary(device):
    got = check(torch.tensor([[0.3], [-2.0]], device=device), 1)
    assert got.ids.tolist() == [[0], [0]] and got.probs.tolist() == [[1.0], [1.0]]
    assert got.entropy.tolist() == [0.0, 0.0]


@pytest.mark.parametrize("device", DEVICES)
def test_leading_dims(device):
    x = make(6, 300, torch.float32, device, seed=7)
    got = check(x.view(2, 3, 300), 9, top_p=0.7)
    assert got.ids.shape == (2, 3, 9) and got.entropy.shape == (2, 3)
    flat = dlmom.topk_packet(x, 9, top_p=0.7)
    assert torch.equal(got.ids.view(6, 9), flat.ids)
    one = check(x[4], 9)  # a single row: ids [k], entropy []
    assert one.ids.shape == (9,) and one.entropy.shape == ()


@pytest.mark.parametrize("device", DEVICES)
def test_empty_batch(device):
    got = dlmom.topk_packet(torch.empty(0, 10, device=device), 3)
    assert got.ids.shape == (0, 3) and got.probs.shape == (0, 3) and got.entropy.shape == (0,)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("backend", ["auto", "reference"])
@pytest.mark.parametrize("logits", [torch.empty(0, 10)[:, ::2], torch.empty(10, 0).t(), torch.empty(2, 0, 12)[..., ::3],
                                    torch.empty(1, 5).expand(0, 5)])
def test_empty_batch_any_strides(device, backend, logits, monkeypatch):
    # An empty batch is valid whatever its strides (here a strided, a transposed and an expanded last dim).
    monkeypatch.setenv("DLMOM_BACKEND", backend)
    V = logits.shape[-1]
    got = dlmom.topk_packet(logits.to(device), 2)
    lead = logits.shape[:-1]
    assert got.ids.shape == (*lead, 2) and got.probs.shape == (*lead, 2) and got.entropy.shape == lead
    assert got.ids.dtype == torch.int64 and got.probs.dtype == torch.float32 and V >= 2


@pytest.mark.parametrize("device", DEVICES)
def test_reference_backend_gives_the_same(device, monkeypatch):
    x = make(3, 777, torch.bfloat16, device, seed=8)
    kernel = dlmom.topk_packet(x, 20, temperature=0.6, top_p=0.9)
    monkeypatch.setenv("DLMOM_BACKEND", "reference")
    ref = dlmom.topk_packet(x, 20, temperature=0.6, top_p=0.9)
    assert torch.equal(kernel.ids, ref.ids)
    torch.testing.assert_close(kernel.probs, ref.probs, **OUT_TOL)
    torch.testing.assert_close(kernel.entropy, ref.entropy, **OUT_TOL)


X = torch.randn(3, 5)


def with_value(row, col, value, V=5):
    x = torch.randn(3, V)
    x[row, col] = value
    return x


def all_masked(row):
    x = torch.randn(3, 5)
    x[row] = -math.inf
    return x


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("backend", ["auto", "reference"])
@pytest.mark.parametrize("logits, kwargs, message", [
    (X.long(), dict(k=2), "logits must be one of float32, float16, bfloat16, got int64"),
    (torch.tensor(1.0), dict(k=1), "logits must have at least 1 dims"),
    ([[1.0, 2.0]], dict(k=1), "logits must be a torch.Tensor, got list"),
    (X, dict(k=0), r"k must be in \[1, 5\], got 0"),
    (X, dict(k=6), r"k must be in \[1, 5\], got 6"),
    (X, dict(k=2.0), "k must be a finite integer, got 2.0"),
    (X, dict(k=True), "k must be a finite integer, got True"),
    (X, dict(k=2, temperature=-0.5), r"temperature must be in \[0, inf\], got -0.5"),
    (X, dict(k=2, temperature=float("nan")), "temperature must be a finite number, got nan"),
    (X, dict(k=2, temperature=float("inf")), "temperature must be a finite number, got inf"),
    (X, dict(k=2, top_p=0.0), r"top_p must be in \(0, 1\], got 0.0"),
    (X, dict(k=2, top_p=1.5), r"top_p must be in \(0, 1\], got 1.5"),
    (X, dict(k=2, top_p=-0.1), r"top_p must be in \(0, 1\], got -0.1"),
    (with_value(1, 3, math.nan), dict(k=2), r"row 1 holds NaN, \+inf or only -inf"),
    (with_value(0, 4, math.inf), dict(k=2), r"row 0 holds NaN, \+inf or only -inf"),
    (all_masked(2), dict(k=2), r"row 2 holds NaN, \+inf or only -inf"),
    (with_value(2, 4500, math.nan, V=5000), dict(k=5000), r"row 2 holds NaN"),
])
def test_bad_input(device, backend, logits, kwargs, message, monkeypatch):
    monkeypatch.setenv("DLMOM_BACKEND", backend)
    if isinstance(logits, torch.Tensor):
        logits = logits.to(device)
    with pytest.raises(ValueError, match=message):
        dlmom.topk_packet(logits, **kwargs)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("where", ["nan-late", "nan-in-masked-chunk", "nan-in-masked-row",
                                   "inf-in-masked-row", "nan-first"])
def test_bad_rows_are_found_anywhere(device, dtype, where):
    # Rows that the candidate fast path skips still get checked: the NaN test runs on every chunk.
    x = torch.randn(4, 20000) - 10.0
    x[:, 0] = 10.0  # the k-th value is soon far above everything after it
    bad_row = 2
    if where == "nan-late":
        x[bad_row, 19000] = math.nan
    elif where == "nan-in-masked-chunk":  # the chunk's max is -inf: no exp runs there to turn NaN into NaN
        x[bad_row, 5000:9000] = -math.inf
        x[bad_row, 6000] = math.nan
    elif where == "nan-in-masked-row":
        x[bad_row] = -math.inf
        x[bad_row, 12345] = math.nan
    elif where == "inf-in-masked-row":
        x[bad_row] = -math.inf
        x[bad_row, 9999] = math.inf
    else:
        x[bad_row, 0] = math.nan
    with pytest.raises(ValueError, match=f"row {bad_row} holds"):
        dlmom.topk_packet(x.to(dtype).to(device), 8)


def call_binding(device, logits, k=2, temperature=1.0, top_p=1.0, ids=None, probs=None, entropy=None, B=4):
    """The native binding with views that may be wrong; outputs default to the right shapes [B, k], [B]."""
    ids = torch.empty(B, k, dtype=torch.int64, device=device) if ids is None else ids
    probs = torch.empty(B, k, device=device) if probs is None else probs
    entropy = torch.empty(B, device=device) if entropy is None else entropy
    mod = ops.native_module(device)
    if mod is None:
        pytest.skip(f"dlmom was built without {device} kernels")
    args = [ops._view(t) if isinstance(t, torch.Tensor) else t for t in (logits, k, temperature, top_p, ids,
                                                                          probs, entropy)]
    if device == "cuda":
        return mod.topk_packet(*args, stream=torch.cuda.current_stream().cuda_stream)
    return mod.topk_packet(*args)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("case, message", [
    ("logits 1-d", "logits must have 2 dims, got 1"),
    ("logits int32", "logits must be float32, float16 or bfloat16, got int32"),
    ("logits strided last dim", "logits must have unit stride on its last dim, got 2"),
    ("logits null", "logits is a null pointer"),
    ("logits V=0", "logits must have 1 to 2.31-1 entries per row, got 0"),
    ("ids int32", "ids must be int64, got int32"),
    ("ids wrong k", r"ids must have shape \[4, 2\], got \[4, 3\]"),
    ("probs float16", "probs must be float32, got float16"),
    ("probs wrong B", r"probs must have shape \[4, 2\], got \[3, 2\]"),
    ("entropy wrong B", r"entropy must have shape \[4\], got \[5\]"),
    ("entropy 2-d", "entropy must have 1 dims, got 2"),
    ("k 0", r"k must be in \[1, V=9\], got 0"),
    ("k > V", r"k must be in \[1, V=9\], got 10"),
    ("temperature < 0", "temperature must be a finite number >= 0, got -1"),
    ("temperature nan", "temperature must be a finite number >= 0, got nan"),
    ("top_p 0", r"top_p must be in \(0, 1\], got 0"),
    ("top_p > 1", r"top_p must be in \(0, 1\], got 2"),
])
def test_binding_rechecks_views(device, case, message):
    # A direct call of the binding with a bad view raises ValueError instead of crashing the process.
    x = torch.randn(4, 9, device=device)
    kw = {}
    if case == "logits 1-d":
        kw["logits"] = x.view(-1)
    elif case == "logits int32":
        kw["logits"] = x.int()
    elif case == "logits strided last dim":
        kw["logits"] = torch.randn(4, 18, device=device)[:, ::2]
    elif case == "logits null":
        kw["logits"] = (0, 0, (4, 9), (9, 1))
    elif case == "logits V=0":
        kw["logits"], kw["k"] = torch.empty(4, 0, device=device), 1
    elif case == "ids int32":
        kw["ids"] = torch.empty(4, 2, dtype=torch.int32, device=device)
    elif case == "ids wrong k":
        kw["ids"] = torch.empty(4, 3, dtype=torch.int64, device=device)
    elif case == "probs float16":
        kw["probs"] = torch.empty(4, 2, dtype=torch.float16, device=device)
    elif case == "probs wrong B":
        kw["probs"] = torch.empty(3, 2, device=device)
    elif case == "entropy wrong B":
        kw["entropy"] = torch.empty(5, device=device)
    elif case == "entropy 2-d":
        kw["entropy"] = torch.empty(4, 1, device=device)
    elif case == "k 0":
        kw["k"] = 0
    elif case == "k > V":
        kw["k"] = 10
    elif case == "temperature < 0":
        kw["temperature"] = -1.0
    elif case == "temperature nan":
        kw["temperature"] = math.nan
    elif case == "top_p 0":
        kw["top_p"] = 0.0
    elif case == "top_p > 1":
        kw["top_p"] = 2.0
    logits = kw.pop("logits", x)
    with pytest.raises(ValueError, match=f"topk_packet: {message}"):
        call_binding(device, logits, **kw)
