"""The five ops as torch.library custom ops (``torch.ops.dlmom.*``), their native runners and device errors.

``dlmom.ops`` checks the arguments (metadata only) and then calls the runners below. In plain eager mode it
calls them directly: the dispatcher round trip of a custom op costs several times a small kernel. Whenever
torch traces or transforms the call (``torch.compile``, ``torch.export``, a dispatch or torch-function mode,
FakeTensors or another tensor subclass, autograd on an input that requires grad) it calls the registered op
instead, whose fake (meta) implementation gives the output shapes without running anything.

Value errors (ids out of range, NaN logits, NaN weights, non-finite KV values) are found by the kernels in
their own pass over the data. The C++ kernels raise ``ValueError`` at once. The CUDA kernels record the first
one in a small status buffer on the device instead (no host sync per op); ``raise_pending_errors`` reads and
clears it once (the engine calls it once per decode step, where it synchronises anyway), and
``DLMOM_STRICT_OPS=1`` checks after every op for debugging. The reference backend raises at once.
"""
from __future__ import annotations

import importlib
import os
import struct
import warnings

import torch

from . import reference

__all__ = ["raise_pending_errors", "strict_ops"]

# Must match dlmom::DType in csrc/common.h.
_DTYPE_CODES = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2, torch.int32: 3, torch.int64: 4,
                torch.uint8: 5}
_BACKENDS = ("auto", "reference")
_modules: dict[str, object] = {}
_warned_no_cuda = False
_PLAIN = (torch.Tensor, torch.nn.Parameter)  # types the kernels may read directly


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


def kernels_for(op: str, t: torch.Tensor):
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
                          "ops. Rebuild with nvcc on PATH for the fused kernels.", RuntimeWarning, stacklevel=4)
        return mod
    return None


def view(t: torch.Tensor):
    """A tensor as the bindings take it: (data_ptr, dtype code, sizes, strides)."""
    return (t.data_ptr(), _DTYPE_CODES[t.dtype], t.shape, t.stride())  # (torch.Size is a tuple)


def run(mod, t: torch.Tensor, fn: str, *args):
    """Call a kernel; CUDA kernels get the status buffer and the current stream of t's device.

    Tensor arguments are passed here as tensors and turned into raw views only inside this call: ``args``
    holds a reference to each until the kernel returns, so a temporary copy made by the caller (e.g.
    ``x.contiguous()`` in the argument list) cannot be freed while native code reads it."""
    views = [view(a) if isinstance(a, torch.Tensor) else a for a in args]  # (``args`` keeps the tensors)
    if not t.is_cuda:
        return getattr(mod, fn)(*views)
    with torch.cuda.device(t.device):
        result = getattr(mod, fn)(*views, status=_status(t.device).data_ptr(),
                                  stream=torch.cuda.current_stream(t.device).cuda_stream)
    if strict_ops():
        raise_pending_errors(t.device)
    return result


def rows_unit_stride(t: torch.Tensor) -> torch.Tensor:
    """The kernels read rows with unit stride: copy only when the last dim is strided."""
    return t if t.dim() == 0 or t.stride(-1) == 1 or t.shape[-1] <= 1 else t.contiguous()


def cpu_kernels():
    """dlmom._C when the native CPU kernels are selected and built, else None (cheap: the ops' fast paths)."""
    return None if "DLMOM_BACKEND" in os.environ else _modules.get("_C") or native_module("cpu")


def eager(*tensors) -> bool:
    """Whether the kernels may be called directly: plain eager mode, plain tensors, no autograd to record.

    Otherwise dlmom.ops goes through torch.ops.dlmom, so that tracing, export, modes and subclasses see the op."""
    if torch.compiler.is_compiling() or torch._C._len_torch_dispatch_stack() or \
            torch._C._is_torch_function_mode_enabled():
        return False
    grad = torch.is_grad_enabled()
    for t in tensors:
        if t is not None and (type(t) not in _PLAIN or grad and t.requires_grad):
            return False
    return True


# ---- value errors found on CUDA ----

# Codes of the status buffer: csrc/cuda/cuda_common.cuh (ErrorCode). status = (code, a, b, c).
_ID_RANGE, _TOPK_ROW, _TIES_LOGITS, _TIES_WEIGHTS, _KV_NON_FINITE = 1, 2, 3, 4, 5
_status_buffers: dict[torch.device, torch.Tensor] = {}


def _device_key(device) -> torch.device:
    device = torch.device(device)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    return device


def _status(device) -> torch.Tensor:
    key = _device_key(device)
    buf = _status_buffers.get(key)
    if buf is None:
        buf = _status_buffers[key] = torch.zeros(4, dtype=torch.int64, device=key)
    return buf


