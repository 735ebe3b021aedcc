"""What memory and storage this device really has, and the budget that leaves for training."""
from __future__ import annotations

import os
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path

from edge_runtime.jobs.limits import current_cgroup_limit_bytes


@dataclass(frozen=True)
class DeviceProbe:
    total_ram_bytes: int
    available_ram_bytes: int
    cgroup_limit_bytes: int | None   # this process's memory cgroup limit (systemd MemoryMax=, containers)
    swap_total_bytes: int
    swap_free_bytes: int
    disk_free_bytes: int             # where the activation cache lives
    disk_path: str
    cores: int
    margin: float
    usable_budget_bytes: int         # min(available RAM, cgroup limit) less the margin; swap never counts

    def to_dict(self) -> dict:
        return asdict(self)


def probe(cache_dir: Path, margin: float = 0.10) -> DeviceProbe:
    import psutil
    if not 0 <= margin < 1:
        raise ValueError(f"margin must be in [0, 1), not {margin}")
    vm, sw = psutil.virtual_memory(), psutil.swap_memory()
    cache_dir = Path(cache_dir)
    existing = cache_dir
    while not existing.exists():
        existing = existing.parent
    limit = current_cgroup_limit_bytes()
    memory = min(vm.available, limit) if limit else vm.available
    return DeviceProbe(total_ram_bytes=vm.total, available_ram_bytes=vm.available, cgroup_limit_bytes=limit,
                       swap_total_bytes=sw.total, swap_free_bytes=sw.free,
                       disk_free_bytes=shutil.disk_usage(existing).free, disk_path=str(cache_dir.resolve()),
                       cores=os.cpu_count() or 1, margin=margin, usable_budget_bytes=int(memory * (1 - margin)))
