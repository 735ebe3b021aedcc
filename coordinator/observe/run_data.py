"""A run read back from its directory, typed: what the report, its plots and the demo's summary look at.

It only reads files, so it works on a finished run and on one still running: metrics.jsonl
(a partly written last line is counted as unreadable, not fatal), the model's manifest,
and the state store opened read-only (when it is locked or missing, the run only lacks
what the store alone knows: devices that never trained, the open round, the settings).
Everything here is text and numbers; the plots and the HTML are made elsewhere.
"""
from __future__ import annotations

import functools
import json
import sqlite3
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Iterator, Mapping, NamedTuple

from coordinator.round_metrics import DeviceRound, RoundMetrics, device_accuracy, member_tiers, models_text
from coordinator.state_sql import StoreError
from coordinator.state_store import RoundRow, run_store
from coordinator.strategies.base import stage_text
from edge_runtime.device.tiers import AGENT_RESERVE_MB, TierError, find_tier
from edge_runtime.wire.protocol import ProtocolError, check_id

MB = float(1 << 20)
# A device started with its tier's budget announces that budget (budget_mb + AGENT_RESERVE_MB) less its agent's share,
# its start-up RSS + 8 MB: 45-48 MB measured. A share outside this range means it was given a budget of its own.
AGENT_SHARE_MB = (AGENT_RESERVE_MB / 2, AGENT_RESERVE_MB * 1.5)
SCAN_LIMIT = 200             # entries of a directory looked at when searching for a baseline beside a run
SETTLED = "every task settled"


# -- reading a run ---------------------------------------------------------------------------
@dataclass
class Run:
    """What is known of one run; every field may be partial while the run goes on."""
    workdir: Path
    rounds: list[RoundMetrics]
    unreadable_lines: int = 0
    meta: dict = field(default_factory=dict)          # the store's "run": strategy, manifest sha, tag
    settings: dict = field(default_factory=dict)      # the settings the run started with
    registry: list[dict] = field(default_factory=list)  # every device that said hello (the store's rows)
    open_round: RoundRow | None = None                # a round still collecting (or left open by a stopped run)
    manifest: dict | None = None

    @property
    def strategy(self) -> str:
        last = self.rounds[-1].strategy if self.rounds else None
        for name in (last, self.meta.get("strategy"), self.settings.get("service", {}).get("strategy")):
            if name and name != "?":     # "?": a round of an old run that did not say
                return str(name)
        return "?"

    @property
    def model(self) -> str:
        if self.manifest and self.manifest.get("model"):
            return str(self.manifest["model"])
        return str(self.settings.get("service", {}).get("model", "?"))

    @property
    def finished(self) -> bool:
        return bool(self.rounds and self.rounds[-1].finished)

    def block_of(self) -> dict[int, int]:
        """Layer index -> block index, from the manifest (a layer is its own block without one)."""
        layers = (self.manifest or {}).get("layers", [])
        return {int(l["index"]): int(l.get("block", l["index"])) for l in layers if "index" in l}


def parse_round(raw) -> RoundMetrics | None:
    """One round's metrics from their JSON form, or None when they are not a round (a line cut short, a bare {})."""
    if not isinstance(raw, Mapping):
        return None
    try:
        return RoundMetrics.from_dict(raw)
    except (KeyError, TypeError, ValueError, AttributeError):
        return None


def read_rounds(path: Path) -> tuple[list[RoundMetrics], int]:
    """Closed rounds from metrics.jsonl, and how many lines could not be read (a line being written)."""
    if not path.exists():
        return [], 0
    by_round: dict[int, RoundMetrics] = {}
    unreadable = 0
    for line in path.read_text(errors="replace").splitlines():
        if not line.strip():
            continue
        try:
            m = parse_round(json.loads(line))
        except json.JSONDecodeError:
            m = None
        if m is None:
            unreadable += 1
        else:
            by_round[m.round] = m        # a round written twice counts once, its last form
    return [by_round[r] for r in sorted(by_round)], unreadable


