"""The profile file: what the profiler measured and chose per tier, as the coordinator reads it.

Format `edgeblock-profile/1` (documented in docs/profiler.md). Every field is checked on
load; a malformed file is rejected with the field and the reason. A model with a frozen
prefix (Manifest.frozen_prefix) adds `frozen_prefix`: its tiers' stages start there. A model
family (Manifest.members, FedIN) adds `skip` to the measurements and fits of its member parts and
`member` to each feasible tier: the member that tier trains, as one stage. Files without them load
unchanged, and a model without members writes neither.
"""
from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path

from edge_runtime.errors import EdgeRuntimeError
from edge_runtime.logs import printable

FORMAT = "edgeblock-profile/1"
MAX_INT = 2 ** 63 - 1   # byte counts, batches and indices: what an int64 holds


class ProfileError(EdgeRuntimeError):
    """A profile file that is not what the coordinator can schedule from."""


@dataclass(frozen=True)
class StagePlan:
    first: int
    last: int
    head: int
    predicted_peak_bytes: int
    measured_peak_bytes: int | None = None  # when the tool verified the stage
    step_seconds: float | None = None


@dataclass(frozen=True)
class TierPlan:
    tier: str
    budget_bytes: int
    usable_bytes: int                       # budget / (1 + margin): what predictions must stay under
    feasible: bool
    reason: str | None = None               # why not, when infeasible
    batch_size: int | None = None
    stages: tuple[StagePlan, ...] = ()
    member: str | None = None               # a model family's member this tier trains whole (one stage), FedIN


@dataclass
class Profile:
    model: str
    manifest_sha256: str
    created: str
    device: dict
    baseline_bytes: int
    margin: float
    measurements: list[dict] = field(default_factory=list)
    fits: list[dict] = field(default_factory=list)
    span_model: dict = field(default_factory=dict)
    tiers: list[TierPlan] = field(default_factory=list)
    format: str = FORMAT
    frozen_prefix: int = 0      # the manifest's: layers before it never train, and no stage covers them

    def tier(self, name: str) -> TierPlan:
        for t in self.tiers:
            if t.tier == name:
                return t
        raise ProfileError(f"profile has no tier {name!r}; it has {[t.tier for t in self.tiers]}")

    def save(self, path: Path) -> None:
        from edge_runtime.store import atomic_write_text
        d = asdict(self)
        if not self.frozen_prefix:   # a model that trains every layer keeps the file it always had
            d.pop("frozen_prefix")
        for t in d["tiers"]:
            if t["member"] is None:  # so does a model without members
                t.pop("member")
        atomic_write_text(Path(path), json.dumps(d, indent=1))

    @classmethod
    def load(cls, path: Path) -> "Profile":
        from edge_runtime.store import read_json
        raw = read_json(path, ProfileError, "profile")
        try:
            return _parse(raw)
        except ProfileError as exc:
            raise ProfileError(f"{path}: {exc}") from None


def _need(raw: dict, key: str, kind, where: str):
    if key not in raw:
        raise ProfileError(f"{where}: missing field '{key}'")
    value = raw[key]
    kinds = kind if isinstance(kind, tuple) else (kind,)
    if isinstance(value, bool) and bool not in kinds or not isinstance(value, kinds):
        raise ProfileError(f"{where}: field '{key}' must be {' or '.join(k.__name__ for k in kinds)}, "
                           f"not {type(value).__name__}")
    return value


def _int(raw: dict, key: str, where: str, lo: int = 0) -> int:
    """An int field in [lo, MAX_INT]."""
    value = _need(raw, key, int, where)
    if not lo <= value <= MAX_INT:
        shown = value if abs(value) <= MAX_INT else "an integer beyond int64"
        raise ProfileError(f"{where}: field '{key}' must be an integer from {lo} to {MAX_INT}, not {shown}")
    return value


def _positive(raw: dict, key: str, where: str) -> int:
    return _int(raw, key, where, lo=1)


def _number(raw: dict, key: str, where: str) -> int | float:
    """A non-negative, finite number (an int within int64, so float() of it cannot overflow)."""
    value = _need(raw, key, (int, float), where)
    if isinstance(value, int):
        return _int(raw, key, where)
    if not 0 <= value < math.inf:
        raise ProfileError(f"{where}: field '{key}' must be a non-negative, finite number, not {value}")
    return value


