"""KV caches that hold less: KIVI 2-bit asymmetric quantisation as a transformers ``Cache``.

``KIVICache`` plugs into any HF causal LM (``model(..., cache=KIVICache())`` or ``generate(..., cache=...)``).
Per layer it holds

- keys: quantised per channel (``kv_quant2(axis=-2)``: a group is ``group_size`` consecutive tokens of one
  channel) in blocks of ``residual_length`` tokens; the newest 1..residual_length keys stay in full precision
  and are quantised as one block when the next token would make them more than ``residual_length``;
- values: quantised per token (``kv_quant2(axis=-1)``: a group is ``group_size`` consecutive channels) outside
  a sliding full-precision window of the last ``residual_length`` tokens.

A prefill longer than ``residual_length`` is quantised in bulk, by the same rules. The tokens of the call that
adds them attend to their own full-precision states (as transformers' ``QuantizedLayer`` does); later calls
see them dequantised. So with ``residual_length`` >= the sequence length nothing is ever quantised and the
outputs equal ``DynamicCache``'s exactly.

Weakness, shared with transformers' ``QuantizedCache``: every forward dequantises the whole quantised history
to a full-precision copy for the model's attention (HF's attention takes dense K/V). Memory at rest shrinks
(``nbytes()``), the transient copy per layer does not, and each step costs O(sequence) dequantisation.
"""
from __future__ import annotations

import functools

import torch
from transformers.cache_utils import Cache, CacheLayerMixin

from .op_types import QuantizedKV
from .ops import kv_dequant2, kv_quant2


KV_MODES = ("full", "kivi")


def _nbytes(t: torch.Tensor | None) -> int:
    return 0 if t is None else t.numel() * t.element_size()


def _cat_quantized(a: QuantizedKV | None, b: QuantizedKV) -> QuantizedKV:
    """``a`` followed by ``b`` along the token dim (-2 of the original [B, H, N, D]); both have b's axis."""
    if a is None:
        return b
    # Tokens are dim -2 of codes, scale and zero for both axes: per token (-1) every token has its own rows;
    # per channel (-2) the caller only joins blocks whose length is a whole number of groups and of bytes.
    shape = torch.Size((*b.shape[:-2], a.shape[-2] + b.shape[-2], b.shape[-1]))
    return QuantizedKV(torch.cat([a.codes, b.codes], dim=-2), torch.cat([a.scale, b.scale], dim=-2),
                       torch.cat([a.zero, b.zero], dim=-2), shape, b.axis, b.group_size)


def _select_quantized(q: QuantizedKV | None, fn) -> QuantizedKV | None:
    """Apply a batch-dim operation (select, repeat, reorder) to every tensor of ``q``."""
    if q is None:
        return None
    codes = fn(q.codes)
    return QuantizedKV(codes, fn(q.scale), fn(q.zero), torch.Size((codes.shape[0], *q.shape[1:])), q.axis,
                       q.group_size)


