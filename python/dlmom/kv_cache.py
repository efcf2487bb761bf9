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

import math

import torch
from transformers.cache_utils import Cache, CacheLayerMixin

from .op_types import QuantizedKV
from .ops import kv_dequant2, kv_quant2


KV_MODES = ("full", "kivi", "minicache", "kivi+minicache")
# SLERP weight of layer l+1's direction: ~0.6 in MiniCache re-implementations, and the best of 0.5 / 0.6 / 0.8
# measured on SmolLM2-135M (README).
MERGE_T = 0.6
# Angle / pi above which a token pair stays unmerged: only directions within 45 degrees merge. A quality-safe
# default: on SmolLM2-135M no adjacent layers are that close, and merging further apart breaks it (README).
MERGE_THRESHOLD = 0.25


def _nbytes(t: torch.Tensor | None) -> int:
    return 0 if t is None else t.numel() * t.element_size()


def _cat(a: torch.Tensor | None, b: torch.Tensor) -> torch.Tensor:
    """``a`` followed by ``b`` along the token dim -2; a copy, so that no view keeps a bigger tensor alive."""
    return b.clone() if a is None else torch.cat([a, b], dim=-2)


def _cat_quantized(a: QuantizedKV | None, b: QuantizedKV) -> QuantizedKV:
    """``a`` followed by ``b`` along the token dim (-2 of the original [B, H, N, D]); both have b's axis."""
    if a is None:
        return b
    # Tokens are dim -2 of codes, scale and zero for both axes: per token (-1) every token has its own rows;
    # per channel (-2) the caller only joins blocks whose length is a whole number of groups and of bytes.
    shape = torch.Size((*b.shape[:-2], a.shape[-2] + b.shape[-2], b.shape[-1]))
    return QuantizedKV(torch.cat([a.codes, b.codes], dim=-2), torch.cat([a.scale, b.scale], dim=-2),
                       torch.cat([a.zero, b.zero], dim=-2), shape, b.axis, b.group_size)


def _select_quantized(q: QuantizedKV, fn) -> QuantizedKV:
    """Apply a batch-dim operation (select, repeat, reorder) to every tensor of ``q``."""
    codes = fn(q.codes)
    return QuantizedKV(codes, fn(q.scale), fn(q.zero), torch.Size((codes.shape[0], *q.shape[1:])), q.axis,
                       q.group_size)


# ---------------------------------------------------------------- merging two layers' states

