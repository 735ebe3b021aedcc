"""The README's main command, as a newcomer runs it: from a fresh clone, to a report; Ctrl-C and resume.

Both run the real demo (embedded Mosquitto, the coordinator and five device agents in three
tiers of profiles/) in its CI-sized configuration (--quick), about a minute each.
"""
import io
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


def _snapshots():
    """Live lines of every kind: a progressive round, a FedIN family, a personalised run, one before any device."""
    from coordinator.observe.run_status import Snapshot
    tiers = {"generic-256mb": [2, 2], "pi-3b-plus": [1, 1], "pi-zero-2w": [2, 2], "jetson-nano-4gb": [0, 1]}
    base = dict(strategy="progressive", round=119, round_open=True, stage={"phase": "growing", "block": 3},
                tiers=tiers, accepted=3, rejected=12, failed=1, tasks=6, accuracy=0.5859, rounds_left=(40, 62),
                eta_s=(3600.0, 5580.0))
    family = {"small": {"accuracy": 0.8012}, "medium": {"accuracy": 0.81}, "large": {"accuracy": 0.823}}
    return {"progressive": (Snapshot(**base), ["58.59%"]),
            "fedin": (Snapshot(**dict(base, strategy="fedin", models=family)), ["80", "81", "82"]),
            "pfedla": (Snapshot(**dict(base, strategy="pfedla", device_accuracy={"mean": 0.9136, "worst": 0.8522})),
                       ["91.36%"]),
            "waiting": (Snapshot(tiers=tiers), ["acc"])}


def test_the_live_line_fits_any_width_and_keeps_the_round_and_the_accuracy():
    from coordinator.observe.run_status import progress_line
    for name, (snap, accuracy) in _snapshots().items():
        whole = progress_line(snap, 4000)
        assert len(whole) > 120, whole                      # what wrapped in a 120-column terminal
        for width in (40, 80, 120, 200):
            line = progress_line(snap, 4000, width)
            assert len(line) <= width, (name, width, line)
            assert all(a in line for a in accuracy), (name, width, line)
            if snap.round is not None:
                assert re.search(r"\b(round |r)119\b", line) and "3/6" in line, (name, width, line)
        assert progress_line(snap, 4000, len(whole)) == whole     # room for it all: nothing is shortened
    snap = _snapshots()["progressive"][0]
    assert progress_line(snap, 4000, 80).startswith("[")    # room left for the time left
    for width in (0, 3, 10):                                # narrower than anything: cut, never longer
        assert len(progress_line(snap, 4000, width)) <= width


def _pty(columns: int) -> tuple[int, int]:
    """A pseudo-terminal (master, slave) of this many columns."""
    import pty
    master, slave = pty.openpty()
    _resize(slave, columns)
    return master, slave


def _resize(fd: int, columns: int) -> None:
    import fcntl
    import struct
    import termios
    fcntl.ioctl(fd, termios.TIOCSWINSZ, struct.pack("HHHH", 24, columns, 0, 0))


def _live_lines(text: str) -> list[str]:
    """The live line's redraws in a terminal's output: each starts with a carriage return and clear-to-end, and is
    overwritten by the next (a line ending in a newline stays: a closed round's, or a plain print)."""
    chunks = text.replace("\r\n", "\n").split("\r\033[K")[1:]
    return [c for c in chunks if "\n" not in c]


def _drain(master: int) -> str:
    import select
    out = b""
    while select.select([master], [], [], 0.2)[0]:
        out += os.read(master, 65536)
    return out.decode()


def test_the_live_line_follows_the_terminal_width_at_every_redraw():
    """Progress on a real pseudo-terminal: 80 columns, then resized to 50; and whole lines into a file."""
    from coordinator.local.demo import Progress
    from coordinator.observe.run_status import progress_line
    snap = _snapshots()["progressive"][0]
    master, slave = _pty(80)
    try:
        with os.fdopen(slave, "w", closefd=False) as stream:
            progress = Progress(stream)
            progress.line(lambda width: progress_line(snap, 10, width))
            first = _live_lines(_drain(master))
            _resize(slave, 50)
            progress.event("round 118 closed")
            progress.line(lambda width: progress_line(snap, 11, width))
            second = _live_lines(_drain(master))
    finally:
        os.close(master)
        os.close(slave)
    assert len(first) == 1 and 60 < len(first[0]) < 80 and "round 119" in first[0], first
    assert len(second) == 1 and len(second[0]) < 50 and "58.59%" in second[0], second
    log = io.StringIO()
    Progress(log).line(lambda width: progress_line(snap, 10, width))
    assert log.getvalue() == progress_line(snap, 10) + "\n"


def test_the_demo_on_an_80_column_terminal_never_writes_a_live_line_wider(tmp_path):
    """The real demo (--quick) with a pseudo-terminal of 80 columns as its stdout, as a user's terminal."""
    import select
    master, slave = _pty(80)
    demo = subprocess.Popen([str(REPO / ".venv" / "bin" / "edge-demo"), "--quick", "--workdir", str(tmp_path / "run")],
                            cwd=tmp_path, stdin=subprocess.DEVNULL, stdout=slave, stderr=slave, start_new_session=True)
    os.close(slave)
    out = b""
    try:
        deadline = time.monotonic() + 900
        while time.monotonic() < deadline:
            if select.select([master], [], [], 1.0)[0]:
                try:
                    chunk = os.read(master, 65536)
                except OSError:              # EIO: every writer of the terminal has closed it
                    break
                if not chunk:
                    break
                out += chunk
            elif demo.poll() is not None:
                break
        assert demo.wait(timeout=60) == 0, out.decode()[-3000:]
    finally:
        if demo.poll() is None:
            os.killpg(demo.pid, signal.SIGKILL)
        os.close(master)
    live = _live_lines(out.decode())
    assert len(live) >= 5, out.decode()[-3000:]
    assert max(len(l) for l in live) < 80, [l for l in live if len(l) >= 80]
    rounds = [l for l in live if re.search(r"\b(round |r)\d+\b", l)]
    assert rounds and all(" | acc" in l for l in rounds), live[-5:]
