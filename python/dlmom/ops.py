"""The public op API: validation with clear errors, then dispatch to the C++ / CUDA kernels.

Each op checks its arguments in Python before any pointer reaches native code and raises
``ValueError`` naming the op, the argument, what was expected and what came. CPU tensors run the C++
kernels (``dlmom._C``), CUDA tensors the CUDA kernels (``dlmom._C_cuda``, imported on first use so that
``import dlmom`` works without a GPU). ``DLMOM_BACKEND=reference`` forces the pure-torch versions of
``dlmom.reference`` everywhere.
"""
from __future__ import annotations

import importlib
import math
import os
import warnings

import torch

from . import reference
from .op_types import Packet, QuantizedKV

__all__ = ["soft_embed", "topk_packet", "ties_merge", "kv_quant2", "kv_dequant2", "Packet", "QuantizedKV"]

# Must match dlmom::DType in csrc/common.h.
_DTYPE_CODES = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2, torch.int32: 3, torch.int64: 4,
                torch.uint8: 5}
_FLOATS = (torch.float32, torch.float16, torch.bfloat16)
_BACKENDS = ("auto", "reference")
_modules: dict[str, object] = {}
_warned_no_cuda = False


# ---- backend selection ----

def backend_choice() -> str:
    """The value of DLMOM_BACKEND ("auto" when unset), validated."""
    choice = os.environ.get("DLMOM_BACKEND")
    if choice is None:
        return "auto"
    choice = choice.strip().lower() or "auto"
    if choice not in _BACKENDS:
        raise ValueError(f"DLMOM_BACKEND must be one of {_BACKENDS}, got {choice!r}")
    return choice


def native_module(device_type: str):
    """dlmom._C for "cpu", dlmom._C_cuda for "cuda"; None when that module was not built."""
    name = "_C" if device_type == "cpu" else "_C_cuda"
    if name not in _modules:
        try:
            _modules[name] = importlib.import_module(f"dlmom.{name}")
        except ImportError:
            _modules[name] = None
    return _modules[name]


def _kernels_for(op: str, t: torch.Tensor):
    """The native module that runs ``op`` on ``t``'s device, or None for the reference."""
    global _warned_no_cuda
    if "DLMOM_BACKEND" in os.environ and backend_choice() == "reference":
        return None
    if t.is_cpu:
        mod = _modules.get("_C") or native_module("cpu")
        if mod is None:
            raise ImportError(f"{op}: the dlmom C++ extension (dlmom._C) is not built. Install the package "
                              "with `pip install .` from the source tree, or set DLMOM_BACKEND=reference "
                              "to use the pure-torch ops.")
        return mod
    if t.is_cuda:
        mod = native_module("cuda")
        if mod is None and not _warned_no_cuda:
            _warned_no_cuda = True
            warnings.warn("dlmom was built without CUDA kernels: CUDA tensors use the pure-torch reference "
                          "ops. Rebuild with nvcc on PATH for the fused kernels.", RuntimeWarning, stacklevel=3)
        return mod
    return None


def _view(t: torch.Tensor):
    return (t.data_ptr(), _DTYPE_CODES[t.dtype], tuple(t.shape), tuple(t.stride()))


def _run(mod, t: torch.Tensor, fn: str, *args):
    """Call a kernel; CUDA kernels get the current stream of t's device.

    Tensor arguments are passed here as tensors and turned into raw views only inside this call: ``args``
    holds a reference to each until the kernel returns, so a temporary copy made by the caller (e.g.
    ``x.contiguous()`` in the argument list) cannot be freed while native code reads it."""
    views = [_view(a) if isinstance(a, torch.Tensor) else a for a in args]  # (``args`` keeps the tensors)
    if t.is_cuda:
        with torch.cuda.device(t.device):
            return getattr(mod, fn)(*views, stream=torch.cuda.current_stream(t.device).cuda_stream)
    return getattr(mod, fn)(*views)


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


def _rows_unit_stride(t: torch.Tensor) -> torch.Tensor:
    """The kernels read rows with unit stride: copy only when the last dim is strided."""
    return t if t.dim() == 0 or t.stride(-1) == 1 or t.shape[-1] <= 1 else t.contiguous()


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
    mod = _kernels_for(op, weight)
    # The C++ kernel checks the id range while it reads them; elsewhere check here (a sync on CUDA).
    if (mod is None or weight.device.type != "cpu") and ids.numel():
        lo, hi = torch.aminmax(ids)
        if int(lo) < 0 or int(hi) >= V:
            raise ValueError(f"{op}: ids must be in [0, V={V}), got values in [{int(lo)}, {int(hi)}]")
    if mod is None:
        result = reference.soft_embed(ids, probs, weight, scale=scale)
        return result if out is None else out.copy_(result)
    k = ids.shape[-1]
    if ids.dim() != 2:
        ids, probs = ids.reshape(-1, k), probs.reshape(-1, k)
    ids2, probs2, weight2 = _rows_unit_stride(ids), _rows_unit_stride(probs), _rows_unit_stride(weight)
    # The kernel writes out directly only when out is dense and shares no memory with what it reads.
    direct = out is not None and out.is_contiguous() and not (
        _may_overlap(out, weight2) or _may_overlap(out, ids2) or _may_overlap(out, probs2))
    out2 = out.view(ids2.shape[0], D) if direct else weight.new_empty((ids2.shape[0], D))  # (-1 fails for D = 0)
    _run(mod, weight, "soft_embed", ids2, probs2, weight2, float(scale), out2)
    if out is None:
        return out2 if len(lead) == 1 else out2.view(*lead, D)
    return out if direct else out.copy_(out2.view(*lead, D))


