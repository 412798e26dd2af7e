#!/usr/bin/env bash
# The whole test suite: the style check (ruff), the notebooks' tests (nbdev-test) and tests/ (pytest). Sets up first.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export PYTHONWARNINGS=ignore::FutureWarning
echo "== style (ruff check: lines of at most 120 characters, syntax and undefined names; config in pyproject.toml)"
if ! python3 -m ruff check --output-format concise res2netplus tests nbs; then
  echo "style: fix the lines above ('python3 -m ruff check --fix' fixes what it can; reflow long lines by hand), in the" >&2
  echo "style: notebooks for exported modules (then nbdev-export); rerun 'python3 -m ruff check res2netplus tests nbs'." >&2
  exit 1
fi
echo "== notebooks (nbdev-test)"
nbdev-test --n-workers 2
echo "== tests/ (pytest)"
python3 scripts/pytest_files.py  # each test file in its own process (memory), one total line
