#!/usr/bin/env bash
# Compile-only check of the CUDA kernels of transnext_mm._ext (no GPU needed, only nvcc).
#
# Compiles ops/csrc/pytorch/cuda/*.cu (which include the kernel headers of ops/csrc/common/cuda)
# with nvcc for one architecture (TORCH_CUDA_ARCH_LIST, default 9.0) and the CUDA launchers
# ops/csrc/pytorch/cuda/*.cpp with the host compiler, with the flags torch's BuildExtension uses,
# into a temporary directory, so CUDA build errors are caught on CPU-only CI. With -Xptxas -v it
# prints registers, stack and spills of every kernel and fails when a kernel variant for head
# dim 24 (HeadDim<24, true>, the released models') spills to local memory (spills of the other
# exact variants, 16 / 32 / 48 / 64, are flagged). Exit status: 0 ok, 1 compile error or spill,
# 77 skipped (no nvcc or no CUDA torch).
#
# Usage: .dev_scripts/check_cuda_build.sh            (PYTHON=... to choose the interpreter)
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
for src in "$ROOT"/ops/csrc/pytorch/cuda/*.cu; do
  echo "  compiling ${src#$ROOT/} (-Xptxas -v)"
  log="$OUT/$(basename "$src").ptxas"
  if ! "$NVCC" -c "$src" -o "$OUT/$(basename "$src").o" "${INCLUDES[@]}" \
      -std=c++20 -O3 -Xcompiler -fPIC --expt-relaxed-constexpr -Xptxas -v \
      -D__CUDA_NO_HALF_OPERATORS__ -D__CUDA_NO_HALF_CONVERSIONS__ \
      -D__CUDA_NO_BFLOAT16_CONVERSIONS__ -D__CUDA_NO_HALF2_OPERATORS__ "${DEFINES[@]}" \
      -gencode "arch=compute_$SM,code=sm_$SM" > "$log" 2>&1; then
    cat "$log"
    status=1
    continue
  fi
  # Registers, stack and spills per kernel (demangled names); the head-dim-24 variants (every
  # released model) must not spill to local memory; spills of the other exact variants are flagged.
  "$PY" - "$log" <<'PYEOF' || status=1
import re
import subprocess
import sys

entries, name = {}, None
for line in open(sys.argv[1]):
    m = re.search(r"Function properties for (\S+)", line)
    if m:
        name = m.group(1)
        continue
    m = re.search(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads", line)
    if m and name:
        entries.setdefault(name, {}).update(stack=int(m[1]), spill=int(m[2]) + int(m[3]))
    m = re.search(r"Compiling entry function '(\S+)'", line)
    if m:
        name = m.group(1)
    m = re.search(r"Used (\d+) registers", line)
    if m and name:
        entries.setdefault(name, {})['registers'] = int(m[1])
kernels = {k: v for k, v in entries.items() if 'registers' in v}
names = subprocess.run(['c++filt'], input='\n'.join(kernels), capture_output=True,
                       text=True).stdout.split('\n')
failed = []
for (mangled, info), readable in zip(kernels.items(), names):
    readable = re.sub(r'transnext_mm::|\(anonymous namespace\)::|c10::', '', readable)
    readable = readable.split('(')[0]
    spill = info.get('spill', 0)
    exact = re.search(r'HeadDim<(\d+), true>', readable)
    flag = ''
    if exact and spill:
        flag = '  <- spills'
        if exact.group(1) == '24':
            flag = '  <- SPILLS at head dim 24'
            failed.append(readable)
    print(f"    {info['registers']:4d} regs {info.get('stack', 0):5d} B stack {spill:5d} B spill  "
          f"{readable}{flag}")
if not kernels:
    print('    no ptxas statistics found')
    sys.exit(1)
if failed:
    print(f'check_cuda_build: {len(failed)} head-dim-24 kernels spill to local memory')
    sys.exit(1)
PYEOF
done
for src in "$ROOT"/ops/csrc/pytorch/cuda/*.cpp; do
  echo "  compiling ${src#$ROOT/}"
  "${CXX:-c++}" -c "$src" -o "$OUT/$(basename "$src").o" "${INCLUDES[@]}" "${DEFINES[@]}" \
    -std=c++20 -O1 -fPIC || status=1
done
echo "check_cuda_build: $([ $status -eq 0 ] && echo OK || echo FAILED) in $(( $(date +%s) - start )) s"
exit $status
