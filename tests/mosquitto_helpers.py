"""The production broker as deploy/ ships it, for the tests that need one: secrets made by
make-secrets.sh, the fleet's ACL by its generator, and real Mosquitto running Debian's own
mosquitto.conf with deploy/mosquitto/edgeblock.conf as its conf.d drop-in, with only their paths
and ports changed (and any further drop-ins a test adds: a site's bridge, another service)."""
from __future__ import annotations

import os
import socket
import subprocess
import time
from collections.abc import Mapping, Sequence
from pathlib import Path

from coordinator.ops.broker import find_mosquitto
from coordinator.ops.broker_acl import write_fleet_acl
from edge_runtime.wire.mqtt_link import MqttLink, parse_broker_address, security_from_settings
from edge_runtime.wire.protocol import Topics

ROOT = Path(__file__).resolve().parents[1]
DEPLOY = ROOT / "deploy"
CONF = DEPLOY / "mosquitto" / "edgeblock.conf"
DROP_IN = "00-edgeblock.conf"        # its name in conf.d, as docs/broker.md installs it
FLEET = "lab"
WAIT = 5.0           # the bound on every wait for something that should arrive
USERS = ("coordinator", "dev-a", "dev-b")
# Debian's /etc/mosquitto/mosquitto.conf (mosquitto 2.0.11-1.2+deb12u2), {work} for its paths
DEBIAN_MAIN = """# Place your local configuration in /etc/mosquitto/conf.d/
#
# A full description of the configuration file is at
# /usr/share/doc/mosquitto/examples/mosquitto.conf.example

pid_file {work}/mosquitto.pid

persistence true
persistence_location {work}/persistence/

log_dest file {work}/mosquitto.log

include_dir {work}/conf.d
"""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def debian_main(work: Path) -> str:
    """Debian's mosquitto.conf with its paths in `work`."""
    text = DEBIAN_MAIN.format(work=work)
    if os.geteuid() == 0:   # as root Mosquitto drops to `mosquitto`, which cannot read pytest's tmp dirs
        text += "user root\n"
    return text


def derive_dropin(secrets: Path, acl: Path, ports: dict[str, int]) -> str:
    """edgeblock.conf with its paths in `secrets` and its ports free ones on loopback; nothing else."""
    paths = {"cafile": secrets / "ca.crt", "certfile": secrets / "server.crt", "keyfile": secrets / "server.key",
             "password_file": secrets / "edgeblock.passwd", "acl_file": acl}
    out = []
    for line in CONF.read_text().splitlines():
        words = line.split()
        if not words or words[0].startswith("#"):
            out.append(line)
        elif words[0] in paths:
            out.append(f"{words[0]} {paths[words[0]]}")
        elif words[0] == "listener":
            out.append(f"listener {ports[words[1]]} 127.0.0.1")
        else:
            out.append(line)
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
    """Mosquitto on Debian's config and the shipped drop-in, with an ACL for `fleet`, its `devices`, its
    `sites` ({site: device ids}) and `monitors`; `drop_ins` ({name: text}) go into conf.d beside it."""

    def __init__(self, work: Path, secrets: Path, fleet: str = FLEET, devices=("dev-a", "dev-b"),
                 sites: Mapping[str, Sequence[str]] | None = None, monitors: Sequence[str] = (),
                 drop_ins: Mapping[str, str] | None = None):
        self.work, self.secrets, self.fleet = work, secrets, fleet
        work.mkdir(parents=True, exist_ok=True)
        self.tls_port, self.plain_port = free_port(), free_port()
        acl = write_fleet_acl(work / "edgeblock.acl", fleet, list(devices), sites=sites, monitors=monitors)
        (work / "persistence").mkdir()
        (work / "conf.d").mkdir()
        self.conf = work / "mosquitto.conf"
        self.conf.write_text(debian_main(work))
        self.drop_in = work / "conf.d" / DROP_IN
        self.drop_in.write_text(derive_dropin(secrets, acl, {"8883": self.tls_port, "1883": self.plain_port}))
        for name, text in (drop_ins or {}).items():
            (work / "conf.d" / name).write_text(text)
        self.log = work / "mosquitto.log"
        self.start()

    def start(self) -> None:
        with open(self.work / "stderr.log", "ab") as err:
            self.proc = subprocess.Popen([find_mosquitto(), "-c", str(self.conf)], stdout=err, stderr=err,
                                         start_new_session=True)
        self._wait_listening()

    def restart(self) -> None:
        """Stopped and started again: the same ports, config and persistence (a broker's reboot)."""
        self.stop()
        self.start()

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
