#!/usr/bin/env bash
# CI step: build the sdist, build the wheel from that sdist, install the wheel into a fresh
# environment and smoke-test it there (.dev_scripts/ci/wheel_smoke.py), from a folder outside the
# checkout so that the checkout cannot be imported.
#
# The fresh environment is a new venv (no pip of its own) that sees the toolboxes of .venv
# (torch, mmengine, mmcv, mmdet, mmseg, mmpretrain, openmim) through a .pth file, but not .venv's
# editable transnext_mm: site-packages reached through a .pth line get no .pth processing of
# their own, so the editable install's finder never runs, and the wheel's own dist-info comes
# first on sys.path. Re-installing torch and the toolboxes would cost minutes and gigabytes
# and test pip, not this package.
#
# Usage: bash .dev_scripts/ci/wheel_smoke.sh   (after .dev_scripts/setup_env.sh; KEEP=1 keeps the work folder,
# WHEEL_SMOKE_DIR=... chooses it). Prints the sdist and wheel sizes and contents summary.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
VPY="$ROOT/.venv/bin/python"
WORK="${WHEEL_SMOKE_DIR:-$(mktemp -d -t transnext-mm-wheel.XXXXXX)}"
mkdir -p "$WORK"
[ "${KEEP:-0}" = 1 ] || trap 'rm -rf "$WORK"' EXIT
log() { echo "[wheel_smoke] $*"; }
start=$(date +%s)

log "sdist -> $WORK/dist"
(cd "$ROOT" && TRANSNEXT_MM_WITH_OPS=0 "$VPY" setup.py -q sdist -d "$WORK/dist" >"$WORK/sdist.log" 2>&1) \
  || { cat "$WORK/sdist.log"; exit 1; }
sdist=$(ls "$WORK"/dist/transnext*mm-*.tar.gz)
log "$(basename "$sdist"): $(du -k "$sdist" | cut -f1) KiB, $(tar -tzf "$sdist" | grep -vc '/$') files"

log "wheel from the sdist (compiles the op)"
# The product only: never the tests' CPU replay of the CUDA kernels, whatever the environment says.
env -u TRANSNEXT_MM_WITH_REPLAY MAX_JOBS="${MAX_JOBS:-$(nproc)}" \
  "$VPY" -m pip --disable-pip-version-check wheel -q \
  --no-build-isolation --no-deps -w "$WORK/dist" "$sdist" >"$WORK/wheel.log" 2>&1 \
  || { tail -50 "$WORK/wheel.log"; exit 1; }
wheel=$(ls "$WORK"/dist/transnext_mm-*.whl)
log "$(basename "$wheel"): $(du -k "$wheel" | cut -f1) KiB, $("$VPY" -m zipfile -l "$wheel" | tail -n +2 | wc -l) files"

log "fresh venv $WORK/venv, wheel installed with --no-deps"
"$VPY" -m venv --without-pip "$WORK/venv"
site=$("$WORK/venv/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
"$VPY" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])' > "$site/toolboxes.pth"
"$VPY" -m pip --disable-pip-version-check --python "$WORK/venv/bin/python" install -q --no-deps "$wheel"

log "smoke test from $WORK/run"
mkdir -p "$WORK/run"
cp "$ROOT/.dev_scripts/ci/wheel_smoke.py" "$WORK/run/"
(cd "$WORK/run" && env -u PYTHONPATH PATH="$WORK/venv/bin:$PATH" OMP_NUM_THREADS=2 \
  "$WORK/venv/bin/python" wheel_smoke.py --sdist "$sdist" --wheel "$wheel" --checkout "$ROOT")
log "passed in $(( $(date +%s) - start )) s"
