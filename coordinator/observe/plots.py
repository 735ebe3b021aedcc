"""The run report's five plots, as PNG bytes, drawn from a typed Run.

Each plot function returns None when it has nothing to show (no round closed yet, no peak
measured, no freezing metric with a value): the report says why in its place
(run_data.absent_plot_note) rather than embedding an empty frame. matplotlib is imported
only when a plot is drawn, with the Agg backend, so reading a run never needs a display.
"""
from __future__ import annotations

import io
from typing import NamedTuple

from coordinator.observe.run_data import FREEZING_METRICS, MB, DeviceRow, Run, freezing_series, ranges_text, round_bytes
from coordinator.round_metrics import DeviceRound, device_accuracy
from coordinator.strategies.base import stage_text

PLOT_NAMES = ("accuracy", "memory", "bytes", "timeline", "freezing")
MAX_LABELLED_ROUNDS = 40     # past this many rounds the timeline's cells carry no text: it would not fit


def draw_plots(run: Run, baseline: Run | None, devices: list[DeviceRow]) -> dict[str, bytes]:
    """Every plot with something to show, by name (one of PLOT_NAMES)."""
    drawn = {"accuracy": plot_accuracy(run, baseline), "memory": plot_memory(devices), "bytes": plot_bytes(run),
             "timeline": plot_timeline(run, devices), "freezing": plot_freezing(run)}
    return {name: png for name, png in drawn.items() if png is not None}


def _pyplot():
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def _integer_rounds(ax) -> None:
    from matplotlib.ticker import MaxNLocator
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))


def _png(fig) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=90)
    _pyplot().close(fig)
    return buf.getvalue()


def plot_accuracy(run: Run, baseline: Run | None) -> bytes | None:
    """Test accuracy per round; score rounds and rounds that kept the weights marked; the baseline dashed. A run whose
    devices report held-out accuracy (a personalised one) also draws their mean and worst device per round."""
    rs = run.rounds
    if not rs:
        return None
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(9, 4))
    own = [(m.round, device_accuracy([m])) for m in rs]
    own = [(r, a) for r, a in own if a is not None]
    title = "test accuracy of the global model after each round"
    if own:   # a personalised run: each device's own model on its held-out rows is the measure
        ax.plot([r for r, _ in own], [100 * a.mean for _, a in own], marker="o", ms=4, color="tab:green",
                label="devices' own models, mean (held-out rows)")
        ax.plot([r for r, _ in own], [100 * a.worst[1] for _, a in own], linestyle="--", color="tab:green",
                label="worst device")
        title = "each device's own model on its held-out rows; the reference model on the test set"
    ax.plot([m.round for m in rs], [100 * m.accuracy for m in rs], marker="o", ms=4,
            label=f"{run.strategy}: mean of the devices' models (reference)" if own else run.strategy)
    score = [m for m in rs if m.stage.get("phase") == "score"]
    if score:
        ax.scatter([m.round for m in score], [100 * m.accuracy for m in score], s=60, facecolors="none",
                   edgecolors="grey", zorder=3, label="score round (weights unchanged)")
    kept = [m for m in rs if m.aggregated is False]
    if kept:
        ax.scatter([m.round for m in kept], [100 * m.accuracy for m in kept], marker="x", s=60, color="red",
                   zorder=3, label="too few updates: weights kept")
    if baseline is not None and baseline.rounds:
        b = baseline.rounds
        ax.plot([m.round for m in b], [100 * m.accuracy for m in b], linestyle="--", marker=".",
                color="k", label=f"full-model {baseline.strategy} baseline")
    ax.set(xlabel="round", ylabel="accuracy (%)" if own else "test accuracy (%)", title=title, ylim=(0, 100))
    _integer_rounds(ax)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="lower right")
    fig.tight_layout()
    return _png(fig)


