"""bench_e2e's scaling plot: three panels (experts, packet size k, batch), step time and overhead share."""
from __future__ import annotations

import pathlib

PANELS = (("experts", "experts", "experts (SmolLM2 roles)"), ("k", "top_k", "packet size k"),
          ("batch", "batch", "batch (prompts)"))


def plot_scaling(rows: list[dict], path: pathlib.Path, title: str) -> pathlib.Path | None:
    """Write the PNG; None (after one printed line saying how to get it) when matplotlib is missing."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("bench_e2e: plot skipped, matplotlib is not installed (pip install matplotlib, or the bench extra)")
        return None
    fig, axes = plt.subplots(1, 3, figsize=(14, 4.2))
    for ax, (axis, key, label) in zip(axes, PANELS):
        share = ax.twinx()
        kinds = ["shared", "separate"] if axis == "experts" else ["shared"]
        for sharing, style in zip(kinds, ("-", "--")):
            pts = sorted((r for r in rows if r["axis"] == axis and r["sharing"] == sharing), key=lambda r: r[key])
            if axis == "experts" and sharing == "separate":  # 1 expert is the same run either way
                pts = [r for r in rows if r["axis"] == axis and r[key] == 1][:1] + pts
            if not pts:
                continue
            x = [r[key] for r in pts]
            suffix = f" ({sharing})" if axis == "experts" else ""
            ax.plot(x, [1e3 * r["step_s"] for r in pts], "o" + style, color="tab:blue", label="step ms" + suffix)
            share.plot(x, [100 * r["overhead_fraction"] for r in pts], "s" + style, color="tab:red",
                       label="overhead %" + suffix)
        if axis != "experts":
            ax.set_xscale("log")
        ax.set_xticks(sorted({r[key] for r in rows if r["axis"] == axis}))
        ax.get_xaxis().set_major_formatter(matplotlib.ticker.ScalarFormatter())
        ax.set_xlabel(label)
        ax.set_ylabel("step time (ms)", color="tab:blue")
        share.set_ylabel("overhead outside expert forwards (%)", color="tab:red")
        share.set_ylim(bottom=0)
        ax.set_ylim(bottom=0)
        lines = ax.get_legend_handles_labels()
        more = share.get_legend_handles_labels()
        ax.legend(lines[0] + more[0], lines[1] + more[1], fontsize=7, loc="lower center")
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
