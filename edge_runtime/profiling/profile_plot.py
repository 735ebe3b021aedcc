"""A picture of a profile: measured peak against batch size per candidate, tier budgets as lines.

matplotlib is imported only here, so a board can measure without it and plot elsewhere.
"""
from __future__ import annotations

from pathlib import Path

from edge_runtime.errors import EdgeRuntimeError
from edge_runtime.memory import MIB
from edge_runtime.profiling.profile_file import Profile


def plot(profile: Profile, out: Path) -> None:
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise EdgeRuntimeError("plotting needs matplotlib (pip install matplotlib, or the server install)") from None
    fig, ax = plt.subplots(figsize=(9, 5.5), dpi=120)
    spans = sorted({_key(p) for p in profile.measurements})
    fits = {_key(f): f for f in profile.fits}
    batches = sorted({p["batch_size"] for p in profile.measurements})
    xs = [0, max(batches) * 1.1]
    for i, span in enumerate(spans):
        pts = [p for p in profile.measurements if _key(p) == span]
        color = plt.cm.tab10(i % 10)
        skipped = f" less {','.join(map(str, span[2]))}" if span[2] else ""   # a family member's part
        ax.plot([p["batch_size"] for p in pts], [p["peak_bytes"] / MIB for p in pts], "o", color=color,
                label=f"layers {span[0]}-{span[1]}{skipped}")
        f = fits.get(span)
        if f:
            # many points: on the log axis a line through only its two ends would bend away from the fit
            line = [xs[1] * i / 64 for i in range(65)]
            ax.plot(line, [(profile.baseline_bytes + f["fixed_bytes"] + f["per_sample_bytes"] * x) / MIB for x in line],
                    "-", color=color, alpha=0.6, linewidth=1)
    for t in profile.tiers:
        ax.axhline(t.budget_bytes / MIB, color="grey", linestyle="--", linewidth=0.8)
        ax.text(xs[1], t.budget_bytes / MIB, f" {t.tier}", va="center", fontsize=8, color="dimgrey")
    ax.axhline(profile.baseline_bytes / MIB, color="black", linewidth=0.8)
    ax.text(0.5, profile.baseline_bytes / MIB, "runtime baseline", va="bottom", fontsize=8)
    top = max([p["peak_bytes"] for p in profile.measurements] + [t.budget_bytes for t in profile.tiers]) / MIB
    # log scale: peaks of ~100 MB and budgets of several GB must both be readable
    ax.set_yscale("log")
    ax.set_ylim(profile.baseline_bytes / MIB * 0.8, top * 1.3)
    from matplotlib.ticker import FuncFormatter, LogLocator
    ax.yaxis.set_major_locator(LogLocator(base=2))
    ax.yaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:.0f}"))
    ax.yaxis.set_minor_formatter(FuncFormatter(lambda v, _: ""))
    ax.set_xlim(0, xs[1])
    ax.set_xlabel("batch size (samples per micro-batch)")
    ax.set_ylabel("peak RSS of the training process (MB, log scale)")
    ax.set_title(f"{profile.model}: measured peak memory per candidate span (dots), fits (lines), tier budgets")
    ax.legend(fontsize=8, loc="upper left", ncol=2)
    fig.tight_layout()
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out)
    plt.close(fig)


def _key(entry: dict) -> tuple:
    """A measurement's or fit's span: (first, last, skipped layers)."""
    return entry["first"], entry["last"], tuple(sorted(entry.get("skip", ())))
