"""Settings: defaults, then a TOML file, then command-line flags (None means 'not given').

A settings file is checked against the defaults: every table and key must be known and every value
of its default's type (an integer where a float is expected is taken as that float). TOML integers
are 64-bit (the spec says a decoder must refuse what it cannot hold losslessly), so a larger one is
refused rather than overflowing a float later.
"""
from __future__ import annotations

import copy
from pathlib import Path

from edge_runtime.store import TOML_INTS, read_toml


class ConfigError(SystemExit):
    """A configuration that cannot run (a bad settings file, a model, evaluation data or workdir that does not
    fit): exits with a message naming what to fix. edge-coordinator exits 2 on it, which its service unit
    does not restart."""


def _checked(value, default, where: str):
    """`value` as a setting of `default`'s type (a list: each element of its first element's type)."""
    expected = type(default)
    if isinstance(value, int) and not isinstance(value, bool) and not TOML_INTS[0] <= value <= TOML_INTS[1]:
        raise ConfigError(f"{where} must be {expected.__name__}, not an integer beyond TOML's 64 bits")
    if expected is float and isinstance(value, int) and not isinstance(value, bool):
        value = float(value)
    if not isinstance(value, expected) or (isinstance(value, bool) and expected is not bool):
        shown = repr(value) if len(repr(value)) <= 80 else f"a {type(value).__name__}"
        raise ConfigError(f"{where} must be {expected.__name__}, not {shown}")
    if expected is list and default:
        return [_checked(item, default[0], f"{where}[{i}]") for i, item in enumerate(value)]
    return value


def load_config(defaults: dict, path: Path | None, overrides: dict) -> dict:
    settings = copy.deepcopy(defaults)
    if path is not None:
        raw = read_toml(path, ConfigError)
        for table, values in raw.items():
            if table not in settings or not isinstance(values, dict):
                raise ConfigError(f"{path}: unknown table [{table}]; known: {', '.join(settings)}")
            for key, value in values.items():
                if key not in settings[table]:
                    raise ConfigError(f"{path}: unknown setting {table}.{key}; known: {', '.join(settings[table])}")
                settings[table][key] = _checked(value, defaults[table][key], f"{path}: {table}.{key}")
    for table, values in overrides.items():
        for key, value in values.items():
            if value is not None:
                settings[table][key] = value
    return settings
