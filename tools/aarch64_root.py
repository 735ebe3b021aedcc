#!/usr/bin/env python3
"""aarch64_root: an emulated aarch64 Debian Python with a venv, run under qemu user mode without binfmt_misc.

What it is for: proving on an x86-64 machine (a CI runner, the coordinator's machine) that the
device runtime installs and runs on a 64-bit Raspberry Pi OS / Debian arm64 board, with the
board's own Python and the aarch64 wheels a bundle carries (tests/test_aarch64.py).

How it works
------------
A "root" is a directory holding Debian's arm64 python3.X and the libraries it and the wheels
link against, plus a venv (ROOT/venv) with the wheels installed:

* The .deb files are fetched by the host's apt-get with a private state under the cache
  directory (arm64 only, signatures checked against Debian's keyring): the host's dpkg, its
  architectures and its sources are never touched. `dpkg-deb -x` unpacks them into ROOT.
* `qemu-aarch64-static -L ROOT ROOT/usr/bin/python3.X` runs the interpreter. `-L` makes qemu
  look up every absolute path the guest opens under ROOT first and fall back to the host's
  file when ROOT has none: that is how the guest finds its ld.so and libc, and how
  ROOT/proc/cpuinfo (an aarch64 one, written here) hides the host's x86 /proc/cpuinfo, on
  which qemu 7.2 makes `import onnxruntime` segfault.
* The venv is made by the emulated python (`-m venv --without-pip`); the host's pip
  downloads the aarch64 wheels (or you give them), and pip, run from its wheel under
  emulation, installs them and itself offline (`--no-index --find-links`), as a board would.
* Without binfmt_misc the kernel cannot execute an aarch64 program, and qemu user mode
  passes a guest's execve to the kernel: a child started as the aarch64 ELF fails with
  "Exec format error". So ROOT/venv/bin/python is a small host shell script, the launcher,
  that execs qemu with the right arguments and `-0` itself: inside the guest sys.executable
  is then the launcher, and `subprocess.run([sys.executable, ...])`, multiprocessing's spawn
  and console scripts (their shebang is the launcher) work unchanged.
"""
from __future__ import annotations

import argparse
import contextlib
import fcntl
import hashlib
import importlib.util
import json
import os
import re
import shutil
import struct
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

STAMP_NAME = ".edgeblock-aarch64.json"   # in ROOT: what it was built from; same inputs, no rebuild
QEMU = "qemu-aarch64-static"
KEYRING = "/usr/share/keyrings/debian-archive-keyring.gpg"

# The Debian releases known here, with the CPython each ships (bookworm: Raspberry Pi OS 12's).
DISTS = {
    "bookworm": {"python": "3.11", "suites": ["bookworm", "bookworm-updates"], "security": "bookworm-security"},
    "trixie": {"python": "3.13", "suites": ["trixie", "trixie-updates"], "security": "trixie-security"},
}
# The root's packages: apt's Depends-closure of these, less EXCLUDE. python3.X-venv (ensurepip) as on a
# board prepared for a bundle (docs/flashing.md: apt-get install python3 python3-venv), whose install.sh
# checks for it; libstdc++6 for onnxruntime, numpy and protobuf. build() checks the result is closed:
# every aarch64 ELF in the root finds its DT_NEEDED libraries there.
ROOT_PACKAGES = ["python{py}", "python{py}-venv", "libstdc++6"]
# Left out of the closure: dpkg's own needs (dpkg tar libacl1 libselinux1 libpcre2-8-0 libmd0, ...),
# docs-only gcc-N-base, readline-common (inputrc), and the Kerberos/NIS chain that only the deprecated
# nis module links; plus packages a release may pull in that a python never opens.
EXCLUDE = re.compile(
    r"^(dpkg|tar|debconf|perl-base|debianutils|base-files|sensible-utils"
    r"|libacl1|libselinux1|libpcre2-8-0|libmd0|libaudit1|libaudit-common|libcap-ng0"
    r"|libnsl2|libtirpc3t?6?4?|libtirpc-common|libgssapi-krb5-2|libkrb5-3|libk5crypto3"
    r"|libkrb5support0|libkeyutils1|libcom-err2"
    r"|gcc-\d+-base|readline-common|tzdata|netbase)$")
OPTIONAL_EXTENSIONS = re.compile(r"^nis\.cpython-")   # may miss their libraries (excluded above)
# The device set, when neither wheels nor requirements are given (pyproject.toml's [project] dependencies).
DEFAULT_REQUIREMENTS = ["onnxruntime>=1.32,<1.33", "numpy>=1.24,<3", "psutil>=5.9", "paho-mqtt>=2.1,<3",
                        "safetensors>=0.4"]
DEVICE_MODULES = ("onnxruntime", "numpy", "psutil", "paho.mqtt", "safetensors")   # what verify imports


