"""edge-bundle for real: a bundle built from PyPI's wheels, installed by its own install.sh into a
fresh venv, and the installed agent announcing its tier's budget to a real Mosquitto; then a bundle
for the production broker, whose installed agent logs in over TLS with its bundled password."""
from __future__ import annotations

import json
import os
import pwd
import queue
import shutil
import signal
import socket
import stat
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import paho.mqtt.client as mqtt
import pytest

try:
    import tomllib
except ModuleNotFoundError:  # Python < 3.11
    import tomli as tomllib

from mosquitto_helpers import Broker, connect, make_secrets, wait_message

from coordinator.ops.broker import EmbeddedBroker
from coordinator.ops.bundle import _parser, check, main
from coordinator.ops.bundle_errors import BundleError
from coordinator.ops.wheels import platform_tags
from edge_runtime.device.tiers import find_tier
from edge_runtime.memory import MIB
from edge_runtime.train.datasets import LocalDataset, load_fashion_mnist
from edge_runtime.wire.protocol import Hello, Status, Topics

REPO = Path(__file__).resolve().parent.parent
TIER, DEVICE, FLEET = "pi-zero-2w", "board-7", "lab"
TLS_DEVICE = "board-8"        # the production broker's device: its ACL and password are for this id
WAIT_S = 60.0
GOOD = {"--tier": TIER, "--device-id": DEVICE, "--broker": "mqtt://10.0.0.2:1883", "--platform": "x86_64"}


def edge_bundle(args: dict, env: dict | None = None) -> subprocess.CompletedProcess:
    """edge-bundle as an operator runs it, in a process of its own."""
    argv = [str(part) for flag, value in args.items() for part in (flag, value)]
    return subprocess.run([sys.executable, "-m", "coordinator.ops.bundle", *argv], cwd=REPO,
                          capture_output=True, text=True, env=env, timeout=900)


def install(bundle: Path, board: Path, config: str = "etc") -> subprocess.CompletedProcess:
    return subprocess.run(["bash", str(bundle / "install.sh"), "--venv", str(board / "venv"),
                           "--config-dir", str(board / config), "--no-systemd"],
                          capture_output=True, text=True, timeout=900)


@pytest.fixture(scope="session")
def broker(tmp_path_factory):
    with EmbeddedBroker(tmp_path_factory.mktemp("bundle-broker")) as running:
        yield running


@pytest.fixture(scope="session")
def board(tmp_path_factory) -> Path:
    """A stand-in for the board's disks: its data, state, venv and config all live here."""
    root = tmp_path_factory.mktemp("board")
    x, y = load_fashion_mnist("test")
    LocalDataset.write(root / "data", x[:256], y[:256])
    return root


@pytest.fixture(scope="session")
def bundle(broker, board) -> Path:
    """One real bundle per session: the wheels come from PyPI through pip's cache."""
    done = edge_bundle({**GOOD, "--broker": broker.url, "--fleet": FLEET, "--out": board / "bundles",
                        "--data-dir": board / "data", "--state-dir": board / "state"})
    assert done.returncode == 0, done.stdout + done.stderr
    [directory] = [p for p in (board / "bundles").iterdir() if p.is_dir()]
    return directory


@pytest.fixture(scope="session")
def installed(bundle, board) -> Path:
    done = install(bundle, board)
    assert done.returncode == 0, done.stdout + done.stderr
    return board


def test_bundle_holds_the_device_set_and_its_settings(bundle, board, broker):
    wheels = sorted(p.name for p in (bundle / "wheels").glob("*.whl"))
    names = {w.split("-")[0].lower() for w in wheels}
    assert {"edgeblock", "onnxruntime", "numpy", "paho_mqtt", "psutil", "safetensors"} <= names
    # what a board never runs: torch, the onnx package, onnxruntime-training
    assert not [n for n in names if n.startswith("torch") or n == "onnx" or "training" in n], wheels
    allowed = set(platform_tags("x86_64")) | {"any"}
    assert all(set(w[:-len(".whl")].split("-")[-1].split(".")) & allowed for w in wheels), wheels

    settings = tomllib.loads((bundle / "device.toml").read_text())["device"]
    assert settings == {"id": DEVICE, "tier": f"/etc/edgeblock/{TIER}.toml", "fleet": FLEET, "broker": broker.url,
                        "data": str(board / "data"), "state": str(board / "state")}   # the budget: the tier's
    assert (bundle / f"{TIER}.toml").read_bytes() == (REPO / "profiles" / f"{TIER}.toml").read_bytes()

    unit = (bundle / "edge-device.service").read_text().splitlines()
    for line in ("MemoryMax=344M",                      # budget_mb 296 + the agent's 48 MB reserve
                 "MemorySwapMax=0", "Restart=on-failure", "User=edgeblock",
                 "StateDirectory=edgeblock", "WorkingDirectory=/var/lib/edgeblock",
                 "ExecStart=/opt/edgeblock/venv/bin/edge-device --config /etc/edgeblock/device.toml"):
        assert line in unit

    with tarfile.open(bundle.with_name(bundle.name + ".tar.gz")) as tar:
        members = {m.name: m for m in tar.getmembers()}
    assert members[f"{bundle.name}/install.sh"].mode & 0o111
    assert {f"{bundle.name}/wheels/{w}" for w in wheels} <= set(members)


