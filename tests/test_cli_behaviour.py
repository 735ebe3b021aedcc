"""How edge-coordinator and edge-device behave as processes an operator or systemd runs: exit codes, errors in
one prefixed line, readiness told to systemd (Type=notify), a broker checked before the slow start-up, and stop
signals honoured in every wait. Every test runs the installed console scripts against a real Mosquitto."""
from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import uuid
from pathlib import Path

import numpy as np
import psutil
import pytest
from mosquitto_helpers import FLEET, WAIT, Broker, connect, make_secrets, wait_message

from coordinator.local.fleet import to_toml
from coordinator.state_store import StateStore
from edge_runtime.train.datasets import LocalDataset
from edge_runtime.wire.protocol import Hello, Status, Topics

BIN = Path(sys.executable).parent
COORDINATOR, DEVICE = str(BIN / "edge-coordinator"), str(BIN / "edge-device")
T = Topics(FLEET)
START_S = 180     # the bound on a coordinator's start-up here (export, evaluation set; a profile when measured)


@pytest.fixture(scope="module")
def broker(tmp_path_factory):
    work = tmp_path_factory.mktemp("cli-broker")
    b = Broker(work, make_secrets(work / "secrets"))
    yield b
    b.stop()


@pytest.fixture(scope="module")
def profile(tmp_path_factory) -> Path:
    """fmnist_cnn's memory profile on this machine, measured once: the coordinators here start without measuring."""
    from coordinator.model.zoo_profile import measured_profile
    return measured_profile(tmp_path_factory.mktemp("cli-profile"), "fmnist_cnn", [16, 32])


class Notified:
    """What systemd would hear: a datagram socket bound where $NOTIFY_SOCKET points ('@': the abstract namespace)."""

    def __init__(self, address: str):
        self.address = address
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind("\0" + address[1:] if address.startswith("@") else address)
        self.heard: list[list[str]] = []     # every datagram, as its lines

    def wait(self, field: str, timeout_s: float, proc: subprocess.Popen | None = None) -> list[str]:
        """The first datagram (heard before or now) with `field`; AssertionError if the process ends first."""
        deadline = time.monotonic() + timeout_s
        while True:
            for fields in self.heard:
                if field in fields:
                    return fields
            left = deadline - time.monotonic()
            if left <= 0:
                raise AssertionError(f"no {field} within {timeout_s} s (heard {self.heard})")
            if not self._receive(min(left, 0.5)) and proc is not None and proc.poll() is not None:
                raise AssertionError(f"no {field}: the process exited {proc.returncode} (heard {self.heard})")

    def _receive(self, timeout_s: float | None) -> bool:
        self.sock.settimeout(timeout_s)
        try:
            self.heard.append(self.sock.recv(4096).decode().split("\n"))
            return True
        except (TimeoutError, BlockingIOError):
            return False

    def fields(self) -> list[str]:
        """Every field heard, those still waiting in the socket included (for a process that has exited)."""
        while self._receive(0):
            pass
        return [f for fields in self.heard for f in fields]

    def close(self) -> None:
        self.sock.close()


def _env(notify: Notified | None = None) -> dict:
    env = {k: v for k, v in os.environ.items() if k != "NOTIFY_SOCKET"}
    if notify is not None:
        env["NOTIFY_SOCKET"] = notify.address
    return env


def _config(path: Path, mosquitto: Broker | None, workdir: Path, profile: Path | None = None,
            password_of: str = "coordinator", **service) -> Path:
    """A coordinator's settings file: logged in to `mosquitto` as `coordinator` (with the password of
    `password_of`), or with the given service settings."""
    s = {"workdir": str(workdir), "fleet": FLEET, "min_devices": 2, "eval_samples": 500, **service}
    if mosquitto is not None:
        s.update(broker=mosquitto.url(), username="coordinator", tls_ca=str(mosquitto.secrets / "ca.crt"),
                 password_file=str(mosquitto.secrets / "passwords" / password_of))
    if profile is not None:
        s["profile"] = str(profile)
    path.write_text(to_toml({"service": s, "train": {"batch_sizes": [16, 32]}}))
    return path


