"""MiniCache: merging the archived states of two adjacent layers (see the package docstring)."""
from __future__ import annotations

import math

import torch

from .stores import Retained, cat_tokens, nbytes_of

# SLERP weight of layer l+1's direction: ~0.6 in MiniCache re-implementations, and the best of 0.5 / 0.6 / 0.8
# measured on SmolLM2-135M (README).
MERGE_T = 0.6
# Angle / pi above which a token pair stays unmerged: only directions within 45 degrees merge. A quality-safe
# default: on SmolLM2-135M no adjacent layers are that close, and merging further apart breaks it (README).
MERGE_THRESHOLD = 0.25


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



class PairStream:
    """The archive of one kind of state (keys or values) of layers (l, l+1), MiniCache style: merged, or split.

    The first tokens layer l+1 archives decide, once, how the pair is stored: merged where that costs fewer
    bytes than split (each layer's own store, as if unmerged), split otherwise, i.e. where so many token pairs
    are retained that merging would cost more than it saves.

    merged    the merged directions ``dirs`` (a PlainStore, or a QuantStore under KIVI), model dtype [B, H, n, D];
              ``mags`` each layer's magnitudes [B, H, n, 1], model dtype; ``retained`` where layer l+1 keeps its own
              vector (a Retained: mask and vectors, 2-bit under KIVI)
    split     ``own``: each layer's store, exactly as an unmerged layer keeps its archive
    pending   layer l's archived tokens that layer l+1's have not met yet [B, H, p, D] (empty between forwards)
    """

    def __init__(self, new_store, retained: Retained, *, t: float, threshold: float):
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
            self.pending = cat_tokens(self.pending, x)
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
        self.mags = [cat_tokens(m, new) for m, new in zip(self.mags, (ma.unsqueeze(-1), mb.unsqueeze(-1)))]
        if self.split is None:  # the first tokens: keep whichever form holds them in fewer bytes
            own = (self.new_store(), self.new_store())
            own[0].add(xa)
            own[1].add(x)
            self.split = own[0].nbytes() + own[1].nbytes() <= self.nbytes() - nbytes_of(self.pending)
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
        return own + self.dirs.nbytes() + self.retained.nbytes() + sum(nbytes_of(t) for t in (*self.mags, self.pending))

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


class PairSide:
    """One layer's view of a PairStream. Layer l (side 0) owns it: counts its bytes, moves and resets it."""

    def __init__(self, stream: PairStream, side: int):
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
