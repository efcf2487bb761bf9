"""DL-MoM: several causal LMs answering together. ``DLMoM`` holds the experts and the settings
(``DLMoMConfig``); each ``generate`` call runs a ``dlmom.generation.Generation`` over them.
"""
from __future__ import annotations

import dataclasses
import os
import threading

import torch

from .consensus import ConsensusSettings, resolve as resolve_consensus
from .controller import ControllerSettings
from .experts import SINGLE_EXPERT, Expert, as_expert, as_experts, default_experts, in_roles
from .generation import Generation, GenerationInterrupted
from .kv import KVSettings, check_kv_residual
from .packets import PacketSettings
from .placement import LocalPlacement, PlacementSettings
from .results import Result, Results
from .router import RouterSettings
from .settings import check_fields
from .soft_thinking import RunnerSettings

__all__ = ["DLMoM", "DLMoMConfig", "Result", "Results", "GenerationInterrupted", "check_generate_args"]


@dataclasses.dataclass(kw_only=True)
class DLMoMConfig(PacketSettings, ConsensusSettings, RouterSettings, ControllerSettings, RunnerSettings, KVSettings,
                  PlacementSettings):
    """Settings of the DL-MoM loop, validated on construction: one flat class of every layer's settings.

    Packets (dlmom.packets.PacketSettings): top_k, temperature, top_p, do_sample, noise, noise_strength.
    Consensus (dlmom.consensus.ConsensusSettings): consensus, theta, elect, contrast, plausibility, lead, gate.
    Router (dlmom.router.RouterSettings): top_m, preview_tokens, route_by, router_temperature.
    Controller (dlmom.controller.ControllerSettings): controller, block_size, slope_threshold, variance_threshold,
    entropy_threshold, start_mode, max_switches, max_latent_steps.
    Runners (dlmom.soft_thinking.RunnerSettings): chat, share_prefill.
    KV caches (dlmom.kv.KVSettings): kv ("full", "kivi", "minicache" or "kivi+minicache"), kv_group_size,
    kv_residual_length, kv_merge_start, kv_merge_t, kv_merge_threshold.
    Placement (dlmom.placement.PlacementSettings): placement ("local" or "ray"), ray_address, ray_timeout_s,
    ray_load_timeout_s.
    Each field's help is in its layer's class and in ``dlmom run --help``.
    """

    def __post_init__(self):
        check_fields(self)
        check_kv_residual(self)


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


def _local_groups(experts: list[Expert]) -> list[list[Expert]]:
    """The experts grouped by model object (roles of one model share a batched forward), in order of first
    appearance; ValueError when they are on more than one device."""
    devices = {str(e.device) for e in experts}
    if len(devices) > 1:
        raise ValueError(f"experts must all be on one device, got {sorted(devices)} (placement='ray' runs each "
                         "model in its own Ray actor, on its own device)")
    by_model: dict[int, list[Expert]] = {}
    for e in experts:
        by_model.setdefault(id(e.model), []).append(e)
    return list(by_model.values())


def _generator(seed: int | None, device: torch.device) -> torch.Generator:
    """This generation's own random stream: concurrent generations never share one. Without a seed it is
    seeded from torch's global RNG, so ``torch.manual_seed`` still makes an unseeded call repeatable."""
    if seed is None:
        seed = int(torch.randint(0, 2 ** 62, ()))
    return torch.Generator(device=device).manual_seed(seed)


class DLMoM:
    """Several causal LMs answering together. ``experts``: Expert objects, (model, tokenizer) pairs, hub ids,
    local folders or GGUF files; the first expert's tokenizer is the shared (primary) vocabulary."""

    def __init__(self, experts, config: DLMoMConfig | None = None):
        if config is not None and not isinstance(config, DLMoMConfig):
            raise ValueError(f"config must be a DLMoMConfig, got {type(config).__name__}")
        self.config = config or DLMoMConfig()
        if self.config.placement == "ray":  # one actor per model: paths load there, pairs are shipped there
            from .ray_placement import RayPlacement

            self.placement = RayPlacement(experts, self.config)
            self.groups = self.placement.groups
        else:
            self.groups = _local_groups(as_experts(experts))
            self.placement = LocalPlacement(self.groups)
        self.experts = [e for group in self.groups for e in group]
        self.primary = self.experts[0]  # the first listed: groups keep the order of first appearance
        # The default lead expert: the most parameters, the first listed on ties (consensus.py).
        sizes = [e.num_parameters() for e in self.experts]
        self.largest = max(range(len(sizes)), key=lambda i: (sizes[i], -i))
        # What the config's consensus means for these experts ("auto": by their sizes): "ties" or "contrastive".
        self.consensus = resolve_consensus(self.config.consensus, sizes)
        key = self.primary.vocab_key()
        # A group with another tokenizer is fed over the Text-Bridge; its logits meet through an alignment.
        self.bridged = [group[0].vocab_key() != key for group in self.groups]
        self.alignments: dict[int, torch.Tensor] = {}  # by group index, kept across generations
        self.busy = threading.Lock()  # held while a generation runs

    def close(self) -> None:
        """Release the experts' Ray actors (placement="ray"; nothing to do for "local"). A later generate
        starts them again."""
        self.placement.close()

    @classmethod
    def from_pretrained(cls, experts=None, *, roles: bool = False, config: DLMoMConfig | None = None,
                        dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu", progress: bool = False,
                        **config_kwargs) -> "DLMoM":
        """Load experts (default: SmolLM2-135M-Instruct in three roles) and build the mixture. ``roles``: each
        expert in the default's three roles (planner, solver, checker; dlmom.experts.in_roles), sharing its
        weights; the default has them already. Keyword arguments beyond these are DLMoMConfig fields."""
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
        if config.placement == "ray" and not roles:  # paths load inside the actors (roles of a model share one)
            if dtype != torch.float32 or torch.device(device).type != "cpu":
                raise ValueError(f"placement='ray' loads each model inside its actor, at float32 on the actor's device "
                                 f"(its GPU with Expert(num_gpus=...)); dtype and device are for placement='local', "
                                 f"got dtype={dtype}, device={device}")
            return cls(list(experts), config)

        loaded = []
        for i, spec in enumerate(tqdm(list(experts), desc="loading experts", disable=not progress, unit="expert")):
            expert = as_expert(spec, i)
            if isinstance(spec, (str, os.PathLike)):
                expert.model.to(device=device, dtype=dtype)
            loaded.append(expert)
        return cls(in_roles(loaded) if roles else loaded, config)

    def start(self, prompts, *, max_new_tokens: int = 256, seed: int | None = None, stop=None) -> Generation:
        """A generation of ``prompts``, ready to ``run()``; after the run its runners (the experts' caches), bus,
        controller and transcripts can be inspected."""
        prompts, stops = check_generate_args(prompts, max_new_tokens, seed, stop)
        return Generation(self, prompts, max_new_tokens=max_new_tokens, stops=stops,
                          rng=_generator(seed, self.primary.device))

    def generate(self, prompts, *, max_new_tokens: int = 256, seed: int | None = None, stop=None,
                 progress: bool = False) -> Results:
        """Answer each prompt; returns one Result per prompt (see Result), in a ``Results`` list whose ``usage`` holds
        the batch's totals. Ctrl-C raises
        ``GenerationInterrupted`` (a KeyboardInterrupt) that carries the partial answers."""
        return self.start(prompts, max_new_tokens=max_new_tokens, seed=seed, stop=stop).run(progress=progress)
