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

Two more kinds of user (docs/broker.md, "Sites" and "A monitoring user"):

- a site's bridge (`bridge-<site>`, `edge-coordinator bridge`) carries its devices' topics
  between the site's broker and the core: it writes what those devices write and reads
  what they read, plus its own connection state. The site's devices log in to the site's
  broker only, so they get no `user` block here.
- a monitor (`--monitor`) reads the coordinator's status and metrics and the devices' and
  sites' states, and writes nothing.

Both get a `deny` on the device topics of their own name, which the `%u` patterns would
otherwise give them: neither may pose as a device.

    edge-coordinator acl --fleet lab --devices ids.txt --out /etc/mosquitto/edgeblock.acl
"""
from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

from edge_runtime.wire.protocol import ProtocolError, Topics, check_id

DEVICE_WRITES = ("hello", "status", "fetch", "upload", "update")
DEVICE_READS = ("task", "blob", "ack")
DEFAULT_COORDINATOR_USER = "coordinator"
BRIDGE_USER_PREFIX = "bridge-"


class AclError(ValueError):
    """A fleet, device id or user name that cannot go into the ACL; the message says which."""


def read_device_ids(path: Path) -> list[str]:
    """Device ids from a file, one a line; blank lines and `#` comments are skipped."""
    try:
        lines = Path(path).read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as exc:
        raise AclError(f"devices file {path} cannot be read ({getattr(exc, 'strerror', None) or exc})") from None
    return [line.strip() for line in lines if line.strip() and not line.strip().startswith("#")]


def read_sites(specs: Sequence[str]) -> dict[str, list[str]]:
    """`NAME=FILE` arguments (a site and the file of its device ids) as {site: ids}."""
    sites: dict[str, list[str]] = {}
    for spec in specs:
        name, sep, path = spec.partition("=")
        if not sep or not name or not path:
            raise AclError(f"site {spec!r}: give it as NAME=FILE, the site's name and the file of its device ids")
        if name in sites:
            raise AclError(f"site {name!r} given twice")
        sites[name] = read_device_ids(Path(path))
    return sites


def bridge_user(site: str) -> str:
    """The core's user name for a site's bridge: one convention, so the bridge's config and the ACL agree."""
    try:
        return check_id(BRIDGE_USER_PREFIX + check_id(site, "site name"), "bridge user name")
    except ProtocolError as exc:
        raise AclError(str(exc)) from None


def site_state_topic(topics: Topics, site: str) -> str:
    """Where a site's bridge says whether it is connected: retained "1", and "0" (its will) once it is not."""
    return f"{topics.root}/site/{site}/bridge"


def bridged_topics(topics: Topics, devices: Sequence[str]) -> tuple[list[str], list[str]]:
    """(out, in): what a site's bridge carries to the core (its devices' writes) and from it (their reads).

    The protocol's directions, device by device: a site hears nothing of another site's devices,
    and no topic goes both ways, so nothing a bridge forwards can come back to it."""
    out = [topics.device(d, kind) for d in devices for kind in DEVICE_WRITES]
    into = [topics.device(d, kind) for d in devices for kind in DEVICE_READS] + [topics.coordinator_status]
    return out, into


def monitor_reads(topics: Topics) -> list[str]:
    """What an operator's dashboard reads: the coordinator's status and last round's metrics (both retained),
    every device's status and every site's bridge state (retained too)."""
    return [topics.coordinator_status, topics.coordinator_metrics, topics.all_devices("status"),
            site_state_topic(topics, "+")]


