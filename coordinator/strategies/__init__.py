"""Schedules: who trains what each round. `build` makes one from the coordinator's settings."""
from __future__ import annotations

from coordinator.strategies.base import Strategy

NAMES = ("progressive", "fedavg", "selective", "layerwise")


def build(settings: dict, manifest, predict) -> Strategy:
    """The strategy named in settings['service']['strategy'], with its own table of settings."""
    from coordinator.strategies.fedavg import FedAvg
    from coordinator.strategies.freezing import FreezeRule
    from coordinator.strategies.layerwise import LayerWise
    from coordinator.strategies.progressive import Progressive
    from coordinator.strategies.selective import Selective
    name, train = settings["service"]["strategy"], settings["train"]
    common = dict(batch_sizes=train["batch_sizes"], margin=train["margin"])
    if name == "fedavg":
        return FedAvg(manifest, predict, rounds=settings["fedavg"]["rounds"], **common)
    if name == "progressive":
        p = settings["progressive"]
        rule = FreezeRule(window=p["freeze_window"], threshold=p["freeze_threshold"], patience=p["freeze_patience"])
        return Progressive(manifest, predict, shrink_rounds=p["shrink_rounds"],
                           min_rounds_per_block=p["min_rounds_per_block"],
                           max_rounds_per_block=p["max_rounds_per_block"], max_extra_blocks=p["max_extra_blocks"],
                           freeze_rule=rule, **common)
    if name == "layerwise":
        lw, p = settings["layerwise"], settings["progressive"]
        rule = FreezeRule(window=p["freeze_window"], threshold=p["freeze_threshold"], patience=p["freeze_patience"])
        return LayerWise(manifest, predict, rounds_per_layer=lw["rounds_per_layer"],
                         min_rounds_per_layer=lw["min_rounds_per_layer"], dropout=lw["dropout"],
                         frozen_after=lw["frozen_after"],
                         min_cache_disk_bytes=int(lw["min_cache_disk_mb"] * 2**20), freeze_rule=rule,
                         seed=settings["service"]["seed"], **common)
    if name == "selective":
        sel = settings["selective"]
        return Selective(manifest, predict, rounds=sel["rounds"], rescore_every=sel["rescore_every"], lam=sel["lam"],
                         max_units=sel["max_units"], **common)
    raise ValueError(f"unknown strategy {name!r}; known: {', '.join(NAMES)}")
