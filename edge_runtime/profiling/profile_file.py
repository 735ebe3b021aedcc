"""The profile file: what the profiler measured and chose per tier, as the coordinator reads it.

Format `edgeblock-profile/1` (documented in docs/profiler.md). Every field is checked on
load; a malformed file is rejected with the field and the reason.
"""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

from edge_runtime.errors import EdgeRuntimeError

FORMAT = "edgeblock-profile/1"


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

    def tier(self, name: str) -> TierPlan:
        for t in self.tiers:
            if t.tier == name:
                return t
        raise ProfileError(f"profile has no tier {name!r}; it has {[t.tier for t in self.tiers]}")

    def save(self, path: Path) -> None:
        from edge_runtime.store import atomic_write_text
        atomic_write_text(Path(path), json.dumps(asdict(self), indent=1))

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


def _positive(raw: dict, key: str, where: str) -> int:
    value = _need(raw, key, int, where)
    if value <= 0:
        raise ProfileError(f"{where}: field '{key}' must be positive, not {value}")
    return value


def _parse(raw: dict) -> Profile:
    if not isinstance(raw, dict) or raw.get("format") != FORMAT:
        raise ProfileError(f"format is {raw.get('format') if isinstance(raw, dict) else raw!r}, expected {FORMAT!r}")
    tiers = []
    for i, t in enumerate(_need(raw, "tiers", list, "profile")):
        where = f"tiers[{i}]"
        if not isinstance(t, dict):
            raise ProfileError(f"{where}: must be an object")
        feasible = _need(t, "feasible", bool, where)
        budget, usable = _positive(t, "budget_bytes", where), _positive(t, "usable_bytes", where)
        if usable > budget:
            raise ProfileError(f"{where}: usable_bytes {usable} exceeds budget_bytes {budget}")
        stages = []
        if feasible:
            batch = _positive(t, "batch_size", where)
            expected_first = 0
            for j, s in enumerate(_need(t, "stages", list, where)):
                sw = f"{where}.stages[{j}]"
                first, last = _need(s, "first", int, sw), _need(s, "last", int, sw)
                if first != expected_first or last < first:
                    raise ProfileError(f"{sw}: covers layers {first}-{last}, expected to start at {expected_first}")
                expected_first = last + 1
                measured = s.get("measured_peak_bytes")
                if measured is not None and (not isinstance(measured, int) or measured <= 0):
                    raise ProfileError(f"{sw}: field 'measured_peak_bytes' must be a positive int or null")
                stages.append(StagePlan(first, last, _need(s, "head", int, sw),
                                        _positive(s, "predicted_peak_bytes", sw), measured, s.get("step_seconds")))
            if not stages:
                raise ProfileError(f"{where}: a feasible tier needs at least one stage")
        else:
            batch = None
            _need(t, "reason", str, where)
        tiers.append(TierPlan(_need(t, "tier", str, where), budget, usable, feasible, t.get("reason"), batch,
                              tuple(stages)))
    return Profile(model=_need(raw, "model", str, "profile"),
                   manifest_sha256=_need(raw, "manifest_sha256", str, "profile"),
                   created=_need(raw, "created", str, "profile"), device=_need(raw, "device", dict, "profile"),
                   baseline_bytes=_positive(raw, "baseline_bytes", "profile"),
                   margin=float(_need(raw, "margin", (int, float), "profile")),
                   measurements=_need(raw, "measurements", list, "profile"), fits=raw.get("fits", []),
                   span_model=raw.get("span_model", {}), tiers=tiers)
