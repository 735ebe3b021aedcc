"""A fleet over sites, on real Mosquitto processes: a broker per site bridged to the core's.

Every broker runs Debian's mosquitto.conf with the shipped drop-in (mosquitto_helpers.Broker),
with its own CA, passwords and ACL. Each site's conf.d also holds the bridge that
`edge-coordinator bridge` wrote, logging in to the core over TLS as bridge-<site>, whom the
core's ACL (`edge-coordinator acl --site`) gives exactly its devices' topics. The devices
log in to their site's broker, the coordinator to the core's; one FedAvg round over both
sites must take every device's update once.
"""
from __future__ import annotations

import re
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest
from fleet_helpers import BIG_MB, LocalFleet, settings
from mosquitto_helpers import FLEET, WAIT, Broker, connect, make_secrets, wait_message

from coordinator.local.data import write_fleet_data
from coordinator.local.fleet import DeviceSpec, read_metrics, wait_until
from coordinator.ops.broker_acl import DEVICE_READS, DEVICE_WRITES, bridge_user, fleet_acl, site_state_topic
from coordinator.ops.broker_bridge import BridgeError, site_bridge_config
from coordinator.state_store import StateStore
from edge_runtime.wire.mqtt_link import MqttLink, security_from_settings
from edge_runtime.wire.protocol import Ack, Resend, Status, Topics, decode_any

T = Topics(FLEET)
SITES = {"north": ["n-0", "n-1"], "south": ["s-0", "s-1"]}
DEVICES = [d for ids in SITES.values() for d in ids]
MONITOR = "dash"
QUIET = 1.0
BRIDGE_FILE = f"edgeblock-bridge-{FLEET}.conf"


def _bridge_command(out: Path, site: str, core: Broker, core_secrets: Path, devices_file: Path,
                    *extra: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "coordinator.cli", "bridge", "--fleet", FLEET, "--site", site,
                           "--core", core.url(), "--devices", str(devices_file), "--password-file",
                           str(core_secrets / "passwords" / bridge_user(site)), "--out", str(out), *extra],
                          capture_output=True, text=True, timeout=120)


def _log_size(broker: Broker) -> int:
    return broker.log.stat().st_size if broker.log.exists() else 0


def _wait_log(broker: Broker, pattern: str, since: int = 0) -> None:
    """Wait for a line of the broker's log (after byte `since`) to match."""
    def matches():
        with open(broker.log, "rb") as f:
            f.seek(since)
            return re.search(pattern, f.read().decode("utf-8", "replace"))
    assert wait_until(matches, 30, 0.1), f"{pattern!r} not in {broker.log}:\n{broker.tail()}"


@pytest.fixture(scope="module")
def fleet(tmp_path_factory):
    """The core broker (the sites' bridges, a monitor) and a broker per site, bridged by the generated files."""
    root = tmp_path_factory.mktemp("sites")
    core_secrets = make_secrets(root / "core-secrets", users=("coordinator", MONITOR, *map(bridge_user, SITES)))
    core = Broker(root / "core", core_secrets, devices=DEVICES, sites=SITES, monitors=[MONITOR])
    sites: dict[str, Broker] = {}
    monitor = connect(core, MONITOR, [site_state_topic(T, "+")])
    try:
        for site, ids in SITES.items():
            (root / f"{site}.txt").write_text("\n".join(ids) + "\n")
            out = root / f"{site}-{BRIDGE_FILE}"
            made = _bridge_command(out, site, core, core_secrets, root / f"{site}.txt",
                                   "--tls-ca", str(core_secrets / "ca.crt"))
            assert made.returncode == 0, made.stderr
            secrets = make_secrets(root / f"{site}-secrets", users=("coordinator", *ids))
            sites[site] = Broker(root / site, secrets, devices=ids, drop_ins={BRIDGE_FILE: out.read_text()})
        state: dict[str, bytes] = {}

        def all_up() -> bool:
            if (msg := monitor.get(timeout_s=0.2)) is not None:
                state[msg.topic] = msg.payload
            return all(state.get(site_state_topic(T, s)) == b"1" for s in SITES)
        assert wait_until(all_up, 30, 0), f"the bridges did not connect: {state}\n{core.tail()}"
        yield {"root": root, "core": core, "core_secrets": core_secrets, "sites": sites, "monitor": monitor}
    finally:
        monitor.stop()
        for b in (*sites.values(), core):
            b.stop()


# -- the generated files -----------------------------------------------------------------------

