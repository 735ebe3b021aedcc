"""The bundle's files beside its wheels: device.toml, the tier file, the systemd unit, install.sh,
the broker files and README.txt. The text ones are templates in templates/, filled with this bundle's
facts; only what varies in shape (the settings a device has, the README's table) is built here."""
from __future__ import annotations

import json
import shlex
import shutil
from pathlib import Path

from coordinator.ops.bundle_credentials import BROKER_FILES, write_broker_files
from coordinator.ops.bundle_request import CONFIG_DIR, SERVICE_USER, UNIT, VENV, Bundle
from coordinator.ops.template_files import fill
from coordinator.ops.wheels import GLIBC, PYTHON

# What device.toml says of each broker file's setting, and README.txt of the file.
_SETTING_COMMENTS = {"tls_ca": "the CA the broker's certificate must chain to",
                     "tls_cert": "this device's client certificate",
                     "password_file": "the broker password on its first line (mode 600)",
                     "tls_key": "the client certificate's key (mode 600)"}
_README_ROWS = {"tls_ca": "the CA the broker's certificate must chain to (TLS)",
                "tls_cert": "the client certificate the broker asks for",
                "password_file": "the broker password of user {username} (mode 600)",
                "tls_key": "the client certificate's key (mode 600)"}


def write_files(root: Path, bundle: Bundle, project: Path) -> None:
    """Everything but the wheels, which `root`/wheels already holds (README.txt counts them)."""
    (root / "device.toml").write_text(device_toml(bundle))
    shutil.copy2(bundle.tier.path, root / f"{bundle.tier.name}.toml")
    (root / UNIT).write_text(fill(UNIT, _facts(bundle)))
    (root / "install.sh").write_text(install_script(bundle))
    (root / "install.sh").chmod(0o755)
    write_broker_files(root, bundle.broker_files)
    (root / "README.txt").write_text(readme(bundle, project, sorted(root.glob("wheels/*.whl"))))


def _facts(b: Bundle) -> dict[str, str]:
    """What the templates may say of this bundle, by placeholder name."""
    return {"device_id": b.device_id, "tier": b.tier.name, "fleet": b.fleet, "arch": b.arch, "name": b.name,
            "data_dir": b.data_dir, "state_dir": b.state_dir, "memory_max": b.memory_max,
            "python": PYTHON, "glibc": f"{GLIBC[0]}.{GLIBC[1]}",
            "venv": VENV, "config_dir": CONFIG_DIR, "service_user": SERVICE_USER, "unit": UNIT}


def device_toml(b: Bundle) -> str:
    """The agent's [device] table for the default layout; install.sh moves every path under CONFIG_DIR
    (the tier file, the broker files) with --config-dir."""
    settings = [("id", b.device_id, ""),
                ("tier", f"{CONFIG_DIR}/{b.tier.name}.toml", ""),
                ("fleet", b.fleet, ""),
                ("broker", b.broker, "")]
    if b.username:
        settings.append(("username", b.username, "the broker login; the fleet's ACL knows the device by it"))
    settings += [(key, f"{CONFIG_DIR}/{BROKER_FILES[key].name}", _SETTING_COMMENTS[key])
                 for key, _source in b.broker_files]
    settings += [("data", b.data_dir, "inputs.npy (float32) and labels.npy (int64): this board's data"),
                 ("state", b.state_dir, "blobs, caches, checkpoints: kept across restarts")]
    lines = []
    for key, value, comment in settings:
        line = f"{key} = {json.dumps(value)}"   # a JSON string or number is a TOML one
        lines.append(f"{line:<43} # {comment}" if comment else line)   # a space before '#' even when long
    return fill("device.toml", {**_facts(b), "settings": "\n".join(lines)})


def install_script(b: Bundle) -> str:
    """install.sh: this bundle's facts, shell-quoted, in the script that is the same for every bundle."""
    carried = [BROKER_FILES[key] for key, _source in b.broker_files]
    facts = {**_facts(b), "public_files": " ".join(file.name for file in carried if not file.secret),
             "secret_files": " ".join(file.name for file in carried if file.secret)}
    return fill("install.sh", {key: shlex.quote(value) for key, value in facts.items()})


def readme(b: Bundle, project: Path, wheels: list[Path]) -> str:
    megabytes = sum(w.stat().st_size for w in wheels) / 1e6
    rows = [("wheels/", f"{project.name} and its device dependencies: {len(wheels)} wheels, {megabytes:.0f} MB, "
                        "no torch"),
            ("device.toml", f"the agent's settings: broker {b.broker}, fleet {b.fleet}; the budget is the tier's"),
            (f"{b.tier.name}.toml", f"the tier file ({b.tier.description})"),
            (UNIT, f"systemd unit: the agent as user {SERVICE_USER}, MemoryMax={b.memory_max}, restarts on failure")]
    rows += [(BROKER_FILES[key].name, _README_ROWS[key].format(username=b.username)) for key, _ in b.broker_files]
    rows.append(("install.sh", "installs all of it from wheels/ only: no network needed"))
    facts = {**_facts(b), "contents": "\n".join(f"  {name:<21} {what}" for name, what in rows)}
    text = fill("README.txt", facts)
    if b.secret:
        text += fill("README-secret.txt", facts)
    return text