class MemoryBar(NamedTuple):
    """One device in the memory plot, in MB: what its bar and lines are drawn from."""
    device_id: str
    tier: str
    x: float
    job_mb: float                    # the training job's part of the device's largest peak (job + agent, one task)
    agent_mb: float                  # the agent's part, measured in the same task: stacked on the job
    job_peak_mb: float               # the job's largest peak in any task (marked when another task's is higher)
    job_budget_mb: float | None      # the job budget the device announced
    device_budget_mb: float | None   # its whole budget, agent and jobs; None: the coordinator cannot tell it
    over: bool                       # a job over its job budget, or job + agent over the whole budget

    @property
    def top_mb(self) -> float:
        return self.job_mb + self.agent_mb


TIER_GAP = 0.6        # between the bars of two tiers
PEAK_MARK_MB = 2.0    # a job's largest peak is marked above its bar only when higher by more: less would not show


def memory_bars(devices: list[DeviceRow]) -> list[MemoryBar]:
    """The memory plot's data: a bar per device in the table's order, tiers apart. A bar is the device's largest
    peak, its job's and its agent's measured in the same task (not each one's largest, which may come from two
    tasks): so a device that stayed within its whole budget is never drawn above it."""
    bars, x, last_tier = [], 0.0, None
    for d in devices:
        if last_tier is not None and d.tier != last_tier:
            x += TIER_GAP
        job, agent = d.device_peak_parts
        whole = d.device_budget_bytes
        bars.append(MemoryBar(d.device_id, d.tier, x, job / MB, agent / MB, d.job_peak_bytes / MB,
                              d.budget_bytes / MB if d.budget_bytes else None, whole / MB if whole else None, d.over))
        last_tier, x = d.tier, x + 1
    return bars


def plot_memory(devices: list[DeviceRow]) -> bytes | None:
    """Each device's largest peak (job and agent stacked) against its whole budget and, dashed, its job budget."""
    bars = memory_bars(devices)
    if not any(b.job_peak_mb for b in bars):
        return None
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(max(9.0, 1.0 * len(bars) + 7), 4.4))     # the legend takes 4 inches
    xs = [b.x for b in bars]
    known = [b for b in bars if b.device_budget_mb and b.job_budget_mb]
    if known:      # the band between the two lines: what the device keeps for its agent
        ax.bar([b.x for b in known], [b.device_budget_mb - b.job_budget_mb for b in known], 0.8,
               bottom=[b.job_budget_mb for b in known], color="tab:orange", alpha=0.2, zorder=0,
               label="the agent's share of the device budget")
    ax.bar(xs, [b.job_mb for b in bars], 0.6, color="tab:blue", label="training job's peak (VmHWM)")
    ax.bar(xs, [b.agent_mb for b in bars], 0.6, bottom=[b.job_mb for b in bars], color="#a6cee3", hatch="//",
           edgecolor="#3a6f95", linewidth=0, label="agent's peak in the same task, on top")
    over = [b for b in bars if b.over]
    if over:
        ax.bar([b.x for b in over], [b.top_mb for b in over], 0.6, fill=False, edgecolor="red", linewidth=2,
               label="over a budget in some round")
    higher = [b for b in bars if b.job_peak_mb > b.job_mb + PEAK_MARK_MB]
    if higher:
        ax.scatter([b.x for b in higher], [b.job_peak_mb for b in higher], marker="_", s=400, linewidths=2.5,
                   color="navy", zorder=3, label="the job's largest peak (another task)")
    whole = [b for b in bars if b.device_budget_mb]
    if whole:
        ax.hlines([b.device_budget_mb for b in whole], [b.x - 0.4 for b in whole], [b.x + 0.4 for b in whole],
                  color="k", linewidth=2.5, label="device budget: all it runs\n(its tier's budget_mb + agent reserve)")
    jobs = [b for b in bars if b.job_budget_mb]
    if jobs:
        ax.hlines([b.job_budget_mb for b in jobs], [b.x - 0.4 for b in jobs], [b.x + 0.4 for b in jobs], color="k",
                  linewidth=1.5, linestyles="--",
                  label="job budget the device announced\n(device budget less the agent's share)")
    top = max([b.top_mb for b in bars] + [b.job_peak_mb for b in bars]
              + [b.device_budget_mb or b.job_budget_mb or 0 for b in bars] + [1.0])
    for b in bars:
        if not b.job_peak_mb:
            ax.text(b.x, 1, "no task", ha="center", va="bottom", fontsize=7, rotation=90, color="grey")
        elif b.job_budget_mb and not b.device_budget_mb:
            ax.text(b.x, max(b.top_mb, b.job_budget_mb) + top * 0.01, "device budget\nnot known here",
                    ha="center", va="bottom", fontsize=7, color="grey")
    spans: dict[str, list[float]] = {}
    for b in bars:
        spans.setdefault(b.tier, []).append(b.x)
    for tier, tier_xs in spans.items():
        a, z = min(tier_xs), max(tier_xs)
        ax.axvspan(a - 0.45, z + 0.45, color="grey", alpha=0.08)
        ax.text((a + z) / 2, top * 1.13, tier, ha="center", va="bottom", fontsize=9, weight="bold")
    ax.set_xticks(xs, [b.device_id for b in bars], rotation=30, ha="right", fontsize=8)
    for label, b in zip(ax.get_xticklabels(), bars):
        label.set_color("red" if b.over else "black")
    ax.set(ylabel="MB", ylim=(0, top * 1.25), title="largest peak RSS per device against its budget (red: over one)")
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.0, 1.0))
    fig.tight_layout()
    return _png(fig)


