#!/usr/bin/env bash
# The prepared GPU run: one command that checks and measures the op on a GPU and records it all.
#
#   bash .dev_scripts/gpu/run_all.sh OUT_DIR             on the GPU machine (wheels in .whl/, see
#                                                 .dev_scripts/gpu/fetch_wheels.sh)
#   bash .dev_scripts/gpu/run_all.sh OUT_DIR --dry-run   the same script on the CPU: tiny shapes, no
#                                                 sanitizer, no wheel install
#
# Steps, each time-boxed and fault-isolated (a failure is recorded and the run goes on):
# install the carried wheels (mmengine, mmcv-lite and their pure-Python needs) into /tmp/site;
# build transnext_mm._ext for sm_90 (MAX_JOBS=16; missing CUDA kernels are a loud failure) and
# the tests' CPU replay of the CUDA kernels transnext_mm._ext_replay;
# describe the environment; pytest tests/test_ops with the CUDA tests enabled; parity
# (.dev_scripts/gpu/parity.py); the benchmark matrix (.dev_scripts/gpu/bench_matrix.py, part core); the
# flex_attention layers; compute-sanitizer memcheck / racecheck / synccheck over small CUDA
# shapes (.dev_scripts/gpu/sanitize_shapes.py); flex_attention parity; the torch.compile'd backbone.
# Most telling first: what a short budget leaves out comes last.
# OUT_DIR receives run_all.log and report.json (sections environment, tests, parity,
# benchmarks, summary), rewritten after every step; the summary table is printed last.
# The whole run keeps within GPU_RUN_BUDGET_S seconds (default 470; 3000 with 5x longer step
# boxes on the dry run): a step gets at most what is left, and is skipped (and recorded so)
# when too little is.
set -uo pipefail

if [ $# -lt 1 ] || [ "${1:0:1}" = "-" ]; then
  echo "usage: bash .dev_scripts/gpu/run_all.sh OUT_DIR [--dry-run]" >&2
  exit 2
fi
OUT_DIR="$1"
DRY=0
case "${2:-}" in
  "") ;;
  --dry-run) DRY=1 ;;
  *) echo "run_all.sh: unknown option '$2' (allowed: --dry-run)" >&2; exit 2 ;;
esac

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
cd "$ROOT"
mkdir -p "$OUT_DIR"
OUT_DIR="$(cd "$OUT_DIR" && pwd)"
WORK="$(mktemp -d)"
LOG="$OUT_DIR/run_all.log"
REPORT="$OUT_DIR/report.json"
rm -f "$REPORT" "$LOG"
exec > >(tee -a "$LOG") 2>&1
TEE_PID=$!

if [ -n "${PYTHON:-}" ]; then
  PY="$PYTHON"
elif [ $DRY -eq 1 ] && [ -x "$ROOT/.venv/bin/python" ]; then
  PY="$ROOT/.venv/bin/python"
else
  PY=python3
fi
export PYTHONUNBUFFERED=1
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
BUDGET="${GPU_RUN_BUDGET_S:-470}"
BOX_SCALE=1
if [ $DRY -eq 1 ]; then
  # The rehearsal checks the code, not the timing: generous boxes for a busy CPU.
  BUDGET="${GPU_RUN_BUDGET_S:-3000}"
  BOX_SCALE=5
fi
START=$SECONDS
DRYFLAG=()
[ $DRY -eq 1 ] && DRYFLAG=(--dry-run)