def log(msg: str) -> None:
    print(f"[aarch64_root {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def default_cache() -> Path:
    """$EDGEBLOCK_AARCH64_CACHE, else ~/.cache/edgeblock-aarch64 (XDG_CACHE_HOME respected)."""
    env = os.environ.get("EDGEBLOCK_AARCH64_CACHE")
    if env:
        return Path(env)
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "edgeblock-aarch64"


def run(cmd, *, check=True, cwd=None, env=None) -> subprocess.CompletedProcess:
    """Run a command, output captured; on failure raise with the tail of its output."""
    cmd = [str(c) for c in cmd]
    done = subprocess.run(cmd, cwd=cwd, env=env, text=True, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    if check and done.returncode != 0:
        tail = "\n".join(done.stdout.splitlines()[-40:])
        raise RuntimeError(f"command failed ({done.returncode}): {' '.join(cmd)}\n{tail}")
    return done


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def write_atomic(path: Path, data: str | bytes) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_bytes(data.encode() if isinstance(data, str) else data)
    if path.exists():
        shutil.copymode(path, tmp)
    os.replace(tmp, path)


@contextlib.contextmanager
def locked(lock_path: Path):
    """An exclusive flock: two builds never share a cache or a root half-way."""
    lock_path.parent.mkdir(parents=True, exist_ok=True)
    with open(lock_path, "w") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        yield


# -- host tools ------------------------------------------------------------------------------------

def ensure_qemu() -> str:
    """Path of qemu-aarch64-static; as root, apt-get installs qemu-user-static when it is missing.

    Installing the package registers no binfmt handler here (binfmt_misc is not mounted); none is needed."""
    found = shutil.which(QEMU)
    if found:
        return found
    if os.geteuid() != 0:
        raise RuntimeError(f"{QEMU} not found, and installing it needs root: apt-get install qemu-user-static")
    log("installing qemu-user-static with apt-get")
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    cmd = ["apt-get", "install", "-y", "--no-install-recommends", "qemu-user-static"]
    if run(cmd, check=False, env=env).returncode != 0:
        run(["apt-get", "update"], env=env)   # a fresh image's package lists may be empty or stale
        run(cmd, env=env)
    found = shutil.which(QEMU)
    if not found:
        raise RuntimeError(f"qemu-user-static is installed but {QEMU} is not on PATH")
    return found


def qemu_version(qemu: str) -> str:
    out = run([qemu, "--version"]).stdout
    return out.splitlines()[0].strip() if out else "?"


def host_mirrors() -> tuple[str, str]:
    """(Debian mirror, security mirror) from the host's apt sources (a CI's own mirror); deb.debian.org else."""
    main, security = "http://deb.debian.org/debian", "http://deb.debian.org/debian-security"
    texts = []
    for p in [Path("/etc/apt/sources.list"), *sorted(Path("/etc/apt/sources.list.d").glob("*"))]:
        if p.is_file() and p.suffix in (".list", ".sources"):
            with contextlib.suppress(OSError):
                texts.append(p.read_text())
    uris: list[tuple[str, str]] = []           # (uri, suite)
    for text in texts:
        for stanza in re.split(r"\n\s*\n", text):            # deb822 .sources
            m_u = re.search(r"^URIs:\s*(\S+)", stanza, re.M | re.I)
            m_s = re.search(r"^Suites:\s*(.+)$", stanza, re.M | re.I)
            if m_u and m_s:
                uris += [(m_u.group(1), s) for s in m_s.group(1).split()]
        for m in re.finditer(r"^deb\s+(?:\[[^\]]*\]\s+)?(\S+)\s+(\S+)", text, re.M):   # one-line .list
            uris.append((m.group(1), m.group(2)))
    for uri, suite in uris:
        if "debian" not in uri:
            continue
        if suite.endswith("-security"):
            security = uri.rstrip("/")
        elif "-" not in suite:
            main = uri.rstrip("/")
    return main, security


# -- Debian packages -------------------------------------------------------------------------------

class Apt:
    """apt-get with a private state directory, arm64 only: the host's dpkg and sources are not touched."""

    def __init__(self, cache: Path, dist: str):
        self.dir = cache / "apt" / dist
        self.dist = dist
        info = DISTS[dist]
        main, security = host_mirrors()
        lines = [f"deb [arch=arm64 signed-by={KEYRING}] {main} {s} main" for s in info["suites"]]
        lines.append(f"deb [arch=arm64 signed-by={KEYRING}] {security} {info['security']} main")
        for d in ("lists/partial", "cache/archives/partial", "etc/sources.list.d", "etc/preferences.d"):
            (self.dir / d).mkdir(parents=True, exist_ok=True)
        (self.dir / "etc/sources.list").write_text("\n".join(lines) + "\n")
        if not (self.dir / "status").exists():
            (self.dir / "status").write_text("")        # nothing installed: the whole closure is resolved
        d = self.dir
        self.opts = [
            "-o", f"Dir::State={d}", "-o", f"Dir::State::status={d}/status",
            "-o", f"Dir::Cache={d}/cache", "-o", f"Dir::Etc::SourceList={d}/etc/sources.list",
            "-o", f"Dir::Etc::SourceParts={d}/etc/sources.list.d",
            "-o", f"Dir::Etc::PreferencesParts={d}/etc/preferences.d",
            "-o", "APT::Architecture=arm64", "-o", "APT::Architectures::=arm64",
            # as root, apt downloads as _apt, who cannot write a cache under root's home
            "-o", "APT::Sandbox::User=root", "-o", "Acquire::Languages=none",
            "-o", "APT::Get::List-Cleanup=false",
        ]

    def apt(self, *args, cwd=None) -> str:
        return run(["apt-get", *self.opts, *args], cwd=cwd).stdout

    def update(self) -> None:
        log(f"apt-get update (arm64, {self.dist}, private state in {self.dir})")
        self.apt("update")

    def resolve(self, roots: list[str]) -> list[dict]:
        """The Depends-closure of roots (no Recommends) less EXCLUDE: package, file name, size, sha256."""
        out = self.apt("-s", "install", "--no-install-recommends", *roots)
        pkgs = re.findall(r"^Inst (\S+) \((\S+) ", out, re.M)
        keep = [name.split(":")[0] for name, _ in pkgs if not EXCLUDE.match(name.split(":")[0])]
        uris = self.apt("download", "--print-uris", *keep)
        result = []
        for m in re.finditer(r"^'(\S+)' (\S+) (\d+) SHA256:([0-9a-f]+)", uris, re.M):
            _url, fname, size, digest = m.groups()
            result.append({"package": fname.split("_")[0], "file": fname, "size": int(size), "sha256": digest})
        if len(result) != len(keep):
            raise RuntimeError(f"apt could not give URIs for all of {keep}:\n{uris}")
        return result

    def download(self, packages: list[str], dest: Path) -> None:
        log(f"downloading {len(packages)} .deb files into {dest}")
        self.apt("download", *packages, cwd=dest)


def fetch_debs(cache: Path, dist: str, refresh: bool) -> list[Path]:
    """The root's .deb files: from the cache when it has them (offline), else through apt."""
    py = DISTS[dist]["python"]
    roots = [r.format(py=py) for r in ROOT_PACKAGES]
    debdir = cache / "debs" / dist
    debdir.mkdir(parents=True, exist_ok=True)
    key = hashlib.sha256(json.dumps([roots, EXCLUDE.pattern]).encode()).hexdigest()[:16]
    manifest_path = debdir / f"manifest-{key}.json"
    manifest = None
    if manifest_path.exists() and not refresh:
        manifest = json.loads(manifest_path.read_text())
    apt = None
    if manifest is None:
        apt = Apt(cache, dist)
        apt.update()
        manifest = apt.resolve(roots)
    missing = [m for m in manifest if not (debdir / m["file"]).exists()
               or (debdir / m["file"]).stat().st_size != m["size"]]
    if missing:
        apt = apt or Apt(cache, dist)
        if not any((apt.dir / "lists").glob("*Packages*")):
            apt.update()
        try:
            apt.download([m["package"] for m in missing], debdir)
        except RuntimeError:          # the cached resolution names versions the mirror has dropped
            log("cached package versions are gone from the mirror: resolving again")
            apt.update()
            manifest = apt.resolve(roots)
            missing = [m for m in manifest if not (debdir / m["file"]).exists()]
            apt.download([m["package"] for m in missing], debdir)
    for m in manifest:
        f = debdir / m["file"]
        if not f.exists():
            raise RuntimeError(f"{f} missing after download")
        if m in missing and sha256(f) != m["sha256"]:
            f.unlink()
            raise RuntimeError(f"{f}: sha256 mismatch")
    write_atomic(manifest_path, json.dumps(manifest, indent=1))
    return [debdir / m["file"] for m in manifest]


# -- wheels ----------------------------------------------------------------------------------------

def manylinux_platforms(glibc_minor: int) -> list[str]:
    """pip --platform tags a Debian arm64 guest accepts: pip matches tags exactly and widens none itself."""
    return [f"manylinux_2_{m}_aarch64" for m in range(glibc_minor, 16, -1)] + ["manylinux2014_aarch64"]


def host_pip_download(args: list[str], dest: Path) -> None:
    dest.mkdir(parents=True, exist_ok=True)
    run([sys.executable, "-m", "pip", "download", "--disable-pip-version-check", "--only-binary=:all:",
         "-d", dest, *args])


def fetch_wheels(cache: Path, requirements: list[str], py: str, glibc_minor: int, refresh: bool) -> Path:
    """The host's pip downloads aarch64 wheels for requirements and their dependencies, once."""
    plats = manylinux_platforms(glibc_minor)
    key = hashlib.sha256(json.dumps([sorted(requirements), py, plats]).encode()).hexdigest()[:16]
    dest = cache / "wheels" / key
    done = dest / ".complete"
    if done.exists() and not refresh:
        return dest
    if dest.exists():
        shutil.rmtree(dest)
    log(f"host pip downloads aarch64 cp{py.replace('.', '')} wheels: {' '.join(requirements)}")
    args = ["--python-version", py, "--implementation", "cp"]
    for p in plats:
        args += ["--platform", p]
    host_pip_download(args + requirements, dest)
    done.write_text(json.dumps(sorted(requirements)))
    return dest


def fetch_pip_wheel(cache: Path, py: str, search: list[Path], refresh: bool) -> Path:
    """pip's own wheel (pure Python): the guest runs pip from it, and installs it into the venv."""
    for d in search:
        found = sorted(d.glob("pip-*-py3-none-any.whl"))
        if found:
            return found[-1]
    dest = cache / "pip" / py
    found = sorted(dest.glob("pip-*-py3-none-any.whl")) if dest.exists() else []
    if found and not refresh:
        return found[-1]
    if dest.exists():
        shutil.rmtree(dest)
    log("host pip downloads pip's wheel")
    host_pip_download(["--no-deps", "--python-version", py, "pip"], dest)
    found = sorted(dest.glob("pip-*-py3-none-any.whl"))
    if not found:
        raise RuntimeError("no pip wheel downloaded")
    return found[-1]


# -- is the root closed: every aarch64 ELF finds its libraries in it ------------------------------

EM_AARCH64 = 183


def elf_needed(path: Path) -> tuple[list[str], list[str]] | None:
    """(DT_NEEDED, RUNPATH + RPATH entries) of a 64-bit little-endian aarch64 ELF; None for anything else."""
    try:
        with open(path, "rb") as f:
            head = f.read(64)
            if len(head) < 64 or head[:4] != b"\x7fELF" or head[4] != 2 or head[5] != 1:
                return None
            if struct.unpack_from("<H", head, 18)[0] != EM_AARCH64:
                return None
            phoff, = struct.unpack_from("<Q", head, 32)
            phentsize, phnum = struct.unpack_from("<HH", head, 54)
            f.seek(phoff)
            ph = f.read(phentsize * phnum)
            loads, dyn = [], None
            for i in range(phnum):
                p_type, _, off, vaddr, _, filesz, _, _ = struct.unpack_from("<IIQQQQQQ", ph, i * phentsize)
                if p_type == 1:          # PT_LOAD
                    loads.append((vaddr, off, filesz))
                elif p_type == 2:        # PT_DYNAMIC
                    dyn = (off, filesz)
            if dyn is None:
                return [], []
            f.seek(dyn[0])
            raw = f.read(dyn[1])
            entries = [struct.unpack_from("<qQ", raw, i) for i in range(0, len(raw) - 15, 16)]
            strtab = next((v for t, v in entries if t == 5), None)      # DT_STRTAB
            if strtab is None:
                return [], []
            stroff = next((off + strtab - va for va, off, sz in loads if va <= strtab < va + sz), None)

            def string(o: int) -> str:
                f.seek(stroff + o)
                return f.read(4096).split(b"\0", 1)[0].decode()

            needed = [string(v) for t, v in entries if t == 1]                      # DT_NEEDED
            paths = [p for t, v in entries if t in (15, 29) for p in string(v).split(":") if p]   # RPATH, RUNPATH
            return needed, paths
    except (OSError, struct.error, UnicodeDecodeError):
        return None


def check_closed(root: Path) -> list[str]:
    """Every aarch64 ELF under root finds its DT_NEEDED libraries in the root: the ones that do not."""
    libdirs = [root / d for d in ("lib/aarch64-linux-gnu", "usr/lib/aarch64-linux-gnu", "lib", "usr/lib")]
    problems = []
    for dirpath, _, files in os.walk(root):
        if "/proc" in dirpath[len(str(root)):][:6]:
            continue
        for name in files:
            p = Path(dirpath) / name
            if p.is_symlink() or not (name.endswith(".so") or ".so." in name or "/bin" in dirpath
                                      or name.startswith("ld-")):
                continue
            info = elf_needed(p)
            if not info:
                continue
            needed, rpaths = info
            dirs = [Path(r.replace("$ORIGIN", dirpath).replace("${ORIGIN}", dirpath)) for r in rpaths]
            dirs += [Path(dirpath)] + libdirs
            for lib in needed:
                if not any((d / lib).exists() for d in dirs) and not OPTIONAL_EXTENSIONS.match(name):
                    problems.append(f"{p.relative_to(root)}: {lib}")
    return problems


# -- what the root holds besides the packages -----------------------------------------------------

LAUNCHER = """#!/bin/sh
# The aarch64 python of this root, run under qemu user mode (no binfmt_misc needed).
# Written by tools/aarch64_root.py. The root is found from this file's own location.
# -0 makes the guest's argv[0], hence its sys.executable, this launcher: a guest program can
# then start child pythons with [sys.executable, ...] (an execve of the aarch64 ELF itself fails).
bin=$(CDPATH= cd -- "$(dirname -- "$0")" && pwd)
root=${{bin%/venv/bin}}
exec "${{EDGEBLOCK_QEMU:-{qemu}}}" -cpu {cpu} -L "$root" -0 "$bin/$(basename -- "$0")" "$bin/python{py}" "$@"
"""

# qemu -cpu model -> the MIDR fields written to proc/cpuinfo (implementer, variant, part, revision).
# onnxruntime's cpuinfo library needs those lines: without them `import onnxruntime` segfaults.
# The Features line is always what the qemu model really offers (read from AT_HWCAP*). qemu's
# default, "max", has SVE, with which numpy's float32 matmul warns of spurious FP flags under qemu 7.2.
CPU_PARTS = {"cortex-a53": ("0x41", "0x0", "0xd03", "4"),     # Pi 3, Pi Zero 2 W
             "cortex-a72": ("0x41", "0x0", "0xd08", "3"),     # Pi 4, Pi 400, CM4
             "cortex-a76": ("0x41", "0x4", "0xd0b", "1"),     # Pi 5
             "neoverse-n1": ("0x41", "0x3", "0xd0c", "1"),    # Graviton2, Ampere Altra
             "max": ("0x00", "0x0", "0x051", "0")}            # qemu's own
HWCAP_NAMES = ("fp asimd evtstrm aes pmull sha1 sha2 crc32 atomics fphp asimdhp cpuid asimdrdm "
               "jscvt fcma lrcpc dcpop sha3 sm3 sm4 asimddp sha512 sve asimdfhm dit uscat ilrcpc "
               "flagm ssbs sb paca pacg").split()
HWCAP2_NAMES = ("dcpodp sve2 sveaes svepmull svebitperm svesha3 svesm4 flagm2 frint svei8mm "
                "svef32mm svef64mm svebf16 i8mm bf16 dgh rng bti mte ecv afp rpres mte3 sme "
                "smei16i64 smef64f64 smei8i32 smef16f32 smeb16f32 smef32f32 smefa64 wfxt ebf16 "
                "sveebf16").split()
AUXV_PROBE = ("import struct;d=open('/proc/self/auxv','rb').read();"
              "a=dict(struct.unpack_from('<QQ',d,i) for i in range(0,len(d)-15,16));"
              "print(a.get(16,0),a.get(26,0))")


def cpuinfo_text(hwcap: int, hwcap2: int, cpus: int, part: str = "cortex-a72") -> str:
    """An aarch64 /proc/cpuinfo whose Features are the emulated CPU's (from AT_HWCAP and AT_HWCAP2)."""
    feats = [n for i, n in enumerate(HWCAP_NAMES) if hwcap >> i & 1]
    feats += [n for i, n in enumerate(HWCAP2_NAMES) if hwcap2 >> i & 1]
    impl, var, cpu_part, rev = CPU_PARTS[part]
    block = ("processor\t: {n}\nBogoMIPS\t: 108.00\nFeatures\t: " + " ".join(feats) +
             f"\nCPU implementer\t: {impl}\nCPU architecture: 8\nCPU variant\t: {var}\n"
             f"CPU part\t: {cpu_part}\nCPU revision\t: {rev}\n\n")
    return "".join(block.format(n=n) for n in range(cpus))


def host_cpu_count() -> int:
    try:
        text = Path("/sys/devices/system/cpu/possible").read_text().strip()
        return max(int(r.split("-")[-1]) for r in text.split(",")) + 1
    except (OSError, ValueError):
        return os.cpu_count() or 1


@dataclass(frozen=True)
class Root:
    """A built root. python_command() is the argv prefix that runs its venv's python."""
    path: Path
    python_version: str
    dist: str
    qemu: str
    cpu: str = "cortex-a72"

    @property
    def launcher(self) -> Path:
        """ROOT/venv/bin/python: a host shell script that runs the venv's python under qemu; the guest's
        sys.executable. Use it wherever a program takes "the python to run"."""
        return self.path / "venv" / "bin" / "python"

    @property
    def elf(self) -> Path:
        """The venv's aarch64 interpreter (a link to usr/bin/python3.X): qemu loads it, the kernel cannot."""
        return self.path / "venv" / "bin" / f"python{self.python_version}"

    @property
    def bin(self) -> Path:
        """ROOT/venv/bin: the launcher and the console scripts, runnable from the host."""
        return self.path / "venv" / "bin"

    @property
    def site_packages(self) -> Path:
        return self.path / "venv" / "lib" / f"python{self.python_version}" / "site-packages"

    def python_command(self) -> list[str]:
        """[qemu-aarch64-static, -cpu, CPU, -L, ROOT, -0, ROOT/venv/bin/python, ROOT/venv/bin/python3.X]

        No shell involved. -0 sets the guest's argv[0] to the launcher so that its sys.executable can
        start children; without it sys.executable is the aarch64 ELF and subprocess.run([sys.executable,
        ...]) in the guest fails with "Exec format error"."""
        qemu = shutil.which(QEMU) or self.qemu
        return [qemu, "-cpu", self.cpu, "-L", str(self.path), "-0", str(self.launcher), str(self.elf)]

    def pip_command(self) -> list[str]:
        """The venv's pip, e.g. root.pip_command() + ["install", "--no-index", "--find-links", DIR, NAME]."""
        return self.python_command() + ["-m", "pip", "--disable-pip-version-check"]

    def environ(self, **extra: str) -> dict[str, str]:
        """This process's environment for a guest program: the guest inherits it, and PYTHONPATH or PYTHONHOME
        naming this machine's x86 packages would break it (a pure-Python checkout on PYTHONPATH is fine:
        pass it in extra). VIRTUAL_ENV would name the host's venv."""
        env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV")}
        env.update(extra)
        return env

    def run(self, args: list, **kwargs) -> subprocess.CompletedProcess:
        """subprocess.run of the root's python with args (kwargs as subprocess.run's; env=self.environ() by default)."""
        kwargs.setdefault("env", self.environ())
        return subprocess.run(self.python_command() + [str(a) for a in args], **kwargs)

    @classmethod
    def open(cls, path: Path) -> "Root":
        """The root built at path (read from its stamp file)."""
        try:
            stamp = json.loads((Path(path) / STAMP_NAME).read_text())
        except (OSError, ValueError) as e:
            raise SystemExit(f"{path} is not a built root ({e}): run 'build --root {path}'")
        return cls(Path(path).absolute(), stamp["python"], stamp["dist"], stamp["qemu"], stamp["cpu"])


def _guest(qemu: str, root: Path, py: str, args: list, cpu: str = "cortex-a72") -> subprocess.CompletedProcess:
    """The root's own python (not the venv's), before the venv and the launcher exist."""
    return run([qemu, "-cpu", cpu, "-L", root, root / "usr/bin" / f"python{py}", *args])


def _compile(launcher: Path, tmp: Path, final: Path, dirs: list[Path]) -> str:
    """Byte-compile with the final root's source paths: on the host when its pyc magic number is the guest's
    (the same 3.X: about 10 s), else under emulation through the launcher (compileall -j's forkserver starts
    sys.executable, which must be the launcher: 40-105 s)."""
    magic_guest = run([launcher, "-c", "import importlib.util as u; print(u.MAGIC_NUMBER.hex())"]).stdout.strip()
    args = ["-m", "compileall", "-q", "-j", "0", "-s", tmp, "-p", final, *dirs]
    if importlib.util.MAGIC_NUMBER.hex() == magic_guest:
        done, where = run([sys.executable, *args], check=False), "host"
    else:
        done, where = run([launcher, *args], check=False), "guest"
    return f"{where} rc={done.returncode}"   # a few stdlib files (lib2to3 test data) never compile: not fatal


def build(root: Path, wheels: list[Path] | None, requirements: list[str], *, dist: str = "bookworm",
          cache: Path | None = None, refresh: bool = False, cpu: str = "cortex-a72") -> Root:
    """Build (or reuse) an emulated aarch64 Debian python with a venv at root.

    wheels: .whl files and/or directories of wheels to install from, offline (pip --no-index
    --find-links), as a bundle's install.sh does; None: the host's pip downloads aarch64 wheels for
    requirements (default: the device set) into the cache. requirements: pip requirements, or wheel
    files; with wheels and no requirements every given wheel is installed. pip itself is installed
    into the venv too. Idempotent (ROOT/.edgeblock-aarch64.json records the inputs: the same again
    returns in about 1 s), crash-safe (built in a sibling directory, then renamed into place), offline
    once the cache holds the .debs and wheels (refresh=True resolves and downloads again).
    """
    t_start = time.monotonic()
    root = Path(root).absolute()
    cache = Path(cache or default_cache()).absolute()
    if dist not in DISTS:
        raise ValueError(f"dist must be one of {sorted(DISTS)}")
    if cpu not in CPU_PARTS:
        raise ValueError(f"cpu must be one of {sorted(CPU_PARTS)}")
    py = DISTS[dist]["python"]
    qemu = ensure_qemu()
    root.parent.mkdir(parents=True, exist_ok=True)
    with locked(cache / "lock"), locked(root.parent / f".{root.name}.lock"):
        debs = fetch_debs(cache, dist, refresh)
        libc = next(d for d in debs if d.name.startswith("libc6_"))
        glibc_minor = int(re.match(r"libc6_2\.(\d+)", libc.name).group(1))
        if wheels is None:
            requirements = list(requirements) or list(DEFAULT_REQUIREMENTS)
            wheel_dirs = [fetch_wheels(cache, requirements, py, glibc_minor, refresh)]
            install = list(requirements)
        else:
            wheels = [Path(w).absolute() for w in wheels]
            wheel_dirs = sorted({w if w.is_dir() else w.parent for w in wheels})
            install = list(requirements) or [str(w) for w in wheels if w.is_file()] or [
                str(f) for d in wheel_dirs for f in sorted(d.glob("*.whl")) if not f.name.startswith("pip-")]
        pip_whl = fetch_pip_wheel(cache, py, wheel_dirs, refresh)
        wheel_files = sorted({f for d in wheel_dirs for f in d.glob("*.whl")})
        inputs = {"script_sha256": sha256(Path(__file__)), "dist": dist, "python": py,
                  "debs": [d.name for d in debs], "wheels": {f.name: sha256(f) for f in wheel_files},
                  "pip": pip_whl.name, "qemu_version": qemu_version(qemu), "cpu": cpu,
                  # wheel files by name (their contents are in "wheels"): the same wheels elsewhere are the same root
                  "install": [Path(i).name if i.endswith(".whl") else i for i in install]}
        stamp_path = root / STAMP_NAME
        if stamp_path.exists():
            with contextlib.suppress(ValueError, OSError):
                old = json.loads(stamp_path.read_text())
                if old.get("inputs") == inputs:
                    if old.get("path") != str(root):
                        _relocate(root, old.get("path"), old)
                    _ensure_cpuinfo(qemu, root, py, cpu)
                    log(f"{root} is up to date ({time.monotonic() - t_start:.1f} s)")
                    return Root(root, py, dist, qemu, cpu)
        stale_re = re.compile(re.escape(f".{root.name}.") + r"(tmp|old)-\d+")
        for stale in root.parent.iterdir():       # left by a build that was killed (we hold the lock)
            if stale_re.fullmatch(stale.name) and stale.is_dir():
                log(f"removing {stale} (left by an interrupted build)")
                shutil.rmtree(stale, ignore_errors=True)
        tmp = root.parent / f".{root.name}.tmp-{os.getpid()}"
        try:
            stamp = _build_into(tmp, root, qemu, py, cpu, debs, wheel_dirs, pip_whl, install)
            stamp.update(inputs=inputs, path=str(root), dist=dist, python=py, qemu=qemu, cpu=cpu,
                         built=time.strftime("%Y-%m-%dT%H:%M:%S"))
            stamp["timings"]["build_s"] = round(time.monotonic() - t_start, 1)
            (tmp / STAMP_NAME).write_text(json.dumps(stamp, indent=1))
            old_dir = root.parent / f".{root.name}.old-{os.getpid()}"
            if root.exists() or root.is_symlink():
                os.rename(root, old_dir)
            os.rename(tmp, root)
            shutil.rmtree(old_dir, ignore_errors=True)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        log(f"built {root} in {time.monotonic() - t_start:.1f} s {stamp['timings']}")
        return Root(root, py, dist, qemu, cpu)


def _build_into(tmp: Path, root: Path, qemu: str, py: str, cpu: str, debs: list[Path], wheel_dirs: list[Path],
                pip_whl: Path, install: list[str]) -> dict:
    """The steps of a build, in tmp, which will be renamed to root; returns the stamp's facts."""
    timings: dict = {}
    t = time.monotonic()
    tmp.mkdir()
    for d in debs:
        run(["dpkg-deb", "-x", d, tmp])
    # Debian 13's packages are merged-/usr (ld.so is in /usr/lib), but the guest's PT_INTERP is
    # /lib/ld-linux-aarch64.so.1: the usual /lib -> usr/lib links.
    for top in ("lib", "bin", "sbin"):
        if not (tmp / top).exists() and (tmp / "usr" / top).is_dir():
            os.symlink(f"usr/{top}", tmp / top)
    # An empty ld.so.cache, which glibc ignores: without it qemu -L falls back to the host's x86 one.
    (tmp / "etc").mkdir(exist_ok=True)
    (tmp / "etc/ld.so.cache").write_bytes(b"")
    timings["unpack_s"] = round(time.monotonic() - t, 1)
    cpuinfo = _ensure_cpuinfo(qemu, tmp, py, cpu)

    t = time.monotonic()
    log("creating the venv (emulated python -m venv --without-pip)")
    _guest(qemu, tmp, py, ["-m", "venv", "--without-pip", tmp / "venv"], cpu)
    vbin = tmp / "venv" / "bin"
    for name in ("python", "python3", f"python{py}"):
        (vbin / name).unlink(missing_ok=True)
    os.symlink(f"../../usr/bin/python{py}", vbin / f"python{py}")
    (vbin / "python").write_text(LAUNCHER.format(qemu=qemu, py=py, cpu=cpu))
    (vbin / "python").chmod(0o755)
    os.symlink("python", vbin / "python3")
    timings["venv_s"] = round(time.monotonic() - t, 1)

    t = time.monotonic()
    log(f"emulated pip installs {' '.join(Path(i).name for i in install)} (offline, from "
        f"{', '.join(str(d) for d in wheel_dirs)})")
    # pip from its own wheel, installing the wheels and itself; --isolated: no PIP_* variable or pip.conf
    # of this machine may add an index
    pip = [vbin / "python", pip_whl / "pip", "--isolated", "--disable-pip-version-check"]
    find_links = [arg for d in wheel_dirs for arg in ("--find-links", d)]
    run([*pip, "install", "--no-index", "--no-compile", "--no-cache-dir", "--root-user-action=ignore",
         *find_links, pip_whl, *install])
    run([vbin / "python", "-m", "pip", "--isolated", "check"])
    timings["pip_install_s"] = round(time.monotonic() - t, 1)

    t = time.monotonic()
    log("byte-compiling the stdlib and site-packages")
    timings["compile"] = _compile(vbin / "python", tmp, root, [tmp / "usr/lib" / f"python{py}",
                                                                tmp / "venv/lib" / f"python{py}"])
    timings["compile_s"] = round(time.monotonic() - t, 1)

    problems = check_closed(tmp)
    if problems:
        raise RuntimeError("libraries missing from the root:\n" + "\n".join(problems))
    probe = run([vbin / "python", "-c", "import platform; print(platform.machine())"])
    if probe.stdout.strip() != "aarch64":
        raise RuntimeError(f"the guest says {probe.stdout!r}, not aarch64")
    _point_venv_at(tmp, str(tmp), str(root))
    return {"timings": timings, "cpuinfo_sha256": hashlib.sha256(cpuinfo.encode()).hexdigest()}


def _point_venv_at(root: Path, old: str, new: str) -> None:
    """Replace the absolute path old by new in the venv's pyvenv.cfg and in its scripts' shebangs.

    The venv's home must stay absolute, in host form: a guest-form /usr/bin would make the guest
    fall back to the host's own /usr/lib/python3.X (qemu -L) and write pycs there."""
    for f in [root / "venv/pyvenv.cfg", *(root / "venv/bin").iterdir()]:
        if f.is_file() and not f.is_symlink():
            with contextlib.suppress(UnicodeDecodeError):
                text = f.read_text()
                if old in text:
                    write_atomic(f, text.replace(old, new))


def _relocate(root: Path, old: str | None, stamp: dict) -> None:
    """A root moved or copied from old: fix the venv's absolute paths, record the new one.
    (.pyc files keep the old source paths: tracebacks then show no source lines.)"""
    if old:
        log(f"{root} was moved from {old}: updating the venv's paths")
        _point_venv_at(root, old, str(root))
    stamp["path"] = str(root)
    write_atomic(root / STAMP_NAME, json.dumps(stamp, indent=1))


def _ensure_cpuinfo(qemu: str, root: Path, py: str, cpu: str) -> str:
    """Write root/proc/cpuinfo (an aarch64 one) if it is missing or different; return its text."""
    target = root / "proc" / "cpuinfo"
    out = _guest(qemu, root, py, ["-S", "-c", AUXV_PROBE], cpu).stdout.split()
    text = cpuinfo_text(int(out[0]), int(out[1]), host_cpu_count(), cpu)
    if not target.exists() or target.read_text() != text:
        target.parent.mkdir(exist_ok=True)
        write_atomic(target, text)
    return text


# -- verify ----------------------------------------------------------------------------------------

GUEST_CHECK = """\
import importlib, json, platform, subprocess, sys
imports = {}
for name in sys.argv[1:]:
    try:
        imports[name] = getattr(importlib.import_module(name), "__version__", "?")
    except Exception as exc:
        imports[name] = "error: %s: %s" % (type(exc).__name__, exc)
child = subprocess.run([sys.executable, "-c", "import platform; print(platform.machine())"],
                       capture_output=True, text=True)
peak = [l.split()[1] for l in open("/proc/self/status") if l.startswith("VmHWM:")][0]
print(json.dumps({"machine": platform.machine(), "python": platform.python_version(), "executable": sys.executable,
                  "imports": imports, "child": child.stdout.strip() or child.stderr.strip()[-300:],
                  "vmhwm_mb": round(int(peak) / 1024, 1)}))
"""


def verify(root: Root, modules: tuple[str, ...] = DEVICE_MODULES) -> dict:
    """Run a check in the guest: the machine, importing `modules`, a child python through sys.executable,
    and the peak RSS (qemu's own included). report["failures"] lists what failed."""
    t = time.monotonic()
    done = root.run(["-c", GUEST_CHECK, *modules], cwd=root.path, capture_output=True, text=True, timeout=600)
    if done.returncode != 0:
        raise RuntimeError(f"the guest check failed ({done.returncode}):\n{done.stdout}\n{done.stderr}")
    report = json.loads(done.stdout.strip().splitlines()[-1])
    report["wall_s"] = round(time.monotonic() - t, 1)
    report["failures"] = ([] if report["machine"] == "aarch64" else ["machine"]) + \
        [f"import {m}" for m, v in report["imports"].items() if v.startswith("error")] + \
        ([] if report["child"] == "aarch64" else ["child via sys.executable"])
    return report


# -- command line ----------------------------------------------------------------------------------

EPILOG = """\
examples:
  # Debian 12 arm64, python3.11, and the device set's wheels (downloaded by this machine's pip)
  .venv/bin/python tools/aarch64_root.py build --root /tmp/a64
  /tmp/a64/venv/bin/python -c 'import platform; print(platform.machine())'     # aarch64
  .venv/bin/python tools/aarch64_root.py verify --root /tmp/a64

  # a bundle's wheels, installed as its install.sh installs them (offline), edgeblock among them
  .venv/bin/edge-bundle --tier pi-zero-2w --device-id pi-01 --broker 10.0.0.2 --platform aarch64
  .venv/bin/python tools/aarch64_root.py build --root /tmp/a64 --wheels bundles/edgeblock-pi-01-pi-zero-2w-aarch64/wheels \\
      -r bundles/edgeblock-pi-01-pi-zero-2w-aarch64/wheels/edgeblock-0.1.0-py3-none-any.whl
  /tmp/a64/venv/bin/edge-device --help

  # Python 3.13 from Debian 13 (trixie)
  .venv/bin/python tools/aarch64_root.py build --root /tmp/a64-313 --dist trixie

running programs in a root:
  ROOT/venv/bin/python (the launcher) runs the aarch64 python under qemu-aarch64-static; use it as
  any python. The guest's sys.executable is the launcher, so [sys.executable, ...] children and
  multiprocessing work. A guest program must never execute an aarch64 binary itself (such as
  ROOT/venv/bin/python3.X): without binfmt_misc the kernel says "Exec format error" (Python 3.13's
  posix_spawn even loses that error: the child just exits 127). An agent started through
  python_command() rather than the launcher gets --job-python ROOT/venv/bin/python for its jobs.
  Console scripts in ROOT/venv/bin run from the host: their shebang is the launcher.
  The guest inherits the environment: a pure-Python checkout on PYTHONPATH works (no reinstall);
  PYTHONHOME, or a PYTHONPATH with this machine's x86 packages, breaks it (Root.environ() drops them).

what emulation costs (measured on a 2-core x86-64 host, qemu 7.2):
  CPU-bound Python 6-8x slower than native, numpy sgemm 11-18x, onnxruntime's convolutions about
  350x: keep emulated work to a few tiny steps. Memory seen in the guest (VmHWM, ru_maxrss, cgroup
  peaks) is the qemu process's: 85-125 MB more than a board's (35 MB at start, 125 MB after
  `import onnxruntime`, where a native process has 9 and 45 MB; qemu's translated code grows with
  the guest code run). Give memory limits that headroom.

caching (CI: keep this directory between runs, keyed on this script's hash):
  --cache (default $EDGEBLOCK_AARCH64_CACHE, else ~/.cache/edgeblock-aarch64) holds the .debs, a
  private apt state, the downloaded wheels and pip's wheel: with it a build needs no network.
  --refresh resolves the packages again (security updates) and downloads the wheels again.
  A build with the inputs of ROOT/.edgeblock-aarch64.json only checks them (about 1 s). A root
  moved or copied elsewhere works once build has run at its new path (about 1 s).
  A build takes 40-130 s on a 2-core machine, as its load allows, most of it the emulated pip; an
  empty cache adds about 20 s of downloads, installing qemu-user-static 12 s.
"""


def main(argv: list[str] | None = None) -> int:
    doc = __doc__.split("\n\n", 1)
    ap = argparse.ArgumentParser(prog="aarch64_root.py", description=doc[0] + "\n\n" + doc[1],
                                 epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    b = sub.add_parser("build", help="build a root, or check that it is up to date",
                       formatter_class=argparse.RawDescriptionHelpFormatter, epilog=EPILOG)
    b.add_argument("--root", type=Path, required=True, help="the root's directory (replaced as a whole)")
    b.add_argument("--wheels", type=Path, action="append",
                   help="a wheel file or a directory of wheels (repeatable): install offline from these "
                        "instead of downloading")
    b.add_argument("--requirement", "-r", action="append", default=[], metavar="SPEC",
                   help="a requirement or wheel file to install (repeatable); default without --wheels: the "
                        "device set, " + " ".join(DEFAULT_REQUIREMENTS) + "; with --wheels: every wheel given")
    b.add_argument("--dist", choices=sorted(DISTS), default="bookworm",
                   help="Debian release: bookworm = Python 3.11 (default, as Raspberry Pi OS 12), trixie = 3.13")
    b.add_argument("--cache", type=Path, default=None, help="the download cache (see caching below)")
    b.add_argument("--refresh", action="store_true", help="resolve the Debian packages and download wheels again")
    b.add_argument("--cpu", choices=sorted(CPU_PARTS), default="cortex-a72",
                   help="the emulated CPU and the identity in ROOT/proc/cpuinfo (default cortex-a72, a Pi 4's; "
                        "cortex-a53 is a Pi Zero 2 W's)")
    r = sub.add_parser("run", help="run the root's python: run --root DIR -- ARGS...")
    r.add_argument("--root", type=Path, required=True)
    r.add_argument("args", nargs=argparse.REMAINDER, help="the python's arguments, after --")
    v = sub.add_parser("verify", help="check a root: aarch64, the device set imports, a child python starts")
    v.add_argument("--root", type=Path, required=True)
    c = sub.add_parser("command", help="print python_command() as JSON (for other tools)")
    c.add_argument("--root", type=Path, required=True)
    a = ap.parse_args(argv)
    if a.cmd == "build":
        root = build(a.root, a.wheels, a.requirement, dist=a.dist, cache=a.cache, refresh=a.refresh, cpu=a.cpu)
        print(json.dumps(root.python_command()))
        return 0
    root = Root.open(a.root)
    if a.cmd == "run":
        args = a.args[1:] if a.args[:1] == ["--"] else a.args
        cmd = root.python_command() + args
        os.execv(cmd[0], cmd)
    if a.cmd == "command":
        print(json.dumps(root.python_command()))
        return 0
    report = verify(root)
    print(json.dumps(report, indent=1))
    return 1 if report["failures"] else 0


if __name__ == "__main__":
    sys.exit(main())
