"""edge-bundle: everything one board needs to join a fleet, as a directory and a .tar.gz.

Boards rarely have a compiler or a quick way to PyPI, and a pip resolve on a 512 MB board
can fail for memory alone. So the bundle is built on the coordinator's side and carries:
every wheel the device runtime needs for the board's platform and CPython 3.11 (never
torch), the agent's settings for this one device, its tier file, a systemd unit under which
the kernel enforces the tier's memory budget, and install.sh, which installs from the
bundled wheels only. For a production broker (docs/broker.md) it also carries the broker's
CA, this device's password and, if the broker asks for one, its client certificate.
See docs/flashing.md.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import shlex
import shutil
import stat
import subprocess
import sys
import tarfile
import tempfile
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

try:
    import tomllib
except ModuleNotFoundError:  # Python < 3.11
    import tomli as tomllib

from edge_runtime.device.tiers import DEFAULT_PROFILES_DIR, Tier, TierError, find_tier
from edge_runtime.memory import MIB
from edge_runtime.wire.mqtt_link import LinkConfigError, LinkSecurity, parse_broker_address
from edge_runtime.wire.protocol import ProtocolError, Topics, check_id

REPO = Path(__file__).resolve().parents[2]
# What the project's wheel is built from: pyproject's packages.find and its readme.
WHEEL_SOURCES = ("pyproject.toml", "README.md", "edge_runtime", "coordinator")
PYTHON = "3.11"          # the boards' CPython: Raspberry Pi OS and Debian 12 ship 3.11
# The oldest glibc the bundled wheels may need. onnxruntime-training-cpu's x86_64 wheel needs 2.28.
GLIBC = (2, 28)
ARCHES = ("x86_64", "aarch64")
NO_PYPI_WHEEL = {"aarch64": "onnxruntime-training-cpu"}   # device dependencies PyPI has no wheel of
VENV = "/opt/edgeblock/venv"
CONFIG_DIR = "/etc/edgeblock"
DATA_DIR = "/var/lib/edgeblock/data"
STATE_DIR = "/var/lib/edgeblock/state"
SERVICE_USER = "edgeblock"
UNIT = "edge-device.service"
# The broker files a bundle may carry: device.toml's setting for each, the flag that gives it, its name
# in the bundle and in the config directory, and whether it is a secret (mode 600, the service user's).
BROKER_FILES = {"tls_ca": ("--tls-ca", "ca.crt", False), "tls_cert": ("--tls-cert", "client.crt", False),
                "password_file": ("--password-file", "password", True), "tls_key": ("--tls-key", "client.key", True)}
# The first line of Mosquitto's own password file (user:$7$...): not the password a device sends.
HASHED_PASSWORD = re.compile(r"^[^:\s]+:\$\d+\$")
# What pip prints (in its retry warnings) when it fails for want of the network rather than of a wheel.
NETWORK_TROUBLE = re.compile(r"NewConnectionError|Failed to establish a new connection|NameResolutionError|"
                             r"Temporary failure in name resolution|Name or service not known|Network is unreachable|"
                             r"ConnectTimeout|ReadTimeout|ProxyError|SSLError")
PYPI = "https://pypi.org/simple/"

BUILD_ORT_AARCH64 = """\
onnxruntime-training-cpu {version} for linux-aarch64 is built from source on an aarch64 machine
running the boards' OS and Python {python}: a board with 4 GB of RAM or more (add swap), or an
arm64 VM; a 512 MB board cannot link it. It takes hours on a Raspberry Pi 4.

  sudo apt-get install -y build-essential git python3-dev python3-venv
  python3 -m venv ~/ort-build && . ~/ort-build/bin/activate
  pip install "cmake>=3.26,<4" numpy packaging setuptools wheel
  git clone --recursive --depth 1 --branch v{version} https://github.com/microsoft/onnxruntime
  cd onnxruntime
  ORT_DISABLE_PYTHON_PACKAGE_LOCAL_VERSION=1 python tools/ci_build/build.py --build_dir build \\
      --config Release --enable_training --build_wheel --skip_tests --parallel 2 \\
      --compile_no_warning_as_error          # as root, add --allow_running_as_root

The wheel is build/Release/dist/onnxruntime_training_cpu-{version}-cp311-cp311-linux_aarch64.whl.
ORT_DISABLE_PYTHON_PACKAGE_LOCAL_VERSION=1 gives it that name; without it the build names it
onnxruntime_training-{version}+cpu, which does not satisfy the device's dependency.
Pass the wheel to edge-bundle with --extra-wheel."""


class BundleError(Exception):
    """A bundle that cannot be built; the message says why and what to do."""


@dataclass(frozen=True)
class Bundle:
    """What to build, checked."""
    tier: Tier
    device_id: str
    fleet: str
    broker: str               # as edge-device takes it: mqtt://host:port, host:port or host
    arch: str
    data_dir: str
    state_dir: str
    extra_wheels: tuple[Path, ...]
    username: str = ""        # the broker login; "" = anonymous
    # (device.toml setting, source file) of each broker file the bundle carries, in BROKER_FILES' order
    broker_files: tuple[tuple[str, Path], ...] = field(default=(), repr=False)

    @property
    def name(self) -> str:
        return f"edgeblock-{self.device_id}-{self.tier.name}-{self.arch}"

    @property
    def memory_max(self) -> str:
        """The whole device's budget (the jobs' budget_mb plus the agent's reserve) as systemd's MemoryMax
        (M is MiB there): the unit's cgroup holds the agent and every training job it starts."""
        budget = self.tier.device_budget_bytes
        return f"{budget // MIB}M" if budget % MIB == 0 else str(budget)

    @property
    def secret(self) -> bool:
        """Whether the bundle holds a password or a key, so that the archive must be private too."""
        return any(BROKER_FILES[key][2] for key, _ in self.broker_files)


