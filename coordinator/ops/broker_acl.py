"""The Mosquitto ACL of a fleet: the coordinator reads and writes the fleet's tree, a device only its own.

A device's MQTT user name is its id. The rights follow the protocol
(edge_runtime/wire/protocol.py) and what the agent does with it (edge_runtime/device/agent.py): a
device writes hello, status (also its last will), fetch, upload and update on its own
topics; it reads task, blob and ack on its own topics, and the coordinator's status,
nothing else. Its own topics are Mosquitto `pattern` lines with `%u`, which hold for every
user of the password file; the coordinator's status is one topic for all, which a pattern
cannot say without `%u` (Mosquitto warns about such a pattern), so each listed device has
a `user` block for it. A user of the password file that is not listed can therefore still
act as a device by its own name, but never hears the coordinator. Anonymous clients get
nothing: no topic line comes before the first `user` line.

    edge-coordinator acl --fleet lab --devices ids.txt --out /etc/mosquitto/edgeblock.acl
"""
from __future__ import annotations

from pathlib import Path

from edge_runtime.wire.protocol import ProtocolError, Topics, check_id

DEVICE_WRITES = ("hello", "status", "fetch", "upload", "update")
DEVICE_READS = ("task", "blob", "ack")
DEFAULT_COORDINATOR_USER = "coordinator"


class AclError(ValueError):
    """A fleet, device id or user name that cannot go into the ACL; the message says which."""


def read_device_ids(path: Path) -> list[str]:
    """Device ids from a file, one a line; blank lines and `#` comments are skipped."""
    try:
        lines = Path(path).read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as exc:
        raise AclError(f"devices file {path} cannot be read ({getattr(exc, 'strerror', None) or exc})") from None
    return [line.strip() for line in lines if line.strip() and not line.strip().startswith("#")]


def fleet_acl(fleet: str, devices: list[str], coordinator_user: str = DEFAULT_COORDINATOR_USER) -> str:
    """The ACL file's text for one fleet and its devices (at least one)."""
    try:
        topics = Topics(fleet)
        check_id(coordinator_user, "coordinator user")
        ids = [check_id(d, "device id") for d in devices]
    except ProtocolError as exc:
        raise AclError(str(exc)) from None
    if coordinator_user in ids:
        raise AclError(f"device id {coordinator_user!r} is the coordinator's user name: it would get the "
                       f"coordinator's rights; rename the device or pass another coordinator user")
    duplicates = sorted({d for d in ids if ids.count(d) > 1})
    if duplicates:
        raise AclError(f"device ids listed twice: {', '.join(duplicates)}")
    if not ids:
        raise AclError("no device ids: list the fleet's devices, one id a line")
    lines = _header(topics) + _coordinator_lines(topics, coordinator_user) + _pattern_lines(topics) \
        + [line for d in ids for line in _device_lines(topics, d)]
    return "\n".join(lines).rstrip("\n") + "\n"


def write_fleet_acl(out: Path, fleet: str, devices: list[str],
                    coordinator_user: str = DEFAULT_COORDINATOR_USER) -> Path:
    """Write the ACL atomically: Mosquitto may re-read it (SIGHUP) at any moment."""
    text = fleet_acl(fleet, devices, coordinator_user)
    out = Path(out)
    tmp = out.with_name(out.name + ".tmp")
    tmp.write_text(text, encoding="utf-8")
    tmp.replace(out)
    return out


def _header(topics: Topics) -> list[str]:
    return [f"# Mosquitto ACL for fleet {topics.fleet!r} ({topics.root}/), written by `edge-coordinator acl`.",
            "# Regenerate it rather than edit it. Anonymous clients: no access (no topic line before a user line).",
            ""]


def _coordinator_lines(topics: Topics, user: str) -> list[str]:
    return [f"user {user}", f"topic readwrite {topics.root}/#", ""]


def _pattern_lines(topics: Topics) -> list[str]:
    """%u is the connecting user, so each device reaches only its own topics."""
    own = f"{topics.root}/device/%u"
    return (["# Every device, by its user name (= its device id): its own topics."]
            + [f"pattern write {own}/{kind}" for kind in DEVICE_WRITES]
            + [f"pattern read {own}/{kind}" for kind in DEVICE_READS] + [""])


def _device_lines(topics: Topics, device_id: str) -> list[str]:
    """What a pattern cannot give: the coordinator's status, one topic for every device."""
    return [f"user {device_id}", f"topic read {topics.coordinator_status}", ""]
