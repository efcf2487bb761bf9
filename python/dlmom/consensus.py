"""Consensus over the experts' next-token logits on the shared vocabulary: TIES merging or contrastive
decoding, optionally gated so that the lead expert decodes alone while it is confident.

The lead expert of a prompt is the one the others are measured against: by default the expert with the most
parameters (the first listed on ties), or with ``lead="router"`` the router's best (after its preview, or before the
first step with ``route_by="prompt"``).

- ``consensus="ties"``: contrastive TIES merging of every expert's centred logits (``ops.ties_merge``), with
  the router's weights.
- ``consensus="contrastive"``: contrastive decoding (Li et al. 2022; O'Brien and Lewis 2023): the lead's
  log-probabilities minus ``contrast`` times the others' (their router-weighted mean), over the tokens the
  lead finds plausible (p >= ``plausibility`` * its top p); every other token is -inf. With ``contrast=0``
  this is the lead's own distribution restricted to its plausible set, so greedy decoding follows the lead.
- ``consensus="auto"`` (the default): contrastive when the largest expert has at least ``AUTO_RATIO`` (2) times the parameters
  of every other (a strong and a weak model: contrastive decoding's setting), TIES otherwise (experts of one size,
  roles of one model). ``DLMoM.consensus`` is what it resolved to.
- ``gate``: the lead decodes alone (its own logits, an explicit token, no latent packet) at every step where
  its normalised entropy H / log|V| is below ``gate``; at or above it the consensus engages. 0 merges every
  step; the default 0.1 was chosen on the dev sets (docs/findings.md): level with or ahead of the strongest
  expert on every set, at about its wall time.
"""
from __future__ import annotations

import dataclasses
import math

import torch

from .ops import ties_merge
from .settings import check_fields, setting

CONSENSUS = ("ties", "contrastive", "auto")
AUTO_RATIO = 2.0  # consensus="auto": the parameter ratio from which the largest expert leads by contrast
LEADS = ("largest", "router")


@dataclasses.dataclass(kw_only=True)
class ConsensusSettings:
    """Consensus (fields of DLMoMConfig)."""

    consensus: str = setting("auto", "how the experts' logits merge: ties (TIES merging of every expert), "
                             "contrastive (the lead's log-probs minus contrast x the others'), or auto (contrastive "
                             "when the largest expert has at least twice the parameters of every other, else ties)",
                             choices=CONSENSUS)
    theta: float = setting(0.0, "TIES trim: centred logits with |v| < theta count as 0", number=True, lo=0)
    elect: str = setting("vote", "sign election per token: vote (sign of the sum of signs) or mass (sign of the "
                         "sum)", choices=("vote", "mass"))
    contrast: float = setting(0.5, "contrastive consensus: the weight of the other experts' log-probs "
                              "subtracted from the lead's", number=True, lo=0)
    plausibility: float = setting(0.1, "contrastive consensus: tokens the lead gives less than this times its "
                                  "top probability are excluded", number=True, lo=0, hi=1)
    lead: str = setting("largest", "the lead expert of a prompt: largest (most parameters; the first listed on "
                        "ties) or router (the router's best after the preview; largest before)", choices=LEADS)
    gate: float = setting(0.1, "the lead decodes alone at steps where its normalised entropy is below this; "
                          "the consensus engages at or above it (0: every step)", number=True, lo=0, hi=1)

    def __post_init__(self):
        check_fields(self)


def resolve(consensus: str, sizes: list[int]) -> str:
    """The consensus mode ("ties" or "contrastive") that ``consensus`` means for experts of these parameter
    counts: "auto" is contrastive when the largest has at least AUTO_RATIO times every other's, else ties."""
    if consensus != "auto":
        return consensus
    if len(sizes) < 2:
        return "ties"
    top, *rest = sorted(sizes, reverse=True)
    return "contrastive" if top >= AUTO_RATIO * rest[0] else "ties"


def merge(logits: torch.Tensor, *, theta: float, elect: str, weights: torch.Tensor | None) -> torch.Tensor:
    """[E, B, V] logits -> [B, V] merged float32 by TIES.

    One expert passes unchanged (consensus is the identity). ``weights`` is [E] or [E, B] (per-row router
    weights): one ``ties_merge`` call either way.
    """
    if logits.shape[0] == 1:
        return logits[0].float()
    return ties_merge(logits, theta=theta, elect=elect, weights=weights)


def lead_logits(logits: torch.Tensor, lead: torch.Tensor) -> torch.Tensor:
    """[B, V] float32: row b of expert ``lead[b]`` of [E, B, V] logits."""
    return logits[lead.to(logits.device), torch.arange(logits.shape[1], device=logits.device)].float()


