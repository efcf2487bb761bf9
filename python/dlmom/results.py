"""What a generation hands back: ``Result`` per prompt, the per-step trace records, stop strings.

The engine and the baselines both build their answers here, so a stop string cuts every method's text the
same way and every method returns the same ``Result``.
"""
from __future__ import annotations

import dataclasses

import torch


@dataclasses.dataclass
class Result:
    """One prompt's answer. text renders every step (a latent step by the top-1 token of its packet);
    trace: one record per step; route: each expert's preview score and whether it was kept; usage: per
    expert (for the whole batch) tokens prefilled, prompt tokens taken from a shared prefill instead, tokens
    decoded and the peak KV-cache bytes (a model's cache split evenly among its roles); the kv mode, wall
    and expert-forward seconds."""

    text: str
    trace: list[dict]
    route: list[dict]
    usage: dict

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def cut_at_stop(text: str, stops: list[str]) -> tuple[str, bool]:
    """(text up to the first stop string it holds, whether one was found)."""
    hit = [text.index(s) for s in stops if s in text]
    return (text[:min(hit)], True) if hit else (text, False)


class Transcripts:
    """Per prompt of a batch: the ids shown so far, the text they render, the trace, and whether it finished
    (end of sequence in explicit mode, or a stop string)."""

    def __init__(self, tokenizer, batch: int, *, eos: set[int], stops: list[str]):
        self.tokenizer, self.eos, self.stops = tokenizer, eos, stops
        self.shown: list[list[int]] = [[] for _ in range(batch)]
        self.traces: list[list[dict]] = [[] for _ in range(batch)]
        self.texts = [""] * batch
        self.finished = torch.zeros(batch, dtype=torch.bool)

    def decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True)

    def last_tokens(self) -> list[int | None]:
        """Per prompt the last token shown (None for a finished prompt or before the first)."""
        return [None if self.finished[b] else s[-1] if s else None for b, s in enumerate(self.shown)]

    def record(self, b: int, *, step: int, mode: str, out: int, entropy: float, top_ids: list[int],
               top_probs: list[float], agreement: float, switches: int, bus_bytes: int, switch: str | None) -> None:
        """Add one step of prompt ``b`` (``out``: the token its text shows) and update its text."""
        record = {"step": step, "mode": mode, "entropy": entropy, "id": out, "token": self.decode([out]),
                  "top": [[self.decode([i]), round(p, 4)] for i, p in zip(top_ids, top_probs)],
                  "agreement": agreement, "switches": switches, "bus_bytes": bus_bytes}
        if switch is not None:
            record["switch"] = switch
        self.traces[b].append(record)
        if mode != "latent" and out in self.eos:
            self.finished[b] = True
            return
        self.shown[b].append(out)
        self.texts[b], stopped = cut_at_stop(self.decode(self.shown[b]), self.stops)
        if stopped:
            self.finished[b] = True
