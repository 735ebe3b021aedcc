"""Files addressed by content: sha256 hashing, atomic writes, verified reads.

Everything the device keeps on disk (graphs, weights, checkpoints, caches) is written to
a temporary name and renamed into place, so a crash never leaves a half-written file
under a real name.
"""
from __future__ import annotations

import hashlib
import os
from pathlib import Path

from edge_runtime.errors import IntegrityError

CHUNK_BYTES = 1 << 20


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(CHUNK_BYTES), b""):
            h.update(chunk)
    return h.hexdigest()


def atomic_write_bytes(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def atomic_write_text(path: Path, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def read_verified(path: Path, expected_sha256: str, what: str) -> bytes:
    """Read a file and check it against its content address; raise IntegrityError if not."""
    try:
        data = Path(path).read_bytes()
    except FileNotFoundError:
        raise IntegrityError(f"{what}: file {path} is missing") from None
    actual = sha256_bytes(data)
    if actual != expected_sha256:
        raise IntegrityError(f"{what}: {path} has sha256 {actual[:12]}…, expected {expected_sha256[:12]}… "
                             f"(corrupted or truncated; fetch it again)")
    return data


def digest_of(*parts: str) -> str:
    """A stable key from several strings (graph hashes, settings)."""
    h = hashlib.sha256()
    for p in parts:
        h.update(p.encode("utf-8"))
        h.update(b"\0")
    return h.hexdigest()


TOML_INTS = (-2 ** 63, 2 ** 63 - 1)   # TOML's integer range: a decoder must refuse what it cannot hold losslessly


def read_toml(path: Path, error: type[Exception]) -> dict:
    """Parse a TOML settings file, raising `error` that names the file when it is missing, unreadable or not TOML."""
    try:
        import tomllib
    except ModuleNotFoundError:  # Python < 3.11
        import tomli as tomllib
    try:
        text = Path(path).read_text(encoding="utf-8")   # TOML is UTF-8
    except FileNotFoundError:
        raise error(f"config file {path} does not exist") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise error(f"config file {path} cannot be read ({exc})") from None
    try:
        return tomllib.loads(text)
    except ValueError as exc:   # TOMLDecodeError, or a decimal integer of more digits than Python parses
        raise error(f"{path}: not valid TOML ({str(exc)[:200]})") from None
    except RecursionError:   # tomllib recurses once per level of nested arrays and inline tables
        raise error(f"{path}: not valid TOML (arrays or tables nested too deeply)") from None


def read_json(path: Path, error: type[Exception], what: str):
    """Parse a JSON file, raising `error` that names the file when it is missing or not JSON."""
    import json
    try:
        return json.loads(Path(path).read_text())
    except FileNotFoundError:
        raise error(f"{what} {path} does not exist") from None
    except (ValueError, RecursionError) as exc:   # not JSON, not UTF-8, nested too deep, a 4300+ digit number
        raise error(f"{what} {path} is not valid JSON: {str(exc)[:200]}") from None
