"""The device's settings: defaults, a TOML file's [device] table, then flags; checked before anything connects.

`resolve` turns them into a DeviceConfig: the broker address and login, the data and state
directories, and the device's whole memory budget (given, the tier's, or measured).
"""
from __future__ import annotations

import logging
import shlex
import shutil
from dataclasses import dataclass
from pathlib import Path

from edge_runtime.device.probe import probe
from edge_runtime.device.tiers import DEFAULT_PROFILES_DIR, TierError, find_tier
from edge_runtime.jobs.budget import DEFAULT_MARGIN
from edge_runtime.memory import MIB, size_text
from edge_runtime.store import TOML_INTS, read_toml
from edge_runtime.train.datasets import DataError, LocalDataset
from edge_runtime.wire.mqtt_link import LinkSecurity, parse_broker_url, security_from_settings
from edge_runtime.wire.protocol import ProtocolError, Topics, check_id

log = logging.getLogger("edge_runtime.device")

TABLE = "device"
# The tier of a board without a tier file: its budget is measured. Any other name without a file needs
# --budget-mb, as edge-demo's and edge-sim's fleets do: it is most likely a typo of a known tier.
CUSTOM_TIER = "custom"
DEFAULTS = {
    "id": "",                 # required
    "tier": CUSTOM_TIER,
    "fleet": "default",
    "broker": "",             # required
    "data": "",               # required
    "state": "",              # "" = device-state/<id>
    "budget_mb": 0.0,         # 0 = the tier's budget, else measured
    "margin": DEFAULT_MARGIN,
    "threads": 0,
    "ack_timeout_s": 30.0,
    "connect_timeout_s": 60.0,
    "username": "",           # the broker login ("" with a password_file = the device id, as the ACL expects)
    "password_file": "",      # the password on its first line; never on the command line
    "tls": False,             # TLS without an mqtts:// address
    "tls_ca": "",             # CA file the broker's certificate must chain to ("" = the system's)
    "tls_cert": "",           # client certificate, for a broker that asks for one
    "tls_key": "",
    "job_python": "",         # the command that starts a job's interpreter ("" = the agent's own)
}


class ConfigError(ValueError):
    """A setting that cannot work; the message names the setting (and the file it came from)."""


def load_settings(config: Path | None, flags: dict) -> dict:
    """Defaults, then the [device] table of a TOML file, then the flags given (None = not given)."""
    settings = dict(DEFAULTS)
    if config is not None:
        settings.update(_read_toml(Path(config)))
    settings.update({key: value for key, value in flags.items() if value is not None})
    return settings


def _read_toml(path: Path) -> dict:
    """The [device] table, checked as strictly as the other CLIs do: a typo is an error, never ignored."""
    raw = read_toml(path, ConfigError)
    for table, values in raw.items():
        if table != TABLE or not isinstance(values, dict):
            raise ConfigError(f"{path}: unknown table [{table}]; an edge-device config holds only [{TABLE}]")
    out = {}
    for key, value in raw.get(TABLE, {}).items():
        if key not in DEFAULTS:
            raise ConfigError(f"{path}: unknown setting {TABLE}.{key}; known: {', '.join(DEFAULTS)}")
        expected = type(DEFAULTS[key])
        if isinstance(value, int) and not isinstance(value, bool) and not TOML_INTS[0] <= value <= TOML_INTS[1]:
            raise ConfigError(f"{path}: {TABLE}.{key} is out of TOML's 64-bit integer range")
        if expected is float and isinstance(value, int) and not isinstance(value, bool):
            value = float(value)
        if (isinstance(value, bool) and expected is not bool) or not isinstance(value, expected):
            raise ConfigError(f"{path}: {TABLE}.{key} must be {expected.__name__}, not {value!r}")
        out[key] = value
    return out


@dataclass(frozen=True)
class DeviceConfig:
    """Settings checked and turned into what the agent uses."""
    device_id: str
    tier: str
    topics: Topics
    host: str
    port: int
    data: Path
    state: Path
    budget_bytes: int          # everything the device may use: agent and job together
    margin: float
    threads: int
    ack_timeout_s: float
    connect_timeout_s: float
    cores: int
    disk_free_bytes: int
    security: LinkSecurity = LinkSecurity()   # broker login and TLS
    # the command that starts a training job's interpreter, as argv words; () = the agent's own (sys.executable)
    job_python: tuple[str, ...] = ()


