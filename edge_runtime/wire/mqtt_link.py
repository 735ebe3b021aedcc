"""One MQTT 5 connection, set up the way this product needs it, shared by the agent and the coordinator.

paho-mqtt 2.x defaults are the old ones, so everything is explicit here: callback API v2
and MQTT 5; a persistent session (clean_start=False with a session expiry) so that QoS 1
messages queued while a process was away are delivered when it returns; connect_async
with re-subscription in on_connect, so a broker restart is survived; callbacks that only
hand messages to a queue (never block paho's network thread); a bounded outgoing queue;
manual acknowledgement, so a receiver can acknowledge a message only once it has stored
what the message carried, with an MQTT 5 Receive Maximum asking the broker to send a busy
receiver no more than that unacknowledged (Mosquitto 2.0.11 honours it only until the
first acknowledgement, so the coordinator also pulls uploads: docs/protocol.md); and the
broker's announced maximum packet size, which paho does not enforce, for sizing chunks.

A production broker asks for more (docs/broker.md, "Production broker"): a user name and
password, and TLS (`mqtts://`, port 8883) that verifies the broker's certificate against
a given CA. `LinkSecurity` carries both; `security_from_settings` builds it from the
settings the agent and the coordinator share and checks every file before anything
connects. A refused login or an untrusted certificate ends `start()` at once with
`BrokerRefused`, in words: retrying cannot fix either.
"""
from __future__ import annotations

import ipaddress
import logging
import os
import queue
import socket
import ssl
import stat
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlsplit

import paho.mqtt.client as mqtt
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from edge_runtime.errors import EdgeRuntimeError
from edge_runtime.logs import printable

log = logging.getLogger(__name__)

SESSION_EXPIRY_S = 7 * 24 * 3600
MAX_QUEUED_OUTGOING = 2000
# What waits in the inbox at most: a flood of messages (oversize ones first) is dropped, counted and
# acknowledged, instead of growing the process until the board or the coordinator runs out of memory.
MAX_INBOX_BYTES = 64 << 20
# A manual-ack link's unacknowledged QoS 1 messages (MQTT 5 Receive Maximum): a broker that honours it sends no
# more until the receiver acknowledges one, so a receiver slower than a burst holds at most this many chunks
# (32 x 124 KB). Mosquitto 2.0.11 sends past it once acknowledgements flow (measured: each ack let 32 more
# through), so the coordinator does not rely on it: it grants uploads a few at a time (coordinator/guards.py).
RECEIVE_MAXIMUM = 32
MAX_PAYLOAD_BYTES = 1 << 20        # a chunk is at most 120 KB, a control message 64 KB
PACKET_OVERHEAD_BYTES = 64 << 10   # a packet's topic and properties beside its payload
DEFAULT_MQTT_PORT = 1883
DEFAULT_MQTTS_PORT = 8883
_SCHEMES = {"mqtt": (DEFAULT_MQTT_PORT, False), "mqtts": (DEFAULT_MQTTS_PORT, True)}
# CONNACK reason codes that no retry can change: the login or the client id itself is refused
_REFUSALS = {133: "the client id is not valid", 134: "bad user name or password", 135: "not authorized",
             138: "banned", 140: "bad authentication method"}


class LinkConfigError(ValueError):
    """A security setting that cannot work (a missing CA file, an unreadable password file, ...)."""


class BrokerRefused(EdgeRuntimeError):
    """The broker refused the login, or its certificate is not trusted: retrying cannot help."""


@dataclass(frozen=True)
class BrokerAddress:
    host: str
    port: int
    tls: bool


def parse_broker_address(url: str) -> BrokerAddress:
    """`mqtt://host:port`, `mqtts://host:port` (TLS), `host:port` or `host`; ports default to 1883 / 8883."""
    text = (url or "").strip()
    if not text:
        raise ValueError("empty broker address: expected mqtt://host:port, mqtts://host:port, host:port or host")
    scheme = "mqtt"
    if "://" in text:
        scheme = text.split("://", 1)[0].lower()
        if scheme not in _SCHEMES:
            raise ValueError(f"unsupported broker address {url!r}: scheme {scheme!r} is not supported, "
                             "expected mqtt://host:port or mqtts://host:port (TLS)")
        text = text.split("://", 1)[1]
    parts = urlsplit(f"{scheme}://{text}")
    if parts.path not in ("", "/") or parts.query or parts.fragment or parts.username or parts.password:
        raise ValueError(f"invalid broker address {url!r}: expected only {scheme}://host:port "
                         "(credentials go in username and password_file)")
    try:
        port = parts.port
    except ValueError:
        raise ValueError(f"invalid broker address {url!r}: the port must be a number from 1 to 65535") from None
    if not parts.hostname:
        raise ValueError(f"invalid broker address {url!r}: no host name")
    if port == 0:
        raise ValueError(f"invalid broker address {url!r}: the port must be a number from 1 to 65535")
    default_port, tls = _SCHEMES[scheme]
    return BrokerAddress(parts.hostname, port if port is not None else default_port, tls)


