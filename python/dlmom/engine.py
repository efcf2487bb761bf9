"""The DL-MoM loop: the only module that knows all five layers.

prefill every expert -> loop: consensus of the experts' logits (TIES) -> packet (top-k, entropy) ->
controller (explicit token or latent packet, per row) -> bus (packet to experts that share the
vocabulary, Text-Bridge to the others) -> each expert's next logits. After ``preview_tokens`` steps the
router scores every expert on the preview and re-weights (or drops) them.
"""
from __future__ import annotations

import dataclasses
import math
import os
import threading
import time

import torch

from . import consensus, router
from .bus import TextBridge, align_logits, packet_bytes, vocab_alignment
from .controller import CONTROLLERS, EXPLICIT, LATENT, Controller
from .experts import SINGLE_EXPERT, Expert, as_expert, as_experts, default_experts, fit_budget
from .kv_cache import KV_MODES
from .ops import topk_packet
from .soft_thinking import SoftThinkingEngine

NOISES = (None, "gumbel", "dirichlet")
_DEFAULT_NOISE_STRENGTH = {"gumbel": 0.5, "dirichlet": 4.0}  # tau; alpha (Stochastic Soft Thinking)


@dataclasses.dataclass
class DLMoMConfig:
    """Settings of the DL-MoM loop, validated on construction.

    controller: "swir" (entropy-trend switching), "explicit" (always tokens) or "latent" (packets until
        max_latent_steps, then tokens). top_k: packet size. temperature, top_p: packet shaping (and
        sampling when do_sample); the defaults 0.6 / 0.95 are Soft Thinking's. noise: None, "gumbel"
        (strength = tau) or "dirichlet" (strength = alpha) on latent packets. theta, elect: TIES
        consensus. top_m: experts the router keeps per prompt (None: all; the others leave the batch).
        preview_tokens: the router's preview length. block_size, slope_threshold,
        variance_threshold, entropy_threshold, start_mode, max_switches, max_latent_steps: the
        controller (see dlmom.controller). chat: apply each tokenizer's chat template. kv: each expert's
        KV cache, "full" (transformers' DynamicCache), "kivi" (dlmom.KIVICache: 2-bit keys per channel,
        values per token, the last kv_residual_length tokens in full precision, groups of kv_group_size),
        "minicache" (dlmom.MiniCache: adjacent deep layers merged) or "kivi+minicache" (both).
        share_prefill: roles of one model prefill the prompt prefix they have in common once.
    """

    controller: str = "swir"
    top_k: int = 16
    temperature: float = 0.6
    top_p: float = 0.95
    do_sample: bool = False
    noise: str | None = None
    noise_strength: float | None = None
    theta: float = 0.0
    elect: str = "vote"
    top_m: int | None = None
    preview_tokens: int = 5
    block_size: int = 4
    slope_threshold: float = 0.01
    variance_threshold: float = 0.01
    entropy_threshold: float = 0.1
    start_mode: str = "latent"
    max_switches: int = 4
    max_latent_steps: int = 64
    chat: bool = True
    kv: str = "full"
    kv_group_size: int = 32
    kv_residual_length: int = 128
    share_prefill: bool = True

    def __post_init__(self):
        def bad(name, expected):
            raise ValueError(f"DLMoMConfig: {name} must be {expected}, got {getattr(self, name)!r}")

        def integer(name, lo):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < lo:
                bad(name, f"an integer >= {lo}")

        def number(name, lo, hi=math.inf, lo_open=False):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v > hi or \
                    (v <= lo if lo_open else v < lo):
                bad(name, f"a number in {'(' if lo_open else '['}{lo}, {hi}]")

        if self.controller not in CONTROLLERS:
            bad("controller", f"one of {CONTROLLERS}")
        integer("top_k", 1)
        number("temperature", 0)
        number("top_p", 0, 1, lo_open=True)
        if not isinstance(self.do_sample, bool):
            bad("do_sample", "True or False")
        if self.noise not in NOISES:
            bad("noise", f"one of {NOISES}")
        if self.noise_strength is not None:
            number("noise_strength", 0, lo_open=True)
        number("theta", 0)
        if self.elect not in ("vote", "mass"):
            bad("elect", "'vote' or 'mass'")
        if self.top_m is not None:
            integer("top_m", 1)
        integer("preview_tokens", 0)
        integer("block_size", 1)
        for name in ("slope_threshold", "variance_threshold", "entropy_threshold"):
            number(name, 0)
        if self.start_mode not in ("latent", "explicit"):
            bad("start_mode", "'latent' or 'explicit'")
        integer("max_switches", 0)
        integer("max_latent_steps", 0)
        for name in ("chat", "share_prefill"):
            if not isinstance(getattr(self, name), bool):
                bad(name, "True or False")
        if self.kv not in KV_MODES:
            bad("kv", f"one of {KV_MODES}")
        integer("kv_group_size", 1)
        integer("kv_residual_length", 1)
        if self.kv_residual_length % self.kv_group_size:
            bad("kv_residual_length", f"a multiple of kv_group_size={self.kv_group_size}")


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