def test_install_sh_installs_only_the_bundle_and_is_idempotent(installed, bundle):
    python = installed / "venv" / "bin" / "python"
    no_torch = subprocess.run([python, "-c", "import torch"], capture_output=True, text=True)
    assert no_torch.returncode != 0 and "No module named 'torch'" in no_torch.stderr

    listed = subprocess.run([python, "-m", "pip", "--isolated", "list", "--format=json"],
                            capture_output=True, text=True, check=True)
    present = {p["name"].lower().replace("-", "_") for p in json.loads(listed.stdout)}
    bundled = {w.name.split("-")[0].lower() for w in (bundle / "wheels").glob("*.whl")}
    assert present - bundled <= {"pip", "setuptools"}, present - bundled   # those two come with every venv

    helped = subprocess.run([installed / "venv" / "bin" / "edge-device", "--help"], capture_output=True, text=True)
    assert helped.returncode == 0 and "usage: edge-device" in helped.stdout

    settings = tomllib.loads((installed / "etc" / "device.toml").read_text())["device"]
    assert settings["tier"] == str(installed / "etc" / f"{TIER}.toml")
    assert Path(settings["tier"]).is_file()

    again = install(bundle, installed)
    assert again.returncode == 0, again.stdout + again.stderr
    assert f"venv {installed / 'venv'}: reused" in again.stdout
    assert "device.toml: unchanged" in again.stdout


class Subscriber:
    """A paho client that queues every message on the device's topics."""

    def __init__(self, broker: EmbeddedBroker, topic_filter: str):
        self.messages: queue.Queue = queue.Queue()
        self.held: list[tuple[str, bytes]] = []
        self.client = mqtt.Client(callback_api_version=mqtt.CallbackAPIVersion.VERSION2,
                                  client_id="bundle-test-subscriber", protocol=mqtt.MQTTv5)
        subscribed = queue.Queue()
        self.client.on_message = lambda c, u, m: self.messages.put((m.topic, m.payload))
        self.client.on_subscribe = lambda c, u, mid, codes, p: subscribed.put(codes)
        self.client.on_connect = lambda c, u, flags, rc, p: c.subscribe(topic_filter, qos=1)
        self.client.connect(broker.host, broker.port)
        self.client.loop_start()
        assert not subscribed.get(timeout=10)[0].is_failure

    def next(self, topic: str, timeout: float = WAIT_S) -> bytes:
        """The next message on `topic`; messages on other topics wait their turn."""
        deadline = time.monotonic() + timeout
        while True:
            for i, (held_topic, payload) in enumerate(self.held):
                if held_topic == topic:
                    del self.held[i]
                    return payload
            self.held.append(self.messages.get(timeout=max(0.0, deadline - time.monotonic())))

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


def test_installed_agent_announces_the_tier_budget(installed, broker):
    topics = Topics(FLEET)
    subscriber = Subscriber(broker, f"{topics.root}/device/{DEVICE}/#")
    log_path = installed / "agent.log"
    with open(log_path, "w") as log:
        agent = subprocess.Popen([installed / "venv" / "bin" / "edge-device", "--config",
                                  installed / "etc" / "device.toml"], stdout=log, stderr=subprocess.STDOUT)
    try:
        hello = Hello.decode(subscriber.next(topics.device(DEVICE, "hello")))
        assert Status.decode(subscriber.next(topics.device(DEVICE, "status"))).state == "online"
        tier = find_tier(TIER)
        assert (hello.device_id, hello.tier) == (DEVICE, TIER)
        # what the jobs get: the tier's budget_mb, the agent living in the reserve the tier set aside
        assert abs(hello.budget_bytes - tier.budget_bytes) <= 12 * MIB, log_path.read_text()

        agent.send_signal(signal.SIGTERM)
        assert agent.wait(timeout=30) == 0, log_path.read_text()
        assert Status.decode(subscriber.next(topics.device(DEVICE, "status"))).state == "offline"
    finally:
        if agent.poll() is None:
            agent.kill()
            agent.wait()
        subscriber.close()


