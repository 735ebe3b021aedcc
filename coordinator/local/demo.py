"""edge-demo: a federated fleet of memory-limited devices training a model, from one command.

Starts a private Mosquitto on a free loopback port, the coordinator service, and device
agents in three tiers from profiles/ (each a process; each held to its tier's budget: its
training jobs run under a hard limit of it), splits Fashion-MNIST across them non-IID
(Dirichlet), and runs progressive training (ProFL) to the end. A live line shows the
round, the stage and block, devices online per tier, updates accepted and rejected, the
test accuracy, and the time elapsed and left. At the end it writes a report (an HTML
page and PNGs) beside the run.

Everything lives in --workdir: Ctrl-C stops every process it started, and the same
command resumes where it stopped.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import sqlite3
import sys
import time
from pathlib import Path
from typing import Callable, Sequence

from coordinator import strategies
from coordinator.config import ConfigError, load_config
from coordinator.round_metrics import RoundMetrics


def _defaults() -> dict:
    """The demo's settings: its own table, training, and every strategy's table (shorter stages than a service's)."""
    tables = strategies.settings_tables()
    tables["progressive"].update(min_rounds_per_block=2, max_rounds_per_block=3)
    tables["fedavg"].update(rounds=6)
    return {
        "demo": {"workdir": "runs/demo", "model": "fmnist_cnn", "samples": 16000, "alpha": 0.5, "seed": 0,
                 "strategy": strategies.DEFAULT, "baseline": False, "baseline_rounds": 6,
                 # TIER:COUNT with a tier of profiles/ (its budget_mb), or NAME:COUNT:BUDGET_MB
                 "fleet": ["generic-256mb:2", "pi-zero-2w:2", "pi-3b-plus:1"]},
        "train": {"learning_rate": 2e-3, "local_epochs": 1.0, "batch_sizes": [32, 64]},
        **tables,
    }


DEFAULTS = _defaults()
# --quick: the CI-sized run (about a minute on 2 cores): the same fleet on less data, shorter stages
QUICK = {"demo": {"samples": 5000, "baseline_rounds": 2},
         "progressive": {"min_rounds_per_block": 1, "max_rounds_per_block": 1}, "pfedla": {"rounds": 4},
         "fedin": {"rounds": 4}}
FAMILY_MODEL = "fmnist_fedin"   # what --strategy fedin trains unless a model is named: it needs a model family


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="edge-demo", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog="""examples:
  edge-demo                                  # 5 devices in 3 tiers, 16k samples, progressive (a few minutes)
  edge-demo --quick                          # the same fleet on 5k samples, one round per block (about a minute)
  edge-demo --baseline                       # then full-model FedAvg on the same fleet, for the report's comparison
  edge-demo --strategy fedin                 # a model per tier (FedIN): small, medium, large members of one family
  edge-demo --samples 60000 --alpha 100      # more data, nearly IID
  edge-demo --fleet generic-256mb:3 --fleet pi-4b-2gb:1 --fleet lab-board:2:180
  edge-demo --config demo.toml               # [demo], [train] and a table per strategy; flags win

Tiers are the files in profiles/ (docs/profiles.md); a device of a tier gets
that tier's budget_mb for its training jobs. A budget that fits no block leaves the device
idle, and the coordinator tells it why.

Results: WORKDIR/report/report.html, WORKDIR/coordinator/metrics.jsonl (one line per round);
logs: WORKDIR/fleet/logs/; status from another terminal: edge-coordinator status WORKDIR/coordinator""")
    p.add_argument("--config", type=Path, help="TOML file with [demo] and [train] tables and a table per strategy "
                                                  f"({', '.join(f'[{n}]' for n in strategies.names())})")
    p.add_argument("--workdir", help="where the broker, coordinator, devices and results live (resumable)")
    p.add_argument("--model", help="zoo model trained on Fashion-MNIST (fmnist_cnn, resnet_small; --strategy fedin: "
                                   f"the family {FAMILY_MODEL}, the default for it)")
    p.add_argument("--samples", type=int, help="Fashion-MNIST training images split across the fleet")
    p.add_argument("--alpha", type=float, help="Dirichlet concentration: 0.5 is strongly non-IID, 100 nearly IID")
    p.add_argument("--strategy", choices=strategies.names(),
                   help=f"the schedule the fleet runs (default {strategies.DEFAULT})")
    p.add_argument("--fleet", action="append", metavar="TIER:COUNT[:BUDGET_MB]",
                   help="devices of a tier (repeat the flag for each tier)")
    p.add_argument("--local-epochs", type=float, help="passes over its local data a device makes per round")
    p.add_argument("--baseline", action="store_true", default=None,
                   help="after the run, train the whole model with FedAvg on the same fleet, for comparison")
    p.add_argument("--quick", action="store_true", help="the CI-sized run: less data, one round per block")
    p.add_argument("--fresh", action="store_true", help="discard a previous run in --workdir and start over")
    return p


