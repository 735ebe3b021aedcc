"""The embedded broker: a private Mosquitto on a free loopback port, for the demo and the tests.

When no broker address is given, the coordinator, `edge-demo` and the tests start one of
these instead of depending on a system service (never port 1883, which Debian's own
mosquitto service holds). It writes a config into its work directory, runs `mosquitto -c`
as a child process, returns once the broker answers an MQTT CONNECT, and stops it on
`stop()`, on leaving a `with` block, at interpreter exit, and (on Linux) when the parent
dies. See docs/broker.md for the config and why each line is there.

    with EmbeddedBroker(tmp_path) as broker:
        client.connect(broker.host, broker.port)
"""
from __future__ import annotations

import atexit
import os
import shutil
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

from edge_runtime.wire.mqtt_link import DEFAULT_MQTT_PORT, parse_broker_url  # noqa: F401  (re-exported)

HOST = "127.0.0.1"
START_TIMEOUT_S = 5.0
STOP_TIMEOUT_S = 5.0
AUTOSAVE_INTERVAL_S = 1          # mosquitto then saves about every 2 s: a SIGKILLed broker loses up to that much
MAX_QUEUED_MESSAGES = 10000      # per client: an offline device's backlog of tasks and chunks
MAX_INFLIGHT_MESSAGES = 20       # per client, QoS 1/2 unacknowledged (mosquitto's default, made explicit)
_PORT_ATTEMPTS = 5               # a free port can be taken between picking it and mosquitto's bind


class BrokerError(RuntimeError):
    """The embedded broker could not be found, configured, started or reached."""


def find_mosquitto() -> str:
    """Path of the mosquitto binary: PATH first, then the Debian location /usr/sbin."""
    found = shutil.which("mosquitto")
    if found:
        return found
    for candidate in ("/usr/sbin/mosquitto", "/usr/local/sbin/mosquitto"):
        if os.access(candidate, os.X_OK):
            return candidate
    raise BrokerError("mosquitto is not installed (not on PATH, not in /usr/sbin): "
                      "install it with `apt-get install mosquitto`, or pass the address of a running broker")


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((HOST, 0))
        return s.getsockname()[1]


# The readiness probe: MQTT 3.1.1 CONNECT (clean session, keepalive 60, empty client id, so
# the broker assigns one) and DISCONNECT. 14 bytes, under the smallest max_packet_size (20).
_PROBE_CONNECT = b"\x10\x0c\x00\x04MQTT\x04\x02\x00\x3c\x00\x00"
_PROBE_DISCONNECT = b"\xe0\x00"


def _answers_mqtt(host: str, port: int, timeout: float) -> bool:
    """True if an MQTT broker accepts a connection on host:port.

    A bare TCP connect is not enough: another socket may hold the port while our
    mosquitto is failing to bind it, and the kernel completes the handshake for it."""
    try:
        with socket.create_connection((host, port), timeout=timeout) as s:
            s.sendall(_PROBE_CONNECT)
            reply = b""
            while len(reply) < 4:
                chunk = s.recv(4 - len(reply))
                if not chunk:
                    return False
                reply += chunk
            ok = reply[0] == 0x20 and reply[3] == 0  # CONNACK, return code 0 (accepted)
            if ok:
                s.sendall(_PROBE_DISCONNECT)
            return ok
    except OSError:
        return False


def _die_with_parent() -> None:
    """preexec_fn: ask Linux to SIGTERM the child when the parent dies (PR_SET_PDEATHSIG)."""
    parent = os.getppid()
    try:
        import ctypes
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(1, 15, 0, 0, 0)  # PR_SET_PDEATHSIG = 1, SIGTERM = 15
    except Exception:
        return
    if os.getppid() != parent:      # the parent died before prctl took effect
        os._exit(1)


_live: set[EmbeddedBroker] = set()
_live_lock = threading.Lock()


@atexit.register
def _stop_all() -> None:
    with _live_lock:
        brokers = list(_live)
    for broker in brokers:
        try:
            broker.stop()
        except Exception:
            pass


