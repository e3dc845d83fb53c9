#!/usr/bin/env bash
# Set up .venv if needed (tools/setup_env.sh), then run the test suite.
# Extra arguments go to pytest, e.g. `bash tools/run_tests.sh tests/test_models -x`.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
bash tools/setup_env.sh
export PYTHONUNBUFFERED=1
exec .venv/bin/python -m pytest -p no:cacheprovider -q -ra --durations=15 "${@:-tests}"