def check_generate_args(prompts, max_new_tokens, seed, stop) -> tuple[list[str], list[str]]:
    """(prompts as a list, stop strings as a list) after checking generate's arguments; ValueError names
    the bad one. Shared by the engine and the baselines, so every method rejects the same inputs."""
    if isinstance(prompts, str):
        prompts = [prompts]
    if not isinstance(prompts, (list, tuple)) or not prompts:
        raise ValueError(f"prompts must be a non-empty list of strings, got {prompts!r}")
    for i, p in enumerate(prompts):
        if not isinstance(p, str) or not p:
            raise ValueError(f"prompts must be a non-empty list of non-empty strings, got {p!r} at index {i}")
        try:
            p.encode("utf-8")
        except UnicodeEncodeError as err:  # lone surrogates, e.g. undecodable bytes from a command line
            raise ValueError(f"prompts[{i}] is not valid UTF-8 text (character {err.start}: "
                             f"{p[err.start:err.end]!r})") from None
    if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be an integer >= 1, got {max_new_tokens!r}")
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed < 2 ** 64):
        raise ValueError(f"seed must be an integer in [0, 2**64) or None, got {seed!r}")
    stops = [stop] if isinstance(stop, str) else list(stop or [])
    if not all(isinstance(s, str) and s for s in stops):
        raise ValueError(f"stop must be a non-empty string or a list of them, got {stop!r}")
    return list(prompts), stops


class GenerationInterrupted(KeyboardInterrupt):
    """Ctrl-C (KeyboardInterrupt) during ``DLMoM.generate``, with what was generated so far: ``texts``, one
    partial answer per prompt."""

    def __init__(self, texts: list[str]):
        super().__init__("generation interrupted")
        self.texts = texts


def _generator(seed: int | None, device: torch.device) -> torch.Generator:
    """This generation's own random stream: concurrent generations never share one. Without a seed it is
    seeded from torch's global RNG, so ``torch.manual_seed`` still makes an unseeded call repeatable."""
    if seed is None:
        seed = int(torch.randint(0, 2 ** 62, ()))
    return torch.Generator(device=device).manual_seed(seed)


def _add_noise(probs: torch.Tensor, kind: str, strength: float, rng: torch.Generator) -> torch.Tensor:
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


