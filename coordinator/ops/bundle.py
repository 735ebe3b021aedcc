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
import os
import shutil
import sys
import tarfile
import tempfile
from pathlib import Path

from coordinator.ops.bundle_errors import BundleError
from coordinator.ops.bundle_files import write_files
from coordinator.ops.bundle_request import DATA_DIR, STATE_DIR, UNIT, Bundle, check
from coordinator.ops.wheels import ARCHES, PYTHON, gather
from edge_runtime.device.tiers import DEFAULT_PROFILES_DIR

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
        (staging / "wheels").mkdir()
        project = gather(staging / "wheels", bundle.arch, bundle.extra_wheels)
        write_files(staging, bundle, project)
        if target.exists():
            shutil.rmtree(target)
        staging.rename(target)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return target, _archive(target, bundle.secret)


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


# -- command line -----------------------------------------------------------------------------

def _parser() -> argparse.ArgumentParser:
    tiers = ", ".join(sorted(p.stem for p in DEFAULT_PROFILES_DIR.glob("*.toml"))) or "none found"
    p = argparse.ArgumentParser(
        prog="edge-bundle", formatter_class=argparse.RawDescriptionHelpFormatter, description=__doc__,
        epilog=f"""examples:
  # a Raspberry Pi Zero 2 W (64-bit Raspberry Pi OS) in fleet "lab":
  edge-bundle --tier pi-zero-2w --device-id board-7 --broker mqtt://10.0.0.2:1883 --fleet lab \\
      --platform aarch64

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
                   help="a wheel to bundle as well, for the board's platform and CPython, e.g. a build of a "
                        "dependency that the package index lacks; repeatable")
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
