#!/usr/bin/env bash
# Compile-only check of the CUDA kernels of transnext_mm._ext (no GPU needed, only nvcc).
#
# Compiles ops/csrc/cuda/*.cu with nvcc for one architecture (TORCH_CUDA_ARCH_LIST, default 9.0)
# and the CUDA launchers ops/csrc/cuda/*.cpp with the host compiler, with the flags torch's
# BuildExtension uses, into a temporary directory, so CUDA build errors are caught on CPU-only
# CI. Exit status: 0 ok, 1 compile error, 77 skipped (no nvcc or no CUDA torch).
#
# Usage: tools/check_cuda_build.sh            (PYTHON=... to choose the interpreter)
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PY="${PYTHON:-$ROOT/.venv/bin/python}"
[ -x "$PY" ] || PY=python3
NVCC="${NVCC:-$(command -v nvcc || true)}"
if [ -z "$NVCC" ] && [ -n "${CUDA_HOME:-}" ] && [ -x "$CUDA_HOME/bin/nvcc" ]; then
  NVCC="$CUDA_HOME/bin/nvcc"
fi
if [ -z "$NVCC" ]; then
  echo "check_cuda_build: nvcc not found; skipped"
  exit 77
fi

# Include paths and ABI flag of the installed torch.
mapfile -t TORCH_INFO < <("$PY" - <<'PYEOF'
import sysconfig
import torch
from torch.utils import cpp_extension
print(torch.version.cuda or '')
print(' '.join(cpp_extension.include_paths()))
print(sysconfig.get_paths()['include'])
print(int(torch._C._GLIBCXX_USE_CXX11_ABI))
PYEOF
)
if [ -z "${TORCH_INFO[0]}" ]; then
  echo "check_cuda_build: torch is a CPU-only build; skipped"
  exit 77
fi

ARCH="${TORCH_CUDA_ARCH_LIST:-9.0}"
ARCH="${ARCH%% *}"          # first architecture only: this is a compile check
ARCH="${ARCH%%+PTX}"
SM="${ARCH/./}"
OUT="$(mktemp -d)"
trap 'rm -rf "$OUT"' EXIT

INCLUDES=(-I"$ROOT/ops/csrc" -I"${TORCH_INFO[2]}")
for dir in ${TORCH_INFO[1]}; do INCLUDES+=(-I"$dir"); done
# The toolkit's headers for the host compiler (nvcc finds its own).
for home in "${CUDA_HOME:-}" "${CUDA_PATH:-}" "$(dirname "$(dirname "$NVCC")")" /usr/local/cuda; do
  if [ -n "$home" ] && [ -f "$home/include/cuda_runtime_api.h" ]; then
    INCLUDES+=(-I"$home/include")
    break
  fi
done
DEFINES=(-DWITH_CUDA -DTORCH_API_INCLUDE_EXTENSION_H -DTORCH_EXTENSION_NAME=_ext
         -D_GLIBCXX_USE_CXX11_ABI="${TORCH_INFO[3]}")

echo "check_cuda_build: $("$NVCC" --version | tail -n 2 | head -n 1) (torch CUDA ${TORCH_INFO[0]}), sm_$SM"
status=0
start=$(date +%s)
for src in "$ROOT"/ops/csrc/cuda/*.cu; do
  echo "  compiling ${src#$ROOT/}"
  "$NVCC" -c "$src" -o "$OUT/$(basename "$src").o" "${INCLUDES[@]}" \
    -std=c++20 -O3 -Xcompiler -fPIC --expt-relaxed-constexpr \
    -D__CUDA_NO_HALF_OPERATORS__ -D__CUDA_NO_HALF_CONVERSIONS__ \
    -D__CUDA_NO_BFLOAT16_CONVERSIONS__ -D__CUDA_NO_HALF2_OPERATORS__ "${DEFINES[@]}" \
    -gencode "arch=compute_$SM,code=sm_$SM" || status=1
done
for src in "$ROOT"/ops/csrc/cuda/*.cpp; do
  echo "  compiling ${src#$ROOT/}"
  "${CXX:-c++}" -c "$src" -o "$OUT/$(basename "$src").o" "${INCLUDES[@]}" "${DEFINES[@]}" \
    -std=c++20 -O1 -fPIC || status=1
done
echo "check_cuda_build: $([ $status -eq 0 ] && echo OK || echo FAILED) in $(( $(date +%s) - start )) s"
exit $status
