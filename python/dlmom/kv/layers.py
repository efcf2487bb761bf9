"""Cache layers: a full-precision window of the newest tokens and an archive of the older ones (KIVI 2-bit,
MiniCache merged, or full precision)."""
from __future__ import annotations

import torch
from transformers.cache_utils import CacheLayerMixin

from ..op_types import QuantizedKV
from .merging import PairSide, PairStream
from .stores import PlainStore, QuantStore, Retained, nbytes_of


def is_int(x) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def check_kivi_config(group_size, residual_length) -> None:
    if not is_int(group_size) or group_size <= 0:
        raise ValueError(f"KIVICache: group_size must be a positive int, got {group_size!r}")
    if not is_int(residual_length) or residual_length <= 0 or residual_length % group_size:
        raise ValueError(f"KIVICache: residual_length must be a positive multiple of group_size={group_size}, "
                         f"got {residual_length!r}")


def check_residual(residual_length) -> None:
    if not is_int(residual_length) or residual_length <= 0:
        raise ValueError(f"MiniCache: residual_length must be a positive int, got {residual_length!r}")


class WindowLayer(CacheLayerMixin):
    """Full-precision windows ``keys`` / ``values`` [B, H, n, D] of the newest tokens; older tokens go to an
    archive per kind (``archives``: keys, values). ``role`` is "own" (the layer's own archive), "a" / "b" (first /
    second layer of a merged pair) or None (undecided: archived tokens held in full precision)."""

    is_sliding = False
    is_croppable = False  # crop works only inside the full-precision windows, see `crop`
    key_blocks = False  # True: keys leave the window in whole blocks of residual_length (KIVI's per-channel rule)

    def __init__(self, residual_length: int | None):
        super().__init__()
        self.residual_length = residual_length  # None: a window without end, nothing is archived
        self.cumulative_length = 0
        self.role: str | None = None
        self.archives = (PlainStore(), PlainStore())

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        self.device = key_states.device
        self.dtype = key_states.dtype
        self.keys = key_states[..., :0, :]
        self.values = value_states[..., :0, :]
        self.is_initialized = True

    def become_own(self) -> None:
        """Take the layer's own archive (not merged), with the tokens archived while undecided."""
        raise NotImplementedError

    def join_pair(self, streams: tuple[PairStream, PairStream], side: int) -> None:
        """Become layer l (side 0) or l+1 (side 1) of a merged pair whose archives are ``streams`` (keys,
        values); what this layer archived while undecided goes in."""
        old, self.archives, self.role = self.archives, tuple(PairSide(s, side) for s in streams), "ab"[side]
        for store, o in zip(self.archives, old):
            if o.data is not None:
                store.add(o.data)

    def direction_store(self, kind: int):
        """A store for a merged pair's directions of keys (kind 0) or values (kind 1)."""
        raise NotImplementedError

    def retained_store(self) -> Retained:
        """A store for the vectors a merged pair's second layer keeps as its own (either kind)."""
        raise NotImplementedError

    def archived(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The archived history back in the model's dtype: keys, values [B, H, n_archived, D] (n may be 0)."""
        dk, dv = (a.get(self.dtype) for a in self.archives)
        return (self.keys[..., :0, :] if dk is None else dk.to(self.device)), \
            (self.values[..., :0, :] if dv is None else dv.to(self.device))

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs
               ) -> tuple[torch.Tensor, torch.Tensor]:
        """Add [B, H, n, D] keys and values; return the whole history (archived part, then full precision)."""
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        self.cumulative_length += key_states.shape[-2]
        dk, dv = self.archived()
        keys = torch.cat([self.keys, key_states], dim=-2)
        values = torch.cat([self.values, value_states], dim=-2)
        out_k = keys if dk.shape[-2] == 0 else torch.cat([dk, keys], dim=-2)
        out_v = values if dv.shape[-2] == 0 else torch.cat([dv, values], dim=-2)
        self._store(keys, values)
        return out_k, out_v

    def _store(self, keys: torch.Tensor, values: torch.Tensor) -> None:
        """Keep the full-precision windows, archiving what falls out of them."""
        R, n = self.residual_length, keys.shape[-2]
        if R is not None:
            # Keys: whole blocks of R tokens leaving 1..R (key_blocks), or a sliding window of R; values: sliding.
            nk = ((n - 1) // R * R if n else 0) if self.key_blocks else max(n - R, 0)
            nv = max(values.shape[-2] - R, 0)
            if nk:
                self.archives[0].add(keys[..., :nk, :])
                keys = keys[..., nk:, :]
            if nv:
                self.archives[1].add(values[..., :nv, :])
                values = values[..., nv:, :]
        # Copies, not views: a view would keep the whole concatenated tensor alive.
        self.keys, self.values = keys.clone(), values.clone()

    def nbytes(self) -> int:
        """Bytes held: the archives (a merged pair's counted by its first layer) and the full-precision windows."""
        return sum(a.nbytes() for a in self.archives) + nbytes_of(self.keys) + nbytes_of(self.values)

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self.cumulative_length + query_length, 0

    def get_seq_length(self) -> int:
        return self.cumulative_length

    def get_max_length(self) -> int:
        return -1

    def reset(self) -> None:
        self.keys = self.values = None
        self.is_initialized = False
        for a in self.archives:
            a.reset()
        super().reset()

    def check_crop(self, tokens_to_remove: int) -> None:
        """Raise unless ``crop(tokens_to_remove)`` can be done (see `crop`)."""
        name = type(self).__name__.removesuffix("Layer") + "Cache"
        if tokens_to_remove > 0:
            raise ValueError(f"{name}.crop: tokens_to_remove must be <= 0 (tokens to drop, negated), "
                             f"got {tokens_to_remove}")
        if self.is_initialized and -tokens_to_remove > self.keys.shape[-2]:
            raise ValueError(f"{name}.crop: can drop at most the {self.keys.shape[-2]} tokens whose keys are in "
                             f"full precision, got {-tokens_to_remove}")

    def crop(self, tokens_to_remove: int) -> None:
        """Drop the last ``-tokens_to_remove`` tokens (a negative count, as ``DynamicLayer.crop`` takes).

        Only tokens whose keys are still in full precision can go: a quantised key group mixes the tokens it
        holds, and a merged token mixes two layers, so cutting into them would need a lossy rebuild."""
        self.check_crop(tokens_to_remove)
        drop = -tokens_to_remove
        if drop == 0 or not self.is_initialized:
            return
        # The value window always holds at least as many tokens as the key window, so both are slices.
        self.keys = self.keys[..., :-drop, :].clone()
        self.values = self.values[..., :-drop, :].clone()
        self.cumulative_length -= drop

    def _batch_apply(self, fn) -> None:
        if not self.is_initialized:
            return
        self.keys, self.values = fn(self.keys), fn(self.values)
        for a in self.archives:
            a.batch_apply(fn)

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        self._batch_apply(lambda t: t.index_select(0, beam_idx.to(t.device)))

    def batch_repeat_interleave(self, repeats: int) -> None:
        self._batch_apply(lambda t: t.repeat_interleave(repeats, dim=0))

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        self._batch_apply(lambda t: t[indices.to(t.device) if torch.is_tensor(indices) else indices, ...])


class KIVILayer(WindowLayer):
    """One model layer of a ``KIVICache``. ``keys`` / ``values`` are the full-precision parts [B, H, n, D].

    Made on its own (``KIVILayer(group_size, residual_length)``) it is a plain KIVI layer; a ``KIVICache`` with
    ``merge_layers=True`` makes the layers of merged pairs share a quantised merged archive instead."""

    key_blocks = True

    def __init__(self, group_size: int = 32, residual_length: int = 128, *, undecided: bool = False):
        check_kivi_config(group_size, residual_length)
        super().__init__(residual_length)
        self.group_size = group_size
        if not undecided:
            self.become_own()

    def become_own(self) -> None:
        own = (QuantStore(-2, self.group_size), QuantStore(-1, self.group_size))
        for store, old in zip(own, self.archives):
            if old.data is not None:  # whole blocks of keys, any number of values: the rules still hold
                store.add(old.data)
        self.archives, self.role = own, "own"

    def direction_store(self, kind: int) -> QuantStore:
        return QuantStore(-2 if kind == 0 else -1, self.group_size)

    def retained_store(self) -> Retained:
        return Retained(self.group_size)

    @property
    def quantized_keys(self) -> list[QuantizedKV]:
        """The quantised key blocks, oldest first (per channel, axis=-2); for a merged layer, the pair's directions."""
        arc = self.archives[0]
        store = arc.stream.store(arc.side) if isinstance(arc, PairSide) else arc
        return list(store.blocks) if isinstance(store, QuantStore) else []

    @property
    def quantized_values(self) -> QuantizedKV | None:
        """The quantised values (per token, axis=-1) older than the window; for a merged layer, the pair's."""
        arc = self.archives[1]
        store = arc.stream.store(arc.side) if isinstance(arc, PairSide) else arc
        return store.blocks[0] if isinstance(store, QuantStore) and store.blocks else None


class MiniCacheLayer(WindowLayer):
    """One model layer of a ``MiniCache``: full precision; a merged layer keeps the newest ``residual_length``
    tokens per layer and shares the older ones with its partner; an unmerged layer keeps everything."""

    def __init__(self, residual_length: int = 128, *, undecided: bool = False):
        check_residual(residual_length)
        super().__init__(residual_length)
        if not undecided:
            self.become_own()

    def become_own(self) -> None:
        # An unmerged layer needs no archive: put what was archived back at the front of the window.
        for kind, old in enumerate(self.archives):
            if old.data is not None:
                if kind == 0:
                    self.keys = torch.cat([old.data, self.keys], dim=-2)
                else:
                    self.values = torch.cat([old.data, self.values], dim=-2)
        self.archives, self.residual_length, self.role = (PlainStore(), PlainStore()), None, "own"

    def direction_store(self, kind: int) -> PlainStore:
        return PlainStore()

    def retained_store(self) -> Retained:
        return Retained(None)
