"""The run report's five plots, as PNG bytes, drawn from a typed Run.

Each plot function returns None when it has nothing to show (no round closed yet, no peak
measured, no freezing metric logged): the report leaves such a plot out rather than
embedding an empty frame. matplotlib is imported only when a plot is drawn, with the Agg
backend, so reading a run never needs a display.
"""
from __future__ import annotations

import io

from coordinator.observe.run_data import MB, DeviceRow, Run, freezing_series, ranges_text, round_bytes
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


def plot_memory(devices: list[DeviceRow]) -> bytes | None:
    """Peak RSS per device, training job and agent stacked, against the job budget it announced; tiers apart."""
    if not any(d.job_peak_bytes for d in devices):
        return None
    plt = _pyplot()
    xs, x, last_tier, spans = [], 0.0, None, []
    for d in devices:
        if last_tier is not None and d.tier != last_tier:
            x += 0.6
        if d.tier != last_tier:
            spans.append([d.tier, x, x])
        spans[-1][2] = x
        xs.append(x)
        last_tier, x = d.tier, x + 1
    fig, ax = plt.subplots(figsize=(max(7.0, 1.0 * len(devices) + 5), 4.4))
    job = [d.job_peak_bytes / MB for d in devices]
    agent = [d.agent_peak_bytes / MB for d in devices]
    edges = ["red" if d.over else "none" for d in devices]
    ax.bar(xs, job, 0.6, color="tab:blue", edgecolor=edges, linewidth=2, label="training job peak (VmHWM)")
    ax.bar(xs, agent, 0.6, bottom=job, color="#a6cee3", hatch="//", edgecolor=edges, linewidth=2,
           label="agent peak, on top")
    with_budget = [(xv, d.budget_bytes / MB) for xv, d in zip(xs, devices) if d.budget_bytes]
    if with_budget:
        ax.hlines([b for _, b in with_budget], [xv - 0.4 for xv, _ in with_budget],
                  [xv + 0.4 for xv, _ in with_budget], color="k", linewidth=2.5,
                  label="job budget the device announced")
    for xv, d in zip(xs, devices):
        if not d.job_peak_bytes:
            ax.text(xv, 1, "no task", ha="center", va="bottom", fontsize=7, rotation=90, color="grey")
    top = max([j + a for j, a in zip(job, agent)] + [b for _, b in with_budget] + [1.0])
    for tier, a, b in spans:
        ax.axvspan(a - 0.45, b + 0.45, color="grey", alpha=0.08)
        ax.text((a + b) / 2, top * 1.13, tier, ha="center", va="bottom", fontsize=9, weight="bold")
    ax.set_xticks(xs, [d.device_id for d in devices], rotation=30, ha="right", fontsize=8)
    for label, d in zip(ax.get_xticklabels(), devices):
        label.set_color("red" if d.over else "black")
    ax.set(ylabel="MB", ylim=(0, top * 1.25), title="largest peak RSS per device (red: a job over its budget)")
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
    if not rs:
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
    """Effective movement per block (or layer) over rounds, against the threshold under which it freezes."""
    kind, series, threshold = freezing_series(run)
    if not series:
        return None
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
        ax.scatter(pending, [0.02] * len(pending), marker="|", s=80, color="grey",
                   label="no value yet (its window of rounds not full)")
    if threshold is not None:
        ax.axhline(threshold, color="red", linestyle="--", linewidth=1, label=f"freeze threshold {threshold:g}")
    ax.set(xlabel="round", ylabel="effective movement", ylim=(0, 1.05),
           title=f"freezing metric per {kind}: a {kind} freezes once it stays under the threshold")
    _integer_rounds(ax)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.0, 1.0))
    fig.tight_layout()
    return _png(fig)