report() { "$PY" .dev_scripts/gpu/report.py "$@" || echo "run_all.sh: report.py $1 failed"; }
banner() { echo; echo "===== [$(( SECONDS - START )) s] $*"; }
# box MAX: seconds a step may take, at most what is left of the budget (minus a reserve for
# the summary).
box() {
  local want=$(( $1 * BOX_SCALE )) left=$(( BUDGET - (SECONDS - START) - 10 ))
  [ "$want" -lt "$left" ] && echo "$want" || echo "$left"
}
# boxed NAME MAX CMD...: run CMD in its time box; sets RC and DUR; skips when < 10 s are left.
boxed() {
  local name="$1" limit
  limit="$(box "$2")"
  shift 2
  if [ "$limit" -lt 10 ]; then
    echo "run_all.sh: $name skipped, the time budget is spent"
    RC=125 DUR=0
    return
  fi
  local t0=$SECONDS
  timeout -k 5 "$limit" "$@"
  RC=$?
  DUR=$(( SECONDS - t0 ))
  [ $RC -eq 124 ] || [ $RC -eq 137 ] && echo "run_all.sh: $name hit its time box ($limit s)"
  return 0
}
status_of() {  # RC -> word
  case "$1" in 0) echo ok ;; 124|137) echo "time box reached" ;; 125) echo "skipped: budget" ;;
    *) echo "failed (exit $1)" ;; esac
}

banner "transnext-mm GPU run: $( [ $DRY -eq 1 ] && echo 'DRY RUN (CPU)' || echo GPU ) -> $OUT_DIR"
report set "$REPORT" environment.dry_run --json "$([ $DRY -eq 1 ] && echo true || echo false)"
report set "$REPORT" environment.started --json "\"$(date -u +%FT%TZ)\""
report set "$REPORT" environment.budget_s --json "$BUDGET"

# ---------------------------------------------------------------------------- 1. wheels
if [ $DRY -eq 1 ]; then
  report step "$REPORT" install "skipped: dry run" 0
