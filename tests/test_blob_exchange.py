"""Blobs over a real Mosquitto: a 10 MB fetch, resuming with only the missing chunks, the packet limit."""
import os
import threading

import pytest

from coordinator.ops.broker import EmbeddedBroker
from edge_runtime.wire.blob_exchange import fetch_blob, serve_fetch
from edge_runtime.wire.mqtt_link import MqttLink
from edge_runtime.wire.protocol import Topics
from edge_runtime.wire.transfer import BlobStore, ChunkHeader, chunk_bytes_for

TOPICS = Topics("test")


class Server:
    """The coordinator's side: answers Fetch messages from its store and counts chunks sent."""

    def __init__(self, broker, store):
        self.store, self.sent, self.requests = store, 0, []
        self.link = MqttLink("coordinator", broker.host, broker.port, [(TOPICS.all_devices("fetch"), 1)]).start()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self):
        while not self._stop.is_set():
            msg = self.link.get(timeout_s=0.1)
            if msg:
                from edge_runtime.wire.protocol import Fetch
                self.requests.append(Fetch.decode(msg.payload))
                self.sent += serve_fetch(self.link, TOPICS, self.store, msg)

    def settled_sent(self, at_least: int, timeout_s: float = 30.0) -> int:
        """Chunks sent, once the server has finished answering (it counts after the last PUBACK)."""
        import time
        deadline = time.monotonic() + timeout_s
        while self.sent < at_least and time.monotonic() < deadline:
            time.sleep(0.02)
        time.sleep(0.3)  # nothing more may follow
        return self.sent

    def close(self):
        self._stop.set()
        self._thread.join()
        self.link.stop()


@pytest.fixture
def broker(tmp_path):
    with EmbeddedBroker(tmp_path / "broker") as b:
        yield b


def _device_link(broker, client_id="pi-01"):
    return MqttLink(client_id, broker.host, broker.port, [(TOPICS.device("pi-01", "blob"), 1)]).start()


