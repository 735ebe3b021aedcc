@@# install.sh, the board's installer. edge-bundle fills it (coordinator/ops/bundle_files.py) and drops
@@# these lines. Only @@word is a placeholder (string.Template with the delimiter @@; @@@@ is a literal
@@# @@), so bash's own $VAR and ${VAR} stay as written. The placeholders are the bundle's facts below,
@@# each filled shell-quoted; the rest of the script is the same for every bundle.
#!/usr/bin/env bash
# Installs the edgeblock device agent from this bundle's wheels only (no network needed).
# Run it on the board; running it again is safe and upgrades in place. ./install.sh --help
set -euo pipefail
set -E   # the ERR trap below also fires inside functions

# This bundle, as edge-bundle wrote it:
DEVICE_ID=@@device_id
TIER=@@tier
ARCH=@@arch
PYTHON_VERSION=@@python
GLIBC_MIN=@@glibc
DATA_DIR=@@data_dir
STATE_DIR=@@state_dir
SERVICE_USER=@@service_user
UNIT=@@unit
DEFAULT_VENV=@@venv
DEFAULT_CONFIG_DIR=@@config_dir
PUBLIC_FILES=@@public_files
SECRET_FILES=@@secret_files

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
