"""What the fuzz tests share: hostile values, mutations of a valid document, a TOML writer, and the one check.

Every decoder has one clean rejection (ProtocolError, IntegrityError, ManifestError, ...). `accepted_or`
runs a decoder and lets only that rejection through; any other exception escapes with a note naming the
decoder, so hypothesis reports the input, the exception and where it was raised.
"""
from __future__ import annotations

import copy
import json
import math

from hypothesis import HealthCheck, settings
from hypothesis import strategies as st

# Deterministic (same examples on every run, no example database), no per-example deadline: a loaded
# 2-core CI machine must not turn a slow example into a failure.
FUZZ = settings(max_examples=60, deadline=None, derandomize=True, database=None, print_blob=False,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                                       HealthCheck.filter_too_much, HealthCheck.large_base_example])


def accepted_or(rejection: type[BaseException], decode, *args):
    """decode(*args), or None when it raised exactly `rejection`; any other exception fails the test."""
    try:
        return decode(*args)
    except rejection as exc:
        assert type(exc) is rejection, f"{type(exc).__name__} raised where {rejection.__name__} is documented"
        return None
    except Exception as exc:
        exc.add_note(f"fuzz: {getattr(decode, '__qualname__', decode)} must return or raise "
                     f"{rejection.__name__}, not {type(exc).__name__}")
        raise


# -- hostile values ----------------------------------------------------------------------

# Numbers at and past every boundary the decoders name: exact in a float, 64-bit, float overflow
# (10**400 parses as an int but not as a float), just under Python's 4300-digit parsing limit.
HUGE_INTS = st.sampled_from([2 ** 31, 2 ** 44, 2 ** 53, 2 ** 53 + 1, 2 ** 63, 2 ** 64, -2 ** 63 - 1,
                             10 ** 15 + 1, 10 ** 308, 10 ** 309, 10 ** 400, -10 ** 400, 10 ** 4000])
ODD_TEXT = st.sampled_from(["", " ", "0", "-1", "1.5", "²", "١٢", "𝟘", "head", "online", "train", "..",
                            "../etc", "/", "a/b", "\x00", "\n", "\ud800", "é" * 300, "x" * 3000,
                            "[" * 20, "{\"type\":\"ack\"}", "NaN", "Infinity"])
JSON_SCALARS = (st.none() | st.booleans() | st.integers() | HUGE_INTS
                | st.floats(allow_nan=True, allow_infinity=True) | st.text(max_size=40) | ODD_TEXT)
JSON_VALUES = st.recursive(
    JSON_SCALARS,
    lambda inner: st.lists(inner, max_size=5) | st.dictionaries(st.text(max_size=12) | ODD_TEXT, inner, max_size=5),
    max_leaves=24)


def json_bytes(value) -> bytes:
    """JSON as Python writes it: NaN and Infinity as bare literals, as a hostile peer may send them."""
    return json.dumps(value).encode()


def tweaks(value) -> st.SearchStrategy:
    """Values near `value`: its boundaries, its neighbours, the same thing as another type."""
    if isinstance(value, bool):
        return st.sampled_from([not value, int(value), str(value).lower(), None])
    if isinstance(value, int):
        return st.sampled_from([value - 1, value + 1, -value, -1, 0, value * 2 ** 40, str(value), 10 ** 400,
                                float(value) if abs(value) < 2 ** 1000 else 1e308, float("inf"), float("nan"), True])
    if isinstance(value, float):
        return st.sampled_from([-value, 0.0, -0.0, 5e-324, 1e15, 1e16, 1e308, float("inf"), float("-inf"),
                                float("nan"), math.floor(value) if math.isfinite(value) else 0, str(value), 10 ** 400])
    if isinstance(value, str):
        return st.sampled_from(["", value * 100, value + "/", "../" + value, value.upper(), value + "\x00",
                                value[:-1], [value], 1]) | ODD_TEXT
    if isinstance(value, list):
        return st.sampled_from([[], value + value, value[::-1], [value], {str(i): v for i, v in enumerate(value)},
                                value * 2000, None])
    if isinstance(value, dict):
        return st.sampled_from([{}, list(value), list(value.values()), [value], None, {**value, **value}])
    return JSON_VALUES


