#!/usr/bin/env bash
# The documentation site, into _site/: executes every notebook in nbs/ (as nbdev-test does), renders them with the
# hand-written pages of docs/ and an API reference generated from the docstrings, with MkDocs in strict mode
# (a failing cell, a broken link or any warning fails it). Sets up first; installs the `docs` extra if missing.
# Open _site/index.html in a browser. DOCS_WORKERS sets how many notebooks run at once (default: 2).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
bash scripts/setup.sh
if ! "$PY" -c "import mkdocs, material, mkdocstrings_handlers.python, latex2mathml" 2>/dev/null; then
  echo "docs: installing the docs extra (MkDocs, Material, mkdocstrings)..."
  "$PY" -m pip install -q --disable-pip-version-check -e ".[docs]"
fi
# NO_MKDOCS_2_WARNING: Material prints a banner on every build (it ends its life in May 2027; Zensical, its
# successor, reads this mkdocs.yml). Known; see the note in mkdocs.yml.
export PYTHONWARNINGS=ignore::FutureWarning PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" NO_MKDOCS_2_WARNING=1
start=$SECONDS
"$PY" docs/render_nbs.py
"$PY" -m mkdocs build --strict --clean
echo "docs: built _site/ in $((SECONDS - start)) s"
