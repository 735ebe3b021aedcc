"""Device tiers: what a class of board has (RAM, cores, storage) and the default training budget.

A tier is one TOML file in `profiles/` with a single `[tier]` table; the file's stem is the
tier's name. Operators pick a tier per board; the profiler and the coordinator read them
here. `budget_mb` is only a starting point: the profiler measures the real budget on the
board (see docs/profiles.md).

Every field is required and checked. Unknown fields are errors, so a typo in a key cannot
be silently ignored. Each error is a `TierError` naming the file and the field.
"""
from __future__ import annotations

import difflib
import math
from dataclasses import dataclass, fields
from pathlib import Path

try:
    import tomllib
except ModuleNotFoundError:  # Python < 3.11
    import tomli as tomllib

from edge_runtime.errors import EdgeRuntimeError
from edge_runtime.logs import printable
from edge_runtime.memory import MIB
from edge_runtime.store import TOML_INTS

TABLE = "tier"


def _profiles_dir() -> Path:
    """profiles/ of a source checkout, or the copy a wheel installs beside this module."""
    checkout = Path(__file__).resolve().parents[2] / "profiles"
    return checkout if checkout.is_dir() else Path(__file__).resolve().parent / "profiles"


DEFAULT_PROFILES_DIR = _profiles_dir()
# What the budget rule (docs/profiles.md) sets aside for the agent process before it gives
# the rest to training jobs: budget_mb already excludes it.
AGENT_RESERVE_MB = 48


class TierError(EdgeRuntimeError):
    """A tier file is missing, malformed, or holds a field that is absent, mistyped or out of range."""

    def __init__(self, path: Path | str, field: str | None, problem: str):
        self.path = Path(path)
        self.field = field            # e.g. "tier.budget_mb"; None when the whole file is at fault
        where = f"{self.path}: {field}" if field else str(self.path)
        super().__init__(f"{where}: {problem}")


@dataclass(frozen=True)
class Tier:
    name: str          # the file stem, e.g. "pi-zero-2w"
    description: str
    ram_mb: int        # installed RAM, in MiB
    budget_mb: float   # default training budget of one device job, in MiB
    storage_gb: float  # the storage assumed for the board (an SD card size, for example)
    cores: int
    cpu: str           # e.g. "4x Cortex-A53 @ 1.0 GHz"
    source: str        # where the RAM and CPU figures come from
    path: Path

    @property
    def ram_bytes(self) -> int:
        return self.ram_mb * MIB

    @property
    def budget_bytes(self) -> int:
        return int(self.budget_mb * MIB)

    @property
    def device_budget_bytes(self) -> int:
        """All that edgeblock may use on the board: the jobs' budget plus the agent's reserve."""
        return int((self.budget_mb + AGENT_RESERVE_MB) * MIB)


_TEXT = ("name", "description", "cpu", "source")
_FIELDS = tuple(f.name for f in fields(Tier) if f.name != "path")


def _number(path: Path, key: str, value, integer: bool) -> float:
    kind = "an integer" if integer else "a number"
    # bool is an int in Python, but `ram_mb = true` is a mistake, not 1 MiB.
    if isinstance(value, bool) or not isinstance(value, int if integer else (int, float)):
        raise TierError(path, f"{TABLE}.{key}",
                        f"must be {kind}, not {type(value).__name__} {printable(repr(value), 60)}")
    # an int is checked before math.isfinite, which would overflow converting one beyond a float
    if isinstance(value, int) and not TOML_INTS[0] <= value <= TOML_INTS[1]:
        raise TierError(path, f"{TABLE}.{key}", f"must be {kind} within TOML's 64 bits")
    if not math.isfinite(value):
        raise TierError(path, f"{TABLE}.{key}", f"must be a finite number, not {value!r}")
    return value