class KIVILayer(CacheLayerMixin):
    """One model layer of a ``KIVICache``. ``keys`` / ``values`` are the full-precision parts [B, H, n, D]."""

    is_sliding = False
    is_croppable = False  # crop works only inside the full-precision key block, see `crop`

    def __init__(self, group_size: int = 32, residual_length: int = 128):
        super().__init__()
        _check_config(group_size, residual_length)
        self.group_size = group_size
        self.residual_length = residual_length
        self.cumulative_length = 0
        # Keys join into one QuantizedKV when a block is a whole number of bytes (4 codes); otherwise a list.
        self._qkeys: list[QuantizedKV] = []
        self._qvalues: QuantizedKV | None = None

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        self.device = key_states.device
        self.dtype = key_states.dtype
        self.keys = key_states[..., :0, :]
        self.values = value_states[..., :0, :]
        self.is_initialized = True

    @property
    def quantized_keys(self) -> list[QuantizedKV]:
        """The quantised key blocks, oldest first (per channel, axis=-2); together the first n_q tokens."""
        return list(self._qkeys)

    @property
    def quantized_values(self) -> QuantizedKV | None:
        """The quantised values (per token, axis=-1) of every token older than the full-precision window."""
        return self._qvalues

    def _dequantized(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The quantised history back in the model's dtype: keys, values [B, H, n_q, D] (n_q may be 0)."""
        keys = [kv_dequant2(q, dtype=self.dtype) for q in self._qkeys]
        dk = torch.cat(keys, dim=-2) if len(keys) > 1 else keys[0] if keys else self.keys[..., :0, :]
        dv = kv_dequant2(self._qvalues, dtype=self.dtype) if self._qvalues is not None else self.values[..., :0, :]
        return dk, dv

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs
               ) -> tuple[torch.Tensor, torch.Tensor]:
        """Add [B, H, n, D] keys and values; return the whole history (dequantised part, then full precision)."""
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        self.cumulative_length += key_states.shape[-2]
        dk, dv = self._dequantized()
        keys = torch.cat([self.keys, key_states], dim=-2)
        values = torch.cat([self.values, value_states], dim=-2)
        out_k = keys if dk.shape[-2] == 0 else torch.cat([dk, keys], dim=-2)
        out_v = values if dv.shape[-2] == 0 else torch.cat([dv, values], dim=-2)
        self._store(keys, values)
        return out_k, out_v

    def _store(self, keys: torch.Tensor, values: torch.Tensor) -> None:
        """Keep the full-precision tails, quantising what falls out of them (KIVI's two rules)."""
        R, G = self.residual_length, self.group_size
        n = keys.shape[-2]
        # Keys: whole blocks of R tokens, leaving 1..R in full precision (none quantised while n <= R).
        nq = (n - 1) // R * R if n else 0
        if nq:
            block = kv_quant2(keys[..., :nq, :].contiguous(), group_size=G, axis=-2)
            if self._qkeys and self._qkeys[-1].shape[-2] % 4 == 0:  # the last block ends on a byte and a group
                self._qkeys[-1] = _cat_quantized(self._qkeys[-1], block)
            else:
                self._qkeys.append(block)
            keys = keys[..., nq:, :]
        # Values: a sliding window of the last R tokens; each older token quantised on its own channels.
        nv = values.shape[-2] - R
        if nv > 0:
            self._qvalues = _cat_quantized(self._qvalues,
                                           kv_quant2(values[..., :nv, :].contiguous(), group_size=G, axis=-1))
            values = values[..., nv:, :]
        # Copies, not views: a view would keep the whole concatenated tensor alive.
        self.keys, self.values = keys.clone(), values.clone()

    def nbytes(self) -> int:
        """Bytes held: codes, scales and zero points of the quantised parts, plus the full-precision parts."""
        held = sum(q.nbytes() for q in self._qkeys) + (self._qvalues.nbytes() if self._qvalues is not None else 0)
        return held + _nbytes(self.keys) + _nbytes(self.values)

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self.cumulative_length + query_length, 0

    def get_seq_length(self) -> int:
        return self.cumulative_length

    def get_max_length(self) -> int:
        return -1

    def reset(self) -> None:
        self.keys = self.values = None
        self.is_initialized = False
        self._qkeys, self._qvalues = [], None
        super().reset()

    def crop(self, tokens_to_remove: int) -> None:
        """Drop the last ``-tokens_to_remove`` tokens (a negative count, as ``DynamicLayer.crop`` takes).

        Only tokens whose keys are still in full precision can go: a quantised key group mixes the tokens it
        holds, so cutting into one would need a lossy re-quantisation."""
        if tokens_to_remove > 0:
            raise ValueError(f"KIVICache.crop: tokens_to_remove must be <= 0 (tokens to drop, negated), "
                             f"got {tokens_to_remove}")
        drop = -tokens_to_remove
        if drop == 0 or not self.is_initialized:
            return
        if drop > self.keys.shape[-2]:
            raise ValueError(f"KIVICache.crop: can drop at most the {self.keys.shape[-2]} tokens whose keys are in "
                             f"full precision, got {drop}")
        # The value window always holds at least as many tokens as the full-precision keys, so both are slices.
        self.keys = self.keys[..., :-drop, :].clone()
        self.values = self.values[..., :-drop, :].clone()
        self.cumulative_length -= drop

    def _batch_apply(self, fn) -> None:
        if not self.is_initialized:
            return
        self.keys, self.values = fn(self.keys), fn(self.values)
        self._qkeys = [_select_quantized(q, fn) for q in self._qkeys]
        self._qvalues = _select_quantized(self._qvalues, fn)

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        self._batch_apply(lambda t: t.index_select(0, beam_idx.to(t.device)))

    def batch_repeat_interleave(self, repeats: int) -> None:
        self._batch_apply(lambda t: t.repeat_interleave(repeats, dim=0))

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        self._batch_apply(lambda t: t[indices, ...])


def _check_config(group_size, residual_length) -> None:
    if isinstance(group_size, bool) or not isinstance(group_size, int) or group_size <= 0:
        raise ValueError(f"KIVICache: group_size must be a positive int, got {group_size!r}")
    if isinstance(residual_length, bool) or not isinstance(residual_length, int) or residual_length <= 0 \
            or residual_length % group_size:
        raise ValueError(f"KIVICache: residual_length must be a positive multiple of group_size={group_size}, "
                         f"got {residual_length!r}")


class KIVICache(Cache):
    """KIVI 2-bit KV cache: keys per channel, values per token, the newest ``residual_length`` in full precision.

    ``residual_length`` must be a multiple of ``group_size`` (key blocks are whole groups of tokens). Layers
    are created lazily on the first forward, so no model config is needed. ``nbytes()`` is what it holds.
    """

    def __init__(self, group_size: int = 32, residual_length: int = 128):
        _check_config(group_size, residual_length)
        self.group_size, self.residual_length = group_size, residual_length
        super().__init__(layer_class_to_replicate=functools.partial(KIVILayer, group_size=group_size,
                                                                    residual_length=residual_length))

    def __repr__(self):
        return f"KIVICache(group_size={self.group_size}, residual_length={self.residual_length}, " \
               f"layers={len(self.layers)})"

    def nbytes(self) -> int:
        """Bytes held over all layers: 2-bit codes, scales, zero points and the full-precision parts."""
        return sum(layer.nbytes() for layer in self.layers)


def new_cache(kv: str, config, *, group_size: int = 32, residual_length: int = 128) -> Cache:
    """A fresh cache for a model with ``config``: ``kv="full"`` a DynamicCache, ``"kivi"`` a KIVICache."""
    if kv == "full":
        from transformers import DynamicCache

        return DynamicCache(config=config)
    if kv == "kivi":
        return KIVICache(group_size=group_size, residual_length=residual_length)
    raise ValueError(f"new_cache: kv must be one of {KV_MODES}, got {kv!r}")


def cache_nbytes(cache: Cache | None) -> int:
    """Bytes a cache holds: ``nbytes()`` where it has one, else the key and value tensors of its layers."""
    if cache is None:
        return 0
    if hasattr(cache, "nbytes"):
        return int(cache.nbytes())
    return sum(_nbytes(getattr(layer, "keys", None)) + _nbytes(getattr(layer, "values", None))
               for layer in cache.layers)