def plot_bytes(run: Run) -> bytes | None:
    """Bytes the devices downloaded and uploaded in each round, all devices together."""
    per_round = [round_bytes(m) for m in run.rounds]
    if not any(down or up for down, up in per_round):
        return None
    plt = _pyplot()
    down, up = [d for d, _ in per_round], [u for _, u in per_round]
    scale, unit = (MB, "MB") if max(down + up + [0]) >= MB else (1024.0, "KB")
    x = [m.round for m in run.rounds]
    fig, ax = plt.subplots(figsize=(9, 3.8))
    ax.bar([v - 0.2 for v in x], [d / scale for d in down], 0.4, label="to the devices (downloaded)")
    ax.bar([v + 0.2 for v in x], [u / scale for u in up], 0.4, label="from the devices (uploaded)")
    ax.set(xlabel="round", ylabel=unit, title="bytes sent and received per round, all devices")
    _integer_rounds(ax)
    ax.grid(alpha=0.3, axis="y")
    ax.legend(fontsize=8)
    fig.tight_layout()
    return _png(fig)


def plot_timeline(run: Run, devices: list[DeviceRow]) -> bytes | None:
    """Rounds across, the stage on top and one row per device: which block or layer each one trained."""
    rs, strategy, block_of = run.rounds, run.strategy, run.block_of()
    if not rs or not devices:
        return None
    plt = _pyplot()
    from matplotlib.patches import Patch
    ids = [d.device_id for d in devices]
    labelled = len(rs) <= MAX_LABELLED_ROUNDS
    fig, ax = plt.subplots(figsize=(min(24.0, max(8.0, 0.5 * len(rs) + 3)), 1.2 + 0.42 * (len(ids) + 1)))
    cmap = _unit_colours(plt)
    for m in rs:
        x = m.round
        ax.barh(0, 1, left=x - 0.5, color="#e8e8e8", edgecolor="white")
        if labelled:
            ax.text(x, 0, stage_text(m.stage, short=True), ha="center", va="center", fontsize=6,
                    rotation=90 if len(rs) > 12 else 0)
        for y, dev in enumerate(ids, start=1):
            _timeline_cell(ax, x, y, m.devices.get(dev), dev in m.idle, strategy, block_of, cmap, labelled)
    _tier_separators(ax, devices)
    ax.set_yticks(range(len(ids) + 1), ["stage"] + [f"{d.device_id} ({d.tier})" for d in devices], fontsize=8)
    ax.set_ylim(len(ids) + 0.5, -0.5)
    ax.set_xlim(rs[0].round - 0.5, rs[-1].round + 0.5)
    units = "blocks" if strategy == "progressive" else "layers"
    ax.set(xlabel="round", title=f"{units} each device trained, per round")
    _integer_rounds(ax)
    ax.legend(handles=[Patch(color="#d0d0d0", label="score task"), Patch(facecolor="white", edgecolor="#999",
                                                                         label="idle"),
                       Patch(facecolor="#f4c0c0", hatch="//", label="failed or rejected")],
              fontsize=7, loc="upper left", bbox_to_anchor=(1.0, 1.0))
    fig.tight_layout()
    return _png(fig)


