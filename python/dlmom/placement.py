"""Where the experts run: ``placement="local"`` (every model in this process, one runner per model group) or
``"ray"`` (one Ray actor per model group, dlmom.ray_placement). The generation talks to either through
runner-shaped objects; a remote runner's forwards return ``Pending`` results that ``gather`` collects,
all of one step's at once, so the experts' forwards of a step overlap.
"""
from __future__ import annotations

import dataclasses

from .settings import check_fields, setting
from .soft_thinking import SoftThinkingRunner

PLACEMENTS = ("local", "ray")


@dataclasses.dataclass(kw_only=True)
class PlacementSettings:
    """Where the experts run (fields of DLMoMConfig)."""

    placement: str = setting("local", "where the experts run: 'local' (this process) or 'ray' (one Ray actor per "
                             "model, on this machine or a cluster; pip install 'dlmom[ray]')", choices=PLACEMENTS)
    ray_address: str | None = setting(None, "the Ray cluster to join with placement='ray' (none: RAY_ADDRESS, or "
                                      "a new local Ray instance)", optional=True)
    ray_timeout_s: float = setting(300.0, "seconds an expert's actor may take to answer one request (a prefill, a "
                                   "step) before the generation fails naming it", number=True, lo=0, lo_open=True)
    ray_load_timeout_s: float = setting(1800.0, "seconds an expert's actor may take to start and load its model",
                                        number=True, lo=0, lo_open=True)

    def __post_init__(self):
        check_fields(self)


class Pending:
    """A runner's result that is still being computed elsewhere; ``gather`` turns it into the value."""

    def resolve_all(self, pending: list["Pending"]) -> list:
        """The values of ``pending`` (all of this one's kind), in order."""
        raise NotImplementedError


def gather(values: list) -> list:
    """``values`` with every Pending replaced by its value, waiting on all of them together."""
    pending = [v for v in values if isinstance(v, Pending)]
    if not pending:
        return values
    done = iter(pending[0].resolve_all(pending))
    return [next(done) if isinstance(v, Pending) else v for v in values]


class LocalPlacement:
    """Every model group in this process: a fresh SoftThinkingRunner per group and generation."""

    def __init__(self, groups):
        self.groups = groups

    def runners(self) -> list[SoftThinkingRunner]:
        return [SoftThinkingRunner(group) for group in self.groups]

    def usage(self) -> dict:
        return {}

    def close(self) -> None:
        pass
