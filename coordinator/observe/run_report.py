"""The run report: one self-contained HTML page, and its plots as PNG files, from a run's directory.

`edge-coordinator report WORKDIR` writes WORKDIR/report/report.html. It reads only files,
so it works on a finished run and on one still running: metrics.jsonl (a partly written
last line is left out, not fatal), the model's manifest, and the state store opened
read-only with a short timeout (when the store is locked or missing, the page only lacks
what the store alone knows: devices that never trained, the open round, the settings).

The page shows test accuracy per round (against a full-model FedAvg baseline when one
ran: given, or found beside the run), each device's measured peak RSS (training job and
agent, stacked) against the budget it announced, grouped by tier, bytes to and from the
devices per round, which block or layer each device trained in each round, and the
freezing metric per block when the strategy records one. Its images are data URIs and
it loads nothing else: it can be mailed, archived, or opened on a machine with no network.
"""
from __future__ import annotations

import base64
import html
import io
import json
import sqlite3
import time
from dataclasses import dataclass, field
from pathlib import Path

from edge_runtime.store import atomic_write_bytes, atomic_write_text

MB = float(1 << 20)
REPORT = "report.html"
PLOTS = {"accuracy", "memory", "bytes", "timeline", "freezing"}
MAX_LABELLED_ROUNDS = 40     # past this many rounds the timeline's cells carry no text: it would not fit
SCAN_LIMIT = 200             # entries of a directory looked at when searching for a baseline beside a run
CSP = "default-src 'none'; img-src data:; style-src 'unsafe-inline'; script-src 'unsafe-inline'"


# -- reading a run ---------------------------------------------------------------------------
@dataclass
class Run:
    """What the report knows of one run; every field may be partial while the run goes on."""
    workdir: Path
    rounds: list[dict]
    unreadable_lines: int = 0
    meta: dict = field(default_factory=dict)          # the store's "run": strategy, manifest sha, tag
    settings: dict = field(default_factory=dict)      # the settings the run started with
    registry: list[dict] = field(default_factory=list)  # every device that said hello
    open_round: dict | None = None                    # {"round", "stage"} of a round still collecting
    manifest: dict | None = None

    @property
    def strategy(self) -> str:
        for source in (self.rounds[-1] if self.rounds else {}, self.meta, self.settings.get("service", {})):
            if source.get("strategy"):
                return str(source["strategy"])
        return "?"

    @property
    def model(self) -> str:
        if self.manifest and self.manifest.get("model"):
            return str(self.manifest["model"])
        return str(self.settings.get("service", {}).get("model", "?"))

    @property
    def finished(self) -> bool:
        return bool(self.rounds and self.rounds[-1].get("finished"))

    def block_of(self) -> dict[int, int]:
        """Layer index -> block index, from the manifest (a layer is its own block without one)."""
        layers = (self.manifest or {}).get("layers", [])
        return {int(l["index"]): int(l.get("block", l["index"])) for l in layers if "index" in l}


def read_rounds(path: Path) -> tuple[list[dict], int]:
    """Closed rounds from metrics.jsonl, and how many lines could not be read (a line being written)."""
    if not path.exists():
        return [], 0
    by_round, bad = {}, 0
    for line in path.read_text(errors="replace").splitlines():
        if not line.strip():
            continue
        try:
            m = json.loads(line)
        except json.JSONDecodeError:
            bad += 1
            continue
        if isinstance(m, dict) and isinstance(m.get("round"), int) and isinstance(m.get("accuracy"), (int, float)):
            for key in ("devices", "idle", "stage"):   # older metrics lack some; the plots read them all
                m.setdefault(key, {})
            by_round[m["round"]] = m        # a round written twice counts once, its last form
        else:
            bad += 1
    return [by_round[r] for r in sorted(by_round)], bad