def parse_broker_url(url: str) -> tuple[str, int]:
    """(host, port) of a broker address; see parse_broker_address for the forms and default ports."""
    address = parse_broker_address(url)
    return address.host, address.port


# -- who the link is, and how it trusts the broker ---------------------------------------------

@dataclass(frozen=True)
class LinkSecurity:
    """MQTT user name and password, and TLS: off, or on with a CA (else the system's) and a client cert."""
    username: str = ""
    password: str = field(default="", repr=False)
    tls: bool = False
    ca_file: str = ""
    cert_file: str = ""
    key_file: str = ""

    def ssl_context(self) -> ssl.SSLContext:
        """TLS 1.2 or newer, the broker's certificate and host name checked: never an unverified link."""
        try:
            ctx = ssl.create_default_context(cafile=self.ca_file or None)
        except (OSError, ssl.SSLError) as exc:
            raise LinkConfigError(f"tls_ca {self.ca_file}: not a readable PEM CA certificate ({_why(exc)})") from None
        ctx.minimum_version = ssl.TLSVersion.TLSv1_2
        if self.cert_file:
            try:  # an empty key password: an encrypted key fails here instead of prompting on a terminal
                ctx.load_cert_chain(self.cert_file, self.key_file or None, password=b"")
            except (OSError, ssl.SSLError) as exc:
                raise LinkConfigError(f"tls_cert {self.cert_file} / tls_key {self.key_file or '(in the cert file)'}: "
                                      f"cannot load the client certificate and its unencrypted key "
                                      f"({_why(exc)})") from None
        return ctx


def security_from_settings(settings: dict, broker_url: str) -> LinkSecurity:
    """LinkSecurity from the settings `username`, `password_file`, `tls`, `tls_ca`, `tls_cert`, `tls_key`.

    Checked here, before anything connects, so that a bad one fails at once with its name.
    TLS is on for an `mqtts://` address or with `tls`; TLS files without TLS are an error,
    never silently ignored. An empty `broker_url` means the embedded (plain, loopback) broker.
    """
    address = parse_broker_address(broker_url) if broker_url else None
    tls = bool(settings.get("tls")) or bool(address and address.tls)
    files = {k: str(settings.get(k) or "") for k in ("tls_ca", "tls_cert", "tls_key")}
    if not tls and any(files.values()):
        given = ", ".join(k for k, v in files.items() if v)
        raise LinkConfigError(f"{given} given but TLS is off: use an mqtts://host:8883 broker address or tls = true")
    if tls and address is None:
        raise LinkConfigError("TLS needs a broker address (mqtts://host:8883): the embedded broker has no TLS")
    for key, path in files.items():
        if path and not Path(path).is_file():
            raise LinkConfigError(f"{key} {path}: no such file")
    if files["tls_key"] and not files["tls_cert"]:
        raise LinkConfigError("tls_key given without tls_cert: a client key needs its certificate")
    username = str(settings.get("username") or "")
    password = _read_password(str(settings.get("password_file") or ""), username)
    security = LinkSecurity(username, password, tls, files["tls_ca"], files["tls_cert"], files["tls_key"])
    if tls:
        security.ssl_context()   # a bad PEM or a key that does not match its cert fails now, not at connect
    elif password and address is not None and not is_loopback(address.host):
        log.warning("the password for %s goes to %s:%d unencrypted: use mqtts://", username, address.host,
                    address.port)
    return security


def _read_password(path: str, username: str) -> str:
    """The first line of the password file: a password never appears on a command line or in a config."""
    if not path:
        return ""
    if not username:
        raise LinkConfigError(f"password_file {path} given without a username")
    try:
        text = Path(path).read_text(encoding="utf-8")
        mode = os.stat(path).st_mode
    except (OSError, UnicodeDecodeError) as exc:
        raise LinkConfigError(f"password_file {path} cannot be read ({_why(exc)})") from None
    password = text.splitlines()[0] if text else ""
    if not password:
        raise LinkConfigError(f"password_file {path} is empty: it holds the password on its first line")
    if mode & stat.S_IRWXO:
        log.warning("password_file %s is open to every user (mode %o): chmod 600 or 640 it", path, mode & 0o777)
    return password


