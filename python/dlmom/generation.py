"""One generate call, read top to bottom: the only module that knows the order of the five layers.

prefill every runner -> per step: gather the experts' logits (bus) -> consensus (TIES) -> packet (top-k,
entropy) -> decide explicit / latent per prompt (controller; the router's preview first) -> shape the feed
-> record -> drop rows that are done -> deliver the feed (bus) -> the runners' next logits.
Each layer's work lives in its module; this one only calls them in order over the generation's state.
"""
from __future__ import annotations

import time

import torch

from . import consensus
from .bus import Bus
from .controller import EXPLICIT, LATENT, Controller
from .experts import fit_budget
from .ops import raise_pending_errors, topk_packet
from .packets import DEFAULT_NOISE_STRENGTH, choose_token, shape_feed
from .placement import gather
from .results import Result, Results, Transcripts, batch_usage, prompt_usage
from .router import Preview


class GenerationInterrupted(KeyboardInterrupt):
    """Ctrl-C (KeyboardInterrupt) during ``DLMoM.generate``, with what was generated so far: ``texts``, one
    partial answer per prompt."""

    def __init__(self, texts: list[str]):
        super().__init__("generation interrupted")
        self.texts = texts


class Generation:
    """The state of one generate call: its runners (the experts' caches), bus, router preview, controller,
    transcripts and random generator. ``run`` decodes and returns one Result per prompt."""

    def __init__(self, moe, prompts: list[str], *, max_new_tokens: int, stops: list[str], rng: torch.Generator):
        cfg = self.config = moe.config
        self.moe, self.prompts, self.rng, self.batch = moe, prompts, rng, len(prompts)
        self.max_new_tokens = max_new_tokens
        self.primary = moe.primary
        self.runners = moe.placement.runners()  # SoftThinkingRunners, or proxies of runners in Ray actors
        self.experts = [e for runner in self.runners for e in runner.experts]
        self.runner_of = [i for i, runner in enumerate(self.runners) for _ in runner.experts]  # by expert
        self.bridged = moe.bridged
        self.alignments = moe.alignments
        self.transcripts = Transcripts(self.primary.tokenizer, self.batch, eos=self.primary.eos_ids(), stops=stops)
        self.controller = Controller.from_settings(self.batch, cfg)
        self.routed_by = cfg.route_by if len(self.experts) > 1 else None  # one expert: nothing to route
        self.preview = Preview(self.runners, self.bridged, self.batch, chat=cfg.chat, top_m=cfg.top_m,
                               tokens=cfg.preview_tokens if self.routed_by == "preview" else 0,
                               temperature=cfg.router_temperature)
        self.weights: torch.Tensor | None = None  # [E, B] consensus weights, set by the router
        self.lead = torch.full((self.batch,), moe.largest, dtype=torch.long)  # [B] each prompt's lead expert
        self.merged_steps = torch.zeros(self.batch, dtype=torch.long)  # steps the consensus engaged (gate open)
        self.routes: list[list[dict]] = [[] for _ in prompts]
        self.k = min(cfg.top_k, self.primary.vocab_size)
        self.noise_strength = cfg.noise_strength or DEFAULT_NOISE_STRENGTH.get(cfg.noise, 0.0)
        self.bus: Bus | None = None
        self.start = time.perf_counter()

    # ---- the loop ----

    def run(self, *, progress: bool = False) -> Results:
        """Decode to the end; one Result per prompt. One generation at a time per DLMoM object: the
        bus's alignment cache and the experts' models are the object's."""
        if not self.moe.busy.acquire(blocking=False):
            raise RuntimeError("DLMoM.generate: this DLMoM object is already generating (in another thread); "
                               "use one DLMoM object per thread (they may share the experts' models)")
        try:
            return self._run(progress)
        finally:
            self.moe.busy.release()

    def _run(self, progress: bool) -> Results:
        from tqdm.auto import tqdm

        logits = self.prefill()
        budget = fit_budget(self.max_new_tokens, [(runner.experts[0], runner.room) for runner in self.runners])
        bar = tqdm(total=budget, desc="decoding", disable=not progress, unit="step")
        try:
            for step in range(budget):
                bar.update(1)
                logits = self.step(step, logits, last=step == budget - 1)
                if logits is None:
                    break
        except KeyboardInterrupt:
            raise GenerationInterrupted(list(self.transcripts.texts)) from None
        finally:
            bar.close()
        return self.results()

    def prefill(self) -> list[torch.Tensor]:
        cfg = self.config
        logits = gather([runner.prefill(self.prompts, chat=cfg.chat, kv=cfg, share_prefix=cfg.share_prefill)
                         for runner in self.runners])
        self.bus = Bus(self.runners, self.bridged, self.primary, self.alignments)
        if self.routed_by == "prompt":  # routed before the first step: the dropped roles never decode
            self.keep_rows(self.route(*self.preview.route_prompt(self.prompts)))
        return logits

    def step(self, step: int, logits: list[torch.Tensor], *, last: bool) -> list[torch.Tensor] | None:
        """One decode step from the runners' logits; the next logits, or None when the generation is done."""
        cfg, bus, done = self.config, self.bus, self.transcripts.finished
        in_preview = self.preview.active(step)
        stacked = bus.stack(logits)  # [E, B, V]
        stale = bool(bus.pending)
        # The gate reads the lead's logits only, which a deferral never leaves stale: one verdict for the step.
        alone = consensus.gated(stacked, self.lead, cfg)
        if stale and (in_preview or not bool(alone.cpu()[~done].all())):
            logits = bus.catch_up(logits)  # the gate opens for a prompt: every expert's logits are needed
            stacked, stale = bus.stack(logits), False
        merged, alone = consensus.combine(stacked, self.lead, self.weights, cfg, mode=self.moe.consensus,
                                          alone=alone)
        packet = topk_packet(merged, self.k, temperature=cfg.temperature, top_p=cfg.top_p)
        alone = alone.cpu()
        self.merged_steps += (~alone & ~done).long()
        modes, switched = self.decide(packet, in_preview, alone)
        token = choose_token(packet, sample=cfg.do_sample and not in_preview, rng=self.rng)
        latent = (modes == LATENT).to(packet.ids.device)
        feed_ids, feed_probs = shape_feed(packet, token, latent, noise=cfg.noise, strength=self.noise_strength,
                                          rng=self.rng)
        step_bytes = bus.packet_bytes(feed_ids, feed_probs)
        if in_preview:
            self.preview.observe(logits, token, done)
        # Stale (deferred) experts have no logits for this step: no agreement to report.
        agree = None if stale else consensus.agreement(stacked, packet.ids[:, 0], self.weights)
        self.record(step, packet, token, latent, agree, switched, step_bytes, "preview" if in_preview else None,
                    alone)
        raise_pending_errors(self.primary.device)  # a CUDA kernel's value error, once per step (record synced)
        keep = (~done).expand(len(self.experts), self.batch)  # rows of finished prompts leave the batch
        if in_preview and self.preview.ends_at(step):  # and so do the roles the router dropped
            previews = [self.transcripts.decode(ids) for ids in self.transcripts.shown]
            keep = self.route(*self.preview.route(self.prompts, previews)) & keep
        if bool(done.all()) or last:
            return None
        self.keep_rows(keep)
        bus.count(step_bytes, done)
        return bus.deliver(logits, feed_ids, feed_probs, self.transcripts.last_tokens(),
                           defer=self.deferrable(alone | done, in_preview))

    def deferrable(self, alone: torch.Tensor, in_preview: bool) -> frozenset[int]:
        """The runners that may skip this step's forward: when the gate keeps every running prompt with its
        lead alone (an explicit token each), every runner on the primary vocabulary that holds no lead."""
        if self.config.gate <= 0 or in_preview or not bool(alone.all()):
            return frozenset()
        leads = {self.runner_of[e] for e in self.lead.tolist()}
        return frozenset(i for i in range(len(self.runners)) if not self.bridged[i] and i not in leads)

    # ---- one step's pieces ----

    def decide(self, packet, in_preview: bool, alone: torch.Tensor) -> tuple[torch.Tensor, dict[int, str]]:
        """Modes [B] (EXPLICIT / LATENT) and, per prompt that switched, the reason. A row the gate kept with the
        lead alone (``alone`` [B]) writes an explicit token."""
        if in_preview:  # the preview is written in explicit tokens
            return torch.full((self.batch,), EXPLICIT, dtype=torch.long), {}
        seen = len(self.controller.events)
        modes = self.controller.step(packet.entropy, active=~self.transcripts.finished, explicit=alone)
        return modes, {e.row: f"to {e.to}: {e.reason}" for e in self.controller.events[seen:]}

    def record(self, step: int, packet, token: torch.Tensor, latent: torch.Tensor, agree: torch.Tensor | None,
               switched: dict[int, str], step_bytes: list[int], mode: str | None, alone: torch.Tensor) -> None:
        """Trace and text of every running prompt; a latent step shows the top-1 token of its packet."""
        token_list, top1_list, is_latent = token.tolist(), packet.ids[:, 0].tolist(), latent.tolist()
        top_ids, top_probs = packet.ids[:, :5].tolist(), packet.probs[:, :5].tolist()
        entropy = packet.entropy.tolist()
        switches, merged = self.controller.switches.tolist(), (~alone).tolist()
        agreement = [None] * self.batch if agree is None else agree.tolist()
        for b in range(self.batch):
            if self.transcripts.finished[b]:
                continue
            self.transcripts.record(b, step=step, mode=mode or ("latent" if is_latent[b] else "explicit"),
                                    out=top1_list[b] if is_latent[b] else token_list[b], entropy=entropy[b],
                                    top_ids=top_ids[b], top_probs=top_probs[b], agreement=agreement[b],
                                    switches=switches[b], bus_bytes=step_bytes[b], switch=switched.get(b),
                                    merged=merged[b])

    def keep_rows(self, keep: torch.Tensor) -> None:
        """Every runner keeps its rows of ``keep`` [E, B] (bool); the others leave the batch."""
        for runner, rows in zip(self.runners, keep.split([runner.roles for runner in self.runners])):
            runner.keep_rows(rows)

    def route(self, weights: torch.Tensor, kept: torch.Tensor, records: list[list[dict]]) -> torch.Tensor:
        """The router's verdict (after its preview, or on the prompts): its weights for the consensus and each
        prompt's lead; returns the rows it keeps [E, B]."""
        for b, rec in enumerate(records):
            self.routes[b].extend(rec)
        self.weights = weights.to(self.primary.device)
        best = torch.argmax(weights, dim=0)  # the first of equal bests
        dropped = ~kept[self.lead, torch.arange(self.batch)]
        self.lead = torch.where(dropped | (self.config.lead == "router"), best, self.lead)
        return kept.cpu()

    def results(self) -> Results:
        """One Result per prompt with its own usage; the batch's totals on the list."""
        wall = time.perf_counter() - self.start
        latent, switches = self.controller.latent_steps.tolist(), self.controller.switches.tolist()
        bus, merged = self.bus.bytes.tolist(), self.merged_steps.tolist()
        per_prompt = [prompt_usage("dlmom", self.expert_usage(b), wall_s=wall,
                                   generated_tokens=len(self.transcripts.traces[b]), latent_steps=latent[b],
                                   switches=switches[b], bus_bytes=bus[b], merged_steps=merged[b])
                      for b in range(self.batch)]
        # One cache holds the rows of every role of a model, padded to one length: split evenly among its roles.
        cache = [{"cache_bytes": runner.peak_cache_bytes() // runner.roles} for runner in self.runners
                 for _ in runner.experts]
        usage = batch_usage("dlmom", per_prompt, wall_s=wall,
                            expert_forward_s=sum(runner.forward_s for runner in self.runners), per_expert=cache,
                            kv=self.config.kv, consensus=self.moe.consensus, bridge_resyncs=self.bus.resyncs,
                            **self.moe.placement.usage())
        return Results([Result(self.transcripts.texts[b], self.transcripts.traces[b], self.routes[b], per_prompt[b])
                        for b in range(self.batch)], usage)

    def expert_usage(self, b: int) -> list[dict]:
        """Prompt ``b``'s tokens per expert: prefilled, taken from a shared prefill, decoded."""
        return [{"expert": e.name, "prefill_tokens": int(runner.prefill_tokens[r, b]),
                 "shared_prefill_tokens": int(runner.shared_prefill_tokens[r, b]),
                 "decode_tokens": int(runner.decode_tokens[r, b])}
                for runner in self.runners for r, e in enumerate(runner.experts)]
