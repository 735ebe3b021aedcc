"""The embedded broker on real Mosquitto, with real paho-mqtt 2.x MQTTv5 clients."""
from __future__ import annotations

import os
import queue
import signal
import socket
import subprocess
import sys
import time

import paho.mqtt.client as mqtt
import psutil
import pytest
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from coordinator.ops.broker import BrokerError, EmbeddedBroker, parse_broker_url

WAIT = 5.0  # the bound on every wait below


class Client:
    """A paho MQTTv5 client on its own network thread; every callback lands in a queue."""

    def __init__(self, broker: EmbeddedBroker, client_id: str, persistent: bool = False):
        self.events: queue.Queue = queue.Queue()
        self.c = mqtt.Client(callback_api_version=mqtt.CallbackAPIVersion.VERSION2,
                             client_id=client_id, protocol=mqtt.MQTTv5)
        self.c.on_connect = lambda c, u, flags, rc, p: self.events.put(("connect", rc, flags))
        self.c.on_disconnect = lambda c, u, flags, rc, p: self.events.put(("disconnect", rc, flags))
        self.c.on_subscribe = lambda c, u, mid, rcs, p: self.events.put(("subscribe", rcs))
        self.c.on_message = lambda c, u, m: self.events.put(("message", m.topic, m.payload))
        props = None
        if persistent:
            props = Properties(PacketTypes.CONNECT)
            props.SessionExpiryInterval = 3600
        self.c.connect(broker.host, broker.port, keepalive=30,
                       clean_start=not persistent, properties=props)
        self.c.loop_start()
        _, rc, self.connect_flags = self.expect("connect")
        assert not rc.is_failure, rc

    def expect(self, kind: str, timeout: float = WAIT):
        deadline = time.monotonic() + timeout
        while True:
            event = self.events.get(timeout=max(0.0, deadline - time.monotonic()))
            if event[0] == kind:
                return event

    def messages(self, n: int, timeout: float = WAIT) -> list[bytes]:
        return [self.expect("message", timeout)[2] for _ in range(n)]

    def subscribe(self, topic: str) -> None:
        self.c.subscribe(topic, qos=1)
        _, rcs = self.expect("subscribe")
        assert not rcs[0].is_failure, rcs

    def publish(self, topic: str, payload: bytes) -> None:
        self.c.publish(topic, payload, qos=1).wait_for_publish(timeout=WAIT)

    def close(self) -> None:
        self.c.disconnect()
        self.c.loop_stop()


def _refuses(port: int) -> bool:
    try:
        socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
        return False
    except ConnectionRefusedError:
        return True


def test_start_publish_receive_stop(tmp_path):
    broker = EmbeddedBroker(tmp_path)
    with broker:
        pid = broker.pid
        assert broker.port != 1883
        assert broker.url == f"mqtt://127.0.0.1:{broker.port}"
        assert parse_broker_url(broker.url) == (broker.host, broker.port)
        assert psutil.Process(pid).name() == "mosquitto"
        c = Client(broker, "echo")
        c.subscribe("edgeblock/test")
        c.publish("edgeblock/test", b"hello")
        assert c.messages(1) == [b"hello"]
        c.close()
    assert broker.pid is None and not broker.running
    assert _refuses(broker.port)
    assert not psutil.pid_exists(pid)
    assert not [p for p in psutil.Process().children(recursive=True) if p.pid == pid]
    broker.stop()  # idempotent
    text = (tmp_path / "mosquitto.conf").read_text()
    assert f"listener {broker.port} 127.0.0.1" in text and "max_packet_size" not in text


def test_two_brokers_get_different_ports(tmp_path):
    with EmbeddedBroker(tmp_path / "a") as a, EmbeddedBroker(tmp_path / "b") as b:
        assert a.port != b.port and a.pid != b.pid
        for broker in (a, b):
            Client(broker, "probe").close()


