"""A site's Mosquitto bridged to the core broker: the config drop-in `edge-coordinator bridge` writes.

For a fleet spread over many sites, each site runs a Mosquitto on a gateway; its devices
log in there, and the gateway's Mosquitto carries their topics to the coordinator's (core)
broker over one connection of its own (Mosquitto's bridge). The drop-in names each of the
site's devices: their writes go out, their reads and the coordinator's status come in
(broker_acl.bridged_topics, the same list the core's ACL grants the bridge user), all at
QoS 1, nothing both ways. docs/broker.md, "Sites", shows a generated file and explains
each line.

    edge-coordinator bridge --fleet lab --site north --core mqtts://broker.lan:8883 \
        --devices north.txt --password-file secrets/passwords/bridge-north \
        --tls-ca /etc/mosquitto/certs/core-ca.crt --out edgeblock-bridge-lab.conf
"""
from __future__ import annotations

import argparse
import os
import re
import sys
from collections.abc import Sequence
from pathlib import Path

from coordinator.ops.broker_acl import AclError, bridge_user, bridged_topics, site_state_topic
from edge_runtime.wire.mqtt_link import LinkConfigError, parse_broker_address, security_from_settings
from edge_runtime.wire.protocol import ProtocolError, Topics, check_id

SYSTEM_CA_DIR = "/etc/ssl/certs"     # bridge_capath when no CA is named: the gateway's own trusted CAs
QOS = 1
_CONFIG_SAFE = re.compile(r"[\x21-\x7e]+")   # printable ASCII, no spaces: what a mosquitto.conf value holds


HELP = """Write the Mosquitto bridge of one site: a drop-in for the site gateway's /etc/mosquitto/conf.d that
connects the site's broker to the core broker (the coordinator's) and carries this fleet's topics of the
site's devices, and nothing else: what they write goes out (hello, status, fetch, upload, update), what
they read comes in (task, blob, ack, and the coordinator's retained status); QoS 1, MQTT 5, no topic both
ways. The devices log in to the site's broker only; only the bridge logs in to the core, as bridge-SITE.

Steps (docs/broker.md, "Sites"):
  1. the bridge's password on the core, and the core's ACL naming the site (on the admin machine):
       deploy/mosquitto/make-secrets.sh users ~/edgeblock-secrets bridge-north
       edge-coordinator acl --fleet lab --devices ids.txt --site north=north.txt --out edgeblock.acl
     then install edgeblock.passwd and edgeblock.acl on the core and `systemctl reload mosquitto` there.
  2. this drop-in:
       edge-coordinator bridge --fleet lab --site north --core mqtts://broker.lan --devices north.txt \\
           --password-file ~/edgeblock-secrets/passwords/bridge-north \\
           --tls-ca /etc/mosquitto/certs/core-ca.crt --out edgeblock-bridge-lab.conf
  3. on the gateway: its own broker as any edgeblock broker (deploy/mosquitto/edgeblock.conf, a server
     certificate, the site devices' passwords, `edge-coordinator acl --fleet lab --devices north.txt`),
     the core's CA as /etc/mosquitto/certs/core-ca.crt, and the bridge:
       install -m 640 -g mosquitto edgeblock-bridge-lab.conf /etc/mosquitto/conf.d/
       systemctl restart mosquitto       # bridges are read at start only
  4. the site's devices: --broker mqtts://GATEWAY, each with its password on the site's broker.

The core's ACL lets bridge-north write and read exactly the topics this file bridges; a device added to
the site needs both files written again (and the gateway's broker restarted)."""


class BridgeError(ValueError):
    """A site, address, device list, password or file that cannot make a working bridge; the message says which."""


def site_bridge_config(fleet: str, site: str, core: str, devices: Sequence[str], password: str,
                       tls: bool = False, tls_ca: str = "", tls_cert: str = "", tls_key: str = "") -> str:
    """The site's drop-in: one bridge connection to `core` carrying `devices`' topics of `fleet`.

    `core` is an address as the clients take it (mqtts://host:port turns TLS on). The TLS files are
    paths on the gateway, written as given (they need not exist where this runs)."""
    try:
        topics = Topics(fleet)
        ids = [check_id(d, f"device id of site {site}") for d in devices]
        address = parse_broker_address(core)
    except (ProtocolError, ValueError) as exc:
        raise BridgeError(str(exc)) from None
    try:
        user = bridge_user(site)
    except AclError as exc:
        raise BridgeError(str(exc)) from None
    if not ids:
        raise BridgeError(f"site {site!r} has no device ids: list the devices that log in to its broker")
    duplicates = sorted({d for d in ids if ids.count(d) > 1})
    if duplicates:
        raise BridgeError(f"device ids listed twice: {', '.join(duplicates)}")
    if not _CONFIG_SAFE.fullmatch(password or ""):
        raise BridgeError("the bridge's password must be printable ASCII without spaces (mosquitto.conf holds it "
                          "on one line): make one with `make-secrets.sh users DIR " + user + "`")
    tls = tls or address.tls
    lines = _connection_lines(topics, site, user, address.host, address.port, password)
    lines += _tls_lines(tls, tls_ca, tls_cert, tls_key)
    out, into = bridged_topics(topics, ids)
    lines += ["", f"# {len(ids)} device(s) -> coordinator: what they write goes out (QoS {QOS}).",
              *(f"topic {t} out {QOS}" for t in out),
              "", f"# coordinator -> devices: their tasks, blob chunks and acks, and the coordinator's retained "
                  f"status, come in (QoS {QOS}).",
              *(f"topic {t} in {QOS}" for t in into)]
    return "\n".join(_header(topics, site) + lines) + "\n"