def topk_packet(logits: torch.Tensor, k: int, *, temperature: float = 1.0, top_p: float = 1.0) -> Packet:
    """Packet(ids, probs, entropy) of softmax(logits / temperature), in one pass over the logits.

    ids int64 [B, k] by probability (ties: lower id first); probs float32 [B, k] = the top-k renormalised,
    truncated to the shortest prefix whose mass reaches ``top_p`` (an entry is kept when the mass before it
    is < top_p; dropped entries get 0) and renormalised; entropy float32 [B] = H(softmax(logits)) / log V at
    temperature 1. ``temperature == 0`` gives the one-hot packet of the argmax. The temperature is used as a
    float32 and the probabilities are softmax((logits - max) / temperature): a tiny temperature cannot
    overflow and gives the limit, one-hot on the argmax (shared evenly by tied maxima); one that rounds to 0
    in float32 (below about 7e-46) is 0. -inf logits (masked tokens) are never chosen while a finite one
    remains. Leading dims beyond one are flattened and restored.
    """
    op = "topk_packet"
    _check_tensor(op, "logits", logits, min_dims=1, dtypes=_FLOATS)
    V = logits.shape[-1]
    _check_number(op, "k", k, lo=1, hi=V, integer=True)
    _check_number(op, "temperature", temperature, lo=0)
    _check_number(op, "top_p", top_p, lo=0, hi=1, lo_open=True)
    lead = logits.shape[:-1]
    x = _rows_unit_stride(logits.reshape(-1, V))
    mod = _kernels_for(op, logits)
    if mod is None:
        ids, probs, entropy = reference.topk_packet(x, k, temperature=temperature, top_p=top_p)
    else:
        B = x.shape[0]
        ids = torch.empty(B, k, dtype=torch.int64, device=x.device)
        probs = torch.empty(B, k, dtype=torch.float32, device=x.device)
        entropy = torch.empty(B, dtype=torch.float32, device=x.device)
        _run(mod, x, "topk_packet", x, int(k), float(temperature), float(top_p), ids, probs, entropy)
    # The single pass flags rows with NaN, +inf or no finite logit by a NaN entropy.
    bad = torch.isnan(entropy)
    if bool(bad.any()):
        row = int(bad.nonzero()[0, 0])
        raise ValueError(f"{op}: logits must be finite or -inf with at least one finite value per row; "
                         f"row {row} holds NaN, +inf or only -inf")
    return Packet(ids.view(*lead, k), probs.view(*lead, k), entropy.view(lead))