def read_store(path: Path) -> dict:
    """What the state store holds beyond metrics.jsonl, read-only; {} when it cannot be read now."""
    if not path.exists():
        return {}
    try:
        db = sqlite3.connect(f"{path.resolve().as_uri()}?mode=ro", uri=True, timeout=0.5)
    except sqlite3.Error:
        return {}
    try:
        meta = {k: json.loads(v) for k, v in db.execute("SELECT key, value FROM meta")}
        cur = db.execute("SELECT * FROM devices ORDER BY device_id")
        cols = [c[0] for c in cur.description]
        registry = [dict(zip(cols, row)) for row in cur.fetchall()]
        row = db.execute("SELECT round, plan FROM rounds WHERE state = 'open' ORDER BY round DESC LIMIT 1").fetchone()
        open_round = None if row is None else {"round": row[0], "stage": json.loads(row[1]).get("stage", {})}
        return {"meta": meta, "registry": registry, "open_round": open_round}
    except (sqlite3.Error, ValueError):   # locked past the timeout, or a store of an older layout
        return {}
    finally:
        db.close()


def resolve_workdir(path: Path) -> Path:
    """The coordinator's directory: the path itself, or its coordinator/ (how the demo and benchmarks lay runs out)."""
    path = Path(path).resolve()
    if not (path / "metrics.jsonl").exists() and (path / "coordinator" / "metrics.jsonl").exists():
        return path / "coordinator"
    return path


def load_run(workdir: Path) -> Run:
    work = resolve_workdir(workdir)
    if not (work / "metrics.jsonl").exists() and not (work / "state.db").exists():
        raise FileNotFoundError(f"{work} holds no coordinator run (no metrics.jsonl or state.db)")
    rounds, bad = read_rounds(work / "metrics.jsonl")
    store = read_store(work / "state.db")
    meta = store.get("meta", {})
    manifest = None
    try:
        manifest = json.loads((work / "model" / "manifest.json").read_text())
    except (OSError, ValueError):
        pass
    return Run(work, rounds, bad, meta.get("run") or {}, meta.get("settings") or {}, store.get("registry", []),
               store.get("open_round"), manifest)


# -- a baseline beside the run -----------------------------------------------------------------
def _comparable(run: Run, other: Run) -> bool:
    """Same model export, same evaluation, same start, same fleet: only then are accuracies comparable."""
    def key(r: Run) -> tuple:
        s = r.settings.get("service", {})
        return (r.meta.get("manifest"), s.get("eval_data", ""), s.get("eval_samples"), s.get("init_weights", ""),
                tuple(sorted(d["device_id"] for d in r.registry)))
    return bool(run.meta and other.meta and run.registry) and key(run) == key(other)


def _candidates(work: Path):
    """Directories next to the run: its siblings and, one level up, <sibling>/coordinator (the demo's layout)."""
    for parent in (work.parent, work.parent.parent):
        try:
            entries = sorted(parent.iterdir())[:SCAN_LIMIT]
        except OSError:
            continue
        for entry in entries:
            for d in (entry, entry / "coordinator"):
                if d != work and (d / "metrics.jsonl").is_file() and (d / "state.db").is_file():
                    yield d


def find_baseline(run: Run) -> Path | None:
    """A full-model FedAvg run of the same model, evaluation and fleet next to this run (the latest if several)."""
    if run.strategy == "fedavg":
        return None
    found = []
    for d in _candidates(run.workdir):
        other = load_run(d)
        if other.strategy == "fedavg" and other.rounds and _comparable(run, other):
            found.append(((d / "metrics.jsonl").stat().st_mtime, d))
    return max(found)[1] if found else None


# -- what the page says ------------------------------------------------------------------------
@dataclass
class DeviceRow:
    device_id: str
    tier: str
    budget: int | None = None           # job budget the device announced (bytes)
    job_peak: int = 0
    job_peak_round: int | None = None
    agent_peak: int = 0
    trained: int = 0
    scored: int = 0
    failed: int = 0
    idle: int = 0
    over_rounds: list[int] = field(default_factory=list)

    @property
    def over(self) -> bool:
        return bool(self.over_rounds)