@pytest.mark.parametrize("change, says", [
    ({"--tier": "pi-zero-3"}, "unknown tier 'pi-zero-3'; known: generic-256mb, jetson-nano-4gb"),
    ({"--broker": "http://10.0.0.2"}, "--broker: unsupported broker address"),
    ({"--broker": "mqtt://10.0.0.2:99999"}, "the port must be a number from 1 to 65535"),
    ({"--device-id": "board 7"}, "--device-id 'board 7' is not a valid id"),
    ({"--fleet": "lab/1"}, "fleet 'lab/1' is not a valid id"),
    ({"--data-dir": "data"}, "--data-dir 'data': must be an absolute path on the board"),
    ({"--extra-wheel": "/nowhere/x-1.0-py3-none-any.whl"}, "no such file"),
])
def test_bad_input_fails_at_once_saying_why(tmp_path, change, says):
    done = edge_bundle({**GOOD, "--out": tmp_path / "out", **change})
    assert done.returncode == 2
    assert says in done.stderr
    assert not (tmp_path / "out").exists()   # checked before anything was built


def test_aarch64_needs_no_extra_wheel_and_refuses_one_for_another_platform(tmp_path):
    """Every device dependency has linux-aarch64 wheels on PyPI, so an aarch64 bundle is checked like any other
    (tests/test_aarch64.py builds one and installs it on an emulated arm64 board); a wheel given for
    another platform is still refused before anything is built."""
    def args(change: dict) -> list[str]:
        given = {**GOOD, "--platform": "aarch64", "--out": tmp_path / "out", **change}
        return [str(part) for flag, value in given.items() for part in (flag, value)]
    bundle = check(_parser().parse_args(args({})))
    assert (bundle.arch, bundle.extra_wheels, bundle.name) == ("aarch64", (), f"edgeblock-{DEVICE}-{TIER}-aarch64")
    x86_wheel = tmp_path / "extra-1.0-cp311-cp311-manylinux_2_28_x86_64.whl"
    x86_wheel.write_bytes(b"")
    with pytest.raises(BundleError, match="is for manylinux_2_28_x86_64, not linux aarch64"):
        check(_parser().parse_args(args({"--extra-wheel": x86_wheel})))
    assert not (tmp_path / "out").exists()


def test_unreachable_index_is_said_plainly(tmp_path):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        closed_port = s.getsockname()[1]
    env = {k: v for k, v in os.environ.items() if not k.startswith("PIP_")}
    env.update(PIP_CONFIG_FILE=os.devnull, PIP_RETRIES="0",
               PIP_INDEX_URL=f"http://127.0.0.1:{closed_port}/simple")
    done = edge_bundle({**GOOD, "--out": tmp_path / "out"}, env=env)
    assert done.returncode == 1
    assert "pip cannot reach the package index" in done.stderr
    assert list((tmp_path / "out").iterdir()) == []   # no half-built bundle left behind


# -- a bundle for the production broker ------------------------------------------------------------

@pytest.fixture(scope="session")
def secrets(tmp_path_factory) -> Path:
    """The production broker's CA and server certificate, and a password for the coordinator and TLS_DEVICE."""
    return make_secrets(tmp_path_factory.mktemp("secrets") / "s", users=("coordinator", TLS_DEVICE))


@pytest.fixture(scope="session")
def prod_broker(tmp_path_factory, secrets):
    b = Broker(tmp_path_factory.mktemp("prod-broker"), secrets, FLEET, [TLS_DEVICE])
    yield b
    b.stop()


@pytest.fixture(scope="session")
def tls_bundle(prod_broker, secrets, board) -> Path:
    """A second real bundle, for TLS_DEVICE on the production broker. The broker does not ask for a
    client certificate; the server's own pair stands in for one, so that the bundle carries all four files."""
    done = edge_bundle({**GOOD, "--device-id": TLS_DEVICE, "--broker": prod_broker.url(), "--fleet": FLEET,
                        "--tls-ca": secrets / "ca.crt", "--password-file": secrets / "passwords" / TLS_DEVICE,
                        "--tls-cert": secrets / "server.crt", "--tls-key": secrets / "server.key",
                        "--out": board / "bundles-tls", "--data-dir": board / "data",
                        "--state-dir": board / "state-tls"})
    assert done.returncode == 0, done.stdout + done.stderr
    [directory] = [p for p in (board / "bundles-tls").iterdir() if p.is_dir()]
    return directory


