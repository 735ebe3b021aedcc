"""The production broker as deploy/ ships it, on real Mosquitto, openssl and mosquitto_passwd.

A CA and a server certificate, a password file and the fleet's ACL are made with the
shipped script and generator; Mosquitto runs Debian's mosquitto.conf with
deploy/mosquitto/edgeblock.conf as its conf.d drop-in, with only their paths and ports
changed. Then: who may connect, who may publish and read what (a device, the coordinator,
a read-only monitor), the drop-in beside another service's listener, and a real
`edge-device` process over TLS with a password file.
"""
from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from mosquitto_helpers import (
    CONF,
    DEBIAN_MAIN,
    DEPLOY,
    FLEET,
    USERS,
    WAIT,
    Broker,
    connect,
    free_port,
    make_secrets,
    settings_for,
    wait_message,
)

from coordinator.local.fleet import DeviceSpec, LocalFleet
from coordinator.ops.broker_acl import (
    DEVICE_READS,
    DEVICE_WRITES,
    AclError,
    fleet_acl,
    monitor_reads,
    read_device_ids,
    read_sites,
    site_state_topic,
)
from edge_runtime.train.datasets import LocalDataset
from edge_runtime.wire import protocol
from edge_runtime.wire.mqtt_link import (
    BrokerAddress,
    BrokerRefused,
    LinkConfigError,
    MqttLink,
    parse_broker_address,
    security_from_settings,
)
from edge_runtime.wire.protocol import Hello, Idle, Status, Topics
from edge_runtime.wire.transfer import DEFAULT_CHUNK_BYTES, ChunkHeader, chunk_bytes_for

T = Topics(FLEET)
QUIET = 1.0          # how long nothing must arrive where nothing may


# -- the broker -----------------------------------------------------------------------------

def _directives(text: str) -> list[str]:
    return [line.split()[0] for line in text.splitlines() if line.strip() and not line.startswith("#")]


MONITOR = "dash"


@pytest.fixture(scope="module")
def broker(tmp_path_factory):
    work = tmp_path_factory.mktemp("prod-broker")
    b = Broker(work, make_secrets(work / "secrets", users=(*USERS, MONITOR)), monitors=[MONITOR])
    yield b
    b.stop()


# -- clients ------------------------------------------------------------------------------------

def topics_received(link: MqttLink, quiet_s: float = QUIET) -> list[str]:
    """Every topic that arrives until nothing has arrived for quiet_s."""
    got = []
    while (msg := link.get(timeout_s=quiet_s)) is not None:
        got.append(msg.topic)
    return got


# -- the files deploy/ ships -----------------------------------------------------------------------

def test_the_derived_config_keeps_every_directive(broker):
    shipped = _directives(CONF.read_text())
    assert _directives(broker.drop_in.read_text()) == shipped
    assert [d for d in _directives(broker.conf.read_text()) if d != "user"] == _directives(DEBIAN_MAIN)
    for needed in ("per_listener_settings", "persistence", "cafile", "certfile", "keyfile", "tls_version",
                   "password_file", "acl_file", "log_timestamp", "max_packet_size"):
        assert needed in shipped, needed
    text = CONF.read_text()
    assert "allow_anonymous true" not in text and text.count("allow_anonymous false") == shipped.count("listener")
    assert re.search(r"^listener 1883 127\.0\.0\.1$", text, re.M), "the plain listener must stay on loopback"


def test_the_config_is_a_drop_in_beside_debians_own():
    """Mosquitto refuses a second pid_file, persistence_location or `log_dest file`: Debian's main file has
    them, so the drop-in names none; per_listener_settings, accepted only before any security setting,
    comes first."""
    shipped = _directives(CONF.read_text())
    assert not {"pid_file", "persistence_location", "log_dest", "include_dir"} & set(shipped)
    assert shipped[0] == "per_listener_settings"
    debian = _directives(DEBIAN_MAIN)
    assert debian[-1] == "include_dir"
    assert not {"password_file", "acl_file", "allow_anonymous", "listener"} & set(debian)


def test_the_packet_limit_holds_a_full_chunk_and_no_more():
    limit = int(re.search(r"^max_packet_size (\d+)$", CONF.read_text(), re.M).group(1))
    assert chunk_bytes_for(limit) == DEFAULT_CHUNK_BYTES            # chunks keep their full size
    assert limit < 2 * DEFAULT_CHUNK_BYTES and limit >= protocol.MAX_CONTROL_BYTES