def device_rows(run: Run) -> list[DeviceRow]:
    """Per device: its largest measured peaks, its budget, and what it did; ordered by tier, then id."""
    rows: dict[str, DeviceRow] = {}
    for d in run.registry:
        rows[d["device_id"]] = DeviceRow(d["device_id"], d.get("tier") or "?", d.get("budget_bytes"))
    for m in run.rounds:
        for dev, r in m.get("devices", {}).items():
            _take_task(rows.setdefault(dev, DeviceRow(dev, r.get("tier", "?"))), m["round"], r)
        for dev in m.get("idle", {}):
            rows.setdefault(dev, DeviceRow(dev, "?")).idle += 1
    return sorted(rows.values(), key=lambda r: (r.tier, r.device_id))


def _take_task(row: DeviceRow, round_no: int, r: dict) -> None:
    row.tier = r.get("tier") or row.tier
    row.budget = r.get("budget_bytes", row.budget)
    if r.get("status") != "accepted":
        row.failed += 1
        return
    if r.get("kind") == "score":
        row.scored += 1
    else:
        row.trained += 1
    peak = r.get("peak_rss_bytes")
    if peak is None:
        return
    if peak > row.job_peak:
        row.job_peak, row.job_peak_round = peak, round_no
    row.agent_peak = max(row.agent_peak, r.get("agent_peak_rss_bytes", 0))
    if r.get("budget_bytes") is not None and peak > r["budget_bytes"]:
        row.over_rounds.append(round_no)


def summary_items(run: Run, baseline: Run | None, devices: list[DeviceRow]) -> list[tuple[str, str, str]]:
    """(id, label, text) of the header: what someone glancing at the page needs first."""
    rs = run.rounds
    items = [("model", "model", run.model), ("strategy", "strategy", run.strategy), ("state", "state", _state(run)),
             ("rounds", "rounds closed", str(len(rs)))]
    if rs:
        best = max(rs, key=lambda m: m["accuracy"])
        items += [("final-accuracy", "final accuracy", f"{_pct(rs[-1]['accuracy'])} (round {rs[-1]['round']})"),
                  ("best-accuracy", "best accuracy", f"{_pct(best['accuracy'])} (round {best['round']})")]
    if baseline is not None and baseline.rounds:
        b = baseline.rounds[-1]
        items.append(("baseline-accuracy", "baseline",
                      f"{_pct(b['accuracy'])} after {len(baseline.rounds)} rounds of {baseline.strategy} "
                      f"({baseline.workdir})"))
    items += [("devices-per-tier", "devices per tier", _tiers_text(devices)),
              ("updates", "updates", _updates_text(rs)),
              ("bytes", "bytes, all rounds", _bytes_text(rs)),
              ("wall-time", "wall time", _wall_text(rs, run))]
    return items


def _state(run: Run) -> str:
    if run.finished:
        return "finished"
    if run.open_round is not None:   # open in the store: collecting, or its coordinator stopped mid-round
        return f"in progress: round {run.open_round['round']} open ({_stage_label(run.open_round['stage'])})"
    return "in progress: the schedule has not finished"


def _tiers_text(devices: list[DeviceRow]) -> str:
    tiers: dict[str, list[str]] = {}
    for d in devices:
        tiers.setdefault(d.tier, []).append(d.device_id)
    return "; ".join(f"{t}: {len(ids)} ({', '.join(ids)})" for t, ids in tiers.items()) or "none yet"


def _updates_text(rs: list[dict]) -> str:
    scores = sum(r.get("kind") == "score" and r.get("status") == "accepted" for m in rs for r in m["devices"].values())
    text = (f"{sum(m.get('updates', 0) for m in rs)} accepted, {sum(m.get('rejected', 0) for m in rs)} rejected, "
            f"{sum(m.get('failed', 0) for m in rs)} failed")
    return text + (f" ({scores} of the accepted are layer scores)" if scores else "")


def _bytes_text(rs: list[dict]) -> str:
    down = sum(r.get("downloaded_bytes", 0) for m in rs for r in m["devices"].values())
    up = sum(r.get("uploaded_bytes", 0) for m in rs for r in m["devices"].values())
    return f"{_size(down)} to the devices, {_size(up)} from them"