def _bridge_topics(text: str) -> dict[str, list[str]]:
    lines = [line.split() for line in text.splitlines() if line.startswith("topic ")]
    assert all(len(words) == 4 and words[3] == "1" for words in lines), "every bridged topic at QoS 1"
    return {d: [w[1] for w in lines if w[2] == d] for d in ("out", "in", "both")}


def _acl_of(acl: str, user: str) -> dict[str, list[str]]:
    block = acl.split(f"\nuser {user}\n")[1].split("\n\n")[0].splitlines()
    return {right: [line.split()[2] for line in block if line.split()[1] == right]
            for right in ("write", "read", "deny", "readwrite")}


def test_a_site_bridges_exactly_its_devices_topics_and_the_core_grants_exactly_those(tmp_path):
    text = site_bridge_config(FLEET, "north", "mqtts://broker.lan", SITES["north"], "secret0",
                              tls_ca="/etc/mosquitto/certs/core-ca.crt")
    topics = _bridge_topics(text)
    assert topics["both"] == []
    assert sorted(topics["out"]) == sorted(T.device(d, k) for d in SITES["north"] for k in DEVICE_WRITES)
    assert sorted(topics["in"]) == sorted([T.device(d, k) for d in SITES["north"] for k in DEVICE_READS]
                                          + [T.coordinator_status])
    assert not any("+" in t or "#" in t for t in topics["out"] + topics["in"]), "no other site's traffic"
    assert T.coordinator_metrics not in topics["in"]
    rights = _acl_of(fleet_acl(FLEET, DEVICES, sites=SITES), bridge_user("north"))
    assert sorted(rights["write"]) == sorted(topics["out"] + [site_state_topic(T, "north")])
    assert sorted(rights["read"]) == sorted(topics["in"]) and rights["readwrite"] == []
    settings_of = dict(line.split(" ", 1) for line in text.splitlines() if line and not line.startswith(("#", "topic")))
    assert settings_of["address"] == "broker.lan:8883" and settings_of["bridge_protocol_version"] == "mqttv50"
    assert settings_of["remote_username"] == settings_of["remote_clientid"] == "bridge-north"
    assert settings_of["cleansession"] == "false" and settings_of["try_private"] == "false"
    assert settings_of["notification_topic"] == site_state_topic(T, "north")
    assert settings_of["bridge_cafile"] == "/etc/mosquitto/certs/core-ca.crt"
    system_cas = site_bridge_config(FLEET, "north", "mqtts://broker.lan", ["n-0"], "secret0")
    assert "bridge_capath /etc/ssl/certs" in system_cas and "bridge_cafile" not in system_cas


@pytest.mark.parametrize("change, says", [
    ({"site": "no rth"}, "site name 'no rth' is not a valid id"),
    ({"devices": []}, "site 'north' has no device ids"),
    ({"devices": ["n-0", "n-0"]}, "listed twice: n-0"),
    ({"devices": ["n/0"]}, "device id of site north 'n/0' is not a valid id"),
    ({"password": "two words"}, "printable ASCII without spaces"),
    ({"core": "ftp://broker.lan"}, "scheme 'ftp' is not supported"),
    ({"tls_ca": "core-ca.crt"}, "absolute path of the file on the gateway"),
    ({"tls_cert": "/etc/mosquitto/certs/bridge.crt"}, "--tls-cert and --tls-key go together"),
    ({"core": "broker.lan:1883", "tls_ca": "/ca.crt"}, "--tls-ca given but TLS is off"),
])
def test_a_bridge_that_cannot_work_is_refused_saying_why(change, says):
    args = {"fleet": FLEET, "site": "north", "core": "mqtts://broker.lan", "devices": ["n-0"], "password": "pw",
            **change}
    with pytest.raises(BridgeError, match=re.escape(says)):
        site_bridge_config(**args)


def test_the_bridge_command_teaches_and_refuses_in_words(tmp_path):
    help_text = subprocess.run([sys.executable, "-m", "coordinator.cli", "bridge", "--help"], capture_output=True,
                               text=True, timeout=120).stdout
    for step in ("make-secrets.sh users", "acl --fleet lab --devices ids.txt --site north=north.txt",
                 "/etc/mosquitto/conf.d/", "systemctl restart mosquitto"):
        assert step in help_text, step
    (tmp_path / "ids.txt").write_text("n-0\n")
    run = subprocess.run([sys.executable, "-m", "coordinator.cli", "bridge", "--fleet", FLEET, "--site", "north",
                          "--core", "mqtts://broker.lan", "--devices", str(tmp_path / "ids.txt"),
                          "--password-file", str(tmp_path / "missing"), "--out", str(tmp_path / "b.conf")],
                         capture_output=True, text=True, timeout=120)
    assert run.returncode == 2 and "password_file" in run.stderr and "cannot be read" in run.stderr
    assert "Traceback" not in run.stderr and not (tmp_path / "b.conf").exists()


