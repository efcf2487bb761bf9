"""Contrastive TIES consensus over the experts' next-token logits on the shared vocabulary."""
from __future__ import annotations

import dataclasses

import torch

from .ops import ties_merge
from .settings import check_fields, setting


@dataclasses.dataclass(kw_only=True)
class ConsensusSettings:
    """Contrastive TIES consensus (fields of DLMoMConfig)."""

    theta: float = setting(0.0, "TIES trim: centred logits with |v| < theta count as 0", number=True, lo=0)
    elect: str = setting("vote", "sign election per token: vote (sign of the sum of signs) or mass (sign of the "
                         "sum)", choices=("vote", "mass"))

    def __post_init__(self):
        check_fields(self)


def merge(logits: torch.Tensor, *, theta: float, elect: str, weights: torch.Tensor | None) -> torch.Tensor:
    """[E, B, V] logits -> [B, V] merged float32.

    One expert passes unchanged (consensus is the identity). ``weights`` is [E] or [E, B] (per-row router
    weights): one ``ties_merge`` call either way.
    """
    if logits.shape[0] == 1:
        return logits[0].float()
    return ties_merge(logits, theta=theta, elect=elect, weights=weights)


def agreement(logits: torch.Tensor, chosen: torch.Tensor, weights: torch.Tensor | None = None) -> torch.Tensor:
    """[B]: the fraction of (active) experts whose own argmax is the chosen token."""
    votes = (logits.argmax(-1) == chosen.view(1, -1)).float()  # [E, B]
    if weights is None:
        return votes.mean(0)
    active = (weights.view(weights.shape[0], -1) > 0).float().expand_as(votes)
    return (votes * active).sum(0) / active.sum(0).clamp(min=1)