def normalised_entropy(logits: torch.Tensor) -> torch.Tensor:
    """[B]: H(softmax(logits)) / log V of [B, V] logits, in [0, 1]."""
    logp = torch.log_softmax(logits.float(), dim=-1)
    h = -(logp.exp() * logp).nan_to_num(0.0).sum(-1)
    return (h / math.log(logits.shape[-1])).clamp(0.0, 1.0)


def contrastive(logits: torch.Tensor, lead: torch.Tensor, weights: torch.Tensor | None, *, contrast: float,
                plausibility: float) -> torch.Tensor:
    """[B, V] float32: log p_lead - contrast * (the others' weighted mean log p) on the lead's plausible set
    (p_lead >= plausibility * max p_lead), -inf elsewhere. ``weights``: [E, B] router weights (None: equal);
    an expert with weight 0 does not count. One expert: its logits unchanged."""
    E, B, _ = logits.shape
    if E == 1:
        return logits[0].float()
    logp = torch.log_softmax(logits.float(), dim=-1)  # [E, B, V]
    rows = torch.arange(B, device=logits.device)
    lead = lead.to(logits.device)
    strong = logp[lead, rows]  # [B, V]
    w = torch.ones(E, B, device=logits.device) if weights is None else weights.view(E, -1).expand(E, B).float()
    w = w.to(logits.device).clone()
    w[lead, rows] = 0.0  # the others only
    total = w.sum(0)  # [B]
    weak = (w.unsqueeze(-1) * logp.clamp(min=-1e4)).sum(0) / total.clamp(min=1e-30).unsqueeze(-1)
    score = strong - contrast * torch.where(total.unsqueeze(-1) > 0, weak, torch.zeros_like(weak))
    cut = strong.max(-1, keepdim=True).values + math.log(plausibility) if plausibility > 0 else None
    return score if cut is None else score.masked_fill(strong < cut, -math.inf)


def gated(logits: torch.Tensor, lead: torch.Tensor, settings: ConsensusSettings) -> torch.Tensor:
    """[B] bool: the rows where the gate keeps the lead alone (its normalised entropy below ``settings.gate``,
    compared in double: the threshold is not rounded to float32). Only the lead's rows of ``logits`` are read."""
    if settings.gate <= 0 or logits.shape[0] == 1:
        return torch.zeros(logits.shape[1], dtype=torch.bool, device=logits.device)
    return normalised_entropy(lead_logits(logits, lead)).double() < settings.gate


def combine(logits: torch.Tensor, lead: torch.Tensor, weights: torch.Tensor | None,
            settings: ConsensusSettings, *, mode: str | None = None, alone: torch.Tensor | None = None
            ) -> tuple[torch.Tensor, torch.Tensor]:
    """(merged [B, V] float32, alone [B] bool): the consensus of [E, B, V] logits, except in the rows where the
    gate keeps the lead alone (its normalised entropy below ``settings.gate``), which take the lead's logits.
    ``mode``: "ties" or "contrastive" (default: ``settings.consensus``; "auto" must be resolved first, see
    ``resolve``). ``alone``: the gate's verdict when the caller has it already (``gated`` of the same lead
    logits)."""
    s, mode = settings, mode or settings.consensus
    if mode not in ("ties", "contrastive"):
        raise ValueError(f"combine: mode must be 'ties' or 'contrastive' (resolve 'auto' with consensus.resolve), "
                         f"got {mode!r}")
    alone = gated(logits, lead, s) if alone is None else alone
    if bool(alone.all()):  # the lead alone everywhere: no merge to compute
        return lead_logits(logits, lead), alone
    if mode == "contrastive":
        merged = contrastive(logits, lead, weights, contrast=s.contrast, plausibility=s.plausibility)
    else:
        merged = merge(logits, theta=s.theta, elect=s.elect, weights=weights)
    alone = alone.to(merged.device)
    if not bool(alone.any()):
        return merged, alone
    return torch.where(alone.unsqueeze(-1), lead_logits(logits, lead), merged), alone


def agreement(logits: torch.Tensor, chosen: torch.Tensor, weights: torch.Tensor | None = None) -> torch.Tensor:
    """[B]: the fraction of (active) experts whose own argmax is the chosen token."""
    votes = (logits.argmax(-1) == chosen.view(1, -1)).float()  # [E, B]
    if weights is None:
        return votes.mean(0)
    active = (weights.view(weights.shape[0], -1) > 0).float().expand_as(votes)
    return (votes * active).sum(0) / active.sum(0).clamp(min=1)
