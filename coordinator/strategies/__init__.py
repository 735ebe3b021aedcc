"""Schedules: who trains what each round. One module per published method, each stating only what differs.

A strategy registers itself by being a `Strategy` subclass with a `name` in a module of this
package: adding a method is adding one file. The service, the CLIs, the demo and the
benchmarks read the registry, never a list of names of their own.
"""
from __future__ import annotations

import importlib
import pkgutil
from dataclasses import asdict

from coordinator.strategies.base import Strategy

DEFAULT = "progressive"


def registry() -> dict[str, type[Strategy]]:
    """Every strategy of this package, by name."""
    found: dict[str, type[Strategy]] = {}
    for info in pkgutil.iter_modules(__path__, __name__ + "."):
        module = importlib.import_module(info.name)
        for value in vars(module).values():
            if isinstance(value, type) and issubclass(value, Strategy) and value.name \
                    and value.__module__ == module.__name__:
                if value.name in found:
                    raise RuntimeError(f"two strategies are named {value.name!r}: {found[value.name]} and {value}")
                found[value.name] = value
    return dict(sorted(found.items()))


def names() -> list[str]:
    return list(registry())


def settings_tables() -> dict[str, dict]:
    """Each strategy's table of settings with its defaults, as the coordinator's config holds them."""
    return {name: asdict(cls.Settings()) for name, cls in registry().items()}


def build(settings: dict, manifest, predict) -> Strategy:
    """The strategy named in settings['service']['strategy'], configured from its own table."""
    name, train = settings["service"]["strategy"], settings["train"]
    known = registry()
    if name not in known:
        raise ValueError(f"unknown strategy {name!r}; known: {', '.join(known)}")
    return known[name].from_settings(manifest, predict, settings.get(name, {}), batch_sizes=train["batch_sizes"],
                                     margin=train["margin"], seed=settings["service"]["seed"],
                                     aggregation=settings.get("aggregation"))