def read_store(workdir: Path) -> dict:
    """The Run fields only the run's state store knows (meta, settings, registry, open_round); {} when it cannot
    be read."""
    try:
        state = run_store(workdir, timeout_s=0.5)   # a report must not wait on a busy store
    except (sqlite3.Error, StoreError):    # locked, or of a schema version a read-only open cannot migrate
        return {}
    try:
        row = state.current_round()
        return {"meta": state.meta("run") or {}, "settings": state.meta("settings") or {},
                "registry": state.devices(), "open_round": row if row is not None and row.state == "open" else None}
    except (sqlite3.Error, ValueError):   # locked past the store's timeout, or a store of an older layout
        return {}
    finally:
        state.close()


def resolve_workdir(path: Path) -> Path:
    """The coordinator's directory: the path itself, or its coordinator/ (how the demo and benchmarks lay runs out)."""
    path = Path(path).resolve()
    if not (path / "metrics.jsonl").exists() and (path / "coordinator" / "metrics.jsonl").exists():
        return path / "coordinator"
    return path


def load_run(workdir: Path) -> Run:
    """Everything readable of the run in workdir now; FileNotFoundError when it holds no run at all."""
    work = resolve_workdir(workdir)
    if not (work / "metrics.jsonl").exists() and not (work / "state.db").exists():
        raise FileNotFoundError(f"{work} holds no coordinator run (no metrics.jsonl or state.db)")
    rounds, unreadable = read_rounds(work / "metrics.jsonl")
    manifest = None
    try:
        manifest = json.loads((work / "model" / "manifest.json").read_text())
    except (OSError, ValueError):
        pass
    return Run(work, rounds, unreadable, manifest=manifest, **read_store(work))


# -- a baseline beside the run -----------------------------------------------------------------
def _comparable(run: Run, other: Run) -> bool:
    """Same model export, same evaluation, same start, same fleet: only then are accuracies comparable."""
    def key(r: Run) -> tuple:
        s = r.settings.get("service", {})
        return (r.meta.get("manifest"), s.get("eval_data", ""), s.get("eval_samples"), s.get("init_weights", ""),
                tuple(sorted(d["device_id"] for d in r.registry)))
    return bool(run.meta and other.meta and run.registry) and key(run) == key(other)


def _candidates(work: Path) -> Iterator[Path]:
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


# -- each device over the run --------------------------------------------------------------------
@dataclass
class DeviceRow:
    """One device over a run: the budget it announced, its largest measured peaks, and what it did."""
    device_id: str
    tier: str
    budget_bytes: int | None = None     # the job budget it announced last
    job_peak_bytes: int = 0             # its largest training (or scoring) job peak
    job_peak_round: int | None = None
    agent_peak_bytes: int = 0
    device_peak_bytes: int = 0          # its largest job + agent, the two measured in the same task
    device_peak_parts: tuple[int, int] = (0, 0)   # (job, agent) of that task
    trained: int = 0
    scored: int = 0
    failed: int = 0
    idle: int = 0
    over_rounds: list[int] = field(default_factory=list)   # rounds where a job's peak passed its job budget
    device_over_rounds: list[int] = field(default_factory=list)   # where job + agent passed the whole budget

    @property
    def device_budget_bytes(self) -> int | None:
        """Its whole budget, agent and jobs together, when the coordinator can tell it (whole_budget_bytes)."""
        return whole_budget_bytes(self.tier, self.budget_bytes)

    @property
    def over(self) -> bool:
        return bool(self.over_rounds or self.device_over_rounds)

    @property
    def answered(self) -> bool:
        return self.trained + self.scored > 0


@functools.lru_cache(maxsize=256)
def _tier_budget_bytes(tier: str) -> int | None:
    try:
        return find_tier(check_id(tier, "tier")).device_budget_bytes
    except (TierError, ProtocolError):
        return None