def parse_fleet(entries: list[str]) -> list[tuple[str, int, float | None]]:
    """(tier, count, budget MB or None for the tier file's) per entry; ConfigError names the bad one."""
    from edge_runtime.device.tiers import TierError, find_tier
    out = []
    for e in entries:
        parts = e.split(":")
        try:
            if len(parts) not in (2, 3):
                raise ValueError
            tier, count, budget = parts[0], int(parts[1]), float(parts[2]) if len(parts) == 3 else None
        except ValueError:
            raise ConfigError(f"fleet entry {e!r} is not TIER:COUNT or NAME:COUNT:BUDGET_MB "
                              f"(e.g. pi-zero-2w:2 or lab-board:2:180)") from None
        if count < 1 or (budget is not None and budget <= 0):
            raise ConfigError(f"fleet entry {e!r}: the count and the budget must be positive")
        if budget is None:
            try:
                find_tier(tier)
            except TierError as exc:
                raise ConfigError(f"fleet entry {e!r}: {exc}; or give a budget: {tier}:{count}:BUDGET_MB") from None
        out.append((tier, count, budget))
    if not out:
        raise ConfigError("the fleet needs at least one tier")
    return out


class Progress:
    """The live view: one line rewritten in place on a terminal, a line per change otherwise."""

    def __init__(self, stream=sys.stdout):
        self.stream, self.tty, self.last = stream, stream.isatty(), ""

    def width(self) -> int:
        """The columns the line may take now, read at every redraw so that a resized terminal is honoured: one
        less than the terminal's, since a line that fills the last column wraps on some terminals, and the
        rewrite then clears only its last row."""
        try:
            columns = os.get_terminal_size(self.stream.fileno()).columns
        except (OSError, ValueError, AttributeError):    # not a file descriptor's terminal: what the process has
            columns = shutil.get_terminal_size().columns
        return max(1, columns - 1)

    def line(self, render: Callable[[int | None], str]) -> None:
        """render(width) is the line in at most width characters, or whole for None. On a terminal it is
        redrawn in place every second, within the width; in a log the whole line, only when more than the
        clocks changed."""
        if self.tty:
            self.stream.write("\r\033[K" + render(self.width()))
            what = ""
        else:
            text = render(None)
            what = text.split("] ", 1)[-1]
            if what != self.last:
                self.stream.write(text + "\n")
        self.stream.flush()
        self.last = what

    def event(self, text: str) -> None:
        """A line that stays (a closed round), above the live line."""
        self.stream.write(("\r\033[K" if self.tty else "") + text + "\n")
        self.stream.flush()
        self.last = ""


def _specs(d: dict, work: Path):
    from coordinator.local.data import write_fleet_data
    from coordinator.local.fleet import DeviceSpec
    ids = [(f"{tier}-{i}", tier, budget) for tier, count, budget in parse_fleet(d["fleet"]) for i in range(count)]
    dirs = write_fleet_data(work / "data", [i for i, _, _ in ids], d["samples"], d["alpha"], d["seed"])
    return [DeviceSpec(i, tier, budget, dirs[i]) for i, tier, budget in ids]


def _profile(settings: dict, work: Path) -> Path:
    """The memory model of the model's blocks on this machine: what the coordinator schedules from."""
    from coordinator.model.zoo_profile import measured_profile
    d = settings["demo"]
    return measured_profile(work / "profiling", d["model"], settings["train"]["batch_sizes"], d["seed"],
                            log=lambda text: print(text, flush=True))