# -- mutations of a valid document ----------------------------------------------------------

def _at(tree, path):
    for step in path:
        tree = tree[step]
    return tree


def _draw_path(draw, tree) -> tuple:
    """A path from the root to some node, walked down one random child at a time (a list of thousands of
    elements costs no more than a short one)."""
    path, node = (), tree
    while isinstance(node, (dict, list)) and node and draw(st.integers(0, 4)) > 0:
        step = draw(st.sampled_from(list(node))) if isinstance(node, dict) else draw(st.integers(0, len(node) - 1))
        path, node = path + (step,), node[step]
    return path


@st.composite
def mutated(draw, tree, keys=(), max_mutations: int = 3):
    """`tree` (a JSON-like value) after one to `max_mutations` edits: a node replaced by a nearby or a
    hostile value, removed, or given an extra key or element. `keys` are names worth inserting."""
    tree = copy.deepcopy(tree)
    for _ in range(draw(st.integers(1, max_mutations))):
        path = _draw_path(draw, tree)
        node = _at(tree, path)
        action = draw(st.sampled_from(["replace", "tweak", "delete", "insert"]))
        if action == "insert" and isinstance(node, (dict, list)):
            value = draw(JSON_VALUES)
            if isinstance(node, dict):
                node[draw(st.sampled_from(list(keys) or ["extra"]) | st.text(max_size=8))] = value
            else:
                node.insert(draw(st.integers(0, len(node))), value)
            continue
        if action == "delete" and path:
            parent = _at(tree, path[:-1])
            del parent[path[-1]]
            continue
        value = draw(tweaks(node) if action == "tweak" else JSON_VALUES)
        if not path:
            tree = value
        else:
            _at(tree, path[:-1])[path[-1]] = value
        if not isinstance(tree, (dict, list)):
            break
    return tree


# -- TOML -------------------------------------------------------------------------------

class RawToml(str):
    """A TOML literal written as is (a date-time, or a deliberately broken value)."""


def toml_value(value) -> str:
    if isinstance(value, RawToml):
        return str(value)
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        if math.isnan(value):
            return "nan"
        return ("inf" if value > 0 else "-inf") if math.isinf(value) else repr(value)
    if isinstance(value, str):
        return _toml_string(value)
    if isinstance(value, list):
        return "[" + ", ".join(toml_value(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{" + ", ".join(f"{toml_key(k)} = {toml_value(v)}" for k, v in value.items()) + "}"
    raise TypeError(f"no TOML for {value!r}")


def _toml_string(text: str) -> str:
    """A TOML basic string: JSON's escapes are TOML's, and TOML wants DEL escaped too."""
    return json.dumps(text, ensure_ascii=False).replace("\x7f", "\\u007f")


def toml_key(key: str) -> str:
    return _toml_string(key)


def toml_document(doc: dict) -> str:
    """Top-level keys first, then one [table] per dict-valued key."""
    lines = [f"{toml_key(k)} = {toml_value(v)}" for k, v in doc.items() if not isinstance(v, dict)]
    for name, table in doc.items():
        if isinstance(table, dict):
            lines.append(f"[{toml_key(name)}]")
            lines.extend(f"{toml_key(k)} = {toml_value(v)}" for k, v in table.items())
    return "\n".join(lines) + "\n"


TOML_SCALARS = (st.booleans() | st.integers() | HUGE_INTS | st.floats() | st.text(max_size=30)
                | st.sampled_from(["", "²", "x" * 500, "pi", "mqtt://h:1"])
                | st.sampled_from([RawToml("1979-05-27T07:32:00Z"), RawToml("1979-05-27"), RawToml("07:32:00"),
                                   RawToml("0x7fff"), RawToml("1_000"), RawToml("'literal'"), RawToml("+inf"),
                                   RawToml("\"\"\"multi\nline\"\"\""), RawToml("="), RawToml("[1, \"a\"]")]))
TOML_VALUES = st.recursive(TOML_SCALARS,
                           lambda inner: st.lists(inner, max_size=4)
                           | st.dictionaries(st.text(max_size=8), inner, max_size=4),
                           max_leaves=12)
