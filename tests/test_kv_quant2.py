"""kv_quant2 / kv_dequant2 kernels vs dlmom.reference: codes, scale and zero bit for bit, over shape x axis
x group size x dtype x device x layout; the half-step bound, exact constant groups, round trips between the
kernel and the reference, and every error path."""
import math

import pytest
import torch

import dlmom
from dlmom import ops, reference
from dlmom.op_types import QuantizedKV
from conftest import DEVICES, DTYPES, layout

# (shape, axis): axis=-1 groups the last dim (values, per token), axis=-2 the one before (keys, per channel).
CASES = [((1, 3, 77, 64), -1), ((1, 3, 77, 64), -2), ((2, 5, 33, 96), -1), ((2, 5, 33, 96), -2),
         ((4, 7), -1), ((4, 7), -2), ((130,), -1)]
GROUPS = [1, 7, 32, 128]  # 128 > L for several cases; 7 divides no L here and is not a multiple of 4


def make(shape, dtype, device, *, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(shape, generator=g) * 2.5 + 0.7).to(dtype).to(device)


def per_element(t: torch.Tensor, q: QuantizedKV) -> torch.Tensor:
    """scale or zero [..., ng, ...] broadcast back to the elements of q.shape, as fp32 [R, L, C]."""
    R, L, C = reference.canonical_3d(q.shape, q.axis)
    return t.reshape(R, -(-L // q.group_size), C).float().repeat_interleave(q.group_size, dim=1)[:, :L]


def assert_same_quant(got: QuantizedKV, want: QuantizedKV) -> None:
    assert got.shape == want.shape and got.axis == want.axis and got.group_size == want.group_size
    for name in ("codes", "scale", "zero"):
        a, b = getattr(got, name), getattr(want, name)
        assert a.dtype == b.dtype and a.shape == b.shape, (name, a.dtype, b.dtype, a.shape, b.shape)
        torch.testing.assert_close(a, b, rtol=0, atol=0, msg=lambda m, n=name: f"{n}: {m}")


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape,axis", CASES)
@pytest.mark.parametrize("G", GROUPS)
@pytest.mark.parametrize("contiguous", [True, False])
def test_matches_reference(device, dtype, shape, axis, G, contiguous):
    x = make(shape, dtype, device)
    q = dlmom.kv_quant2(layout(x, contiguous), group_size=G, axis=axis)
    want = reference.kv_quant2(x, group_size=G, axis=axis)
    assert_same_quant(q, want)
    assert q.scale.dtype == dtype and q.codes.dtype == torch.uint8
    # The kernel's dequant computes code * scale + zero with torch's two roundings: the same values.
    torch.testing.assert_close(dlmom.kv_dequant2(q), reference.kv_dequant2(want), rtol=0, atol=0)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape,axis", CASES)
@pytest.mark.parametrize("G", [7, 32])
def test_within_half_a_step(device, dtype, shape, axis, G):
    x = make(shape, dtype, device, seed=1)
    q = dlmom.kv_quant2(x, group_size=G, axis=axis)
    deq = dlmom.kv_dequant2(q, dtype=torch.float32)
    R, L, C = reference.canonical_3d(x.shape, axis)
    x3, d3 = x.float().reshape(R, L, C), deq.reshape(R, L, C)
    s, z = per_element(q.scale, q), per_element(q.zero, q)
    tiny = 1e-6 * (x3.abs() + z.abs())  # fp32 rounding of code * s + z
    err = (x3 - d3).abs()
    bound = s / 2 * (1 + 1e-3) + tiny
    assert bool((err <= bound).all()), f"max excess {(err - bound).max().item()}"


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("axis", [-1, -2])
def test_scale_zero_rounded_outward(device, dtype, axis):
    # Independent of the reference: zero <= the group's min and zero + 3 * scale >= its max, exactly.
    x = make((2, 3, 45, 40), dtype, device, seed=2) * 300
    G = 8
    q = dlmom.kv_quant2(x, group_size=G, axis=axis)
    R, L, C = reference.canonical_3d(x.shape, axis)
    ng = -(-L // G)
    x3 = torch.nn.functional.pad(x.double().reshape(R, L, C), (0, 0, 0, ng * G - L), value=math.nan)
    x4 = x3.view(R, ng, G, C)
    lo = torch.where(x4.isnan(), math.inf, x4).amin(2)
    hi = torch.where(x4.isnan(), -math.inf, x4).amax(2)
    z, s = q.zero.double().reshape(R, ng, C), q.scale.double().reshape(R, ng, C)
    assert bool((z <= lo).all())
    assert bool((z + 3 * s >= hi).all())


@pytest.mark.parametrize("device", DEVICES)
def test_codes_round_half_to_even_and_pack_lsb_first(device):
    # Hand-made group: min 0, max 3, so scale 1 and code = rint(x); 0.5 -> 0, 1.5 -> 2, 2.5 -> 2.
    x = torch.tensor([0.0, 3.0, 0.5, 1.5, 2.5, 1.0, 2.0, 0.49, 2.0, 1.0], device=device)
    q = dlmom.kv_quant2(x, group_size=8, axis=-1)
    # codes 0 3 0 2 | 2 1 2 0 | then the group [2, 1]: min 1, scale 1/3, codes 3 0 and two zero pads
    assert q.codes.tolist() == [0 | 3 << 2 | 0 << 4 | 2 << 6, 2 | 1 << 2 | 2 << 4 | 0 << 6, 3 | 0 << 2]
    assert q.scale.tolist() == pytest.approx([1.0, 1 / 3]) and q.zero.tolist() == [0.0, 1.0]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape,axis", [((2, 5, 33, 96), -2), ((3, 50), -1), ((130,), -1)])
def test_codes_past_L_are_zero(device, dtype, shape, axis):
    x = make(shape, dtype, device, seed=3) + 5  # positive, so most codes are not 0
    q = dlmom.kv_quant2(x, group_size=32, axis=axis)
    L = shape[axis]
    assert L % 4 != 0
    last = q.codes.select(axis, q.codes.shape[axis] - 1)
    assert bool(((last >> (2 * (L % 4))) == 0).all())


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("axis", [-1, -2])
def test_constant_groups_are_exact(device, dtype, axis):
    # Every group constant (a different constant per group), and the whole tensor constant.
    G = 5
    R, L, C = (6, 23, 3) if axis == -2 else (6 * 3, 23, 1)
    vals = make((R, -(-L // G), C), dtype, device, seed=4)
    x = vals.repeat_interleave(G, dim=1)[:, :L].reshape((6, 23, 3) if axis == -2 else (6, 3, 23))
    q = dlmom.kv_quant2(x, group_size=G, axis=axis)
    assert bool((q.scale == 0).all())
    torch.testing.assert_close(dlmom.kv_dequant2(q), x, rtol=0, atol=0)
    full = torch.full((4, 9, 17), -1.375, dtype=dtype, device=device)
    for g in (1, 4, 32):
        torch.testing.assert_close(dlmom.kv_dequant2(dlmom.kv_quant2(full, group_size=g, axis=axis)), full,
                                   rtol=0, atol=0)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("out_dtype", DTYPES)
@pytest.mark.parametrize("axis", [-1, -2])
def test_round_trips_between_kernel_and_reference(device, dtype, out_dtype, axis):
    x = make((2, 3, 29, 40), dtype, device, seed=5)
    from_ref = reference.kv_quant2(x, group_size=16, axis=axis)
    from_kernel = dlmom.kv_quant2(x, group_size=16, axis=axis)
    for q in (from_ref, from_kernel):
        got = dlmom.kv_dequant2(q, dtype=out_dtype)
        assert got.dtype == out_dtype and got.shape == x.shape
        torch.testing.assert_close(got, reference.kv_dequant2(q, dtype=out_dtype), rtol=0, atol=0)
    # and a QuantizedKV with fp32 scale / zero (not what kv_quant2 makes, but a valid input of kv_dequant2)
    q32 = from_ref._replace(scale=from_ref.scale.float(), zero=from_ref.zero.float())
    torch.testing.assert_close(dlmom.kv_dequant2(q32, dtype=out_dtype),
                               reference.kv_dequant2(q32, dtype=out_dtype), rtol=0, atol=0)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("shape,axis,G", [((2, 4, 1100, 130), -2, 32), ((2, 4, 1100, 130), -2, 7),
                                          ((3, 70001), -1, 7), ((512, 256), -1, 32),
                                          ((4, 9, 3000), -1, 5000)])
def test_large_inputs_split_across_threads(device, shape, axis, G):
    # Big enough for the parallel path: rows cut into segments and columns into blocks.
    x = make(shape, torch.bfloat16, device, seed=6)
    q = dlmom.kv_quant2(x, group_size=G, axis=axis)
    assert_same_quant(q, reference.kv_quant2(x, group_size=G, axis=axis))
    torch.testing.assert_close(dlmom.kv_dequant2(q), reference.kv_dequant2(q), rtol=0, atol=0)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_every_finite_16bit_value(device, dtype):
    # G = 1: each element is its own group, so zero must be the element itself, bit for bit (this covers the
    # CPU's branch-free fp16 -> fp32 load on all finite values, subnormals and -0 included).
    bits = torch.arange(-32768, 32768, dtype=torch.int32).to(torch.int16)
    x = bits.view(dtype)
    x = x[torch.isfinite(x)].to(device)
    q = dlmom.kv_quant2(x, group_size=1, axis=-1)
    assert torch.equal(q.zero.view(torch.int16), x.view(torch.int16))
    assert bool((q.scale == 0).all()) and bool((q.codes == 0).all())
    assert_same_quant(q, reference.kv_quant2(x, group_size=1, axis=-1))
    # pairs (v, -v) in groups of 2: nonzero scales over the whole range, subnormals included (up to half the
    # largest value: beyond it 2|v| overflows fp32 for bf16)
    x = x[x.abs() <= torch.finfo(dtype).max / 2]
    pairs = torch.stack([x, -x], dim=1).reshape(-1)
    assert_same_quant(dlmom.kv_quant2(pairs, group_size=2), reference.kv_quant2(pairs, group_size=2))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("out_dtype", DTYPES)
def test_dequant_stores_like_torch(device, out_dtype):
    # Code 0, scale 0 and fp32 zeros z: the output is z converted to out_dtype, which must be torch's
    # rounding bit for bit (the CPU uses its own branch-free fp16 conversion), over random fp32 bit patterns
    # and dense sweeps of fp16's subnormal, normal and overflow boundaries.
    g = torch.Generator().manual_seed(9)
    rand = torch.randint(-2**31, 2**31 - 1, (1_000_000,), generator=g, dtype=torch.int64).to(torch.int32)
    sweeps = [torch.arange(a - 20000, a + 20000) for a in (0x33000000, 0x38800000, 0x3f800000, 0x477ff000)]
    sweeps.append(torch.arange(0, 20000))
    e = torch.cat(sweeps).to(torch.int32)
    z = torch.cat([rand, e, e | torch.tensor(-2**31, dtype=torch.int32)]).view(torch.float32)
    z = torch.cat([z[~torch.isnan(z)], torch.tensor([math.inf, -math.inf, 65504.0, 65520.0, 65519.996])])
    n = z.numel()
    q = QuantizedKV(torch.zeros(n, 1, dtype=torch.uint8), torch.zeros(n, 1), z.view(n, 1), torch.Size([n, 1]),
                    -1, 1)
    q = QuantizedKV(*(t.to(device) for t in q[:3]), *q[3:])
    got = dlmom.kv_dequant2(q, dtype=out_dtype)
    want = (q.zero + 0.0).to(out_dtype)  # + 0.0: -0 becomes +0, as 0 * scale + zero does
    bits = torch.int32 if out_dtype == torch.float32 else torch.int16
    assert torch.equal(got.view(bits), want.view(bits))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_extreme_ranges(device, dtype):
    big = {torch.float32: 1e37, torch.float16: 8e3, torch.bfloat16: 1e37}[dtype]  # ranges stay finite
    tiny = {torch.float32: 1e-40, torch.float16: 1e-7, torch.bfloat16: 1e-40}[dtype]  # subnormal ranges
    g = torch.Generator().manual_seed(7)
    for s in (big, tiny, 1.0):
        x = (torch.randn(6, 50, generator=g) * s).to(dtype).to(device)
        for axis in (-1, -2):
            q = dlmom.kv_quant2(x, group_size=8, axis=axis)
            want = reference.kv_quant2(x, group_size=8, axis=axis)
            assert_same_quant(q, want)
            torch.testing.assert_close(dlmom.kv_dequant2(q), reference.kv_dequant2(want), rtol=0, atol=0)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("backend", ["auto", "reference"])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("axis", [-1, -2])
@pytest.mark.parametrize("G", [1, 3, 4, 8])
def test_values_near_the_dtype_maximum_stay_finite(device, backend, dtype, axis, G, monkeypatch):
    # Ranges up to 2 * max (max - min overflows fp32 for fp32 / bf16), and tops that a scale rounded up
    # would push past max (fp16: 3 * scale + zero = 65536): every value dequantises finite, within half a
    # step, and the kernel gives the reference's codes, scale and zero bit for bit.
    monkeypatch.setenv("DLMOM_BACKEND", backend)
    m = torch.finfo(dtype).max
    rows = [[-m, m, 0.0, 0.5 * m, -0.7 * m, m, 0.999 * m, -m], [0.0, m, 0.9 * m, 0.5 * m, m, 0.1, 0.3 * m, m],
            [-m, -0.9 * m, -0.5 * m, 0.0, -m, -1.0, -0.25 * m, 0.0], [m, 0.99 * m, 0.999 * m, m, m, m, m, 0.98 * m],
            [-m, 1e-3 * m, 0.6 * m, -0.6 * m, 0.8 * m, -m, 0.75 * m, 0.25 * m]]
    x = torch.tensor(rows, dtype=torch.float64).to(dtype)  # [5, 8]
    x = (x if axis == -1 else x.t().contiguous()).to(device)
    q = dlmom.kv_quant2(x, group_size=G, axis=axis)
    assert_same_quant(q, reference.kv_quant2(x, group_size=G, axis=axis))
    deq = dlmom.kv_dequant2(q)
    assert bool(torch.isfinite(deq).all()), deq
    torch.testing.assert_close(deq, reference.kv_dequant2(q), rtol=0, atol=0)
    assert bool(torch.isfinite(q.scale).all())
    err = (deq.double() - x.double()).abs()
    half_step = per_element(q.scale, q).double().view(x.shape) / 2
    assert bool((err <= half_step * (1 + 1e-3)).all()), (err - half_step).max()


@pytest.mark.parametrize("device", DEVICES)
def test_transposed_input_and_positive_axes(device):
    base = make((2, 64, 40), torch.float16, device, seed=8)
    x = base.transpose(-1, -2)  # [2, 40, 64], last dim strided: Python copies it
    for axis, same in ((-1, 2), (-2, 1)):
        q = dlmom.kv_quant2(x, group_size=16, axis=axis)
        assert_same_quant(q, reference.kv_quant2(x.contiguous(), group_size=16, axis=axis))
        assert_same_quant(dlmom.kv_quant2(x, group_size=16, axis=same), q)  # axis 2 == -1, 1 == -2 on 3-D


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("shape,axis", [((0, 8), -1), ((3, 0), -1), ((2, 0, 4), -2), ((2, 5, 0), -2),
                                        ((0,), -1)])
def test_empty(device, shape, axis):
    x = torch.empty(shape, device=device)
    q = dlmom.kv_quant2(x, group_size=4, axis=axis)
    assert_same_quant(q, reference.kv_quant2(x, group_size=4, axis=axis))
    assert dlmom.kv_dequant2(q).shape == x.shape


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("backend", ["auto", "reference"])
@pytest.mark.parametrize("x,axis", [(torch.empty(3, 0, 16)[..., ::2], -2), (torch.empty(0, 16)[:, ::2], -1),
                                    (torch.empty(2, 5, 0, 9)[..., ::3], -2), (torch.empty(4, 0).t(), -1)])
def test_empty_any_strides(device, backend, x, axis, monkeypatch):
    # An empty tensor is valid whatever its strides; so are empty codes / scale / zero of any strides.
    monkeypatch.setenv("DLMOM_BACKEND", backend)
    x = x.to(device)
    q = dlmom.kv_quant2(x, group_size=4, axis=axis)
    assert_same_quant(q, reference.kv_quant2(x.contiguous(), group_size=4, axis=axis))
    assert dlmom.kv_dequant2(q).shape == x.shape

    def strided(t):  # the same (empty) shape with a stride of 2 on the last dim
        return torch.empty(*t.shape[:-1], 2 * t.shape[-1], dtype=t.dtype, device=device)[..., ::2]

    q2 = q._replace(codes=strided(q.codes), scale=strided(q.scale), zero=strided(q.zero))
    assert dlmom.kv_dequant2(q2).shape == x.shape


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape,axis,G", [((1, 3, 77, 64), -2, 32), ((2, 5, 33, 96), -1, 7),
                                          ((130,), -1, 128)])
def test_nbytes(dtype, shape, axis, G):
    x = make(shape, dtype, "cpu")
    q = dlmom.kv_quant2(x, group_size=G, axis=axis)
    R, L, C = reference.canonical_3d(x.shape, axis)
    want = R * -(-L // 4) * C + 2 * R * -(-L // G) * C * x.element_size()
    assert q.nbytes() == want == reference.kv_quant2(x, group_size=G, axis=axis).nbytes()
    assert q.nbytes() < x.numel() * x.element_size() or G < 8


# ---- errors ----

def test_quant_rejects_bad_inputs():
    x = torch.randn(2, 3, 8, 16)
    with pytest.raises(ValueError, match="kv_quant2: x must be a torch.Tensor"):
        dlmom.kv_quant2([[1.0, 2.0]])
    with pytest.raises(ValueError, match="kv_quant2: x must be one of float32, float16, bfloat16, got int32"):
        dlmom.kv_quant2(torch.ones(4, 8, dtype=torch.int32))
    for axis in (0, 1, "x", True, -3, 4):
        with pytest.raises(ValueError, match="kv_quant2: axis must be -1 .* or -2"):
            dlmom.kv_quant2(x, axis=axis)
    with pytest.raises(ValueError, match="kv_quant2: axis must be -1"):
        dlmom.kv_quant2(torch.randn(2, 2, 3, 8, 16), axis=2)  # on 5-D, 2 is neither -1 nor -2
    with pytest.raises(ValueError, match="kv_quant2: axis=-2 needs x with at least 2 dims"):
        dlmom.kv_quant2(torch.randn(16), axis=-2)
    for G in (0, -1):
        with pytest.raises(ValueError, match=r"kv_quant2: group_size must be in \[1, inf\]"):
            dlmom.kv_quant2(x, group_size=G)
    for G in (2.5, True, 32.0):
        with pytest.raises(ValueError, match="kv_quant2: group_size must be a finite integer"):
            dlmom.kv_quant2(x, group_size=G)
    for bad in (math.nan, math.inf, -math.inf):
        y = x.clone().to(torch.bfloat16)
        y[1, 2, 3, 4] = bad
        with pytest.raises(ValueError, match="kv_quant2: x must be finite, got NaN or inf"):
            dlmom.kv_quant2(y)


def test_dequant_rejects_bad_inputs():
    q = dlmom.kv_quant2(torch.randn(2, 3, 10, 16), group_size=4, axis=-2)
    with pytest.raises(ValueError, match="kv_dequant2: q must be a QuantizedKV from kv_quant2, got tuple"):
        dlmom.kv_dequant2(tuple(q))
    with pytest.raises(ValueError, match="kv_dequant2: q must be a QuantizedKV from kv_quant2, got Tensor"):
        dlmom.kv_dequant2(q.codes)
    for dtype in (int, torch.int32, torch.uint8):
        with pytest.raises(ValueError, match="kv_dequant2: dtype must be float32, float16 or bfloat16"):
            dlmom.kv_dequant2(q, dtype=dtype)
    fit = "kv_dequant2: q's codes .* do not fit shape"
    with pytest.raises(ValueError, match=fit):
        dlmom.kv_dequant2(q._replace(codes=q.codes[..., :2, :]))
    with pytest.raises(ValueError, match=fit):
        dlmom.kv_dequant2(q._replace(scale=q.scale[..., :1, :], zero=q.zero[..., :1, :]))
    with pytest.raises(ValueError, match=fit):
        dlmom.kv_dequant2(q._replace(zero=q.zero[..., :1, :]))
    with pytest.raises(ValueError, match=fit):
        dlmom.kv_dequant2(q._replace(zero=q.zero.half()))
    with pytest.raises(ValueError, match=fit):
        dlmom.kv_dequant2(q._replace(group_size=3))
    with pytest.raises(ValueError, match="kv_dequant2: q.codes must be one of uint8, got int32"):
        dlmom.kv_dequant2(q._replace(codes=q.codes.int()))
    with pytest.raises(ValueError, match="kv_dequant2: q.scale must be one of float32"):
        dlmom.kv_dequant2(q._replace(scale=q.scale.int()))
    with pytest.raises(ValueError, match="kv_dequant2: q.zero must be a torch.Tensor"):
        dlmom.kv_dequant2(q._replace(zero=None))
    for axis in (0, 1, True, "x"):
        with pytest.raises(ValueError, match="kv_dequant2: q.axis must be -1 or -2"):
            dlmom.kv_dequant2(q._replace(axis=axis))
    with pytest.raises(ValueError, match="kv_dequant2: q.shape must have at least 2 dims for axis=-2"):
        dlmom.kv_dequant2(q._replace(shape=torch.Size([16])))
    for G in (0, -4, 2.5, True):
        with pytest.raises(ValueError, match="kv_dequant2: q.group_size must be"):
            dlmom.kv_dequant2(q._replace(group_size=G))


def _buffers(R, L, C, G, dtype, sdtype=None, device="cpu"):
    sdtype = sdtype or dtype
    x = torch.randn(R, L, C, device=device).to(dtype)
    codes = torch.zeros(R, -(-L // 4), C, dtype=torch.uint8, device=device)
    scale = torch.empty(R, -(-L // G), C, dtype=sdtype, device=device)
    return x, codes, scale, torch.empty_like(scale)


@pytest.mark.parametrize("device", DEVICES)
def test_binding_checks_views(device):
    # Direct calls of the bindings with bad views raise ValueError instead of crashing.
    mod = ops.native_module(device)
    if mod is None:
        pytest.skip(f"the {device} kernels are not built")
    kw = {"stream": torch.cuda.current_stream().cuda_stream} if device == "cuda" else {}
    v = ops._view

    def quant(x, G, codes, scale, zero):
        mod.kv_quant2(v(x), G, v(codes), v(scale), v(zero), **kw)

    def dequant(codes, scale, zero, G, out):
        mod.kv_dequant2(v(codes), v(scale), v(zero), G, v(out), **kw)

    x, codes, scale, zero = _buffers(2, 10, 3, 4, torch.float32, device=device)
    quant(x, 4, codes, scale, zero)  # the good call works
    with pytest.raises(ValueError, match="kv_quant2: x must have 3 dims"):
        quant(x.view(2, 30), 4, codes, scale, zero)
    with pytest.raises(ValueError, match="kv_quant2: x must be float32, float16 or bfloat16, got int32"):
        quant(x.int(), 4, codes, scale, zero)
    with pytest.raises(ValueError, match="kv_quant2: codes must be uint8, got float32"):
        quant(x, 4, codes.float(), scale, zero)
    with pytest.raises(ValueError, match=r"kv_quant2: codes must have shape \[2, 3, 3\], got \[2, 2, 3\]"):
        quant(x, 4, codes[:, :2].contiguous(), scale, zero)
    with pytest.raises(ValueError, match=r"kv_quant2: scale must have shape \[2, 2, 3\]"):
        quant(x, 5, codes, scale, zero)
    with pytest.raises(ValueError, match="kv_quant2: group_size must be >= 1, got 0"):
        quant(x, 0, codes, scale, zero)
    with pytest.raises(ValueError, match="kv_quant2: scale must be float32 or x's dtype float32, got fl"):
        quant(x, 4, codes, scale.half(), zero.half())
    with pytest.raises(ValueError, match="kv_quant2: zero must be float32, got bfloat16"):
        quant(x, 4, codes, scale, zero.bfloat16())
    with pytest.raises(ValueError, match="kv_quant2: x must be dense in its last two dims"):
        quant(torch.randn(2, 10, 5, device=device)[:, :, :3], 4, codes, scale, zero)
    with pytest.raises(ValueError, match="kv_quant2: x is a null pointer"):
        mod.kv_quant2((0, 0, (2, 10, 3), (30, 3, 1)), 4, v(codes), v(scale), v(zero), **kw)
    out = torch.empty(2, 10, 3, device=device)
    dequant(codes, scale, zero, 4, out)
    with pytest.raises(ValueError, match="kv_dequant2: out must be float32, float16 or bfloat16, got int64"):
        dequant(codes, scale, zero, 4, out.long())
    with pytest.raises(ValueError, match=r"kv_dequant2: codes must have shape \[2, 3, 3\]"):
        dequant(codes[:, :2].contiguous(), scale, zero, 4, out)
    with pytest.raises(ValueError, match="kv_dequant2: zero must be float32, got float16"):
        dequant(codes, scale, zero.half(), 4, out)
    with pytest.raises(ValueError, match="kv_dequant2: group_size must be >= 1, got -2"):
        dequant(codes, scale, zero, -2, out)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("C", [1, 5])
def test_binding_strided_rows(device, C):
    # The C++ API takes rows (dim 0) with any stride: slices of wider buffers give the same results as the
    # contiguous call (which may treat all rows as one).
    mod = ops.native_module(device)
    if mod is None:
        pytest.skip(f"the {device} kernels are not built")
    kw = {"stream": torch.cuda.current_stream().cuda_stream} if device == "cuda" else {}
    v = ops._view
    R, L, G = 6, 64, 16
    x, codes, scale, zero = _buffers(R, L, C, G, torch.bfloat16, device=device)
    mod.kv_quant2(v(x), G, v(codes), v(scale), v(zero), **kw)

    def wide(t):  # same values, rows further apart
        w = torch.zeros(t.shape[0], t.shape[1] + 3, t.shape[2], dtype=t.dtype, device=t.device)
        w[:, : t.shape[1]] = t
        return w[:, : t.shape[1]]

    xs, cs, ss, zs = (wide(t) for t in (x, codes * 0, scale * 0, zero * 0))
    mod.kv_quant2(v(xs), G, v(cs), v(ss), v(zs), **kw)
    assert torch.equal(cs, codes) and torch.equal(ss, scale) and torch.equal(zs, zero)
    out, outs = torch.empty_like(x), wide(torch.zeros_like(x))
    mod.kv_dequant2(v(codes), v(scale), v(zero), G, v(out), **kw)
    mod.kv_dequant2(v(cs), v(ss), v(zs), G, v(outs), **kw)
    assert torch.equal(outs, out)


def test_fp32_scale_for_16bit_input_uses_the_fp32_rule():
    # The C++ API also takes fp32 scale / zero for fp16 / bf16 x: no outward rounding then, as
    # reference.kv_scale_zero(mn, mx, torch.float32) does.
    mod = ops.native_module("cpu")
    for dtype in (torch.float16, torch.bfloat16):
        x, codes, scale, zero = _buffers(3, 45, 5, 8, dtype, torch.float32)
        mod.kv_quant2(ops._view(x), 8, ops._view(codes), ops._view(scale), ops._view(zero))
        xf = torch.nn.functional.pad(x.float(), (0, 0, 0, 3), value=math.nan).view(3, 6, 8, 5)
        lo = torch.where(xf.isnan(), math.inf, xf).amin(2)
        hi = torch.where(xf.isnan(), -math.inf, xf).amax(2)
        want_scale, want_zero = reference.kv_scale_zero(lo, hi, torch.float32)
        torch.testing.assert_close(zero, want_zero, rtol=0, atol=0)
        torch.testing.assert_close(scale, want_scale, rtol=0, atol=0)
        q = QuantizedKV(codes, scale, zero, x.shape, -2, 8)
        deq = dlmom.kv_dequant2(q)  # fp32, within half a step
        assert bool(((deq - x.float()).abs() <= per_element(scale, q) / 2 * (1 + 1e-3) + 1e-6).all())


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("field", ["codes", "scale", "zero"])
def test_noncontiguous_fields_outlive_the_kernel(device, field):
    # Regression (use-after-free): a non-contiguous codes / scale / zero is copied for the kernel; the copy
    # used to be freed before the kernel read it.
    q = dlmom.kv_quant2(make((3, 40, 24), torch.float32, device, seed=9), group_size=8, axis=-2)
    want = reference.kv_dequant2(q)
    t = getattr(q, field)
    strided = torch.empty(*t.shape[:-1], t.shape[-1] * 2, dtype=t.dtype, device=device)[..., ::2]
    strided.copy_(t)
    q2 = q._replace(**{field: strided})
    for _ in range(3):
        junk = [torch.full_like(t, 77) for _ in range(4)]
        got = dlmom.kv_dequant2(q2)
        del junk
        torch.testing.assert_close(got, want, rtol=0, atol=0)