def merge_states(xa: torch.Tensor, xb: torch.Tensor, *, t: float, threshold: float
                 ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """MiniCache's merge of two layers' states xa, xb [..., D] (same shape), per vector.

    Returns (direction float32 [..., D], magnitude of xa, magnitude of xb [...] in their dtype, keep bool [...]):
    direction is SLERP(xa / |xa|, xb / |xb|; t), or xa's own direction where keep, i.e. where the normalised
    angular distance theta / pi exceeds ``threshold``. A zero vector takes the other's direction.
    """
    a, b = xa.float(), xb.float()
    ma, mb = torch.linalg.vector_norm(a, dim=-1), torch.linalg.vector_norm(b, dim=-1)
    ua = a / ma.clamp_min(torch.finfo(torch.float32).tiny).unsqueeze(-1)
    ub = b / mb.clamp_min(torch.finfo(torch.float32).tiny).unsqueeze(-1)
    ua = torch.where((ma == 0).unsqueeze(-1), ub, ua)
    ub = torch.where((mb == 0).unsqueeze(-1), ua, ub)
    # 2 atan2(|ua - ub|, |ua + ub|) is accurate at every angle (arccos of a dot product is not near 0 and pi).
    theta = 2 * torch.atan2(torch.linalg.vector_norm(ua - ub, dim=-1), torch.linalg.vector_norm(ua + ub, dim=-1))
    sin = torch.sin(theta)
    tiny = sin < 1e-6  # (anti)parallel: the SLERP weights are 0 / 0; lerp instead
    safe = torch.where(tiny, torch.ones_like(sin), sin)
    wa = torch.where(tiny, torch.full_like(sin, 1 - t), torch.sin((1 - t) * theta) / safe)
    wb = torch.where(tiny, torch.full_like(sin, t), torch.sin(t * theta) / safe)
    keep = theta / math.pi > threshold
    direction = torch.where(keep.unsqueeze(-1), ua, wa.unsqueeze(-1) * ua + wb.unsqueeze(-1) * ub)
    return direction, ma.to(xa.dtype), mb.to(xb.dtype), keep


# ---------------------------------------------------------------- archives: tokens older than the window

class _PlainStore:
    """Full-precision states [B, H, n, D], oldest first: a MiniCache's merged directions, or a layer's archived
    tokens while its role (merged or not) is still undecided."""

    def __init__(self):
        self.data: torch.Tensor | None = None

    def add(self, x: torch.Tensor) -> None:
        self.data = _cat(self.data, x)

    def get(self, dtype: torch.dtype) -> torch.Tensor | None:
        return self.data

    def nbytes(self) -> int:
        return _nbytes(self.data)

    def batch_apply(self, fn) -> None:
        if self.data is not None:
            self.data = fn(self.data)

    def reset(self) -> None:
        self.data = None


class _QuantStore:
    """2-bit states, oldest first: per channel (axis=-2, KIVI's keys) or per token (axis=-1, its values)."""

    def __init__(self, axis: int, group_size: int):
        self.axis, self.group_size = axis, group_size
        # Per channel, blocks join into one QuantizedKV when the last ends on a byte (4 codes); else a list.
        self.blocks: list[QuantizedKV] = []

    def add(self, x: torch.Tensor) -> None:
        q = kv_quant2(x.contiguous(), group_size=self.group_size, axis=self.axis)
        if self.blocks and (self.axis == -1 or self.blocks[-1].shape[-2] % 4 == 0):
            self.blocks[-1] = _cat_quantized(self.blocks[-1], q)
        else:
            self.blocks.append(q)

    def get(self, dtype: torch.dtype) -> torch.Tensor | None:
        parts = [kv_dequant2(q, dtype=dtype) for q in self.blocks]
        return torch.cat(parts, dim=-2) if len(parts) > 1 else parts[0] if parts else None

    def nbytes(self) -> int:
        return sum(q.nbytes() for q in self.blocks)

    def batch_apply(self, fn) -> None:
        self.blocks = [_select_quantized(q, fn) for q in self.blocks]

    def reset(self) -> None:
        self.blocks = []


class _Retained:
    """Layer l+1's own vectors where a merged pair keeps it unmerged: a bool mask [n, B, H] (token-major, so that
    appending tokens appends rows) and the vectors [m, D] in the mask's row-major order (``mask.nonzero()``'s):
    in full precision (``group_size`` None, MiniCache) or 2-bit per vector (``kv_quant2(axis=-1)``, under KIVI:
    each vector stands alone, so keys and values alike are quantised over their channels)."""

    def __init__(self, group_size: int | None):
        self.group_size = group_size
        self.mask: torch.Tensor | None = None
        self.rows: torch.Tensor | QuantizedKV | None = None  # None while m == 0

    def __len__(self) -> int:
        return 0 if self.rows is None else self.rows.shape[0]

    def add(self, keep: torch.Tensor, x: torch.Tensor) -> None:
        """Append tokens: keep [B, H, n] says where x [B, H, n, D] is retained."""
        keep = keep.permute(2, 0, 1)  # [n, B, H]
        self.mask = keep.clone() if self.mask is None else torch.cat([self.mask, keep])
        if not keep.any():
            return
        new = x.permute(2, 0, 1, 3)[keep]  # [m_new, D], in the mask's order
        if self.group_size is not None:
            # [m, D] rows: dim -2 is the row dim, so the token-dim join of QuantizedKVs appends rows.
            self.rows = _cat_quantized(self.rows, kv_quant2(new.contiguous(), group_size=self.group_size, axis=-1))
        else:
            self.rows = new.clone() if self.rows is None else torch.cat([self.rows, new])

    def put(self, out: torch.Tensor) -> None:
        """Write the retained vectors into out [B, H, n, D] (in place)."""
        if self.rows is not None:
            rows = kv_dequant2(self.rows, dtype=out.dtype) if isinstance(self.rows, QuantizedKV) else self.rows
            out.permute(2, 0, 1, 3)[self.mask.to(out.device)] = rows.to(out.device)

    def nbytes(self) -> int:
        rows = self.rows.nbytes() if isinstance(self.rows, QuantizedKV) else _nbytes(self.rows)
        return _nbytes(self.mask) + rows

    def batch_apply(self, fn) -> None:
        if self.mask is None:
            return
        # Lay each row's number out where its mask entry is, move that like any [B, H, n] tensor, read it back.
        where = torch.full(self.mask.shape, -1, dtype=torch.long, device=self.mask.device)
        where[self.mask] = torch.arange(len(self), device=self.mask.device)
        where = fn(where.permute(1, 2, 0)).permute(2, 0, 1)
        self.mask = where >= 0
        if self.rows is not None:
            idx = where[self.mask]  # each row is quantised on its own, so moving rows is exact
            self.rows = _select_quantized(self.rows, lambda t: t[idx]) if isinstance(self.rows, QuantizedKV) \
                else self.rows[idx]
            if len(self) == 0:
                self.rows = None

    def reset(self) -> None:
        self.mask = self.rows = None


class _PairStream:
    """The archive of one kind of state (keys or values) of layers (l, l+1), MiniCache style: merged, or split.

    The first tokens layer l+1 archives decide, once, how the pair is stored: merged where that costs fewer
    bytes than split (each layer's own store, as if unmerged), split otherwise, i.e. where so many token pairs
    are retained that merging would cost more than it saves.

    merged    the merged directions ``dirs`` (a _PlainStore, or a _QuantStore under KIVI), model dtype [B, H, n, D];
              ``mags`` each layer's magnitudes [B, H, n, 1], model dtype; ``retained`` where layer l+1 keeps its own
              vector (a _Retained: mask and vectors, 2-bit under KIVI)
    split     ``own``: each layer's store, exactly as an unmerged layer keeps its archive
    pending   layer l's archived tokens that layer l+1's have not met yet [B, H, p, D] (empty between forwards)
    """

    def __init__(self, new_store, retained: _Retained, *, t: float, threshold: float):
        self.new_store, self.retained, self.t, self.threshold = new_store, retained, t, threshold
        self.dirs = new_store()
        self.split: bool | None = None  # None until layer l+1 archives its first tokens
        self.own: tuple | None = None
        self.pending: torch.Tensor | None = None
        self.mags: list[torch.Tensor | None] = [None, None]
        self.n = 0  # tokens archived by layer l+1

    def __len__(self) -> int:
        return self.n

    def store(self, side: int):
        """The store holding side's quantised (or full-precision) states: its own when split, else the directions."""
        return self.own[side] if self.split else self.dirs

    def add(self, side: int, x: torch.Tensor) -> None:
        """Archive layer l's (side 0) or layer l+1's (side 1) tokens; side 1 merges them with side 0's."""
        if self.split:
            self.n += x.shape[-2] if side == 1 else 0
            self.own[side].add(x)
            return
        if side == 0:
            self.pending = _cat(self.pending, x)
            return
        n, p = x.shape[-2], 0 if self.pending is None else self.pending.shape[-2]
        if p < n or self.pending.shape[:-2] != x.shape[:-2] or self.pending.shape[-1] != x.shape[-1]:
            raise ValueError(f"MiniCache: the second layer of a merged pair archives {tuple(x.shape)} but the first "
                             f"has {tuple(self.pending.shape) if p else None} pending; merged layers need states "
                             f"of one shape, updated in order")
        xa = self.pending[..., :n, :]
        self.pending = self.pending[..., n:, :].clone() if p > n else None
        direction, ma, mb, keep = merge_states(xa.to(x.device), x, t=self.t, threshold=self.threshold)
        self.n += n
        self.retained.add(keep, x)
        self.dirs.add(direction.to(x.dtype))
        self.mags = [_cat(m, new) for m, new in zip(self.mags, (ma.unsqueeze(-1), mb.unsqueeze(-1)))]
        if self.split is None:  # the first tokens: keep whichever form holds them in fewer bytes
            own = (self.new_store(), self.new_store())
            own[0].add(xa)
            own[1].add(x)
            self.split = own[0].nbytes() + own[1].nbytes() <= self.nbytes() - _nbytes(self.pending)
            if self.split:
                if self.pending is not None:
                    own[0].add(self.pending)
                self.own, self.pending, self.mags = own, None, [None, None]
                self.dirs.reset()
                self.retained.reset()

    def get(self, side: int, dtype: torch.dtype) -> torch.Tensor | None:
        """Layer l's (side 0) or l+1's (side 1) archived states [B, H, n (+ pending on side 0), D]."""
        if self.split:
            return self.own[side].get(dtype)
        out = self.dirs.get(dtype)
        if out is not None:
            out = self.mags[side] * out
            if side == 1:
                self.retained.put(out)
        if side == 0 and self.pending is not None:
            out = self.pending if out is None else torch.cat([out.to(self.pending.device), self.pending], dim=-2)
        return out

    def nbytes(self) -> int:
        own = sum(store.nbytes() for store in self.own) if self.split else 0
        return own + self.dirs.nbytes() + self.retained.nbytes() + sum(_nbytes(t) for t in (*self.mags, self.pending))

    def batch_apply(self, fn) -> None:
        for store in self.own or ():
            store.batch_apply(fn)
        self.retained.batch_apply(fn)
        self.dirs.batch_apply(fn)
        self.mags = [None if m is None else fn(m) for m in self.mags]
        self.pending = None if self.pending is None else fn(self.pending)

    def reset(self) -> None:
        self.dirs.reset()
        self.retained.reset()
        self.pending, self.mags, self.split, self.own, self.n = None, [None, None], None, None, 0


class _PairSide:
    """One layer's view of a _PairStream. Layer l (side 0) owns it: counts its bytes, moves and resets it."""

    def __init__(self, stream: _PairStream, side: int):
        self.stream, self.side = stream, side

    def add(self, x: torch.Tensor) -> None:
        self.stream.add(self.side, x)

    def get(self, dtype: torch.dtype) -> torch.Tensor | None:
        return self.stream.get(self.side, dtype)

    def nbytes(self) -> int:
        return self.stream.nbytes() if self.side == 0 else 0

    def batch_apply(self, fn) -> None:
        if self.side == 0:
            self.stream.batch_apply(fn)

    def reset(self) -> None:
        if self.side == 0:
            self.stream.reset()


# ---------------------------------------------------------------- layers

class _WindowLayer(CacheLayerMixin):
    """Full-precision windows ``keys`` / ``values`` [B, H, n, D] of the newest tokens; older tokens go to an
    archive per kind (``_arc``: keys, values). ``role`` is "own" (the layer's own archive), "a" / "b" (first /
    second layer of a merged pair) or None (undecided: archived tokens held in full precision)."""

    is_sliding = False
    is_croppable = False  # crop works only inside the full-precision windows, see `crop`
    key_blocks = False  # True: keys leave the window in whole blocks of residual_length (KIVI's per-channel rule)

    def __init__(self, residual_length: int | None):
        super().__init__()
        self.residual_length = residual_length  # None: a window without end, nothing is archived
        self.cumulative_length = 0
        self.role: str | None = None
        self._arc = (_PlainStore(), _PlainStore())

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        self.device = key_states.device
        self.dtype = key_states.dtype
        self.keys = key_states[..., :0, :]
        self.values = value_states[..., :0, :]
        self.is_initialized = True

    def become_own(self) -> None:
        """Take the layer's own archive (not merged), with the tokens archived while undecided."""
        raise NotImplementedError

    def direction_store(self, kind: int):
        """A store for a merged pair's directions of keys (kind 0) or values (kind 1)."""
        raise NotImplementedError

    def retained_store(self) -> _Retained:
        """A store for the vectors a merged pair's second layer keeps as its own (either kind)."""
        raise NotImplementedError

    def _archived(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The archived history back in the model's dtype: keys, values [B, H, n_archived, D] (n may be 0)."""
        dk, dv = (a.get(self.dtype) for a in self._arc)
        return (self.keys[..., :0, :] if dk is None else dk.to(self.device)), \
            (self.values[..., :0, :] if dv is None else dv.to(self.device))

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs
               ) -> tuple[torch.Tensor, torch.Tensor]:
        """Add [B, H, n, D] keys and values; return the whole history (archived part, then full precision)."""
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        self.cumulative_length += key_states.shape[-2]
        dk, dv = self._archived()
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
                self._arc[0].add(keys[..., :nk, :])
                keys = keys[..., nk:, :]
            if nv:
                self._arc[1].add(values[..., :nv, :])
                values = values[..., nv:, :]
        # Copies, not views: a view would keep the whole concatenated tensor alive.
        self.keys, self.values = keys.clone(), values.clone()

    def nbytes(self) -> int:
        """Bytes held: the archives (a merged pair's counted by its first layer) and the full-precision windows."""
        return sum(a.nbytes() for a in self._arc) + _nbytes(self.keys) + _nbytes(self.values)

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self.cumulative_length + query_length, 0

    def get_seq_length(self) -> int:
        return self.cumulative_length

    def get_max_length(self) -> int:
        return -1

    def reset(self) -> None:
        self.keys = self.values = None
        self.is_initialized = False
        for a in self._arc:
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
        for a in self._arc:
            a.batch_apply(fn)

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        self._batch_apply(lambda t: t.index_select(0, beam_idx.to(t.device)))

    def batch_repeat_interleave(self, repeats: int) -> None:
        self._batch_apply(lambda t: t.repeat_interleave(repeats, dim=0))

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        self._batch_apply(lambda t: t[indices.to(t.device) if torch.is_tensor(indices) else indices, ...])


class KIVILayer(_WindowLayer):
    """One model layer of a ``KIVICache``. ``keys`` / ``values`` are the full-precision parts [B, H, n, D].

    Made on its own (``KIVILayer(group_size, residual_length)``) it is a plain KIVI layer; a ``KIVICache`` with
    ``merge_layers=True`` makes the layers of merged pairs share a quantised merged archive instead."""

    key_blocks = True

    def __init__(self, group_size: int = 32, residual_length: int = 128, *, undecided: bool = False):
        _check_config(group_size, residual_length)
        super().__init__(residual_length)
        self.group_size = group_size
        if not undecided:
            self.become_own()

    def become_own(self) -> None:
        own = (_QuantStore(-2, self.group_size), _QuantStore(-1, self.group_size))
        for store, old in zip(own, self._arc):
            if old.data is not None:  # whole blocks of keys, any number of values: the rules still hold
                store.add(old.data)
        self._arc, self.role = own, "own"

    def direction_store(self, kind: int) -> _QuantStore:
        return _QuantStore(-2 if kind == 0 else -1, self.group_size)

    def retained_store(self) -> _Retained:
        return _Retained(self.group_size)

    @property
    def quantized_keys(self) -> list[QuantizedKV]:
        """The quantised key blocks, oldest first (per channel, axis=-2); for a merged layer, the pair's directions."""
        arc = self._arc[0]
        store = arc.stream.store(arc.side) if isinstance(arc, _PairSide) else arc
        return list(store.blocks) if isinstance(store, _QuantStore) else []

    @property
    def quantized_values(self) -> QuantizedKV | None:
        """The quantised values (per token, axis=-1) older than the window; for a merged layer, the pair's."""
        arc = self._arc[1]
        store = arc.stream.store(arc.side) if isinstance(arc, _PairSide) else arc
        return store.blocks[0] if isinstance(store, _QuantStore) and store.blocks else None


class MiniCacheLayer(_WindowLayer):
    """One model layer of a ``MiniCache``: full precision; a merged layer keeps the newest ``residual_length``
    tokens per layer and shares the older ones with its partner; an unmerged layer keeps everything."""

    def __init__(self, residual_length: int = 128, *, undecided: bool = False):
        _check_residual(residual_length)
        super().__init__(residual_length)
        if not undecided:
            self.become_own()

    def become_own(self) -> None:
        # An unmerged layer needs no archive: put what was archived back at the front of the window.
        for kind, old in enumerate(self._arc):
            if old.data is not None:
                if kind == 0:
                    self.keys = torch.cat([old.data, self.keys], dim=-2)
                else:
                    self.values = torch.cat([old.data, self.values], dim=-2)
        self._arc, self.residual_length, self.role = (_PlainStore(), _PlainStore()), None, "own"

    def direction_store(self, kind: int) -> _PlainStore:
        return _PlainStore()

    def retained_store(self) -> _Retained:
        return _Retained(None)


# ---------------------------------------------------------------- configuration

def _is_int(x) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _check_config(group_size, residual_length) -> None:
    if not _is_int(group_size) or group_size <= 0:
        raise ValueError(f"KIVICache: group_size must be a positive int, got {group_size!r}")
    if not _is_int(residual_length) or residual_length <= 0 or residual_length % group_size:
        raise ValueError(f"KIVICache: residual_length must be a positive multiple of group_size={group_size}, "
                         f"got {residual_length!r}")


def _check_residual(residual_length) -> None:
    if not _is_int(residual_length) or residual_length <= 0:
        raise ValueError(f"MiniCache: residual_length must be a positive int, got {residual_length!r}")


def _check_merge(name: str, merge_start, merge_t, merge_threshold) -> None:
    if merge_start is not None and (not _is_int(merge_start) or merge_start < 0):
        raise ValueError(f"{name}: merge_start must be None (mid-depth) or an int >= 0, got {merge_start!r}")
    for arg, value in (("merge_t", merge_t), ("merge_threshold", merge_threshold)):
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value <= 1:
            raise ValueError(f"{name}: {arg} must be a number in [0, 1], got {value!r}")


def _num_layers(config) -> int:
    text = config.get_text_config(decoder=True) if hasattr(config, "get_text_config") else config
    return int(text.num_hidden_layers)


class _MergingCache(Cache):
    """A Cache of _WindowLayers that merges layer pairs (l, l+1), l = start, start + 2, ... < num_layers - 1."""

    def __init__(self, name: str, *, merge: bool, merge_start, merge_t, merge_threshold, config):
        _check_merge(name, merge_start, merge_t, merge_threshold)
        self._name, self.merge_layers = name, merge
        self.merge_start, self.merge_t, self.merge_threshold = merge_start, float(merge_t), float(merge_threshold)
        self.num_layers: int | None = None
        super().__init__(layer_class_to_replicate=self._next_layer)
        if config is not None:
            self._set_num_layers(_num_layers(config))

    def _new_layer(self, undecided: bool) -> _WindowLayer:
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

    def _next_layer(self) -> _WindowLayer:
        # Cache.update calls this (layer_class_to_replicate) to grow the layer list one layer at a time.
        i = len(self.layers)
        role = self._role(i)
        layer = self._new_layer(undecided=role != "own")
        if role == "b":
            self._join(self.layers[i - 1], layer)
        return layer

    def _join(self, a: _WindowLayer, b: _WindowLayer) -> None:
        """Make a and b a merged pair; what they archived while undecided goes in, a's first."""
        streams = [_PairStream(lambda kind=kind: a.direction_store(kind), a.retained_store(), t=self.merge_t,
                               threshold=self.merge_threshold) for kind in (0, 1)]
        for side, layer in enumerate((a, b)):
            old, layer._arc, layer.role = layer._arc, tuple(_PairSide(s, side) for s in streams), "ab"[side]
            for store, o in zip(layer._arc, old):
                if o.data is not None:
                    store.add(o.data)

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


class KIVICache(_MergingCache):
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
        _check_config(group_size, residual_length)
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


class MiniCache(_MergingCache):
    """MiniCache in full precision: layers (l, l+1), l = merge_start, merge_start + 2, ... < num_layers - 1
    share one direction per token older than the newest ``residual_length`` (each keeps its magnitudes);
    tokens whose directions are further apart than ``merge_threshold`` (angle / pi) stay unmerged, and a pair
    whose first archived tokens would cost more merged than unmerged is not merged. The other layers, and
    every layer's newest ``residual_length`` tokens, are kept as ``DynamicCache`` keeps them.
    ``merge_start=None`` is mid-depth (num_layers // 2); ``config`` (the model's) gives the number of layers
    at once. ``nbytes()`` is what it holds."""

    def __init__(self, residual_length: int = 128, *, merge_start: int | None = None, merge_t: float = MERGE_T,
                 merge_threshold: float = MERGE_THRESHOLD, config=None):
        _check_residual(residual_length)
        self.residual_length = residual_length
        super().__init__("MiniCache", merge=True, merge_start=merge_start, merge_t=merge_t,
                         merge_threshold=merge_threshold, config=config)

    def _new_layer(self, undecided: bool) -> MiniCacheLayer:
        return MiniCacheLayer(self.residual_length, undecided=undecided)

    def __repr__(self):
        return f"MiniCache(residual_length={self.residual_length}, {self._merge_repr()}layers={len(self.layers)})"


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
    return sum(_nbytes(getattr(layer, "keys", None)) + _nbytes(getattr(layer, "values", None))
               for layer in cache.layers)
