"""soft_embed kernel vs the fp32 reference over dtype x shape x layout, plus the embedding-layer identity."""
import math

import pytest
import torch

import dlmom
from dlmom import ops
from conftest import DEVICES, DTYPES, TOL, layout


def reference_fp32(ids, probs, weight, scale):
    # The oracle at the top, computed in fp32 from the same inputs.
    return scale * (probs.float().unsqueeze(-1) * weight.float()[ids.long()]).sum(-2)


def make(B, k, V, D, dtype, device, ids_dtype=torch.int64, probs_dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, V, (B, k), generator=g).to(ids_dtype)
    probs = torch.softmax(torch.randn(B, k, generator=g), -1).to(probs_dtype)
    weight = torch.randn(V, D, generator=g).to(dtype)
    return ids.to(device), probs.to(device), weight.to(device)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("B", [1, 5])
@pytest.mark.parametrize("k", [1, 50])
@pytest.mark.parametrize("D", [64, 576, 896])
@pytest.mark.parametrize("contiguous", [True, False])
def test_matches_reference(device, dtype, B, k, D, contiguous):
    ids, probs, weight = make(B, k, 1000, D, dtype, device)
    scale = 1.5
    got = dlmom.soft_embed(layout(ids, contiguous), layout(probs, contiguous), layout(weight, contiguous),
                           scale=scale)
    assert got.dtype == dtype and got.shape == (B, D)
    torch.testing.assert_close(got.float(), reference_fp32(ids, probs, weight, scale), **TOL[dtype])


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("ids_dtype", [torch.int32, torch.int64])
@pytest.mark.parametrize("probs_dtype", DTYPES)
@pytest.mark.parametrize("V", [7, 50257])
def test_id_and_prob_dtypes(device, ids_dtype, probs_dtype, V):
    ids, probs, weight = make(3, 4, V, 96, torch.float32, device, ids_dtype, probs_dtype)
    got = dlmom.soft_embed(ids, probs, weight)
    torch.testing.assert_close(got, reference_fp32(ids, probs, weight, 1.0), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("device", DEVICES)
def test_matches_reference_module(device):
    # dlmom.reference is the fallback: it must agree with the kernel too.
    ids, probs, weight = make(5, 9, 300, 130, torch.bfloat16, device)
    torch.testing.assert_close(dlmom.soft_embed(ids, probs, weight, scale=0.5),
                               dlmom.reference.soft_embed(ids, probs, weight, scale=0.5), **TOL[torch.bfloat16])


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_one_hot_packet_is_the_embedding_layer(device, dtype):
    # A token is the packet {(id, 1.0)}: with Gemma's scale it equals the scaled embedding layer exactly.
    emb = torch.nn.Embedding(321, 64).to(device=device, dtype=dtype)
    ids = torch.tensor([[5], [0], [320]], device=device)
    scale = math.sqrt(64)
    expected = (emb(ids[:, 0]).float() * scale).to(dtype)
    got = dlmom.soft_embed(ids, torch.ones(3, 1, device=device), emb.weight, scale=scale)
    torch.testing.assert_close(got, expected, atol=0, rtol=0)


@pytest.mark.parametrize("device", DEVICES)
def test_leading_dims_and_out(device):
    ids, probs, weight = make(6, 3, 50, 33, torch.float32, device)
    ids, probs = ids.view(2, 3, 3), probs.view(2, 3, 3)
    expected = reference_fp32(ids, probs, weight, 2.0)
    got = dlmom.soft_embed(ids, probs, weight, scale=2.0)
    assert got.shape == (2, 3, 33)
    torch.testing.assert_close(got, expected)
    out = torch.full((2, 3, 33), float("nan"), device=device)
    assert dlmom.soft_embed(ids, probs, weight, scale=2.0, out=out) is out
    torch.testing.assert_close(out, expected)
    strided = torch.full((2, 3, 40), float("nan"), device=device)[..., :33]
    assert dlmom.soft_embed(ids, probs, weight, scale=2.0, out=strided) is strided
    torch.testing.assert_close(strided, expected)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("backend", ["auto", "reference"])
@pytest.mark.parametrize("case", ["transposed", "strided", "leading", "out strided", "D=0 with out"])
def test_empty_inputs_any_strides(device, backend, case, monkeypatch):
    # No rows (or no columns) is valid whatever the strides of ids, probs, weight and out.
    monkeypatch.setenv("DLMOM_BACKEND", backend)
    ids, probs, weight, out = torch.empty(0, 3, dtype=torch.int32), torch.empty(0, 3), torch.randn(10, 8), None
    if case == "transposed":
        ids, probs = torch.empty(3, 0, dtype=torch.int32).t(), torch.empty(3, 0).t()
    elif case == "strided":
        ids, probs = torch.empty(0, 6, dtype=torch.int32)[:, ::2], torch.empty(0, 6)[:, ::2]
    elif case == "leading":
        ids, probs = torch.empty(2, 0, 9, dtype=torch.int32)[..., ::3], torch.empty(2, 0, 9)[..., ::3]
    elif case == "out strided":
        out = torch.empty(0, 16)[:, ::2]
    else:  # one row, but D = 0
        ids, probs, weight, out = torch.tensor([[1, 2, 3]]), torch.ones(1, 3), torch.empty(10, 0), torch.empty(1, 0)
    move = (lambda t: None if t is None else t.to(device))
    got = dlmom.soft_embed(move(ids), move(probs), move(weight), out=move(out))
    assert got.shape == (*ids.shape[:-1], weight.shape[1]) and got.dtype == weight.dtype
    if out is not None:
        assert got.data_ptr() == out.data_ptr() or got.numel() == 0


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("backend", ["auto", "reference"])
@pytest.mark.parametrize("case", ["weight rows", "all of weight", "probs", "ids", "beside weight"])
def test_out_may_overlap_the_inputs(device, backend, case, monkeypatch):
    # out sharing memory with an input: the result is that of the inputs as they were at the call.
    monkeypatch.setenv("DLMOM_BACKEND", backend)
    g = torch.Generator().manual_seed(12)
    weight = torch.randn(10, 4, generator=g).to(device)
    ids = torch.tensor([[1, 3], [2, 2], [0, 9]], device=device)
    probs = torch.rand(3, 2, generator=g).to(device)
    if case == "weight rows":  # rows 2..4 of weight, read by later rows of the batch
        out = weight[2:5]
    elif case == "all of weight":
        ids = torch.tensor([[1, 3], [2, 2], [0, 9], [4, 5], [6, 7], [8, 8], [1, 1], [0, 0], [5, 5], [9, 9]],
                           device=device)
        probs = torch.rand(10, 2, generator=g).to(device)
        out = weight
    elif case == "probs":  # probs are the first two columns of out
        buf = torch.rand(3, 4, generator=g).to(device)
        probs, out = buf[:, :2], buf
    elif case == "ids":  # int32 ids held in the bytes of out (0.0 has the bits of id 0, 2**-148 of id 1)
        buf = torch.zeros(3, 4, device=device)
        buf.view(torch.int32)[:, 1] = 1
        ids, out = buf.view(torch.int32)[:, :2], buf
    else:  # weight is the left half of a [10, 8] buffer and out the right half of its first rows
        buf = torch.randn(10, 8, generator=g).to(device)
        weight, out = buf[:, :4], buf[:3, 4:]
    want = reference_fp32(ids.clone(), probs.clone(), weight.clone(), 1.5)
    assert dlmom.soft_embed(ids, probs, weight, scale=1.5, out=out) is out
    torch.testing.assert_close(out, want, atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("backend", ["auto", "reference"])
def test_out_with_overlapping_elements_is_refused(device, backend, monkeypatch):
    monkeypatch.setenv("DLMOM_BACKEND", backend)
    ids, probs, weight = make(3, 2, 10, 4, torch.float32, device)
    out = torch.empty(1, 4, device=device).expand(3, 4)  # three rows, one row of memory
    with pytest.raises(ValueError, match=r"out must not address one element twice.*strides \(0, 1\)"):
        dlmom.soft_embed(ids, probs, weight, out=out)


def test_binding_refuses_out_overlapping_an_input():
    mod = ops.native_module("cpu")
    weight = torch.randn(10, 4)
    ids, probs = torch.tensor([[1, 2]]), torch.tensor([[0.5, 0.5]])
    with pytest.raises(ValueError, match="soft_embed: out must not overlap weight"):
        mod.soft_embed(ops._view(ids), ops._view(probs), ops._view(weight), 1.0, ops._view(weight[3:4]))
    buf = torch.zeros(1, 4)
    with pytest.raises(ValueError, match="soft_embed: out must not overlap probs"):
        mod.soft_embed(ops._view(ids), ops._view(buf[:, 2:]), ops._view(weight), 1.0, ops._view(buf))
    with pytest.raises(ValueError, match="soft_embed: out must not overlap ids"):
        mod.soft_embed(ops._view(buf.view(torch.int32)[:, :2]), ops._view(probs), ops._view(weight), 1.0,
                       ops._view(buf))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("backend", ["auto", "reference"])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case", ["products overflow fp32", "partial sums overflow fp32", "products underflow fp32",
                                  "scale 0 times huge", "scale beyond fp32"])
