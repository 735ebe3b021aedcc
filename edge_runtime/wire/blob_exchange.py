"""Moving blobs over MQTT: the coordinator serves chunks on request, a device fetches what it lacks.

The device asks (Fetch) for a blob, or for only the chunks its partial copy still misses
after a disconnect or a restart; the server publishes those chunks at QoS 1 in windows,
so its memory stays at one window whatever the blob's size; the device feeds them into
its BlobStore and asks again for whatever is still missing when progress stalls.
"""
from __future__ import annotations

import logging
import time
from pathlib import Path

from edge_runtime.errors import EdgeRuntimeError, IntegrityError
from edge_runtime.wire.mqtt_link import MqttLink, Received
from edge_runtime.wire.protocol import Fetch, ProtocolError, Topics
from edge_runtime.wire.transfer import BlobStore, ChunkHeader, chunk_bytes_for, chunks_of

log = logging.getLogger(__name__)
WINDOW_CHUNKS = 32
STALL_MAX_S = 60.0      # the longest a device waits before asking again for a blob's missing chunks
RECONNECT_CHECK_S = 2.0  # how often a waiting device checks for a new connection (it then asks at once)


def send_blob(link: MqttLink, topic: str, store: BlobStore, sha: str, chunk_bytes: int | None = None,
              indices=None, ack_timeout_s: float = 60.0) -> int:
    """Publish a stored blob's chunks (all, or `indices`) to `topic`; return how many were sent."""
    if not store.has(sha):
        raise EdgeRuntimeError(f"blob {sha[:12]}… is not in the store")
    chunk_bytes = chunk_bytes or chunk_bytes_for(link.max_packet_bytes)
    pending, sent = [], 0
    for header, data in chunks_of(store.path(sha), chunk_bytes, indices):
        pending.append(link.publish(topic, data, qos=1, user_properties=header.to_properties()))
        sent += 1
        if len(pending) >= WINDOW_CHUNKS:  # bound what paho holds in memory
            for info in pending:
                info.wait_for_publish(ack_timeout_s)
            pending.clear()
    for info in pending:
        info.wait_for_publish(ack_timeout_s)
    return sent


def serve_fetch(link: MqttLink, topics: Topics, store: BlobStore, msg: Received) -> int:
    """Answer one Fetch message from a device; unknown blobs and bad requests are logged and refused."""
    device_id, kind = topics.parse_device_topic(msg.topic)
    if kind != "fetch":
        raise ProtocolError(f"serve_fetch got a {kind} message")
    fetch = Fetch.decode(msg.payload)
    if not store.has(fetch.sha256):
        log.warning("device %s asked for unknown blob %s…", device_id, fetch.sha256[:12])
        return 0
    return send_blob(link, topics.device(device_id, "blob"), store, fetch.sha256, indices=fetch.chunks)


def receive_chunk(store: BlobStore, msg: Received) -> str | None:
    """Store one chunk message; the blob's hash once it is complete, else None."""
    header = ChunkHeader.from_properties(msg.user_properties)
    return header.blob if store.receive(header, msg.payload) else None


def fetch_blob(link: MqttLink, topics: Topics, device_id: str, store: BlobStore, sha: str,
               timeout_s: float = 300.0, stall_s: float = 5.0, deferred: list | None = None) -> Path:
    """Device side: get a blob into the store, asking only for the chunks it still lacks.

    Gives up when no chunk has arrived for `timeout_s` (a slow but steady transfer goes on). A
    request unanswered for `stall_s` is sent again, then after twice as long, up to STALL_MAX_S:
    when a thousand devices ask at once, the coordinator answers them in turn, and re-asks at a
    fixed beat would only lengthen its queue; a device that reconnected meanwhile asks at once (what
    the broker held for it may be gone, and its wait may have grown to a minute). Messages on other
    topics that arrive meanwhile are appended to `deferred` for the caller. A corrupted chunk is
    dropped and asked for again.
    """
    if store.has(sha):
        return store.path(sha)
    blob_topic = topics.device(device_id, "blob")

    def ask():
        missing = store.missing_chunks(sha)
        link.publish(topics.device(device_id, "fetch"), Fetch(sha, missing).encode(), qos=1)

    ask()
    last_progress = last_ask = time.monotonic()
    wait_s, connects = stall_s, link.connects
    while (now := time.monotonic()) - last_progress < timeout_s:
        msg = link.get(timeout_s=max(0.05, min(wait_s - (now - last_ask), timeout_s - (now - last_progress),
                                               RECONNECT_CHECK_S)))
        if msg is None:
            if link.connects != connects:     # chunks sent while it was away may be lost: ask now, not after a wait
                connects, wait_s = link.connects, stall_s
                last_ask = now - wait_s
            if time.monotonic() - last_ask >= wait_s:
                ask()
                last_ask = time.monotonic()
                wait_s = min(2 * wait_s, STALL_MAX_S)
            continue
        if msg.topic != blob_topic:
            if deferred is not None:
                deferred.append(msg)
            continue
        try:
            done = receive_chunk(store, msg)
        except (ProtocolError, IntegrityError) as exc:
            log.warning("dropped a chunk: %s", exc)
            continue
        last_progress = last_ask = time.monotonic()
        wait_s = stall_s
        if done == sha:
            return store.path(sha)
    missing = store.missing_chunks(sha)
    raise EdgeRuntimeError(f"blob {sha[:12]}… stalled: no chunk for {timeout_s:.0f} s "
                           f"({len(missing) if missing is not None else 'all'} chunks missing)")