elif ls .whl/*.whl >/dev/null 2>&1; then
  banner "installing $(ls .whl/*.whl | wc -l) carried wheels into /tmp/site"
  boxed install 60 "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir \
    --upgrade --target /tmp/site .whl/*.whl
  export PYTHONPATH="/tmp/site:$PYTHONPATH"
  report step "$REPORT" install "$(status_of $RC): $(cd .whl && ls *.whl | tr '\n' ' ')" "$DUR"
else
  echo "run_all.sh: no .whl/*.whl: run .dev_scripts/gpu/fetch_wheels.sh here first and carry .whl"
  report step "$REPORT" install "FAILED: no wheels in .whl/ (.dev_scripts/gpu/fetch_wheels.sh)" 0
fi
"$PY" -c "import mmengine, mmcv; print('mmengine', mmengine.__version__, 'mmcv', mmcv.__version__)" \
  || echo "run_all.sh: WARNING: mmengine / mmcv not importable: transnext_mm will not import"

# ----------------------------------------------------------------------------- 2. build
# The op (transnext_mm._ext) and the tests' CPU replay of its CUDA kernels (_ext_replay).
LIBS="transnext_mm/_ext.*.so transnext_mm/_ext_replay.*.so"
if [ $DRY -eq 1 ] && ls $LIBS >/dev/null 2>&1; then
  report step "$REPORT" build "skipped: dry run and $(echo $(ls $LIBS)) exist" 0
else
  if [ $DRY -eq 1 ]; then
    banner "building transnext_mm._ext (CPU kernels) and _ext_replay (MAX_JOBS=2)"
    boxed build 900 env TRANSNEXT_MM_WITH_REPLAY=1 MAX_JOBS=2 \
      "$PY" setup.py build_ext --inplace >"$WORK/build.log" 2>&1
  elif "$PY" -c 'import sys; from transnext_mm.ops.dispatch import BUILD; sys.exit(0 if BUILD.cuda else 1)' 2>/dev/null; then
    banner "using the carried transnext_mm._ext (built ahead with nvcc for sm_90)"
    RC=0 DUR=0
    if ! ls transnext_mm/_ext_replay.*.so >/dev/null 2>&1; then
      banner "building transnext_mm._ext_replay (MAX_JOBS=16)"
      boxed build 300 env TRANSNEXT_MM_WITH_OPS=0 TRANSNEXT_MM_WITH_REPLAY=1 MAX_JOBS=16 \
        "$PY" setup.py build_ext --inplace >"$WORK/build.log" 2>&1
    fi
  else
    banner "building transnext_mm._ext for sm_90 and _ext_replay (MAX_JOBS=16)"
    rm -f $LIBS
    boxed build 300 env TORCH_CUDA_ARCH_LIST=9.0 FORCE_CUDA=1 TRANSNEXT_MM_WITH_REPLAY=1 \
      MAX_JOBS=16 "$PY" setup.py build_ext --inplace >"$WORK/build.log" 2>&1
  fi
  tail -n 5 "$WORK/build.log"
  BUILD="$(status_of $RC)"
  WITH_CUDA="$("$PY" -c 'from transnext_mm.ops.dispatch import BUILD; print(BUILD.cuda)' 2>/dev/null | tail -n 1)"
  if [ $DRY -eq 0 ] && [ "$WITH_CUDA" != "True" ]; then
    echo "#################################################################################"
    echo "### BUILD FAILED: transnext_mm._ext has NO CUDA KERNELS (with_cuda=$WITH_CUDA)."
    echo "### The op's CUDA checks will fail or be skipped; see environment.steps.build."
    echo "#################################################################################"
    grep -iE "error|warning: transnext" "$WORK/build.log" | head -n 20
    BUILD="FAILED: no CUDA kernels (with_cuda=$WITH_CUDA; build $BUILD)"
  fi
  report step "$REPORT" build "$BUILD" "$DUR" --log "$WORK/build.log"
fi

# ----------------------------------------------------------------------- 3. environment
banner "environment"
boxed environment 60 "$PY" .dev_scripts/gpu/report.py environment "$REPORT"

# ----------------------------------------------------------------------------- 4. tests
banner "pytest tests/test_ops"
PYTEST_ARGS=(-q -p no:cacheprovider -o addopts= --junitxml="$WORK/junit.xml")
if [ $DRY -eq 1 ]; then
  # The CUDA tests' CPU side: the CUDA kernels' code replayed on the CPU (the rest of
  # tests/test_ops runs in the suite anyway).
  PYTEST_ARGS+=(tests/test_ops/test_aggregated_attention/test_replay.py -k "replayed_on_cpu and float32")
else
  # The whole op suite; the CUDA tests run since a GPU is visible. Left out: the compile-only
  # check (step 2 built the same sources) and flex_attention, whose compiled CUDA check
  # (minutes of compiling) step 8 runs at the real shapes.
  PYTEST_ARGS+=(tests/test_ops -k "not test_cuda_sources_compile and not flex")
  "$PY" -c "import xdist" 2>/dev/null && PYTEST_ARGS+=(-n 8)
fi
boxed pytest 120 "$PY" -m pytest "${PYTEST_ARGS[@]}"
report pytest "$REPORT" "$WORK/junit.xml" "$DUR" "$RC"

# ---------------------------------------------------------------------------- 5. parity
banner "parity (.dev_scripts/gpu/parity.py)"
# On the GPU the compiled flex_attention check runs in step 8 (its compiling takes a while).
PARTS=(op backbone)
[ $DRY -eq 1 ] && PARTS+=(flex)
boxed parity 120 "$PY" .dev_scripts/gpu/parity.py --parts "${PARTS[@]}" --out "$WORK/parity.json" \
  "${DRYFLAG[@]}"
report set "$REPORT" parity --file "$WORK/parity.json"
report set "$REPORT" parity.status --json "\"$(status_of $RC)\""

# ------------------------------------------------------------------------- 8. sanitizer
banner "compute-sanitizer over small CUDA shapes"
if [ $DRY -eq 1 ]; then
  boxed sanitize_shapes 60 "$PY" .dev_scripts/gpu/sanitize_shapes.py --dry-run --quick \
    --out "$WORK/shapes.txt"
  report set "$REPORT" tests.sanitizer.skipped --json '"dry run: no sanitizer on the CPU"'
  report step "$REPORT" sanitize_shapes_cpu "$(status_of $RC)" "$DUR" --log "$WORK/shapes.txt"
elif ! command -v compute-sanitizer >/dev/null 2>&1; then
  report set "$REPORT" tests.sanitizer.skipped --json '"compute-sanitizer not found"'
else
  for tool in memcheck racecheck synccheck; do
    extra=()
    [ "$tool" = racecheck ] && extra=(--quick)
    # No caching allocator: every tensor is its own cudaMalloc, so memcheck sees overruns.
    # Only the op's kernels (namespace transnext_mm) are checked; if this sanitizer refuses
    # the filter option, the whole program is checked instead.
    for filter in "--kernel-name kns=transnext_mm" ""; do
      # shellcheck disable=SC2086
      boxed "sanitizer_$tool" 45 env PYTORCH_NO_CUDA_MEMORY_CACHING=1 compute-sanitizer \
        --tool "$tool" $filter --error-exitcode 9 \
        "$PY" .dev_scripts/gpu/sanitize_shapes.py --out "$WORK/shapes_$tool.txt" "${extra[@]}" \
        >"$WORK/sanitizer_$tool.log" 2>&1
      grep -q "ERROR SUMMARY" "$WORK/sanitizer_$tool.log" && break
      [ $RC -eq 124 ] || [ $RC -eq 137 ] || [ $RC -eq 125 ] && break
      echo "run_all.sh: compute-sanitizer $tool gave no summary with '$filter' (rc $RC)"
    done
    tail -n 4 "$WORK/sanitizer_$tool.log"
    report sanitizer "$REPORT" "$tool" "$WORK/sanitizer_$tool.log" "$DUR" "$RC"
  done
fi

# ------------------------------------------------------------------- 6. benchmarks core
banner "benchmark matrix (.dev_scripts/gpu/bench_matrix.py --parts core)"
boxed bench_core 150 "$PY" .dev_scripts/gpu/bench_matrix.py --parts core --out "$WORK/bench_core.json" \
  "${DRYFLAG[@]}"
report set "$REPORT" benchmarks.core --file "$WORK/bench_core.json"
report set "$REPORT" benchmarks.core.status --json "\"$(status_of $RC)\""

# ---------------------------------------------------------------- 7. flex_attention
banner "flex_attention layers (.dev_scripts/gpu/bench_matrix.py --parts flex)"
boxed bench_flex 75 "$PY" .dev_scripts/gpu/bench_matrix.py --parts flex --out "$WORK/bench_flex.json" \
  "${DRYFLAG[@]}"
report set "$REPORT" benchmarks.flex --file "$WORK/bench_flex.json"
report set "$REPORT" benchmarks.flex.status --json "\"$(status_of $RC)\""

# ------------------------------------------------- 9. flex_attention parity, torch.compile
if [ $DRY -eq 0 ]; then
  banner "flex_attention parity (.dev_scripts/gpu/parity.py --parts flex)"
  boxed parity_flex 60 "$PY" .dev_scripts/gpu/parity.py --parts flex --out "$WORK/parity_flex.json"
  report set "$REPORT" parity.flex_compiled --file "$WORK/parity_flex.json"
fi

if [ $DRY -eq 1 ]; then
  report set "$REPORT" benchmarks.compile --json \
    '{"skipped": "torch.compile of the backbone is a CUDA check (minutes of compiling on a CPU)"}'
else
  banner "torch.compile'd backbone (.dev_scripts/gpu/bench_matrix.py --parts compile)"
  boxed bench_compile 90 "$PY" .dev_scripts/gpu/bench_matrix.py --parts compile \
    --out "$WORK/bench_compile.json"
  report set "$REPORT" benchmarks.compile --file "$WORK/bench_compile.json"
  report set "$REPORT" benchmarks.compile.status --json "\"$(status_of $RC)\""
fi

# --------------------------------------------------------------------------- summary
report set "$REPORT" environment.seconds_total --json "$(( SECONDS - START ))"
banner "summary (full figures: $REPORT)"
"$PY" .dev_scripts/gpu/report.py summary "$REPORT"
rm -rf "$WORK"
exec >&- 2>&-
wait "$TEE_PID" 2>/dev/null
exit 0