def whole_budget_bytes(tier: str, job_budget_bytes: int | None) -> int | None:
    """A device's whole budget (everything it runs: agent and jobs), or None when the coordinator cannot tell it.

    A device announces only its job budget, what is left of its whole budget after its agent's
    share. The whole is its tier file's (budget_mb + the agent reserve) when the job budget it
    announced leaves the agent a share of that size (AGENT_SHARE_MB); a tier with no file here,
    or a device started with a --budget-mb far from its tier's, leaves it unknown.
    """
    whole = _tier_budget_bytes(tier)
    if whole is None or job_budget_bytes is None:
        return None
    low, high = AGENT_SHARE_MB
    return whole if low <= (whole - job_budget_bytes) / MB <= high else None


def tally_devices(rounds: Iterable[RoundMetrics], rows: dict[str, DeviceRow] | None = None) -> dict[str, DeviceRow]:
    """Every device's tasks added up round by round into rows (a row is added for a device not in them yet).

    The one place a device's worst peak and its rounds over budget are computed: the report's
    table and the demo's summary both read these rows.
    """
    rows = {} if rows is None else rows
    for m in rounds:
        for dev, r in m.devices.items():
            _take_task(rows.setdefault(dev, DeviceRow(dev, r.tier)), m.round, r)
        for dev in m.idle:
            rows.setdefault(dev, DeviceRow(dev, "?")).idle += 1
    return rows


def _take_task(row: DeviceRow, round_no: int, r: DeviceRound) -> None:
    if r.tier and r.tier != "?":
        row.tier = r.tier
    if r.budget_bytes is not None:
        row.budget_bytes = r.budget_bytes
    if not r.accepted:
        row.failed += 1
        return
    if r.kind == "score":
        row.scored += 1
    else:
        row.trained += 1
    peak = r.peak_rss_bytes
    if peak is None:
        return
    if peak > row.job_peak_bytes:
        row.job_peak_bytes, row.job_peak_round = peak, round_no
    row.agent_peak_bytes = max(row.agent_peak_bytes, r.agent_peak_rss_bytes or 0)
    if r.device_peak_bytes > row.device_peak_bytes:
        row.device_peak_bytes, row.device_peak_parts = r.device_peak_bytes, (peak, r.agent_peak_rss_bytes or 0)
    if r.budget_bytes is not None and peak > r.budget_bytes:
        row.over_rounds.append(round_no)
    whole = whole_budget_bytes(row.tier, r.budget_bytes)
    if whole is not None and r.device_peak_bytes > whole:
        row.device_over_rounds.append(round_no)


def device_rows(run: Run) -> list[DeviceRow]:
    """Per device, the registry's and every round's: peaks, budget, what it did; ordered by tier, then id."""
    rows = {d["device_id"]: DeviceRow(d["device_id"], d.get("tier") or "?", d.get("budget_bytes"))
            for d in run.registry}
    return sorted(tally_devices(run.rounds, rows).values(), key=lambda r: (r.tier, r.device_id))


def round_bytes(m: RoundMetrics) -> tuple[int, int]:
    """(downloaded, uploaded) bytes of a round, all devices together."""
    return (sum(r.downloaded_bytes or 0 for r in m.devices.values()),
            sum(r.uploaded_bytes or 0 for r in m.devices.values()))


class FreezingSeries(NamedTuple):
    kind: str                                            # "block" or "layer"
    series: dict[int, list[tuple[int, float | None]]]    # unit -> [(round, the metric or None)]
    threshold: float | None
    metric: str = "accuracy_slope"                       # or "effective_movement": runs from before the validation rule


FREEZING_METRICS = {"accuracy_slope": "validation accuracy slope (points a round)",
                    "effective_movement": "effective movement"}