def _wall_text(rs: list[dict], run: Run) -> str:
    if not rs or "opened_at" not in rs[0] or "closed_at" not in rs[-1]:
        return "-"
    seconds = rs[-1]["closed_at"] - rs[0]["opened_at"]
    text = f"{_duration(seconds)} (round {rs[0]['round']} opened to round {rs[-1]['round']} closed)"
    return text if run.finished else text + f"; last round closed {_duration(time.time() - rs[-1]['closed_at'])} ago"


def _pct(x: float) -> str:
    return f"{100 * x:.2f}%"


def _size(n: float) -> str:
    return f"{n / MB:.1f} MB" if n >= MB else f"{n / 1024:.1f} KB"


def _duration(s: float) -> str:
    s = max(0.0, s)
    return f"{s:.0f} s" if s < 120 else f"{s / 60:.1f} min" if s < 7200 else f"{s / 3600:.1f} h"


def _stage_label(stage: dict) -> str:
    """A stage in a few characters: 'grow b1', 'shrink b3', 'layer 2', 'fedavg', 'score'."""
    phase = str(stage.get("phase", ""))
    phase = {"shrinking": "shrink", "growing": "grow", "layerwise": "layer"}.get(phase, phase)
    if "block" in stage:
        return f"{phase} b{stage['block']}"
    if "layer" in stage:
        return f"layer {stage['layer']}"
    return phase or "-"


def _ranges(values) -> str:
    """[0, 1, 2, 4] -> '0-2,4'."""
    values, out = sorted(set(values)), []
    for v in values:
        if out and v == out[-1][1] + 1:
            out[-1][1] = v
        else:
            out.append([v, v])
    return ",".join(str(a) if a == b else f"{a}-{b}" for a, b in out)


def part_label(r: dict, strategy: str, block_of: dict[int, int]) -> str:
    """What a device's task covered: blocks for progressive, layers otherwise (+h: the head trained too)."""
    if r.get("kind") == "score":
        return "S"
    trainable = _trainable(r)
    if not trainable:
        return "h" if r.get("train_head") else "-"
    if strategy == "progressive" and block_of:
        return "b" + _ranges(block_of.get(i, i) for i in trainable)
    return _ranges(trainable) + ("+h" if strategy == "selective" and r.get("train_head") else "")


def _trainable(r: dict) -> list[int]:
    """The layers a task trained (older metrics have only its span)."""
    if "trainable" in r:
        return [int(i) for i in r["trainable"]]
    first, last = r.get("layers", [0, -1])
    return list(range(int(first), int(last) + 1))


def _unit(r: dict, strategy: str, block_of: dict[int, int]) -> int:
    """The colour key of a task: the lowest block (progressive) or layer it trained."""
    low = min(_trainable(r), default=0)
    return block_of.get(low, low) if strategy == "progressive" else low


# -- plots ---------------------------------------------------------------------------------------
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


