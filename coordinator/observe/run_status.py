"""A run at a glance, read from its workdir while the coordinator runs (or after it stopped).

One snapshot serves `edge-coordinator status` and the demo's live progress line: the
round and what it trains, devices online per tier, this round's updates accepted,
rejected and failed, the last test accuracy, and the time left estimated from the
schedule's own bracket of rounds still to come (`Strategy.rounds_left`) times the mean
round so far. It only reads: the state store is opened read-only, so watching a run can
never change it.
"""
from __future__ import annotations

import os
import socket
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

from coordinator.observe.run_data import parse_round
from coordinator.round_metrics import accuracy_text, device_accuracy, member_tiers, models_text
from coordinator.state_store import StateStore, run_store, run_store_location
from coordinator.strategies.base import stage_text


@dataclass
class Snapshot:
    strategy: str = "?"
    coordinator_running: bool | None = None   # None: a run from before coordinators said so
    round: int | None = None          # the open round, or the last closed one
    round_open: bool = False
    stage: dict = field(default_factory=dict)
    tiers: dict = field(default_factory=dict)   # tier -> [online, known]
    accepted: int = 0                 # in the current round
    rejected: int = 0
    failed: int = 0
    tasks: int = 0
    accuracy: float | None = None     # after the last closed round
    device_accuracy: dict | None = None   # a personalised run: each device's held-out accuracy (DeviceAccuracy)
    models: dict = field(default_factory=dict)        # a model family (FedIN): each member's test accuracy
    member_tiers: dict = field(default_factory=dict)  # and the tiers training each member
    rounds_closed: int = 0
    finished: bool = False
    rounds_left: tuple[int, int] | None = None
    eta_s: tuple[float, float] | None = None   # fewest and most seconds left, from the mean round time

    def to_dict(self) -> dict:
        return dict(self.__dict__)


def snapshot(workdir: Path) -> Snapshot | None:
    """None while the coordinator has not created its state yet."""
    if run_store_location(workdir) is None:
        return None
    state = run_store(workdir)
    try:
        return _read(state)
    finally:
        state.close()


def _read(state: StateStore) -> Snapshot:
    snap = Snapshot(strategy=(state.meta("run") or {}).get("strategy", "?"))
    snap.coordinator_running = _running(state.meta("coordinator"))
    known, online = Counter(), Counter()
    for d in state.devices():
        known[d["tier"]] += 1
        online[d["tier"]] += bool(d["online"])
    snap.tiers = {t: [online[t], known[t]] for t in sorted(known)}
    closed = state.closed_rounds()
    snap.rounds_closed = len(closed)
    rounds = [m for m in map(parse_round, closed) if m is not None]   # a round closed without metrics has none
    last = parse_round(closed[-1]) if closed else None
    if last is not None:
        snap.accuracy, snap.finished, snap.rounds_left = last.accuracy, bool(last.finished), last.rounds_left
        snap.models, snap.member_tiers = dict(last.models), member_tiers(rounds)
    own = device_accuracy(rounds)
    snap.device_accuracy = own.to_dict() if own else None
    row = state.current_round()
    if row is not None:
        snap.round, snap.round_open, snap.stage = row.round, row.state == "open", row.plan.get("stage", {})
        if snap.round_open:
            status = Counter(t.status for t in state.tasks(row.round))
            snap.tasks, snap.accepted, snap.failed = sum(status.values()), status["accepted"], status["failed"]
            snap.rejected = len(state.rejections(since=row.opened_at))
        else:
            snap.tasks = len(last.devices) if last is not None else 0
    durations = [m.seconds for m in rounds if m.seconds is not None]
    if snap.rounds_left is not None and durations:
        mean = sum(durations) / len(durations)
        snap.eta_s = (snap.rounds_left[0] * mean, snap.rounds_left[1] * mean)
    return snap


def _running(who: dict | None) -> bool | None:
    """Whether the run's coordinator is alive: it says so while it runs; a killed one is told by its pid."""
    if who is None:
        return None
    if not who.get("running"):
        return False
    if who.get("host") != socket.gethostname():
        return True                     # another machine's: take its word
    try:
        os.kill(int(who["pid"]), 0)
    except ProcessLookupError:
        return False                    # killed without a word
    except PermissionError:
        pass                            # alive, another user's
    return True


