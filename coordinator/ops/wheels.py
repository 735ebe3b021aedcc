"""Which wheels a board needs, and getting them: the project's own, and its device dependencies from
PyPI for the board's platform (never torch). Every device dependency has wheels for linux x86_64 and
aarch64 there; a wheel an index lacks (a fork, a private build) the operator brings with --extra-wheel.

Boards rarely have a compiler or a quick way to PyPI, and a pip resolve on a 512 MB board can
fail for memory alone: so pip resolves here, for the board's platform tags and CPython, and the
board installs from the downloaded wheels only.
"""
from __future__ import annotations

import re
import shutil
import subprocess
import sys
import tempfile
import urllib.error
import urllib.request
from pathlib import Path

from coordinator.ops.bundle_errors import BundleError, warn

REPO = Path(__file__).resolve().parents[2]
# What the project's wheel is built from: pyproject.toml, its readme, and the folders of its packages,
# profiles/ among them (its package-dir for edge_runtime.device.profiles, the tier files).
WHEEL_SOURCES = ("pyproject.toml", "README.md", "edge_runtime", "coordinator", "profiles")
PYTHON = "3.11"          # the boards' CPython: Raspberry Pi OS and Debian 12 ship 3.11
# The oldest glibc the bundled wheels may need: onnxruntime's wheels (x86_64 and aarch64) need 2.28.
GLIBC = (2, 28)
ARCHES = ("x86_64", "aarch64")
# What pip prints (in its retry warnings) when it fails for want of the network rather than of a wheel.
NETWORK_TROUBLE = re.compile(r"NewConnectionError|Failed to establish a new connection|NameResolutionError|"
                             r"Temporary failure in name resolution|Name or service not known|Network is unreachable|"
                             r"ConnectTimeout|ReadTimeout|ProxyError|SSLError")
PYPI = "https://pypi.org/simple/"


# -- checking the operator's wheels ---------------------------------------------------------------

def check_extra_wheels(paths: list[str], arch: str) -> tuple[Path, ...]:
    """The --extra-wheel files, each for CPython PYTHON (or pure Python) and for linux `arch` (or any)."""
    wheels = tuple(Path(p).expanduser().resolve() for p in paths)
    nodot = PYTHON.replace(".", "")
    for wheel in wheels:
        if not wheel.is_file():
            raise BundleError(f"--extra-wheel {wheel}: no such file")
        _name, _version, pythons, platforms = wheel_tags(wheel)
        if not {f"cp{nodot}", "py3", f"py{nodot}"} & set(pythons):
            raise BundleError(f"--extra-wheel {wheel.name} is for {'.'.join(pythons)}, not CPython {PYTHON}: "
                              f"build it with Python {PYTHON}")
        if not any(p == "any" or p.endswith(f"_{arch}") for p in platforms):
            raise BundleError(f"--extra-wheel {wheel.name} is for {'.'.join(platforms)}, not linux {arch}")
    return wheels


def wheel_tags(path: Path) -> tuple[str, str, list[str], list[str]]:
    """(normalised name, version, python tags, platform tags) from a wheel's file name."""
    parts = path.name[:-len(".whl")].split("-") if path.name.endswith(".whl") else []
    if len(parts) not in (5, 6):
        raise BundleError(f"{path.name}: not a wheel's file name (name-version-python-abi-platform.whl)")
    return _normalise(parts[0]), parts[1], parts[-3].split("."), parts[-1].split(".")


def _normalise(name: str) -> str:
    return re.sub(r"[-_.]+", "_", name).lower()


# -- getting the wheels -------------------------------------------------------------------------

def gather(wheels: Path, arch: str, extra_wheels: tuple[Path, ...]) -> Path:
    """Every wheel the board installs, put in `wheels`; returns the project's own wheel."""
    project = project_wheel(wheels)
    for extra in extra_wheels:
        shutil.copy2(extra, wheels)
    _download(project, wheels, arch)
    _refuse_torch(wheels)
    return project


def project_wheel(dest: Path) -> Path:
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
        warn(f"this is Python {sys.version_info[0]}.{sys.version_info[1]}: pip evaluates dependency markers for "
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
    found = [w.name for w in wheels.glob("*.whl") if wheel_tags(w)[0].startswith("torch")]
    if found:
        raise BundleError(f"the device's dependencies pulled in {', '.join(found)}: the device set must never "
                          f"need torch; find the dependency that requires it")