def plot_accuracy(run: Run, baseline: Run | None) -> bytes:
    """Test accuracy per round; score rounds and rounds that kept the weights marked; the baseline dashed."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(9, 4))
    rs = run.rounds
    ax.plot([m["round"] for m in rs], [100 * m["accuracy"] for m in rs], marker="o", ms=4, label=run.strategy)
    score = [m for m in rs if m.get("stage", {}).get("phase") == "score"]
    if score:
        ax.scatter([m["round"] for m in score], [100 * m["accuracy"] for m in score], s=60, facecolors="none",
                   edgecolors="grey", zorder=3, label="score round (weights unchanged)")
    kept = [m for m in rs if m.get("aggregated") is False]
    if kept:
        ax.scatter([m["round"] for m in kept], [100 * m["accuracy"] for m in kept], marker="x", s=60, color="red",
                   zorder=3, label="too few updates: weights kept")
    if baseline is not None and baseline.rounds:
        b = baseline.rounds
        ax.plot([m["round"] for m in b], [100 * m["accuracy"] for m in b], linestyle="--", marker=".",
                color="k", label=f"full-model {baseline.strategy} baseline")
    ax.set(xlabel="round", ylabel="test accuracy (%)", title="test accuracy of the global model after each round",
           ylim=(0, 100))
    _integer_rounds(ax)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="lower right")
    fig.tight_layout()
    return _png(fig)


def plot_memory(devices: list[DeviceRow]) -> bytes:
    """Peak RSS per device, training job and agent stacked, against the job budget it announced; tiers apart."""
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
    job = [d.job_peak / MB for d in devices]
    agent = [d.agent_peak / MB for d in devices]
    edges = ["red" if d.over else "none" for d in devices]
    ax.bar(xs, job, 0.6, color="tab:blue", edgecolor=edges, linewidth=2, label="training job peak (VmHWM)")
    ax.bar(xs, agent, 0.6, bottom=job, color="#a6cee3", hatch="//", edgecolor=edges, linewidth=2,
           label="agent peak, on top")
    with_budget = [(xv, d.budget / MB) for xv, d in zip(xs, devices) if d.budget]
    if with_budget:
        ax.hlines([b for _, b in with_budget], [xv - 0.4 for xv, _ in with_budget],
                  [xv + 0.4 for xv, _ in with_budget], color="k", linewidth=2.5,
                  label="job budget the device announced")
    for xv, d in zip(xs, devices):
        if not d.job_peak:
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


def plot_bytes(run: Run) -> bytes:
    """Bytes the devices downloaded and uploaded in each round, all devices together."""
    plt = _pyplot()
    rs = run.rounds
    down = [sum(r.get("downloaded_bytes", 0) for r in m["devices"].values()) for m in rs]
    up = [sum(r.get("uploaded_bytes", 0) for r in m["devices"].values()) for m in rs]
    scale, unit = (MB, "MB") if max(down + up + [0]) >= MB else (1024.0, "KB")
    x = [m["round"] for m in rs]
    fig, ax = plt.subplots(figsize=(9, 3.8))
    ax.bar([v - 0.2 for v in x], [d / scale for d in down], 0.4, label="to the devices (downloaded)")
    ax.bar([v + 0.2 for v in x], [u / scale for u in up], 0.4, label="from the devices (uploaded)")
    ax.set(xlabel="round", ylabel=unit, title="bytes sent and received per round, all devices")
    _integer_rounds(ax)
    ax.grid(alpha=0.3, axis="y")
    ax.legend(fontsize=8)
    fig.tight_layout()
    return _png(fig)


def plot_timeline(run: Run, devices: list[DeviceRow]) -> bytes:
    """Rounds across, the stage on top and one row per device: which block or layer each one trained."""
    plt = _pyplot()
    from matplotlib.patches import Patch
    rs, strategy, block_of = run.rounds, run.strategy, run.block_of()
    ids = [d.device_id for d in devices]
    labelled = len(rs) <= MAX_LABELLED_ROUNDS
    fig, ax = plt.subplots(figsize=(min(24.0, max(8.0, 0.5 * len(rs) + 3)), 1.2 + 0.42 * (len(ids) + 1)))
    cmap = _unit_colours(plt)
    for m in rs:
        x = m["round"]
        ax.barh(0, 1, left=x - 0.5, color="#e8e8e8", edgecolor="white")
        if labelled:
            ax.text(x, 0, _stage_label(m.get("stage", {})), ha="center", va="center", fontsize=6,
                    rotation=90 if len(rs) > 12 else 0)
        for y, dev in enumerate(ids, start=1):
            _timeline_cell(ax, x, y, m["devices"].get(dev), dev in m.get("idle", {}), strategy, block_of, cmap,
                           labelled)
    _tier_separators(ax, devices)
    ax.set_yticks(range(len(ids) + 1), ["stage"] + [f"{d.device_id} ({d.tier})" for d in devices], fontsize=8)
    ax.set_ylim(len(ids) + 0.5, -0.5)
    if rs:
        ax.set_xlim(rs[0]["round"] - 0.5, rs[-1]["round"] + 0.5)
    units = "blocks" if strategy == "progressive" else "layers"
    ax.set(xlabel="round", title=f"{units} each device trained, per round")
    _integer_rounds(ax)
    ax.legend(handles=[Patch(color="#d0d0d0", label="score task"), Patch(facecolor="white", edgecolor="#999",
                                                                         label="idle"),
                       Patch(facecolor="#f4c0c0", hatch="//", label="failed or rejected")],
              fontsize=7, loc="upper left", bbox_to_anchor=(1.0, 1.0))
    fig.tight_layout()
    return _png(fig)


def _timeline_cell(ax, x, y, r, idle, strategy, block_of, cmap, labelled) -> None:
    if r is None:
        ax.barh(y, 1, left=x - 0.5, color="white", edgecolor="#ccc", linewidth=0.5)
        if idle and labelled:
            ax.text(x, y, "idle", ha="center", va="center", fontsize=6, color="grey")
        return
    text = part_label(r, strategy, block_of)
    if r.get("status") != "accepted":
        ax.barh(y, 1, left=x - 0.5, color="#f4c0c0", edgecolor="white", hatch="//")
        text = r.get("status", "?")[:4]
    elif r.get("kind") == "score":
        ax.barh(y, 1, left=x - 0.5, color="#d0d0d0", edgecolor="white")
    else:
        ax.barh(y, 1, left=x - 0.5, color=cmap(_unit(r, strategy, block_of)), edgecolor="white", alpha=0.85)
    if labelled:
        ax.text(x, y, text, ha="center", va="center", fontsize=6)


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


def freezing_series(run: Run) -> tuple[str, dict[int, list[tuple[int, float | None]]], float | None]:
    """('block' or 'layer', unit -> [(round, movement or None)], threshold) from the rounds' schedule reports."""
    kind, series, threshold = "block", {}, None
    for m in run.rounds:
        report = m.get("schedule") or {}
        if "effective_movement" not in report:
            continue
        stage = m.get("stage", {})
        kind = "block" if "block" in stage else "layer"
        unit = int(stage.get(kind, -1))
        series.setdefault(unit, []).append((m["round"], report["effective_movement"]))
        threshold = report.get("freeze_threshold", threshold)
    return kind, series, threshold


