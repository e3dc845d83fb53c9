#!/usr/bin/env bash
# Idempotent environment set-up for transnext-mm on a fresh machine (Python 3.11, CPU or GPU).
#
# Creates .venv/ at the repository root and installs torch, the OpenMMLab stack and this package.
# mmcv 2.x ships no wheels on PyPI and mmdet 3.3.0 / mmseg 1.2.2 need mmcv < 2.2.0, so mmcv 2.1.0
# is built from its sdist. Two fixes are needed on torch >= 2.14: its setup.py imports
# pkg_resources (gone in setuptools >= 81, so setuptools 80.x is pinned) and it hard-codes
# -std=c++17 while torch's headers require C++20. The built wheel is cached outside the checkout
# (TRANSNEXT_MM_CACHE, default ~/.cache/transnext-mm) keyed by torch version, so the ~7 minute
# build happens once per machine.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
PY="${PYTHON:-python3.11}"
TORCH_VERSION="${TORCH_VERSION:-2.14.1}"
TORCHVISION_VERSION="${TORCHVISION_VERSION:-0.29.1}"
MMCV_VERSION="2.1.0"
CACHE="${TRANSNEXT_MM_CACHE:-$HOME/.cache/transnext-mm}"
STAMP=".venv/.transnext-mm-ready"

log() { echo "[setup_env] $*"; }

if [ ! -x .venv/bin/python ]; then
  log "creating .venv with $PY"
  "$PY" -m venv .venv
fi
VPY="$ROOT/.venv/bin/python"
PIP=("$VPY" -m pip --disable-pip-version-check)

# Everything below is skipped when nothing changed since the last successful set-up.
# The stamp covers what decides the installation, op sources included (the editable install
# builds transnext_mm/_ext and the tests' transnext_mm/_ext_replay in the checkout); both
# libraries must be there.
want="torch=$TORCH_VERSION mmcv=$MMCV_VERSION replay=1 inputs=$(cat setup.py requirements/*.txt \
  $(find ops -type f 2>/dev/null | sort) 2>/dev/null | sha1sum | cut -c1-12)"
if [ -f "$STAMP" ] && [ "$(cat "$STAMP")" = "$want" ] \
    && ls transnext_mm/_ext.*.so transnext_mm/_ext_replay.*.so >/dev/null 2>&1; then
  log "environment up to date ($want)"
  exit 0
fi

"${PIP[@]}" install -q --upgrade "pip<26" "setuptools==80.*" wheel ninja
"${PIP[@]}" install -q "torch==$TORCH_VERSION" "torchvision==$TORCHVISION_VERSION"

if ! "$VPY" -c "import mmcv, mmcv.ops; assert mmcv.__version__ == '$MMCV_VERSION'" 2>/dev/null; then
  WHEEL_DIR="$CACHE/wheels/torch-$TORCH_VERSION"
  mkdir -p "$WHEEL_DIR"
  wheel=$(ls "$WHEEL_DIR"/mmcv-"$MMCV_VERSION"-*.whl 2>/dev/null | head -n1 || true)
  if [ -z "$wheel" ]; then
    log "building mmcv $MMCV_VERSION from source (about 7 minutes on 2 cores; cached afterwards)"
    "${PIP[@]}" install -q "mmengine==0.10.7" "numpy<2.3" packaging addict yapf opencv-python-headless pyyaml
    work=$(mktemp -d)
    "${PIP[@]}" download -q --no-deps --no-build-isolation --no-binary :all: "mmcv==$MMCV_VERSION" -d "$work"
    tar -xzf "$work"/mmcv-"$MMCV_VERSION".tar.gz -C "$work"
    src="$work/mmcv-$MMCV_VERSION"
    sed -i 's/-std=c++17/-std=c++20/g' "$src/setup.py"
    (cd "$src" && MAX_JOBS="${MAX_JOBS:-$(nproc)}" MMCV_WITH_OPS=1 \
      "${PIP[@]}" wheel -q --no-build-isolation --no-deps -w "$WHEEL_DIR" .)
    rm -rf "$work"
    wheel=$(ls "$WHEEL_DIR"/mmcv-"$MMCV_VERSION"-*.whl | head -n1)
  else
    log "using cached mmcv wheel $wheel"
  fi
  "${PIP[@]}" install -q --no-deps "$wheel"
fi

"${PIP[@]}" install -q -r requirements/runtime.txt -r requirements/toolboxes.txt -r requirements/tests.txt \
  -r requirements/mim.txt -r requirements/lint.txt  # lint.txt: .dev_scripts/lint.sh
# OpenMMLab's mim (mim search/train/test find this package's model index, configs and tools under
# transnext_mm/.mim). Without --no-deps, pip would pull opendatalab, which downgrades setuptools to
# 60.x, below torch's >=77.0.3; its other dependencies come from requirements/mim.txt.
"${PIP[@]}" install -q --no-deps "openmim==0.3.9"
"${PIP[@]}" install -q -r requirements/deploy.txt  # ONNX export and ONNX Runtime (tools/deployment)
# The package itself; the compiled op is built here (CPU always, CUDA when available), and with
# TRANSNEXT_MM_WITH_REPLAY=1 the CPU replay of the CUDA kernels that the tests use (no part of
# the wheel).
TRANSNEXT_MM_WITH_REPLAY=1 "${PIP[@]}" install -q --no-build-isolation --no-deps -e .
"$VPY" -c "import transnext_mm, mmdet, mmseg, mmpretrain, mmcv.ops, mim; print('transnext_mm', transnext_mm.__version__, 'ready')"
"$VPY" - <<'PYEOF'
import setuptools
major = int(setuptools.__version__.split('.')[0])
assert 77 <= major < 81, (f'setuptools {setuptools.__version__}: torch needs >=77.0.3 and mmcv '
                          "2.1.0's setup.py pkg_resources (gone in 81); pin setuptools==80.*")
PYEOF
echo "$want" > "$STAMP"
