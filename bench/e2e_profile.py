"""bench_e2e's profile section: where dlmom's time goes outside the expert forwards.

One dlmom run (default experts, DLMoMConfig's defaults: the swir controller) under cProfile with a clock
that stops while a model's forward runs (a pre-hook and a hook on every expert model, the call
``SoftThinkingRunner._run`` makes), so every function's own time is its time outside the forwards. The
three functions with the largest own time are the three largest costs; ``via`` names the first dlmom
function on their heaviest call path (the function itself when it is dlmom's). The profiler slows Python
code down, so the same run is also timed without it: ``overhead_s`` / ``overhead_fraction`` come from
that plain run, ``profiled_*`` from the profiled one, and ``share_of_wall`` is a cost's seconds over the
profiled run's wall.
"""
from __future__ import annotations

import cProfile
import pstats
import time

import torch

from e2e_common import PROMPTS, load_experts


class ForwardFreeClock:
    """perf_counter that stands still between ``stop()`` and ``go()``; ``stopped_s`` sums those spans."""

    def __init__(self):
        self.stopped_s = 0.0
        self._since = None

    def __call__(self) -> float:
        now = time.perf_counter() if self._since is None else self._since
        return now - self.stopped_s

    def stop(self, *_):
        self._since = time.perf_counter()

    def go(self, *_):
        self.stopped_s += time.perf_counter() - self._since
        self._since = None


def _name(func: tuple) -> str:
    filename, line, name = func
    if filename == "~":  # a builtin: cProfile writes "<method 'x' of 'y' objects>"
        return name
    parts = filename.replace("\\", "/").split("/")
    short = "/".join(parts[parts.index("dlmom"):]) if "dlmom" in parts[:-1] else "/".join(parts[-2:])
    return f"{short}:{line}({name})"


def _via(stats: dict, func: tuple) -> str | None:
    """The first dlmom function on the heaviest chain of callers of ``func``."""
    seen = set()
    while func not in seen:
        seen.add(func)
        if "/dlmom/" in func[0].replace("\\", "/") and not func[0].endswith("__init__.py"):
            return _name(func)
        callers = stats[func][4]
        if not callers:
            return None
        func = max(callers, key=lambda c: callers[c][3])
    return None


def profile(*, prompts: int, max_new_tokens: int, dtype: torch.dtype, device: str, top: int = 10) -> dict:
    """The profile (see the module docstring): {"settings", plain and profiled times, "top": the ``top``
    largest costs outside the forwards, "largest3": the first three}."""
    from dlmom import DLMoM

    experts = load_experts("default", dtype=dtype, device=device)
    mixture = DLMoM(experts)
    batch = [p for p, _ in PROMPTS[:prompts]]
    mixture.generate(batch[:1], max_new_tokens=2, seed=0)  # warm-up
    plain = mixture.generate(batch, max_new_tokens=max_new_tokens, seed=0).usage

    clock = ForwardFreeClock()
    handles = []
    for group in mixture.groups:
        model = group[0].model
        handles += [model.register_forward_pre_hook(clock.stop), model.register_forward_hook(clock.go)]
    profiler = cProfile.Profile(clock)
    try:
        start = time.perf_counter()
        profiler.enable()
        usage = mixture.generate(batch, max_new_tokens=max_new_tokens, seed=0).usage
        profiler.disable()
        wall = time.perf_counter() - start
    finally:
        for h in handles:
            h.remove()
    stats = pstats.Stats(profiler).stats  # {func: (primitive calls, calls, own s, cumulative s, callers)}
    ranked = sorted(stats, key=lambda f: stats[f][2], reverse=True)[:top]
    costs = [{"function": _name(f), "via": _via(stats, f), "calls": stats[f][1], "seconds": round(stats[f][2], 4),
              "share_of_wall": round(stats[f][2] / wall, 4)} for f in ranked]
    outside = wall - clock.stopped_s
    return {
        "experts": [e.name for e in experts], "controller": mixture.config.controller, "prompts": prompts,
        "max_new_tokens": max_new_tokens, "threads": torch.get_num_threads(),
        "wall_s": round(plain["wall_s"], 3), "expert_forward_s": round(plain["expert_forward_s"], 3),
        "overhead_s": round(plain["wall_s"] - plain["expert_forward_s"], 3),
        "overhead_fraction": round(1 - plain["expert_forward_s"] / plain["wall_s"], 4),
        "profiled_wall_s": round(wall, 3), "profiled_forward_s": round(clock.stopped_s, 3),
        "profiled_overhead_s": round(outside, 3), "profiled_overhead_fraction": round(outside / wall, 4),
        "profiled_engine_forward_s": round(usage["expert_forward_s"], 3),
        "top": costs, "largest3": costs[:3],
    }
