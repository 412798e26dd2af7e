#!/usr/bin/env bash
# The GPU checks, in order of importance, each with its own time limit, logs and JSON in ${OUT:-gpu-checks}/:
# tests/test_gpu.py, inference (large and small batches), training steps (with a row that measures what the conv biases
# cost), profiles of a step, memory (about 8 min on one H200), then compiled training steps (compiling 4 models takes
# minutes: last, so that a short lease loses only it).
#   bash scripts/gpu_checks.sh                     # on a machine with a CUDA GPU and the project's packages
#   SKIP='profile_timm speed_memory' bash scripts/gpu_checks.sh   # leave steps out
# Wheels in .whl/ (made with `pip download` for the GPU machine's Python) are installed to /tmp/site first.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-gpu-checks}; mkdir -p "$OUT"
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
  export PYTHONPATH=/tmp/site:$PWD
else export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}; fi
export PYTHONUNBUFFERED=1
failed=""
step() {  # LIMIT NAME COMMAND...: run, log to $OUT/NAME.log, show the end; a failed or timed-out step is named at the end
  local limit=$1 name=$2 rc; shift 2
  [[ " ${SKIP:-} " == *" $name "* ]] && return 0
  echo "== $name ($(date +%T))"
  timeout "$limit" "$@" > "$OUT/$name.log" 2>&1; rc=$?
  echo "   exit $rc ($(date +%T))"; tail -n 25 "$OUT/$name.log"
  [ "$rc" -eq 0 ] || failed="$failed $name"
}
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__, torch.cuda.get_device_name())"
step 120 tests python3 -m pytest -q -p no:cacheprovider tests/test_gpu.py
step 120 speed_infer python3 benchmarks/speed.py --device cuda --rounds 3 --only infer latency
step 120 speed_train python3 benchmarks/speed.py --device cuda --rounds 3 --only train
step 45 profile_plus python3 benchmarks/profile_step.py res2netplus50 --device cuda --rows 30
step 45 profile_timm python3 benchmarks/profile_step.py 'res2net50d (timm)' --device cuda --rows 30
step 200 speed_memory python3 benchmarks/speed.py --device cuda --only memory
step 420 speed_train_compiled python3 benchmarks/speed.py --device cuda --rounds 2 --only train_compiled
cp benchmarks/results/speed-cuda.json "$OUT/" 2>/dev/null
echo "== done ($(date +%T))${failed:+; failed:$failed}"
[ -z "$failed" ]