def test_extreme_magnitudes_give_the_exact_value_rounded(device, backend, dtype, case, monkeypatch):
    # Finite inputs whose products or partial sums leave the fp32 range while the result fits: the result is
    # the exact value rounded to the dtype, as the float64 computation gives.
    monkeypatch.setenv("DLMOM_BACKEND", backend)
    m = torch.finfo(dtype).max
    sub = torch.finfo(dtype).tiny * torch.finfo(dtype).eps  # the smallest subnormal
    c = 2.0 ** 127 / m  # c * m = 2^127: two of them overflow fp32
    weight = [[m, 1.0], [m, 3.0], [sub, 4 * sub]]
    if case == "products overflow fp32":  # +-4c * m = +-2^129, the sums 0 and -8c
        ids, probs, scale = [0, 1], [4 * c, -4 * c], 1 / c
    elif case == "partial sums overflow fp32":  # 2^127 + 2^127 first
        ids, probs, scale = [0, 0, 1, 1], [c, c, -c, -c], 1 / c
    elif case == "products underflow fp32":  # 2^-100 * sub is 0 in fp32
        ids, probs, scale = [2, 2], [2.0 ** -100, 2.0 ** -100], 2.0 ** 99 / sub
    elif case == "scale 0 times huge":  # inf * 0 in fp32
        ids, probs, scale = [0, 1], [4 * c, 1.0], 0.0
    else:  # the scale, >= 2^134, is inf as a float32
        ids, probs, scale = [2], [2.0 ** -120], 2.0 ** 110 / sub
    ids, weight = torch.tensor([ids]), torch.tensor(weight, dtype=torch.float64).to(dtype)
    probs = torch.tensor([probs]).float()  # what the op gets
    want = (scale * (probs.double().unsqueeze(-1) * weight.double()[ids]).sum(-2)).float().to(dtype)
    assert bool(torch.isfinite(want).all()) and bool((want != 0).any() or scale == 0), want
    got = dlmom.soft_embed(ids.to(device), probs.to(device), weight.to(device), scale=scale)
    torch.testing.assert_close(got, want.to(device), atol=0, rtol=0)


