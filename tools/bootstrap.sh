#!/usr/bin/env bash
# Set up a fresh Debian machine for edgeblock: system packages, then a virtual environment
# in .venv with the device and server sets. Idempotent: a second run only checks.
set -euo pipefail
cd "$(dirname "$0")/.."

SUDO=""
if [ "$(id -u)" -ne 0 ]; then SUDO="sudo"; fi

need_apt=()
command -v mosquitto >/dev/null 2>&1 || [ -x /usr/sbin/mosquitto ] || need_apt+=(mosquitto)
command -v openssl >/dev/null 2>&1 || need_apt+=(openssl)   # certificates for the production-broker tests
[ -f /usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz ] || need_apt+=(dataset-fashion-mnist)
python3 -c "import ensurepip, venv" >/dev/null 2>&1 || need_apt+=(python3-venv)
# headless, the run report's test loads the page in it (tests/test_run_report.py)
command -v chromium >/dev/null 2>&1 || need_apt+=(chromium)
# the replicated coordinator's state store; the tests start a server of their own (tests/postgres_helpers.py)
ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1 || need_apt+=(postgresql)
if [ ${#need_apt[@]} -gt 0 ]; then
    echo "bootstrap: installing Debian packages: ${need_apt[*]}"
    $SUDO apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq "${need_apt[@]}" >/dev/null
fi
# Debian enables and starts a system-wide broker; edgeblock starts its own on a free port.

if [ ! -x .venv/bin/python ]; then
    echo "bootstrap: creating .venv"
    python3 -m venv .venv
fi
# torch first and pinned exactly: an unpinned torch resolves to a multi-GB CUDA build.
.venv/bin/python -m pip install -q "torch==2.13.0"
# an environment made before the device moved to the maintained onnxruntime: both packages own onnxruntime/
if .venv/bin/python -m pip show -q onnxruntime-training-cpu >/dev/null 2>&1; then
    .venv/bin/python -m pip uninstall -q -y onnxruntime-training-cpu onnxruntime
fi
.venv/bin/python -m pip install -q -e ".[server,test]"
# The coordinator's gradient builder, in a folder of its own (coordinator/model/part_graphs.py).
BUILDER=.venv/gradient-builder
[ -d "$BUILDER/onnxruntime/training" ] || \
    .venv/bin/python -m pip install -q --no-deps --target "$BUILDER" "onnxruntime-training-cpu==1.19.2"
echo "bootstrap: ready ($(.venv/bin/python --version), $(.venv/bin/python -c 'import onnxruntime; print("onnxruntime", onnxruntime.__version__)' 2>/dev/null))"
