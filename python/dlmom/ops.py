"""The public op API: validation with clear errors, then dispatch to the C++ / CUDA kernels.

Each op checks its arguments' metadata (types, ranks, shapes, dtypes, devices, numbers) in Python before any
pointer reaches native code and raises ``ValueError`` naming the op, the argument, what was expected and what
came. Values (ids out of range, NaN logits, ...) are checked by the kernels in their own pass over the data: at
once on the CPU, through ``raise_pending_errors`` on CUDA (see ``dlmom.op_library``). CPU tensors run the C++
kernels (``dlmom._C``), CUDA tensors the CUDA kernels (``dlmom._C_cuda``, imported on first use so that
``import dlmom`` works without a GPU). ``DLMOM_BACKEND=reference`` forces the pure-torch versions of
``dlmom.reference`` everywhere. Every op is also ``torch.ops.dlmom.<op>`` (``torch.compile`` and
``torch.export`` see it as one opaque op).
"""
from __future__ import annotations

import math

import torch

from . import op_library as lib
from . import reference
from .op_library import backend_choice, native_module, raise_pending_errors  # noqa: F401 (public)
from .op_library import kernels_for as _kernels_for, run as _run, view as _view  # noqa: F401 (tests use them)
from .op_library import rows_unit_stride as _rows_unit_stride
from .op_types import Packet, QuantizedKV

__all__ = ["soft_embed", "topk_packet", "ties_merge", "kv_quant2", "kv_dequant2", "raise_pending_errors", "Packet",
           "QuantizedKV"]

_FLOATS = (torch.float32, torch.float16, torch.bfloat16)
_IDS = (torch.int32, torch.int64)
_PLAIN = (torch.Tensor, torch.nn.Parameter)


# ---- validation helpers ----

def _check_tensor(op: str, name: str, t, *, dims=None, min_dims=None, dtypes=None) -> None:
    # The common case returns after one cheap test: these checks run on every decode step.
    if isinstance(t, torch.Tensor) and (dtypes is None or t.dtype in dtypes) and \
            (dims is None or t.dim() == dims) and (min_dims is None or t.dim() >= min_dims):
        return
    if not isinstance(t, torch.Tensor):
        raise ValueError(f"{op}: {name} must be a torch.Tensor, got {type(t).__name__}")
    if dims is not None and t.dim() != dims:
        raise ValueError(f"{op}: {name} must have {dims} dims, got shape {tuple(t.shape)}")
    if min_dims is not None and t.dim() < min_dims:
        raise ValueError(f"{op}: {name} must have at least {min_dims} dims, got shape {tuple(t.shape)}")
    names = ", ".join(str(d).replace("torch.", "") for d in dtypes)
    raise ValueError(f"{op}: {name} must be one of {names}, got {str(t.dtype).replace('torch.', '')}")


def _check_same_device(op: str, **tensors) -> None:
    present = [t for t in tensors.values() if t is not None]
    if all(t.is_cpu for t in present) or len({t.device for t in present}) == 1:
        return
    listing = ", ".join(f"{n} on {t.device}" for n, t in tensors.items() if t is not None)
    raise ValueError(f"{op}: all tensors must be on one device, got {listing}")


def _check_number(op: str, name: str, value, *, lo=None, hi=None, lo_open=False, integer=False) -> None:
    ok_type = isinstance(value, int) if integer else isinstance(value, (int, float))
    if isinstance(value, bool) or not ok_type or not math.isfinite(value):
        raise ValueError(f"{op}: {name} must be a finite {'integer' if integer else 'number'}, got {value!r}")
    if lo is not None and (value <= lo if lo_open else value < lo) or hi is not None and value > hi:
        lo_s = "-inf" if lo is None else lo
        hi_s = "inf" if hi is None else hi
        raise ValueError(f"{op}: {name} must be in {'(' if lo_open else '['}{lo_s}, {hi_s}], got {value!r}")


