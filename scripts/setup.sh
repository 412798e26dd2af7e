#!/usr/bin/env bash
# Installs what res2netplus and its tests need, and the package itself (editable) from this checkout.
# Idempotent: when everything is there it only checks, in a few seconds.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}

deps_ok() {
  "$PY" - <<'PYEOF' 2>/dev/null || return 1
import torch, torchvision, fastai, timm, albumentations, safetensors, nbdev, pytest, hypothesis
import pycocotools, onnx, onnxruntime, onnxscript, accelerate, huggingface_hub, segmentation_models_pytorch
from packaging.version import Version as V
assert V(torch.__version__.split('+')[0]) >= V('2.4')
assert V(fastai.__version__) >= V('2.8.12') and V(timm.__version__) >= V('1.0')
assert V(albumentations.__version__) >= V('2.0') and V(nbdev.__version__) >= V('3')
PYEOF
  # ruff runs the style check in scripts/test.sh
  "$PY" -m ruff --version >/dev/null 2>&1
}

if ! deps_ok; then
  echo "setup: installing dependencies (torch/torchvision, fastai, timm, albumentations, nbdev 3, pytest, ruff, smp)..."
  # torchvision's wheels need the CUDA build of torch (it runs fine on CPU); a CPU-only torch 2.13 wheel
  # that may sit on the machine cannot import them, so pin the pair explicitly.
  "$PY" -m pip install -q --disable-pip-version-check "torch==2.14.*" "torchvision==0.29.*"
  "$PY" -m pip install -q --disable-pip-version-check -e ".[dev]"
  deps_ok || { echo "setup: dependencies still fail to import; see the pip output above" >&2; exit 1; }
fi

# The package itself, editable, pointing at this checkout (CI clones to a new folder each time).
if ! "$PY" -c "import pathlib, sys, res2netplus; sys.exit(pathlib.Path(res2netplus.__file__).resolve().parent != pathlib.Path('res2netplus').resolve())" 2>/dev/null \
   || ! command -v res2netplus >/dev/null; then
  "$PY" -m pip install -q --disable-pip-version-check --no-deps -e .
fi
echo "setup: ok ($("$PY" -c 'import torch, fastai, timm; print(f"torch {torch.__version__}, fastai {fastai.__version__}, timm {timm.__version__}")'))"
