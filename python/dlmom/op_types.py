"""Result types of the ops, shared by the kernels and the pure-torch reference."""
from __future__ import annotations

from typing import NamedTuple

import torch


class Packet(NamedTuple):
    """A Soft Belief Packet: the top-k of a distribution plus the entropy of the whole of it.

    ids      int64   [B, k]  token ids, most probable first (ties: lower id first)
    probs    float32 [B, k]  renormalised over the kept entries (dropped entries are 0)
    entropy  float32 [B]     Shannon entropy of softmax(logits) at temperature 1, divided by log V
    """

    ids: torch.Tensor
    probs: torch.Tensor
    entropy: torch.Tensor


class QuantizedKV(NamedTuple):
    """A tensor quantised to 2 bits per element by ``kv_quant2``.

    codes  uint8  ``shape`` with dim ``axis`` replaced by ceil(L / 4): four 2-bit codes per byte along
           ``axis``, least significant bits first
    scale, zero  ``shape`` with dim ``axis`` replaced by ceil(L / group_size), in the input's dtype
    shape  the original shape; axis is -1 (groups over channels) or -2 (groups over tokens)
    """

    codes: torch.Tensor
    scale: torch.Tensor
    zero: torch.Tensor
    shape: torch.Size
    axis: int
    group_size: int

    def nbytes(self) -> int:
        """Bytes held: codes, scales and zero points."""
        return sum(t.numel() * t.element_size() for t in (self.codes, self.scale, self.zero))
