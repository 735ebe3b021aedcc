"""What the federated tests share: a CI-sized fleet in two tiers on Fashion-MNIST split non-IID, and a rogue client."""
from __future__ import annotations

from pathlib import Path

from coordinator.local.data import write_fleet_data
from coordinator.local.fleet import DeviceSpec, LocalFleet, read_metrics, wait_until
from coordinator.state_store import StateStore
from edge_runtime.wire import model_blobs
from edge_runtime.wire import weights as wcodec
from edge_runtime.wire.blob_exchange import fetch_blob, send_blob
from edge_runtime.wire.mqtt_link import MqttLink
from edge_runtime.wire.protocol import Ack, Hello, Status, Task, Topics, Update
from edge_runtime.wire.transfer import BlobStore

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


def three_device_env(root: Path) -> dict:
    """A measured profile of fmnist_cnn and three pi-zero-2w devices with 6,000 images split non-IID: the fleet of
    the fault and replica tests."""
    from coordinator.model.zoo_profile import measured_profile
    measured_profile(root, "fmnist_cnn", [32, 64])
    ids = ["d0", "d1", "d2"]
    dirs = write_fleet_data(root / "data", ids, samples=6000, alpha=0.5)
    return {"root": root, "profile": root / "profile.json",
            "specs": [DeviceSpec(d, "pi-zero-2w", BIG_MB, dirs[d]) for d in ids]}


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
    """wait_until, or TimeoutError naming what did not happen, with the tails of the fleet's logs."""
    value = wait_until(predicate, timeout_s, every_s)
    if value:
        return value
    tail = "" if fleet is None else "\n".join(f"--- {n}\n{fleet.log_tail(n, 15)}" for n in fleet.procs)
    raise TimeoutError(f"timed out after {timeout_s:.0f} s waiting for {what}\n{tail}")


def open_round(workdir: Path):
    """The coordinator's open round as its state store has it (None when none is open or no store yet)."""
    if not (Path(workdir) / "state.db").exists():
        return None
    row = StateStore(Path(workdir) / "state.db").current_round()
    return row if row is not None and row.state == "open" else None


class Rogue:
    """A client speaking the protocol by hand, to send what a correct agent never would."""

    def __init__(self, broker, fleet, device_id, store_dir, tier: str = "pi-zero-2w", budget_bytes: int = 200 << 20):
        self.topics, self.id = Topics(fleet), device_id
        self.link = MqttLink(f"rogue-{device_id}", broker.host, broker.port,
                             [(self.topics.device(device_id, k), 1) for k in ("task", "blob", "ack")]).start()
        self.store = BlobStore(store_dir)
        self.link.publish(self.topics.device(device_id, "status"), Status("online").encode(), retain=True)
        self.link.publish(self.topics.device(device_id, "hello"),
                          Hello(device_id, tier, budget_bytes, "rogue").encode())

    def task(self, after_round: int = 0, timeout_s: float = 120) -> Task:
        """The next task of a round after `after_round` (blobs and acks that arrive first are read past)."""
        def next_task():
            msg = self.link.get(0.1)
            if msg is None or not msg.topic.endswith("/task"):
                return None
            task = Task.decode(msg.payload)
            return task if task.round > after_round else None
        return wait_for(next_task, timeout_s, f"a task for {self.id} after round {after_round}")

    def trained_values(self, task: Task) -> dict:
        """The global values of the parameters the task trains (a valid, zero-change update)."""
        fetch_blob(self.link, self.topics, self.id, self.store, task.manifest["sha256"])
        for b in task.blobs:
            fetch_blob(self.link, self.topics, self.id, self.store, b["sha256"])
        manifest_path, files = model_blobs.materialize(task.manifest["sha256"], task.blobs, self.store,
                                                       self.store.root / "models")
        from edge_runtime.wire.manifest import Manifest
        m = Manifest.load(manifest_path)
        names = m.param_names(task.part.trainable_layers, [task.part.head])
        weights = wcodec.WeightFiles(files, names)
        return {n: weights[n] for n in names}

    def send(self, task: Task, values: dict | None = None, raw: bytes | None = None, wait_s: float = 10.0,
             **fields) -> Ack | None:
        if raw is None:
            sha = self.store.put_bytes(wcodec.encode(values))
            send_blob(self.link, self.topics.device(self.id, "upload"), self.store, sha)
            size = self.store.path(sha).stat().st_size
            update = dict(task_id=task.task_id, round=task.round, device_id=self.id, blob_sha256=sha, blob_size=size,
                          num_examples=100, loss=0.1, steps=1, peak_rss_bytes=1 << 20, seconds=0.1)
            update.update(fields)
            raw = Update(**update).encode()
        self.link.publish(self.topics.device(self.id, "update"), raw)
        msg = self.link.get(wait_s)
        return Ack.decode(msg.payload) if msg is not None else None


__all__ = ["MB", "SMALL_MB", "BIG_MB", "fleet_specs", "settings", "wait_for", "open_round", "read_metrics",
           "LocalFleet", "Rogue", "three_device_env"]