# -- checking the request ----------------------------------------------------------------------

def check(args: argparse.Namespace) -> Bundle:
    """Every input checked before anything is built, so a mistake costs no download."""
    if not (REPO / "pyproject.toml").is_file():
        raise BundleError(f"edge-bundle builds the project's wheel from a source checkout; {REPO} is not one")
    try:
        tier = find_tier(args.tier)
    except TierError as exc:
        raise BundleError(f"--tier: {exc}") from None
    try:
        device_id = check_id(args.device_id, "--device-id")
        fleet = Topics(args.fleet).fleet
    except ProtocolError as exc:
        raise BundleError(str(exc)) from None
    for flag, path in (("--data-dir", args.data_dir), ("--state-dir", args.state_dir)):
        if not path.startswith("/"):
            raise BundleError(f"{flag} {path!r}: must be an absolute path on the board")
    broker = _broker_url(args.broker)
    files = _broker_files(args, parse_broker_address(broker).tls)
    username = _username(args.username, device_id, files)
    _warn_login(broker, username, device_id, files)
    return Bundle(tier=tier, device_id=device_id, fleet=fleet, broker=broker, arch=args.platform,
                  data_dir=args.data_dir.rstrip("/"), state_dir=args.state_dir.rstrip("/"),
                  extra_wheels=_extra_wheels(args.extra_wheel, args.platform), username=username,
                  broker_files=files)


def _broker_url(text: str) -> str:
    """The address as given, once edge-device's own parser accepts it: the agent reads it the same way."""
    try:
        host = parse_broker_address(text).host
    except ValueError as exc:
        raise BundleError(f"--broker: {exc}") from None
    if _loopback(host):
        _warn(f"--broker {text} is a loopback address: on a board it names the board itself")
    return text.strip()


def _loopback(host: str) -> bool:
    return host == "localhost" or host.startswith("127.") or host == "::1"


def _extra_wheels(paths: list[str], arch: str) -> tuple[Path, ...]:
    """The --extra-wheel files; where PyPI lacks a dependency's wheel, one of them must be it."""
    wheels = tuple(Path(p).expanduser().resolve() for p in paths)
    for wheel in wheels:
        if not wheel.is_file():
            raise BundleError(f"--extra-wheel {wheel}: no such file")
        _name, _version, pythons, platforms = _wheel_tags(wheel)
        if not {"cp311", "py3", "py311"} & set(pythons):
            raise BundleError(f"--extra-wheel {wheel.name} is for {'.'.join(pythons)}, not CPython {PYTHON}: "
                              f"build it with Python {PYTHON}")
        if not any(p == "any" or p.endswith(f"_{arch}") for p in platforms):
            raise BundleError(f"--extra-wheel {wheel.name} is for {'.'.join(platforms)}, not linux {arch}")
    missing = NO_PYPI_WHEEL.get(arch)
    if missing:
        version = _pinned(missing)
        if not any(_wheel_tags(w)[:2] == (_normalise(missing), version) for w in wheels):
            given = ", ".join(w.name for w in wheels) or "none"
            raise BundleError(f"PyPI has no linux-{arch} wheel of {missing}=={version} (its wheels are x86_64 "
                              f"only), which the device runtime needs, and no --extra-wheel is one (given: {given})."
                              f"\n\n"
                              + BUILD_ORT_AARCH64.format(version=version, python=PYTHON))
    return wheels


def _wheel_tags(path: Path) -> tuple[str, str, list[str], list[str]]:
    """(normalised name, version, python tags, platform tags) from a wheel's file name."""
    parts = path.name[:-len(".whl")].split("-") if path.name.endswith(".whl") else []
    if len(parts) not in (5, 6):
        raise BundleError(f"{path.name}: not a wheel's file name (name-version-python-abi-platform.whl)")
    return _normalise(parts[0]), parts[1], parts[-3].split("."), parts[-1].split(".")


def _normalise(name: str) -> str:
    return re.sub(r"[-_.]+", "_", name).lower()


def _pinned(name: str) -> str:
    """The version pyproject.toml pins a device dependency to (`name==X`)."""
    dependencies = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["dependencies"]
    for dependency in dependencies:
        found = re.fullmatch(rf"{re.escape(name)}\s*==\s*([^\s;]+)\s*(;.*)?", dependency.strip())
        if found:
            return found.group(1)
    raise BundleError(f"pyproject.toml does not pin {name} ({name}==VERSION in [project] dependencies)")


def _warn(message: str) -> None:
    print(f"edge-bundle: warning: {message}", file=sys.stderr)


# -- checking the production broker's files ----------------------------------------------------

def _broker_files(args: argparse.Namespace, tls: bool) -> tuple[tuple[str, Path], ...]:
    """The broker files given, each checked as the agent will check its copy on the board, so that a
    bad one fails here with its flag's name and not on the board at its first connection."""
    given = {key: (flag, Path(getattr(args, key)).expanduser().resolve())
             for key, (flag, _name, _secret) in BROKER_FILES.items() if getattr(args, key)}
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
        _warn(f"{flag} {path} is readable by its group (mode {mode:o}): chmod 600 it unless that is meant")


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


def _username(given: str | None, device_id: str, files: tuple[tuple[str, Path], ...]) -> str:
    """The agent's own default: with a password, the device id, the name the fleet's ACL confines it by."""
    if given:
        return given
    return device_id if "password_file" in dict(files) else ""