@pytest.fixture(scope="session")
def tls_installed(tls_bundle, board) -> Path:
    """Installed beside the first bundle: the same venv (upgraded in place), its own config directory."""
    done = install(tls_bundle, board, "etc-tls")
    assert done.returncode == 0, done.stdout + done.stderr
    return board / "etc-tls"


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


BROKER_FILES = {"ca.crt": 0o644, "client.crt": 0o644, "password": 0o600, "client.key": 0o600}


def agent_uid() -> int:
    """Whose the secrets are once installed: the service user's when install.sh runs as root and it exists."""
    try:
        return pwd.getpwnam("edgeblock").pw_uid if os.getuid() == 0 else os.getuid()
    except KeyError:
        return os.getuid()


def test_a_production_bundle_carries_the_broker_files(tls_bundle, secrets, prod_broker, board):
    settings = tomllib.loads((tls_bundle / "device.toml").read_text())["device"]
    assert settings == {"id": TLS_DEVICE, "tier": f"/etc/edgeblock/{TIER}.toml", "fleet": FLEET,
                        "broker": prod_broker.url(), "username": TLS_DEVICE,
                        "password_file": "/etc/edgeblock/password", "tls_ca": "/etc/edgeblock/ca.crt",
                        "tls_cert": "/etc/edgeblock/client.crt", "tls_key": "/etc/edgeblock/client.key",
                        "data": str(board / "data"), "state": str(board / "state-tls")}
    assert {name: mode(tls_bundle / name) for name in BROKER_FILES} == BROKER_FILES
    assert (tls_bundle / "ca.crt").read_bytes() == (secrets / "ca.crt").read_bytes()
    assert (tls_bundle / "client.key").read_bytes() == (secrets / "server.key").read_bytes()
    password = (secrets / "passwords" / TLS_DEVICE).read_text().splitlines()[0]
    assert (tls_bundle / "password").read_text() == password + "\n"

    archive = tls_bundle.with_name(tls_bundle.name + ".tar.gz")
    assert mode(archive) == 0o600                  # it holds the password: as private as the file in it
    with tarfile.open(archive) as tar:
        modes = {m.name.split("/", 1)[1]: m.mode for m in tar.getmembers() if "/" in m.name}
    assert {name: modes[name] for name in BROKER_FILES} == BROKER_FILES
    readme = (tls_bundle / "README.txt").read_text()
    assert f"the broker password of user {TLS_DEVICE} (mode 600)" in readme and "keep the bundle private" in readme


def test_install_sh_installs_the_broker_files_privately(tls_installed, tls_bundle, board):
    assert {name: mode(tls_installed / name) for name in BROKER_FILES} == BROKER_FILES
    owners = {name: (tls_installed / name).stat().st_uid for name in BROKER_FILES}
    assert owners == {"ca.crt": os.getuid(), "client.crt": os.getuid(),
                      "password": agent_uid(), "client.key": agent_uid()}
    settings = tomllib.loads((tls_installed / "device.toml").read_text())["device"]
    assert {k: settings[k] for k in ("password_file", "tls_ca", "tls_cert", "tls_key")} == {
        "password_file": str(tls_installed / "password"), "tls_ca": str(tls_installed / "ca.crt"),
        "tls_cert": str(tls_installed / "client.crt"), "tls_key": str(tls_installed / "client.key")}

    (tls_installed / "password").chmod(0o644)       # drift: a second run puts the mode back
    again = install(tls_bundle, board, "etc-tls")
    assert again.returncode == 0, again.stdout + again.stderr
    assert "device.toml: unchanged" in again.stdout and "password client.key installed (mode 600" in again.stdout
    assert {name: mode(tls_installed / name) for name in BROKER_FILES} == BROKER_FILES


def test_the_installed_agent_logs_in_over_tls_with_its_password(tls_installed, prod_broker, board):
    topics = Topics(FLEET)
    coordinator = connect(prod_broker, "coordinator", [topics.device(TLS_DEVICE, k) for k in ("hello", "status")])
    log_path = board / "agent-tls.log"
    with open(log_path, "w") as log:
        agent = subprocess.Popen([board / "venv" / "bin" / "edge-device", "--config", tls_installed / "device.toml"],
                                 stdout=log, stderr=subprocess.STDOUT)
    try:
        hello = Hello.decode(wait_message(coordinator, topics.device(TLS_DEVICE, "hello"), WAIT_S).payload)
        assert (hello.device_id, hello.tier) == (TLS_DEVICE, TIER)
        agent.send_signal(signal.SIGTERM)
        assert agent.wait(timeout=30) == 0, log_path.read_text()
        while Status.decode(wait_message(coordinator, topics.device(TLS_DEVICE, "status")).payload).state != "offline":
            pass
    finally:
        if agent.poll() is None:
            agent.kill()
            agent.wait()
        coordinator.stop()
    assert f"u'{TLS_DEVICE}'" in prod_broker.log.read_text()     # it logged in as its device id


