"""What the federated tests share: a CI-sized fleet in two tiers on Fashion-MNIST split non-IID."""
from __future__ import annotations

import time
from pathlib import Path

from coordinator.local.data import write_fleet_data
from coordinator.local.fleet import DeviceSpec, LocalFleet, read_metrics
from coordinator.state_store import StateStore

MB = 1 << 20
# The small tier's training jobs can hold one block of fmnist_cnn but not the whole model
# at the batch sizes the tests allow (measured at batch 32: blocks 76-89 MB, the whole model 97 MB, each
# plus the 10 % margin); the agent's own RSS (about 40 MB) comes out of the device budget.
SMALL_MB, BIG_MB = 140, 296


def fleet_specs(data_root: Path, samples: int = 16000, alpha: float = 0.5, small: int = 2, big: int = 2,
                seed: int = 0) -> list[DeviceSpec]:
    ids = [f"small-{i}" for i in range(small)] + [f"big-{i}" for i in range(big)]
    dirs = write_fleet_data(data_root, ids, samples, alpha, seed)
    return [DeviceSpec(d, "small-140mb" if d.startswith("small") else "pi-zero-2w",
                       SMALL_MB if d.startswith("small") else BIG_MB, dirs[d]) for d in ids]


def settings(workdir: Path, profile: Path, strategy: str = "progressive", **service) -> dict:
    """CI-sized settings: a short schedule that still trains every block."""
    return {
        "service": {"workdir": str(workdir), "strategy": strategy, "profile": str(profile), "min_devices": 4,
                    "round_deadline_s": 180.0, "offline_grace_s": 5.0, "eval_samples": 5000, **service},
        "train": {"learning_rate": 2e-3, "local_epochs": 1.0, "batch_sizes": [32, 64]},
        "progressive": {"shrink_rounds": 1, "min_rounds_per_block": 2, "max_rounds_per_block": 3,
                        "max_extra_blocks": 1},
        "fedavg": {"rounds": 4},
        "selective": {"rounds": 4, "rescore_every": 2, "lam": 0.0, "max_units": 2},
        "layerwise": {"rounds_per_layer": 2, "min_rounds_per_layer": 1, "dropout": 0.0, "frozen_after": 0},
    }


def wait_for(predicate, timeout_s: float, what: str, fleet: LocalFleet | None = None, every_s: float = 0.2):
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(every_s)
    tail = "" if fleet is None else "\n".join(f"--- {n}\n{fleet.log_tail(n, 15)}" for n in fleet.procs)
    raise TimeoutError(f"timed out after {timeout_s:.0f} s waiting for {what}\n{tail}")


def open_round(workdir: Path):
    """The coordinator's open round as its state store has it (None when none is open or no store yet)."""
    if not (Path(workdir) / "state.db").exists():
        return None
    row = StateStore(Path(workdir) / "state.db").current_round()
    return row if row is not None and row.state == "open" else None


__all__ = ["MB", "SMALL_MB", "BIG_MB", "fleet_specs", "settings", "wait_for", "open_round", "read_metrics",
           "LocalFleet"]