def run_fleet(coordinator: dict, work: Path, specs, broker_url: str, fleet_name: str,
              progress: Progress) -> list[RoundMetrics]:
    """One run of the coordinator and the fleet until the schedule finishes; resumes a stopped one."""
    from coordinator.local.fleet import LocalFleet, read_metrics
    from coordinator.observe.run_status import progress_line, snapshot
    from coordinator.state_sql import StoreError
    coordinator["service"].update(workdir=str(work / "coordinator"), min_devices=len(specs))
    t0 = time.monotonic()

    def live() -> None:
        try:
            snap = snapshot(work / "coordinator")
        except (StoreError, sqlite3.Error):     # the coordinator is creating its store: the next tick reads it
            return
        if snap is not None and not snap.finished:
            elapsed = time.monotonic() - t0
            progress.line(lambda width: progress_line(snap, elapsed, width))

    with LocalFleet(work / "fleet", broker_url, fleet_name) as fleet:
        fleet.start_run(coordinator, specs)
        code = fleet.follow(work / "coordinator", lambda m: progress.event(round_line(m, time.monotonic() - t0)),
                            seen=len(read_metrics(work / "coordinator")), on_tick=live)
        if code != 0:
            raise SystemExit(f"edge-demo: the coordinator failed:\n{fleet.log_tail('coordinator')}")
    return [RoundMetrics.from_dict(m) for m in read_metrics(work / "coordinator")]


def round_line(m: RoundMetrics, elapsed: float) -> str:
    """The line a closed round leaves above the live one: its stage, updates, accuracy and largest device peak."""
    from coordinator.observe.run_data import MB
    from coordinator.round_metrics import device_accuracy, models_text
    from coordinator.strategies.base import stage_text
    trained = list(m.accepted().values())
    worst_mb = max(r.device_peak_bytes for r in trained) / MB if trained else 0
    idle = f", {len(m.idle)} idle" if m.idle else ""
    own = device_accuracy([m])    # a personalised schedule: each device's model on its held-out rows
    accuracy = f"accuracy {m.accuracy:6.2%}" if own is None else \
        f"device accuracy mean {own.mean:6.2%} worst {own.worst[1]:6.2%}"
    if m.models:      # a model family (FedIN): each member's model on the test set
        accuracy = "accuracy " + models_text(m.models)
    return (f"round {m.round:>3} closed  {stage_text(m.stage):<20} updates {m.updates}/{len(m.devices)}"
            f"{idle}, rejected {m.rejected}  {accuracy}  largest device peak {worst_mb:4.0f} MB  "
            f"({elapsed:.0f} s)")


def summarize(rounds: Sequence[RoundMetrics], specs) -> dict:
    """What summary.json holds; a device's worst peak (job + agent) is held against its whole budget, not the job's."""
    from coordinator.observe.run_data import MB, tally_devices
    from coordinator.round_metrics import device_accuracy
    rows = tally_devices(rounds)
    own = device_accuracy(rounds)
    answered = dict.fromkeys(d for m in rounds for d in m.accepted())     # in the order the devices first answered
    peak_mb = {d: rows[d].device_peak_bytes / MB for d in answered}
    budget_mb = {s.device_id: s.budget_bytes / MB for s in specs}
    return {"rounds": len(rounds), "finished": bool(rounds and rounds[-1].finished),
            "final_test_accuracy": rounds[-1].accuracy if rounds else None,
            "member_accuracy": {k: v["accuracy"] for k, v in rounds[-1].models.items()} if rounds else {},
            "device_accuracy": own.to_dict() if own else None,
            "peak_mb": peak_mb, "budget_mb": budget_mb,
            "over_budget": sorted(d for d, p in peak_mb.items() if p > budget_mb[d])}


def run(settings: dict) -> dict:
    from coordinator.observe.run_report import write_report
    from coordinator.ops.broker import EmbeddedBroker
    d = settings["demo"]
    work = Path(d["workdir"]).resolve()
    work.mkdir(parents=True, exist_ok=True)
    specs = _specs(d, work)
    tiers = {}
    for s in specs:
        tiers.setdefault(s.tier, []).append(s)
    print("fleet: " + ", ".join(f"{len(v)} x {t} ({v[0].budget_bytes / 2**20:.0f} MB)" for t, v in tiers.items())
          + f"; {d['samples']} samples split by Dirichlet({d['alpha']:g}); strategy {d['strategy']}", flush=True)
    progress, profile = Progress(), _profile(settings, work)

    def coordinator(strategy: str, **fedavg) -> dict:
        return {"service": {"model": d["model"], "seed": d["seed"], "strategy": strategy, "profile": str(profile),
                            "round_deadline_s": 300.0, "offline_grace_s": 10.0},
                "train": dict(settings["train"]), **{name: dict(settings[name]) for name in strategies.names()},
                "fedavg": dict(settings["fedavg"], **fedavg)}

    with EmbeddedBroker(work / "broker") as broker:
        print(f"broker {broker.url}; logs in {work / 'fleet' / 'logs'}", flush=True)
        metrics = run_fleet(coordinator(d["strategy"]), work, specs, broker.url, "demo", progress)
        baseline = None
        if d["baseline"] and d["strategy"] != "fedavg":
            print("baseline: full-model FedAvg on the same fleet and data (devices that cannot hold the whole "
                  "model sit it out)", flush=True)
            run_fleet(coordinator("fedavg", rounds=d["baseline_rounds"]), work / "baseline", specs, broker.url,
                      "demo-baseline", progress)
            baseline = work / "baseline" / "coordinator"
    summary = summarize(metrics, specs)
    summary["report"] = str(write_report(work / "coordinator", out_dir=work / "report", baseline=baseline))
    return summary


