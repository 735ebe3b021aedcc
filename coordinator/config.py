"""Settings: defaults, then a TOML file, then command-line flags (None means 'not given')."""
from __future__ import annotations

import copy
from pathlib import Path

try:
    import tomllib
except ModuleNotFoundError:  # Python < 3.11
    import tomli as tomllib


class ConfigError(SystemExit):
    """A bad settings file: exits with a message naming the file and the field."""


def load_config(defaults: dict, path: Path | None, overrides: dict) -> dict:
    settings = copy.deepcopy(defaults)
    if path is not None:
        try:
            raw = tomllib.loads(Path(path).read_text())
        except FileNotFoundError:
            raise ConfigError(f"config file {path} does not exist") from None
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError(f"{path}: not valid TOML ({exc})") from None
        for table, values in raw.items():
            if table not in settings or not isinstance(values, dict):
                raise ConfigError(f"{path}: unknown table [{table}]; known: {', '.join(settings)}")
            for key, value in values.items():
                if key not in settings[table]:
                    raise ConfigError(f"{path}: unknown setting {table}.{key}; known: {', '.join(settings[table])}")
                expected = type(defaults[table][key])
                if expected is float and isinstance(value, int):
                    value = float(value)
                if not isinstance(value, expected):
                    raise ConfigError(f"{path}: {table}.{key} must be {expected.__name__}, not {value!r}")
                settings[table][key] = value
    for table, values in overrides.items():
        for key, value in values.items():
            if value is not None:
                settings[table][key] = value
    return settings
