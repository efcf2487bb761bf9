"""bench_e2e's scaling section: dlmom's step time and overhead against experts, packet size and batch size.

One factor varies at a time around the default point: 3 experts (SmolLM2 roles sharing one batched
forward), packet size k = 16 (DLMoMConfig's default), a batch of ``prompts`` prompts. The experts axis runs
1..4 roles of one model ("shared": one batched forward per step) and 2..4 separate copies of it
("separate": one forward per copy per step, as different models would run). The controller is "latent"
with ``max_latent_steps`` = the token budget, so every step after the router's preview feeds a packet
(k matters) and no row stops early at an end-of-sequence token: each point takes the same number of steps.

Per point: ``step_s`` = wall / decode steps (loop iterations, the prefill included in the wall),
``overhead_fraction`` = (wall - expert forward) / wall from the engine's usage, ``overhead_step_ms`` the
same per step.
"""
from __future__ import annotations

import torch

from e2e_common import PROMPTS, role_experts, smollm2

CONTROLLER = "latent"
DEFAULT = {"experts": 3, "sharing": "shared", "top_k": 16}
EXPERTS_AXIS = (1, 2, 3, 4)
K_AXIS = (1, 8, 16, 50)  # the 1, 8, 50 and the default 16, the point the other axes share
BATCH_AXIS = (1, 4, 16)


def points(prompts: int) -> list[dict]:
    """Every (axis, experts, sharing, top_k, batch) point of the section, default point first on each axis."""
    base = {**DEFAULT, "batch": prompts}
    out = [{**base, "axis": "experts", "experts": n} for n in EXPERTS_AXIS]
    out += [{**base, "axis": "experts", "experts": n, "sharing": "separate"} for n in EXPERTS_AXIS if n > 1]
    out += [{**base, "axis": "k", "top_k": k} for k in K_AXIS]
    out += [{**base, "axis": "batch", "batch": b} for b in BATCH_AXIS]
    return out


def run_point(point: dict, model, tokenizer, max_new_tokens: int, repeats: int) -> dict:
    """One point's row: the fastest of ``repeats`` calls after a short warm-up call."""
    from dlmom import DLMoM, DLMoMConfig

    if point["batch"] > len(PROMPTS):
        raise ValueError(f"scaling: batch must be <= {len(PROMPTS)} prompts, got {point['batch']}")
    experts = role_experts(model, tokenizer, point["experts"], separate=point["sharing"] == "separate")
    config = DLMoMConfig(controller=CONTROLLER, top_k=point["top_k"], max_latent_steps=max_new_tokens)
    mixture = DLMoM(experts, config)
    prompts = [p for p, _ in PROMPTS[:point["batch"]]]
    mixture.generate(prompts[:1], max_new_tokens=2, seed=0)
    best = None
    for _ in range(repeats):
        results = mixture.generate(prompts, max_new_tokens=max_new_tokens, seed=0)
        if best is None or results.usage["wall_s"] < best.usage["wall_s"]:
            best = results
    usage = best.usage
    wall, forward = usage["wall_s"], usage["expert_forward_s"]
    steps = max(len(r.trace) for r in best)
    return {
        **point, "models": len(mixture.groups), "controller": CONTROLLER, "max_new_tokens": max_new_tokens,
        "repeats": repeats, "decode_steps": steps, "latent_steps": usage["latent_steps"],
        "wall_s": round(wall, 4), "expert_forward_s": round(forward, 4),
        "overhead_fraction": round((wall - forward) / wall, 4), "step_s": round(wall / steps, 5),
        "overhead_step_ms": round(1e3 * (wall - forward) / steps, 3),
        "tokens_processed": usage["tokens"],
    }


def scaling(*, prompts: int, max_new_tokens: int, repeats: int, dtype: torch.dtype, device: str,
            log=print) -> list[dict]:
    """All points' rows (see the module docstring); ``log`` gets one line per point."""
    model, tokenizer = smollm2(dtype, device)
    rows = []
    for point in points(prompts):
        rows.append(run_point(point, model, tokenizer, max_new_tokens, repeats))
        r = rows[-1]
        log(f"scaling {r['axis']}: experts={r['experts']} ({r['sharing']}) k={r['top_k']} batch={r['batch']}: "
            f"{1e3 * r['step_s']:.1f} ms/step, overhead {100 * r['overhead_fraction']:.1f}%")
    return rows
