"""The methods an evaluation compares, named as on the command line: any of dlmom.baselines.METHODS, with
``dlmom:<controller>`` for DL-MoM under another controller (``dlmom:latent``) and ``single:<i>`` for expert
i alone. Every method runs through ``dlmom.baselines.run``, so a method added there is one here too."""
from __future__ import annotations

import dataclasses

from .. import baselines
from ..engine import DLMoMConfig


@dataclasses.dataclass(frozen=True)
class Method:
    """``name`` as given; ``base``: the baselines.run method; ``controller`` / ``expert`` from the suffix."""

    name: str
    base: str
    controller: str | None = None
    expert: int | None = None

    @property
    def is_dlmom(self) -> bool:
        return self.base == "dlmom"

    def config(self, config: DLMoMConfig) -> DLMoMConfig:
        return dataclasses.replace(config, controller=self.controller) if self.controller else config

    def run(self, experts, prompts: list[str], *, max_new_tokens: int, config: DLMoMConfig, seed: int | None,
            expert: int | None = None) -> list:
        """One Result per prompt (dlmom.baselines.run). ``expert``: the default for ``single`` without a suffix."""
        chosen = self.expert if self.expert is not None else expert
        extra = {"expert": chosen} if chosen is not None else {}
        return baselines.run(self.base, experts, prompts, max_new_tokens=max_new_tokens, config=self.config(config),
                             seed=seed, **extra)


def parse_methods(spec: str | list[str], *, experts: int) -> list[Method]:
    """Methods from ``"single,text-mas,dlmom:latent"`` (or a list of names); ``experts``: how many there are,
    for ``single:<i>``. ValueError naming the bad entry."""
    names = [n.strip() for n in spec.split(",")] if isinstance(spec, str) else list(spec)
    if not names or not all(isinstance(n, str) and n for n in names):
        raise ValueError(f"methods: expected a comma-separated list of {', '.join(baselines.METHODS)}, got {spec!r}")
    methods = [_method(n, experts) for n in names]
    seen = [m.name for m in methods]
    twice = sorted({n for n in seen if seen.count(n) > 1})
    if twice:
        raise ValueError(f"methods: {', '.join(twice)} given twice")
    return methods


def _method(name: str, experts: int) -> Method:
    base, _, suffix = name.partition(":")
    if base not in baselines.METHODS:
        raise ValueError(f"methods: {name!r} is not one of {', '.join(baselines.METHODS)} (dlmom:CONTROLLER and "
                         f"single:EXPERT_INDEX also work)")
    if not suffix:
        return Method(name, base)
    if base == "dlmom":
        try:
            DLMoMConfig(controller=suffix)
        except ValueError as err:
            raise ValueError(f"methods: {name!r}: {str(err).removeprefix('DLMoMConfig: ')}") from None
        return Method(name, base, controller=suffix)
    if base == "single":
        if not suffix.isdigit() or not 0 <= int(suffix) < experts:
            raise ValueError(f"methods: {name!r}: the expert index must be an integer in [0, {experts - 1}]")
        return Method(name, base, expert=int(suffix))
    raise ValueError(f"methods: {name!r}: only dlmom (dlmom:CONTROLLER) and single (single:EXPERT_INDEX) take a "
                     f"suffix")
