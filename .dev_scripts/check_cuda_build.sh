#!/usr/bin/env bash
# Compile-only check of the CUDA kernels of transnext_mm._ext (no GPU needed, only nvcc).
#
# Compiles ops/csrc/pytorch/cuda/*.cu (which include the kernel headers of ops/csrc/common/cuda)
# with nvcc for one architecture (TORCH_CUDA_ARCH_LIST, default 9.0) and the CUDA launchers
# ops/csrc/pytorch/cuda/*.cpp with the host compiler, with the flags torch's BuildExtension uses,
# into a temporary directory, so CUDA build errors are caught on CPU-only CI. With -Xptxas -v it
# prints a table of every kernel's registers, stack frame, spill stores / loads, static shared
# memory and the resident warps per SM these allow (block sizes from
# ops/csrc/common/cuda/aggregated_attention_launch.cuh; sm_90 limits: 64K registers, 228 KiB shared
# memory, 64 warps and 32 blocks per SM), and fails when a kernel of the exact head-dim variants
# 16, 24 or 32 (HeadDim<16|24|32, true>) has any stack frame (local memory: spills or
# address-taken per-thread arrays). The wider exact variants are only flagged: d=48 keeps a small
# stack frame in some kernels, d=64 spills (their rows do not fit the registers), and the generic
# variant keeps its rows in local memory by design. Exit status: 0 ok, 1 compile error or stack
# frame, 77 skipped (no nvcc or no CUDA torch).
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
  # The ptxas table; fails on a stack frame in the exact variants 16, 24 and 32.
  "$PY" - "$log" "$ROOT/ops/csrc/common/cuda/aggregated_attention_launch.cuh" <<'PYEOF' || status=1
import re
import subprocess
import sys

entries, name = {}, None
for line in open(sys.argv[1]):
    m = re.search(r"Compiling entry function '(\S+)'", line)
    if m:
        name = m.group(1)
        continue
    m = re.search(r"Function properties for (\S+)", line)
    if m:
        name = m.group(1)
        continue
    m = re.search(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads", line)
    if m and name:
        entries.setdefault(name, {}).update(stack=int(m[1]), stores=int(m[2]), loads=int(m[3]))
    m = re.search(r"Used (\d+) registers", line)
    if m and name:
        smem = re.search(r"(\d+) bytes smem", line)
        entries.setdefault(name, {}).update(registers=int(m[1]), smem=int(smem[1]) if smem else 0)
kernels = {k: v for k, v in entries.items() if 'registers' in v}
if not kernels:
    print('    no ptxas statistics found')
    sys.exit(1)

# Block sizes of the kernel descriptors (aggregated_attention_blocks.cuh) from the launch plans.
launch = open(sys.argv[2]).read()
threads = {
    kind: int(re.search(rf'constexpr int {constant} = (\d+);', launch)[1])
    for kind, constant in (('ForwardKernel', 'kQueryThreads'),
                           ('BackwardQueryKernel', 'kQueryThreads'),
                           ('BackwardPoolKernel', 'kPoolThreads'),
                           ('WindowGradKernel', 'kGatherThreads'),
                           ('TableGradKernel', 'kGatherThreads'))
}


def warps_per_sm(registers, smem, block_threads):
    """Resident warps per SM on sm_90 (registers allocated per warp in units of 256, 1 KiB of
    shared memory reserved per block)."""
    warps = -(-block_threads // 32)
    per_warp = -(-registers * 32 // 256) * 256
    blocks = min(32, 64 // warps, (65536 // per_warp) // warps,
                 (228 * 1024) // (smem + 1024))
    return blocks * warps


names = subprocess.run(['c++filt'], input='\n'.join(kernels), capture_output=True,
                       text=True).stdout.split('\n')
rows, failed = [], []
for (mangled, info), readable in zip(kernels.items(), names):
    readable = re.sub(r'transnext_mm::|\(anonymous namespace\)::|c10::', '', readable)
    readable = readable.split('(')[0].strip()
    readable = re.sub(r'^void kernel<(.*)>$', r'\1', readable).replace('> >', '>>')
    kind = readable.split('<')[0]
    warps = warps_per_sm(info['registers'], info['smem'], threads[kind]) if kind in threads else 0
    exact = re.search(r'HeadDim<(\d+), true>', readable)
    flag = ''
    if info.get('stack', 0):
        if exact and exact.group(1) in ('16', '24', '32'):
            flag = '  <- STACK FRAME'
            failed.append(readable)
        elif exact:
            flag = '  <- stack frame (allowed for this head dim)'
    rows.append((readable, info, warps, flag))
print(f"    {'regs':>4} {'stack':>6} {'spill st':>8} {'spill ld':>8} {'smem':>6} {'warps/SM':>8}  kernel")
for readable, info, warps, flag in sorted(rows):
    print(f"    {info['registers']:4d} {info.get('stack', 0):6d} {info.get('stores', 0):8d} "
          f"{info.get('loads', 0):8d} {info['smem']:6d} {warps:8d}  {readable}{flag}")
if failed:
    print(f'check_cuda_build: {len(failed)} kernels of head dims 16 / 24 / 32 have a stack frame')
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
