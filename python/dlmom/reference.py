"""Plain-torch versions of every op: the tests' oracle, the fallback, and the benchmarks' baseline.

They follow the op specifications in ``dlmom.ops`` exactly (tie order, masking, rounding), favouring
clarity over speed. ``DLMOM_BACKEND=reference`` makes ``dlmom.ops`` use them.
"""
from __future__ import annotations

import math
import struct

import torch

from .op_types import Packet, QuantizedKV


def soft_embed(ids: torch.Tensor, probs: torch.Tensor, weight: torch.Tensor, *, scale: float = 1.0) -> torch.Tensor:
    """scale * sum_i probs[..., i] * weight[ids[..., i]], accumulated in fp64, returned in weight.dtype.

    fp64 holds every product of two floats exactly and no sum of them overflows, so this is the exact value
    rounded to weight.dtype (up to the fp64 rounding of the sum): an oracle at least as accurate as the kernels'
    fp32 sums, which agree with it to fp32's error.
    """
    rows = weight[ids.long()].double()  # [..., k, D]
    out = scale * (probs.double().unsqueeze(-1) * rows).sum(-2)
    return out.to(weight.dtype)


def entropy_normalised(logits: torch.Tensor) -> torch.Tensor:
    """Shannon entropy of softmax(logits) over the last dim, divided by log V (0 when V == 1)."""
    x = logits.float()
    logp = torch.log_softmax(x, dim=-1)
    p = logp.exp()
    h = -torch.where(p > 0, p * logp, torch.zeros_like(p)).sum(-1)
    # A row with NaN, +inf or no finite entry has no distribution: NaN, which dlmom.ops turns into an error.
    bad = torch.isnan(x).any(-1) | (x == math.inf).any(-1) | ~torch.isfinite(x).any(-1)
    h = torch.where(bad, torch.full_like(h, math.nan), h)
    V = x.shape[-1]
    return h / math.log(V) if V > 1 else h  # V == 1: h is 0 (or NaN for a bad row)


FLOAT32_MAX = torch.finfo(torch.float32).max


def float32_of(value: float) -> float:
    """value rounded to float32, as the kernels get it (beyond the float32 range: +-inf; tiny: 0)."""
    try:
        return struct.unpack("f", struct.pack("f", value))[0]
    except OverflowError:  # rounds to inf
        return math.copysign(math.inf, value)


def topk_params(temperature: float, top_p: float) -> tuple[float, float]:
    """temperature and top_p as the kernels use them: float32, the temperature at most the largest float32
    (the uniform limit; inf would make (-inf - max) / inf NaN) and top_p at least the smallest (one that
    rounds to 0 would keep nothing; the first entry, with mass 0 before it, is always kept)."""
    return float32_of(min(temperature, FLOAT32_MAX)), float32_of(max(top_p, 2.0 ** -149))


def topk_packet(logits: torch.Tensor, k: int, *, temperature: float = 1.0, top_p: float = 1.0) -> Packet:
    """Top-k of softmax(logits / temperature), top-p truncated and renormalised; entropy at temperature 1.

    The temperature is used as a float32 (one that rounds to 0 is 0: the one-hot packet), and the largest
    logit is subtracted before the division, so a tiny temperature gives the argmax limit, never NaN.
    top_p acts on the top-k distribution renormalised (as transformers' TopK then TopP warpers do): an
    entry is kept when the mass before it is < top_p.
    """
    x = logits.float()
    vals, ids = torch.sort(x, dim=-1, descending=True, stable=True)  # stable: ties -> lower id first
    vals, ids = vals[..., :k], ids[..., :k]
    t, top_p = topk_params(temperature, top_p)
    if t == 0:
        probs = torch.zeros_like(vals)
        probs[..., 0] = 1.0
    else:
        # A tensor divisor: torch on CUDA divides by a Python number as a multiply by its reciprocal, which
        # is inf for a subnormal temperature (and 0 * inf NaN).
        probs = torch.softmax((vals - vals[..., :1]) / torch.full_like(vals, t), dim=-1)
        if top_p < 1.0:
            # The mass before each entry summed in double (torch's CPU cumsum does; on CUDA it sums float32,
            # which keeps one entry more at exact ties than the kernels, whose top-p sums are double).
            before = torch.cumsum(probs.double(), dim=-1).float() - probs
            probs = torch.where(before < top_p, probs, torch.zeros_like(probs))
            probs = probs / probs.sum(-1, keepdim=True)
    return Packet(ids, probs, entropy_normalised(x))


# Finite logits of ties_merge must have |x| <= 2^96 (csrc/ties_merge.h: kMaxLogit): then no fp32 sum of the
# merge can overflow (for V, E < 2^31).
TIES_MAX_LOGIT = 2.0 ** 96


