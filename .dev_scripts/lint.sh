#!/usr/bin/env bash
# Lint and format check of the tracked sources, with the settings of setup.cfg ([flake8],
# [isort], [yapf]) and .clang-format: flake8, isort, yapf over the Python files and clang-format
# over ops/csrc. Fails on any finding. `--fix` rewrites the files instead (isort and yapf twice,
# since each can move what the other formats), then runs the check.
# The tools come from .venv (requirements/lint.txt); LINT_BIN=DIR takes them from DIR instead.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
BIN="${LINT_BIN:-$ROOT/.venv/bin}"
for tool in flake8 isort yapf clang-format; do
  [ -x "$BIN/$tool" ] || { echo "lint.sh: $BIN/$tool not found (pip install -r requirements/lint.txt)" >&2; exit 2; }
done
case "${1:-}" in
  '') fix=0 ;;
  --fix) fix=1 ;;
  *) echo "lint.sh: unknown argument '$1' (allowed: --fix, or nothing)" >&2; exit 2 ;;
esac
mapfile -t py < <(git ls-files '*.py')
mapfile -t cc < <(git ls-files 'ops/csrc/*.h' 'ops/csrc/*.cpp' 'ops/csrc/*.cu' 'ops/csrc/*.cuh')
if [ "$fix" = 1 ]; then
  for _ in 1 2; do
    "$BIN/isort" -q "${py[@]}"
    "$BIN/yapf" -i "${py[@]}"
  done
  "$BIN/clang-format" -i "${cc[@]}"
fi
status=0
"$BIN/flake8" "${py[@]}" || status=1
"$BIN/isort" --check-only --diff -q "${py[@]}" || status=1
"$BIN/yapf" --diff "${py[@]}" || status=1
"$BIN/clang-format" --dry-run --Werror "${cc[@]}" || status=1
if [ "$status" = 0 ]; then
  echo "lint: ${#py[@]} Python and ${#cc[@]} C++/CUDA files clean"
else
  echo "lint: findings above (bash .dev_scripts/lint.sh --fix rewrites the formatting)" >&2
fi
exit "$status"