def _warn_login(broker: str, username: str, device_id: str, files: tuple[tuple[str, Path], ...]) -> None:
    """What the agent would accept but the fleet's broker most likely not, or only at a cost."""
    password = dict(files).get("password_file")
    if username and username != device_id:
        _warn(f"--username {username} is not the device id {device_id}: the ACL `edge-coordinator acl` writes "
              f"lets a device use only the topics of its own user name")
    if password is not None and password.parent.name == "passwords" and password.name != username:
        _warn(f"--password-file {password} is {password.name}'s (make-secrets.sh names each user's file after "
              f"it), but the login is {username}")
    address = parse_broker_address(broker)
    if password is not None and not address.tls and not _loopback(address.host):
        _warn(f"--broker {broker} is plain MQTT: {username}'s password would cross the network in clear text; "
              f"use mqtts://{address.host}:8883 with --tls-ca")


# -- building ---------------------------------------------------------------------------------

def build(bundle: Bundle, out: Path) -> tuple[Path, Path]:
    """Build the bundle next to its final place, then swap it in: a failed build leaves the old one."""
    target = out / bundle.name
    if target.exists() and not (target / "install.sh").is_file():
        raise BundleError(f"{target} exists and is not a bundle: remove it or choose another --out")
    out.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{bundle.name}.", dir=out))
    try:
        staging.chmod(0o755)   # mkdtemp's 0700 would lock other users out of the bundle
        wheels = staging / "wheels"
        wheels.mkdir()
        project = _project_wheel(wheels)
        for extra in bundle.extra_wheels:
            shutil.copy2(extra, wheels)
        _download(project, wheels, bundle.arch)
        _refuse_torch(wheels)
        _write_files(staging, bundle, project)
        if target.exists():
            shutil.rmtree(target)
        staging.rename(target)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return target, _archive(target, bundle.secret)