def ties_weights(weights: torch.Tensor | None, E: int, device: torch.device) -> torch.Tensor:
    """The weights as float32 [E] (or [E, B]: per row), each row's scaled by a power of two so that its largest
    is in [0.5, 1) (or all are 0).

    The merge depends only on their ratios, and a power of two scales exactly (down to float32's subnormals):
    the weighted sums cannot overflow however large the weights are, and ties stay ties.
    """
    if weights is None:
        return torch.ones(E, device=device)
    w = weights.double()  # every float32 weight and power of two below fits, the product is exact
    exponent = torch.frexp(w.amax(0)).exponent  # max = m * 2^exponent, m in [0.5, 1); 0 for max == 0
    return (w * torch.pow(2.0, -exponent.double())).float()


def ties_merge(logits: torch.Tensor, *, theta: float = 0.0, elect: str = "vote",
               weights: torch.Tensor | None = None) -> torch.Tensor:
    """Contrastive TIES over experts: [E, ..., V] -> [..., V] float32.

    v = x - mean_finite(x); |v| < theta -> 0; elected = sign(sum_e w_e sign(v_e)) ("vote") or
    sign(sum_e w_e v_e) ("mass"); merged = sum of w_e v_e over experts with sign(v_e) == elected != 0,
    divided by the sum of their w_e (0 where none). A token that any expert masks with -inf is -inf.
    ``weights`` is [E] or ``logits.shape[:-1]`` (per row). The weights are first scaled by a power of two
    (ties_weights, per row); finite logits should have |x| <= TIES_MAX_LOGIT, which dlmom.ops checks.
    """
    x = logits.float()
    E = x.shape[0]
    finite = torch.isfinite(x)
    count = finite.sum(-1, keepdim=True).clamp(min=1)
    mean = torch.where(finite, x, torch.zeros_like(x)).sum(-1, keepdim=True) / count
    v = torch.where(finite, x - mean, torch.zeros_like(x))
    v = torch.where(v.abs() >= float32_of(theta), v, torch.zeros_like(v))  # theta as a float32 (maybe inf)
    w = ties_weights(weights, E, x.device)
    w = w.view(E, *([1] * (x.dim() - 1))) if w.dim() == 1 else w.unsqueeze(-1)  # broadcast over [..., V]
    s = torch.sign(v)
    # Sums over experts in expert order, each product and sum rounded to fp32 (as the kernels: an election
    # that rounding decides is decided alike; torch's sum(0) may take another order).
    score = torch.zeros_like(x[0])
    for e in range(E):
        score = score + w[e] * (s[e] if elect == "vote" else v[e])
    elected = torch.sign(score)
    agree = (s == elected) & (elected != 0)
    num, den = torch.zeros_like(score), torch.zeros_like(score)
    for e in range(E):
        num = num + torch.where(agree[e], w[e] * v[e], 0.0)
        den = den + torch.where(agree[e], w[e], 0.0)
    merged = torch.where(den > 0, num / torch.where(den > 0, den, torch.ones_like(den)), torch.zeros_like(num))
    masked = (x == -math.inf).any(0)
    return torch.where(masked, torch.full_like(merged, -math.inf), merged)


# ---- 2-bit KV quantisation ----

def canonical_3d(shape: torch.Size, axis: int) -> tuple[int, int, int]:
    """(R, L, C): the tensor seen as [R, L, C] with the quantised axis in the middle."""
    if axis == -1:
        return math.prod(shape[:-1]), shape[-1], 1
    return math.prod(shape[:-2]), shape[-2], shape[-1]


def _step_down(t: torch.Tensor) -> torch.Tensor:
    """The next representable value towards -inf of a float16 / bfloat16 tensor."""
    b = t.view(torch.int16)
    b = torch.where(b > 0, b - 1, torch.where(b == 0, torch.full_like(b, -32767), b + 1))
    return b.view(t.dtype)


def _step_up(t: torch.Tensor) -> torch.Tensor:
    """The next representable value towards +inf of a non-negative float16 / bfloat16 tensor."""
    return (t.view(torch.int16) + 1).view(t.dtype)


def _step_down_positive(t: torch.Tensor) -> torch.Tensor:
    """The next representable value towards 0 of a positive float32 / float16 / bfloat16 tensor."""
    bits = torch.int32 if t.dtype == torch.float32 else torch.int16
    return (t.view(bits) - 1).view(t.dtype)