class DLMoM:
    """Several causal LMs answering together. ``experts``: Expert objects, (model, tokenizer) pairs, hub ids,
    local folders or GGUF files; the first expert's tokenizer is the shared (primary) vocabulary."""

    def __init__(self, experts, config: DLMoMConfig | None = None):
        experts = as_experts(experts)
        if config is not None and not isinstance(config, DLMoMConfig):
            raise ValueError(f"config must be a DLMoMConfig, got {type(config).__name__}")
        devices = {str(e.device) for e in experts}
        if len(devices) > 1:
            raise ValueError(f"experts must all be on one device, got {sorted(devices)}")
        self.config = config or DLMoMConfig()
        # One engine per model object: roles of one model share a batched forward.
        by_model: dict[int, list[Expert]] = {}
        for e in experts:
            by_model.setdefault(id(e.model), []).append(e)
        self.engines = [SoftThinkingEngine(group) for group in by_model.values()]
        self.experts = [e for engine in self.engines for e in engine.experts]
        self.primary = experts[0]
        key = self.primary.vocab_key()
        self.bridged = [engine.experts[0].vocab_key() != key for engine in self.engines]
        self._alignments: dict[int, torch.Tensor] = {}
        self._busy = threading.Lock()

    @classmethod
    def from_pretrained(cls, experts=None, *, config: DLMoMConfig | None = None, dtype: torch.dtype = torch.float32,
                        device: str | torch.device = "cpu", progress: bool = False, **config_kwargs) -> "DLMoM":
        """Load experts (default: SmolLM2-135M-Instruct in three roles) and build the mixture.
        Keyword arguments beyond these are DLMoMConfig fields."""
        if config is None:
            config = DLMoMConfig(**config_kwargs)
        elif config_kwargs:
            raise ValueError(f"pass either config or config fields, not both (got {sorted(config_kwargs)})")
        from tqdm.auto import tqdm

        if experts is None:
            with tqdm(total=1, desc="loading SmolLM2-135M-Instruct (3 roles)", disable=not progress) as bar:
                loaded = default_experts(dtype=dtype, device=device)
                bar.update(1)
            return cls(loaded, config)
        if isinstance(experts, SINGLE_EXPERT):
            experts = [experts]

        loaded = []
        for i, spec in enumerate(tqdm(list(experts), desc="loading experts", disable=not progress, unit="expert")):
            expert = as_expert(spec, i)
            if isinstance(spec, (str, os.PathLike)):
                expert.model.to(device=device, dtype=dtype)
            loaded.append(expert)
        return cls(loaded, config)

    # ---- one step's pieces ----

    def _alignment(self, index: int) -> torch.Tensor:
        if index not in self._alignments:
            engine = self.engines[index]
            self._alignments[index] = vocab_alignment(self.primary.tokenizer, engine.tokenizer,
                                                      self.primary.vocab_size).to(engine.device)
        return self._alignments[index]

    def _stack_logits(self, logits: list[torch.Tensor]) -> torch.Tensor:
        """[E, B, V_primary] from every engine's [R, B, V_model] logits."""
        V = self.primary.vocab_size
        parts = []
        for i, (engine, x) in enumerate(zip(self.engines, logits)):
            if self.bridged[i]:
                R, B, _ = x.shape
                x = align_logits(x.reshape(R * B, -1), self._alignment(i)).view(R, B, V)
            parts.append(x[..., :V].float())
        return parts[0] if len(parts) == 1 else torch.cat(parts, dim=0)

    def _decode(self, ids: list[int]) -> str:
        return self.primary.tokenizer.decode(ids, skip_special_tokens=True)

    # ---- the loop ----

    def generate(self, prompts, *, max_new_tokens: int = 256, seed: int | None = None, stop=None,
                 progress: bool = False) -> list[Result]:
        """Answer each prompt; returns one Result per prompt (see Result)."""
        prompts, stops = check_generate_args(prompts, max_new_tokens, seed, stop)
        # The experts' runners hold this generation's caches and counters: one generation at a time per object.
        if not self._busy.acquire(blocking=False):
            raise RuntimeError("DLMoM.generate: this DLMoM object is already generating (in another thread); "
                               "use one DLMoM object per thread (they may share the experts' models)")
        try:
            return self._generate(prompts, max_new_tokens, stops, progress, _generator(seed, self.primary.device))
        finally:
            self._busy.release()

    def _generate(self, prompts: list[str], max_new_tokens: int, stops: list[str], progress: bool,
                  rng: torch.Generator) -> list[Result]:
        from tqdm.auto import tqdm

        cfg = self.config
        start = time.perf_counter()
        B, E, device = len(prompts), len(self.experts), self.primary.device
        logits = [engine.prefill(prompts, chat=cfg.chat, kv=cfg.kv, kv_group_size=cfg.kv_group_size,
                                 kv_residual_length=cfg.kv_residual_length, share_prefix=cfg.share_prefill)
                  for engine in self.engines]
        max_new_tokens = fit_budget(max_new_tokens, [(engine.experts[0], engine.room) for engine in self.engines])
        bridges = {i: TextBridge(self.primary.tokenizer, e.tokenizer, B)
                   for i, e in enumerate(self.engines) if self.bridged[i]}
        controller = Controller(B, kind=cfg.controller, block_size=cfg.block_size,
                                slope_threshold=cfg.slope_threshold, variance_threshold=cfg.variance_threshold,
                                entropy_threshold=cfg.entropy_threshold, max_switches=cfg.max_switches,
                                max_latent_steps=cfg.max_latent_steps, start=cfg.start_mode)
        preview = cfg.preview_tokens if E > 1 else 0
        weights, route = None, [[] for _ in range(B)]
        preview_bits = [torch.zeros(engine.roles, B) for engine in self.engines]  # [R, B] per engine
        eos = self.primary.eos_ids()
        shown: list[list[int]] = [[] for _ in range(B)]
        traces: list[list[dict]] = [[] for _ in range(B)]
        texts = [""] * B
        finished = torch.zeros(B, dtype=torch.bool)
        bus_total = 0
        k = min(cfg.top_k, self.primary.vocab_size)
        strength = cfg.noise_strength or _DEFAULT_NOISE_STRENGTH.get(cfg.noise, 0.0)

        bar = tqdm(total=max_new_tokens, desc="decoding", disable=not progress, unit="step")
        try:
            for step in range(max_new_tokens):
                bar.update(1)
                stacked = self._stack_logits(logits)  # [E, B, V]
                merged = consensus.merge(stacked, theta=cfg.theta, elect=cfg.elect, weights=weights)
                packet = topk_packet(merged, k, temperature=cfg.temperature, top_p=cfg.top_p)
                in_preview = step < preview
                switched: dict[int, str] = {}
                if in_preview:
                    modes = torch.full((B,), EXPLICIT, dtype=torch.long)
                else:
                    seen = len(controller.events)
                    modes = controller.step(packet.entropy, active=~finished)
                    switched = {e.row: f"to {e.to}: {e.reason}" for e in controller.events[seen:]}
                top1 = packet.ids[:, 0]
                token = top1
                if cfg.do_sample and not in_preview:
                    pick = torch.multinomial(packet.probs, 1, generator=rng)
                    token = packet.ids.gather(1, pick)[:, 0]
                latent = (modes == LATENT).to(device)
                feed_ids, feed_probs = packet.ids.clone(), packet.probs.clone()
                if cfg.noise is not None and bool(latent.any()):
                    noisy = _add_noise(feed_probs, cfg.noise, strength, rng)
                    feed_probs = torch.where(latent.view(-1, 1), noisy, feed_probs)
                one_hot = torch.zeros_like(feed_probs)
                one_hot[:, 0] = 1.0
                feed_ids[:, 0] = torch.where(latent, feed_ids[:, 0], token)
                feed_probs = torch.where(latent.view(-1, 1), feed_probs, one_hot)
                agree = consensus.agreement(stacked, top1, weights)
                # Packet bytes per prompt: one packet to each of its rows still running on the primary vocabulary.
                receivers = sum((engine.rows_per_prompt() for i, engine in enumerate(self.engines)
                                 if not self.bridged[i]), torch.zeros(B, dtype=torch.long))
                step_bytes = (receivers * packet_bytes(feed_ids, feed_probs)).tolist()

                if in_preview:  # the router's score of the preview, from logits the experts produced anyway
                    for i, x in enumerate(logits):
                        if not self.bridged[i]:
                            picked = token.view(1, -1, 1).expand(x.shape[0], -1, 1)
                            lp = torch.log_softmax(x.float(), dim=-1).gather(-1, picked)
                            preview_bits[i] -= torch.where(finished.to(lp.device), 0.0, lp[..., 0]).cpu() / math.log(2)
                token_list, top1_list = token.tolist(), top1.tolist()
                for b in range(B):
                    if finished[b]:
                        continue
                    is_latent = bool(latent[b])
                    out = top1_list[b] if is_latent else token_list[b]
                    mode = "preview" if in_preview else ("latent" if is_latent else "explicit")
                    record = {"step": step, "mode": mode,
                              "entropy": float(packet.entropy[b]), "id": out, "token": self._decode([out]),
                              "top": [[self._decode([i]), round(float(p), 4)] for i, p in
                                      zip(packet.ids[b, :5].tolist(), packet.probs[b, :5].tolist())],
                              "agreement": float(agree[b]), "switches": int(controller.switches[b]),
                              "bus_bytes": step_bytes[b]}
                    if b in switched:
                        record["switch"] = switched[b]
                    traces[b].append(record)
                    if not is_latent and out in eos:
                        finished[b] = True
                        continue
                    shown[b].append(out)
                    texts[b] = self._decode(shown[b])
                    hit = [texts[b].index(s) for s in stops if s in texts[b]]
                    if hit:
                        texts[b] = texts[b][:min(hit)]
                        finished[b] = True

                keep = (~finished).expand(E, B)  # rows of finished prompts and of routed-out roles leave the batch
                if in_preview and step == preview - 1:
                    weights, kept = self._route(prompts, shown, route, preview_bits)
                    keep = kept.cpu() & keep
                if bool(finished.all()) or step == max_new_tokens - 1:
                    break
                for engine, rows in zip(self.engines, keep.split([engine.roles for engine in self.engines])):
                    engine.keep_rows(rows)
                bus_total += sum(n for b, n in enumerate(step_bytes) if not finished[b])
                logits, bridged_bytes = self._feed(logits, bridges, feed_ids, feed_probs,
                                                   [None if finished[b] else s[-1] if s else None
                                                    for b, s in enumerate(shown)])
                bus_total += bridged_bytes
        except KeyboardInterrupt:
            bar.close()
            raise GenerationInterrupted(list(texts)) from None
        bar.close()
        usage = self._usage(start, bus_total, controller, bridges)
        return [Result(texts[b], traces[b], route[b], usage) for b in range(B)]

    def _route(self, prompts, shown, route, preview_bits):
        """Score every expert on the preview; per prompt keep the best top_m. Returns (weights [E, B],
        kept [E, B] bool). Experts on the primary vocabulary are scored from the
        log-probabilities of the preview steps; the others re-read prompt + preview with their tokenizer."""
        previews = [self._decode(s) for s in shown]
        nbytes = torch.tensor([max(len(p.encode()), 1) for p in previews], dtype=torch.float32)
        bridged = [e for i, e in enumerate(self.engines) if self.bridged[i]]
        teacher = iter(router.score(bridged, prompts, previews, chat=self.config.chat).split(
            [e.roles for e in bridged])) if bridged else iter(())
        bpb = torch.cat([next(teacher) if self.bridged[i] else preview_bits[i] / nbytes
                         for i in range(len(self.engines))], dim=0)  # [E, B]
        kept, weights = router.select(bpb, self.config.top_m)
        for b in range(len(prompts)):
            route[b].extend({"expert": e.name, "bits_per_byte": round(float(bpb[i, b]), 4), "kept": bool(kept[i, b]),
                             "weight": round(float(weights[i, b]), 4)} for i, e in enumerate(self.experts))
        return weights.to(self.primary.device), kept

    def _feed(self, logits, bridges, feed_ids, feed_probs, last_tokens):
        """Every engine with active rows takes the step's input; returns the new logits (zeros in rows that
        left the batch: they have no weight in the consensus) and the Text-Bridge's bytes."""
        new, nbytes = [], 0
        for i, engine in enumerate(self.engines):
            if not engine.live:
                new.append(torch.zeros_like(logits[i]))  # every row dropped or finished: no more forwards
            elif i in bridges:
                ids, n = bridges[i].push(last_tokens)
                nbytes += int((torch.tensor(n) * engine.rows_per_prompt()).sum())
                out = engine.feed_tokens(ids)
                new.append(logits[i] if out is None else out)
            else:
                new.append(engine.feed_packet(feed_ids, feed_probs))
        return new, nbytes

    def _usage(self, start: float, bus_total: int, controller: Controller, bridges: dict) -> dict:
        experts = []
        for engine in self.engines:
            for r, e in enumerate(engine.experts):
                # One cache holds the rows of every role of a model, padded to one length: split evenly.
                experts.append({"expert": e.name, "prefill_tokens": engine.prefill_tokens[r],
                                "shared_prefill_tokens": engine.shared_prefill_tokens[r],
                                "decode_tokens": engine.decode_tokens[r],
                                "cache_bytes": engine.peak_cache_bytes() // engine.roles})
        return {"experts": experts, "kv": self.config.kv,
                "shared_prefill_tokens": sum(e["shared_prefill_tokens"] for e in experts),
                "wall_s": time.perf_counter() - start,
                "expert_forward_s": sum(engine.forward_s for engine in self.engines),
                "latent_steps": int(controller.latent_steps.sum()), "bus_bytes": bus_total,
                "switches": int(controller.switches.sum()),
                "bridge_resyncs": sum(bridge.resyncs for bridge in bridges.values())}
