"""The trace view as a PNG (matplotlib, headless Agg): per answer with a step trace, the normalised entropy
per step (latent / preview shading, switch markers) over the agreement between experts. Answers without a
step trace (baselines) are named in the figure's footer, not drawn. matplotlib is the ``viz`` extra."""
from __future__ import annotations

import math

from .trace_view import PNG_LIMIT, View

SHADE = {"latent": "#e4d9ff", "preview": "#ffefb8"}


def require_matplotlib(option: str = "--png") -> None:
    """An ImportError that says how to get matplotlib when it is missing."""
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        raise ImportError(f"argument {option}: the PNG needs matplotlib, which is not installed: "
                          f"pip install 'dlmom[viz]' (or pip install matplotlib)") from None


def _value(x) -> float:
    return 0.0 if not isinstance(x, (int, float)) or math.isnan(x) else min(max(float(x), 0.0), 1.0)


def _panels(ax_e, ax_a, v: View) -> None:
    from matplotlib.ticker import MaxNLocator

    t = v.trace
    xs = range(len(t))
    start = 0
    for i in range(1, len(t) + 1):  # shade each run of latent / preview steps
        if i == len(t) or t[i]["mode"] != t[start]["mode"]:
            if t[start]["mode"] in SHADE:
                for ax in (ax_e, ax_a):
                    ax.axvspan(start - 0.5, i - 0.5, color=SHADE[t[start]["mode"]], lw=0)
            start = i
    ax_e.plot(xs, [_value(r.get("entropy")) for r in t], color="#333", lw=1.2, marker="." if len(t) <= 120 else None)
    for i, r in enumerate(t):
        if "switch" in r:
            for ax in (ax_e, ax_a):
                ax.axvline(i - 0.5, color="#d62728", ls="--", lw=0.9)
            ax_e.plot([i - 0.5], [1.04], marker="v", color="#d62728", clip_on=False)
    ax_a.bar(xs, [_value(r.get("agreement")) for r in t], width=0.85, color="#4c78a8")
    deferred = [i for i, r in enumerate(t) if r.get("agreement") is None]  # the others deferred: none recorded
    if deferred:
        ax_a.plot(deferred, [0.03] * len(deferred), "_", ms=8, mew=2, color="#999")
    alone = [i for i, r in enumerate(t) if r.get("merged") is False]
    if alone:
        ax_a.plot(alone, [1.08] * len(alone), "s", ms=2.5, color="#e15759", clip_on=False)
    ax_e.set_ylim(0, 1)
    ax_a.set_ylim(0, 1)
    ax_e.set_xlim(-0.5, len(t) - 0.5)
    ax_e.set_ylabel("entropy")
    ax_a.set_ylabel("agreement")
    ax_a.set_xlabel("step")
    ax_a.xaxis.set_major_locator(MaxNLocator(integer=True))
    switches = sum("switch" in r for r in t)
    latent = sum(r["mode"] == "latent" for r in t)
    ax_e.set_title(f"{v.title}   ({len(t)} steps, {latent} latent, {switches} switches)", fontsize=10, loc="left")


def draw(views: list[View], path: str, *, option: str = "--png") -> None:
    """Write the PNG of ``views`` to ``path``; a ValueError naming ``option`` when none has a step trace or
    more than PNG_LIMIT do."""
    require_matplotlib(option)
    import matplotlib

    matplotlib.use("Agg", force=True)
    from matplotlib.figure import Figure
    from matplotlib.patches import Patch

    drawn = [v for v in views if v.has_steps]
    skipped = [v.title for v in views if not v.has_steps]
    if not drawn:
        raise ValueError(f"argument {option}: no answer with a step trace to draw (the PNG draws dlmom steps; "
                         f"{len(skipped)} baseline answer(s) have none: use --html to see their texts)")
    if len(drawn) > PNG_LIMIT:
        raise ValueError(f"argument {option}: {len(drawn)} step traces are too many for one image (at most "
                         f"{PNG_LIMIT}): choose some with --item / --method, or use --html")
    fig = Figure(figsize=(12, 3.4 * len(drawn) + 0.6), layout="constrained")
    axes = fig.subplots(2 * len(drawn), 1, height_ratios=[2, 1] * len(drawn), squeeze=False)[:, 0]
    for k, v in enumerate(drawn):
        axes[2 * k + 1].sharex(axes[2 * k])
        _panels(axes[2 * k], axes[2 * k + 1], v)
    keys = [Patch(color=SHADE["latent"], label="latent"), Patch(color=SHADE["preview"], label="preview"),
            Patch(facecolor="white", edgecolor="#999", label="explicit"),
            Patch(color="#d62728", label="switch"), Patch(color="#e15759", label="lead alone (gate)")]
    fig.legend(handles=keys, loc="outside upper right", ncols=5, fontsize=9, frameon=False)
    if skipped:
        fig.text(0.01, 0.002, f"not drawn (no step trace): {', '.join(skipped)[:300]}", fontsize=8, color="#666")
    fig.savefig(path, dpi=100, format="png")