def plot_freezing(run: Run) -> bytes:
    """Effective movement per block (or layer) over rounds, against the threshold under which it freezes."""
    plt = _pyplot()
    kind, series, threshold = freezing_series(run)
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


def freezing_note(run: Run) -> str | None:
    """Why there is no freezing plot, or None when there is one."""
    kind, series, _ = freezing_series(run)
    if series:
        if all(v is None for pts in series.values() for _, v in pts):
            window = run.settings.get("progressive", {}).get("freeze_window")
            return (f"The freezing metric is logged, but no {kind} has trained its full window"
                    + (f" of {window} rounds" if window else "")
                    + " yet, so it has no value in any round (marks below).")
        return None
    if run.strategy in ("progressive", "layerwise"):
        return (f"The freezing metric is not recorded yet: the {run.strategy} schedule logs it once a "
                f"{'block trains in its growing stage' if run.strategy == 'progressive' else 'layer trains'}.")
    return f"The freezing metric is not recorded for this strategy ({run.strategy}): it has no freezing rule."


# -- the page ------------------------------------------------------------------------------------
STYLE = """
body { font-family: sans-serif; margin: 1.5em auto; max-width: 1250px; color: #222; }
h1 { font-size: 1.5em; margin-bottom: 0.2em; }
h2 { font-size: 1.15em; margin-top: 1.6em; border-bottom: 1px solid #ccc; }
table { border-collapse: collapse; font-size: 0.9em; } td, th { padding: 3px 9px; border-bottom: 1px solid #e3e3e3; }
th { text-align: left; background: #f3f3f3; } td.num { text-align: right; font-variant-numeric: tabular-nums; }
table.summary th { background: none; width: 12em; }
tr.over td { background: #fde0e0; color: #a00000; font-weight: bold; }
img { max-width: 100%; border: 1px solid #eee; } p.note { color: #555; font-style: italic; }
.meta { color: #666; font-size: 0.85em; }
"""