def _same_run(work: Path, settings: dict) -> None:
    """A workdir holds one demo: resume it only with the settings it started with."""
    path = work / "demo-settings.json"
    mine = json.loads(json.dumps(settings))
    if path.exists():
        theirs = json.loads(path.read_text())
        changed = sorted(f"{t}.{k}" for t in mine for k in mine[t] if theirs.get(t, {}).get(k) != mine[t][k])
        if changed:
            raise ConfigError(f"{work} holds a run started with other settings ({', '.join(changed)}); "
                              f"add --fresh to start over there, or give another --workdir")
        print(f"resuming the run in {work} (--fresh starts over)", flush=True)
    elif (work / "coordinator").exists():
        raise ConfigError(f"{work} holds a run of an older edge-demo; add --fresh to start over there")
    else:
        work.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(mine, indent=1))


def _interrupted(signum, frame):
    """Stop once: a second Ctrl-C while the fleet shuts down must not cut the shutdown short."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    raise KeyboardInterrupt


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    overrides = {"demo": {"workdir": args.workdir, "model": args.model, "samples": args.samples,
                          "alpha": args.alpha, "strategy": args.strategy, "fleet": args.fleet,
                          "baseline": args.baseline},
                 "train": {"local_epochs": args.local_epochs}}
    try:
        settings = load_config(DEFAULTS, args.config, overrides)
        if args.quick:
            for table, values in QUICK.items():
                for key, value in values.items():
                    if (overrides.get(table) or {}).get(key) is None:
                        settings[table][key] = value
        parse_fleet(settings["demo"]["fleet"])
        if settings["demo"]["strategy"] == "fedin" and settings["demo"]["model"] == DEFAULTS["demo"]["model"] \
                and args.model is None:
            settings["demo"]["model"] = FAMILY_MODEL
            if settings["train"]["batch_sizes"] == DEFAULTS["train"]["batch_sizes"]:
                # the smallest member needs about 98 MB at batch 32 (with the margin): a 256 MB board's 96 MB
                # holds it at 16 only, and a member's layers cannot be split across stages as a block's can
                settings["train"]["batch_sizes"] = [16, *DEFAULTS["train"]["batch_sizes"]]
    except ConfigError as exc:
        print(f"edge-demo: {exc}", file=sys.stderr)
        return 2
    work = Path(settings["demo"]["workdir"])
    if args.fresh:
        shutil.rmtree(work, ignore_errors=True)
    try:
        _same_run(work, settings)
    except ConfigError as exc:
        print(f"edge-demo: {exc}", file=sys.stderr)
        return 2
    # Ctrl-C (or SIGTERM) unwinds through every `with`, which stops the processes this started
    signal.signal(signal.SIGINT, _interrupted)
    signal.signal(signal.SIGTERM, _interrupted)
    try:
        summary = run(settings)
    except KeyboardInterrupt:
        print("\nedge-demo: stopped, every process it started is stopped too; run the same command again to resume",
              file=sys.stderr)
        return 130
    (work / "summary.json").write_text(json.dumps(summary, indent=1))
    if summary["device_accuracy"] is not None:
        from coordinator.round_metrics import accuracy_text
        print(f"\n{summary['rounds']} rounds: each device's own model on its held-out rows: "
              f"{accuracy_text(summary['device_accuracy'])}")
    if summary["member_accuracy"]:
        print(f"\n{summary['rounds']} rounds: each member's model on the test set: " +
              ", ".join(f"{name} {acc:.2%}" for name, acc in summary["member_accuracy"].items()))
    if summary["final_test_accuracy"] is not None:
        print(f"\n{summary['rounds']} rounds: test accuracy {summary['final_test_accuracy']:.2%}; every device's "
              f"largest peak (training job + agent) against its budget: " +
              ", ".join(f"{d} {p:.0f}/{summary['budget_mb'][d]:.0f} MB" for d, p in summary["peak_mb"].items()))
    print(f"report: {summary['report']}")
    return 0 if summary["finished"] else 1


if __name__ == "__main__":
    sys.exit(main())
