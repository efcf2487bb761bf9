"""Shaping a step's packet into what the experts are fed: the explicit token as the one-hot packet, or the
latent packet, optionally with Gumbel-softmax or Dirichlet noise (Stochastic Soft Thinking)."""
from __future__ import annotations

import dataclasses
import math

import torch

from .op_types import Packet
from .settings import check_fields, setting

NOISES = (None, "gumbel", "dirichlet")
DEFAULT_NOISE_STRENGTH = {"gumbel": 0.5, "dirichlet": 4.0}  # tau; alpha (Stochastic Soft Thinking)


@dataclasses.dataclass(kw_only=True)
class PacketSettings:
    """How a step's merged distribution becomes a packet and a token (fields of DLMoMConfig); the defaults
    0.6 / 0.95 are Soft Thinking's."""

    top_k: int = setting(16, "packet size: the top-k tokens of the merged distribution", integer=True, lo=1)
    temperature: float = setting(0.6, "packet temperature (0: the one-hot argmax)", number=True, lo=0)
    top_p: float = setting(0.95, "packet nucleus mass", number=True, lo=0, hi=1, lo_open=True)
    do_sample: bool = setting(False, "sample explicit tokens from the packet instead of taking its top-1",
                              flag="--sample")
    noise: str | None = setting(None, "noise on latent packets: gumbel (Gumbel-softmax) or dirichlet",
                                choices=NOISES)
    noise_strength: float | None = setting(None, "the noise's tau (gumbel) or alpha (dirichlet); none: 0.5 "
                                           "for gumbel, 4 for dirichlet", number=True, lo=0, lo_open=True, optional=True)

    def __post_init__(self):
        check_fields(self)


def add_noise(probs: torch.Tensor, kind: str, strength: float, rng: torch.Generator) -> torch.Tensor:
    """Gumbel-softmax (tau) or Dirichlet (alpha * p) noise on packet probabilities [B, k]; zeros stay 0."""
    live = probs > 0
    if kind == "gumbel":
        u = torch.rand(probs.shape, generator=rng, device=probs.device, dtype=probs.dtype).clamp(1e-10, 1 - 1e-10)
        scores = (probs.clamp(min=1e-30).log() - torch.log(-torch.log(u))) / strength
        return torch.softmax(scores.masked_fill(~live, -math.inf), dim=-1)
    # Gamma(alpha, 1) draws as torch.distributions.Gamma makes them, from this generation's generator.
    alpha = (strength * probs).clamp(min=1e-6)
    sample = torch._standard_gamma(alpha, generator=rng).clamp(min=torch.finfo(alpha.dtype).tiny) * live
    return sample / sample.sum(-1, keepdim=True).clamp(min=1e-30)


def choose_token(packet: Packet, *, sample: bool, rng: torch.Generator) -> torch.Tensor:
    """[B] the explicit token of each row: the packet's top-1, or a draw from its probabilities."""
    if not sample:
        return packet.ids[:, 0]
    pick = torch.multinomial(packet.probs, 1, generator=rng)
    return packet.ids.gather(1, pick)[:, 0]


def shape_feed(packet: Packet, token: torch.Tensor, latent: torch.Tensor, *, noise: str | None, strength: float,
               rng: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """(ids, probs) [B, k] to feed: latent rows (``latent`` [B] bool) take the packet (noised when ``noise``),
    the others their ``token`` as the one-hot packet {(token, 1.0)}."""
    ids, probs = packet.ids.clone(), packet.probs.clone()
    if noise is not None and bool(latent.any()):
        probs = torch.where(latent.view(-1, 1), add_noise(probs, noise, strength, rng), probs)
    one_hot = torch.zeros_like(probs)
    one_hot[:, 0] = 1.0
    ids[:, 0] = torch.where(latent, ids[:, 0], token)
    return ids, torch.where(latent.view(-1, 1), probs, one_hot)