def resolve(settings: dict) -> DeviceConfig:
    """Check every setting before anything connects, so a bad one fails at once with its name."""
    unknown = sorted(set(settings) - set(DEFAULTS))
    if unknown:
        raise ConfigError(f"unknown setting(s) {unknown}; known: {', '.join(DEFAULTS)}")
    s = {**DEFAULTS, **settings}
    for key in ("id", "broker", "data"):
        if not s[key]:
            raise ConfigError(f"--{key} is required (or {TABLE}.{key} in the --config file)")
    try:
        device_id = check_id(s["id"], "device id")
        topics = Topics(s["fleet"])
        host, port = parse_broker_url(s["broker"])
        # the broker's ACL knows a device by its id: the login defaults to it
        login = s["username"] or (device_id if s["password_file"] else "")
        security = security_from_settings({**s, "username": login}, s["broker"])
    except (ProtocolError, ValueError) as exc:
        raise ConfigError(str(exc)) from None
    tier, tier_budget = _tier(s["tier"], s["budget_mb"])
    data = LocalDataset(Path(s["data"]).expanduser().resolve())
    if not data.root.is_dir():
        raise ConfigError(f"--data {s['data']}: no such directory")
    try:
        data.require_files()  # their content is checked against each task's model by the agent
    except DataError as exc:
        raise ConfigError(f"--data {s['data']}: {exc}") from None
    if not 0 <= s["margin"] < 1:
        raise ConfigError(f"--margin must be in [0, 1), not {s['margin']}")
    if s["threads"] < 0 or s["budget_mb"] < 0:
        raise ConfigError("--threads and --budget-mb must not be negative")
    if s["ack_timeout_s"] <= 0 or s["connect_timeout_s"] <= 0:
        raise ConfigError("--ack-timeout and --connect-timeout must be positive")
    state = Path(s["state"] or f"device-state/{device_id}").expanduser().resolve()
    try:
        state.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise ConfigError(f"--state {state}: cannot create it ({exc})") from None
    job_python = _job_python(s["job_python"])
    found = probe(state)
    return DeviceConfig(device_id=device_id, tier=tier, topics=topics, host=host, port=port, data=data.root,
                        state=state, budget_bytes=_device_budget(s["budget_mb"], tier, tier_budget, found),
                        margin=s["margin"], threads=s["threads"], ack_timeout_s=s["ack_timeout_s"],
                        connect_timeout_s=s["connect_timeout_s"], cores=found.cores,
                        disk_free_bytes=found.disk_free_bytes, security=security, job_python=job_python)


def _job_python(command: str) -> tuple[str, ...]:
    """The job_python setting as argv words (split as a shell would; no shell runs it); () = the agent's own.

    For boards whose interpreter must be started through a wrapper: a venv launcher, or an aarch64
    userland under qemu user mode without binfmt_misc, where a child started as sys.executable fails."""
    try:
        words = tuple(shlex.split(command))
    except ValueError as exc:
        raise ConfigError(f"--job-python {command!r}: {exc}") from None
    if words and shutil.which(words[0]) is None:
        raise ConfigError(f"--job-python {command!r}: {words[0]} is not an executable file"
                          + ("" if "/" in words[0] else " on PATH"))
    return words


def _tier(name_or_path: str, budget_mb: float) -> tuple[str, int | None]:
    """(tier name, its default budget): a tier file in profiles/; else, with --budget-mb or as CUSTOM_TIER, the
    name alone. Any other name is refused, naming the known tiers and the closest one."""
    try:
        tier = find_tier(name_or_path)
        # the tier's budget_mb is the jobs' share; the agent counts itself against the whole
        name, budget = tier.name, tier.device_budget_bytes
    except TierError as exc:
        if exc.path != DEFAULT_PROFILES_DIR:   # a tier file exists but is broken, or a given path is missing
            raise ConfigError(str(exc)) from None
        if name_or_path != CUSTOM_TIER and not budget_mb:
            raise ConfigError(f"--tier: {exc}; or give --budget-mb to run a tier without a file, or "
                              f"--tier {CUSTOM_TIER} to measure the budget") from None
        name, budget = name_or_path, None
    try:
        return check_id(name, "tier"), budget
    except ProtocolError as exc:
        raise ConfigError(str(exc)) from None


def _device_budget(budget_mb: float, tier: str, tier_budget: int | None, found) -> int:
    """The device's whole budget: given, else the tier's, else measured; never more than is free now."""
    usable = found.usable_budget_bytes
    if budget_mb:
        budget, source = int(budget_mb * MIB), "--budget-mb"
    elif tier_budget:
        budget, source = tier_budget, f"tier {tier}"
    else:
        log.info("budget: %s measured (usable memory of this device, no tier file for %s)", size_text(usable), tier)
        return usable
    if budget > usable:
        log.warning("budget: %s from %s is more than the %s this device has free now; using %s",
                    size_text(budget), source, size_text(usable), size_text(usable))
        return usable
    log.info("budget: %s from %s", size_text(budget), source)
    return budget
