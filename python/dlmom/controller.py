"""The SwiReasoning controller: explicit tokens or latent packets, per sequence, from the entropy trend.

Every step the engine hands over the normalised entropy H / log|V| of each row's merged distribution.
Entropies gather in blocks of ``block_size`` steps; at the end of a block its least-squares slope and
variance decide:

- falling (slope < -slope_threshold) with low variance around the fitted line (< variance_threshold)
  -> explicit (converging);
- rising (slope > slope_threshold) -> latent (growing uncertainty);
- flat: mean entropy above ``entropy_threshold`` -> latent, at or below -> explicit;
- otherwise the row keeps its mode.

A decision takes effect only at block ends, so both directions dwell at least ``block_size`` steps
(SwiReasoning's latent segments, with no dwell gate, average under two steps). Past ``max_switches``
switches, or after ``max_latent_steps`` latent steps, a row is locked to explicit mode: no
oscillation, no overthinking. Every switch is recorded with its reason.
"""
from __future__ import annotations

import dataclasses

import torch

from .settings import check_fields, setting

EXPLICIT, LATENT = 0, 1
MODE_NAMES = {EXPLICIT: "explicit", LATENT: "latent"}
CONTROLLERS = ("swir", "explicit", "latent")


@dataclasses.dataclass(kw_only=True)
class ControllerSettings:
    """The controller's settings (fields of DLMoMConfig)."""

    controller: str = setting("explicit", "swir: switch between latent packets and explicit tokens on the entropy "
                              "trend; explicit: always tokens; latent: packets until max_latent_steps, then tokens",
                              choices=CONTROLLERS)
    block_size: int = setting(4, "steps per entropy block; swir decides at block ends (the least dwell in a mode)",
                              integer=True, lo=1)
    slope_threshold: float = setting(0.01, "entropy slope per step past which a block's trend is falling or rising",
                                     number=True, lo=0)
    variance_threshold: float = setting(0.01, "a falling block switches to explicit only when its variance around "
                                        "the trend line is below this", number=True, lo=0)
    entropy_threshold: float = setting(0.1, "a flat block whose mean normalised entropy is above this switches to "
                                       "latent, below it to explicit", number=True, lo=0)
    start_mode: str = setting("latent", "the swir controller's mode at the first step", choices=("latent", "explicit"))
    max_switches: int = setting(4, "switches per prompt after which it stays explicit", integer=True, lo=0)
    max_latent_steps: int = setting(64, "latent steps per prompt after which it stays explicit", integer=True, lo=0)

    def __post_init__(self):
        check_fields(self)


@dataclasses.dataclass
class Switch:
    row: int
    step: int
    to: str
    reason: str


class Controller:
    """Per-row mode state for a batch. ``kind``: "swir", "explicit" (always tokens) or "latent" (packets
    until ``max_latent_steps``, then tokens)."""

    def __init__(self, batch: int, *, kind: str = "swir", block_size: int = 4, slope_threshold: float = 0.01,
                 variance_threshold: float = 0.01, entropy_threshold: float = 0.1, max_switches: int = 4,
                 max_latent_steps: int = 64, start: str = "latent"):
        if kind not in CONTROLLERS:
            raise ValueError(f"controller must be one of {CONTROLLERS}, got {kind!r}")
        self.kind = kind
        self.block_size = block_size
        self.slope_threshold = slope_threshold
        self.variance_threshold = variance_threshold
        self.entropy_threshold = entropy_threshold
        self.max_switches = max_switches
        self.max_latent_steps = max_latent_steps
        first = EXPLICIT if kind == "explicit" or (kind == "swir" and start == "explicit") else LATENT
        if max_latent_steps == 0:
            first = EXPLICIT
        self.mode = torch.full((batch,), first, dtype=torch.long)
        self.locked = torch.full((batch,), kind == "explicit" or max_latent_steps == 0, dtype=torch.bool)
        self.switches = torch.zeros(batch, dtype=torch.long)
        self.latent_steps = torch.zeros(batch, dtype=torch.long)
        self.block: list[list[float]] = [[] for _ in range(batch)]
        self.events: list[Switch] = []
        self.step_index = 0

    @classmethod
    def from_settings(cls, batch: int, settings: ControllerSettings) -> "Controller":
        s = settings
        return cls(batch, kind=s.controller, block_size=s.block_size, slope_threshold=s.slope_threshold,
                   variance_threshold=s.variance_threshold, entropy_threshold=s.entropy_threshold,
                   max_switches=s.max_switches, max_latent_steps=s.max_latent_steps, start=s.start_mode)

    def _switch(self, row: int, to: int, reason: str) -> None:
        self.mode[row] = to
        self.switches[row] += 1
        self.events.append(Switch(row, self.step_index, MODE_NAMES[to], reason))

    def _lock(self, row: int, reason: str) -> None:
        self.locked[row] = True
        if self.mode[row] != EXPLICIT:
            self.mode[row] = EXPLICIT
            self.events.append(Switch(row, self.step_index, "explicit", reason))

    def _trend(self, values: list[float]) -> tuple[int | None, str]:
        h = torch.tensor(values, dtype=torch.float64)
        x = torch.arange(len(values), dtype=torch.float64)
        x = x - x.mean()
        slope = float((x * (h - h.mean())).sum() / (x * x).sum()) if len(values) > 1 else 0.0
        # Variance around the fitted line: how noisy the trend is, not how steep.
        variance = float(((h - h.mean() - slope * x) ** 2).mean())
        mean = float(h.mean())
        if slope < -self.slope_threshold:
            if variance < self.variance_threshold:
                return EXPLICIT, f"entropy falling (slope {slope:.3f}, variance {variance:.4f})"
            return None, ""
        if slope > self.slope_threshold:
            return LATENT, f"entropy rising (slope {slope:.3f})"
        if mean > self.entropy_threshold:
            return LATENT, f"entropy flat and high (mean {mean:.3f})"
        return EXPLICIT, f"entropy flat and low (mean {mean:.3f})"

    def step(self, entropy: torch.Tensor, active: torch.Tensor | None = None,
             explicit: torch.Tensor | None = None) -> torch.Tensor:
        """Modes [B] (EXPLICIT / LATENT) for this step, given its normalised entropies [B].
        Rows where ``active`` is False (finished) are left untouched. Rows where ``explicit`` is True (the
        consensus gate kept the lead expert alone) write an explicit token this step whatever their mode;
        their mode and its blocks go on as before, and the step does not count as latent."""
        values = entropy.detach().float().cpu().tolist()
        act = [True] * len(values) if active is None else active.cpu().tolist()
        for row, h in enumerate(values):
            if not act[row] or self.locked[row]:
                continue
            if self.kind == "swir":
                block = self.block[row]
                block.append(h)
                if len(block) >= self.block_size:
                    want, reason = self._trend(block)
                    block.clear()
                    if want is not None and want != int(self.mode[row]):
                        if self.switches[row] >= self.max_switches:
                            self._lock(row, f"switch cap {self.max_switches} reached")
                        else:
                            self._switch(row, want, reason)
            if self.mode[row] == LATENT and self.latent_steps[row] >= self.max_latent_steps:
                self._lock(row, f"latent cap {self.max_latent_steps} reached")
        modes = self.mode.clone()
        if explicit is not None:
            modes[explicit.cpu()] = EXPLICIT
        self.latent_steps += (modes == LATENT).long() * torch.tensor(act, dtype=torch.long)
        self.step_index += 1
        return modes