def test_restart_keeps_persistent_session_and_queued_messages(tmp_path):
    with EmbeddedBroker(tmp_path) as broker:
        port = broker.port
        sub = Client(broker, "device-7", persistent=True)
        sub.subscribe("tasks/device-7")
        sub.close()

        pub = Client(broker, "coordinator")
        for i in range(5):
            pub.publish("tasks/device-7", b"task %d" % i)
        pub.close()

        old_pid = broker.pid
        broker.restart()
        assert broker.port == port and broker.pid != old_pid

        sub = Client(broker, "device-7", persistent=True)
        assert sub.connect_flags.session_present
        assert sorted(sub.messages(5)) == [b"task %d" % i for i in range(5)]
        sub.close()


def test_max_packet_bytes_drops_larger_publishes(tmp_path):
    with EmbeddedBroker(tmp_path, max_packet_bytes=1000) as broker:
        sub = Client(broker, "sub")
        sub.subscribe("big")
        pub = Client(broker, "pub")
        # paho ignores the broker's announced maximum: it sends, the broker disconnects it.
        pub.c.publish("big", b"x" * 2000, qos=1)
        _, rc, flags = pub.expect("disconnect")
        assert flags.is_disconnect_packet_from_server and rc == "Packet too large"
        pub.c.loop_stop()  # else paho resends the oversize QoS 1 publish after every reconnect
        pub = Client(broker, "pub2")
        pub.publish("big", b"y" * 900)
        assert sub.messages(1) == [b"y" * 900]  # the small one, and never the large one
        with pytest.raises(queue.Empty):
            sub.expect("message", timeout=0.3)
        pub.close()
        sub.close()


def test_ten_megabyte_message_end_to_end(tmp_path):
    payload = os.urandom(10 * 1024 * 1024)
    with EmbeddedBroker(tmp_path, persistence=False) as broker:
        c = Client(broker, "bulk")
        c.subscribe("bulk")
        c.publish("bulk", payload)
        assert c.messages(1)[0] == payload
        c.close()


def test_port_in_use_fails_with_the_brokers_complaint(tmp_path):
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        port = holder.getsockname()[1]
        broker = EmbeddedBroker(tmp_path, port=port, log_to=tmp_path / "logs" / "broker.log")
        t = time.monotonic()
        with pytest.raises(BrokerError, match="Address already in use") as e:
            broker.start()
        assert time.monotonic() - t < 5
        assert str(port) in str(e.value) and not broker.running


def _gone(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


@pytest.mark.parametrize("how", ["exit", "kill -9"])
def test_broker_does_not_outlive_its_parent(tmp_path, how):
    """A parent that exits without stop() (atexit) or is killed (PR_SET_PDEATHSIG) takes its broker along."""
    code = ("import sys, time; from coordinator.ops.broker import EmbeddedBroker\n"
            "b = EmbeddedBroker(sys.argv[1]).start(); print(b.pid, b.port, flush=True)\n"
            "if sys.argv[2] == 'kill -9': time.sleep(30)\n")
    parent = subprocess.Popen([sys.executable, "-c", code, str(tmp_path), how],
                              stdout=subprocess.PIPE, text=True)
    try:
        pid, port = map(int, parent.stdout.readline().split())
        if how == "kill -9":
            assert not _gone(pid)
            parent.send_signal(signal.SIGKILL)
        parent.wait(timeout=WAIT)
        deadline = time.monotonic() + WAIT
        while not _gone(pid) and time.monotonic() < deadline:
            time.sleep(0.02)
        assert _gone(pid) and _refuses(port)
    finally:
        parent.kill()
        parent.wait(timeout=WAIT)


@pytest.mark.parametrize("url, expected", [
    ("mqtt://broker.lan:1884", ("broker.lan", 1884)),
    ("10.0.0.2:8883", ("10.0.0.2", 8883)),
    ("broker.lan", ("broker.lan", 1883)),
    ("mqtt://[::1]:1885", ("::1", 1885)),
])
def test_parse_broker_url(url, expected):
    assert parse_broker_url(url) == expected


@pytest.mark.parametrize("url", ["", "http://x:1", "x:notaport", "x:70000", "mqtt://:1883", "x:1/path"])
def test_parse_broker_url_rejects(url):
    with pytest.raises(ValueError):
        parse_broker_url(url)