def _start(args: list[str], tmp_path: Path, name: str, notify: Notified | None = None) -> subprocess.Popen:
    out, err = open(tmp_path / f"{name}.out", "wb"), open(tmp_path / f"{name}.err", "wb")
    with out, err:
        return subprocess.Popen(args, stdout=out, stderr=err, env=_env(notify), cwd=tmp_path)


def _err(tmp_path: Path, name: str) -> str:
    return (tmp_path / f"{name}.err").read_text(errors="replace")


def _stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.kill()
        proc.wait()


def _refused(done: subprocess.CompletedProcess, prog: str, *says: str) -> None:
    """Exit 2, and the reason as a line of stderr that starts with the program's name; no traceback."""
    assert done.returncode == 2, done.stderr
    lines = [line for line in done.stderr.splitlines() if line.startswith(f"{prog}: ")]
    assert lines and all(s in lines[-1] for s in says), done.stderr
    assert "Traceback" not in done.stderr


def _run(args: list[str], cwd: Path, timeout_s: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run(args, capture_output=True, text=True, timeout=timeout_s, cwd=cwd, env=_env())


def _connects(broker: Broker, user: str, since: int) -> int:
    """Connections the broker accepted for `user` in its log, after the first `since` characters."""
    return broker.log.read_text(errors="replace")[since:].count(f" as {user} ")


# -- bad settings: exit 2, one line, the prefix --------------------------------------------------

@pytest.mark.parametrize("case, says", [
    ("bad TOML", ["not valid TOML"]),
    ("unknown setting", ["unknown setting service.bogus"]),
    ("no such config", ["does not exist"]),
    ("config is a directory", ["cannot be read"]),
    ("malformed broker", ["broker:", "scheme 'http' is not supported"]),
    ("missing password file", ["password_file", "cannot be read"]),
    ("unknown model", ["unknown model 'no_such_model'", "fmnist_cnn"]),
    ("missing init weights", ["init_weights", "is not a file"]),
])
def test_the_coordinator_refuses_bad_settings_with_exit_2(tmp_path, case, says):
    config = tmp_path / "c.toml"
    work = tmp_path / "w"
    if case == "bad TOML":
        config.write_text("[service\n")
    elif case == "unknown setting":
        config.write_text("[service]\nbogus = 1\n")
    elif case == "config is a directory":
        config.mkdir()
    elif case == "malformed broker":
        _config(config, None, work, broker="http://10.0.0.2")
    elif case == "missing password file":
        _config(config, None, work, broker="mqtt://127.0.0.1:1883", username="coordinator",
                password_file=str(tmp_path / "nope"))
    elif case == "unknown model":
        _config(config, None, work, model="no_such_model")
    elif case == "missing init weights":          # refused before the model's export and a profile's measurement
        _config(config, None, work, init_weights=str(tmp_path / "nope.safetensors"))
    _refused(_run([COORDINATOR, "run", "--config", str(config)], tmp_path), "edge-coordinator", *says)


def test_the_coordinators_other_commands_refuse_an_unreadable_state_with_exit_2(tmp_path):
    (tmp_path / "w").mkdir()
    (tmp_path / "w" / "state.db").write_text("not a database")
    _refused(_run([COORDINATOR, "status", "w"], tmp_path), "edge-coordinator", "state.db cannot be read")
    _refused(_run([COORDINATOR, "weights", "w", "out.safetensors"], tmp_path), "edge-coordinator",
             "state.db cannot be read")
    _refused(_run([COORDINATOR, "status", "nowhere"], tmp_path), "edge-coordinator", "no coordinator state")
    assert not (tmp_path / "out.safetensors").exists()


@pytest.fixture
def device_data(tmp_path) -> Path:
    rng = np.random.default_rng(0)
    LocalDataset.write(tmp_path / "data", rng.random((8, 1, 28, 28), dtype=np.float32), np.arange(8) % 10)
    return tmp_path / "data"


@pytest.mark.parametrize("change, says", [
    (["--tier", "pi-zero-3"], ["unknown tier 'pi-zero-3'", "known: generic-256mb, jetson-nano-4gb, pi-3b-plus, "
                                                           "pi-4b-2gb, pi-4b-4gb, pi-zero-2w", "did you mean pi-zero-2w?",
                               "--budget-mb"]),
    (["--tier", "lab-board"], ["unknown tier 'lab-board'", "known: generic-256mb"]),
    (["--data", "nowhere"], ["--data nowhere: no such directory"]),
    (["--config", "bad.toml"], ["not valid TOML"]),
])
def test_the_device_refuses_bad_settings_with_exit_2(tmp_path, device_data, change, says):
    (tmp_path / "bad.toml").write_text("[device\n")
    done = _run([DEVICE, "--id", "pi-01", "--broker", "mqtt://127.0.0.1:1", "--data", str(device_data),
                 "--state", str(tmp_path / "state"), "--connect-timeout", "1", *change], tmp_path)
    _refused(done, "edge-device", *says)
    assert "did you mean" not in done.stderr or "pi-zero-3" in change


def test_a_tier_without_a_file_runs_with_a_given_budget(tmp_path, device_data):
    """As edge-demo and edge-sim take one: the name is the operator's, the budget theirs; here no broker answers."""
    done = _run([DEVICE, "--id", "pi-01", "--broker", "mqtt://127.0.0.1:1", "--data", str(device_data),
                 "--state", str(tmp_path / "state"), "--connect-timeout", "1", "--tier", "lab-board",
                 "--budget-mb", "300"], tmp_path)
    assert done.returncode == 1 and "no connection to the broker" in done.stderr, done.stderr


# -- the broker, checked before the slow start-up ----------------------------------------------

def test_an_unreachable_broker_fails_at_once_before_any_start_up(tmp_path):
    with socket.socket() as s:       # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    notify = Notified(f"@edgeblock-test-{uuid.uuid4().hex}")
    try:
        proc = _start([COORDINATOR, "run", "--config", str(_config(tmp_path / "c.toml", None, tmp_path / "w",
                                                                     broker=f"mqtt://127.0.0.1:{port}"))],
                      tmp_path, "c", notify)
        assert proc.wait(timeout=120) == 1
        heard = notify.fields()
    finally:
        _stop(proc)
        notify.close()
    err = _err(tmp_path, "c")
    assert f"edge-coordinator: edge-coordinator-{FLEET}: no connection to the broker at 127.0.0.1:{port}" in err
    assert "connection refused" in err and "Traceback" not in err
    # nothing exported, nothing measured, no profile: the workdir was not even made
    assert not (tmp_path / "w").exists()
    assert "READY=1" not in heard and "STOPPING=1" in heard


def test_a_refused_login_fails_at_once_before_any_start_up(tmp_path, broker):
    config = _config(tmp_path / "c.toml", broker, tmp_path / "w", password_of="dev-a")
    done = _run([COORDINATOR, "run", "--config", str(config)], tmp_path, timeout_s=120)
    assert done.returncode == 1, done.stderr
    assert "edge-coordinator: " in done.stderr and "refused the login of user 'coordinator'" in done.stderr
    assert not (tmp_path / "w").exists()


# -- readiness, SIGTERM, SIGINT -------------------------------------------------------------------

def test_ready_once_connected_then_sigterm_stops_cleanly_with_143(tmp_path, broker, profile):
    """READY=1 comes after the coordinator's own connection (the broker logged it); SIGTERM says STOPPING=1 and
    exits 143 with the state closed cleanly; messages queued for the coordinator while it was down reach it
    after its next start's broker check; SIGINT exits 130."""
    work = tmp_path / "w"
    config = str(_config(tmp_path / "c.toml", broker, work, profile))
    notify = Notified(f"@edgeblock-test-{uuid.uuid4().hex}")
    since = len(broker.log.read_text(errors="replace"))
    proc = _start([COORDINATOR, "run", "--config", config], tmp_path, "c", notify)
    device = None
    try:
        ready = notify.wait("READY=1", START_S, proc)
        # the broker check's connection and the run's: READY came after both (the broker's log may trail a little)
        deadline = time.monotonic() + WAIT * 6
        while _connects(broker, "coordinator", since) < 2 and time.monotonic() < deadline:
            time.sleep(0.2)
        assert _connects(broker, "coordinator", since) == 2, broker.tail()
        assert any(f.startswith(f"STATUS=serving fleet {FLEET}") for f in ready), ready
        assert not any("READY=1" in d for d in notify.heard[:-1])     # said once, at the end of start-up

        proc.send_signal(signal.SIGTERM)
        notify.wait("STOPPING=1", WAIT * 6, proc)
        assert proc.wait(timeout=120) == 143, _err(tmp_path, "c")
        assert json.loads((tmp_path / "c.out").read_text())["finished"] is False
        state = StateStore(work / "state.db", readonly=True)
        assert state.meta("coordinator")["running"] is False     # its loop's clean end wrote that
        assert state.meta("run")["strategy"]
        state.close()
        device = connect(broker, "dev-a", [T.coordinator_status])
        assert Status.decode(wait_message(device, T.coordinator_status).payload).state == "offline"

        # while it is down, a device says hello: the message waits in the coordinator's session
        device.publish(T.device("dev-a", "hello"), Hello("dev-a", "pi-zero-2w", 200 << 20, "test").encode(),
                       wait_s=WAIT)
        notify.heard.clear()
        proc = _start([COORDINATOR, "run", "--config", config], tmp_path, "c2", notify)
        notify.wait("READY=1", START_S, proc)
        deadline = time.monotonic() + WAIT * 12       # a liveness bound, generous for a loaded machine
        while "device dev-a online" not in _err(tmp_path, "c2"):
            assert time.monotonic() < deadline, _err(tmp_path, "c2")
            time.sleep(0.2)
        proc.send_signal(signal.SIGINT)
        assert proc.wait(timeout=120) == 130, _err(tmp_path, "c2")
        assert "STOPPING=1" in notify.fields()
        assert "Traceback" not in _err(tmp_path, "c") + _err(tmp_path, "c2")
    finally:
        _stop(proc)
        notify.close()
        if device is not None:
            device.stop()


def _python_children(pid: int) -> list[psutil.Process]:
    try:
        return [c for c in psutil.Process(pid).children(recursive=True) if c.cmdline()[:1] == [sys.executable]]
    except psutil.Error:
        return []


def test_sigint_while_measuring_the_profile_stops_it_and_its_children(tmp_path, broker):
    """Without a profile the start-up measures one (a minute of child processes); Ctrl-C leaves it at once."""
    work = tmp_path / "w"
    notify = Notified(str(tmp_path / "notify.sock"))
    proc = _start([COORDINATOR, "run", "--config", str(_config(tmp_path / "c.toml", broker, work))], tmp_path, "c",
                  notify)
    try:
        deadline = time.monotonic() + START_S
        children = []
        while not children:   # a measurement is running in a child
            assert proc.poll() is None and time.monotonic() < deadline, _err(tmp_path, "c")
            children = _python_children(proc.pid) if "no profile given" in _err(tmp_path, "c") else []
            time.sleep(0.05)
        proc.send_signal(signal.SIGINT)
        assert proc.wait(timeout=120) == 130, _err(tmp_path, "c")
        _, alive = psutil.wait_procs(children, timeout=WAIT)
        assert not alive, alive
        heard = notify.fields()
    finally:
        _stop(proc)
        notify.close()
    err = _err(tmp_path, "c")
    assert "stopped by SIGINT while starting" in err and "Traceback" not in err
    assert not (work / "profile.json").exists()
    assert "READY=1" not in heard and "STOPPING=1" in heard


def test_the_device_is_ready_once_connected_and_stops_on_sigterm(tmp_path, broker, device_data):
    notify = Notified(str(tmp_path / "notify.sock"))
    since = len(broker.log.read_text(errors="replace"))
    proc = _start([DEVICE, "--id", "dev-a", "--fleet", FLEET, "--tier", "pi-zero-2w", "--broker", broker.url(),
                   "--password-file", str(broker.secrets / "passwords" / "dev-a"),
                   "--tls-ca", str(broker.secrets / "ca.crt"), "--data", str(device_data),
                   "--state", str(tmp_path / "state"), "--budget-mb", "300"], tmp_path, "d", notify)
    try:
        ready = notify.wait("READY=1", START_S, proc)
        assert _connects(broker, "dev-a", since) == 1, broker.tail()
        assert any(f.startswith("STATUS=device dev-a (tier pi-zero-2w) connected") for f in ready), ready
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=60) == 0, _err(tmp_path, "d")
        assert "STOPPING=1" in notify.fields()
    finally:
        _stop(proc)
        notify.close()