@pytest.mark.parametrize("device", DEVICES)
def test_rounding_error_times_a_huge_scale_is_not_inf(device):
    # Found by tests/test_fuzz_ops.py: the exact sum is 0, the fp32 one a rounding residue of ~1e29, which a
    # scale of 1e30 took past the fp32 range (inf). Such a sum is redone in fp64.
    weight = torch.tensor([[1.0832e36]], device=device)
    ids = torch.zeros(1, 5, dtype=torch.long, device=device)
    probs = torch.tensor([[3.0, -3.0, -2.0, -1.0, 3.0]], device=device)
    residue = dlmom.soft_embed(ids, probs, weight)
    assert float(residue) != 0, "no fp32 rounding residue here: the case tests nothing"
    assert abs(float(residue)) < 1e-6 * 1.0832e36 * 12  # within fp32's error of the sum
    got = dlmom.soft_embed(ids, probs, weight, scale=1e30)
    torch.testing.assert_close(got, torch.zeros(1, 1, device=device), atol=0, rtol=0)


@pytest.mark.parametrize("device", DEVICES)
def test_probabilities_need_not_sum_to_one(device):
    ids = torch.tensor([[1, 1, 2]], device=device)
    weight = torch.arange(12.0, device=device).view(4, 3)
    got = dlmom.soft_embed(ids, torch.tensor([[0.25, 0.5, -1.0]], device=device), weight)
    torch.testing.assert_close(got, 0.75 * weight[1:2] - weight[2:3])