@pytest.fixture
def broker_files(secrets, tmp_path) -> dict[str, Path]:
    """Good and bad broker files, by name, for the checks edge-bundle makes before it builds."""
    files = {"ca": secrets / "ca.crt", "cert": secrets / "server.crt", "key": secrets / "server.key",
             "other-key": secrets / "ca.key", "broker-passwd": secrets / "edgeblock.passwd",
             "missing": tmp_path / "missing.crt", "directory": tmp_path}
    texts = {"not-pem": "hello\n", "empty": "", "open": "secret\n", "grouped": "secret\n",
             "cert-and-key": (secrets / "server.crt").read_text() + (secrets / "server.key").read_text(),
             "encrypted-key": "-----BEGIN ENCRYPTED PRIVATE KEY-----\nMII=\n-----END ENCRYPTED PRIVATE KEY-----\n"}
    for name, text in texts.items():
        files[name] = tmp_path / name
        files[name].write_text(text)
        files[name].chmod({"open": 0o644, "grouped": 0o640}.get(name, 0o600))
    shutil.copy(secrets / "passwords" / TLS_DEVICE, tmp_path / "mine")
    files["mine"] = tmp_path / "mine"
    return files


def argv(change: dict, files: dict[str, Path], out: Path) -> list[str]:
    """GOOD with a TLS broker and `change`, whose file names stand for broker_files' paths."""
    args = {**GOOD, "--broker": "mqtts://10.0.0.2:8883", "--out": out, **change}
    return [str(part) for flag, value in args.items() for part in (flag, files.get(value, value))]


@pytest.mark.parametrize("change, says", [
    ({"--tls-ca": "missing"}, "missing.crt: no such file"),
    ({"--tls-ca": "not-pem"}, "not a PEM certificate"),
    ({"--tls-ca": "cert-and-key"}, "holds a private key as well"),
    ({"--tls-ca": "ca", "--broker": "mqtt://10.0.0.2:1883"}, "--tls-ca given but --broker mqtt://10.0.0.2:1883 "
                                                              "is plain MQTT"),
    ({"--password-file": "empty"}, "is empty: it holds the password on its first line"),
    ({"--password-file": "directory"}, "cannot be read"),
    ({"--password-file": "broker-passwd"}, "that is the broker's password file"),
    ({"--password-file": "open"}, "is open to every user on this machine (mode 644): chmod 600 it"),
    ({"--tls-cert": "cert"}, "--tls-cert and --tls-key go together"),
    ({"--tls-cert": "cert", "--tls-key": "encrypted-key"}, "is encrypted"),
    ({"--tls-cert": "cert", "--tls-key": "ca"}, "not a PEM private key"),
    ({"--tls-cert": "cert", "--tls-key": "other-key"}, "cannot load the client certificate"),
])
def test_bad_broker_files_fail_at_once_saying_why(broker_files, tmp_path, capsys, change, says):
    assert main(argv(change, broker_files, tmp_path / "out")) == 2
    assert says in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("change, says", [
    ({"--broker": "mqtt://10.0.0.2:1883", "--password-file": "mine"},
     f"{DEVICE}'s password would cross the network in clear text; use mqtts://10.0.0.2:8883"),
    ({"--password-file": "grouped"}, "is readable by its group (mode 640)"),
    ({"--password-file": "mine", "--username": "pi-01"}, "--username pi-01 is not the device id board-7"),
])
def test_doubtful_logins_are_warned_about(broker_files, tmp_path, capsys, change, says):
    bundle = check(_parser().parse_args(argv(change, broker_files, tmp_path / "out")))
    assert says in capsys.readouterr().err
    assert bundle.username == change.get("--username", DEVICE)


def test_a_password_file_named_for_another_user_is_warned_about(secrets, tmp_path, capsys):
    given = {"--password-file": str(secrets / "passwords" / "coordinator")}
    check(_parser().parse_args(argv(given, {}, tmp_path / "out")))
    assert "is coordinator's (make-secrets.sh names each user's file after it), but the login is board-7" \
        in capsys.readouterr().err