def is_loopback(host: str) -> bool:
    """A host name or address of this machine only (127.0.0.0/8, ::1, localhost)."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _why(exc: BaseException) -> str:
    """An OS or TLS error in words: its reason, without errno numbers or the class name."""
    if isinstance(exc, ssl.SSLCertVerificationError):
        return exc.verify_message or str(exc)
    if isinstance(exc, ssl.SSLError):
        return exc.reason or str(exc)
    if isinstance(exc, OSError) and exc.strerror:
        return exc.strerror
    return str(exc) or type(exc).__name__


def _connect_problem(exc: OSError, tls: bool) -> str:
    """What a failed connection attempt means, for the operator reading the log."""
    if isinstance(exc, ssl.SSLCertVerificationError):
        return f"the broker's TLS certificate is not trusted: {_why(exc)} (check tls_ca and the host name)"
    if isinstance(exc, ssl.SSLError) or (tls and isinstance(exc, ConnectionResetError)):
        return f"TLS handshake failed: {_why(exc)} (is the port a TLS listener? does it allow TLS 1.2+?)"
    if isinstance(exc, socket.gaierror):
        return f"the host name does not resolve ({_why(exc)})"
    if isinstance(exc, ConnectionRefusedError):
        return "connection refused: nothing listens on that port"
    return _why(exc)


class _Client(mqtt.Client):
    """paho's client, keeping why the last connection attempt failed (paho only says that it did)."""
    last_error: OSError | None = None

    def reconnect(self):
        try:
            return super().reconnect()
        except OSError as exc:
            self.last_error = exc
            raise


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
                 session_expiry_s: int = SESSION_EXPIRY_S, keepalive_s: int = 30,
                 security: LinkSecurity | None = None, max_inbox_bytes: int = MAX_INBOX_BYTES,
                 max_payload_bytes: int = MAX_PAYLOAD_BYTES):
        self.client_id, self.host, self.port = client_id, host, port
        self.security = security or LinkSecurity()
        self.subscriptions = list(subscriptions)
        self.manual_ack = manual_ack
        self.inbox: "queue.Queue[Received]" = queue.Queue()
        self.max_inbox_bytes, self.max_payload_bytes = max_inbox_bytes, max_payload_bytes
        self.inbox_bytes = 0
        self.dropped = 0             # messages dropped: oversize, or the inbox was full
        self._inbox_lock = threading.Lock()
        self.connected = threading.Event()
        self.max_packet_bytes: int | None = None
        self.connects = 0
        self.refused = None          # the CONNACK reason code of the last refused login
        self._unanswered = 0         # connections the broker closed before it answered CONNECT
        self._keepalive = keepalive_s
        self._session_expiry_s = session_expiry_s
        self._client = _Client(callback_api_version=mqtt.CallbackAPIVersion.VERSION2, client_id=client_id,
                               protocol=mqtt.MQTTv5, manual_ack=manual_ack)
        self._secure(self.security)
        self._client.max_queued_messages_set(MAX_QUEUED_OUTGOING)
        self._client.reconnect_delay_set(min_delay=1, max_delay=10)
        if will:
            self._client.will_set(will[0], will[1], qos=1, retain=True)
        self._client.on_connect = self._on_connect
        self._client.on_disconnect = self._on_disconnect
        self._client.on_message = self._on_message

    def _secure(self, security: LinkSecurity) -> None:
        if security.username:
            self._client.username_pw_set(security.username, security.password or None)
        if security.tls:
            self._client.tls_set_context(security.ssl_context())

    # -- paho callbacks: record and hand over, never block ---------------------------------
    def _on_connect(self, client, userdata, flags, reason_code, properties):
        if reason_code.is_failure:
            self.refused = reason_code
            log.warning("%s: %s", self.client_id, self._refusal_text(reason_code))
            return
        self.refused = None
        client.last_error = None
        self.connects += 1
        announced = getattr(properties, "MaximumPacketSize", None) if properties else None
        self.max_packet_bytes = int(announced) if announced else None
        if self.subscriptions:
            client.subscribe([(t, mqtt.SubscribeOptions(qos=q)) for t, q in self.subscriptions])
        self.connected.set()
        log.info("%s: connected to %s:%s (session present: %s)", self.client_id, self.host, self.port,
                 flags.session_present)

    def _on_disconnect(self, client, userdata, flags, reason_code, properties):
        if not self.connected.is_set() and self.refused is None:
            self._unanswered += 1
        self.connected.clear()
        log.info("%s: disconnected (%s); paho reconnects", self.client_id, reason_code)

    def _on_message(self, client, userdata, message):
        size = len(message.payload)
        with self._inbox_lock:
            # a manual-ack link's QoS 1 messages never get here past its Receive Maximum (4 MB of chunks): the bound
            # is for QoS 0 floods, and for a broker that does not honour it
            room = size <= self.max_payload_bytes and self.inbox_bytes + size <= self.max_inbox_bytes
            if room:
                self.inbox_bytes += size
            else:
                self.dropped += 1
        if not room:
            if self.manual_ack and message.qos > 0:   # else the broker keeps it in flight and stops delivering
                client.ack(message.mid, message.qos)
            if self.dropped == 1 or self.dropped % 1000 == 0:
                log.warning("%s: dropped %d message(s) so far (one of %d bytes on %s): oversize or inbox full",
                            self.client_id, self.dropped, size, printable(message.topic, 120))
            return
        props = getattr(message.properties, "UserProperty", None) or []
        self.inbox.put(Received(message.topic, bytes(message.payload), list(props), message.mid, message.qos))

    # -- use ----------------------------------------------------------------------------
    def start(self, timeout_s: float = 10.0) -> "MqttLink":
        props = Properties(PacketTypes.CONNECT)
        props.SessionExpiryInterval = self._session_expiry_s
        # the broker never sends a packet larger than this (MQTT 5): an oversize payload the link would drop
        # is not read into memory first (paho holds a packet whole, in copies, before on_message sees it)
        props.MaximumPacketSize = self.max_payload_bytes + PACKET_OVERHEAD_BYTES
        if self.manual_ack:
            props.ReceiveMaximum = RECEIVE_MAXIMUM
        self._client.connect_async(self.host, self.port, keepalive=self._keepalive, clean_start=False,
                                   properties=props)
        self._client.loop_start()
        deadline = time.monotonic() + timeout_s
        while not self.connected.wait(min(0.1, max(0.0, deadline - time.monotonic()))):
            hopeless = self._hopeless()
            if hopeless:
                self.stop()
                raise BrokerRefused(f"{self.client_id}: {hopeless}")
            if time.monotonic() >= deadline:
                self.stop()
                raise ConnectionError(f"{self.client_id}: no connection to the broker at {self.host}:{self.port} "
                                      f"within {timeout_s:.0f} s{self._last_problem()}")
        return self

    def _refusal_text(self, reason_code) -> str:
        who = f"user {self.security.username!r}" if self.security.username else "an anonymous client"
        if reason_code.value in _REFUSALS:
            return f"the broker at {self.host}:{self.port} refused the login of {who}: {_REFUSALS[reason_code.value]}"
        return f"the broker at {self.host}:{self.port} turned {who} away for now: {reason_code}"

    def _hopeless(self) -> str | None:
        """Why retrying cannot help (a refused login, an untrusted certificate), else None."""
        if self.refused is not None and self.refused.value in _REFUSALS:
            hint = " (check username and password_file against the broker's password file and ACL)" \
                if self.security.username else " (the broker needs a username and password_file)"
            return self._refusal_text(self.refused) + hint
        error = self._client.last_error
        if isinstance(error, ssl.SSLCertVerificationError):
            return f"broker {self.host}:{self.port}: {_connect_problem(error, True)}"
        return None

    def _last_problem(self) -> str:
        """Why the attempts so far failed, as a suffix for the timeout's message."""
        if self.refused is not None:
            return f": {self._refusal_text(self.refused)}"
        if self._client.last_error is not None:
            return f": {_connect_problem(self._client.last_error, self.security.tls)}"
        if self._unanswered:
            hint = "" if self.security.tls else " (a TLS listener does that to a plain client: use mqtts://)"
            return f": the broker closed the connection before answering{hint}"
        return ""

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

    def publish_when_room(self, topic: str, payload: bytes, qos: int = 1, timeout_s: float = 30.0,
                          stop: threading.Event | None = None):
        """publish, waiting (up to timeout_s) while paho's outgoing queue is full: a burst of a round's
        tasks drains at the broker's pace instead of failing."""
        deadline = time.monotonic() + timeout_s
        while True:
            try:
                return self.publish(topic, payload, qos=qos)
            except BufferError:
                if time.monotonic() >= deadline or (stop is not None and stop.is_set()):
                    raise
                time.sleep(0.05)

    def get(self, timeout_s: float | None = None) -> Received | None:
        try:
            msg = self.inbox.get(timeout=timeout_s)
        except queue.Empty:
            return None
        with self._inbox_lock:
            self.inbox_bytes -= len(msg.payload)
        return msg

    def stop(self, final: tuple[str, bytes] | None = None) -> None:
        """Disconnect cleanly; `final` (topic, payload) is published retained first (e.g. offline status)."""
        try:
            if final and self.connected.is_set():
                self.publish(final[0], final[1], retain=True, wait_s=2.0)
            self._client.disconnect()
        except (OSError, RuntimeError, ValueError) as exc:   # not connected, queue full: going away either way
            log.debug("%s: disconnect: %s", self.client_id, exc)
        finally:
            try:
                self._client.loop_stop()
            except AttributeError:
                # paho's loop_stop reads its thread twice, and the network thread can clear it in between when it
                # ends on its own (the disconnect above): the thread is gone, which is what was asked
                log.debug("%s: the network thread ended during loop_stop", self.client_id)
