"""KV caches that hold less, as transformers ``Cache``s: KIVI 2-bit quantisation and MiniCache layer merging.

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

MiniCache (``MiniCache``, or ``KIVICache(merge_layers=True)`` on top of KIVI) merges adjacent layers (l, l+1)
for l = merge_start, merge_start + 2, ... < num_layers - 1. It only touches the tokens that leave the
full-precision window (the ones KIVI would quantise); per token, head and kind of state (keys, values):

- magnitude m = ||x|| and direction u = x / m of both layers' [D] vectors (a zero vector takes the other
  layer's direction, so nothing is NaN);
- the angle theta between the two directions, and d = theta / pi in [0, 1];
- one merged direction per pair, SLERP(u_l, u_{l+1}; t) = sin((1 - t) theta) / sin(theta) u_l
  + sin(t theta) / sin(theta) u_{l+1} (a plain lerp when sin(theta) is ~0), both magnitudes in the model dtype;
- where d > merge_threshold the tokens stay unmerged ("retained"): the merged slot holds u_l and layer l+1
  keeps its own vector, listed by a bool mask [n, B, H] (one byte per token and head); under KIVI that vector
  is stored 2-bit on its own (``kv_quant2(axis=-1)``, groups of ``group_size`` channels, keys too: a lone
  vector has no token group to quantise per channel), in full precision for MiniCache alone;
- on read each layer gets m * direction back (its own vector where retained). Under KIVI the merged
  direction is what gets quantised (keys per channel, values per token, by the rules above).

Retained tokens cost a merged pair more than they save: per token and head, a merged pair with every token
retained holds what two unmerged layers hold plus the two magnitudes and the mask byte (when group_size
divides the head dim). So the first tokens a pair archives (per kind) decide, once, how it is stored: merged
where that holds them in fewer bytes than two unmerged layers would, else split, each layer archiving its
tokens exactly as an unmerged layer of the same cache does (then outputs and bytes equal the unmerged cache's).
The decision is not revisited: later tokens retained more often cost at most the magnitudes and the mask.

Layer l's update runs before layer l+1's in a forward, and each must return its whole history at once: layer
l's newly archived tokens wait in full precision (``pending``) until layer l+1's states of the same tokens
arrive, later in the same forward. Layers are created lazily, on the first forward: without
``config`` the number of layers is known only when the second forward starts. Until then the layers whose role
depends on it (from merge_start on; all of them when merge_start is None, i.e. mid-depth) keep their archived
tokens in full precision, and a ``merge_start`` out of range raises there; pass ``config=model.config`` to
compress from the first forward and check merge_start in the constructor (``new_cache`` does).

Weakness, shared with transformers' ``QuantizedCache``: every forward restores (dequantises, multiplies out)
the whole archived history to a full-precision copy for the model's attention (HF's attention takes dense
K/V). Memory at rest shrinks (``nbytes()``), the transient copy per layer does not, and each step costs
O(sequence) restoring.
"""
from __future__ import annotations

import dataclasses

from transformers.cache_utils import Cache

from ..settings import check_fields, setting

from .caches import KIVICache, MiniCache
from .layers import KIVILayer, MiniCacheLayer
from .merging import MERGE_T, MERGE_THRESHOLD, merge_states
from .stores import nbytes_of

KV_MODES = ("full", "kivi", "minicache", "kivi+minicache")

__all__ = ["KV_MODES", "KVSettings", "new_cache", "cache_nbytes", "KIVICache", "MiniCache", "KIVILayer", "MiniCacheLayer",
           "merge_states", "MERGE_T", "MERGE_THRESHOLD"]


@dataclasses.dataclass(kw_only=True)
class KVSettings:
    """The experts' KV caches (fields of DLMoMConfig)."""

    kv: str = setting("full", "each expert's KV cache: full (DynamicCache), kivi (2-bit keys per channel, values "
                      "per token), minicache (adjacent deep layers merged) or kivi+minicache", choices=KV_MODES)
    kv_group_size: int = setting(32, "KIVI: elements per quantisation group", integer=True, lo=1)
    kv_residual_length: int = setting(128, "KIVI / MiniCache: newest tokens kept in full precision (KIVI: a "
                                      "multiple of kv_group_size)", integer=True, lo=1)
    kv_merge_start: int | None = setting(None, "MiniCache: the first merged layer (none: mid-depth)",
                                         integer=True, lo=0, optional=True)
    kv_merge_t: float = setting(MERGE_T, "MiniCache: SLERP weight of the deeper layer's direction", number=True,
                                lo=0, hi=1)
    kv_merge_threshold: float = setting(MERGE_THRESHOLD, "MiniCache: angle / pi past which a token pair stays "
                                        "unmerged", number=True, lo=0, hi=1)

    def __post_init__(self):
        check_fields(self)
        check_kv_residual(self)

    def new_cache(self, config, kind: str | None = None) -> Cache:
        """A fresh cache of these settings (of ``kind`` instead of ``kv`` when given) for a model's config."""
        return new_cache(kind or self.kv, config, group_size=self.kv_group_size,
                         residual_length=self.kv_residual_length, merge_start=self.kv_merge_start,
                         merge_t=self.kv_merge_t, merge_threshold=self.kv_merge_threshold)


def check_kv_residual(settings) -> None:
    """kv_residual_length must be a whole number of KIVI groups (key blocks are whole groups of tokens)."""
    if settings.kv_residual_length % settings.kv_group_size:
        raise ValueError(f"{type(settings).__name__}: kv_residual_length must be a multiple of kv_group_size="
                         f"{settings.kv_group_size}, got {settings.kv_residual_length!r}")


def new_cache(kv: str, config, *, group_size: int = 32, residual_length: int = 128, merge_start: int | None = None,
              merge_t: float = MERGE_T, merge_threshold: float = MERGE_THRESHOLD) -> Cache:
    """A fresh cache of kind ``kv`` (one of KV_MODES) for a model with ``config``: "full" a DynamicCache,
    "kivi" a KIVICache, "minicache" a MiniCache, "kivi+minicache" a KIVICache with merge_layers=True."""
    merge = dict(merge_start=merge_start, merge_t=merge_t, merge_threshold=merge_threshold, config=config)
    if kv == "full":
        from transformers import DynamicCache

        return DynamicCache(config=config)
    if kv == "kivi":
        return KIVICache(group_size=group_size, residual_length=residual_length)
    if kv == "minicache":
        return MiniCache(residual_length=residual_length, **merge)
    if kv == "kivi+minicache":
        return KIVICache(group_size=group_size, residual_length=residual_length, merge_layers=True, **merge)
    raise ValueError(f"new_cache: kv must be one of {KV_MODES}, got {kv!r}")


def cache_nbytes(cache: Cache | None) -> int:
    """Bytes a cache holds: ``nbytes()`` where it has one, else the key and value tensors of its layers."""
    if cache is None:
        return 0
    if hasattr(cache, "nbytes"):
        return int(cache.nbytes())
    return sum(nbytes_of(getattr(layer, "keys", None)) + nbytes_of(getattr(layer, "values", None))
               for layer in cache.layers)
