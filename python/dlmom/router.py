"""The perplexity-probing router: rank experts by how well they predict a short preview.

The engine generates a preview of ``preview_tokens`` tokens greedily with the consensus of all experts;
every expert scores that text conditioned on the prompt, in bits per byte
(per byte, never per token, so experts with different tokenizers are comparable). Per prompt, the best
``top_m`` experts are kept and weighted by exp(-(bpb - best bpb)) in the consensus; the others get 0.
"""
from __future__ import annotations

import dataclasses
import math

import torch

from .settings import check_fields, setting


@dataclasses.dataclass(kw_only=True)
class RouterSettings:
    """The router (fields of DLMoMConfig)."""

    top_m: int | None = setting(None, "experts the router keeps per prompt after the preview, the others leave "
                                "the batch (none: all)", integer=True, lo=1, optional=True)
    preview_tokens: int = setting(5, "the router's preview length in tokens (with more than one expert)",
                                  integer=True, lo=0)

    def __post_init__(self):
        check_fields(self)


def score(runners, prompts: list[str], previews: list[str], *, chat: bool) -> torch.Tensor:
    """[E, B] bits per byte of each preview under each expert (runners' roles in order), teacher-forced.
    The engine uses this for experts with another tokenizer; experts on its own vocabulary are scored
    from the log-probabilities of the preview steps themselves (no extra forward)."""
    return torch.cat([bits_per_byte(runner, prompts, previews, chat=chat) for runner in runners], dim=0)


def bits_per_byte(runner, prompts: list[str], continuations: list[str], *, chat: bool) -> torch.Tensor:
    """[R, B]: -log2 p(continuation | prompt) per byte of continuation text, for every role of ``runner``,
    teacher-forced. Per byte, not per token: comparable across tokenizers."""
    rows, spans = [], []
    for e in runner.experts:
        for p, text in zip(prompts, continuations):
            tail = runner.tokenizer.encode(text, add_special_tokens=False)
            rows.append(e.prompt_ids(p, chat=chat) + tail)
            spans.append(len(tail))
    # Only the positions that predict a continuation token: the prompt's logits would be [N, L, V].
    keep = max(spans) + 1
    logits, ids = runner.teacher_forced(rows, keep)  # [N, keep, V], [N, L]
    targets = ids[:, ids.shape[1] - keep + 1:, None]
    logp = torch.log_softmax(logits[:, :-1].float(), dim=-1).gather(-1, targets)[..., 0]  # [N, keep-1]
    bits = [-float(logp[i, keep - 1 - n:].sum()) / math.log(2) if n else 0.0 for i, n in enumerate(spans)]
    nbytes = [max(len(t.encode()), 1) for t in continuations] * runner.roles
    return (torch.tensor(bits) / torch.tensor(nbytes, dtype=torch.float32)).view(runner.roles, -1)


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


class Preview:
    """The router over one generation: while the first ``tokens`` steps (the preview) are written, sums each
    expert's log-probability of the chosen tokens from the logits it produced anyway; then ``route`` scores
    every expert in bits per byte (experts on another tokenizer re-read prompt + preview, teacher-forced) and
    keeps the best ``top_m`` per prompt."""

    def __init__(self, runners, bridged: list[bool], batch: int, *, tokens: int, top_m: int | None, chat: bool):
        self.runners, self.bridged, self.tokens, self.top_m, self.chat = runners, bridged, tokens, top_m, chat
        self.bits = [torch.zeros(r.roles, batch) for r in runners]  # [R, B] per runner

    def active(self, step: int) -> bool:
        return step < self.tokens

    def ends_at(self, step: int) -> bool:
        return step == self.tokens - 1

    def observe(self, logits: list[torch.Tensor], token: torch.Tensor, finished: torch.Tensor) -> None:
        """One preview step: each runner's logits [R, B, V] and the chosen tokens [B]."""
        for i, x in enumerate(logits):
            if not self.bridged[i]:
                picked = token.view(1, -1, 1).expand(x.shape[0], -1, 1)
                lp = torch.log_softmax(x.float(), dim=-1).gather(-1, picked)
                self.bits[i] -= torch.where(finished.to(lp.device), 0.0, lp[..., 0]).cpu() / math.log(2)

    def route(self, prompts: list[str], previews: list[str]) -> tuple[torch.Tensor, torch.Tensor, list[list[dict]]]:
        """(weights [E, B], kept [E, B] bool, per prompt the route records) from the preview texts."""
        nbytes = torch.tensor([max(len(p.encode()), 1) for p in previews], dtype=torch.float32)
        bridged = [r for i, r in enumerate(self.runners) if self.bridged[i]]
        teacher = iter(score(bridged, prompts, previews, chat=self.chat).split(
            [r.roles for r in bridged])) if bridged else iter(())
        bpb = torch.cat([next(teacher) if self.bridged[i] else self.bits[i] / nbytes
                         for i in range(len(self.runners))], dim=0)  # [E, B]
        kept, weights = select(bpb, self.top_m)
        experts = [e for r in self.runners for e in r.experts]
        records = [[{"expert": e.name, "bits_per_byte": round(float(bpb[i, b]), 4), "kept": bool(kept[i, b]),
                     "weight": round(float(weights[i, b]), 4)} for i, e in enumerate(experts)]
                   for b in range(len(prompts))]
        return weights, kept, records