def test_the_acl_rights_follow_the_protocols_directions():
    """Each device topic kind is written by the side the protocol's topic table says sends it."""
    table = dict(re.findall(r"device/<id>/(\w+)\s+(device|coordinator) ->", protocol.__doc__))
    assert set(table) == set(protocol.DEVICE_KINDS)
    assert {k for k, sender in table.items() if sender == "device"} == set(DEVICE_WRITES)
    assert {k for k, sender in table.items() if sender == "coordinator"} == set(DEVICE_READS)


def test_the_acl_example_is_the_generators_output():
    assert (DEPLOY / "mosquitto" / "acl.example").read_text() == fleet_acl("lab", ["pi-01", "pi-02", "pi-03"])


def test_the_acl_generator_refuses_what_cannot_work(tmp_path):
    with pytest.raises(AclError, match="coordinator's user name"):
        fleet_acl("lab", ["dev-a", "coordinator"])
    with pytest.raises(AclError, match="listed twice: dev-a"):
        fleet_acl("lab", ["dev-a", "dev-a"])
    with pytest.raises(AclError, match="not a valid id"):
        fleet_acl("lab", ["dev/a"])
    with pytest.raises(AclError, match="no device ids"):
        fleet_acl("lab", [])
    (tmp_path / "ids.txt").write_text("# the lab's boards\ndev-a\n\n  dev-b  \n")
    assert read_device_ids(tmp_path / "ids.txt") == ["dev-a", "dev-b"]
    with pytest.raises(AclError, match="not among the fleet's devices: dev-x"):
        fleet_acl("lab", ["dev-a"], sites={"north": ["dev-x"]})
    with pytest.raises(AclError, match="listed at site 'north' and at site 'south'"):
        fleet_acl("lab", ["dev-a"], sites={"north": ["dev-a"], "south": ["dev-a"]})
    with pytest.raises(AclError, match="site 'north' has no device ids"):
        fleet_acl("lab", ["dev-a"], sites={"north": []})
    with pytest.raises(AclError, match="user names given twice.*bridge-north"):
        fleet_acl("lab", ["dev-a", "bridge-north"], sites={"north": ["dev-a"]})
    with pytest.raises(AclError, match="given twice.*dev-a"):
        fleet_acl("lab", ["dev-a"], monitors=["dev-a"])
    with pytest.raises(AclError, match="NAME=FILE"):
        read_sites(["north"])
    assert read_sites([f"north={tmp_path / 'ids.txt'}"]) == {"north": ["dev-a", "dev-b"]}


def test_a_monitor_and_a_bridge_are_denied_their_own_device_topics():
    """The %u patterns would let any user publish as a device of its own name: not these two."""
    acl = fleet_acl("lab", ["dev-a", "dev-b"], sites={"north": ["dev-b"]}, monitors=[MONITOR])
    blocks = {b.splitlines()[0] if not b.startswith("#") else b.splitlines()[1]: b for b in acl.split("\n\n")}
    assert f"topic deny {T.root}/device/{MONITOR}/#" in blocks[f"user {MONITOR}"]
    assert f"topic deny {T.root}/device/bridge-north/#" in blocks["user bridge-north"]
    monitor = blocks[f"user {MONITOR}"].splitlines()
    assert not any(line.startswith(("topic write", "topic readwrite")) for line in monitor)
    assert "user dev-b" not in blocks   # it logs in to its site's broker, not here