# Counts, once the page has loaded, the images the browser decoded and any resource it fetched
# (a data: image is not one); the counts land on <body> for anyone checking the page headless.
CHECK_SCRIPT = """
window.addEventListener("load", function () {
  var imgs = Array.prototype.slice.call(document.images);
  var shown = imgs.filter(function (i) { return i.complete && i.naturalWidth > 0; }).length;
  var fetched = performance.getEntriesByType("resource").filter(function (e) {
    return e.name.indexOf("data:") !== 0; }).length;
  document.body.setAttribute("data-images", String(imgs.length));
  document.body.setAttribute("data-images-rendered", String(shown));
  document.body.setAttribute("data-resources-fetched", String(fetched));
});
"""


def _img(name: str, png: bytes, alt: str) -> str:
    data = base64.b64encode(png).decode("ascii")
    return f'<img id="img-{name}" src="data:image/png;base64,{data}" alt="{html.escape(alt)}">'


def _summary_html(items) -> str:
    rows = "".join(f'<tr><th>{html.escape(label)}</th><td id="{key}">{html.escape(text)}</td></tr>'
                   for key, label, text in items)
    return f'<table class="summary">{rows}</table>'


def _devices_html(devices: list[DeviceRow]) -> str:
    head = ("<tr><th>device</th><th>tier</th><th>job budget (MB)</th><th>job peak (MB)</th><th>agent peak (MB)</th>"
            "<th>job + agent (MB)</th><th>headroom (MB)</th><th>trained / scored / failed / idle rounds</th>"
            "<th>verdict</th></tr>")
    body = "".join(_device_tr(d) for d in devices)
    return f'<table id="device-table">{head}{body}</table>'


def _device_tr(d: DeviceRow) -> str:
    def mb(n):
        return f'<td class="num" data-bytes="{n}">{n / MB:.1f}</td>' if n is not None else '<td class="num">-</td>'
    used = d.job_peak > 0
    if d.over:
        verdict = f"OVER budget in round(s) {_ranges(d.over_rounds)}"
    elif used:
        verdict = "within budget"
    else:
        verdict = "no task ran"
    headroom = (d.budget - d.job_peak) if (d.budget and used) else None
    peak_round = f" (round {d.job_peak_round})" if used else ""
    return (f'<tr id="device-{html.escape(d.device_id)}" class="{"over" if d.over else "ok"}">'
            f"<td>{html.escape(d.device_id)}</td><td>{html.escape(d.tier)}</td>{mb(d.budget)}"
            f'<td class="num" data-bytes="{d.job_peak}">{d.job_peak / MB:.1f}{peak_round}</td>'
            f"{mb(d.agent_peak)}{mb(d.job_peak + d.agent_peak)}{mb(headroom)}"
            f'<td class="num">{d.trained} / {d.scored} / {d.failed} / {d.idle}</td><td>{verdict}</td></tr>')


def _round_notes(run: Run) -> str:
    """Rounds that did not go plainly: early closes, failures, rejections, weights kept."""
    notes = []
    for m in run.rounds:
        bits = []
        if m.get("closed_because", "every task settled") != "every task settled":
            bits.append(f"closed because {m['closed_because']}")
        if m.get("failed"):
            bits.append(f"{m['failed']} task(s) failed: " + "; ".join(
                f"{d}: {r.get('reason') or r.get('status')}" for d, r in m["devices"].items()
                if r.get("status") != "accepted"))
        if m.get("rejected"):
            bits.append(f"{m['rejected']} message(s) rejected")
        if m.get("aggregated") is False:
            bits.append("too few updates: the weights were kept")
        if bits:
            notes.append(f"<li>round {m['round']}: {html.escape('; '.join(bits))}</li>")
    if run.unreadable_lines:
        notes.append(f"<li>{run.unreadable_lines} line(s) of metrics.jsonl could not be read (a round being "
                     f"written as the report was made) and are left out</li>")
    if not notes:
        return '<p class="note">Every round closed with every task settled.</p>'
    return f"<ul>{''.join(notes)}</ul>"


