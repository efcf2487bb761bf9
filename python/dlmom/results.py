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
    trace: one record per step; route: each expert's preview score and whether it was kept; usage: this
    prompt's cost (``prompt_usage``). The batch's totals are on the list the call returns (``Results.usage``)."""

    text: str
    trace: list[dict]
    route: list[dict]
    usage: dict

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


class Results(list):
    """The Results of one call, one per prompt in order, and ``usage``: the batch's totals, reported once
    (``batch_usage``)."""

    def __init__(self, results: list[Result], usage: dict):
        super().__init__(results)
        self.usage = usage

    def to_dict(self) -> dict:
        return {"results": [r.to_dict() for r in self], "usage": self.usage}


_PER_PROMPT = ("tokens", "prefill_tokens", "shared_prefill_tokens", "decode_tokens", "generated_tokens", "latent_steps",
               "merged_steps", "switches", "bus_bytes")


def prompt_usage(method: str, experts: list[dict], *, wall_s: float, generated_tokens: int, latent_steps: int = 0,
                 merged_steps: int = 0, switches: int = 0, bus_bytes: int = 0) -> dict:
    """One prompt's usage. ``experts``: per expert this prompt's ``prefill_tokens`` (computed),
    ``shared_prefill_tokens`` (taken from a prefix another role computed; optional) and ``decode_tokens``
    (one per row per decode forward). ``tokens`` = prefill + decode over every expert: what the forwards
    processed for this prompt. ``merged_steps``: steps where the consensus engaged (not the gated lead alone). ``wall_s``: the whole call's wall time (the prompt's latency in its batch)."""
    prefill = sum(e["prefill_tokens"] for e in experts)
    decode = sum(e["decode_tokens"] for e in experts)
    return {"method": method, "tokens": prefill + decode, "prefill_tokens": prefill,
            "shared_prefill_tokens": sum(e.get("shared_prefill_tokens", 0) for e in experts), "decode_tokens": decode,
            "generated_tokens": generated_tokens, "latent_steps": latent_steps, "merged_steps": merged_steps,
            "switches": switches,
            "bus_bytes": bus_bytes, "wall_s": wall_s, "experts": experts}


def batch_usage(method: str, per_prompt: list[dict], *, wall_s: float, expert_forward_s: float,
                per_expert: list[dict] | None = None, **extra) -> dict:
    """The batch's totals from its prompts' usage: every count summed, per expert too (by position: every
    prompt lists the same experts in the same order, and two experts may share a name), with ``per_expert``'s
    entries added to each expert's (e.g. its cache bytes); the call's wall and expert-forward seconds, and
    ``extra`` (e.g. the KV cache mode)."""
    experts = [{"expert": same[0]["expert"], **{key: sum(e[key] for e in same) for key in same[0] if key != "expert"}}
               for same in zip(*(u["experts"] for u in per_prompt))]
    for total, more in zip(experts, per_expert or []):
        total.update(more)
    totals = {key: sum(u[key] for u in per_prompt) for key in _PER_PROMPT}
    return {"method": method, "prompts": len(per_prompt), **totals, "wall_s": wall_s,
            "expert_forward_s": expert_forward_s, "experts": experts, **extra}


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
        self._stable = [""] * batch  # per prompt its shown ids' text without an unfinished character at the end

    def decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True)

    def last_tokens(self) -> list[int | None]:
        """Per prompt the last token shown (None for a finished prompt or before the first)."""
        return [None if self.finished[b] else s[-1] if s else None for b, s in enumerate(self.shown)]

    def record(self, b: int, *, step: int, mode: str, out: int, entropy: float, top_ids: list[int],
               top_probs: list[float], agreement: float | None, switches: int, bus_bytes: int, switch: str | None,
               merged: bool) -> None:
        """Add one step of prompt ``b`` (``out``: the token its text shows) and update its text. The step's
        ``token`` is the text it adds: a character split over several tokens shows whole on the token that ends it
        (the ones before show nothing), never as U+FFFD halves."""
        ends = mode != "latent" and out in self.eos
        full = None if ends else self.decode(self.shown[b] + [out])
        if full is not None and full.startswith(self._stable[b]):
            token = full[len(self._stable[b]):].rstrip("\ufffd")
        else:  # the end, or a tokenizer whose text of a longer prefix rewrites the shorter one's
            token = self.decode([out])
        record = {"step": step, "mode": mode, "entropy": entropy, "id": out, "token": token,
                  "top": [[self.decode([i]), round(p, 4)] for i, p in zip(top_ids, top_probs)],
                  "agreement": agreement, "merged": merged, "switches": switches, "bus_bytes": bus_bytes}
        if switch is not None:
            record["switch"] = switch
        self.traces[b].append(record)
        if ends:
            self.finished[b] = True
            return
        self.shown[b].append(out)
        self._stable[b] = full.rstrip("\ufffd")
        self.texts[b], stopped = cut_at_stop(full, self.stops)
        if stopped:
            self.finished[b] = True