def test_the_acl_command(tmp_path):
    (tmp_path / "ids.txt").write_text("dev-a\ndev-b\n")
    out = tmp_path / "edgeblock.acl"
    run = subprocess.run([sys.executable, "-m", "coordinator.cli", "acl", "--fleet", FLEET, "--devices",
                          str(tmp_path / "ids.txt"), "--out", str(out)], capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr
    assert out.read_text() == fleet_acl(FLEET, ["dev-a", "dev-b"])
    bad = subprocess.run([sys.executable, "-m", "coordinator.cli", "acl", "--fleet", FLEET, "--devices",
                          str(tmp_path / "missing.txt")], capture_output=True, text=True, timeout=120)
    assert bad.returncode == 2 and "missing.txt cannot be read" in bad.stderr and "Traceback" not in bad.stderr
    with_monitor = subprocess.run([sys.executable, "-m", "coordinator.cli", "acl", "--fleet", FLEET, "--devices",
                                   str(tmp_path / "ids.txt"), "--monitor", MONITOR, "--site",
                                   f"north={tmp_path / 'ids.txt'}"], capture_output=True, text=True, timeout=120)
    assert with_monitor.returncode == 0, with_monitor.stderr
    assert with_monitor.stdout == fleet_acl(FLEET, ["dev-a", "dev-b"], sites={"north": ["dev-a", "dev-b"]},
                                            monitors=[MONITOR])
    replicas = subprocess.run([sys.executable, "-m", "coordinator.cli", "acl", "--fleet", FLEET, "--devices",
                               str(tmp_path / "ids.txt"), "--coordinator-user", "coord-a", "--coordinator-user",
                               "coord-b"], capture_output=True, text=True, timeout=120)
    assert replicas.returncode == 0, replicas.stderr
    for user in ("coord-a", "coord-b"):     # coordinator replicas: a user each, each with the coordinator's rights
        assert f"user {user}\ntopic readwrite {T.root}/#\n" in replicas.stdout
    assert "user coordinator\n" not in replicas.stdout


def test_the_coordinator_config_example_loads():
    from coordinator.config import load_config
    from coordinator.service import DEFAULTS
    s = load_config(DEFAULTS, DEPLOY / "coordinator.toml.example", {})["service"]
    assert parse_broker_address(s["broker"]).tls and s["tls_ca"] and s["password_file"] and s["username"]


def test_the_systemd_unit_verifies(tmp_path):
    unit = (DEPLOY / "systemd" / "edge-coordinator.service").read_text()
    assert "--config /etc/edgeblock/coordinator.toml" in unit and "StateDirectory=" in unit
    # the coordinator exits 130 when stopped mid-schedule (coordinator.cli.main): a clean stop, not a failure
    assert "SuccessExitStatus=130" in unit and "Restart=on-failure" in unit
    if shutil.which("systemd-analyze") is None:
        pytest.skip("systemd-analyze is not installed: the unit file is not verified here")
    installed = Path(sys.executable).parent / "edge-coordinator"
    if not installed.exists():
        pytest.skip(f"{installed} is not installed (pip install -e .): systemd-analyze checks ExecStart exists")
    local = tmp_path / "edge-coordinator.service"
    local.write_text(unit.replace("/opt/edgeblock/.venv/bin/edge-coordinator", str(installed)))
    check = subprocess.run(["systemd-analyze", "verify", str(local)], capture_output=True, text=True, timeout=60)
    assert check.returncode == 0 and not check.stderr.strip(), check.stderr


# -- addresses and settings -------------------------------------------------------------------------

@pytest.mark.parametrize("url, host, port, tls", [
    ("mqtts://broker.lan", "broker.lan", 8883, True),
    ("mqtts://broker.lan:9883", "broker.lan", 9883, True),
    ("mqtt://broker.lan", "broker.lan", 1883, False),
    ("broker.lan:1884", "broker.lan", 1884, False),
])
def test_broker_addresses(url, host, port, tls):
    assert parse_broker_address(url) == BrokerAddress(host, port, tls)


def test_credentials_never_ride_in_the_address():
    with pytest.raises(ValueError, match="password_file"):
        parse_broker_address("mqtts://dev-a:secret@broker.lan")


def test_security_settings_fail_early_and_by_name(tmp_path):
    (tmp_path / "empty").write_text("")
    (tmp_path / "pw").write_text("secret\n")
    url = "mqtts://broker.lan"
    cases = [
        ({"tls_ca": str(tmp_path / "nope.crt")}, url, "tls_ca .*nope.crt: no such file"),
        ({"username": "dev-a", "password_file": str(tmp_path / "nope")}, url, "password_file .* cannot be read"),
        ({"username": "dev-a", "password_file": str(tmp_path / "empty")}, url, "is empty"),
        ({"password_file": str(tmp_path / "pw")}, url, "without a username"),
        ({"tls_ca": str(tmp_path / "pw")}, "mqtt://broker.lan", "TLS is off"),
        ({"tls": True}, "", "embedded broker has no TLS"),
        ({"tls_ca": str(tmp_path / "pw")}, url, "not a readable PEM CA certificate"),
        ({"tls_key": str(tmp_path / "pw")}, url, "tls_key given without tls_cert"),
    ]
    for settings, broker_url, message in cases:
        with pytest.raises(LinkConfigError, match=message):
            security_from_settings(settings, broker_url)
    s = security_from_settings({"username": "dev-a", "password_file": str(tmp_path / "pw")}, url)
    assert s.tls and s.password == "secret" and "secret" not in repr(s)


def test_a_password_in_the_clear_is_warned_about(tmp_path, caplog):
    (tmp_path / "pw").write_text("secret\n")
    (tmp_path / "pw").chmod(0o600)
    settings = {"username": "dev-a", "password_file": str(tmp_path / "pw")}
    security_from_settings(settings, "mqtt://127.0.0.1:1883")
    assert not caplog.records                                     # loopback: nothing to say
    security_from_settings(settings, "mqtt://broker.lan")
    assert "unencrypted" in caplog.text
    (tmp_path / "pw").chmod(0o644)
    security_from_settings(settings, "mqtts://broker.lan")
    assert "open to every user" in caplog.text


def test_a_client_certificate_loads_only_with_its_own_key(broker):
    secrets = broker.secrets
    ok = security_from_settings({"tls_ca": str(secrets / "ca.crt"), "tls_cert": str(secrets / "server.crt"),
                                 "tls_key": str(secrets / "server.key")}, "mqtts://broker.lan")
    assert ok.cert_file and ok.key_file
    with pytest.raises(LinkConfigError, match="cannot load the client certificate"):
        security_from_settings({"tls_cert": str(secrets / "server.crt"), "tls_key": str(secrets / "ca.key")},
                               "mqtts://broker.lan")


# -- who may connect ----------------------------------------------------------------------------------

def test_a_tls_client_with_the_right_ca_and_password_connects(broker):
    link = connect(broker, "dev-a")
    try:
        assert link.connected.is_set() and link.max_packet_bytes == 131072
    finally:
        link.stop()


def test_a_wrong_password_is_refused_in_words(broker):
    with pytest.raises(BrokerRefused, match=r"refused the login of user 'dev-a': (not authorized|bad user name)"):
        connect(broker, "dev-a", password_of="dev-b")


def test_an_unknown_user_is_refused(broker):
    with pytest.raises(BrokerRefused, match="refused the login of user 'mallory'"):
        connect(broker, "mallory", password_of="dev-a")


def test_anonymous_clients_are_refused_on_both_listeners(broker):
    with pytest.raises(BrokerRefused, match="anonymous client"):
        connect(broker, None)
    with pytest.raises(BrokerRefused, match="anonymous client"):
        connect(broker, None, tls=False)


def test_the_loopback_listener_still_needs_the_password(broker):
    link = connect(broker, "coordinator", tls=False)
    link.stop()
    with pytest.raises(BrokerRefused, match="user 'coordinator'"):
        connect(broker, "coordinator", tls=False, password_of="dev-a")


def test_a_certificate_from_another_ca_is_not_trusted(broker, tmp_path):
    other = make_secrets(tmp_path / "other", users=())
    with pytest.raises(BrokerRefused, match="certificate is not trusted"):
        connect(broker, "dev-a", tls_ca=str(other / "ca.crt"))


def test_the_host_name_is_checked(broker, tmp_path):
    """A broker whose certificate names broker.lan is not trusted as localhost, whatever CA signed it."""
    other_host = make_secrets(tmp_path / "named", names=("broker.lan",))
    b = Broker(tmp_path / "work", other_host)
    try:
        security = security_from_settings({"tls_ca": str(other_host / "ca.crt")}, b.url())
        link = MqttLink("test-host", "localhost", b.tls_port, [], session_expiry_s=0, security=security)
        with pytest.raises(BrokerRefused, match="not trusted: Hostname mismatch"):
            link.start(timeout_s=WAIT)
    finally:
        b.stop()


def test_a_plain_client_on_the_tls_port_is_told_to_use_mqtts(broker):
    link = MqttLink("test-plain", "127.0.0.1", broker.tls_port, [], session_expiry_s=0)
    with pytest.raises(ConnectionError, match="mqtts://"):
        link.start(timeout_s=3)


def test_tls_on_a_plain_port_fails_as_a_handshake(broker):
    security = security_from_settings(settings_for(broker, "dev-a"), "mqtts://localhost")
    link = MqttLink("test-tls", "localhost", broker.plain_port, [], session_expiry_s=0, security=security)
    with pytest.raises(ConnectionError, match="TLS handshake failed"):
        link.start(timeout_s=3)


# -- who may publish and read what --------------------------------------------------------------------

def test_a_device_reaches_the_coordinator_on_its_own_topics(broker):
    coordinator = connect(broker, "coordinator", [T.all_devices(k) for k in DEVICE_WRITES])
    device = connect(broker, "dev-a")
    try:
        for kind in DEVICE_WRITES:
            device.publish(T.device("dev-a", kind), b"{}", wait_s=WAIT)
        assert sorted(topics_received(coordinator)) == sorted(T.device("dev-a", k) for k in DEVICE_WRITES)
    finally:
        device.stop()
        coordinator.stop()


def test_a_device_cannot_speak_for_another(broker):
    coordinator = connect(broker, "coordinator", [T.all_devices(k) for k in DEVICE_WRITES] + [T.coordinator_status])
    device = connect(broker, "dev-a")
    topics_received(coordinator)   # a status retained by an earlier test
    try:
        for kind in DEVICE_WRITES:
            device.publish(T.device("dev-b", kind), b"{}", wait_s=WAIT)
        device.publish(T.coordinator_status, Status("offline").encode(), wait_s=WAIT)
        device.publish(T.device("dev-a", "hello"), b"marker", wait_s=WAIT)   # QoS 1 keeps the order: last
        assert topics_received(coordinator) == [T.device("dev-a", "hello")]
    finally:
        device.stop()
        coordinator.stop()


def test_a_device_reads_its_own_tasks_and_the_coordinators_status_only(broker):
    coordinator = connect(broker, "coordinator")
    coordinator.publish(T.coordinator_status, Status("online", at=1.0).encode(), retain=True, wait_s=WAIT)
    coordinator.publish(T.coordinator_metrics, b"{}", retain=True, wait_s=WAIT)
    dev_a = connect(broker, "dev-a", [T.device("dev-a", k) for k in DEVICE_READS] + [T.coordinator_status]
                    + [T.device("dev-b", k) for k in DEVICE_READS] + [T.coordinator_metrics, T.all_devices("hello")])
    dev_b = connect(broker, "dev-b", [T.device("dev-b", "task")])
    try:
        for kind in DEVICE_READS:
            coordinator.publish(T.device("dev-b", kind), b"for dev-b", wait_s=WAIT)
        for kind in DEVICE_READS:
            coordinator.publish(T.device("dev-a", kind), b"for dev-a", wait_s=WAIT)
        assert sorted(topics_received(dev_a)) == sorted([T.coordinator_status]    # retained: the status only
                                                        + [T.device("dev-a", k) for k in DEVICE_READS])
        assert wait_message(dev_b, T.device("dev-b", "task")).payload == b"for dev-b"   # it was sent
    finally:
        for link in (dev_a, dev_b, coordinator):
            link.stop()


def test_a_monitor_reads_the_fleets_state_and_publishes_nothing(broker):
    coordinator = connect(broker, "coordinator", [T.all_devices(k) for k in DEVICE_WRITES] + [T.coordinator_status])
    coordinator.publish(T.coordinator_status, Status("online", at=2.0).encode(), retain=True, wait_s=WAIT)
    coordinator.publish(T.coordinator_metrics, b'{"round": 1}', retain=True, wait_s=WAIT)
    device = connect(broker, "dev-a")
    device.publish(T.device("dev-a", "status"), Status("online", at=3.0).encode(), retain=True, wait_s=WAIT)
    coordinator.publish(site_state_topic(T, "north"), b"1", retain=True, wait_s=WAIT)
    topics_received(coordinator)
    monitor = connect(broker, MONITOR, [*monitor_reads(T), *(T.all_devices(k) for k in DEVICE_READS + DEVICE_WRITES)])
    try:
        got = {}
        while (msg := monitor.get(timeout_s=QUIET)) is not None:
            got[msg.topic] = msg.payload
        # the retained state, and nothing of any device's traffic
        assert set(got) == {T.coordinator_status, T.coordinator_metrics, T.device("dev-a", "status"),
                            site_state_topic(T, "north")}
        assert got[T.coordinator_metrics] == b'{"round": 1}'
        coordinator.publish(T.device("dev-a", "task"), b"task", wait_s=WAIT)
        device.publish(T.device("dev-a", "update"), b"update", wait_s=WAIT)
        assert topics_received(monitor) == []
        assert topics_received(coordinator) == [T.device("dev-a", "update")]
        # nothing it publishes arrives: not as a device, not even as a device of its own name, not as the coordinator
        for topic in [T.device("dev-a", "update"), T.device(MONITOR, "hello"), T.device(MONITOR, "update")]:
            monitor.publish(topic, b"{}", wait_s=WAIT)
        monitor.publish(T.coordinator_status, Status("offline").encode(), retain=True, wait_s=WAIT)
        monitor.publish(T.device("dev-a", "task"), b"task", wait_s=WAIT)
        device.publish(T.device("dev-a", "hello"), b"marker", wait_s=WAIT)
        assert topics_received(coordinator) == [T.device("dev-a", "hello")]
        device.stop()      # its client id is its user name: a second login as dev-a would take over the first
        late = connect(broker, "dev-a", [T.coordinator_status, T.device("dev-a", "task")])
        try:   # the retained status is still the coordinator's, and no task came from the monitor
            assert [(m.topic, Status.decode(m.payload).state) for m in iter(lambda: late.get(QUIET), None)] \
                == [(T.coordinator_status, "online")]
        finally:
            late.stop()
    finally:
        for topic in (T.coordinator_metrics, T.device("dev-a", "status"), site_state_topic(T, "north")):
            coordinator.publish(topic, b"", retain=True, wait_s=WAIT)    # an empty retained message clears it
        for link in (monitor, device, coordinator):
            link.stop()


def test_the_coordinator_reads_through_a_shared_subscription(broker):
    """The ACL's read right holds for `$share/<group>/...` too: replicas of the coordinator can split the load."""
    shared = connect(broker, "coordinator", [f"$share/replicas/{T.all_devices('update')}"])
    device = connect(broker, "dev-a")
    try:
        for i in range(4):
            device.publish(T.device("dev-a", "update"), b"%d" % i, wait_s=WAIT)
        assert [wait_message(shared, T.device("dev-a", "update")).payload for _ in range(4)] == [b"0", b"1", b"2", b"3"]
    finally:
        device.stop()
        shared.stop()


def test_the_drop_in_lives_beside_another_services_listener(tmp_path):
    """A broker shared with another service (a Zigbee bridge, say): its own listener, its own password file,
    each listener's users unknown to the other; both work, and edgeblock's ACL binds only its listeners."""
    secrets = make_secrets(tmp_path / "secrets")
    other_port = free_port()
    (tmp_path / "other.passwd").write_text("zigbee2mqtt:zigbee-secret\n")
    subprocess.run(["mosquitto_passwd", "-U", str(tmp_path / "other.passwd")], check=True, timeout=30)
    other = (f"# another service's drop-in, as it would be written for a per-listener broker\n"
             f"listener {other_port} 127.0.0.1\nallow_anonymous false\npassword_file {tmp_path / 'other.passwd'}\n")
    b = Broker(tmp_path / "work", secrets, drop_ins={"zigbee2mqtt.conf": other})
    (tmp_path / "zigbee-password").write_text("zigbee-secret\n")
    (tmp_path / "zigbee-password").chmod(0o600)
    zigbee = {"username": "zigbee2mqtt", "password_file": str(tmp_path / "zigbee-password")}
    theirs = MqttLink("zigbee2mqtt", "127.0.0.1", other_port, [("zigbee2mqtt/#", 1)], session_expiry_s=0,
                      security=security_from_settings(zigbee, f"mqtt://127.0.0.1:{other_port}"))
    ours = None
    try:
        theirs.start(timeout_s=WAIT)
        theirs.publish("zigbee2mqtt/bridge/state", b"online", wait_s=WAIT)   # no ACL on their listener
        assert wait_message(theirs, "zigbee2mqtt/bridge/state").payload == b"online"
        ours = connect(b, "dev-a")
        assert ours.max_packet_bytes == 131072
        with pytest.raises(BrokerRefused, match="user 'zigbee2mqtt'"):
            MqttLink("z", "localhost", b.tls_port, [], session_expiry_s=0, security=security_from_settings(
                {**zigbee, "tls_ca": str(secrets / "ca.crt")}, b.url())).start(timeout_s=WAIT)
        with pytest.raises(BrokerRefused, match="user 'dev-a'"):
            MqttLink("d", "127.0.0.1", other_port, [], session_expiry_s=0, security=security_from_settings(
                {"username": "dev-a", "password_file": str(secrets / "passwords" / "dev-a")},
                f"mqtt://127.0.0.1:{other_port}")).start(timeout_s=WAIT)
    finally:
        for link in (ours, theirs):
            if link is not None:
                link.stop()
        b.stop()


def test_a_full_chunk_passes_the_packet_limit(broker):
    coordinator = connect(broker, "coordinator", [T.all_devices("upload")])
    device = connect(broker, "dev-a")
    try:
        data = os.urandom(chunk_bytes_for(device.max_packet_bytes))
        header = ChunkHeader("a" * 64, 0, 2, 0, 2 * len(data), "b" * 64)
        device.publish(T.device("dev-a", "upload"), data, user_properties=header.to_properties(), wait_s=WAIT)
        assert wait_message(coordinator, T.device("dev-a", "upload")).payload == data
    finally:
        device.stop()
        coordinator.stop()


# -- a real device agent --------------------------------------------------------------------------------

def _device_args(broker: Broker, password_of: str = "dev-a", ca: Path | None = None) -> list[str]:
    return ["--password-file", str(broker.secrets / "passwords" / password_of),
            "--tls-ca", str(ca or broker.secrets / "ca.crt"), "--connect-timeout", "20"]


@pytest.fixture
def device_data(tmp_path) -> Path:
    rng = np.random.default_rng(0)
    LocalDataset.write(tmp_path / "data", rng.random((8, 1, 28, 28), dtype=np.float32), np.arange(8) % 10)
    return tmp_path / "data"


def test_an_agent_connects_over_tls_with_a_password_file(broker, tmp_path, device_data):
    coordinator = connect(broker, "coordinator", [T.all_devices("hello"), T.all_devices("status")])
    spec = DeviceSpec("dev-a", "custom", 300, device_data)
    fleet = LocalFleet(tmp_path / "fleet", broker.url(), FLEET)
    try:
        fleet.start_device(spec, _device_args(broker))
        hello = Hello.decode(wait_message(coordinator, T.device("dev-a", "hello"), 60).payload)
        assert hello.device_id == "dev-a"
        # it reads the coordinator's status (it says hello again) and its own task topic
        coordinator.publish(T.coordinator_status, Status("online", at=time.time()).encode(), retain=True,
                            wait_s=WAIT)
        wait_message(coordinator, T.device("dev-a", "hello"), WAIT)
        coordinator.publish(T.device("dev-a", "task"), Idle(1, "nothing for the test device").encode(), wait_s=WAIT)
        _wait_log(fleet, "dev-a", "nothing for the test device")
        fleet.kill("dev-a", signal.SIGTERM)
        assert fleet.procs["dev-a"].returncode == 0
        # its last word, after any announcement still queued
        while Status.decode(wait_message(coordinator, T.device("dev-a", "status")).payload).state != "offline":
            pass
    finally:
        fleet.stop_all()
        coordinator.stop()


def _wait_log(fleet: LocalFleet, name: str, text: str, timeout_s: float = WAIT) -> None:
    deadline = time.monotonic() + timeout_s
    while text not in fleet.log_tail(name, 200):
        if time.monotonic() > deadline:
            raise AssertionError(f"{text!r} not in {name}'s log:\n{fleet.log_tail(name)}")
        time.sleep(0.1)


@pytest.mark.parametrize("case, code, message", [
    ("wrong password", 1, "refused the login of user 'dev-a'"),
    ("missing CA", 2, "tls_ca .* no such file"),
    ("other CA", 1, "certificate is not trusted"),
])
def test_an_agent_that_cannot_log_in_says_why(broker, tmp_path, device_data, case, code, message):
    ca = None
    if case == "missing CA":
        ca = tmp_path / "nope.crt"
    elif case == "other CA":
        ca = make_secrets(tmp_path / "other", users=()) / "ca.crt"
    args = [sys.executable, "-m", "edge_runtime.device.cli", "--id", "dev-a", "--fleet", FLEET, "--broker", broker.url(),
            "--data", str(device_data), "--state", str(tmp_path / "state"), "--budget-mb", "300",
            *_device_args(broker, "dev-b" if case == "wrong password" else "dev-a", ca)]
    run = subprocess.run(args, capture_output=True, text=True, timeout=60, cwd=tmp_path)
    assert run.returncode == code, run.stderr
    assert re.search(message, run.stderr), run.stderr
    assert "Traceback" not in run.stderr