def fleet_acl(fleet: str, devices: list[str], coordinator_user: str | Sequence[str] = DEFAULT_COORDINATOR_USER,
              sites: Mapping[str, Sequence[str]] | None = None, monitors: Sequence[str] = ()) -> str:
    """The ACL file's text for one fleet: its devices (at least one), the sites whose bridges carry some
    of them ({site: device ids}, each id also in `devices`) and read-only monitor users. `coordinator_user`
    may name several users: coordinator replicas each log in as their own (a broker that binds the client id
    to the user name would otherwise let them take each other's connection)."""
    sites = dict(sites or {})
    coordinators = [coordinator_user] if isinstance(coordinator_user, str) else list(coordinator_user)
    try:
        topics = Topics(fleet)
        for user in coordinators:
            check_id(user, "coordinator user")
        ids = [check_id(d, "device id") for d in devices]
        site_ids = {site: [check_id(d, f"device id of site {site}") for d in listed]
                    for site, listed in sites.items()}
        monitors = [check_id(m, "monitor user") for m in monitors]
    except ProtocolError as exc:
        raise AclError(str(exc)) from None
    bridges = {site: bridge_user(site) for site in site_ids}
    for user in coordinators:
        if user in ids:
            raise AclError(f"device id {user!r} is the coordinator's user name: it would get the "
                           f"coordinator's rights; rename the device or pass another coordinator user")
    duplicates = sorted({d for d in ids if ids.count(d) > 1})
    if duplicates:
        raise AclError(f"device ids listed twice: {', '.join(duplicates)}")
    if not ids:
        raise AclError("no device ids: list the fleet's devices, one id a line")
    at_sites = _check_sites(site_ids, set(ids))
    _check_distinct([*coordinators, *ids, *bridges.values(), *monitors])
    direct = [d for d in ids if d not in at_sites]
    lines = _header(topics) + [line for user in coordinators for line in _coordinator_lines(topics, user)] \
        + _pattern_lines(topics) \
        + [line for d in direct for line in _device_lines(topics, d)] \
        + [line for site, listed in site_ids.items() for line in _bridge_lines(topics, site, listed)] \
        + [line for m in monitors for line in _monitor_lines(topics, m)]
    return "\n".join(lines).rstrip("\n") + "\n"


def write_fleet_acl(out: Path, fleet: str, devices: list[str],
                    coordinator_user: str | Sequence[str] = DEFAULT_COORDINATOR_USER,
                    sites: Mapping[str, Sequence[str]] | None = None, monitors: Sequence[str] = ()) -> Path:
    """Write the ACL atomically: Mosquitto may re-read it (SIGHUP) at any moment."""
    text = fleet_acl(fleet, devices, coordinator_user, sites, monitors)
    out = Path(out)
    tmp = out.with_name(out.name + ".tmp")
    tmp.write_text(text, encoding="utf-8")
    tmp.replace(out)
    return out


def _check_sites(site_ids: Mapping[str, list[str]], fleet_ids: set[str]) -> set[str]:
    """Every site has devices of the fleet, each at one site only; the ids at any site."""
    seen: dict[str, str] = {}
    for site, listed in site_ids.items():
        if not listed:
            raise AclError(f"site {site!r} has no device ids: list the devices that reach the core through it")
        unknown = sorted(set(listed) - fleet_ids)
        if unknown:
            raise AclError(f"devices of site {site!r} are not among the fleet's devices: {', '.join(unknown)}; "
                           f"the devices file lists every device of the fleet, at a site or not")
        for d in listed:
            if d in seen:
                raise AclError(f"device {d!r} is listed at site {seen[d]!r} and at site {site!r}: a device "
                               f"reaches the core through one site only")
            seen[d] = site
    return set(seen)


def _check_distinct(users: list[str]) -> None:
    """No two kinds of user share a name: the ACL would give one the other's rights."""
    clashes = sorted({u for u in users if users.count(u) > 1})
    if clashes:
        raise AclError(f"user names given twice (a device, the coordinator, a site's bridge or a monitor): "
                       f"{', '.join(clashes)}")


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


def _not_a_device(topics: Topics, user: str) -> str:
    """Mosquitto checks a user's own lines before the patterns, and a deny first of all."""
    return f"topic deny {topics.root}/device/{user}/#"


def _bridge_lines(topics: Topics, site: str, devices: Sequence[str]) -> list[str]:
    user = bridge_user(site)
    out, into = bridged_topics(topics, devices)
    return ([f"# Site {site}'s bridge (`edge-coordinator bridge --site {site}`): its {len(devices)} device(s).",
             f"user {user}", _not_a_device(topics, user), f"topic write {site_state_topic(topics, site)}"]
            + [f"topic write {t}" for t in out] + [f"topic read {t}" for t in into] + [""])


def _monitor_lines(topics: Topics, user: str) -> list[str]:
    return ([f"# Monitor {user}: reads the fleet's state, writes nothing.", f"user {user}",
             _not_a_device(topics, user)] + [f"topic read {t}" for t in monitor_reads(topics)] + [""])
