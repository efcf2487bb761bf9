"""The perplexity-probing router: rank experts by how well they predict a short preview, or the prompt.

``route_by="preview"`` (the default): the engine generates a preview of ``preview_tokens`` tokens greedily with
the consensus of all experts, and every expert scores that text conditioned on the prompt.
``route_by="prompt"`` (PackLLM, arXiv 2404.11531): every expert scores the user's prompt itself, conditioned on
what its own template puts before it, before the first step (no preview).
Scores are in bits per byte (per byte, never per token, so experts with different tokenizers are comparable).
Per prompt, the best ``top_m`` experts are kept and weighted by exp(-(bpb - best bpb) / router_temperature) in
the consensus; the others get 0.
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
    preview_tokens: int = setting(5, "the router's preview length in tokens (with more than one expert and "
                                  "route_by=preview)", integer=True, lo=0)
    route_by: str = setting("preview", "what the router scores: the preview (every expert reads the consensus's "
                            "first preview_tokens tokens) or the prompt (every expert reads the user's prompt "
                            "before the first step, PackLLM)", choices=("preview", "prompt"))
    router_temperature: float = setting(1.0, "the router's consensus weights are exp(-(bits per byte - the best's) "
                                        "/ this): lower follows the best-scoring expert more", number=True, lo=0,
                                        lo_open=True)

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
    nbytes = [max(len(t.encode()), 1) for t in continuations] * runner.roles
    return _teacher_bits(runner, rows, spans, nbytes)


def prompt_bits_per_byte(runner, prompts: list[str], *, chat: bool) -> torch.Tensor:
    """[R, B]: -log2 p(prompt | the template's head) per byte of prompt text, for every role of ``runner``,
    teacher-forced (PackLLM's score). Where nothing comes before the prompt (raw text, no system prompt, no start
    token), its first token has no context and is left out of the score, bytes included."""
    tok, rows, spans, nbytes = runner.tokenizer, [], [], []
    for e in runner.experts:
        head = e.prompt_head_ids(chat=chat)
        for p in prompts:
            body = tok.encode(p, add_special_tokens=False, split_special_tokens=True)
            unscored = body[:1] if not head else []
            rows.append(head + body)
            spans.append(len(body) - len(unscored))
            nbytes.append(max(len(p.encode()) - len(tok.decode(unscored).encode()), 1))
    return _teacher_bits(runner, rows, spans, nbytes)


def _teacher_bits(runner, rows: list[list[int]], spans: list[int], nbytes: list[int]) -> torch.Tensor:
    """[R, B]: -log2 p of the last ``spans[i]`` tokens of each row (roles' rows in order), divided by ``nbytes``."""
    # Only the positions that predict a scored token: the whole rows' logits would be [N, L, V].
    keep = max(spans) + 1
    logits, ids = runner.teacher_forced(rows, keep)  # [N, keep, V], [N, L]
    targets = ids[:, ids.shape[1] - keep + 1:, None]
    logp = torch.log_softmax(logits[:, :-1].float(), dim=-1).gather(-1, targets)[..., 0]  # [N, keep-1]
    bits = [-float(logp[i, keep - 1 - n:].sum()) / math.log(2) if n else 0.0 for i, n in enumerate(spans)]
    return (torch.tensor(bits) / torch.tensor(nbytes, dtype=torch.float32)).view(runner.roles, -1)


def select(bpb: torch.Tensor, top_m: int | None, temperature: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    """(kept [E, B] bool, weights [E, B] float32) from scores [E, B]; lower bits per byte is better. A kept
    expert's weight is exp(-(bpb - best) / temperature)."""
    E = bpb.shape[0]
    m = E if top_m is None else min(top_m, E)
    order = torch.argsort(bpb, dim=0, stable=True)  # ties: the expert listed first wins
    kept = torch.zeros_like(bpb, dtype=torch.bool)
    kept.scatter_(0, order[:m], True)
    best = bpb.min(dim=0, keepdim=True).values
    weights = torch.where(kept, torch.exp(-(bpb - best) / temperature), torch.zeros_like(bpb))
    return kept, weights.float()


class Preview:
    """The router over one generation. With ``route_by="preview"``: while the first ``tokens`` steps (the
    preview) are written, sums each expert's log-probability of the chosen tokens from the logits it produced
    anyway; then ``route`` scores every expert in bits per byte (experts on another tokenizer re-read prompt +
    preview, teacher-forced). With ``route_by="prompt"``: ``route_prompt`` scores the prompts before the first
    step. Either way it keeps the best ``top_m`` per prompt."""

    def __init__(self, runners, bridged: list[bool], batch: int, *, tokens: int, top_m: int | None, chat: bool,
                 temperature: float = 1.0):
        self.runners, self.bridged, self.tokens, self.top_m, self.chat = runners, bridged, tokens, top_m, chat
        self.temperature = temperature
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
        return self._choose(bpb, "preview")

    def route_prompt(self, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor, list[list[dict]]]:
        """(weights [E, B], kept [E, B] bool, per prompt the route records) from how well each expert reads
        the prompt (PackLLM)."""
        bpb = torch.cat([prompt_bits_per_byte(r, prompts, chat=self.chat) for r in self.runners], dim=0)
        return self._choose(bpb, "prompt")

    def _choose(self, bpb: torch.Tensor, scored: str) -> tuple[torch.Tensor, torch.Tensor, list[list[dict]]]:
        kept, weights = select(bpb, self.top_m, self.temperature)
        experts = [e for r in self.runners for e in r.experts]
        records = [[{"expert": e.name, "scored": scored, "bits_per_byte": round(float(bpb[i, b]), 4),
                     "kept": bool(kept[i, b]), "weight": round(float(weights[i, b]), 4)}
                    for i, e in enumerate(experts)] for b in range(bpb.shape[1])]
        return weights, kept, records
