"""The README's main command, as a newcomer runs it: from a fresh clone, to a report; Ctrl-C and resume.

Both run the real demo (embedded Mosquitto, the coordinator and five device agents in three
tiers of profiles/) in its CI-sized configuration (--quick), about a minute each.
"""
import json
import os
import re
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil

REPO = Path(__file__).resolve().parent.parent


def _readme_demo_command(readme: Path) -> list[str]:
    """The README's first command, without its bootstrap step (CI has run that already)."""
    first = next(l.strip() for l in readme.read_text().splitlines() if "edge-demo" in l)
    command = first.split("#", 1)[0].split("&&")[-1].strip()
    assert command.startswith(".venv/bin/edge-demo"), first
    return shlex.split(command)


def _clone(tmp_path: Path) -> Path:
    clone = tmp_path / "clone"
    subprocess.run(["git", "clone", "--quiet", str(REPO), str(clone)], check=True)
    (clone / ".venv").symlink_to(Path(sys.prefix))       # the environment bootstrap made
    return clone


def _metrics(workdir: Path) -> list[dict]:
    path = workdir / "coordinator" / "metrics.jsonl"
    return [json.loads(l) for l in path.read_text().splitlines() if l.strip()] if path.exists() else []


def test_the_readme_command_runs_a_federated_fleet_to_a_report(tmp_path):
    clone = _clone(tmp_path)
    command = _readme_demo_command(clone / "README.md") + ["--quick"]
    out = subprocess.run(command, cwd=clone, capture_output=True, text=True, timeout=900)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    work = clone / "runs" / "demo"
    metrics = _metrics(work)
    assert metrics and metrics[-1]["finished"]
    tiers = {r["tier"] for m in metrics for r in m["devices"].values()}
    assert len(tiers) >= 3, tiers                                      # three tiers of profiles/ trained
    summary = json.loads((work / "summary.json").read_text())
    assert summary["finished"] and not summary["over_budget"], summary
    report = Path(summary["report"])
    assert report.exists() and report.is_relative_to(work), report
    shown = re.search(r'id="final-accuracy">([0-9.]+)%', report.read_text())
    assert shown, "the report shows no final accuracy"
    assert shown.group(1) == f"{100 * metrics[-1]['accuracy']:.2f}"   # the figure is the metrics file's
    assert f"test accuracy {metrics[-1]['accuracy']:.2%}" in out.stdout
    # the live line named the tiers online and the round's progress while it ran
    live = [l for l in out.stdout.splitlines() if l.startswith("[") and "| online " in l]
    assert live and all(t in live[-1] for t in tiers), live[-3:]
    status = subprocess.run([str(clone / ".venv" / "bin" / "edge-coordinator"), "status", str(work / "coordinator")],
                            capture_output=True, text=True, timeout=60)
    assert status.returncode == 0, status.stderr
    assert "finished" in status.stdout and f"test accuracy: {metrics[-1]['accuracy']:.2%}" in status.stdout
    assert "coordinator: not running" in status.stdout     # the demo stopped it: online flags are history
    assert all(f"{t} " in status.stdout for t in tiers), status.stdout


def _run_dir_processes(marker: str) -> list[psutil.Process]:
    """Every live process whose command line names the run's directory (broker, coordinator, agents, jobs)."""
    found = []
    for p in psutil.process_iter(["cmdline", "status"]):
        try:
            if p.info["status"] != psutil.STATUS_ZOMBIE and marker in " ".join(p.info["cmdline"] or []):
                found.append(p)
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            pass
    return found


def test_ctrl_c_stops_every_process_and_the_same_command_resumes(tmp_path):
    work = tmp_path / "demo-run"
    command = [str(REPO / ".venv" / "bin" / "edge-demo"), "--quick", "--workdir", str(work)]
    demo = subprocess.Popen(command, cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)
    try:
        deadline = time.monotonic() + 600
        while len(_metrics(work)) < 2:                     # well into the run: two rounds closed
            assert demo.poll() is None and time.monotonic() < deadline, demo.stdout.read()[-3000:]
            time.sleep(0.5)
        status = subprocess.run([str(REPO / ".venv" / "bin" / "edge-coordinator"), "status", str(work / "coordinator")],
                                capture_output=True, text=True, timeout=60)
        assert status.returncode == 0 and "coordinator: running" in status.stdout, status.stdout + status.stderr
        started = psutil.Process(demo.pid).children(recursive=True)
        assert len(started) >= 7                            # broker, coordinator, five agents (and their jobs)
        demo.send_signal(signal.SIGINT)                     # what Ctrl-C sends to the foreground process
        output, _ = demo.communicate(timeout=120)
    finally:
        if demo.poll() is None:
            os.killpg(demo.pid, signal.SIGKILL)
    assert demo.returncode == 130, output[-3000:]
    assert "run the same command again to resume" in output
    left = [p for p in started if p.is_running() and p.status() != psutil.STATUS_ZOMBIE]
    assert not left, [p.cmdline() for p in left]
    assert not _run_dir_processes(str(work)), [p.info["cmdline"] for p in _run_dir_processes(str(work))]
    before = _metrics(work)

    again = subprocess.run(command, cwd=tmp_path, capture_output=True, text=True, timeout=900)
    assert again.returncode == 0, again.stdout[-3000:] + again.stderr[-3000:]
    assert "resuming the run" in again.stdout
    after = _metrics(work)
    assert after[:len(before)] == before                    # the stopped run's rounds are kept as they were
    assert [m["round"] for m in after] == list(range(1, len(after) + 1)) and len(after) > len(before)
    assert after[-1]["finished"]
    assert not _run_dir_processes(str(work))


def test_the_live_line_names_what_the_issue_asks_for():
    """Round, stage and block, devices online per tier, updates accepted and rejected, accuracy, elapsed, left."""
    from coordinator.observe.run_status import Snapshot, progress_line
    snap = Snapshot(strategy="progressive", round=9, round_open=True, stage={"phase": "growing", "block": 1},
                    tiers={"generic-256mb": [1, 2], "pi-zero-2w": [2, 2]}, accepted=3, rejected=1, tasks=5,
                    accuracy=0.5859, rounds_left=(4, 6), eta_s=(60.0, 90.0))
    line = progress_line(snap, 157)
    assert line.startswith("[2:37 left 1:00-1:30] round 9 growing block 1: 3/5 updates accepted, 1 rejected")
    assert "online generic-256mb 1/2 pi-zero-2w 2/2" in line and line.endswith("accuracy 58.59%")
    snap.eta_s, snap.finished = None, False
    assert "left: after the first round" in progress_line(snap, 5)
