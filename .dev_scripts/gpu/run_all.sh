#!/usr/bin/env bash
# The GPU check in one command, most telling steps first: the build, the environment with the
# op's first-use self-check on every head-dim variant and dtype (python -m
# transnext_mm.collect_env), the CUDA tests (pytest -m cuda), compute-sanitizer memcheck /
# racecheck / synccheck over the small CUDA tests, benchmarks (tools/benchmark.py: the
# attention layers forward and backward, the backbone's training step, the layers forward).
#
#   bash .dev_scripts/gpu/run_all.sh OUT              on a machine with an NVIDIA GPU
#   bash .dev_scripts/gpu/run_all.sh OUT --dry-run    the same steps on the CPU: tiny shapes,
#                                                     no sanitizer
#
# Wheels in .whl/ (.dev_scripts/gpu/fetch_wheels.sh) are installed into /tmp/site first. A
# transnext_mm/_ext*.so built ahead (.dev_scripts/gpu/build_ext_ahead.sh) is used when it
# imports with CUDA kernels; otherwise the op is built here for sm_90. The run keeps within
# GPU_RUN_BUDGET_S seconds (default 450): a step gets at most what is left and is recorded as
# skipped when too little is. OUT receives run_all.log and report.json (.dev_scripts/gpu/report.py);
# the summary table is printed last. Exit status 1 if a step failed.
set -uo pipefail

usage() { echo "usage: bash .dev_scripts/gpu/run_all.sh OUT [--dry-run]" >&2; exit 2; }
[ $# -ge 1 ] && [ "${1:0:1}" != "-" ] || usage
OUT="$1"
DRY=0
case "${2:-}" in
  "") ;;
  --dry-run) DRY=1 ;;
  *) echo "run_all.sh: unknown option '$2' (allowed: --dry-run)" >&2; exit 2 ;;
esac
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
cd "$ROOT"
mkdir -p "$OUT"
OUT="$(cd "$OUT" && pwd)"
REPORT="$OUT/report.json"
WORK="$(mktemp -d)"
rm -f "$REPORT" "$OUT/run_all.log"
exec > >(tee "$OUT/run_all.log") 2>&1
TEE_PID=$!

PY="${PYTHON:-python3}"
export PYTHONUNBUFFERED=1 PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
BUDGET="${GPU_RUN_BUDGET_S:-450}"
[ $DRY -eq 1 ] && export OMP_NUM_THREADS=1  # the dry run checks the steps, not the speed
START=$SECONDS

# run NAME MAX_S CMD...: CMD within MAX_S seconds and what is left of the budget (15 s kept for
# the summary); sets RC (125: skipped) and DUR.
run() {
  local name="$1" limit=$(( BUDGET - (SECONDS - START) - 15 )) t0=$SECONDS
  [ "$2" -lt "$limit" ] && limit="$2"
  shift 2
  echo >&2
  echo "===== [$(( SECONDS - START )) s] $name" >&2
  if [ "$limit" -lt 10 ]; then
    echo "run_all.sh: $name skipped, the time budget is spent" >&2
    RC=125 DUR=0
    return
  fi
  timeout -k 5 "$limit" "$@"
  RC=$?
  DUR=$(( SECONDS - t0 ))
}
record() { "$PY" .dev_scripts/gpu/report.py step "$REPORT" "$1" "$RC" "$DUR" "${@:2}"; }