def _check(path: Path, raw: dict) -> Tier:
    extra = [key for key in raw if key != TABLE]
    if extra:
        raise TierError(path, extra[0], f"unknown top-level key or table; a tier file holds only a [{TABLE}] table")
    table = raw.get(TABLE)
    if not isinstance(table, dict):
        problem = "missing" if table is None else f"must be a table, not {type(table).__name__}"
        raise TierError(path, f"[{TABLE}]", problem)
    for key in table:
        if key not in _FIELDS:
            near = difflib.get_close_matches(key, _FIELDS, n=1)
            hint = f" (did you mean {near[0]}?)" if near else ""
            raise TierError(path, f"{TABLE}.{key}", f"unknown field{hint}; known: {', '.join(_FIELDS)}")
    for key in _FIELDS:
        if key not in table:
            raise TierError(path, f"{TABLE}.{key}", "missing")
    for key in _TEXT:
        value = table[key]
        if not isinstance(value, str):
            raise TierError(path, f"{TABLE}.{key}",
                            f"must be a string, not {type(value).__name__} {printable(repr(value), 60)}")
        if not value.strip():
            raise TierError(path, f"{TABLE}.{key}", "must not be empty")
    if table["name"] != path.stem:
        raise TierError(path, f"{TABLE}.name",
                        f"is {table['name']!r} but the file is {path.name}: a tier's name is its file stem")
    ram = _number(path, "ram_mb", table["ram_mb"], integer=True)
    budget = _number(path, "budget_mb", table["budget_mb"], integer=False)
    storage = _number(path, "storage_gb", table["storage_gb"], integer=False)
    cores = _number(path, "cores", table["cores"], integer=True)
    if ram <= 0:
        raise TierError(path, f"{TABLE}.ram_mb", f"must be positive, not {ram}")
    if budget <= 0:
        raise TierError(path, f"{TABLE}.budget_mb", f"must be positive, not {budget}")
    if budget >= ram:
        raise TierError(path, f"{TABLE}.budget_mb",
                        f"is {budget} MB but ram_mb is {ram}: the budget must be less than the installed RAM, "
                        f"which the OS and the agent share")
    if storage <= 0:
        raise TierError(path, f"{TABLE}.storage_gb", f"must be positive, not {storage}")
    if cores < 1:
        raise TierError(path, f"{TABLE}.cores", f"must be at least 1, not {cores}")
    return Tier(path=path, **{key: table[key] for key in _FIELDS})


def load_tier(path: Path | str) -> Tier:
    """Read and check one tier file."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise TierError(path, None, "tier file does not exist") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise TierError(path, None, f"cannot be read as a tier file ({exc})") from None
    try:
        raw = tomllib.loads(text)
    except ValueError as exc:   # TOMLDecodeError, or a decimal integer of more digits than Python parses
        raise TierError(path, None, f"not valid TOML ({exc})") from None
    except RecursionError:   # tomllib recurses once per level of nested arrays and inline tables
        raise TierError(path, None, "not valid TOML (arrays or tables nested too deeply)") from None
    return _check(path, raw)


def load_tiers(directory: Path | str = DEFAULT_PROFILES_DIR) -> list[Tier]:
    """Every `*.toml` tier in `directory`, smallest budget first. Any bad file is an error."""
    directory = Path(directory)
    if not directory.is_dir():
        raise TierError(directory, None, "no tiers here: the directory does not exist")
    tiers = [load_tier(p) for p in sorted(directory.glob("*.toml"))]
    if not tiers:
        raise TierError(directory, None, "no tiers here: the directory holds no *.toml file")
    return sorted(tiers, key=lambda t: (t.budget_mb, t.ram_mb, t.name))


def find_tier(name_or_path: Path | str, directory: Path | str = DEFAULT_PROFILES_DIR) -> Tier:
    """A tier by name (a file stem in `directory`) or by the path of a tier file."""
    text = str(name_or_path)
    if text.endswith(".toml") or Path(text).name != text:   # a file, not a name
        return load_tier(text)
    directory = Path(directory)
    path = directory / f"{text}.toml"
    if not path.is_file():
        known = sorted(p.stem for p in directory.glob("*.toml"))
        near = difflib.get_close_matches(text, known, n=1)
        raise TierError(directory, None,
                        f"unknown tier {text!r}; known: {', '.join(known) if known else 'none (no *.toml here)'}"
                        + (f" (did you mean {near[0]}?)" if near else ""))
    return load_tier(path)