def _timeline_cell(ax, x: int, y: int, r: DeviceRound | None, idle: bool, strategy: str,
                   block_of: dict[int, int], cmap, labelled: bool) -> None:
    if r is None:
        ax.barh(y, 1, left=x - 0.5, color="white", edgecolor="#ccc", linewidth=0.5)
        if idle and labelled:
            ax.text(x, y, "idle", ha="center", va="center", fontsize=6, color="grey")
        return
    text = part_label(r, strategy, block_of)
    if not r.accepted:
        ax.barh(y, 1, left=x - 0.5, color="#f4c0c0", edgecolor="white", hatch="//")
        text = r.status[:4]
    elif r.kind == "score":
        ax.barh(y, 1, left=x - 0.5, color="#d0d0d0", edgecolor="white")
    else:
        ax.barh(y, 1, left=x - 0.5, color=cmap(_unit(r, strategy, block_of)), edgecolor="white", alpha=0.85)
    if labelled:
        ax.text(x, y, text, ha="center", va="center", fontsize=6)


def part_label(r: DeviceRound, strategy: str, block_of: dict[int, int]) -> str:
    """What a device's task covered: blocks for progressive, layers otherwise (+h: the head trained too)."""
    if r.kind == "score":
        return "S"
    trainable = r.trained_layers()
    if not trainable:
        return "h" if r.train_head else "-"
    if strategy == "progressive" and block_of:
        return "b" + ranges_text(block_of.get(i, i) for i in trainable)
    return ranges_text(trainable) + ("+h" if strategy == "selective" and r.train_head else "")


def _unit(r: DeviceRound, strategy: str, block_of: dict[int, int]) -> int:
    """The colour key of a task: the lowest block (progressive) or layer it trained."""
    low = min(r.trained_layers(), default=0)
    return block_of.get(low, low) if strategy == "progressive" else low


def _unit_colours(plt):
    """tab10 without its red, which marks failed tasks."""
    tab = plt.get_cmap("tab10")
    colours = [tab(i) for i in range(10) if i != 3]
    return lambda i: colours[i % len(colours)]


def _tier_separators(ax, devices: list[DeviceRow]) -> None:
    for y in range(1, len(devices)):
        if devices[y].tier != devices[y - 1].tier:
            ax.axhline(y + 0.5, color="k", linewidth=1)
    ax.axhline(0.5, color="k", linewidth=1.5)


def plot_freezing(run: Run) -> bytes | None:
    """The freezing signal per block (or layer) over rounds, against the threshold under which it freezes."""
    kind, series, threshold, metric = freezing_series(run)
    if not any(v is not None for points in series.values() for _, v in points):
        return None         # no block has filled its window: ticks alone are an empty frame
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(10, 3.8))
    cmap = _unit_colours(plt)
    pending = []
    for unit, points in sorted(series.items()):
        known = [(r, v) for r, v in points if v is not None]
        pending += [r for r, v in points if v is None]
        if known:
            ax.plot([r for r, _ in known], [v for _, v in known], marker="o", ms=4, color=cmap(unit),
                    label=f"{kind} {unit}")
    if pending:
        ax.scatter(pending, [0.0] * len(pending), marker="|", s=80, color="grey",
                   label="no value yet (its window of rounds not full)")
    if threshold is not None:
        ax.axhline(threshold, color="red", linestyle="--", linewidth=1, label=f"freeze threshold {threshold:g}")
    ax.set(xlabel="round", ylabel=FREEZING_METRICS[metric],
           title=f"freezing metric per {kind}: a {kind} freezes once it stays under the threshold")
    if metric == "effective_movement":
        ax.set_ylim(0, 1.05)
    _integer_rounds(ax)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.0, 1.0))
    fig.tight_layout()
    return _png(fig)
