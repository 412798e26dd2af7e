#!/usr/bin/env bash
# The whole test suite: the notebooks' tests (nbdev-test) and tests/ (pytest). Sets up first.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export PYTHONWARNINGS=ignore::FutureWarning
echo "== notebooks (nbdev-test)"
nbdev-test --n-workers 2
echo "== tests/ (pytest)"
python3 scripts/pytest_files.py  # each test file in its own process (memory), one total line