def test_a_10mb_blob_arrives_whole_in_chunks(broker, tmp_path):
    data = os.urandom(10 * 1024 * 1024)
    src = BlobStore(tmp_path / "coord")
    sha = src.put_bytes(data)
    server = Server(broker, src)
    device = _device_link(broker)
    try:
        path = fetch_blob(device, TOPICS, "pi-01", BlobStore(tmp_path / "dev"), sha, timeout_s=60)
        assert path.read_bytes() == data
        total = -(-len(data) // chunk_bytes_for(None))
        assert server.settled_sent(total) == total  # every chunk exactly once
    finally:
        device.stop()
        server.close()


def test_an_interrupted_fetch_resumes_with_only_the_missing_chunks(broker, tmp_path):
    data = os.urandom(3 * 1024 * 1024)
    src = BlobStore(tmp_path / "coord")
    sha = src.put_bytes(data)
    server = Server(broker, src)
    dev_store = BlobStore(tmp_path / "dev")
    # the first device process gets about half the chunks, then dies
    first = _device_link(broker, "pi-01-run1")
    from edge_runtime.wire.protocol import Fetch
    first.publish(TOPICS.device("pi-01", "fetch"), Fetch(sha).encode())
    total = -(-len(data) // chunk_bytes_for(None))
    for _ in range(total // 2):
        msg = first.get(timeout_s=10)
        dev_store.receive(ChunkHeader.from_properties(msg.user_properties), msg.payload)
    first.stop()
    assert server.settled_sent(total) == total  # the first request's send has finished
    missing = dev_store.missing_chunks(sha)
    assert 0 < len(missing) <= total - total // 2
    sent_before = server.sent
    # a new process (new session) asks for the rest only
    second = _device_link(broker, "pi-01-run2")
    try:
        path = fetch_blob(second, TOPICS, "pi-01", dev_store, sha, timeout_s=60)
        assert path.read_bytes() == data
        assert server.requests[-1].chunks == missing
        assert server.settled_sent(sent_before + len(missing)) - sent_before == len(missing)
    finally:
        second.stop()
        server.close()


def test_chunks_shrink_to_the_brokers_announced_packet_limit(tmp_path):
    with EmbeddedBroker(tmp_path / "broker", max_packet_bytes=64 * 1024) as broker:
        data = os.urandom(1024 * 1024)
        src = BlobStore(tmp_path / "coord")
        sha = src.put_bytes(data)
        server = Server(broker, src)
        device = _device_link(broker)
        try:
            assert device.max_packet_bytes == 64 * 1024
            assert fetch_blob(device, TOPICS, "pi-01", BlobStore(tmp_path / "dev"), sha, timeout_s=60).read_bytes() \
                == data
            total = -(-len(data) // chunk_bytes_for(64 * 1024))
            assert server.settled_sent(total) == total
        finally:
            device.stop()
            server.close()


def test_a_manual_ack_link_announces_its_receive_maximum_and_loses_nothing(broker):
    """Before it acknowledges anything, a manual-ack link holds its Receive Maximum of messages and the rest of a
    burst waits in the broker; acknowledged one by one, every message arrives once. (Mosquitto 2.0.11 sends past
    the window once acknowledgements flow, which is why the coordinator also grants uploads: docs/protocol.md.)"""
    import time

    from edge_runtime.wire.mqtt_link import RECEIVE_MAXIMUM
    topic = TOPICS.device("pi-01", "upload")
    receiver = MqttLink("busy", broker.host, broker.port, [(TOPICS.all_devices("upload"), 1)],
                        manual_ack=True).start()
    sender = MqttLink("burst", broker.host, broker.port, []).start()
    try:
        count, size = 4 * RECEIVE_MAXIMUM, 100_000
        for i in range(count):
            sender.publish(topic, i.to_bytes(4, "big") + os.urandom(size), qos=1).wait_for_publish(30)
        deadline = time.monotonic() + 10
        while receiver.inbox.qsize() < RECEIVE_MAXIMUM and time.monotonic() < deadline:
            time.sleep(0.05)
        time.sleep(0.5)          # were the window not announced, the broker's own (20) or the whole burst would be here
        assert receiver.inbox.qsize() == RECEIVE_MAXIMUM
        seen = []
        while len(seen) < count:
            msg = receiver.get(timeout_s=10)
            assert msg is not None, f"only {len(seen)} of {count} arrived"
            seen.append(int.from_bytes(msg.payload[:4], "big"))
            receiver.ack(msg)
        assert sorted(seen) == list(range(count)) and receiver.dropped == 0
    finally:
        sender.stop()
        receiver.stop()


def test_an_unanswered_fetch_is_asked_again_ever_more_rarely_and_a_stall_is_named(broker, tmp_path):
    """Nobody serves: the device asks at 0, stall, 3 x stall, 7 x stall... (never at a fixed beat, which lengthens
    a busy coordinator's queue), then gives up when no chunk came for timeout_s, saying so."""
    from edge_runtime.errors import EdgeRuntimeError
    from edge_runtime.wire.protocol import Fetch
    sha = "ab" * 32
    listener = MqttLink("listener", broker.host, broker.port, [(TOPICS.all_devices("fetch"), 1)]).start()
    device = _device_link(broker)
    try:
        with pytest.raises(EdgeRuntimeError, match=r"stalled: no chunk for 4 s \(all chunks missing\)"):
            fetch_blob(device, TOPICS, "pi-01", BlobStore(tmp_path / "dev"), sha, timeout_s=4.0, stall_s=0.25)
        asks = []
        while (msg := listener.get(timeout_s=1.0)) is not None:
            asks.append(Fetch.decode(msg.payload))
        # asked at 0, 0.25, 0.75, 1.75, 3.75 s: a fixed beat would have asked 16 times; a slow machine asks fewer
        assert 2 <= len(asks) <= 5 and all(a.sha256 == sha for a in asks)
    finally:
        device.stop()
        listener.stop()


def test_a_device_that_reconnects_while_waiting_asks_again_at_once(broker, tmp_path):
    """A fetch whose wait has grown long (here: 600 s before it would ask again) and whose connection drops asks
    again as soon as it is back: the chunks sent while it was away may be lost, and waiting out the backoff would
    hold its round for minutes."""
    import socket

    from edge_runtime.wire.protocol import Fetch
    server_store = BlobStore(tmp_path / "srv")
    blob = os.urandom(300_000)
    sha = server_store.put_bytes(blob)
    listener = MqttLink("listener", broker.host, broker.port, [(TOPICS.all_devices("fetch"), 1)]).start()
    device = _device_link(broker)
    got: list = []
    fetching = threading.Thread(target=lambda: got.append(fetch_blob(device, TOPICS, "pi-01",
                                                                      BlobStore(tmp_path / "dev"), sha,
                                                                      timeout_s=600, stall_s=600)), daemon=True)
    server = None
    try:
        fetching.start()
        first = listener.get(timeout_s=30)          # the first ask, which nobody serves
        assert first is not None and Fetch.decode(first.payload).sha256 == sha
        server = Server(broker, server_store)        # serves from now on
        connects = device.connects
        device._client.socket().shutdown(socket.SHUT_RDWR)     # the network drops; paho reconnects
        fetching.join(timeout=60)
        assert device.connects > connects, "the device did not reconnect"
        assert got and got[0].read_bytes() == blob, "the device did not ask again after reconnecting"
        assert server.requests and server.requests[0].sha256 == sha
    finally:
        if server is not None:
            server.close()
        device.stop()
        listener.stop()