# Python packages the GPU machine lacks (mmengine, mmcv-lite and their pure-Python needs).
if [ $DRY -eq 0 ] && ls .whl/*.whl >/dev/null 2>&1; then
  run wheels 60 "$PY" -m pip install -q --no-index --no-deps --upgrade --target /tmp/site \
    .whl/*.whl
  export PYTHONPATH="$PYTHONPATH:/tmp/site"
  record wheels --note "$(cd .whl && echo *.whl)"
fi

# The op: the build made ahead when it has CUDA kernels (the dry run: the CPU build), else built
# here for sm_90; a build without CUDA kernels is a failure.
CHECK_BUILD='from transnext_mm.ops.dispatch import BUILD; print(BUILD); assert BUILD.built'
[ $DRY -eq 0 ] && CHECK_BUILD="$CHECK_BUILD and BUILD.cuda, 'no CUDA kernels'"
if [ $DRY -eq 1 ] || "$PY" -c "$CHECK_BUILD" >/dev/null 2>&1; then
  run build 30 "$PY" -c "$CHECK_BUILD"
  record build --note "$([ $DRY -eq 1 ] && echo 'the CPU build' || echo 'built ahead')"
else
  run build 300 env TORCH_CUDA_ARCH_LIST=9.0 FORCE_CUDA=1 MAX_JOBS=16 "$PY" setup.py \
    build_ext --inplace >"$WORK/build.log" 2>&1
  tail -n 5 "$WORK/build.log"
  "$PY" -c "$CHECK_BUILD" || RC=1
  record build --note 'built here with nvcc for sm_90'
fi

# The environment and the op's first-use self-check.
run environment 90 "$PY" -m transnext_mm.collect_env >"$WORK/env.txt"
cat "$WORK/env.txt"
record environment --lines "$WORK/env.txt"

# The CUDA tests (on the dry run's CPU they are collected and skipped).
PYTEST=("$PY" -m pytest -q -p no:cacheprovider -o addopts= -m cuda)
XDIST=()
[ $DRY -eq 0 ] && "$PY" -c 'import xdist' 2>/dev/null && XDIST=(-n 4)
run pytest 150 "${PYTEST[@]}" "${XDIST[@]}" --junitxml="$WORK/junit.xml" \
  tests/test_ops/test_aggregated_attention
record pytest --junit "$WORK/junit.xml"

# compute-sanitizer over the CUDA tests of the kernels' edge shapes and of the table form; no
# caching allocator, so that memcheck sees each tensor's bounds; only the op's kernels (without
# that filter where a sanitizer refuses it).
EDGE=tests/test_ops/test_aggregated_attention/test_cuda.py
if [ $DRY -eq 1 ] || ! command -v compute-sanitizer >/dev/null; then
  RC=125 DUR=0
  record sanitizer --note "$([ $DRY -eq 1 ] && echo 'dry run' || echo 'no compute-sanitizer')"
else
  for tool in memcheck racecheck synccheck; do
    tests='edge_shapes or table_form'
    # racecheck is the slow one
    [ $tool = racecheck ] && tests='(edge_shapes and float32 and contiguous) or (table_form and float32)'
    for filter in "--kernel-name kns=transnext_mm" ""; do
      # shellcheck disable=SC2086
      run "sanitizer_$tool" 75 env PYTORCH_NO_CUDA_MEMORY_CACHING=1 compute-sanitizer \
        --tool $tool $filter --error-exitcode 9 "${PYTEST[@]}" "$EDGE" -k "$tests" \
        >"$WORK/$tool.log" 2>&1
      grep -q "SUMMARY" "$WORK/$tool.log" || [ $RC -eq 124 ] || [ $RC -eq 125 ] && break
    done
    tail -n 3 "$WORK/$tool.log"
    record "sanitizer_$tool" --sanitizer "$WORK/$tool.log"
  done
fi

# Benchmarks: TransNeXt-Tiny at 512x512 batch 8 under bf16 autocast (dry run: Micro, 32x32, the
# op only). Peer backbones (tools/benchmark.py --peers) need mmdet and mmpretrain: not here.
if [ $DRY -eq 1 ]; then
  SHAPE=(--device cpu --threads 1 --arch micro --size 32 32 --batch 1 --warmup 0 --repeats 1)
  LAYER=(op) TRAIN=(op)
else
  SHAPE=(--device cuda --dtype bf16 --arch tiny --size 512 512 --batch 8)
  LAYER=(reference torch op) TRAIN=(reference-nocache torch op)
fi
bench() {
  run "$1" 120 "$PY" tools/benchmark.py "${@:2}" "${SHAPE[@]}" --json "$WORK/$1.json"
  record "$1" --json "$WORK/$1.json"
}
bench bench_layers_train --layer --backward --attn-impl "${LAYER[@]}"
bench bench_backbone_train --backward --attn-impl "${TRAIN[@]}"
bench bench_layers --layer --attn-impl "${LAYER[@]}"

echo
echo "===== [$(( SECONDS - START )) s] summary ($REPORT)"
"$PY" .dev_scripts/gpu/report.py summary "$REPORT"
STATUS=$?
rm -rf "$WORK"
exec >&- 2>&-
wait "$TEE_PID" 2>/dev/null
exit $STATUS
