"""The production broker's files a bundle may carry (docs/broker.md): its CA, this device's
password, and a client certificate with its key.

Each is checked here as the agent will check its copy on the board, so that a bad one fails at
once with its flag's name and not on the board at its first connection; and a secret is written
into the bundle mode 600, never readable by others for a moment.
"""
from __future__ import annotations

import argparse
import os
import re
import stat
from pathlib import Path
from typing import NamedTuple

from coordinator.ops.bundle_errors import BundleError, warn
from edge_runtime.wire.mqtt_link import LinkConfigError, LinkSecurity


class BrokerFile(NamedTuple):
    flag: str        # the edge-bundle flag that gives it
    name: str        # its name in the bundle and in the board's config directory
    secret: bool     # a password or key: mode 600, the service user's


# Keyed by device.toml's setting for each, in the order the bundle lists them.
BROKER_FILES = {"tls_ca": BrokerFile("--tls-ca", "ca.crt", False),
                "tls_cert": BrokerFile("--tls-cert", "client.crt", False),
                "password_file": BrokerFile("--password-file", "password", True),
                "tls_key": BrokerFile("--tls-key", "client.key", True)}
# The first line of Mosquitto's own password file (user:$7$...): not the password a device sends.
HASHED_PASSWORD = re.compile(r"^[^:\s]+:\$\d+\$")

# (device.toml setting, source file) of each broker file a bundle carries, in BROKER_FILES' order
Carried = tuple[tuple[str, Path], ...]


def check_broker_files(args: argparse.Namespace, tls: bool) -> Carried:
    """The broker files given, each checked as the agent will check its copy."""
    given = {key: (file.flag, Path(getattr(args, key)).expanduser().resolve())
             for key, file in BROKER_FILES.items() if getattr(args, key)}
    tls_flags = [flag for key, (flag, _) in given.items() if key != "password_file"]
    if tls_flags and not tls:
        raise BundleError(f"{', '.join(tls_flags)} given but --broker {args.broker} is plain MQTT: "
                          f"a production broker's TLS address is mqtts://host:8883")
    if ("tls_cert" in given) != ("tls_key" in given):
        raise BundleError("--tls-cert and --tls-key go together: a client certificate and its key, each in a "
                          "file of its own")
    for key, (flag, path) in given.items():
        _CHECKS[key](flag, path, _read(flag, path))
    if tls_flags:
        _check_tls(given)
    return tuple((key, path) for key, (_flag, path) in given.items())


def _read(flag: str, path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise BundleError(f"{flag} {path}: no such file") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise BundleError(f"{flag} {path}: cannot be read ({getattr(exc, 'strerror', None) or exc})") from None


def _check_certificate(flag: str, path: Path, text: str) -> None:
    if "-----BEGIN CERTIFICATE-----" not in text:
        raise BundleError(f"{flag} {path}: not a PEM certificate (no -----BEGIN CERTIFICATE----- line)")
    if "PRIVATE KEY-----" in text:
        raise BundleError(f"{flag} {path} holds a private key as well, which would be installed readable by "
                          f"every user (mode 644): give a file with the certificate only (a client key: --tls-key)")


def _check_key(flag: str, path: Path, text: str) -> None:
    if not re.search(r"-----BEGIN [A-Z ]*PRIVATE KEY-----", text):
        raise BundleError(f"{flag} {path}: not a PEM private key (no -----BEGIN ... PRIVATE KEY----- line)")
    if "ENCRYPTED" in text:
        raise BundleError(f"{flag} {path} is encrypted: the agent starts unattended and cannot ask for its "
                          f"passphrase; give it the key unencrypted (openssl pkey -in KEY -out KEY.plain)")
    _check_private(flag, path)


def _check_password(flag: str, path: Path, text: str) -> None:
    """The agent sends the first line of the file: it must be there, and not be a broker's hash."""
    first = text.splitlines()[0] if text else ""
    if not first:
        raise BundleError(f"{flag} {path} is empty: it holds the password on its first line, as "
                          f"deploy/mosquitto/make-secrets.sh writes passwords/<device id>")
    if HASHED_PASSWORD.match(first):
        raise BundleError(f"{flag} {path} holds user:hash lines: that is the broker's password file, not a "
                          f"device's; pass passwords/<device id> from make-secrets.sh users")
    _check_private(flag, path)


def _check_private(flag: str, path: Path) -> None:
    """A secret that every user here could read may be known already: refused. Group-readable is a choice
    (an operators' group), worth a warning only; the bundle's copy is mode 600 either way."""
    mode = stat.S_IMODE(path.stat().st_mode)
    if mode & stat.S_IRWXO:
        raise BundleError(f"{flag} {path} is open to every user on this machine (mode {mode:o}): "
                          f"chmod 600 it, and if others could have read it, make a new one")
    if mode & stat.S_IRWXG:
        warn(f"{flag} {path} is readable by its group (mode {mode:o}): chmod 600 it unless that is meant")


_CHECKS = {"tls_ca": _check_certificate, "tls_cert": _check_certificate, "password_file": _check_password,
           "tls_key": _check_key}


def _check_tls(given: dict[str, tuple[str, Path]]) -> None:
    """The agent's own TLS set-up, run here: a CA that does not load, or a key that is not its
    certificate's, fails now."""
    path = {key: str(file) for key, (_flag, file) in given.items()}
    try:
        LinkSecurity(tls=True, ca_file=path.get("tls_ca", ""), cert_file=path.get("tls_cert", ""),
                     key_file=path.get("tls_key", "")).ssl_context()
    except LinkConfigError as exc:   # it names the agent's settings; here they are flags
        raise BundleError(re.sub(r"\btls_(ca|cert|key)\b", r"--tls-\1", str(exc))) from None


def write_broker_files(root: Path, carried: Carried) -> None:
    """Certificates as given; a secret is created mode 600, and of a password file only its first
    line is kept: the line the agent sends."""
    for key, source in carried:
        file = BROKER_FILES[key]
        data = source.read_bytes()
        if key == "password_file":
            data = data.decode("utf-8").splitlines()[0].encode("utf-8") + b"\n"
        fd = os.open(root / file.name, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600 if file.secret else 0o644)
        with os.fdopen(fd, "wb") as out:
            out.write(data)
        (root / file.name).chmod(0o600 if file.secret else 0o644)   # whatever the umask