def render(run: Run, baseline: Run | None, devices: list[DeviceRow], images: dict[str, bytes]) -> str:
    """The page: summary, then one section per plot, the devices' table and the rounds worth a note."""
    def fig(name, alt):
        return _img(name, images[name], alt) if name in images else ""
    title = f"edgeblock run report: {run.strategy} on {run.model} ({run.workdir.parent.name}/{run.workdir.name})"
    empty = "" if run.rounds else '<p class="note">No round has closed yet: the plots appear after the first one.</p>'
    note = freezing_note(run)
    baseline_note = "" if baseline is not None else (
        '<p class="note">No full-model FedAvg baseline: none was given (--baseline DIR) and none of the same model, '
        'evaluation and fleet was found beside this run.</p>' if run.strategy != "fedavg" else
        '<p class="note">This run is the full-model FedAvg baseline.</p>')
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8">
<meta http-equiv="Content-Security-Policy" content="{CSP}">
<title>{html.escape(title)}</title><style>{STYLE}</style><script>{CHECK_SCRIPT}</script></head>
<body>
<h1>{html.escape(title)}</h1>
<p class="meta">{html.escape(str(run.workdir))}; report made {time.strftime('%Y-%m-%d %H:%M:%S')}</p>
{_summary_html(summary_items(run, baseline, devices))}
{empty}
<h2>Test accuracy per round</h2>
{baseline_note}{fig("accuracy", "test accuracy per round")}
<h2>Peak memory per device against its budget</h2>
<p>Bars: the largest peak RSS a device measured in any round, its training (or scoring) job's VmHWM, with its
agent's peak hatched on top. The black mark is the job budget the device announced: its whole budget less the
share it keeps for the agent, so the job's part of the bar is what must stay under it. A device is over budget
when a job's peak passed the budget it announced for that round.</p>
{fig("memory", "peak RSS per device")}
{_devices_html(devices)}
<h2>Bytes sent and received per round</h2>
{fig("bytes", "bytes per round")}
<h2>Stages: what each device trained</h2>
<p>One column per round: the schedule's stage on top, then each device, grouped by tier. A cell names what the
device trained ({"blocks, b1-2 = blocks 1 and 2" if run.strategy == "progressive" else "layers; +h = and the head"});
its colour is the lowest {"block" if run.strategy == "progressive" else "layer"} of it. S: the device scored its
layers (no weights changed); idle: nothing of this stage fits the device; red: the task failed or was rejected.</p>
{fig("timeline", "stage timeline")}
<h2>Freezing metric per block</h2>
{f'<p class="note" id="freezing-note">{html.escape(note)}</p>' if note else ""}{fig("freezing", "freezing metric")}
<h2>Rounds worth a note</h2>
{_round_notes(run)}
</body></html>
"""


def _images(run: Run, baseline: Run | None, devices: list[DeviceRow]) -> dict[str, bytes]:
    if not run.rounds:
        return {}
    images = {"accuracy": plot_accuracy(run, baseline), "memory": plot_memory(devices), "bytes": plot_bytes(run),
              "timeline": plot_timeline(run, devices)}
    if freezing_series(run)[1]:
        images["freezing"] = plot_freezing(run)
    return images


def write_report(workdir, out_dir=None, baseline=None) -> Path:
    """Write report.html (plots inline) and the plots as PNGs into out_dir (default WORKDIR/report).

    baseline: another run's directory to compare accuracy with; None looks for a comparable
    full-model FedAvg run beside this one; False compares with nothing.
    """
    run = load_run(Path(workdir))
    if baseline is None:
        found = find_baseline(run)
        base = load_run(found) if found else None
    else:
        base = load_run(Path(baseline)) if baseline else None
    out = Path(out_dir) if out_dir else run.workdir / "report"
    out.mkdir(parents=True, exist_ok=True)
    devices = device_rows(run)
    images = _images(run, base, devices)
    for name, png in images.items():
        atomic_write_bytes(out / f"{name}.png", png)
    for name in PLOTS - images.keys():       # a plot this run no longer has must not sit beside the page
        (out / f"{name}.png").unlink(missing_ok=True)
    page = out / REPORT
    atomic_write_text(page, render(run, base, devices, images))
    return page
