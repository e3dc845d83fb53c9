#!/usr/bin/env bash
# Set up .venv if needed (.dev_scripts/setup_env.sh), then run the test suite.
# Extra arguments go to pytest, e.g. `bash .dev_scripts/run_tests.sh tests/test_models -x`; without
# them pytest runs setup.cfg's testpaths (tests/), with its markers and options ([tool:pytest]).
#
# Test files run on one pytest-xdist worker per core (at most 4; TRANSNEXT_MM_TEST_WORKERS=N to
# choose, 1 for a plain serial run). Each file stays on one worker (--dist loadfile), so its
# module-scoped fixtures (datasets, exported models) are built once; tests/conftest.py gives each
# worker its share of the cores as torch threads. A failing test's report shows captured log
# records from WARNING up (torch.export traces at DEBUG, thousands of lines per export).
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
bash .dev_scripts/setup_env.sh
export PYTHONUNBUFFERED=1
cores="$(nproc)"
WORKERS="${TRANSNEXT_MM_TEST_WORKERS:-$(( cores < 4 ? cores : 4 ))}"
case "$WORKERS" in
  ''|*[!0-9]*|0) echo "run_tests.sh: TRANSNEXT_MM_TEST_WORKERS must be a positive integer, got '$WORKERS'" >&2; exit 2 ;;
esac
XDIST=()
[ "$WORKERS" -gt 1 ] && XDIST=(-n "$WORKERS" --dist loadfile)
exec .venv/bin/python -m pytest -p no:cacheprovider -q -ra --durations=15 --log-level=WARNING "${XDIST[@]}" "$@"