def ties_merge(logits: torch.Tensor, *, theta: float = 0.0, elect: str = "vote",
               weights: torch.Tensor | None = None) -> torch.Tensor:
    """Contrastive TIES consensus of E experts: [E, B, V] -> [B, V] float32.

    v = logits - mean(logits) per row (mean over finite entries); |v| < theta -> 0 (|v| == theta is
    kept); elected sign per token: ``"vote"`` sign(sum_e w_e sign(v_e)) (a tie elects 0), ``"mass"``
    sign(sum_e w_e v_e); merged = weighted mean of the v_e whose sign equals the elected one (0 where
    none). A token that any expert masks with -inf is -inf. ``weights`` [E] (router scores, >= 0)
    weight both the vote and the mean; default all 1.

    Extreme values: the math is fp32. Only the ratios of the weights count: they are scaled by a power of
    two (exact) so the largest is below 1, so any finite weights work (a weight below 2^-149 of the largest
    counts as 0). Finite logits must have |x| <= 2^96 (about 7.9e28), which keeps every sum finite; a larger
    one raises ValueError like NaN and +inf do.
    """
    op = "ties_merge"
    _check_tensor(op, "logits", logits, min_dims=2, dtypes=_FLOATS)
    _check_number(op, "theta", theta, lo=0)
    if elect not in ("vote", "mass"):
        raise ValueError(f"{op}: elect must be 'vote' or 'mass', got {elect!r}")
    E, V = logits.shape[0], logits.shape[-1]
    if E < 1 or V < 1:
        raise ValueError(f"{op}: logits must be [E >= 1, ..., V >= 1], got shape {tuple(logits.shape)}")
    if weights is not None:
        _check_tensor(op, "weights", weights, dims=1, dtypes=_FLOATS)
        _check_same_device(op, logits=logits, weights=weights)
        if weights.shape[0] != E:
            raise ValueError(f"{op}: weights must have shape [E={E}], got {tuple(weights.shape)}")
        if not bool(torch.isfinite(weights).all()) or bool((weights < 0).any()):
            raise ValueError(f"{op}: weights must be finite and >= 0, got {weights.tolist()}")
    lead = logits.shape[1:-1]
    x = _rows_unit_stride(logits.reshape(E, math.prod(lead), V))  # (-1 fails when B = 0)
    mod = _kernels_for(op, logits)
    if mod is None:
        if bool(torch.isnan(x).any()) or bool((x == math.inf).any()) or bool(
                ((x.abs() > reference.TIES_MAX_LOGIT) & (x != -math.inf)).any()):
            _ties_bad_logits(x)
        return reference.ties_merge(x, theta=theta, elect=elect, weights=weights).view(*lead, V)
    B = x.shape[1]
    means = torch.empty(E, B, dtype=torch.float32, device=x.device)
    out = torch.empty(B, V, dtype=torch.float32, device=x.device)
    w = None if weights is None else reference.ties_weights(weights, E, x.device)
    _run(mod, x, "ties_merge", x, w, float(theta), 0 if elect == "vote" else 1, means, out)
    # The kernel's row means are non-finite exactly when a row holds NaN, +inf or |x| > 2^96.
    if not bool(torch.isfinite(means).all()):
        _ties_bad_logits(x)
    return out.view(*lead, V)


def _ties_bad_logits(x: torch.Tensor):
    """Raise the error for logits that hold NaN, +inf or a finite value beyond 2^96 (only on the error path)."""
    if bool(torch.isnan(x).any()) or bool((x == math.inf).any()):
        raise ValueError("ties_merge: logits must be finite or -inf, got NaN or +inf")
    big = x.float().abs().masked_fill(x == -math.inf, 0).max()
    raise ValueError(f"ties_merge: logits must be -inf or finite with |x| <= 2^96 (about 7.9e28), got "
                     f"{float(big):.4g}")


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
    if x.numel():
        # min and max propagate NaN and show +-inf: one reduction pass, no bool tensor of x's size
        # (torch.isfinite(x).all() costs several times the kernel on CPU).
        lo, hi = torch.aminmax(x)
        if not bool(torch.isfinite(lo) & torch.isfinite(hi)):
            raise ValueError(f"{op}: x must be finite, got NaN or inf")
    mod = _kernels_for(op, x)
    if mod is None:
        return reference.kv_quant2(x, group_size=group_size, axis=axis)
    R, L, C = reference.canonical_3d(x.shape, axis)
    ng, nb = -(-L // group_size), -(-L // 4)
    x3 = x.reshape(R, L, C).contiguous()
    codes = torch.empty(R, nb, C, dtype=torch.uint8, device=x.device)
    scale = torch.empty(R, ng, C, dtype=x.dtype, device=x.device)
    zero = torch.empty(R, ng, C, dtype=x.dtype, device=x.device)
    _run(mod, x, "kv_quant2", x3, int(group_size), codes, scale, zero)
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
    G = q.group_size
    ng, nb = -(-L // G), -(-L // 4)
    _check_tensor(op, "q.codes", q.codes, dtypes=(torch.uint8,))
    _check_tensor(op, "q.scale", q.scale, dtypes=_FLOATS)
    _check_tensor(op, "q.zero", q.zero, dtypes=_FLOATS)
    _check_same_device(op, codes=q.codes, scale=q.scale, zero=q.zero)
    if q.codes.numel() != R * nb * C or q.scale.numel() != R * ng * C or q.zero.shape != q.scale.shape \
            or q.zero.dtype != q.scale.dtype:
        raise ValueError(f"{op}: q's codes {tuple(q.codes.shape)}, scale {tuple(q.scale.shape)} and zero "
                         f"{tuple(q.zero.shape)} do not fit shape {tuple(q.shape)} with group_size {G}")
    mod = _kernels_for(op, q.codes)
    if mod is None:
        return reference.kv_dequant2(q, dtype=dtype)
    out = torch.empty(R, L, C, dtype=dtype or q.scale.dtype, device=q.codes.device)
    _run(mod, q.codes, "kv_dequant2", q.codes.reshape(R, nb, C).contiguous(), q.scale.reshape(R, ng, C).contiguous(),
         q.zero.reshape(R, ng, C).contiguous(), int(G), out)
    return out.view(q.shape)
