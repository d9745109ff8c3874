#!/usr/bin/env bash
# The GPU check: proves the CUDA path on a real NVIDIA GPU and writes everything it saw into one folder.
#
#   scripts/gpu_check.sh OUT_DIR                 (or: GPU_CHECK_OUT=OUT_DIR scripts/gpu_check.sh)
#
# 1. environment: nvidia-smi, library versions, onnxruntime's providers, whether CUDA and TensorRT can start;
# 2. a compare run on sample:shapes with --device cuda (its report.json is kept: wall time per arm);
# 3. the cuda-marked tests, on that run (tests/test_cuda.py says what each one proves);
# 4. timings of torch eager vs onnxruntime CUDA FP32 vs FP16 (vs TensorRT when it starts) at batch 1 and 64;
# 5. summary.md: the tables for docs/gpu.md.
# OUT_DIR gets at most 8 files: summary.md, env.txt, check.log, junit.xml, report.json, bench.json (+ bench-trt.json).
#
# Environment: by default a venv (.venv-gpu) is made from requirements-dev.txt (needs the package registry).
# GPU_CHECK_PYTHON=python3 uses an existing Python with the requirements instead (offline machines); put extra
# packages in front of it with PYTHONPATH. Each step has its own time limit, so a hang costs one step, not the
# check; after the install the whole check takes about 3-5 minutes on an H100-class GPU.
set -u
cd "$(dirname "$0")/.."
OUT=$(realpath -m "${1:-${GPU_CHECK_OUT:-gpu-check}}")
WORK=$(mktemp -d "${TMPDIR:-/tmp}/gpu-check.XXXXXX")  # run folder and lab cache: kept out of OUT_DIR
mkdir -p "$OUT"
LOG="$OUT/check.log"
: >"$LOG"
export PYTHONUNBUFFERED=1 TRANSFER_LAB_CACHE="$WORK/cache" PYTHONPATH="${PYTHONPATH:+$PYTHONPATH:}$PWD"

step() {  # step NAME SECONDS COMMAND...: run with a time limit, log its output, record its status and duration
  local name=$1 limit=$2 start rc
  shift 2
  start=$(date +%s)
  echo "===== $name (limit ${limit}s): $*" >>"$LOG"
  timeout --kill-after=15 "$limit" "$@" >>"$LOG" 2>&1
  rc=$?
  echo "$name: exit $rc after $(($(date +%s) - start)) s$([ $rc -eq 124 ] && echo ' (time limit)')" | tee -a "$LOG" >>"$WORK/steps"
  return $rc
}

if [ -n "${GPU_CHECK_PYTHON:-}" ]; then
  PY=$GPU_CHECK_PYTHON
else
  step install 900 bash -c "python3 -m venv .venv-gpu && .venv-gpu/bin/pip install -q -r requirements-dev.txt"
  PY=.venv-gpu/bin/python
fi

step environment 90 bash -c "{ date -u; uname -srm; nvidia-smi; $PY scripts/gpu_report.py --environment; } 2>&1 \
  | tee '$OUT/env.txt'"
step compare 300 "$PY" -m core compare --data sample:shapes --device cuda --out "$WORK/run" \
  && cp "$WORK/run/report.json" "$OUT/report.json"
TRANSFER_LAB_CUDA_RUN="$WORK/run" step tests 300 "$PY" -m pytest -m cuda -p no:cacheprovider -rA \
  --junitxml="$OUT/junit.xml" $(grep -l "pytest.mark.cuda" tests/test_*.py)
step bench 180 "$PY" -m export bench --model "$WORK/run/model.onnx" --device cuda --batch 1 64 --repeats 40 \
  --json "$OUT/bench.json"
if "$PY" -c "from core.runtime.providers import tensorrt_problem as p; raise SystemExit(p() is not None)" 2>>"$LOG"; then
  step bench-tensorrt 300 "$PY" -m export bench --model "$WORK/run/model.onnx" --device cuda --batch 1 64 \
    --repeats 40 --tensorrt --json "$OUT/bench-trt.json"
fi
step summary 60 "$PY" scripts/gpu_report.py "$OUT" --steps "$WORK/steps"
cat "$OUT/summary.md" 2>/dev/null
rm -rf "$WORK"
