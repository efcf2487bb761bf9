"""Archives of a compressed KV cache: where a layer keeps the tokens older than its full-precision window.

Every store follows ``ArchiveStore``: states [B, H, n, D] go in oldest first and come back whole.
"""
from __future__ import annotations

from typing import Protocol

import torch

from ..op_types import QuantizedKV
from ..ops import kv_dequant2, kv_quant2


class ArchiveStore(Protocol):
    """What a layer's archive (of keys or of values) does."""

    def add(self, x: torch.Tensor) -> None:
        """Append tokens [B, H, n, D] (after those already held)."""

    def get(self, dtype: torch.dtype) -> torch.Tensor | None:
        """Every token held, [B, H, n, D] in ``dtype`` (None while empty)."""

    def nbytes(self) -> int:
        """Bytes held."""

    def batch_apply(self, fn) -> None:
        """Apply a batch-dim operation (select, repeat, reorder rows) to everything held."""

    def reset(self) -> None:
        """Hold nothing."""


def nbytes_of(t: torch.Tensor | None) -> int:
    return 0 if t is None else t.numel() * t.element_size()


def cat_tokens(a: torch.Tensor | None, b: torch.Tensor) -> torch.Tensor:
    """``a`` followed by ``b`` along the token dim -2; a copy, so that no view keeps a bigger tensor alive."""
    return b.clone() if a is None else torch.cat([a, b], dim=-2)


def cat_quantized(a: QuantizedKV | None, b: QuantizedKV) -> QuantizedKV:
    """``a`` followed by ``b`` along the token dim (-2 of the original [B, H, N, D]); both have b's axis."""
    if a is None:
        return b
    # Tokens are dim -2 of codes, scale and zero for both axes: per token (-1) every token has its own rows;
    # per channel (-2) the caller only joins blocks whose length is a whole number of groups and of bytes.
    shape = torch.Size((*b.shape[:-2], a.shape[-2] + b.shape[-2], b.shape[-1]))
    return QuantizedKV(torch.cat([a.codes, b.codes], dim=-2), torch.cat([a.scale, b.scale], dim=-2),
                       torch.cat([a.zero, b.zero], dim=-2), shape, b.axis, b.group_size)


def select_quantized(q: QuantizedKV, fn) -> QuantizedKV:
    """Apply a batch-dim operation (select, repeat, reorder) to every tensor of ``q``."""
    codes = fn(q.codes)
    return QuantizedKV(codes, fn(q.scale), fn(q.zero), torch.Size((codes.shape[0], *q.shape[1:])), q.axis,
                       q.group_size)



class PlainStore:
    """Full-precision states [B, H, n, D], oldest first: a MiniCache's merged directions, or a layer's archived
    tokens while its role (merged or not) is still undecided."""

    def __init__(self):
        self.data: torch.Tensor | None = None

    def add(self, x: torch.Tensor) -> None:
        self.data = cat_tokens(self.data, x)

    def get(self, dtype: torch.dtype) -> torch.Tensor | None:
        return self.data

    def nbytes(self) -> int:
        return nbytes_of(self.data)

    def batch_apply(self, fn) -> None:
        if self.data is not None:
            self.data = fn(self.data)

    def reset(self) -> None:
        self.data = None


class QuantStore:
    """2-bit states, oldest first: per channel (axis=-2, KIVI's keys) or per token (axis=-1, its values)."""

    def __init__(self, axis: int, group_size: int):
        self.axis, self.group_size = axis, group_size
        # Per channel, blocks join into one QuantizedKV when the last ends on a byte (4 codes); else a list.
        self.blocks: list[QuantizedKV] = []

    def add(self, x: torch.Tensor) -> None:
        q = kv_quant2(x.contiguous(), group_size=self.group_size, axis=self.axis)
        if self.blocks and (self.axis == -1 or self.blocks[-1].shape[-2] % 4 == 0):
            self.blocks[-1] = cat_quantized(self.blocks[-1], q)
        else:
            self.blocks.append(q)

    def get(self, dtype: torch.dtype) -> torch.Tensor | None:
        parts = [kv_dequant2(q, dtype=dtype) for q in self.blocks]
        return torch.cat(parts, dim=-2) if len(parts) > 1 else parts[0] if parts else None

    def nbytes(self) -> int:
        return sum(q.nbytes() for q in self.blocks)

    def batch_apply(self, fn) -> None:
        self.blocks = [select_quantized(q, fn) for q in self.blocks]

    def reset(self) -> None:
        self.blocks = []


class Retained:
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
            self.rows = cat_quantized(self.rows, kv_quant2(new.contiguous(), group_size=self.group_size, axis=-1))
        else:
            self.rows = new.clone() if self.rows is None else torch.cat([self.rows, new])

    def put(self, out: torch.Tensor) -> None:
        """Write the retained vectors into out [B, H, n, D] (in place)."""
        if self.rows is not None:
            rows = kv_dequant2(self.rows, dtype=out.dtype) if isinstance(self.rows, QuantizedKV) else self.rows
            out.permute(2, 0, 1, 3)[self.mask.to(out.device)] = rows.to(out.device)

    def nbytes(self) -> int:
        rows = self.rows.nbytes() if isinstance(self.rows, QuantizedKV) else nbytes_of(self.rows)
        return nbytes_of(self.mask) + rows

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
            self.rows = select_quantized(self.rows, lambda t: t[idx]) if isinstance(self.rows, QuantizedKV) \
                else self.rows[idx]
            if len(self) == 0:
                self.rows = None

    def reset(self) -> None:
        self.mask = self.rows = None
