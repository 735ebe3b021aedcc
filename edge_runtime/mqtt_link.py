"""One MQTT 5 connection, set up the way this product needs it, shared by the agent and the coordinator.

paho-mqtt 2.x defaults are the old ones, so everything is explicit here: callback API v2
and MQTT 5; a persistent session (clean_start=False with a session expiry) so that QoS 1
messages queued while a process was away are delivered when it returns; connect_async
with re-subscription in on_connect, so a broker restart is survived; callbacks that only
hand messages to a queue (never block paho's network thread); a bounded outgoing queue;
manual acknowledgement, so a receiver can acknowledge a message only once it has stored
what the message carried; and the broker's announced maximum packet size, which paho
does not enforce, for sizing chunks.
"""
from __future__ import annotations

import logging
import queue
import threading
from dataclasses import dataclass
from urllib.parse import urlsplit

import paho.mqtt.client as mqtt
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

log = logging.getLogger(__name__)

SESSION_EXPIRY_S = 7 * 24 * 3600
MAX_QUEUED_OUTGOING = 2000
DEFAULT_MQTT_PORT = 1883


def parse_broker_url(url: str) -> tuple[str, int]:
    """(host, port) from `mqtt://host:port`, `host:port` or `host` (port 1883)."""
    text = (url or "").strip()
    if not text:
        raise ValueError("empty broker address: expected mqtt://host:port, host:port or host")
    if "://" in text:
        scheme = text.split("://", 1)[0].lower()
        if scheme != "mqtt":
            raise ValueError(f"unsupported broker address {url!r}: scheme {scheme!r} is not supported, "
                             "expected mqtt://host:port")
    else:
        text = "mqtt://" + text
    parts = urlsplit(text)
    if parts.path not in ("", "/") or parts.query or parts.fragment or parts.username or parts.password:
        raise ValueError(f"invalid broker address {url!r}: expected only mqtt://host:port")
    try:
        port = parts.port
    except ValueError:
        raise ValueError(f"invalid broker address {url!r}: the port must be a number from 1 to 65535") from None
    if not parts.hostname:
        raise ValueError(f"invalid broker address {url!r}: no host name")
    if port == 0:
        raise ValueError(f"invalid broker address {url!r}: the port must be a number from 1 to 65535")
    return parts.hostname, port if port is not None else DEFAULT_MQTT_PORT


@dataclass(frozen=True)
class Received:
    topic: str
    payload: bytes
    user_properties: list
    mid: int
    qos: int


class MqttLink:
    """A connected client whose incoming messages wait in `self.inbox` until a worker takes them."""

    def __init__(self, client_id: str, host: str, port: int, subscriptions: list[tuple[str, int]],
                 will: tuple[str, bytes] | None = None, manual_ack: bool = False,
                 session_expiry_s: int = SESSION_EXPIRY_S, keepalive_s: int = 30):
        self.client_id, self.host, self.port = client_id, host, port
        self.subscriptions = list(subscriptions)
        self.manual_ack = manual_ack
        self.inbox: "queue.Queue[Received]" = queue.Queue()
        self.connected = threading.Event()
        self.max_packet_bytes: int | None = None
        self.connects = 0
        self._keepalive = keepalive_s
        self._session_expiry_s = session_expiry_s
        self._client = mqtt.Client(callback_api_version=mqtt.CallbackAPIVersion.VERSION2, client_id=client_id,
                                   protocol=mqtt.MQTTv5, manual_ack=manual_ack)
        self._client.max_queued_messages_set(MAX_QUEUED_OUTGOING)
        self._client.reconnect_delay_set(min_delay=1, max_delay=10)
        if will:
            self._client.will_set(will[0], will[1], qos=1, retain=True)
        self._client.on_connect = self._on_connect
        self._client.on_disconnect = self._on_disconnect
        self._client.on_message = self._on_message

    # -- paho callbacks: record and hand over, never block ---------------------------------
    def _on_connect(self, client, userdata, flags, reason_code, properties):
        if reason_code.is_failure:
            log.warning("%s: broker refused the connection: %s", self.client_id, reason_code)
            return
        self.connects += 1
        announced = getattr(properties, "MaximumPacketSize", None) if properties else None
        self.max_packet_bytes = int(announced) if announced else None
        if self.subscriptions:
            client.subscribe([(t, mqtt.SubscribeOptions(qos=q)) for t, q in self.subscriptions])
        self.connected.set()
        log.info("%s: connected to %s:%s (session present: %s)", self.client_id, self.host, self.port,
                 flags.session_present)

    def _on_disconnect(self, client, userdata, flags, reason_code, properties):
        self.connected.clear()
        log.info("%s: disconnected (%s); paho reconnects", self.client_id, reason_code)

    def _on_message(self, client, userdata, message):
        props = getattr(message.properties, "UserProperty", None) or []
        self.inbox.put(Received(message.topic, bytes(message.payload), list(props), message.mid, message.qos))

    # -- use ----------------------------------------------------------------------------
    def start(self, timeout_s: float = 10.0) -> "MqttLink":
        props = Properties(PacketTypes.CONNECT)
        props.SessionExpiryInterval = self._session_expiry_s
        self._client.connect_async(self.host, self.port, keepalive=self._keepalive, clean_start=False,
                                   properties=props)
        self._client.loop_start()
        if not self.connected.wait(timeout_s):
            self.stop()
            raise ConnectionError(f"{self.client_id}: no connection to the broker at {self.host}:{self.port} "
                                  f"within {timeout_s:.0f} s")
        return self

    def publish(self, topic: str, payload: bytes, qos: int = 1, retain: bool = False,
                user_properties: list[tuple[str, str]] | None = None, wait_s: float | None = None):
        props = None
        if user_properties:
            props = Properties(PacketTypes.PUBLISH)
            props.UserProperty = user_properties
        info = self._client.publish(topic, payload, qos=qos, retain=retain, properties=props)
        if info.rc == mqtt.MQTT_ERR_QUEUE_SIZE:
            raise BufferError(f"{self.client_id}: outgoing queue full ({MAX_QUEUED_OUTGOING} messages)")
        if wait_s is not None:
            info.wait_for_publish(wait_s)
        return info

    def ack(self, msg: Received) -> None:
        """Acknowledge a QoS 1 message once what it carried is safely stored (manual_ack links only)."""
        if self.manual_ack and msg.qos > 0:
            self._client.ack(msg.mid, msg.qos)

    def get(self, timeout_s: float | None = None) -> Received | None:
        try:
            return self.inbox.get(timeout=timeout_s)
        except queue.Empty:
            return None

    def stop(self, final: tuple[str, bytes] | None = None) -> None:
        """Disconnect cleanly; `final` (topic, payload) is published retained first (e.g. offline status)."""
        try:
            if final and self.connected.is_set():
                self.publish(final[0], final[1], retain=True, wait_s=2.0)
            self._client.disconnect()
        finally:
            self._client.loop_stop()