def _may_overlap(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Whether a and b may share memory: their address ranges intersect (metadata only; conservative for
    interleaved views). torch strides are never negative."""
    if a.numel() == 0 or b.numel() == 0 or a.device != b.device:
        return False
    a0, b0 = a.data_ptr(), b.data_ptr()
    a1 = a0 + (sum((n - 1) * s for n, s in zip(a.shape, a.stride())) + 1) * a.element_size()
    b1 = b0 + (sum((n - 1) * s for n, s in zip(b.shape, b.stride())) + 1) * b.element_size()
    return a0 < b1 and b0 < a1


# ---- ops ----

def soft_embed(ids: torch.Tensor, probs: torch.Tensor, weight: torch.Tensor, *, scale: float = 1.0,
               out: torch.Tensor | None = None) -> torch.Tensor:
    """e = scale * sum_i probs[b, i] * weight[ids[b, i]] — a packet as an input embedding.

    Parameters
    ----------
    ids : int32/int64 [..., k]   token ids in [0, V)
    probs : float [..., k]       weights of the ids (a packet's probabilities; a token is {(id, 1.0)})
    weight : float [V, D]        the input-embedding matrix (any row stride, e.g. nn.Embedding.weight)
    scale : float                the model's embedding multiplier (sqrt(D) for Gemma)
    out : optional [..., D] tensor of weight.dtype to write into, any strides. It may share memory with
          ids, probs or weight: the result is that of the inputs as they were at the call (the kernel then
          writes a new tensor, which is copied into out). An out that addresses one element twice (a stride
          of 0 on a dim longer than 1, e.g. from ``expand``) is refused.

    Returns ``[..., D]`` in ``weight.dtype``; accumulation is fp32. Extreme magnitudes: a sum that leaves the
    fp32 range (products or partial sums of finite inputs beyond 3.4e38, or a sum below 2^-96 where products
    may have underflowed) is recomputed in fp64, and a scale beyond the float range is applied in fp64, so for
    any finite inputs the error is that of an fp32 sum and a result that fits ``weight.dtype`` is never inf,
    NaN or a flushed 0 (inf only where the exact value is beyond the dtype's range; NaN and inf in probs or
    weight propagate).
    """
    if out is None and _plain_soft_embed(ids, probs, weight, scale):
        # The common call (2-D CPU tensors with unit-stride rows, no out, plain eager mode), checked by
        # _plain_soft_embed with a few attribute reads: per-call overhead matters at decode batch sizes. Anything
        # else takes the general path below, whose checks give the messages. The kernel checks the id range.
        mod = lib.cpu_kernels()
        if mod is not None:
            result = weight.new_empty((ids.shape[0], weight.shape[1]))
            mod.soft_embed(_view(ids), _view(probs), _view(weight), float(scale), _view(result))
            return result
    op = "soft_embed"
    _check_tensor(op, "ids", ids, min_dims=1, dtypes=(torch.int32, torch.int64))
    _check_tensor(op, "probs", probs, min_dims=1, dtypes=_FLOATS)
    _check_tensor(op, "weight", weight, dims=2, dtypes=_FLOATS)
    _check_number(op, "scale", scale)
    if not (ids.is_cpu and probs.is_cpu and weight.is_cpu and (out is None or out.is_cpu)):
        _check_same_device(op, ids=ids, probs=probs, weight=weight, out=out)
    if probs.shape != ids.shape:
        raise ValueError(f"{op}: probs must have the shape of ids {tuple(ids.shape)}, got {tuple(probs.shape)}")
    V, D = weight.shape
    if ids.shape[-1] < 1:
        raise ValueError(f"{op}: ids must hold at least one id per row, got shape {tuple(ids.shape)}")
    lead = ids.shape[:-1]
    if out is not None:
        _check_tensor(op, "out", out, dtypes=(weight.dtype,))
        if out.shape != (*lead, D):
            raise ValueError(f"{op}: out must have shape {(*lead, D)}, got {tuple(out.shape)}")
        if any(s == 0 and n > 1 for n, s in zip(out.shape, out.stride())):
            raise ValueError(f"{op}: out must not address one element twice, got shape {tuple(out.shape)} with "
                             f"strides {out.stride()}")
    k = ids.shape[-1]
    if ids.dim() != 2:
        ids, probs = ids.reshape(-1, k), probs.reshape(-1, k)
    ids2, probs2, weight2 = _rows_unit_stride(ids), _rows_unit_stride(probs), _rows_unit_stride(weight)
    if not lib.eager(ids, probs, weight, out):
        result = torch.ops.dlmom.soft_embed(ids2, probs2, weight2, float(scale)).view(*lead, D)
        return result if out is None else out.copy_(result)
    # The kernel writes out directly only when out is dense and shares no memory with what it reads.
    direct = out is not None and out.is_contiguous() and not (
        _may_overlap(out, weight2) or _may_overlap(out, ids2) or _may_overlap(out, probs2))
    out2 = lib.run_soft_embed(ids2, probs2, weight2, float(scale), out.view(ids2.shape[0], D) if direct else None)
    if out is None:
        return out2 if len(lead) == 1 else out2.view(*lead, D)
    return out if direct else out.copy_(out2.view(*lead, D))


def _plain_soft_embed(ids, probs, weight, scale) -> bool:
    """Whether soft_embed's arguments are valid 2-D CPU tensors with unit-stride rows and a finite scale, and
    the call is plain eager (lib.eager)."""
    return (type(ids) is torch.Tensor and type(probs) is torch.Tensor and type(weight) in _PLAIN
            and (type(scale) is float or type(scale) is int) and scale - scale == 0  # finite (not NaN / inf)
            and ids.dtype in _IDS and probs.dtype in _FLOATS and weight.dtype in _FLOATS
            and ids.dim() == 2 and weight.dim() == 2 and probs.shape == ids.shape and ids.shape[1] > 0
            and ids.is_cpu and probs.is_cpu and weight.is_cpu
            and ids.stride(1) == 1 and probs.stride(1) == 1 and weight.stride(1) == 1
            and lib.eager(ids, probs, weight))


def topk_packet(logits: torch.Tensor, k: int, *, temperature: float = 1.0, top_p: float = 1.0) -> Packet:
    """Packet(ids, probs, entropy) of softmax(logits / temperature), in one pass over the logits.

    ids int64 [B, k] by probability (ties: lower id first); probs float32 [B, k] = the top-k renormalised,
    truncated to the shortest prefix whose mass reaches ``top_p`` (an entry is kept when the mass before it
    is < top_p; dropped entries get 0) and renormalised; entropy float32 [B] = H(softmax(logits)) / log V at
    temperature 1. ``temperature == 0`` gives the one-hot packet of the argmax. The temperature is used as a
    float32 and the probabilities are softmax((logits - max) / temperature): a tiny temperature cannot
    overflow and gives the limit, one-hot on the argmax (shared evenly by tied maxima); one that rounds to 0
    in float32 (below about 7e-46) is 0, one beyond float32 is its largest value (the uniform limit). top_p
    is a float32 too, at least its smallest (the first entry is always kept). -inf logits (masked tokens)
    are never chosen while a finite one remains. Leading dims beyond one are flattened and restored.
    """
    op = "topk_packet"
    _check_tensor(op, "logits", logits, min_dims=1, dtypes=_FLOATS)
    V = logits.shape[-1]
    _check_number(op, "k", k, lo=1, hi=V, integer=True)
    _check_number(op, "temperature", temperature, lo=0)
    _check_number(op, "top_p", top_p, lo=0, hi=1, lo_open=True)
    lead = logits.shape[:-1]
    x = _rows_unit_stride(logits.reshape(-1, V))
    if lib.eager(logits):
        ids, probs, entropy = lib.run_topk_packet(x, k, temperature, top_p)
    else:
        ids, probs, entropy = torch.ops.dlmom.topk_packet(x, k, float(temperature), float(top_p))
    return Packet(ids.view(*lead, k), probs.view(*lead, k), entropy.view(lead))


def ties_merge(logits: torch.Tensor, *, theta: float = 0.0, elect: str = "vote",
               weights: torch.Tensor | None = None) -> torch.Tensor:
    """Contrastive TIES consensus of E experts: [E, B, V] -> [B, V] float32.

    v = logits - mean(logits) per row (mean over finite entries); |v| < theta -> 0 (|v| == theta is
    kept); elected sign per token: ``"vote"`` sign(sum_e w_e sign(v_e)) (a tie elects 0), ``"mass"``
    sign(sum_e w_e v_e); merged = weighted mean of the v_e whose sign equals the elected one (0 where
    none). A token that any expert masks with -inf is -inf. ``weights`` (router scores, >= 0, any float
    dtype) weight both the vote and the mean: [E] for every row, or ``logits.shape[:-1]`` ([E, B]) per row, as
    if each row were merged alone with its own [E]; default all 1. NaN, inf or negative weights raise
    ValueError (on CUDA through ``raise_pending_errors``).

    Extreme values: the math is fp32 (theta too: beyond float32 it trims everything). Only the ratios of the
    weights count: they are scaled by a power of two (exact) so the largest is below 1, so any finite weights
    work (a weight below 2^-149 of the largest counts as 0). Finite logits must have |x| <= 2^96 (about
    7.9e28), which keeps every sum finite; a larger one raises ValueError like NaN and +inf do.
    """
    op = "ties_merge"
    _check_tensor(op, "logits", logits, min_dims=2, dtypes=_FLOATS)
    _check_number(op, "theta", theta, lo=0)
    if elect not in ("vote", "mass"):
        raise ValueError(f"{op}: elect must be 'vote' or 'mass', got {elect!r}")
    E, V = logits.shape[0], logits.shape[-1]
    if E < 1 or V < 1:
        raise ValueError(f"{op}: logits must be [E >= 1, ..., V >= 1], got shape {tuple(logits.shape)}")
    lead = logits.shape[1:-1]
    B = math.prod(lead)
    if weights is not None:
        _check_tensor(op, "weights", weights, dtypes=_FLOATS)
        _check_same_device(op, logits=logits, weights=weights)
        if weights.shape != (E,) and weights.shape != logits.shape[:-1]:
            raise ValueError(f"{op}: weights must have shape [E={E}] or logits.shape[:-1] = "
                             f"{list(logits.shape[:-1])} (per row), got {tuple(weights.shape)}")
        if weights.dim() > 2:
            weights = weights.reshape(E, B)
    x = _rows_unit_stride(logits.reshape(E, B, V))  # (-1 fails when B = 0)
    if lib.eager(logits, weights):
        out = lib.run_ties_merge(x, weights, float(theta), elect == "mass")
    else:
        out = torch.ops.dlmom.ties_merge(x, weights, float(theta), elect == "mass")
    return out.view(*lead, V)


def _kv_axis(op: str, x: torch.Tensor, axis) -> int:
    if isinstance(axis, bool) or not isinstance(axis, int) or axis not in (-1, -2, x.dim() - 1, x.dim() - 2):
        raise ValueError(f"{op}: axis must be -1 (groups over channels) or -2 (groups over tokens), got {axis!r}")
    return -1 if axis in (-1, x.dim() - 1) else -2


def kv_quant2(x: torch.Tensor, *, group_size: int = 32, axis: int = -1) -> QuantizedKV:
    """Asymmetric 2-bit quantisation in groups of ``group_size`` consecutive elements along ``axis``.

    ``axis=-1``: per token over channels (KIVI's values); ``axis=-2``: per channel over tokens (KIVI's
    keys). zero = min, scale = (max - min) / 3, code = clamp(rint((x - zero) / scale), 0, 3), four codes
    per uint8, least significant bits first. scale and zero are kept in x's dtype, rounded outward (zero
    down, scale up) so each element is within half a step of its dequantised value; a constant group is
    exact. A length that is not a multiple of ``group_size`` gets a shorter last group.

    Extreme values: x must be finite (NaN and inf raise ValueError); any finite x works, up to the dtype's
    maximum. The fp32 arithmetic behaves as if its exponent were unbounded (a range max - min or a value
    code * scale + zero beyond fp32 is computed at half scale), and where zero + 3 * scale would overflow x's
    dtype the scale is stepped down a unit or two (the top element then lies a few units of the scale below
    its value, still within half a step): ``kv_dequant2(kv_quant2(x))`` is finite for every finite x.
    """
    op = "kv_quant2"
    _check_tensor(op, "x", x, min_dims=1, dtypes=_FLOATS)
    axis = _kv_axis(op, x, axis)
    if axis == -2 and x.dim() < 2:
        raise ValueError(f"{op}: axis=-2 needs x with at least 2 dims, got shape {tuple(x.shape)}")
    _check_number(op, "group_size", group_size, lo=1, integer=True)
    R, L, C = reference.canonical_3d(x.shape, axis)
    G = min(group_size, max(L, 1))  # the same groups; an int64 for the kernel however large group_size is
    x3 = x.reshape(R, L, C)
    if lib.eager(x):
        codes, scale, zero = lib.run_kv_quant2(x3, G)
    else:
        codes, scale, zero = torch.ops.dlmom.kv_quant2(x3, G)
    ng, nb = -(-L // G), -(-L // 4)
    lead = x.shape[:-1] if axis == -1 else x.shape[:-2]
    tail, gtail = ((nb,), (ng,)) if axis == -1 else ((nb, x.shape[-1]), (ng, x.shape[-1]))
    return QuantizedKV(codes.view(*lead, *tail), scale.view(*lead, *gtail), zero.view(*lead, *gtail),
                       x.shape, axis, group_size)


def kv_dequant2(q: QuantizedKV, *, dtype: torch.dtype | None = None) -> torch.Tensor:
    """The tensor back from ``kv_quant2``: code * scale + zero, in ``dtype`` (default: the input's dtype).

    The value is computed in fp32 as if its exponent were unbounded (kv_quant2's extreme values), then
    rounded to ``dtype`` as ``Tensor.to`` does: finite for the input's dtype; a ``dtype`` narrower than the
    input's (fp32 values beyond 65504 to fp16) gives inf there.
    """
    op = "kv_dequant2"
    if not isinstance(q, QuantizedKV):
        raise ValueError(f"{op}: q must be a QuantizedKV from kv_quant2, got {type(q).__name__}")
    if dtype is not None and dtype not in _FLOATS:
        raise ValueError(f"{op}: dtype must be float32, float16 or bfloat16, got {dtype}")
    # A QuantizedKV is a plain tuple: check its fields before computing sizes from them.
    if isinstance(q.axis, bool) or q.axis not in (-1, -2):
        raise ValueError(f"{op}: q.axis must be -1 or -2, got {q.axis!r}")
    if len(q.shape) < -q.axis:
        raise ValueError(f"{op}: q.shape must have at least {-q.axis} dims for axis={q.axis}, got {tuple(q.shape)}")
    _check_number(op, "q.group_size", q.group_size, lo=1, integer=True)
    R, L, C = reference.canonical_3d(q.shape, q.axis)
    G = min(q.group_size, max(L, 1))  # the same groups; an int64 for the kernel however large group_size is
    ng, nb = -(-L // G), -(-L // 4)
    _check_tensor(op, "q.codes", q.codes, dtypes=(torch.uint8,))
    _check_tensor(op, "q.scale", q.scale, dtypes=_FLOATS)
    _check_tensor(op, "q.zero", q.zero, dtypes=_FLOATS)
    _check_same_device(op, codes=q.codes, scale=q.scale, zero=q.zero)
    if q.codes.numel() != R * nb * C or q.scale.numel() != R * ng * C or q.zero.shape != q.scale.shape \
            or q.zero.dtype != q.scale.dtype:
        raise ValueError(f"{op}: q's codes {tuple(q.codes.shape)}, scale {tuple(q.scale.shape)} and zero "
                         f"{tuple(q.zero.shape)} do not fit shape {tuple(q.shape)} with group_size {q.group_size}")
    codes, scale, zero = q.codes.reshape(R, nb, C), q.scale.reshape(R, ng, C), q.zero.reshape(R, ng, C)
    if lib.eager(codes, scale, zero):
        out = lib.run_kv_dequant2(codes, scale, zero, G, L, dtype or q.scale.dtype)
    else:
        out = torch.ops.dlmom.kv_dequant2(codes, scale, zero, G, L, dtype or q.scale.dtype)
    return out.view(q.shape)