def _sub_div(a: torch.Tensor, b: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
    """(a - b) / c in fp32; where a - b overflows (large a, b of opposite signs), (a/2 - b/2) / (c/2): the
    quotient fp32 with an unbounded exponent gives. c is a tensor (see kv_scale_zero)."""
    d = a - b
    big = torch.isinf(d)
    return torch.where(big, a * 0.5 - b * 0.5, d) / torch.where(big, c * 0.5, c)


def kv_dequant_values(codes: torch.Tensor, s: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
    """codes * s + z in fp32; where that overflows, 2 * (codes * (s/2) + z/2), which is inf only when the value
    itself is beyond the fp32 range."""
    v = codes * s + z
    return torch.where(torch.isinf(v), 2 * (codes * (s * 0.5) + z * 0.5), v)


# Steps down of a scale whose top value overflows (csrc/kv_quant2.h: kScaleSteps).
_SCALE_STEPS = 3


def kv_scale_zero(mn: torch.Tensor, mx: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """Scale and zero point of groups with minimum mn and maximum mx, stored in ``dtype``.

    zero = min and scale = (max - zero) / 3, rounded outward to ``dtype`` (zero down, scale up) so
    every element of the group stays within half a step of its code. A range beyond fp32 is divided at half
    scale (_sub_div), and a scale whose top value zero + 3 * scale would overflow ``dtype`` is stepped down
    (the top element then lies a few units of the scale from its value, far within half a step).
    """
    # A tensor divisor, not the number 3: on CUDA, torch divides by a Python scalar as a multiply by its
    # reciprocal, which differs from the true division in the last bit for about a third of the values.
    three = torch.full_like(mn, 3.0)
    if dtype == torch.float32:
        zero, scale = mn, _sub_div(mx, mn, three)
    else:
        zero = mn.to(dtype)
        zero = torch.where(zero.float() > mn, _step_down(zero), zero)
        s32 = _sub_div(mx, zero.float(), three)
        scale = s32.to(dtype)
        scale = torch.where(scale.float() < s32, _step_up(scale), scale)
    for _ in range(_SCALE_STEPS):
        top = kv_dequant_values(three, scale.float(), zero.float()).to(dtype)
        scale = torch.where((scale > 0) & torch.isinf(top), _step_down_positive(scale), scale)
    return scale, zero


def kv_quant2(x: torch.Tensor, *, group_size: int = 32, axis: int = -1) -> QuantizedKV:
    """Asymmetric 2-bit min-max quantisation in groups of ``group_size`` along ``axis`` (-1 or -2).

    code = clamp(rint((x - zero) / scale), 0, 3) (0 where scale == 0; x - zero past fp32 at half scale); the
    last group may be shorter.
    """
    R, L, C = canonical_3d(x.shape, axis)
    G = min(group_size, max(L, 1))  # a group_size beyond L is one group of L (and must not pad to G rows)
    ng, nb = -(-L // G), -(-L // 4)
    x3 = x.reshape(R, L, C).float()
    pad = ng * G - L
    lo = torch.nn.functional.pad(x3, (0, 0, 0, pad), value=math.inf).view(R, ng, G, C).amin(2)
    hi = torch.nn.functional.pad(x3, (0, 0, 0, pad), value=-math.inf).view(R, ng, G, C).amax(2)
    scale, zero = kv_scale_zero(lo, hi, x.dtype)
    group = torch.arange(L, device=x.device) // G  # the group of each position along L
    s, z = scale.float()[:, group], zero.float()[:, group]
    codes = torch.where(s > 0, torch.round(_sub_div(x3, z, torch.where(s > 0, s, 1.0))), torch.zeros_like(x3))
    codes = codes.clamp(0, 3).to(torch.uint8)
    codes = torch.nn.functional.pad(codes, (0, 0, 0, nb * 4 - L)).view(R, nb, 4, C)
    packed = codes[:, :, 0] | (codes[:, :, 1] << 2) | (codes[:, :, 2] << 4) | (codes[:, :, 3] << 6)
    lead = x.shape[:-1] if axis == -1 else x.shape[:-2]
    tail = (nb,) if axis == -1 else (nb, x.shape[-1])
    gtail = (ng,) if axis == -1 else (ng, x.shape[-1])
    return QuantizedKV(packed.reshape(*lead, *tail), scale.reshape(*lead, *gtail), zero.reshape(*lead, *gtail),
                       x.shape, axis, group_size)


def kv_dequant2(q: QuantizedKV, *, dtype: torch.dtype | None = None) -> torch.Tensor:
    """code * scale + zero (kv_dequant_values), in ``dtype`` (default: the quantised tensor's dtype)."""
    R, L, C = canonical_3d(q.shape, q.axis)
    G = min(q.group_size, max(L, 1))  # beyond L: one group (and no int64 overflow below)
    ng, nb = -(-L // G), -(-L // 4)  # explicit: reshape cannot infer a -1 when R == 0
    b = q.codes.reshape(R, nb, 1, C)
    shifts = torch.tensor([0, 2, 4, 6], dtype=torch.uint8, device=b.device).view(1, 1, 4, 1)
    codes = ((b >> shifts) & 3).reshape(R, nb * 4, C)[:, :L].float()
    group = torch.arange(L, device=b.device) // G  # (not repeat_interleave: G may be far beyond L)
    s = q.scale.reshape(R, ng, C).float()[:, group]
    z = q.zero.reshape(R, ng, C).float()[:, group]
    return kv_dequant_values(codes, s, z).to(dtype or q.scale.dtype).reshape(q.shape)