def freezing_series(run: Run) -> FreezingSeries:
    """The freezing metric the schedule logged, per block (or layer), from the rounds' schedule reports."""
    kind, series, threshold, metric = "block", {}, None, "accuracy_slope"
    for m in run.rounds:
        logged = next((k for k in FREEZING_METRICS if k in m.schedule), None)
        if logged is None:
            continue
        kind, metric = ("block" if "block" in m.stage else "layer"), logged
        unit = int(m.stage.get(kind, -1))
        series.setdefault(unit, []).append((m.round, m.schedule[logged]))
        threshold = m.schedule.get("freeze_threshold", threshold)
    return FreezingSeries(kind, series, threshold, metric)


# -- what the page says, as text -----------------------------------------------------------------
def summary_items(run: Run, baseline: Run | None, devices: list[DeviceRow]) -> list[tuple[str, str, str]]:
    """(id, label, text) of the header: what someone glancing at the page needs first."""
    rs = run.rounds
    items = [("model", "model", run.model), ("strategy", "strategy", run.strategy), ("state", "state", _state(run)),
             ("rounds", "rounds closed", str(len(rs)))]
    own = device_accuracy(rs)
    if own is not None:   # a personalised run: no global model; each device's own, on the rows it held out
        items += [("device-accuracy", "device accuracy", f"{own.text()}, each its own model on its held-out rows")]
    if rs and rs[-1].models:   # a model family (FedIN): each member's model, and the tiers that train it
        items += [("member-accuracy", "final accuracy per member",
                   f"{models_text(rs[-1].models, member_tiers(rs))} (round {rs[-1].round})")]
    if rs:
        best = max(rs, key=lambda m: m.accuracy)
        which = " (reference: the mean of the devices' models, on the test set)" if own is not None else ""
        items += [("final-accuracy", "final accuracy" + which, f"{_pct(rs[-1].accuracy)} (round {rs[-1].round})"),
                  ("best-accuracy", "best accuracy", f"{_pct(best.accuracy)} (round {best.round})")]
    if baseline is not None and baseline.rounds:
        items.append(("baseline-accuracy", "baseline",
                      f"{_pct(baseline.rounds[-1].accuracy)} after {len(baseline.rounds)} rounds of "
                      f"{baseline.strategy} ({baseline.workdir})"))
    items += [("devices-per-tier", "devices per tier", _tiers_text(devices)),
              ("updates", "updates", _updates_text(rs)),
              ("bytes", "bytes, all rounds", _bytes_text(rs)),
              ("wall-time", "wall time", _wall_text(rs, run))]
    return items


def round_notes(run: Run) -> list[str]:
    """Rounds that did not go plainly (early closes, failures, rejections, weights kept), and unreadable lines."""
    notes = []
    for m in run.rounds:
        bits = []
        if m.closed_because != SETTLED:
            bits.append(f"closed because {m.closed_because}")
        if m.failed:
            bits.append(f"{m.failed} task(s) failed: " + "; ".join(
                f"{d}: {r.reason or r.status}" for d, r in m.devices.items() if not r.accepted))
        if m.rejected:
            bits.append(f"{m.rejected} message(s) rejected")
        if m.aggregated is False:
            bits.append("too few updates: the weights were kept")
        if bits:
            notes.append(f"round {m.round}: {'; '.join(bits)}")
    if run.unreadable_lines:
        notes.append(f"{run.unreadable_lines} line(s) of metrics.jsonl could not be read (a round being "
                     f"written as the report was made) and are left out")
    return notes


def freezing_note(run: Run) -> str | None:
    """Why there is no freezing plot, or that no block froze on it; None when its plot says it all."""
    kind, series, threshold, metric = freezing_series(run)
    values = [v for pts in series.values() for _, v in pts if v is not None]
    if values:
        if threshold is not None and min(values) >= threshold:
            return f"No {kind} froze: its {FREEZING_METRICS[metric]} never went under the freeze threshold " \
                   f"{threshold:g}."
        return None
    if series:
        if metric == "accuracy_slope" and all(m.schedule.get("validation_accuracy") is None
                                              for m in run.rounds if "accuracy_slope" in m.schedule):
            return (f"No {kind} froze: the coordinator has no validation data ([service] validation_data), so the "
                    f"freezing rule had nothing to read and every {kind} trained to its round cap.")
        window = run.settings.get(run.strategy, {}).get("freeze_window")
        return (f"No {kind} froze{'' if run.finished else ' yet'}: the freezing metric has a value only once a "
                f"{kind} has trained {f'its window of {window} rounds' if window else 'its full window'}, and no "
                f"{kind} has, so there is nothing to plot.")
    if run.strategy in ("progressive", "layerwise"):
        return (f"The freezing metric is not recorded yet: the {run.strategy} schedule logs it once a "
                f"{'block trains in its growing stage' if run.strategy == 'progressive' else 'layer trains'}.")
    return f"The freezing metric is not recorded for this strategy ({run.strategy}): it has no freezing rule."