def _project_wheel(dest: Path) -> Path:
    """The project's wheel, built from a copy of its sources: an in-tree build would leave build/ in
    the checkout, and a module deleted from the sources could linger in the wheel from there."""
    print("edge-bundle: building the edgeblock wheel", flush=True)
    with tempfile.TemporaryDirectory(prefix="edge-bundle-src.") as tmp:
        src = Path(tmp)
        for name in WHEEL_SOURCES:
            if (REPO / name).is_dir():
                shutil.copytree(REPO / name, src / name, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
            else:
                shutil.copy2(REPO / name, src / name)
        _pip(["wheel", "--no-deps", "--wheel-dir", str(dest), str(src)], "building the edgeblock wheel")
    return next(dest.glob("edgeblock-*.whl"))


def platform_tags(arch: str) -> list[str]:
    """pip's --platform values for a board with glibc >= GLIBC. pip matches tags exactly and does not
    widen manylinux_2_28 to older ones, so every accepted tag is listed; linux_<arch> admits a wheel
    built on a board (an --extra-wheel)."""
    modern = [f"manylinux_{GLIBC[0]}_{minor}_{arch}" for minor in range(GLIBC[1], 16, -1)]
    legacy = ["manylinux2014"] + (["manylinux2010", "manylinux1"] if arch == "x86_64" else [])
    return modern + [f"{name}_{arch}" for name in legacy] + [f"linux_{arch}"]


def _download(project: Path, wheels: Path, arch: str) -> None:
    """The project's device dependencies (not its extras), resolved for the board, not for this machine."""
    if f"{sys.version_info[0]}.{sys.version_info[1]}" != PYTHON:
        _warn(f"this is Python {sys.version_info[0]}.{sys.version_info[1]}: pip evaluates dependency markers for "
              f"it, not for the board's {PYTHON} (pypa/pip#11010); if install.sh then misses a wheel, "
              f"run edge-bundle under Python {PYTHON}")
    doing = f"downloading the device's wheels for linux {arch}, CPython {PYTHON}"
    print(f"edge-bundle: {doing} (about 60 MB unless pip has them cached)", flush=True)
    args = ["download", "--dest", str(wheels), "--find-links", str(wheels), "--only-binary=:all:",
            "--python-version", PYTHON, "--implementation", "cp"]
    for tag in platform_tags(arch):
        args += ["--platform", tag]
    _pip(args + [str(project)], doing, arch)


def _pip(args: list[str], doing: str, arch: str | None = None) -> None:
    proc = subprocess.run([sys.executable, "-m", "pip", *args], capture_output=True, text=True)
    if proc.returncode != 0:
        raise BundleError(_pip_failure(doing, proc.returncode, proc.stdout + proc.stderr, arch))


def _pip_failure(doing: str, code: int, output: str, arch: str | None) -> str:
    """What went wrong in words an operator can act on, then pip's own last lines."""
    missing = re.search(r"No matching distribution found for (\S+)", output)
    network = NETWORK_TROUBLE.search(output) is not None
    silent = [] if network else _silent_indexes(output)
    if network or silent:
        why = ("pip cannot reach the package index" + (f" ({'; '.join(silent)})" if silent else "") +
               ". edge-bundle fetches the board's wheels from PyPI, or from the index pip is configured "
               "with (`pip config list`, PIP_INDEX_URL): check this machine's network and proxy, or run "
               "edge-bundle where the index is reachable")
    elif missing and arch:
        why = (f"the index has no wheel of {missing.group(1)} for linux {arch}, CPython {PYTHON}, glibc "
               f"{GLIBC[0]}.{GLIBC[1]}: build one on an {arch} machine with Python {PYTHON} "
               f"(`pip wheel --no-deps '{missing.group(1)}'`) and pass it with --extra-wheel")
    else:
        why = f"pip exited with code {code}"
    tail = [line for line in output.splitlines() if line.strip()][-12:]
    return f"{doing} failed: {why}.\npip said:\n  " + "\n  ".join(tail)


def _silent_indexes(output: str) -> list[str]:
    """The http(s) indexes pip looked in (PyPI unless it names others) that do not answer from here.

    Needed because pip reports an unreachable index only in its retry warnings: with retries off,
    or inside a build's own pip, all it says is "from versions: none", as for a missing wheel."""
    named = re.search(r"Looking in indexes: (.+)", output)
    urls = [u.strip() for u in named.group(1).split(",")] if named else [PYPI]
    silent = []
    for url in (u for u in urls if u.startswith(("http://", "https://"))):
        try:
            urllib.request.urlopen(url, timeout=10).close()
        except urllib.error.HTTPError:
            pass                                  # it answered, if only with an error
        except (OSError, ValueError) as exc:
            silent.append(f"{url}: {getattr(exc, 'reason', exc)}")
    return silent


def _refuse_torch(wheels: Path) -> None:
    """The device set never holds torch: a board cannot afford it, and the runtime must not need it."""
    found = [w.name for w in wheels.glob("*.whl") if _wheel_tags(w)[0].startswith("torch")]
    if found:
        raise BundleError(f"the device's dependencies pulled in {', '.join(found)}: the device set must never "
                          f"need torch; find the dependency that requires it")


def _write_files(root: Path, bundle: Bundle, project: Path) -> None:
    (root / "device.toml").write_text(device_toml(bundle))
    shutil.copy2(bundle.tier.path, root / f"{bundle.tier.name}.toml")
    (root / UNIT).write_text(systemd_unit(bundle))
    (root / "install.sh").write_text(install_script(bundle))
    (root / "install.sh").chmod(0o755)
    _write_broker_files(root, bundle)
    (root / "README.txt").write_text(readme(bundle, project, sorted(root.glob("wheels/*.whl"))))


def _write_broker_files(root: Path, bundle: Bundle) -> None:
    """Certificates as given; a secret is created mode 600, never readable for a moment by others, and
    of a password file only its first line is kept: the line the agent sends."""
    for key, source in bundle.broker_files:
        _flag, name, secret = BROKER_FILES[key]
        data = source.read_bytes()
        if key == "password_file":
            data = data.decode("utf-8").splitlines()[0].encode("utf-8") + b"\n"
        fd = os.open(root / name, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600 if secret else 0o644)
        with os.fdopen(fd, "wb") as out:
            out.write(data)
        (root / name).chmod(0o600 if secret else 0o644)   # whatever the umask


def _archive(directory: Path, secret: bool) -> Path:
    """The .tar.gz; private (mode 600) when it holds a password or key, as the directory's copies are."""
    archive = directory.with_name(f"{directory.name}.tar.gz")
    partial = directory.with_name(f".{archive.name}.partial")
    partial.unlink(missing_ok=True)
    fd = os.open(partial, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600 if secret else 0o666)
    with os.fdopen(fd, "wb") as raw, tarfile.open(fileobj=raw, mode="w:gz", compresslevel=1) as tar:
        tar.add(directory, arcname=directory.name)    # compresslevel 1: the wheels are compressed already
    os.replace(partial, archive)
    return archive


# -- the bundle's files ---------------------------------------------------------------------

def device_toml(b: Bundle) -> str:
    """The agent's [device] table for the default layout; install.sh moves every path under CONFIG_DIR
    (the tier file, the broker files) with --config-dir."""
    settings = [("id", b.device_id, ""),
                ("tier", f"{CONFIG_DIR}/{b.tier.name}.toml", ""),
                ("fleet", b.fleet, ""),
                ("broker", b.broker, "")]
    if b.username:
        settings.append(("username", b.username, "the broker login; the fleet's ACL knows the device by it"))
    settings += [(key, f"{CONFIG_DIR}/{BROKER_FILES[key][1]}", _BROKER_FILE_COMMENTS[key])
                 for key, _source in b.broker_files]
    settings += [("data", b.data_dir, "inputs.npy (float32) and labels.npy (int64): this board's data"),
                 ("state", b.state_dir, "blobs, caches, checkpoints: kept across restarts")]
    lines = []
    for key, value, comment in settings:
        line = f"{key} = {json.dumps(value)}"   # a JSON string or number is a TOML one
        lines.append(f"{line:<43} # {comment}" if comment else line)   # a space before '#' even when long
    return (f"# edge-device settings for {b.device_id}, written by edge-bundle. install.sh copies this file into\n"
            f"# its --config-dir (default {CONFIG_DIR}) and points its paths there at the files copied beside it.\n"
            f"# Every key: edge-device --help. Flags given to edge-device win over these.\n"
            f"[device]\n" + "\n".join(lines) + "\n")


_BROKER_FILE_COMMENTS = {"tls_ca": "the CA the broker's certificate must chain to",
                         "tls_cert": "this device's client certificate",
                         "password_file": "the broker password on its first line (mode 600)",
                         "tls_key": "the client certificate's key (mode 600)"}


def systemd_unit(b: Bundle) -> str:
    return f"""\
# edge-device for {b.device_id} (tier {b.tier.name}, fleet {b.fleet}), written by edge-bundle.
# install.sh puts it in /etc/systemd/system with its --venv and --config-dir in place of the defaults.
[Unit]
Description=edgeblock device agent {b.device_id} (tier {b.tier.name}, fleet {b.fleet})
Documentation=file://{CONFIG_DIR}/device.toml
Wants=network-online.target
After=network-online.target

[Service]
Type=simple
User={SERVICE_USER}
Group={SERVICE_USER}
StateDirectory=edgeblock
WorkingDirectory=/var/lib/edgeblock
ExecStart={VENV}/bin/edge-device --config {CONFIG_DIR}/device.toml
# The whole device budget (tier budget_mb for jobs + 48 MB for the agent), enforced by the kernel.
# No swap: it would stretch the budget onto the SD card instead of stopping at it.
MemoryMax={b.memory_max}
MemorySwapMax=0
Restart=on-failure
RestartSec=10
# Exit code 2 is bad settings (edge-device --help): restarting cannot fix them.
RestartPreventExitStatus=2
TimeoutStopSec=30
# The agent writes only its state directory and /tmp.
NoNewPrivileges=yes
PrivateTmp=yes
ProtectSystem=full

[Install]
WantedBy=multi-user.target
"""


def install_script(b: Bundle) -> str:
    """install.sh: this bundle's facts, shell-quoted, then the same script for every bundle."""
    carried = [BROKER_FILES[key] for key, _source in b.broker_files]
    facts = {"DEVICE_ID": b.device_id, "TIER": b.tier.name, "ARCH": b.arch, "PYTHON_VERSION": PYTHON,
             "GLIBC_MIN": f"{GLIBC[0]}.{GLIBC[1]}", "DATA_DIR": b.data_dir, "STATE_DIR": b.state_dir,
             "SERVICE_USER": SERVICE_USER, "UNIT": UNIT, "DEFAULT_VENV": VENV, "DEFAULT_CONFIG_DIR": CONFIG_DIR,
             "PUBLIC_FILES": " ".join(name for _flag, name, secret in carried if not secret),
             "SECRET_FILES": " ".join(name for _flag, name, secret in carried if secret)}
    lines = "\n".join(f"{key}={shlex.quote(value)}" for key, value in facts.items())
    return INSTALL_HEAD + lines + "\n" + INSTALL_BODY


INSTALL_HEAD = """\
#!/usr/bin/env bash
# Installs the edgeblock device agent from this bundle's wheels only (no network needed).
# Run it on the board; running it again is safe and upgrades in place. ./install.sh --help
set -euo pipefail
set -E   # the ERR trap below also fires inside functions

# This bundle, as edge-bundle wrote it:
"""

INSTALL_BODY = r"""
BUNDLE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
VENV=${EDGEBLOCK_VENV:-$DEFAULT_VENV}
CONFIG_DIR=${EDGEBLOCK_CONFIG_DIR:-$DEFAULT_CONFIG_DIR}
PYTHON=${EDGEBLOCK_PYTHON:-python3}
SYSTEMD=auto

usage() {
    cat <<EOF
usage: ./install.sh [--venv DIR] [--config-dir DIR] [--python PYTHON] [--no-systemd]

Installs edge-device for $DEVICE_ID (tier $TIER, linux $ARCH) from this bundle's wheels only:
  --venv DIR        the virtual environment (default $DEFAULT_VENV, or \$EDGEBLOCK_VENV)
  --config-dir DIR  device.toml, $TIER.toml and the broker files go here (default $DEFAULT_CONFIG_DIR,
                    or \$EDGEBLOCK_CONFIG_DIR)
  --python PYTHON   the CPython $PYTHON_VERSION to build the venv with (default python3, or \$EDGEBLOCK_PYTHON)
  --no-systemd      do not install the systemd unit $UNIT
When systemd runs this machine, $UNIT is installed (as root) and enabled, running the agent
as user $SERVICE_USER. The broker files the bundle carries go to the config directory, a password
or key mode 600 (owned by $SERVICE_USER when run as root and that user exists). Running this
again upgrades in place; a changed device.toml is kept as device.toml.old.

examples:
  sudo ./install.sh
  ./install.sh --venv ~/edgeblock/venv --config-dir ~/edgeblock/etc --no-systemd
EOF
}

say() { printf 'install.sh: %s\n' "$*"; }
die() { printf 'install.sh: error: %s\n' "$*" >&2; exit 1; }
trap 'die "failed at line $LINENO: $BASH_COMMAND"' ERR

while [ $# -gt 0 ]; do
    case $1 in
        --venv|--config-dir|--python)
            [ $# -ge 2 ] || die "$1 needs a value"
            case $1 in --venv) VENV=$2 ;; --config-dir) CONFIG_DIR=$2 ;; --python) PYTHON=$2 ;; esac
            shift 2 ;;
        --no-systemd) SYSTEMD=no; shift ;;
        -h|--help) usage; exit 0 ;;
        *) usage >&2; die "unknown argument: $1" ;;
    esac
done

absolute() { case $1 in /*) printf '%s' "${1%/}" ;; *) printf '%s' "$PWD/${1%/}" ;; esac; }
VENV=$(absolute "$VENV")
CONFIG_DIR=$(absolute "$CONFIG_DIR")
for path in "$VENV" "$CONFIG_DIR"; do
    case $path in *[[:space:]\"\\]*) die "'$path' holds a space, quote or backslash: the unit and device.toml cannot" ;; esac
done

check_machine() {
    command -v "$PYTHON" >/dev/null || die "$PYTHON not found: this bundle needs CPython $PYTHON_VERSION (Raspberry Pi OS / Debian 12: apt-get install python3 python3-venv), or pass --python"
    "$PYTHON" - "$PYTHON_VERSION" "$ARCH" "$GLIBC_MIN" <<'EOF' || die "$PYTHON cannot run this bundle (above: why)"
import platform, struct, sys
want, arch, glibc_min = sys.argv[1:]
have = "%d.%d" % sys.version_info[:2]
libc, libc_version = platform.libc_ver()
problems = []
if sys.implementation.name != "cpython" or have != want:
    problems.append(f"the wheels are for CPython {want}; {sys.executable} is {sys.implementation.name} {have} (see --python)")
if platform.machine() != arch:
    problems.append(f"the wheels are for {arch}; this machine is {platform.machine()}: build a bundle with --platform {platform.machine()}")
elif struct.calcsize("P") != 8:
    problems.append(f"this Python is 32-bit (a 32-bit OS on a 64-bit kernel?); the wheels need a 64-bit {arch} OS")
if libc != "glibc" or tuple(map(int, libc_version.split("."))) < tuple(map(int, glibc_min.split("."))):
    problems.append(f"the wheels need glibc {glibc_min} or newer; this machine has {libc or 'another libc'} {libc_version}")
try:
    import ensurepip, venv
except ImportError:
    problems.append("Python's venv module is missing: apt-get install python3-venv")
for problem in problems:
    print(f"install.sh: error: {problem}", file=sys.stderr)
sys.exit(1 if problems else 0)
EOF
}

check_writable() {   # before anything is changed: a forgotten sudo should cost nothing
    local dir
    for dir in "$VENV" "$CONFIG_DIR"; do
        while [ ! -e "$dir" ]; do dir=$(dirname "$dir"); done
        [ -w "$dir" ] || die "cannot write $dir: run as root (sudo ./install.sh), or pass --venv and --config-dir"
    done
}

use_systemd() {
    [ "$SYSTEMD" != no ] || return 1
    if [ ! -d /run/systemd/system ]; then
        say "systemd does not run this machine: $UNIT not installed"
        return 1
    fi
    [ "$(id -u)" -eq 0 ] || die "installing $UNIT needs root: sudo ./install.sh, or pass --no-systemd"
}

make_venv() {
    if [ -x "$VENV/bin/python" ] && "$VENV/bin/python" -c "import sys; sys.exit('%d.%d' % sys.version_info[:2] != '$PYTHON_VERSION')"; then
        say "venv $VENV: reused"
    elif [ -e "$VENV" ] && [ ! -f "$VENV/pyvenv.cfg" ] && [ -n "$(ls -A "$VENV")" ]; then
        die "$VENV exists and is not a virtual environment: choose another --venv"
    else
        "$PYTHON" -m venv --clear "$VENV"
        say "venv $VENV: created with $("$VENV/bin/python" --version)"
    fi
}

install_wheels() {
    local project=("$BUNDLE"/wheels/edgeblock-*.whl)
    [ -f "${project[0]}" ] || die "no edgeblock wheel in $BUNDLE/wheels: the bundle is incomplete"
    # --isolated: no PIP_* variable or user pip.conf may add an index or a wheel directory.
    local pip=("$VENV/bin/python" -m pip --isolated --disable-pip-version-check --no-input)
    "${pip[@]}" install --quiet --no-index --find-links "$BUNDLE/wheels" "${project[0]}"
    # The same version rebuilt is still a new build: put this one in place.
    "${pip[@]}" install --quiet --no-index --no-deps --force-reinstall "${project[0]}"
    "$VENV/bin/edge-device" --help >/dev/null
    say "installed $(basename "${project[0]}") and its dependencies; the training runtime loads:" \
        "$("$VENV/bin/python" -c 'from edge_runtime.train.ort_backend import runtime_versions as v; print("onnxruntime", v()["onnxruntime"])')"
}

install_broker_files() {   # what device.toml names for the broker: its CA; this device's password and key
    local name owner=() who
    who=$(id -un 2>/dev/null || id -u)
    if [ "$(id -u)" -eq 0 ] && id -u "$SERVICE_USER" >/dev/null 2>&1; then
        owner=(-o "$SERVICE_USER" -g "$(id -g "$SERVICE_USER")")   # the agent runs as this user
        who=$SERVICE_USER
    fi
    [ -n "$PUBLIC_FILES$SECRET_FILES" ] || return 0
    mkdir -p "$CONFIG_DIR"
    for name in $PUBLIC_FILES $SECRET_FILES; do
        [ -f "$BUNDLE/$name" ] || die "no $name in $BUNDLE: the bundle is incomplete"
    done
    for name in $PUBLIC_FILES; do
        install -m 644 "$BUNDLE/$name" "$CONFIG_DIR/$name"
    done
    for name in $SECRET_FILES; do
        install -m 600 "${owner[@]}" "$BUNDLE/$name" "$CONFIG_DIR/$name"
    done
    if [ -n "$PUBLIC_FILES" ]; then say "$CONFIG_DIR: $PUBLIC_FILES installed (mode 644)"; fi
    if [ -n "$SECRET_FILES" ]; then say "$CONFIG_DIR: $SECRET_FILES installed (mode 600, owned by $who)"; fi
}

install_config() {
    mkdir -p "$CONFIG_DIR"
    install -m 644 "$BUNDLE/$TIER.toml" "$CONFIG_DIR/$TIER.toml"
    local text new="$CONFIG_DIR/.device.toml.new"
    text=$(<"$BUNDLE/device.toml")
    printf '%s\n' "${text//"$DEFAULT_CONFIG_DIR/"/"$CONFIG_DIR/"}" >"$new"
    chmod 644 "$new"
    if [ -f "$CONFIG_DIR/device.toml" ] && cmp -s "$new" "$CONFIG_DIR/device.toml"; then
        rm "$new"
        say "$CONFIG_DIR/device.toml: unchanged"
    elif [ -f "$CONFIG_DIR/device.toml" ]; then
        cp -p "$CONFIG_DIR/device.toml" "$CONFIG_DIR/device.toml.old"
        mv "$new" "$CONFIG_DIR/device.toml"
        say "$CONFIG_DIR/device.toml: replaced (the previous one is device.toml.old)"
    else
        mv "$new" "$CONFIG_DIR/device.toml"
        say "$CONFIG_DIR/device.toml: written, with tier file $CONFIG_DIR/$TIER.toml"
    fi
}

make_user() {   # before the broker files are installed: the secrets among them are this user's
    if ! id -u "$SERVICE_USER" >/dev/null 2>&1; then
        useradd --system --home-dir /var/lib/edgeblock --no-create-home --shell /usr/sbin/nologin "$SERVICE_USER"
        say "user $SERVICE_USER: created"
    fi
}

install_service() {
    install -d -o "$SERVICE_USER" -g "$SERVICE_USER" -m 755 "$DATA_DIR" "$STATE_DIR"
    local text
    text=$(<"$BUNDLE/$UNIT")
    text=${text//"$DEFAULT_VENV/"/"$VENV/"}
    printf '%s\n' "${text//"$DEFAULT_CONFIG_DIR/"/"$CONFIG_DIR/"}" >"/etc/systemd/system/$UNIT"
    systemctl daemon-reload
    systemctl enable --quiet "$UNIT"
    systemctl try-restart "$UNIT"   # a running agent moves to the new version now
    say "/etc/systemd/system/$UNIT: installed and enabled (starts at boot)"
}

next_steps() {
    say "done: edge-device for $DEVICE_ID (tier $TIER) in $VENV, settings in $CONFIG_DIR/device.toml"
    echo "next:"
    if [ ! -f "$DATA_DIR/inputs.npy" ]; then
        echo "  put this board's data in $DATA_DIR: inputs.npy (float32) and labels.npy (int64)"
    fi
    if [ "$SYSTEMD" = yes ]; then
        echo "  sudo systemctl start $UNIT      # or restart, after changing device.toml"
        echo "  journalctl -u $UNIT -f          # its log"
    else
        echo "  $VENV/bin/edge-device --config $CONFIG_DIR/device.toml"
    fi
}

check_machine
check_writable
if use_systemd; then SYSTEMD=yes; else SYSTEMD=no; fi
make_venv
install_wheels
if [ "$SYSTEMD" = yes ]; then make_user; fi
install_broker_files
install_config
if [ "$SYSTEMD" = yes ]; then install_service; fi
next_steps
"""


def _readme_row(key: str, b: Bundle) -> str:
    return {"tls_ca": "the CA the broker's certificate must chain to (TLS)",
            "tls_cert": "the client certificate the broker asks for",
            "password_file": f"the broker password of user {b.username} (mode 600)",
            "tls_key": "the client certificate's key (mode 600)"}[key]


def readme(b: Bundle, project: Path, wheels: list[Path]) -> str:
    megabytes = sum(w.stat().st_size for w in wheels) / 1e6
    rows = [("wheels/", f"{project.name} and its device dependencies: {len(wheels)} wheels, {megabytes:.0f} MB, "
                        "no torch"),
            ("device.toml", f"the agent's settings: broker {b.broker}, fleet {b.fleet}; the budget is the tier's"),
            (f"{b.tier.name}.toml", f"the tier file ({b.tier.description})"),
            (UNIT, f"systemd unit: the agent as user {SERVICE_USER}, MemoryMax={b.memory_max}, restarts on failure")]
    rows += [(BROKER_FILES[key][1], _readme_row(key, b)) for key, _source in b.broker_files]
    rows.append(("install.sh", "installs all of it from wheels/ only: no network needed"))
    contents = "\n".join(f"  {name:<21} {what}" for name, what in rows)
    text = f"""\
edgeblock device bundle: {b.device_id}, tier {b.tier.name}, fleet {b.fleet}
For linux {b.arch} with CPython {PYTHON} and glibc {GLIBC[0]}.{GLIBC[1]} or newer (e.g. 64-bit Raspberry Pi OS
or Debian 12). Built by edge-bundle; the operator's guide is docs/flashing.md in the edgeblock sources.

{contents}

On the board:

  tar xzf {b.name}.tar.gz
  sudo {b.name}/install.sh    # venv {VENV}, settings in {CONFIG_DIR}
  sudo cp inputs.npy labels.npy {b.data_dir}/
  sudo systemctl start {UNIT}
  journalctl -u {UNIT} -f

{b.name}/install.sh --help lists its options (another venv or config directory, no systemd).
Stop the agent with `sudo systemctl stop {UNIT}`; it resumes where it was when started again.
"""
    if b.secret:
        text += (f"\nThis bundle holds a secret of {b.device_id}'s (its broker password or key): keep the bundle "
                 f"private, and\ndelete it from the board once installed. install.sh puts its copy in {CONFIG_DIR}, "
                 f"mode 600,\nowned by {SERVICE_USER} when it installs the systemd unit.\n")
    if b.arch in NO_PYPI_WHEEL:
        version = _pinned(NO_PYPI_WHEEL[b.arch])
        text += ("\nThis bundle's onnxruntime-training-cpu wheel was built from source (PyPI has none for "
                 f"linux-{b.arch}):\n\n" + BUILD_ORT_AARCH64.format(version=version, python=PYTHON) + "\n")
    return text


# -- command line -----------------------------------------------------------------------------

def _parser() -> argparse.ArgumentParser:
    tiers = ", ".join(sorted(p.stem for p in DEFAULT_PROFILES_DIR.glob("*.toml"))) or "none found"
    p = argparse.ArgumentParser(
        prog="edge-bundle", formatter_class=argparse.RawDescriptionHelpFormatter, description=__doc__,
        epilog=f"""examples:
  # a Raspberry Pi Zero 2 W (64-bit Raspberry Pi OS) in fleet "lab"; aarch64 needs an
  # onnxruntime-training-cpu wheel built from source (docs/flashing.md):
  edge-bundle --tier pi-zero-2w --device-id board-7 --broker mqtt://10.0.0.2:1883 --fleet lab \\
      --platform aarch64 --extra-wheel onnxruntime_training_cpu-1.19.2-cp311-cp311-linux_aarch64.whl

  # an x86_64 box standing in for a 256 MB board:
  edge-bundle --tier generic-256mb --device-id box-1 --broker 10.0.0.2 --platform x86_64

  # for a production broker (docs/broker.md): TLS, and the password make-secrets.sh made for box-1
  edge-bundle --tier generic-256mb --device-id box-1 --broker mqtts://broker.lan:8883 --platform x86_64 \\
      --tls-ca ~/edgeblock-secrets/ca.crt --password-file ~/edgeblock-secrets/passwords/box-1

  # then copy bundles/<name>.tar.gz to the board, and there:
  tar xzf edgeblock-board-7-pi-zero-2w-aarch64.tar.gz
  sudo edgeblock-board-7-pi-zero-2w-aarch64/install.sh

It writes <out>/edgeblock-<device>-<tier>-<platform>/ and the same as a .tar.gz: wheels/ (the
project and its device dependencies for that platform and CPython {PYTHON}, never torch),
device.toml, the tier file, {UNIT} and install.sh, and the broker files given (ca.crt,
password, client.crt, client.key). Building it again replaces it. A bundle holding a password
or key is private: the password and key files and the .tar.gz are mode 600.
Wheels come from PyPI (or the index pip is configured with) through pip's cache.
Exit codes: 0 built, 1 the build failed (pip, network), 2 bad arguments.""")
    p.add_argument("--tier", required=True, help=f"tier name in profiles/ or a tier file; known: {tiers}")
    p.add_argument("--device-id", required=True, metavar="ID",
                   help="the board's id on the fleet (letters, digits, '_', '.', '-')")
    p.add_argument("--broker", required=True, metavar="URL",
                   help="the fleet's MQTT broker as the board reaches it: mqtt://host:port, host:port or host")
    p.add_argument("--fleet", default="default", help="fleet name, the topic prefix edgeblock/v1/<fleet>/ "
                   "(default: default)")
    p.add_argument("--platform", required=True, choices=ARCHES,
                   help="the board's CPU: aarch64 for 64-bit Raspberry Pi OS and other arm64 boards, x86_64 for PCs")
    p.add_argument("--out", default="bundles", metavar="DIR", help="where to write the bundle (default: bundles)")
    p.add_argument("--extra-wheel", action="append", default=[], metavar="WHEEL",
                   help="a wheel to bundle as well, e.g. onnxruntime-training-cpu built from source for "
                        "aarch64, where PyPI has none; repeatable")
    p.add_argument("--data-dir", default=DATA_DIR, metavar="DIR",
                   help=f"the training data's directory on the board (default: {DATA_DIR})")
    p.add_argument("--state-dir", default=STATE_DIR, metavar="DIR",
                   help=f"the agent's state directory on the board (default: {STATE_DIR})")
    _broker_arguments(p)
    return p


def _broker_arguments(p: argparse.ArgumentParser) -> None:
    group = p.add_argument_group("production broker (docs/broker.md)")
    group.add_argument("--tls-ca", metavar="FILE",
                       help="the CA certificate (PEM) the broker's certificate chains to, e.g. make-secrets.sh's "
                            "ca.crt; needs an mqtts:// --broker")
    group.add_argument("--password-file", metavar="FILE",
                       help="this device's broker password on the file's first line, e.g. make-secrets.sh's "
                            "passwords/<device id>; must not be open to every user")
    group.add_argument("--username", metavar="NAME",
                       help="the broker login (default with --password-file: the device id, which the fleet's "
                            "ACL expects)")
    group.add_argument("--tls-cert", metavar="FILE",
                       help="a client certificate (PEM), for a broker that requires one; with --tls-key")
    group.add_argument("--tls-key", metavar="FILE", help="the client certificate's unencrypted key (PEM)")


def _report(bundle: Bundle, directory: Path, archive: Path) -> None:
    wheels = sorted(directory.glob("wheels/*.whl"))
    megabytes = sum(w.stat().st_size for w in wheels) / 1e6
    print(f"edge-bundle: wrote {directory}/ ({len(wheels)} wheels, {megabytes:.0f} MB)\n"
          f"edge-bundle: and {archive} ({archive.stat().st_size / 1e6:.0f} MB)\n"
          f"next: copy it to the board and install it there, for example:\n"
          f"  scp {archive} pi@{bundle.device_id}:\n"
          f"  ssh pi@{bundle.device_id} 'tar xzf {archive.name} && sudo {bundle.name}/install.sh'")
    if bundle.secret:
        print(f"edge-bundle: it holds {bundle.device_id}'s broker password or key (mode 600 here): copy it only "
              f"to that board, and delete it there once installed")


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        bundle = check(args)
    except BundleError as exc:
        print(f"edge-bundle: error: {exc}", file=sys.stderr)
        return 2
    login = f" as {bundle.username}" if bundle.username else ""
    print(f"edge-bundle: {bundle.device_id}, tier {bundle.tier.name} (jobs {bundle.tier.budget_mb:g} MB, "
          f"device {bundle.memory_max}), "
          f"fleet {bundle.fleet}, broker {bundle.broker}{login}, linux {bundle.arch}", flush=True)
    try:
        directory, archive = build(bundle, Path(args.out))
    except BundleError as exc:
        print(f"edge-bundle: error: {exc}", file=sys.stderr)
        return 1
    _report(bundle, directory, archive)
    return 0


if __name__ == "__main__":
    sys.exit(main())
