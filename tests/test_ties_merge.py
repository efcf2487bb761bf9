"""ties_merge kernels vs dlmom.reference.ties_merge (shape x dtype x layout x device), edge cases, errors."""
import math

import pytest
import torch

import dlmom
from conftest import DEVICES, DTYPES, HAS_CUDA, TOL, layout
from dlmom import ops, reference

NEG_INF = -math.inf
# Inputs become fp32 exactly and both sides compute in fp32, so every input dtype is held to fp32 tolerances.
ATOL_RTOL = TOL[torch.float32]


def grid_logits(E, B, V, *, dtype=torch.float32, device="cpu", seed=0):
    """[E, B, V] logits on a 1/8 grid in [-8, 8]: exact in fp16/bf16, and every row sum is exact in fp32 in
    any order (|sum| * 8 < 2^24), so the kernel's means equal the reference's bit for bit and trimming at
    theta cannot flip on rounding."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(-64, 65, (E, B, V), generator=g).float() / 8
    return x.to(dtype=dtype, device=device)


def add_masks(x):
    """Expert 0 masks one token of row 0; the last expert's last row is -inf except its last two tokens."""
    V = x.shape[-1]
    x[0, 0, V // 2] = NEG_INF
    x[-1, -1, : V - 2] = NEG_INF
    return x


def check(x, **kw):
    got = dlmom.ties_merge(x, **kw)
    want = reference.ties_merge(x, **kw)
    assert got.dtype == torch.float32 and got.shape == x.shape[1:] and got.device == x.device
    torch.testing.assert_close(got, want, **ATOL_RTOL)
    return got


# ---- kernel vs reference ----

@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("E", [1, 2, 3, 5])
@pytest.mark.parametrize("B", [1, 5])
@pytest.mark.parametrize("V", [7, 1000])
@pytest.mark.parametrize("contiguous", [True, False])
@pytest.mark.parametrize("elect", ["vote", "mass"])
@pytest.mark.parametrize("theta", [0.0, 0.75])
def test_matches_reference(device, dtype, E, B, V, contiguous, elect, theta):
    if not contiguous and E * B == 1:
        pytest.skip("an [1, 1, V] view is contiguous whatever its strides")
    x = add_masks(grid_logits(E, B, V, dtype=dtype, device=device, seed=E * 100 + B * 10 + V))
    check(layout(x, contiguous), theta=theta, elect=elect)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("E,B,V", [(3, 1, 50257), (2, 2, 151936)])
@pytest.mark.parametrize("contiguous", [True, False])
def test_vocab_sizes(device, dtype, E, B, V, contiguous):
    x = add_masks(grid_logits(E, B, V, dtype=dtype, device=device))
    check(layout(x, contiguous), theta=0.5, elect="vote")


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("elect", ["vote", "mass"])
@pytest.mark.parametrize("theta", [0.0, 0.3])
def test_random_logits_with_offset(device, dtype, elect, theta):
    # Off-grid logits around a large offset, like an LM's: rounding of the mean differs from the reference
    # by ~1e-6, far below the spacing of the values near theta and 0.
    g = torch.Generator().manual_seed(1)
    x = (torch.randn(4, 3, 2000, generator=g) * 2 - 12).to(dtype=dtype, device=device)
    check(x, theta=theta, elect=elect)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("elect", ["vote", "mass"])
@pytest.mark.parametrize("E", [9, 12])
def test_many_experts_generic_path(device, dtype, elect, E):
    # E > 8 leaves the unrolled kernels for the runtime-E loop.
    x = add_masks(grid_logits(E, 3, 301, dtype=dtype, device=device))
    check(layout(x, False), theta=0.25, elect=elect, weights=torch.rand(E, device=device))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("elect", ["vote", "mass"])
def test_random_weights(device, dtype, elect):
    x = add_masks(grid_logits(4, 3, 999, dtype=dtype, device=device))
    w = torch.rand(4, generator=torch.Generator().manual_seed(3)).to(device)
    check(x, theta=0.5, elect=elect, weights=w)
    check(x, theta=0.0, elect=elect, weights=w.to(dtype))  # fp16/bf16 weights are accepted too


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("shift", [1, 3])
def test_unaligned_rows(device, dtype, shift):
    # Rows that start off a 16-byte boundary, each expert at a different phase: the vector loads must fall
    # back to scalar ones.
    E, B, V = 3, 4, 517
    x = add_masks(grid_logits(E, B, V, dtype=dtype, device=device))
    wide = torch.zeros(E, B, V + 13, dtype=dtype, device=device)
    wide[..., shift: shift + V] = x
    check(wide[..., shift: shift + V], theta=0.5, elect="mass")


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_expert_stride_smaller_than_row_stride(device, dtype):
    # [B, E, V] storage seen as [E, B, V]: the E stride is V and the B stride E * V.
    x = add_masks(grid_logits(3, 4, 263, dtype=dtype, device=device))
    xt = x.transpose(0, 1).contiguous().transpose(0, 1)
    assert xt.stride() == (263, 3 * 263, 1)
    got = check(xt, theta=0.5, elect="vote")
    torch.testing.assert_close(got, dlmom.ties_merge(x, theta=0.5, elect="vote"), atol=0, rtol=0)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("contiguous", [True, False])
def test_leading_dims(device, contiguous):
    x = add_masks(grid_logits(3, 6, 129, device=device)).view(3, 2, 3, 129)
    x = layout(x, contiguous)
    got = check(x, theta=0.5, elect="mass")
    assert got.shape == (2, 3, 129)
    flat = dlmom.ties_merge(x.reshape(3, 6, 129), theta=0.5, elect="mass")
    torch.testing.assert_close(got, flat.view(2, 3, 129), atol=0, rtol=0)


@pytest.mark.parametrize("device", DEVICES)
def test_empty_batch(device):
    x = torch.zeros(2, 0, 11, device=device)
    out = dlmom.ties_merge(x)
    assert out.shape == (0, 11) and out.dtype == torch.float32


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("backend", ["auto", "reference"])
@pytest.mark.parametrize("logits", [torch.zeros(2, 0, 22)[..., ::2], torch.zeros(11, 0, 2).transpose(0, 2),
                                    torch.zeros(3, 2, 0, 11), torch.zeros(2, 4, 0, 33)[..., ::3]])
def test_empty_batch_any_strides(device, backend, logits, monkeypatch):
    # B = 0 is valid whatever the strides and leading dims: an empty [..., V] result.
    monkeypatch.setenv("DLMOM_BACKEND", backend)
    out = dlmom.ties_merge(logits.to(device), theta=0.5, weights=torch.ones(logits.shape[0], device=device))
    assert out.shape == logits.shape[1:] and out.dtype == torch.float32


# ---- semantics, checked against hand-computed values ----

@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_theta_boundary_is_kept(device, dtype):
    # Row 0..7 has mean 3.5 exactly, so v = -3.5 .. 3.5 in steps of 1: |v| == 1.5 is kept, 0.5 trimmed.
    x = torch.arange(8, dtype=dtype, device=device).view(1, 1, 8)
    got = dlmom.ties_merge(x, theta=1.5)
    want = torch.tensor([[-3.5, -2.5, -1.5, 0.0, 0.0, 1.5, 2.5, 3.5]], device=device)
    torch.testing.assert_close(got, want, atol=0, rtol=0)
    got = dlmom.ties_merge(x, theta=1.5000001)  # just above: 1.5 goes too
    want = torch.where(want.abs() > 1.5, want, torch.zeros_like(want))
    torch.testing.assert_close(got, want, atol=0, rtol=0)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("elect", ["vote", "mass"])
def test_opposite_experts_tie_to_zero(device, elect):
    x = grid_logits(1, 3, 100, device=device)
    x = torch.cat([x, -x])  # v_1 = -v_0 everywhere: the vote (1 - 1) and the mass (v - v) are 0
    zeros = torch.zeros(3, 100, device=device)
    torch.testing.assert_close(dlmom.ties_merge(x, elect=elect), zeros, atol=0, rtol=0)


@pytest.mark.parametrize("device", DEVICES)
def test_vote_tie_between_two_pairs(device):
    # Four experts, per token two positive and two negative: a tie, whatever the magnitudes.
    v = torch.tensor([[1.0, 2.0, -1.0, -4.0], [3.0, 5.0, -2.0, -6.0]], device=device).T  # [E=4, V=2]
    x = torch.cat([v, -v.sum(-1, keepdim=True)], -1).unsqueeze(1)  # a balancing token makes each mean 0
    got = dlmom.ties_merge(x, elect="vote")
    torch.testing.assert_close(got[0, :2], torch.zeros(2, device=device), atol=0, rtol=0)


@pytest.mark.parametrize("device", DEVICES)
def test_vote_and_mass_elect_differently(device):
    # Token 0: two experts at +1, one at -6. Vote elects + (mean of the two +1), mass elects - (the -6).
    # Token 1 balances every row to mean 0.
    x = torch.tensor([[1.0, -1.0], [1.0, -1.0], [-6.0, 6.0]], device=device).view(3, 1, 2)
    vote = dlmom.ties_merge(x, elect="vote")
    mass = dlmom.ties_merge(x, elect="mass")
    torch.testing.assert_close(vote, torch.tensor([[1.0, -1.0]], device=device), atol=0, rtol=0)
    torch.testing.assert_close(mass, torch.tensor([[-6.0, 6.0]], device=device), atol=0, rtol=0)
    # A weight of 8 on expert 0 turns the mass around: 8 + 1 - 6 > 0, merged (8 * 1 + 1 * 1) / 9 = 1.
    w = torch.tensor([8.0, 1.0, 1.0], device=device)
    torch.testing.assert_close(dlmom.ties_merge(x, elect="mass", weights=w),
                               torch.tensor([[1.0, -1.0]], device=device), atol=0, rtol=0)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("elect", ["vote", "mass"])
def test_zero_weight_is_an_absent_expert(device, dtype, elect):
    x = grid_logits(4, 3, 257, dtype=dtype, device=device)
    w = torch.tensor([0.5, 0.0, 2.0, 1.0], device=device)
    got = dlmom.ties_merge(x, theta=0.25, elect=elect, weights=w)
    keep = [0, 2, 3]
    without = dlmom.ties_merge(x[keep], theta=0.25, elect=elect, weights=w[keep])
    torch.testing.assert_close(got, without, atol=0, rtol=0)
    check(x, theta=0.25, elect=elect, weights=w)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("elect", ["vote", "mass"])
def test_unit_weights_equal_no_weights(device, elect):
    x = grid_logits(3, 2, 100, device=device)
    torch.testing.assert_close(dlmom.ties_merge(x, elect=elect, weights=torch.ones(3, device=device)),
                               dlmom.ties_merge(x, elect=elect), atol=0, rtol=0)
    # Scaling every weight by a power of two changes nothing either.
    torch.testing.assert_close(dlmom.ties_merge(x, elect=elect, weights=torch.full((3,), 4.0, device=device)),
                               dlmom.ties_merge(x, elect=elect), atol=0, rtol=0)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("contiguous", [True, False])
def test_single_expert_at_theta_zero_is_centred_logits(device, dtype, contiguous):
    x = add_masks(grid_logits(1, 4, 333, dtype=dtype, device=device))
    got = dlmom.ties_merge(layout(x, contiguous))
    xf = x[0].float()
    finite = torch.isfinite(xf)
    mean = torch.where(finite, xf, 0.0).sum(-1, keepdim=True) / finite.sum(-1, keepdim=True)
    torch.testing.assert_close(got, torch.where(finite, xf - mean, xf), **ATOL_RTOL)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("elect", ["vote", "mass"])
@pytest.mark.parametrize("n", [2, 3, 5])
def test_identical_experts_equal_one(device, dtype, elect, n):
    x = add_masks(grid_logits(1, 3, 400, dtype=dtype, device=device))
    one = dlmom.ties_merge(x, theta=0.5, elect=elect)
    for same in (x.expand(n, -1, -1), x.repeat(n, 1, 1)):  # a zero E stride, then n copies
        torch.testing.assert_close(dlmom.ties_merge(same, theta=0.5, elect=elect), one, **ATOL_RTOL)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_neg_inf_masks(device, dtype):
    x = grid_logits(3, 3, 50, dtype=dtype, device=device)
    x[1, 0, 7] = NEG_INF  # one expert masks one token
    x[2, 1, :-3] = NEG_INF  # a row that is -inf except three tokens
    x[0, 2, :] = NEG_INF  # a row with no finite logit at all
    got = check(x, theta=0.25)
    assert got[0, 7] == NEG_INF and torch.isfinite(got[0, :7]).all() and torch.isfinite(got[0, 8:]).all()
    assert (got[1, :-3] == NEG_INF).all() and torch.isfinite(got[1, -3:]).all()
    assert (got[2] == NEG_INF).all()
    # The mask does not leak into the mean: alone, the three finite tokens of row (2, 1) are centred on
    # their own mean.
    alone = dlmom.ties_merge(x[2:, 1:2])[0]
    tail = x[2, 1, -3:].float()
    torch.testing.assert_close(alone[-3:], tail - tail.mean(), **ATOL_RTOL)
    assert (alone[:-3] == NEG_INF).all()


def merge_float64(x, theta, elect, weights):
    """The spec in float64 (no overflow, no clamp), for inputs whose fp32 means are exact (grid_logits)."""
    x = x.double()
    finite = torch.isfinite(x)
    mean = torch.where(finite, x, 0.0).sum(-1, keepdim=True) / finite.sum(-1, keepdim=True).clamp(min=1)
    v = torch.where(finite, x - mean, 0.0)
    v = torch.where(v.abs() >= theta, v, 0.0)
    w = weights.double().view(-1, *([1] * (x.dim() - 1)))
    s = torch.sign(v)
    elected = torch.sign((w * s).sum(0) if elect == "vote" else (w * v).sum(0))
    agree = (s == elected) & (elected != 0)
    num = torch.where(agree, w * v, 0.0).sum(0)
    den = torch.where(agree, w.expand_as(v), 0.0).sum(0)
    merged = torch.where(den > 0, num / torch.where(den > 0, den, 1.0), 0.0)
    return torch.where((x == NEG_INF).any(0), NEG_INF, merged)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("backend", ["auto", "reference"])
@pytest.mark.parametrize("elect", ["vote", "mass"])
@pytest.mark.parametrize("weights", [[2 ** 127, 2 ** 127, 2 ** 124, 2 ** 126], [2 ** -120, 2 ** -120, 0, 2 ** -122],
                                     [2 ** -149, 0, 0, 0], [2 ** -130, 2 ** -133, 2 ** -128, 0], [0, 0, 0, 0]])
def test_extreme_weights(device, backend, elect, weights, monkeypatch):
    # Only the ratios of the weights matter: huge ones must not overflow the weighted sums, tiny ones must
    # not fall under a clamp of the denominator. (Powers of two and V = 64 keep every sum exact.)
    monkeypatch.setenv("DLMOM_BACKEND", backend)
    x = grid_logits(4, 3, 64, device=device, seed=4)
    x[-1, -1, :62] = NEG_INF
    w = torch.tensor(weights, dtype=torch.float64).float().to(device)
    got = check(x, theta=0.25, elect=elect, weights=w)
    torch.testing.assert_close(got, merge_float64(x, 0.25, elect, w).float(), **ATOL_RTOL)
    assert not bool(torch.isnan(got).any())


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("backend", ["auto", "reference"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("elect", ["vote", "mass"])
def test_logits_up_to_the_magnitude_limit(device, backend, dtype, elect, monkeypatch):
    # |logits| up to 2^96: the fp32 sums cannot overflow, the result is the float64 one.
    monkeypatch.setenv("DLMOM_BACKEND", backend)
    x = grid_logits(3, 2, 64, device=device, seed=5) * 2.0 ** 93  # |x| <= 8 * 2^93
    x[-1, -1, :62] = NEG_INF
    x[0, 0, 1], x[1, 0, 1], x[2, 1, 63] = 2.0 ** 96, -(2.0 ** 96), -(2.0 ** 96)
    x = x.to(dtype)
    w = torch.tensor([2.0 ** 127, 2.0 ** 125, 2.0 ** 126], device=device)
    got = check(x, theta=2.0 ** 90, elect=elect, weights=w)
    assert bool(torch.isfinite(got[got != NEG_INF]).all())
    torch.testing.assert_close(got, merge_float64(x, 2.0 ** 90, elect, w).float(), **ATOL_RTOL)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("backend", ["auto", "reference"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("big", [2.0 ** 97, -(2.0 ** 97), 1e30, -3e38])
def test_logits_beyond_the_magnitude_limit_are_refused(device, backend, dtype, big, monkeypatch):
    monkeypatch.setenv("DLMOM_BACKEND", backend)
    x = grid_logits(3, 4, 300, dtype=dtype, device=device)
    x[1, 2, 7] = big
    x[0, 1, :] = NEG_INF  # -inf is fine
    with pytest.raises(ValueError, match=r"ties_merge: logits must be -inf or finite with \|x\| <= 2\^96"):
        dlmom.ties_merge(layout(x, False))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("elect", ["vote", "mass"])
def test_election_sums_experts_in_order_without_fma(device, elect):
    # The scores and means over experts are fp32 sums in expert order with every product rounded (no fma),
    # in the kernels and the reference alike, so even an election decided by rounding agrees.
    # Found by tests/test_fuzz_ops.py (vote): weights 3e38, 1, 3e38 -> ratios beyond 2^24, and E = 9 (the generic
    # kernel), where torch's sum over experts took another order than the kernel.
    g = torch.Generator().manual_seed(0)
    x = (torch.randint(-64, 65, (9, 2), generator=g).double() / 8).float().to(device)
    w = torch.tensor([0.0] * 6 + [3e38, 1.0, 3e38], device=device)
    torch.testing.assert_close(dlmom.ties_merge(x, elect=elect, weights=w),
                               reference.ties_merge(x, elect=elect, weights=w), atol=0, rtol=0)
    # (mass) 0.5 * c + 0.05 * 3 with c = -2 * fl(0.05 * 3): 0 with the product rounded, its rounding error with
    # an fma; each expert's row is [a, -a], so v = x exactly.
    r = torch.tensor(0.05, dtype=torch.float32) * 3  # fl(0.05f * 3)
    assert float(r.double()) != 0.05 * 3 and float(torch.tensor(0.1, dtype=torch.float32)) / 2 == float(
        torch.tensor(0.05, dtype=torch.float32)), "the product must be inexact for this case to test anything"
    c = float(-2 * r)
    x = torch.tensor([[[c, -c]], [[3.0, -3.0]]], device=device)  # [E=2, B=1, V=2]
    w = torch.tensor([1.0, 0.1], device=device)  # scaled by 1/2: 0.5 and 0.05 exactly
    got = dlmom.ties_merge(x, elect=elect, weights=w)
    torch.testing.assert_close(got, reference.ties_merge(x, elect=elect, weights=w), atol=0, rtol=0)
    if elect == "mass":
        torch.testing.assert_close(got, torch.zeros(1, 2, device=device), atol=0, rtol=0)  # a tie


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("backend", ["auto", "reference"])
@pytest.mark.parametrize("theta", [1e300, 3.5e38, 3.4e38])
def test_theta_beyond_float32_trims_everything(device, backend, theta, monkeypatch):
    # theta is a float32 in the kernels: beyond 3.4e38 it is inf, which trims every v (the kernels refused it
    # before, "got inf", while the reference merged).
    monkeypatch.setenv("DLMOM_BACKEND", backend)
    x = add_masks(grid_logits(3, 2, 40, device=device))
    got = check(x, theta=theta)
    torch.testing.assert_close(got, torch.where(x.isinf().any(0), NEG_INF, 0.0), atol=0, rtol=0)


# ---- errors ----

def _x(device="cpu"):
    return torch.randn(3, 2, 17, device=device)


@pytest.mark.parametrize("kwargs,match", [
    (dict(theta=-0.1), "theta must be in"),
    (dict(theta=math.nan), "theta must be a finite number"),
    (dict(theta=math.inf), "theta must be a finite number"),
    (dict(theta="0.5"), "theta must be a finite number"),
    (dict(theta=True), "theta must be a finite number"),
    (dict(elect="foo"), "elect must be 'vote' or 'mass'"),
    (dict(weights=torch.ones(4)), r"weights must have shape \[E=3\]"),
    # [E] or [E, B] (per row): any other shape is refused.
    (dict(weights=torch.ones(3, 1)), r"weights must have shape \[E=3\] or logits.shape\[:-1\] = \[3, 2\] "
                                     r"\(per row\), got \(3, 1\)"),
    (dict(weights=torch.ones(3, 2, 1)), r"weights must have shape \[E=3\] or .*, got \(3, 2, 1\)"),
    (dict(weights=torch.ones(2, 3)), r"weights must have shape \[E=3\] or .*, got \(2, 3\)"),
    (dict(weights=torch.ones(3, dtype=torch.int64)), "weights must be one of float32"),
    (dict(weights=[1.0, 1.0, 1.0]), "weights must be a torch.Tensor"),
    (dict(weights=torch.tensor([1.0, -0.5, 1.0])), "weights must be finite and >= 0"),
    (dict(weights=torch.tensor([1.0, math.nan, 1.0])), "weights must be finite and >= 0"),
    (dict(weights=torch.tensor([1.0, math.inf, 1.0])), "weights must be finite and >= 0"),
])
def test_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        dlmom.ties_merge(_x(), **kwargs)


@pytest.mark.parametrize("logits,match", [
    (torch.randn(17), "logits must have at least 2 dims"),
    (torch.randint(0, 5, (3, 2, 17)), "logits must be one of float32"),
    (torch.randn(3, 2, 17).double(), "logits must be one of float32"),
    ([[1.0, 2.0]], "logits must be a torch.Tensor"),
    (torch.randn(0, 2, 17), r"logits must be \[E >= 1, \.\.\., V >= 1\]"),
    (torch.randn(3, 2, 0), r"logits must be \[E >= 1, \.\.\., V >= 1\]"),
])
def test_bad_logits(logits, match):
    with pytest.raises(ValueError, match=match):
        dlmom.ties_merge(logits)


@pytest.mark.skipif(not HAS_CUDA, reason="no CUDA GPU on this machine")
def test_weights_on_another_device():
    with pytest.raises(ValueError, match="all tensors must be on one device"):
        dlmom.ties_merge(_x(), weights=torch.ones(3, device="cuda"))
    with pytest.raises(ValueError, match="all tensors must be on one device"):
        dlmom.ties_merge(_x("cuda"), weights=torch.ones(3))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("bad", [math.nan, math.inf])
@pytest.mark.parametrize("where", ["plain", "with_neg_inf", "whole_row"])
def test_nan_and_pos_inf_logits_are_rejected(device, dtype, bad, where):
    # The kernel flags them through its row means; the row sits in the middle of [E, B] on purpose.
    x = grid_logits(3, 4, 300, dtype=dtype, device=device)
    if where == "plain":
        x[1, 2, 123] = bad
    elif where == "with_neg_inf":
        x[1, 2, :200] = NEG_INF
        x[1, 2, 250] = bad
    else:
        x[1, 2, :] = bad
    with pytest.raises(ValueError, match="logits must be finite or -inf, got NaN or \\+inf"):
        dlmom.ties_merge(layout(x, False), elect="mass")


def test_means_flag_bad_rows_exactly():
    # The kernels' check relies on this: a row's mean is non-finite iff it holds NaN or +inf. The C++ kernel
    # then raises, after writing the means.
    mod = ops.native_module("cpu")
    x = grid_logits(2, 5, 40000)  # rows longer than one work chunk of the CPU kernel
    x[0, 1, 39999] = math.inf
    x[1, 3, 5] = math.nan
    x[0, 4, :] = NEG_INF  # -inf alone is fine: mean 0
    x[1, 0, :-1] = NEG_INF
    means, out = torch.empty(2, 5), torch.empty(5, 40000)
    with pytest.raises(ValueError, match=r"ties_merge: logits must be finite or -inf, got NaN or \+inf"):
        mod.ties_merge(ops._view(x), None, 0.0, 0, ops._view(means), ops._view(out))
    bad = ~torch.isfinite(means)
    assert bad.nonzero().tolist() == [[0, 1], [1, 3]]
    assert means[0, 4] == 0 and means[1, 0] == x[1, 0, -1]
    finite = torch.isfinite(x)
    want = torch.where(finite, x, 0.0).sum(-1) / finite.sum(-1).clamp(min=1)
    torch.testing.assert_close(means[~bad], want[~bad], **ATOL_RTOL)


# ---- the binding checks again ----

def _views(E=3, B=2, V=17, *, dtype=torch.float32):
    x = torch.randn(E, B, V).to(dtype)
    return x, torch.empty(E, B), torch.empty(B, V)


@pytest.mark.parametrize("case,match", [
    ("logits_2d", "logits must have 3 dims"),
    ("logits_int", "logits must be float32, float16 or bfloat16"),
    ("logits_strided_last", "logits must have unit stride on its last dim"),
    ("theta_negative", "theta must be a finite number >= 0"),
    ("theta_nan", "theta must be a finite number >= 0"),
    ("elect_2", r"elect must be 0 \(vote\) or 1 \(mass\)"),
    ("weights_size", r"weights must have shape \[E=3\]"),
    ("weights_f16", "weights must be float32"),
    ("weights_negative", "weights must be finite and >= 0"),
    ("means_shape", r"means must have shape \[3, 2\]"),
    ("out_shape", r"out must have shape \[2, 17\]"),
    ("out_dtype", "out must be float32"),
    ("null_logits", "logits is a null pointer"),
])
def test_binding_rejects_bad_views(case, match):
    mod = ops.native_module("cpu")
    x, means, out = _views()
    alive = []  # the views below hold raw pointers: their tensors must outlive the call

    def v(t):
        alive.append(t)
        return ops._view(t)

    lv, wv, theta, elect, mv, ov = v(x), None, 0.0, 0, v(means), v(out)
    if case == "logits_2d":
        lv = v(x[0])
    elif case == "logits_int":
        lv = v(torch.zeros(3, 2, 17, dtype=torch.int32))
    elif case == "logits_strided_last":
        lv = (x.data_ptr(), 0, (3, 2, 9), (34, 17, 2))
    elif case == "theta_negative":
        theta = -1.0
    elif case == "theta_nan":
        theta = math.nan
    elif case == "elect_2":
        elect = 2
    elif case == "weights_size":
        wv = v(torch.ones(4))
    elif case == "weights_f16":
        wv = v(torch.ones(3, dtype=torch.float16))
    elif case == "weights_negative":
        wv = v(torch.tensor([1.0, -1.0, 1.0]))
    elif case == "means_shape":
        mv = v(torch.empty(2, 3))
    elif case == "out_shape":
        ov = v(torch.empty(2, 16))
    elif case == "out_dtype":
        ov = v(torch.empty(2, 17, dtype=torch.float16))
    elif case == "null_logits":
        lv = (0, 0, (3, 2, 17), (34, 17, 1))
    with pytest.raises(ValueError, match="ties_merge: " + match):
        mod.ties_merge(lv, wv, theta, elect, mv, ov)


@pytest.mark.parametrize("case, match", [
    ("means in logits", "means must not overlap logits"),
    ("out in logits", "out must not overlap logits"),
    ("out over means", "out must not overlap means"),
    ("weights in out", "out must not overlap weights"),
])
def test_binding_refuses_overlapping_outputs(case, match):
    # Outputs that share memory with an input or with each other: refused (dlmom.ops never passes them).
    mod = ops.native_module("cpu")
    x, means, out = _views()
    w = torch.ones(3)
    if case == "means in logits":
        means = x.view(-1)[:6].view(3, 2)
    elif case == "out in logits":
        out = x[0]
    elif case == "out over means":
        means = out.view(-1)[:6].view(3, 2)
    else:
        w = out.view(-1)[:3]
    with pytest.raises(ValueError, match="ties_merge: " + match):
        mod.ties_merge(ops._view(x), ops._view(w), 0.0, 0, ops._view(means), ops._view(out))


# ---- per-row weights [E, B] ----

@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("elect", ["vote", "mass"])
@pytest.mark.parametrize("wdtype", [torch.float32, torch.float16, torch.bfloat16])
def test_row_weights_match_one_call_per_row(device, dtype, elect, wdtype):
    # [E, B] weights: row b merges exactly as a call with weights[:, b] alone, bit for bit; strided logits
    # and weights, rows of all-zero and tiny / huge weights, B odd.
    E, B, V = 3, 5, 301
    g = torch.Generator().manual_seed(7)
    x = layout(grid_logits(E, B, V, dtype=dtype, device=device), False)
    w = torch.rand(B, E, generator=g).to(device).T  # [E, B], not contiguous
    w[:, 1] = 0
    w[:, 2] *= 2.0 ** -120
    w[0, 3] = 0
    w = w.to(wdtype)
    merged = dlmom.ties_merge(x, theta=0.05, elect=elect, weights=w)
    for b in range(B):
        one = dlmom.ties_merge(x[:, b:b + 1], theta=0.05, elect=elect, weights=w[:, b].clone())
        assert torch.equal(merged[b], one[0]), b
    want = reference.ties_merge(x, theta=0.05, elect=elect, weights=w)
    assert torch.equal(merged, want)


def test_row_weights_over_several_lead_dims():
    x = torch.randn(3, 2, 4, 33)
    w = torch.rand(3, 2, 4)
    merged = dlmom.ties_merge(x, weights=w)
    assert torch.equal(merged.view(8, 33), dlmom.ties_merge(x.reshape(3, 8, 33), weights=w.reshape(3, 8)))


@pytest.mark.parametrize("bad", [-1.0, math.nan, math.inf])
def test_bad_row_weight_names_the_weights(bad):
    w = torch.ones(3, 2)
    w[1, 1] = bad
    with pytest.raises(ValueError, match=r"ties_merge: weights must be finite and >= 0, got \[\[1\.0, 1\.0\], "
                                         rf"\[1\.0, {bad}\], \[1\.0, 1\.0\]\]"):
        dlmom.ties_merge(_x(), weights=w)


def test_weights_message_prints_values_as_python_does():
    # The C++ kernel formats the weights as Tensor.tolist() would.
    w = torch.tensor([0.1, 1e-5, 1e16, 123456.789, -0.0, 3e-45, -2.5])
    with pytest.raises(ValueError) as info:
        dlmom.ties_merge(torch.randn(7, 1, 4), weights=w)
    assert str(info.value) == f"ties_merge: weights must be finite and >= 0, got {w.tolist()}"


def test_consensus_merge_is_one_call_for_row_weights(monkeypatch):
    from dlmom import consensus
    x = torch.randn(3, 4, 50)
    w = torch.rand(3, 4)
    calls = []
    real = consensus.ties_merge
    monkeypatch.setattr(consensus, "ties_merge", lambda *a, **kw: calls.append(1) or real(*a, **kw))
    merged = consensus.merge(x, theta=0.0, elect="vote", weights=w)
    assert len(calls) == 1
    for b in range(4):
        assert torch.equal(merged[b], dlmom.ties_merge(x[:, b:b + 1], weights=w[:, b])[0])