def absent_plot_note(name: str, run: Run) -> str:
    """The sentence the report shows in place of plot `name` (one of plots.PLOT_NAMES) when it has nothing to show."""
    if name == "freezing":
        return freezing_note(run) or "No freezing metric was recorded."
    if not run.rounds:
        return "No round has closed yet: this plot appears after the first one."
    return {"memory": "No device has reported a measured peak yet: each finished task reports its job's and its "
                      "agent's.",
            "bytes": "No bytes were sent or received in any closed round.",
            "timeline": "No device has joined the run yet."}.get(name, "Nothing to show yet.")


def _state(run: Run) -> str:
    if run.finished:
        return "finished"
    if run.open_round is not None:   # open in the store: collecting, or its coordinator stopped mid-round
        stage = stage_text(run.open_round.plan.get("stage", {}), short=True)
        return f"in progress: round {run.open_round.round} open ({stage})"
    return "in progress: the schedule has not finished"


def _tiers_text(devices: list[DeviceRow]) -> str:
    tiers: dict[str, list[str]] = {}
    for d in devices:
        tiers.setdefault(d.tier, []).append(d.device_id)
    return "; ".join(f"{t}: {len(ids)} ({', '.join(ids)})" for t, ids in tiers.items()) or "none yet"


def _updates_text(rs: list[RoundMetrics]) -> str:
    scores = sum(r.kind == "score" and r.accepted for m in rs for r in m.devices.values())
    text = (f"{sum(m.updates for m in rs)} accepted, {sum(m.rejected for m in rs)} rejected, "
            f"{sum(m.failed for m in rs)} failed")
    return text + (f" ({scores} of the accepted are layer scores)" if scores else "")


def _bytes_text(rs: list[RoundMetrics]) -> str:
    per_round = [round_bytes(m) for m in rs]
    return (f"{_size(sum(down for down, _ in per_round))} to the devices, "
            f"{_size(sum(up for _, up in per_round))} from them")


def _wall_text(rs: list[RoundMetrics], run: Run) -> str:
    if not rs or rs[0].opened_at is None or rs[-1].closed_at is None:
        return "-"
    seconds = rs[-1].closed_at - rs[0].opened_at
    text = f"{_duration(seconds)} (round {rs[0].round} opened to round {rs[-1].round} closed)"
    return text if run.finished else text + f"; last round closed {_duration(time.time() - rs[-1].closed_at)} ago"


def _pct(x: float) -> str:
    return f"{100 * x:.2f}%"


def _size(n: float) -> str:
    return f"{n / MB:.1f} MB" if n >= MB else f"{n / 1024:.1f} KB"


def _duration(s: float) -> str:
    s = max(0.0, s)
    return f"{s:.0f} s" if s < 120 else f"{s / 60:.1f} min" if s < 7200 else f"{s / 3600:.1f} h"


def ranges_text(values: Iterable[int]) -> str:
    """[0, 1, 2, 4] -> '0-2,4'."""
    out: list[list[int]] = []
    for v in sorted(set(values)):
        if out and v == out[-1][1] + 1:
            out[-1][1] = v
        else:
            out.append([v, v])
    return ",".join(str(a) if a == b else f"{a}-{b}" for a, b in out)