def _text(raw: dict, key: str, where: str) -> str:
    return _need(raw, key, str, where)


def _optional(raw: dict, key: str, check, where: str):
    """check(raw, key, where) of a field that may be absent or null (None then)."""
    return None if raw.get(key) is None else check(raw, key, where)


def _object(value, where: str) -> None:
    if not isinstance(value, dict):
        raise ProfileError(f"{where}: must be an object, not {type(value).__name__}")


def _skips(entries: list, where: str) -> list:
    """Measurements or fits whose optional `skip` (the layers a family member's part skips) is a list of
    distinct layer indices inside the span first..last."""
    for i, e in enumerate(entries):
        ew = f"{where}[{i}]"
        _object(e, ew)
        if "skip" not in e:
            continue
        skip = _need(e, "skip", list, ew)
        first, last = _int(e, "first", ew), _int(e, "last", ew)
        for j, layer in enumerate(skip):
            if isinstance(layer, bool) or not isinstance(layer, int) or not first <= layer <= last:
                raise ProfileError(f"{ew}: skip[{j}] must be a layer index from {first} to {last}, not {layer!r}")
        if len(set(skip)) != len(skip):
            raise ProfileError(f"{ew}: skip names a layer twice: {skip}")
    return entries


def _parse(raw: dict) -> Profile:
    if not isinstance(raw, dict):
        raise ProfileError(f"a profile must be a JSON object, not {type(raw).__name__}")
    if raw.get("format") != FORMAT:
        shown = repr(raw.get("format"))
        raise ProfileError(f"format is {printable(shown, 60)}, expected {FORMAT!r}")
    frozen_prefix = _int(raw, "frozen_prefix", "profile") if "frozen_prefix" in raw else 0
    tiers = []
    for i, t in enumerate(_need(raw, "tiers", list, "profile")):
        where = f"tiers[{i}]"
        _object(t, where)
        feasible = _need(t, "feasible", bool, where)
        budget, usable = _positive(t, "budget_bytes", where), _positive(t, "usable_bytes", where)
        if usable > budget:
            raise ProfileError(f"{where}: usable_bytes {usable} exceeds budget_bytes {budget}")
        stages = []
        if feasible:
            batch = _positive(t, "batch_size", where)
            expected_first = frozen_prefix   # the stages cover every layer that trains
            for j, s in enumerate(_need(t, "stages", list, where)):
                sw = f"{where}.stages[{j}]"
                _object(s, sw)
                first, last = _int(s, "first", sw), _int(s, "last", sw)
                if first != expected_first or last < first:
                    raise ProfileError(f"{sw}: covers layers {first}-{last}, expected to start at {expected_first}")
                expected_first = last + 1
                stages.append(StagePlan(first, last, _int(s, "head", sw), _positive(s, "predicted_peak_bytes", sw),
                                        _optional(s, "measured_peak_bytes", _positive, sw),
                                        _optional(s, "step_seconds", _number, sw)))
            if not stages:
                raise ProfileError(f"{where}: a feasible tier needs at least one stage")
            reason = _optional(t, "reason", _text, where)
            member = _optional(t, "member", _text, where)
            if member is not None and len(stages) != 1:
                raise ProfileError(f"{where}: member {printable(member, 60)} is trained whole, in one stage, "
                                   f"not {len(stages)}")
        else:
            batch = member = None
            reason = _text(t, "reason", where)
            if t.get("member") is not None:
                raise ProfileError(f"{where}: an infeasible tier names no member")
        tiers.append(TierPlan(_text(t, "tier", where), budget, usable, feasible, reason, batch, tuple(stages),
                              member))
    return Profile(model=_text(raw, "model", "profile"), manifest_sha256=_text(raw, "manifest_sha256", "profile"),
                   created=_text(raw, "created", "profile"), device=_need(raw, "device", dict, "profile"),
                   baseline_bytes=_positive(raw, "baseline_bytes", "profile"),
                   margin=float(_number(raw, "margin", "profile")),
                   measurements=_skips(_need(raw, "measurements", list, "profile"), "measurements"),
                   fits=_skips(_need(raw, "fits", list, "profile"), "fits") if "fits" in raw else [],
                   span_model=_need(raw, "span_model", dict, "profile") if "span_model" in raw else {},
                   tiers=tiers, frozen_prefix=frozen_prefix)
