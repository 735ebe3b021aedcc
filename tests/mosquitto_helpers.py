"""The production broker as deploy/ ships it, for the tests that need one: secrets made by
make-secrets.sh, the fleet's ACL by its generator, and real Mosquitto running
deploy/mosquitto/edgeblock.conf with only its paths and ports changed."""
from __future__ import annotations

import os
import socket
import subprocess
import time
from pathlib import Path

from coordinator.ops.broker import find_mosquitto
from coordinator.ops.broker_acl import write_fleet_acl
from edge_runtime.wire.mqtt_link import MqttLink, parse_broker_address, security_from_settings
from edge_runtime.wire.protocol import Topics

ROOT = Path(__file__).resolve().parents[1]
DEPLOY = ROOT / "deploy"
CONF = DEPLOY / "mosquitto" / "edgeblock.conf"
FLEET = "lab"
WAIT = 5.0           # the bound on every wait for something that should arrive
USERS = ("coordinator", "dev-a", "dev-b")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def derive_config(work: Path, secrets: Path, acl: Path, ports: dict[str, int]) -> str:
    """edgeblock.conf with its paths in `work`/`secrets` and its ports free ones on loopback; nothing else."""
    paths = {"cafile": secrets / "ca.crt", "certfile": secrets / "server.crt", "keyfile": secrets / "server.key",
             "password_file": secrets / "edgeblock.passwd", "acl_file": acl, "pid_file": work / "mosquitto.pid",
             "persistence_location": f"{work / 'persistence'}/"}
    out = []
    for line in CONF.read_text().splitlines():
        words = line.split()
        if not words or words[0].startswith("#"):
            out.append(line)
        elif words[0] in paths:
            out.append(f"{words[0]} {paths[words[0]]}")
        elif words[0] == "log_dest":
            out.append(f"log_dest file {work / 'mosquitto.log'}")
        elif words[0] == "listener":
            out.append(f"listener {ports[words[1]]} 127.0.0.1")
        else:
            out.append(line)
    if os.geteuid() == 0:   # as root Mosquitto drops to `mosquitto`, which cannot read pytest's tmp dirs
        out.append("user root")
    return "\n".join(out) + "\n"


def make_secrets(where: Path, names=("localhost", "127.0.0.1"), users=USERS) -> Path:
    """A CA, a server certificate for `names` and a password per user, by deploy's make-secrets.sh."""
    script = DEPLOY / "mosquitto" / "make-secrets.sh"
    subprocess.run(["bash", str(script), "ca", str(where), *names], check=True, capture_output=True, timeout=60)
    if users:
        subprocess.run(["bash", str(script), "users", str(where), *users], check=True, capture_output=True,
                       timeout=60)
    return where


class Broker:
    """Mosquitto on the shipped config, with an ACL for `fleet` and its `devices`."""

    def __init__(self, work: Path, secrets: Path, fleet: str = FLEET, devices=("dev-a", "dev-b")):
        self.work, self.secrets, self.fleet = work, secrets, fleet
        work.mkdir(parents=True, exist_ok=True)
        self.tls_port, self.plain_port = _free_port(), _free_port()
        acl = write_fleet_acl(work / "edgeblock.acl", fleet, list(devices))
        (work / "persistence").mkdir()
        self.conf = work / "mosquitto.conf"
        self.conf.write_text(derive_config(work, secrets, acl, {"8883": self.tls_port, "1883": self.plain_port}))
        self.log = work / "mosquitto.log"
        with open(work / "stderr.log", "wb") as err:
            self.proc = subprocess.Popen([find_mosquitto(), "-c", str(self.conf)], stdout=err, stderr=err,
                                         start_new_session=True)
        self._wait_listening()

    def _wait_listening(self) -> None:
        deadline = time.monotonic() + WAIT
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"mosquitto exited ({self.proc.returncode}): {self.tail()}")
            if all(_accepts(p) for p in (self.tls_port, self.plain_port)):
                return
            time.sleep(0.05)
        raise RuntimeError(f"mosquitto is not listening after {WAIT} s: {self.tail()}")

    def tail(self) -> str:
        return "\n".join(p.read_text(errors="replace")[-3000:] for p in (self.work / "stderr.log", self.log)
                         if p.exists())

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=WAIT)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()

    def url(self, tls: bool = True, host: str = "localhost") -> str:
        return f"mqtts://{host}:{self.tls_port}" if tls else f"mqtt://127.0.0.1:{self.plain_port}"


def _accepts(port: int) -> bool:
    try:
        socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
        return True
    except OSError:
        return False


def settings_for(b: Broker, user: str | None, password_of: str | None = None, **more) -> dict:
    s = {"username": user or "", "tls_ca": str(b.secrets / "ca.crt")}
    if user:
        s["password_file"] = str(b.secrets / "passwords" / (password_of or user))
    s.update(more)
    return s


def connect(b: Broker, user: str | None, subscriptions=(), tls: bool = True, password_of: str | None = None,
            **more) -> MqttLink:
    """A link as the product makes one; its session ends with it, so no test leaves messages queued."""
    url = b.url(tls)
    settings = settings_for(b, user, password_of, **more)
    if not tls:
        settings.pop("tls_ca")
    security = security_from_settings(settings, url)
    address = parse_broker_address(url)
    link = MqttLink(f"test-{user}", address.host, address.port, [(t, 1) for t in subscriptions],
                    session_expiry_s=0, security=security)
    link.start(timeout_s=WAIT)
    # the broker handles a connection's packets in order: once this is acknowledged (allowed or not,
    # nobody reads it), the subscriptions sent on connecting are in place
    link.publish(f"{Topics(b.fleet).root}/test-sync", b"", wait_s=WAIT)
    return link


def wait_message(link: MqttLink, topic: str, timeout_s: float = WAIT):
    deadline = time.monotonic() + timeout_s
    while (left := deadline - time.monotonic()) > 0:
        msg = link.get(timeout_s=left)
        if msg is not None and msg.topic == topic:
            return msg
    raise AssertionError(f"nothing on {topic} within {timeout_s} s")