def error_message(code: int, a: int, b: int, c: int) -> str:
    """The ValueError message of a status record (code, a, b, c) that a CUDA kernel left."""
    if code == _ID_RANGE:
        return f"soft_embed: ids must be in [0, V={b}), got {a}"
    if code == _TOPK_ROW:
        return (f"topk_packet: logits must be finite or -inf with at least one finite value per row; row {a} "
                "holds NaN, +inf or only -inf")
    if code == _TIES_LOGITS and c:
        return f"ties_merge: logits must be finite or -inf, got NaN or +inf (in row {b} of expert {a})"
    if code == _TIES_LOGITS:
        return (f"ties_merge: logits must be -inf or finite with |x| <= 2^96 (about 7.9e28), got a larger value "
                f"in row {b} of expert {a}")
    if code == _TIES_WEIGHTS:
        value = struct.unpack("f", struct.pack("I", c & 0xFFFFFFFF))[0]
        return f"ties_merge: weights must be finite and >= 0, got {value} at [{a}, {b}]"
    if code == _KV_NON_FINITE:
        return f"kv_quant2: x must be finite, got NaN or inf (in group {b} of row {a}, column {c})"
    return f"dlmom: a kernel reported an unknown error code {code}"


def raise_pending_errors(device=None) -> None:
    """Raise the first value error a CUDA kernel recorded on ``device`` (all devices when None) and clear it.

    One host sync: call it once per decode step, where the loop synchronises anyway. CPU kernels raise at
    once, so there is nothing pending for a CPU device."""
    if device is not None and torch.device(device).type != "cuda":
        return
    keys = list(_status_buffers) if device is None else [_device_key(device)]
    for key in keys:
        buf = _status_buffers.get(key)
        if buf is None:
            continue
        code, a, b, c = buf.tolist()
        if code:
            buf.zero_()
            raise ValueError(error_message(code, a, b, c))


def strict_ops() -> bool:
    """Whether DLMOM_STRICT_OPS asks to check for value errors after every CUDA op (debugging; syncs)."""
    return os.environ.get("DLMOM_STRICT_OPS", "").strip() not in ("", "0")


# ---- runners: one op on prepared inputs, native kernel or reference ----

def run_soft_embed(ids, probs, weight, scale: float, out=None) -> torch.Tensor:
    """ids, probs [B, k], weight [V, D] (rows with unit stride) -> [B, D]; into ``out`` when given (dense and
    sharing no memory with the inputs)."""
    mod = kernels_for("soft_embed", weight)
    if mod is None:
        if ids.numel():  # the C++ kernel checks the range while it reads the ids; the reference here
            lo, hi = torch.aminmax(ids)
            V = weight.shape[0]
            if int(lo) < 0 or int(hi) >= V:
                raise ValueError(f"soft_embed: ids must be in [0, V={V}), got values in [{int(lo)}, {int(hi)}]")
        result = reference.soft_embed(ids, probs, weight, scale=scale)
        return result if out is None else out.copy_(result)
    if out is None:
        out = weight.new_empty((ids.shape[0], weight.shape[1]))
    run(mod, weight, "soft_embed", ids, probs, weight, scale, out)
    return out


def run_topk_packet(x, k: int, temperature: float, top_p: float):
    """x [B, V] (rows with unit stride) -> (ids [B, k] int64, probs [B, k] float32, entropy [B] float32)."""
    mod = kernels_for("topk_packet", x)
    if mod is None:
        ids, probs, entropy = reference.topk_packet(x, k, temperature=temperature, top_p=top_p)
        bad = torch.isnan(entropy)  # NaN, +inf or no finite logit in the row
        if bool(bad.any()):
            raise ValueError("topk_packet: logits must be finite or -inf with at least one finite value per row; "
                             f"row {int(bad.nonzero()[0, 0])} holds NaN, +inf or only -inf")
        return ids, probs, entropy
    B = x.shape[0]
    ids = torch.empty(B, k, dtype=torch.int64, device=x.device)
    probs = torch.empty(B, k, dtype=torch.float32, device=x.device)
    entropy = torch.empty(B, dtype=torch.float32, device=x.device)
    t, p = reference.topk_params(temperature, top_p)
    # CUDA scratch from torch's caching allocator (visible to torch.cuda.memory_*, reused stream-ordered).
    scratch = (torch.empty(mod.topk_workspace_bytes(B, x.shape[1], k), dtype=torch.uint8, device=x.device),) \
        if x.is_cuda else ()
    run(mod, x, "topk_packet", x, k, t, p, ids, probs, entropy, *scratch)
    return ids, probs, entropy


def run_ties_merge(x, weights, theta: float, mass: bool) -> torch.Tensor:
    """x [E, B, V] (rows with unit stride), weights None, [E] or [E, B] float -> [B, V] float32."""
    mod = kernels_for("ties_merge", x)
    elect = "mass" if mass else "vote"
    if mod is None:
        if weights is not None and (not bool(torch.isfinite(weights).all()) or bool((weights < 0).any())):
            raise ValueError(f"ties_merge: weights must be finite and >= 0, got {weights.tolist()}")
        if bool(torch.isnan(x).any()) or bool((x == torch.inf).any()):
            raise ValueError("ties_merge: logits must be finite or -inf, got NaN or +inf")
        big = x.float().abs().masked_fill(x == -torch.inf, 0).amax() if x.numel() else torch.zeros(())
        if float(big) > reference.TIES_MAX_LOGIT:
            raise ValueError(f"ties_merge: logits must be -inf or finite with |x| <= 2^96 (about 7.9e28), got "
                             f"{float(big):.4g}")
        return reference.ties_merge(x, theta=theta, elect=elect, weights=weights)
    E, B, V = x.shape
    means = torch.empty(E, B, dtype=torch.float32, device=x.device)
    out = torch.empty(B, V, dtype=torch.float32, device=x.device)
    w = None if weights is None else weights.float()  # exact for float16 / bfloat16
    # theta beyond float32 trims everything; the largest float32 does the same (|v| <= 2^97) and the kernels
    # want a finite one.
    run(mod, x, "ties_merge", x, w, min(theta, reference.FLOAT32_MAX), int(mass), means, out)
    return out