def write_site_bridge(out: Path, text: str) -> Path:
    """Write the drop-in atomically, never readable by every user: it holds the bridge's password."""
    out = Path(out)
    tmp = out.with_name(out.name + ".tmp")
    tmp.unlink(missing_ok=True)
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o640)
    with os.fdopen(fd, "w", encoding="utf-8") as f:
        f.write(text)
    tmp.replace(out)
    return out


def bridge_password(password_file: str, site: str, core: str) -> str:
    """The bridge user's password from its file (first line), read as every client reads one."""
    try:
        return security_from_settings({"username": bridge_user(site), "password_file": password_file},
                                       core).password
    except (LinkConfigError, AclError, ValueError) as exc:
        raise BridgeError(str(exc)) from None


def _header(topics: Topics, site: str) -> list[str]:
    return [f"# The bridge of site {site!r} to the core broker of fleet {topics.fleet!r} ({topics.root}/), written",
            "# by `edge-coordinator bridge`; regenerate it rather than edit it (docs/broker.md, \"Sites\").",
            f"# Install it on the site's gateway as /etc/mosquitto/conf.d/edgeblock-bridge-{topics.fleet}.conf,",
            "# mode 640, group mosquitto: it holds the bridge's password. Mosquitto reads bridges only when it",
            "# starts: restart it (a reload is not enough).", ""]


def _connection_lines(topics: Topics, site: str, user: str, host: str, port: int, password: str) -> list[str]:
    return [
        f"connection edgeblock-{topics.fleet}-{site}",
        f"address {host}:{port}",
        "# MQTT 5: user properties (a blob chunk's header) cross the bridge; its subscriptions on the core are",
        "# No Local and Retain As Published (nothing echoes back, the retained status stays retained); it",
        "# learns the core's maximum packet size (a larger message is dropped here, never sent). try_private",
        "# marks a bridge in MQTT 3 only: off, so any MQTT 5 broker takes the connection as a client's.",
        "bridge_protocol_version mqttv50",
        "try_private false",
        f"remote_clientid {user}",
        f"remote_username {user}",
        f"remote_password {password}",
        "# What the devices send while the core is out of reach waits here and goes when the bridge is back.",
        "# (Not the other way: Mosquitto 2.0 gives an MQTT 5 bridge no session expiry, so the core keeps",
        "# nothing for it meanwhile; docs/broker.md, \"Sites\".)",
        "cleansession false",
        "# The bridge subscribes on the core only to what comes in: nothing to unsubscribe at each connect.",
        "bridge_attempt_unsubscribe false",
        "# \"1\" while connected; \"0\" when not (on the core, the bridge's will). Retained on both brokers.",
        "notifications true",
        f"notification_topic {site_state_topic(topics, site)}",
    ]


def _tls_lines(tls: bool, ca: str, cert: str, key: str) -> list[str]:
    files = {"--tls-ca": ca, "--tls-cert": cert, "--tls-key": key}
    given = [flag for flag, path in files.items() if path]
    if not tls:
        if given:
            raise BridgeError(f"{', '.join(given)} given but TLS is off: use an mqtts://host:8883 core address or "
                              f"--tls")
        return ["# No TLS: the password crosses the network in the clear. Use mqtts:// unless the link is private."]
    for flag in given:
        path = files[flag]
        if not Path(path).is_absolute() or not _CONFIG_SAFE.fullmatch(path):
            raise BridgeError(f"{flag} {path!r}: give the absolute path of the file on the gateway, without spaces")
    if bool(cert) != bool(key):
        raise BridgeError("--tls-cert and --tls-key go together: a client certificate and its unencrypted key")
    trust = "this CA" if ca else "one of the gateway's own CAs"
    lines = [f"# TLS: the core's certificate must chain to {trust} and name the host above (never bridge_insecure).",
             f"bridge_cafile {ca}" if ca else f"bridge_capath {SYSTEM_CA_DIR}"]
    if cert:
        lines += [f"bridge_certfile {cert}", f"bridge_keyfile {key}"]
    return lines


def cli_write_bridge(args: argparse.Namespace) -> int:
    """`edge-coordinator bridge`: the drop-in written, and what the operator does next; 2 and why on bad input."""
    from coordinator.ops.broker_acl import read_device_ids
    try:
        devices = read_device_ids(args.devices)
        password = bridge_password(args.password_file, args.site, args.core)
        text = site_bridge_config(args.fleet, args.site, args.core, devices, password, args.tls, args.tls_ca,
                                  args.tls_cert, args.tls_key)
        write_site_bridge(args.out, text)
    except (BridgeError, AclError, OSError) as exc:
        print(f"edge-coordinator: {exc}", file=sys.stderr)
        return 2
    user = bridge_user(args.site)
    print(f"wrote the bridge of site {args.site} ({len(devices)} devices) to {args.out} (mode 640: it holds "
          f"{user}'s password)\n"
          f"  on the core: {user} in the password file, and the ACL written with --site {args.site}={args.devices}\n"
          f"  on the gateway: install it in /etc/mosquitto/conf.d/ (group mosquitto) and restart mosquitto")
    return 0
