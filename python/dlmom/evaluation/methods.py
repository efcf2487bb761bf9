"""The methods an evaluation compares, named as on the command line: any of dlmom.baselines.METHODS, with
``dlmom:<controller>`` for DL-MoM under another controller (``dlmom:latent``), ``single:<i>`` for expert
i alone, and settings of its own in brackets for any method: ``dlmom[gate=0.1,consensus=contrastive]`` or
``dlmom:explicit[contrast=0.5]`` (DLMoMConfig fields, over the run's). Every method runs through
``dlmom.baselines.run``, so a method added there is one here too."""
from __future__ import annotations

import dataclasses
import re

from .. import baselines
from ..engine import DLMoMConfig


@dataclasses.dataclass(frozen=True)
class Method:
    """``name`` as given; ``base``: the baselines.run method; ``controller`` / ``expert`` from the suffix."""

    name: str
    base: str
    controller: str | None = None
    expert: int | None = None
    overrides: tuple = ()  # (field, value) pairs of DLMoMConfig from the brackets

    @property
    def is_dlmom(self) -> bool:
        return self.base == "dlmom"

    def config(self, config: DLMoMConfig) -> DLMoMConfig:
        changes = dict(self.overrides)
        if self.controller:
            changes["controller"] = self.controller
        return dataclasses.replace(config, **changes) if changes else config

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
    names = [n.strip() for n in _split(spec)] if isinstance(spec, str) else list(spec)
    if not names or not all(isinstance(n, str) and n for n in names):
        raise ValueError(f"methods: expected a comma-separated list of {', '.join(baselines.METHODS)}, got {spec!r}")
    methods = [_method(n, experts) for n in names]
    seen = [m.name for m in methods]
    twice = sorted({n for n in seen if seen.count(n) > 1})
    if twice:
        raise ValueError(f"methods: {', '.join(twice)} given twice")
    return methods


def _split(spec: str) -> list[str]:
    """``spec`` split at the commas outside brackets."""
    return [part for part in re.split(r",(?![^\[]*\])", spec)]


def _value(text: str):
    """A bracket setting's value: none, true / false, an integer, a number, or the text itself."""
    low = text.strip().lower()
    if low in ("none", "true", "false"):
        return {"none": None, "true": True, "false": False}[low]
    for kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            pass
    return text.strip()


def _overrides(name: str, inner: str) -> tuple:
    pairs = []
    for part in filter(None, (p.strip() for p in inner.split(","))):
        field, eq, value = part.partition("=")
        if not eq or field.strip() not in DLMoMConfig.__dataclass_fields__:
            raise ValueError(f"methods: {name!r}: expected FIELD=VALUE with a DLMoMConfig field, got {part!r}")
        pairs.append((field.strip(), _value(value)))
    try:
        DLMoMConfig(**dict(pairs))
    except (TypeError, ValueError) as err:
        raise ValueError(f"methods: {name!r}: {str(err).removeprefix('DLMoMConfig: ')}") from None
    return tuple(pairs)


def _method(name: str, experts: int) -> Method:
    head, bracket, inner = name.partition("[")
    if bracket:
        if not inner.endswith("]"):
            raise ValueError(f"methods: {name!r}: a bracket must close at the end of the name")
        overrides = _overrides(name, inner[:-1])
        return dataclasses.replace(_method(head, experts), name=name, overrides=overrides)
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
