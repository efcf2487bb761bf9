"""The perplexity-probing router: rank experts by how well they predict a short preview.

The engine generates a preview of ``preview_tokens`` tokens greedily with the consensus of all experts;
every expert scores that text conditioned on the prompt, in bits per byte
(per byte, never per token, so experts with different tokenizers are comparable). Per prompt, the best
``top_m`` experts are kept and weighted by exp(-(bpb - best bpb)) in the consensus; the others get 0.
"""
from __future__ import annotations

import torch


def score(engines, prompts: list[str], previews: list[str], *, chat: bool) -> torch.Tensor:
    """[E, B] bits per byte of each preview under each expert (engines' roles in order), teacher-forced.
    The engine uses this for experts with another tokenizer; experts on its own vocabulary are scored
    from the log-probabilities of the preview steps themselves (no extra forward)."""
    return torch.cat([engine.bits_per_byte(prompts, previews, chat=chat) for engine in engines], dim=0)


def select(bpb: torch.Tensor, top_m: int | None) -> tuple[torch.Tensor, torch.Tensor]:
    """(kept [E, B] bool, weights [E, B] float32) from scores [E, B]; lower bits per byte is better."""
    E = bpb.shape[0]
    m = E if top_m is None else min(top_m, E)
    order = torch.argsort(bpb, dim=0, stable=True)  # ties: the expert listed first wins
    kept = torch.zeros_like(bpb, dtype=torch.bool)
    kept.scatter_(0, order[:m], True)
    best = bpb.min(dim=0, keepdim=True).values
    weights = torch.where(kept, torch.exp(-(bpb - best)), torch.zeros_like(bpb))
    return kept, weights.float()