def run_kv_quant2(x3, G: int):
    """x3 [R, L, C], groups of G along L -> (codes [R, ceil(L/4), C], scale, zero [R, ceil(L/G), C])."""
    mod = kernels_for("kv_quant2", x3)
    if mod is None:
        if x3.numel():  # min and max propagate NaN and show +-inf
            lo, hi = torch.aminmax(x3)
            if not bool(torch.isfinite(lo) & torch.isfinite(hi)):
                raise ValueError("kv_quant2: x must be finite, got NaN or inf")
        q = reference.kv_quant2(x3, group_size=G, axis=-2)
        return q.codes, q.scale, q.zero
    R, L, C = x3.shape
    codes = torch.empty(R, -(-L // 4), C, dtype=torch.uint8, device=x3.device)
    scale = torch.empty(R, -(-L // G), C, dtype=x3.dtype, device=x3.device)
    zero = torch.empty_like(scale)
    run(mod, x3, "kv_quant2", x3.contiguous(), G, codes, scale, zero)
    return codes, scale, zero


def run_kv_dequant2(codes, scale, zero, G: int, L: int, dtype: torch.dtype) -> torch.Tensor:
    """codes [R, ceil(L/4), C], scale, zero [R, ceil(L/G), C] -> [R, L, C] in dtype."""
    R, C = codes.shape[0], codes.shape[2]
    mod = kernels_for("kv_dequant2", codes)
    if mod is None:
        from .op_types import QuantizedKV
        return reference.kv_dequant2(QuantizedKV(codes, scale, zero, torch.Size((R, L, C)), -2, G), dtype=dtype)
    out = torch.empty(R, L, C, dtype=dtype, device=codes.device)
    run(mod, codes, "kv_dequant2", codes.contiguous(), scale.contiguous(), zero.contiguous(), G, out)
    return out


# ---- torch.library registration: the runners behind torch.ops.dlmom.*, with fake implementations ----

@torch.library.custom_op("dlmom::soft_embed", mutates_args=())
def soft_embed_op(ids: torch.Tensor, probs: torch.Tensor, weight: torch.Tensor, scale: float) -> torch.Tensor:
    return run_soft_embed(rows_unit_stride(ids), rows_unit_stride(probs), rows_unit_stride(weight), scale)


@soft_embed_op.register_fake
def _(ids, probs, weight, scale):
    return weight.new_empty((ids.shape[0], weight.shape[1]))


@torch.library.custom_op("dlmom::topk_packet", mutates_args=())
def topk_packet_op(logits: torch.Tensor, k: int, temperature: float,
                   top_p: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return run_topk_packet(rows_unit_stride(logits), k, temperature, top_p)


@topk_packet_op.register_fake
def _(logits, k, temperature, top_p):
    B = logits.shape[0]
    return (logits.new_empty((B, k), dtype=torch.int64), logits.new_empty((B, k), dtype=torch.float32),
            logits.new_empty((B,), dtype=torch.float32))


@torch.library.custom_op("dlmom::ties_merge", mutates_args=())
def ties_merge_op(logits: torch.Tensor, weights: torch.Tensor | None, theta: float, mass: bool) -> torch.Tensor:
    return run_ties_merge(rows_unit_stride(logits), weights, theta, mass)


@ties_merge_op.register_fake
def _(logits, weights, theta, mass):
    return logits.new_empty(logits.shape[1:], dtype=torch.float32)


@torch.library.custom_op("dlmom::kv_quant2", mutates_args=())
def kv_quant2_op(x: torch.Tensor, group_size: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return run_kv_quant2(x, group_size)


@kv_quant2_op.register_fake
def _(x, group_size):
    R, L, C = x.shape
    return (x.new_empty((R, (L + 3) // 4, C), dtype=torch.uint8), x.new_empty((R, (L + group_size - 1) // group_size, C)),
            x.new_empty((R, (L + group_size - 1) // group_size, C)))


@torch.library.custom_op("dlmom::kv_dequant2", mutates_args=())
def kv_dequant2_op(codes: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, group_size: int, length: int,
                   dtype: torch.dtype) -> torch.Tensor:
    return run_kv_dequant2(codes, scale, zero, group_size, length, dtype)


@kv_dequant2_op.register_fake
def _(codes, scale, zero, group_size, length, dtype):
    return codes.new_empty((codes.shape[0], length, codes.shape[2]), dtype=dtype)