def test_the_written_bridge_is_private_to_the_broker(fleet):
    for site in SITES:
        out = fleet["root"] / f"{site}-{BRIDGE_FILE}"
        assert out.stat().st_mode & 0o777 == 0o640, "it holds the bridge's password"
        password = (fleet["core_secrets"] / "passwords" / bridge_user(site)).read_text().strip()
        assert f"remote_password {password}" in out.read_text()


# -- real brokers --------------------------------------------------------------------------------

def test_the_bridge_carries_chunk_headers_and_the_retained_status_over_tls(fleet):
    """Over TLS with the bridge's password: user properties both ways, QoS 1, the coordinator's status still
    retained at the site, and nothing of the other site's devices."""
    core, north = fleet["core"], fleet["sites"]["north"]
    coordinator = connect(core, "coordinator", [T.all_devices(k) for k in DEVICE_WRITES])
    watcher = connect(north, "coordinator", [T.device(d, k) for d in DEVICES for k in DEVICE_READS], tls=False)
    try:
        header = [("blob", "ab" * 32), ("index", "0")]
        device = connect(north, "n-0", tls=False)
        device.publish(T.device("n-0", "upload"), b"chunk", user_properties=header, wait_s=WAIT)
        got = wait_message(coordinator, T.device("n-0", "upload"))
        assert (got.payload, got.user_properties, got.qos) == (b"chunk", header, 1)
        device.publish(T.device("n-0", "status"), Status("online", at=4.0).encode(), retain=True, wait_s=WAIT)
        wait_message(coordinator, T.device("n-0", "status"))
        device.stop()
        coordinator.stop()     # and again, after the status came: the core keeps it retained
        coordinator = connect(core, "coordinator", [T.device("n-0", "status")])
        assert Status.decode(wait_message(coordinator, T.device("n-0", "status")).payload).at == 4.0
        coordinator.publish(T.coordinator_status, Status("online", at=5.0).encode(), retain=True, wait_s=WAIT)
        for d in DEVICES:
            coordinator.publish(T.device(d, "blob"), d.encode(), user_properties=header, wait_s=WAIT)
        got = wait_message(watcher, T.device("n-0", "blob"))
        assert (got.payload, got.user_properties) == (b"n-0", header)
        assert wait_message(watcher, T.device("n-1", "blob")).payload == b"n-1"
        assert watcher.get(timeout_s=QUIET) is None, "a site hears only its own devices"
        late = connect(north, "n-1", [T.coordinator_status], tls=False)     # subscribes after the status came
        try:
            assert Status.decode(wait_message(late, T.coordinator_status).payload).at == 5.0
        finally:
            late.stop()
    finally:
        watcher.stop()
        coordinator.stop()


@pytest.mark.parametrize("case, site_says, core_says", [
    ("another CA", r"certificate verify failed", r"tlsv1 alert unknown ca"),
    ("a wrong password", r"Connection Refused: [Nn]ot authori[sz]ed", r"disconnected, not authorised"),
])
def test_a_bridge_the_core_does_not_trust_never_carries_anything(fleet, tmp_path, case, site_says, core_says):
    core, core_secrets = fleet["core"], fleet["core_secrets"]
    ca = make_secrets(tmp_path / "other", users=()) / "ca.crt" if case == "another CA" else core_secrets / "ca.crt"
    text = site_bridge_config(FLEET, "east", core.url(), ["e-0"], "not-the-password", tls_ca=str(ca))
    since = _log_size(core)
    site = Broker(tmp_path / "east", make_secrets(tmp_path / "east-secrets", users=("e-0",)), devices=["e-0"],
                  drop_ins={BRIDGE_FILE: text})
    monitor = fleet["monitor"]      # one login per user: its client id is its user name
    try:
        _wait_log(site, site_says)
        _wait_log(core, core_says, since)
        heard = [m.topic for m in iter(lambda: monitor.get(timeout_s=QUIET), None)]
        assert site_state_topic(T, "east") not in heard, "the core never heard of site east"
    finally:
        site.stop()