class EmbeddedBroker:
    """A private Mosquitto listening on 127.0.0.1, started and stopped by this process.

    `port=None` picks a free port at the first `start()`; `restart()` reuses it, with the
    same persistence, so persistent sessions and their queued QoS 1 messages survive.

    The child is stopped by `stop()`, by `__exit__`, by an atexit hook, and on Linux by
    the kernel when the parent dies (PR_SET_PDEATHSIG). The kernel ties that signal to
    the *thread* that started the child: start the broker from a thread that lives as
    long as the broker should (the main thread), or it dies when that thread ends.
    """

    def __init__(self, workdir: Path, port: int | None = None, persistence: bool = True,
                 max_packet_bytes: int | None = None, log_to: Path | None = None):
        if port is not None and not 0 < port < 65536:
            raise ValueError(f"port must be from 1 to 65535, got {port}")
        if max_packet_bytes is not None and max_packet_bytes < 20:
            raise ValueError(f"max_packet_bytes must be at least 20 (mosquitto's minimum), got {max_packet_bytes}")
        self.workdir = Path(workdir).resolve()
        self.persistence = persistence
        self.max_packet_bytes = max_packet_bytes
        self.log_path = Path(log_to).resolve() if log_to is not None else self.workdir / "mosquitto.log"
        self.conf_path = self.workdir / "mosquitto.conf"
        self.persistence_dir = self.workdir / "persistence"
        self._fixed_port = port is not None
        self._port = port
        self._proc: subprocess.Popen | None = None

    # ---- properties -------------------------------------------------------------------
    @property
    def host(self) -> str:
        return HOST

    @property
    def port(self) -> int:
        if self._port is None:
            raise BrokerError("the embedded broker has no port yet: call start() first")
        return self._port

    @property
    def url(self) -> str:
        return f"mqtt://{self.host}:{self.port}"

    @property
    def pid(self) -> int | None:
        """The mosquitto process id while it runs, else None."""
        return self._proc.pid if self.running else None

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    # ---- lifecycle ----------------------------------------------------------------------
    def start(self) -> EmbeddedBroker:
        """Start mosquitto and return once it accepts MQTT connections. No-op if running."""
        if self.running:
            return self
        binary = find_mosquitto()
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        if self.persistence:
            self.persistence_dir.mkdir(parents=True, exist_ok=True)
        attempt = 1
        while True:
            if self._port is None:
                self._port = _free_port()
            try:
                self._launch(binary)
                return self
            except BrokerError as e:
                # Only a port we picked ourselves may be swapped for another one.
                if self._fixed_port or "Address already in use" not in str(e) or attempt == _PORT_ATTEMPTS:
                    raise
                self._port = None
                attempt += 1

    def _launch(self, binary: str) -> None:
        self.conf_path.write_text(self._config())
        log_offset = self.log_path.stat().st_size if self.log_path.exists() else 0
        # mosquitto's own stderr (config errors, the running-as-root warning) goes to the
        # same file as its log, so an error report shows both in order.
        with open(self.log_path, "ab") as out:
            self._proc = subprocess.Popen(
                [binary, "-c", str(self.conf_path)], stdin=subprocess.DEVNULL, stdout=out, stderr=out,
                cwd=self.workdir, start_new_session=True,
                preexec_fn=_die_with_parent if sys.platform.startswith("linux") else None)
        with _live_lock:
            _live.add(self)
        deadline = time.monotonic() + START_TIMEOUT_S
        while True:
            if self._proc.poll() is not None:
                code = self._proc.returncode
                self._forget()
                raise BrokerError(f"mosquitto exited with code {code} while starting on {HOST}:{self._port}"
                                  f"{self._log_tail(log_offset)}")
            if _answers_mqtt(HOST, self._port, timeout=0.25):
                return
            if time.monotonic() > deadline:
                self.stop()
                raise BrokerError(f"mosquitto did not accept connections on {HOST}:{self._port} within "
                                  f"{START_TIMEOUT_S:.0f} s{self._log_tail(log_offset)}")
            time.sleep(0.02)

    def stop(self) -> None:
        """SIGTERM, then SIGKILL after a timeout. Idempotent. Mosquitto saves its
        persistence file on SIGTERM; the port is kept for restart()."""
        proc = self._proc
        if proc is None:
            return
        if proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(timeout=STOP_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=STOP_TIMEOUT_S)
        self._forget()

    def restart(self) -> EmbeddedBroker:
        """Stop and start again on the same port with the same persistence directory."""
        if self._port is None:
            raise BrokerError("restart() before start(): the broker has no port yet")
        self.stop()
        self._fixed_port = True  # clients know this port now: never move to another one
        return self.start()

    def __enter__(self) -> EmbeddedBroker:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    def __repr__(self) -> str:
        state = f"pid {self.pid}" if self.running else "stopped"
        return f"EmbeddedBroker({self.url if self._port else 'no port'}, {state}, workdir={str(self.workdir)!r})"

    # ---- internals ----------------------------------------------------------------------
    def _forget(self) -> None:
        self._proc = None
        with _live_lock:
            _live.discard(self)

    def _config(self) -> str:
        for p in (self.workdir, self.log_path):
            if "\n" in str(p) or "\r" in str(p):
                raise BrokerError(f"path {str(p)!r} contains a line break and cannot go into mosquitto.conf")
        lines = [
            "# Generated by coordinator/ops/broker.py at every start; edits are overwritten. See docs/broker.md.",
            f"listener {self._port} {HOST}",
            "allow_anonymous true",
        ]
        if self.persistence:
            lines += ["persistence true",
                      f"persistence_location {self.persistence_dir}",
                      f"autosave_interval {AUTOSAVE_INTERVAL_S}"]
        else:
            lines.append("persistence false")
        lines += [f"max_queued_messages {MAX_QUEUED_MESSAGES}",
                  f"max_inflight_messages {MAX_INFLIGHT_MESSAGES}"]
        if self.max_packet_bytes is not None:
            lines.append(f"max_packet_size {self.max_packet_bytes}")
        lines += [f"log_dest file {self.log_path}",
                  "log_type error", "log_type warning", "log_type notice", "log_type information",
                  "log_timestamp_format %Y-%m-%dT%H:%M:%S"]
        if hasattr(os, "geteuid") and os.geteuid() == 0:
            # As root, mosquitto drops to the `mosquitto` user, which cannot write our work
            # directory: the log and every autosave fail, yet the broker keeps running.
            lines.append("user root")
        return "\n".join(lines) + "\n"

    def _log_tail(self, offset: int, lines: int = 15) -> str:
        try:
            with open(self.log_path, "rb") as f:
                f.seek(offset)
                text = f.read().decode("utf-8", "replace")
        except OSError:
            return f" (no broker log at {self.log_path})"
        tail = [l for l in text.splitlines() if l.strip()][-lines:]
        if not tail:
            return f" (the broker log {self.log_path} is empty)"
        return f"; broker log ({self.log_path}):\n  " + "\n  ".join(tail)
