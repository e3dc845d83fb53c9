#!/usr/bin/env bash
# Build transnext_mm/_ext.cpython-312-x86_64-linux-gnu.so with CUDA kernels for sm_90 on a
# machine without a GPU, against the GPU machine's Python 3.12 and torch 2.11.0 (PyPI's wheel is
# the cu130 build), so that .dev_scripts/gpu/run_all.sh uses it and spends no GPU time compiling.
# The CPU replay of the CUDA kernels (a test extension) is not built: the GPU run needs none.
#
#   bash .dev_scripts/gpu/build_ext_ahead.sh [VENV]
#
# VENV (default /tmp/t211/v312) is a throwaway virtual environment with torch 2.11.0; when it is
# missing it is made with $PYTHON312 (default python3.12) and `pip install torch==2.11.0
# "setuptools<82" ninja numpy` (about 3 GB to download). The sources (this working tree) are
# compiled in a copy, with nvcc from CUDA_HOME (default /usr/local/cuda) and MAX_JOBS (default 2);
# the result is stripped of debug sections and copied into transnext_mm/.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
VENV="${1:-/tmp/t211/v312}"
if [ ! -x "$VENV/bin/python" ]; then
  "${PYTHON312:-python3.12}" -m venv "$VENV"
  "$VENV/bin/pip" install -q torch==2.11.0 "setuptools<82" ninja numpy
fi
"$VENV/bin/python" - <<'EOF'
import sys
import torch
assert sys.version_info[:2] == (3, 12), f'Python 3.12 is needed, got {sys.version}'
assert torch.__version__.startswith('2.11.0') and torch.version.cuda, (
    f'torch 2.11.0 with CUDA is needed, got {torch.__version__} (CUDA {torch.version.cuda})')
print(f'build_ext_ahead: Python {sys.version.split()[0]}, torch {torch.__version__}')
EOF

SRC="$(mktemp -d)"
trap 'rm -rf "$SRC"' EXIT
(cd "$ROOT" && git ls-files -co --exclude-standard -z -- setup.py README.md MANIFEST.in \
  LICENSE requirements ops transnext_mm | tar --null -T - -cf -) | tar -xf - -C "$SRC"
(cd "$SRC" && CUDA_HOME="${CUDA_HOME:-/usr/local/cuda}" TORCH_CUDA_ARCH_LIST=9.0 FORCE_CUDA=1 \
  TRANSNEXT_MM_WITH_REPLAY=0 MAX_JOBS="${MAX_JOBS:-2}" "$VENV/bin/python" setup.py build_ext \
  --inplace)
SO="$(ls "$SRC"/transnext_mm/_ext.cpython-312-*.so)"
strip --strip-debug "$SO"
# setup.py falls back to CPU kernels when the CUDA build fails: that is a failure here.
"$VENV/bin/python" - "$SO" <<'EOF'
import importlib.util
import sys
import torch  # noqa: F401 -- loads the libraries the extension links against
spec = importlib.util.spec_from_file_location('transnext_mm._ext', sys.argv[1])
ext = importlib.util.module_from_spec(spec)
spec.loader.exec_module(ext)
assert ext.with_cuda, 'transnext_mm._ext was built without CUDA kernels (see the log above)'
EOF
cp "$SO" "$ROOT/transnext_mm/"
echo "build_ext_ahead: transnext_mm/$(basename "$SO") ($(du -h "$SO" | cut -f1)) with CUDA" \
  "kernels for sm_90"
