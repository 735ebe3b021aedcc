"""What one bundle is for (a device, its tier, fleet, broker and board), every input checked before
anything is built, so that a mistake costs no download; and the board layout it installs into."""
from __future__ import annotations

import argparse
from dataclasses import dataclass, field
from pathlib import Path

from coordinator.ops.bundle_credentials import BROKER_FILES, Carried, check_broker_files
from coordinator.ops.bundle_errors import BundleError, warn
from coordinator.ops.wheels import REPO, check_extra_wheels
from edge_runtime.device.tiers import Tier, TierError, find_tier
from edge_runtime.memory import MIB
from edge_runtime.wire.mqtt_link import is_loopback, parse_broker_address
from edge_runtime.wire.protocol import ProtocolError, Topics, check_id

# The board's layout: install.sh's defaults, which it can move with --venv and --config-dir.
VENV = "/opt/edgeblock/venv"
CONFIG_DIR = "/etc/edgeblock"
DATA_DIR = "/var/lib/edgeblock/data"
STATE_DIR = "/var/lib/edgeblock/state"
SERVICE_USER = "edgeblock"
UNIT = "edge-device.service"


@dataclass(frozen=True)
class Bundle:
    """What to build, checked."""
    tier: Tier
    device_id: str
    fleet: str
    broker: str               # as edge-device takes it: mqtt://host:port, host:port or host
    arch: str
    data_dir: str
    state_dir: str
    extra_wheels: tuple[Path, ...]
    username: str = ""        # the broker login; "" = anonymous
    broker_files: Carried = field(default=(), repr=False)

    @property
    def name(self) -> str:
        return f"edgeblock-{self.device_id}-{self.tier.name}-{self.arch}"

    @property
    def memory_max(self) -> str:
        """The whole device's budget (the jobs' budget_mb plus the agent's reserve) as systemd's MemoryMax
        (M is MiB there): the unit's cgroup holds the agent and every training job it starts."""
        budget = self.tier.device_budget_bytes
        return f"{budget // MIB}M" if budget % MIB == 0 else str(budget)

    @property
    def secret(self) -> bool:
        """Whether the bundle holds a password or a key, so that the archive must be private too."""
        return any(BROKER_FILES[key].secret for key, _ in self.broker_files)


def check(args: argparse.Namespace) -> Bundle:
    """Every input checked before anything is built, so a mistake costs no download."""
    if not (REPO / "pyproject.toml").is_file():
        raise BundleError(f"edge-bundle builds the project's wheel from a source checkout; {REPO} is not one")
    try:
        tier = find_tier(args.tier)
    except TierError as exc:
        raise BundleError(f"--tier: {exc}") from None
    try:
        device_id = check_id(args.device_id, "--device-id")
        fleet = Topics(args.fleet).fleet
    except ProtocolError as exc:
        raise BundleError(str(exc)) from None
    for flag, path in (("--data-dir", args.data_dir), ("--state-dir", args.state_dir)):
        if not path.startswith("/"):
            raise BundleError(f"{flag} {path!r}: must be an absolute path on the board")
    broker = _broker_url(args.broker)
    files = check_broker_files(args, parse_broker_address(broker).tls)
    username = _username(args.username, device_id, files)
    _warn_login(broker, username, device_id, files)
    return Bundle(tier=tier, device_id=device_id, fleet=fleet, broker=broker, arch=args.platform,
                  data_dir=args.data_dir.rstrip("/"), state_dir=args.state_dir.rstrip("/"),
                  extra_wheels=check_extra_wheels(args.extra_wheel, args.platform), username=username,
                  broker_files=files)


def _broker_url(text: str) -> str:
    """The address as given, once edge-device's own parser accepts it: the agent reads it the same way."""
    try:
        host = parse_broker_address(text).host
    except ValueError as exc:
        raise BundleError(f"--broker: {exc}") from None
    if is_loopback(host):
        warn(f"--broker {text} is a loopback address: on a board it names the board itself")
    return text.strip()


def _username(given: str | None, device_id: str, files: Carried) -> str:
    """The agent's own default: with a password, the device id, the name the fleet's ACL confines it by."""
    if given:
        return given
    return device_id if "password_file" in dict(files) else ""


def _warn_login(broker: str, username: str, device_id: str, files: Carried) -> None:
    """What the agent would accept but the fleet's broker most likely not, or only at a cost."""
    password = dict(files).get("password_file")
    if username and username != device_id:
        warn(f"--username {username} is not the device id {device_id}: the ACL `edge-coordinator acl` writes "
             f"lets a device use only the topics of its own user name")
    if password is not None and password.parent.name == "passwords" and password.name != username:
        warn(f"--password-file {password} is {password.name}'s (make-secrets.sh names each user's file after "
             f"it), but the login is {username}")
    address = parse_broker_address(broker)
    if password is not None and not address.tls and not is_loopback(address.host):
        warn(f"--broker {broker} is plain MQTT: {username}'s password would cross the network in clear text; "
             f"use mqtts://{address.host}:8883 with --tls-ca")
