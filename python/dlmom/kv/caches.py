"""The caches: ``KIVICache`` (2-bit, optionally with MiniCache merging) and ``MiniCache`` (full precision)."""
from __future__ import annotations

import torch
from transformers.cache_utils import Cache

from .layers import KIVILayer, MiniCacheLayer, WindowLayer, check_kivi_config, check_residual, is_int
from .merging import MERGE_T, MERGE_THRESHOLD, PairStream


def _check_merge(name: str, merge_start, merge_t, merge_threshold) -> None:
    if merge_start is not None and (not is_int(merge_start) or merge_start < 0):
        raise ValueError(f"{name}: merge_start must be None (mid-depth) or an int >= 0, got {merge_start!r}")
    for arg, value in (("merge_t", merge_t), ("merge_threshold", merge_threshold)):
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value <= 1:
            raise ValueError(f"{name}: {arg} must be a number in [0, 1], got {value!r}")


def _num_layers(config) -> int:
    text = config.get_text_config(decoder=True) if hasattr(config, "get_text_config") else config
    return int(text.num_hidden_layers)


class MergingCache(Cache):
    """A Cache of WindowLayers that merges layer pairs (l, l+1), l = start, start + 2, ... < num_layers - 1."""

    def __init__(self, name: str, *, merge: bool, merge_start, merge_t, merge_threshold, config):
        _check_merge(name, merge_start, merge_t, merge_threshold)
        self._name, self.merge_layers = name, merge
        self.merge_start, self.merge_t, self.merge_threshold = merge_start, float(merge_t), float(merge_threshold)
        self.num_layers: int | None = None
        super().__init__(layer_class_to_replicate=self._next_layer)
        if config is not None:
            self._set_num_layers(_num_layers(config))

    def _new_layer(self, undecided: bool) -> WindowLayer:
        raise NotImplementedError

    def _start(self) -> int | None:
        """The first merged layer, or None while it depends on a number of layers not yet known."""
        if self.merge_start is not None or self.num_layers is None:
            return self.merge_start
        return max(min(self.num_layers // 2, self.num_layers - 2), 0)

    def _role(self, i: int) -> str | None:
        """Layer i's role: "own", "a" / "b" (first / second of a pair), or None (not known yet)."""
        start = self._start() if self.merge_layers else 0
        if not self.merge_layers or (start is not None and i < start):
            return "own"
        if start is None:
            return None
        if (i - start) % 2:
            return "b"
        if self.num_layers is None:
            return None  # "a" if layer i + 1 turns up
        return "a" if i + 1 < self.num_layers else "own"

    def _next_layer(self) -> WindowLayer:
        # Cache.update calls this (layer_class_to_replicate) to grow the layer list one layer at a time.
        i = len(self.layers)
        role = self._role(i)
        layer = self._new_layer(undecided=role != "own")
        if role == "b":
            self._join(self.layers[i - 1], layer)
        return layer

    def _join(self, a: WindowLayer, b: WindowLayer) -> None:
        """Make a and b a merged pair; what they archived while undecided goes in, a's first."""
        streams = [PairStream(lambda kind=kind: a.direction_store(kind), a.retained_store(), t=self.merge_t,
                               threshold=self.merge_threshold) for kind in (0, 1)]
        for side, layer in enumerate((a, b)):
            layer.join_pair(streams, side)

    def _set_num_layers(self, n: int) -> None:
        """Learn the number of layers: check merge_start, then settle every undecided layer's role."""
        if self.merge_layers:
            if n < 2:
                raise ValueError(f"{self._name}: merging layers needs a model with at least 2 layers, got {n}")
            if self.merge_start is not None and self.merge_start > n - 2:
                raise ValueError(f"{self._name}: merge_start must be in [0, num_layers - 2 = {n - 2}] for a model "
                                 f"with {n} layers, got {self.merge_start}")
        self.num_layers = n
        for i, layer in enumerate(self.layers):
            if layer.role is None:
                role = self._role(i)
                if role == "a":
                    self._join(layer, self.layers[i + 1])
                else:  # "own"; a "b" is never undecided here, its "a" joined it first
                    layer.become_own()

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int, *args, **kwargs
               ) -> tuple[torch.Tensor, torch.Tensor]:
        if self.num_layers is None and layer_idx == 0 and self.layers and self.layers[0].is_initialized:
            self._set_num_layers(len(self.layers))  # a second forward: the first one met every layer
        return super().update(key_states, value_states, layer_idx, *args, **kwargs)

    def crop(self, tokens_to_remove: int) -> None:
        for layer in self.layers:  # all or nothing: check every layer before cropping any
            layer.check_crop(tokens_to_remove)
        super().crop(tokens_to_remove)

    def nbytes(self) -> int:
        """Bytes held over all layers: archives (codes, scales, zero points, magnitudes, retained tokens, pending
        tokens) and the full-precision windows."""
        return sum(layer.nbytes() for layer in self.layers)

    def _merge_repr(self) -> str:
        return f"merge_start={self.merge_start}, merge_t={self.merge_t}, merge_threshold={self.merge_threshold}, "


class KIVICache(MergingCache):
    """KIVI 2-bit KV cache: keys per channel, values per token, the newest ``residual_length`` in full precision.

    ``residual_length`` must be a multiple of ``group_size`` (key blocks are whole groups of tokens). Layers
    are created lazily on the first forward, so no model config is needed. ``nbytes()`` is what it holds.

    ``merge_layers=True`` adds MiniCache: layers (l, l+1), l = merge_start, merge_start + 2, ... share one
    quantised direction per archived token (see the module docstring); ``merge_start=None`` is mid-depth
    (num_layers // 2); ``merge_t`` the SLERP weight of layer l+1; tokens whose directions are further apart than
    ``merge_threshold`` (angle / pi) stay unmerged (2-bit, per token), and a pair whose first archived tokens
    would cost more merged than unmerged is stored as two plain KIVI layers. ``config`` (the model's) gives the
    number of layers at once.
    """

    def __init__(self, group_size: int = 32, residual_length: int = 128, *, merge_layers: bool = False,
                 merge_start: int | None = None, merge_t: float = MERGE_T, merge_threshold: float = MERGE_THRESHOLD,
                 config=None):
        check_kivi_config(group_size, residual_length)
        if not isinstance(merge_layers, bool):
            raise ValueError(f"KIVICache: merge_layers must be True or False, got {merge_layers!r}")
        self.group_size, self.residual_length = group_size, residual_length
        super().__init__("KIVICache", merge=merge_layers, merge_start=merge_start, merge_t=merge_t,
                         merge_threshold=merge_threshold, config=config)

    def _new_layer(self, undecided: bool) -> KIVILayer:
        return KIVILayer(self.group_size, self.residual_length, undecided=undecided)

    def __repr__(self):
        merge = f"merge_layers=True, {self._merge_repr()}" if self.merge_layers else ""
        return f"KIVICache(group_size={self.group_size}, residual_length={self.residual_length}, {merge}" \
               f"layers={len(self.layers)})"


class MiniCache(MergingCache):
    """MiniCache in full precision: layers (l, l+1), l = merge_start, merge_start + 2, ... < num_layers - 1
    share one direction per token older than the newest ``residual_length`` (each keeps its magnitudes);
    tokens whose directions are further apart than ``merge_threshold`` (angle / pi) stay unmerged, and a pair
    whose first archived tokens would cost more merged than unmerged is not merged. The other layers, and
    every layer's newest ``residual_length`` tokens, are kept as ``DynamicCache`` keeps them.
    ``merge_start=None`` is mid-depth (num_layers // 2); ``config`` (the model's) gives the number of layers
    at once. ``nbytes()`` is what it holds."""

    def __init__(self, residual_length: int = 128, *, merge_start: int | None = None, merge_t: float = MERGE_T,
                 merge_threshold: float = MERGE_THRESHOLD, config=None):
        check_residual(residual_length)
        self.residual_length = residual_length
        super().__init__("MiniCache", merge=True, merge_start=merge_start, merge_t=merge_t,
                         merge_threshold=merge_threshold, config=config)

    def _new_layer(self, undecided: bool) -> MiniCacheLayer:
        return MiniCacheLayer(self.residual_length, undecided=undecided)

    def __repr__(self):
        return f"MiniCache(residual_length={self.residual_length}, {self._merge_repr()}layers={len(self.layers)})"