def test_what_a_site_sends_while_the_core_is_down_arrives_once_it_is_back(fleet):
    """The site keeps the bridge's queue (cleansession false): an update sent during the core's restart waits."""
    core, south = fleet["core"], fleet["sites"]["south"]
    # the coordinator's persistent session (saved by the core when it stops) holds its subscription meanwhile
    security = security_from_settings({"username": "coordinator", "password_file": str(
        fleet["core_secrets"] / "passwords" / "coordinator")}, core.url(tls=False))
    coordinator = MqttLink("coordinator", "127.0.0.1", core.plain_port, [(T.all_devices("update"), 1)],
                           session_expiry_s=60, security=security).start(timeout_s=WAIT)
    device = connect(south, "s-0", tls=False)
    try:
        core.stop()
        device.publish(T.device("s-0", "update"), b"sent while the core was down", wait_s=WAIT)
        core.start()    # the bridge reconnects within its restart_timeout (5 to 30 s), the link within 10 s
        assert wait_message(coordinator, T.device("s-0", "update"), 60).payload == b"sent while the core was down"
    finally:
        device.stop()
        coordinator.stop()


# -- a federated round over the sites -------------------------------------------------------------

@pytest.fixture(scope="module")
def round_env(tmp_path_factory):
    from coordinator.model.zoo_profile import measured_profile
    root = tmp_path_factory.mktemp("sites-round")
    measured_profile(root, "fmnist_cnn", [32, 64])
    dirs = write_fleet_data(root / "data", DEVICES, samples=800, alpha=0.5)
    return {"root": root, "profile": root / "profile.json",
            "specs": {d: DeviceSpec(d, "pi-zero-2w", BIG_MB, dirs[d]) for d in DEVICES}}


def test_a_round_over_two_bridged_sites_takes_every_update_once(fleet, round_env, tmp_path):
    core, secrets = fleet["core"], fleet["core_secrets"]
    work = tmp_path / "coordinator"
    config = settings(work, round_env["profile"], "fedavg", min_devices=len(DEVICES), eval_samples=500,
                      username="coordinator", password_file=str(secrets / "passwords" / "coordinator"),
                      devices_file=str(_devices_file(tmp_path)))
    config["fedavg"]["rounds"] = 1
    config["train"]["batch_sizes"] = [32]
    fleets = {"core": LocalFleet(tmp_path / "core", core.url(tls=False), FLEET)}
    acks = {site: connect(b, "coordinator", [T.all_devices("ack")], tls=False) for site, b in fleet["sites"].items()}
    try:
        fleets["core"].start_coordinator(config)
        for site, ids in SITES.items():
            b = fleet["sites"][site]
            fleets[site] = LocalFleet(tmp_path / site, b.url(tls=False), FLEET)
            for d in ids:
                fleets[site].start_device(round_env["specs"][d], ["--password-file", str(b.secrets / "passwords" / d)])
        code = fleets["core"].wait("coordinator", timeout_s=600)
        assert code == 0, "\n".join(f"--- {n}\n{f.log_tail(n)}" for f in fleets.values() for n in f.procs)
        state = StateStore(work / "state.db", readonly=True)
        assert sorted(u.device_id for u in state.updates(1)) == sorted(DEVICES), "each device's update, once"
        assert state.rejections() == []
        metrics = read_metrics(work)
        assert [m["round"] for m in metrics] == [1]
        assert {d: r["status"] for d, r in metrics[0]["devices"].items()} == {d: "accepted" for d in DEVICES}
        for site, link in acks.items():   # every device heard its ack once: nothing was sent or echoed twice
            got, granted = [], []         # the ack topic also carries the upload's grant (a resend)
            while (msg := link.get(timeout_s=QUIET)) is not None:
                answer = decode_any(msg.payload, (Ack, Resend))
                (got if isinstance(answer, Ack) else granted).append((T.parse_device_topic(msg.topic)[0], answer))
            assert Counter(d for d, _ in got) == Counter(SITES[site]), (site, got)
            assert all(a.accepted for _, a in got), got
            assert {d for d, _ in granted} == set(SITES[site]), (site, granted)
    finally:
        for link in acks.values():
            link.stop()
        for f in fleets.values():
            f.stop_all()


def _devices_file(tmp_path: Path) -> Path:
    """The fleet's device list, the file the core's ACL was written from: admission takes only these ids."""
    path = tmp_path / "ids.txt"
    path.write_text("\n".join(DEVICES) + "\n")
    return path