@pytest.mark.parametrize("device", DEVICES)
def test_reference_backend_gives_the_same(device, monkeypatch):
    ids, probs, weight = make(4, 5, 100, 70, torch.float32, device)
    kernel = dlmom.soft_embed(ids, probs, weight)
    monkeypatch.setenv("DLMOM_BACKEND", "reference")
    torch.testing.assert_close(dlmom.soft_embed(ids, probs, weight), kernel)


W = torch.randn(10, 4)
IDS = torch.tensor([[1, 2]])
P = torch.tensor([[0.5, 0.5]])


@pytest.mark.parametrize("backend", ["auto", "reference"])
@pytest.mark.parametrize("kwargs, message", [
    (dict(ids=IDS.float()), "ids must be one of int32, int64, got float32"),
    (dict(ids=torch.tensor(3)), "ids must have at least 1 dims"),
    (dict(probs=P.long()), "probs must be one of float32, float16, bfloat16, got int64"),
    (dict(probs=torch.ones(1, 3)), r"probs must have the shape of ids \(1, 2\), got \(1, 3\)"),
    (dict(weight=torch.randn(10)), r"weight must have 2 dims, got shape \(10,\)"),
    (dict(weight=torch.randn(10, 4).long()), "weight must be one of float32"),
    (dict(ids=torch.tensor([[1, 10]])), r"ids must be in \[0, V=10\)"),
    (dict(ids=torch.tensor([[-1, 2]])), r"ids must be in \[0, V=10\)"),
    (dict(ids=torch.zeros(1, 0, dtype=torch.long), probs=torch.zeros(1, 0)), "at least one id per row"),
    (dict(scale=float("nan")), "scale must be a finite number, got nan"),
    (dict(scale="2"), "scale must be a finite number"),
    (dict(weight=[[1.0]]), "weight must be a torch.Tensor, got list"),
    (dict(out=torch.empty(1, 5)), r"out must have shape \(1, 4\)"),
    (dict(out=torch.empty(1, 4, dtype=torch.float16)), "out must be one of float32, got float16"),
])
def test_bad_inputs(backend, kwargs, message, monkeypatch):
    monkeypatch.setenv("DLMOM_BACKEND", backend)
    args = dict(ids=IDS, probs=P, weight=W, scale=1.0, out=None) | kwargs
    with pytest.raises(ValueError, match=message):
        dlmom.soft_embed(args["ids"], args["probs"], args["weight"], scale=args["scale"], out=args["out"])


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA GPU on this machine")
def test_devices_must_match():
    with pytest.raises(ValueError, match="all tensors must be on one device"):
        dlmom.soft_embed(IDS.cuda(), P.cuda(), W)


def test_binding_checks_again():
    mod = ops.native_module("cpu")
    out, bad_ids = torch.empty(1, 4), torch.tensor([[12, 0]])  # kept alive: a view is only a pointer
    with pytest.raises(ValueError, match=r"soft_embed: ids must be in \[0, V=10\), got 12 at \[0, 0\]"):
        mod.soft_embed(ops._view(bad_ids), ops._view(P), ops._view(W), 1.0, ops._view(out))
    with pytest.raises(ValueError, match="soft_embed: out must be float32, got float16"):
        mod.soft_embed(ops._view(IDS), ops._view(P), ops._view(W), 1.0, ops._view(out.half()))
    with pytest.raises(ValueError, match=r"soft_embed: probs must be \[1, 2\]"):
        mod.soft_embed(ops._view(IDS), ops._view(torch.ones(2, 2)), ops._view(W), 1.0, ops._view(out))


@pytest.mark.parametrize("device", DEVICES)
def test_transposed_weight_copy_outlives_the_kernel(device):
    # Regression (use-after-free): a weight whose rows are strided is copied for the kernel; the copy used to
    # be freed before the kernel read it (a wrong result at this size, a segfault at a real model's).
    g = torch.Generator().manual_seed(3)
    weight = torch.randn(64, 7, generator=g).t().to(device)  # [7, 64], column-major
    ids = torch.randint(0, 7, (4, 5), generator=g).to(device)
    probs = torch.rand(4, 5, generator=g).to(device)
    for _ in range(3):  # allocations in between reuse freed memory
        junk = [torch.full((64, 7), 1e6) for _ in range(4)]
        got = dlmom.soft_embed(ids, probs, weight)
        del junk
        torch.testing.assert_close(got, reference_fp32(ids, probs, weight, 1.0), atol=1e-5, rtol=1e-5)