def _clock(seconds: float) -> str:
    seconds = int(round(seconds))
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}" if seconds >= 3600 else \
        f"{seconds // 60}:{seconds % 60:02d}"


def eta_text(snap: Snapshot) -> str:
    if snap.finished:
        return "done"
    if snap.eta_s is None:
        return "left: after the first round"
    lo, hi = snap.eta_s
    return f"left ~{_clock(hi)}" if hi - lo < 30 else f"left {_clock(lo)}-{_clock(hi)}"


CUT = "..."     # ends a line that even the shortest form of every part overflows


def fit_line(parts: Sequence[Sequence[str]], steps: Sequence[int], width: int) -> str:
    """The parts joined, each in the longest form that lets the line fit in `width` characters.

    parts: each part's forms, longest first (a part that may go has "" last); steps: the order the
    parts give way in, a part's index each time it takes its next shorter form, so the least
    important shrink (and go) before the important ones shorten at all. A line that the shortest
    forms still overflow is cut to the width: a terminal wraps a longer one, and the rewrite then
    clears only its last row.
    """
    form = [0] * len(parts)

    def text() -> str:
        return "".join(p[f] for p, f in zip(parts, form))

    taken = []
    for i in steps:
        if len(text()) <= width:
            break
        if form[i] < len(parts[i]) - 1:
            form[i] += 1
            taken.append(i)
    for i in reversed(taken):     # a part shortened early may fit whole again beside the later, shorter ones
        form[i] -= 1
        if len(text()) > width:
            form[i] += 1
    line = text()
    return line if len(line) <= width else line[:max(0, width - len(CUT))] + CUT[:width]


def _accuracy_forms(snap: Snapshot) -> list[str]:
    """The accuracy part, longest first; never empty: it is what the run is for."""
    if snap.models:   # a model family (FedIN): each member's test accuracy
        members = [f"{name} {e['accuracy']:.1%}" if e.get("accuracy") is not None else f"{name} -"
                   for name, e in snap.models.items()]
        return [f" | accuracy {models_text(snap.models)}", f" | acc {' '.join(members)}",
                " | acc " + "/".join(f"{e['accuracy']:.0%}" if e.get("accuracy") is not None else "-"
                                     for e in snap.models.values())]
    if snap.device_accuracy is not None:
        mean, worst = snap.device_accuracy["mean"], snap.device_accuracy["worst"]
        return [f" | accuracy devices mean {mean:.2%} worst {worst:.2%}", f" | acc mean {mean:.2%} worst {worst:.2%}",
                f" | acc mean {mean:.2%}"]
    acc = "-" if snap.accuracy is None else f"{snap.accuracy:.2%}"
    return [f" | accuracy {acc}", f" | acc {acc}"]


def progress_line(snap: Snapshot, elapsed_s: float, width: int | None = None) -> str:
    """One line: round, stage, devices online per tier, updates, accuracy, elapsed and left.

    width: at most this many characters (a terminal's): the online tiers, the stage and the
    clocks shorten and go first, the round, its updates and the accuracy last. None: the
    whole line, as a log or a pipe gets it.
    """
    clock, eta = _clock(elapsed_s), eta_text(snap)
    short_eta = eta if snap.eta_s is not None or snap.finished else clock
    clocks = [f"[{clock} {eta}] ", f"[{short_eta}] ", ""]
    if snap.round is None:
        where, stage, updates = ["waiting for devices", "waiting"], [""], [""]
    else:
        where = [f"round {snap.round}", f"r{snap.round}"]
        stage = [f" {stage_text(snap.stage)}", f" {stage_text(snap.stage, short=True)}", ""]
        updates = [""]
        if snap.round_open:
            done = f"{snap.accepted}/{snap.tasks}"
            updates = [f": {done} updates accepted, {snap.rejected} rejected"
                       + (f", {snap.failed} failed" if snap.failed else ""),
                       f": {done} ok, {snap.rejected} rej" + (f", {snap.failed} fail" if snap.failed else ""),
                       f" {done}"]
    on, known = sum(on for on, _ in snap.tiers.values()), sum(n for _, n in snap.tiers.values())
    tiers = " ".join(f"{t} {on}/{n}" for t, (on, n) in snap.tiers.items()) or "none yet"
    online = [f" | online {tiers}", f" | online {on}/{known}", ""]
    parts = [clocks, where, stage, updates, online, _accuracy_forms(snap)]
    if width is None:
        return "".join(p[0] for p in parts)
    CLOCKS, WHERE, STAGE, UPDATES, ONLINE, ACCURACY = range(6)
    steps = [ONLINE, STAGE, ACCURACY, CLOCKS, ONLINE, UPDATES, STAGE, CLOCKS, ACCURACY, UPDATES, WHERE]
    return fit_line(parts, steps, width)


def status_lines(snap: Snapshot, devices: list[dict], now: float | None = None) -> list[str]:
    """What `edge-coordinator status` prints: the run, the round, the fleet per tier and each device."""
    now = time.time() if now is None else now
    state = "finished" if snap.finished else ("round open" if snap.round_open else "between rounds")
    out = [f"run: {snap.strategy}, {snap.rounds_closed} round(s) closed, {state}"]
    if snap.coordinator_running is False:
        out.append("coordinator: not running; devices are shown as it last saw them")
    elif snap.coordinator_running:
        out.append("coordinator: running")
    if snap.round is not None:
        line = f"round {snap.round}: {stage_text(snap.stage)}"
        if snap.round_open:
            line += f"; {snap.accepted} of {snap.tasks} updates accepted, {snap.rejected} rejected, {snap.failed} failed"
        out.append(line)
    if snap.device_accuracy is not None:
        out.append(f"device accuracy (each device's own model on its held-out rows): "
                   f"{accuracy_text(snap.device_accuracy)}")
    if snap.models:
        out.append(f"test accuracy per member (tiers training it): {models_text(snap.models, snap.member_tiers)}")
    elif snap.accuracy is not None:
        out.append(f"test accuracy{' (the mean of the devices’ own models)' if snap.device_accuracy else ''}: "
                   f"{snap.accuracy:.2%}")
    if snap.rounds_left is not None and not snap.finished:
        lo, hi = snap.rounds_left
        out.append(f"rounds left: {lo}" + (f" to {hi}" if hi != lo else "") + f" ({eta_text(snap)})")
    out.append("fleet: " + (", ".join(f"{t} {on}/{n} online" for t, (on, n) in snap.tiers.items()) or "no devices yet"))
    for d in devices:
        seen = now - d["last_seen"]
        out.append(f"  {d['device_id']:<20} {d['tier']:<16} jobs budget {d['budget_bytes'] / 2**20:6.0f} MB  "
                   f"{'online' if d['online'] else 'offline'}  (last heard from {_clock(seen)} ago)")
    return out
