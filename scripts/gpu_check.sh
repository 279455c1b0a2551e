#!/usr/bin/env bash
# One script for a GPU machine: build qkernels with CUDA, run the GPU tests and the benchmarks, write results to $OUT.
#
# Usage on the lent GPU machine (python3 + torch with CUDA + nvcc there, no network):
#   bash scripts/gpu_check.sh            # results under ${OUT:-./gpu-out}
# bitsandbytes (the oracle) is not installed there: download its wheel here first and carry .whl along:
#   echo /.whl/ >> .git/info/exclude
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#       --platform manylinux_2_24_x86_64 --platform manylinux_2_17_x86_64 -d .whl bitsandbytes==0.50.2
# Then commit what lands in $OUT under benchmarks/results/ with the GPU named.
set -uo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
OUT=${OUT:-$PWD/gpu-out}
mkdir -p "$OUT"
log() { echo "[gpu_check] $*" | tee -a "$OUT/summary.txt"; }

nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$OUT/gpu.txt"
python3 -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda)" | tee -a "$OUT/gpu.txt"

if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    && export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi

log "build (QKERNELS_CUDA=1)"
QKERNELS_CUDA=1 QKERNELS_CUDA_ARCHS="${QKERNELS_CUDA_ARCHS:-80;90}" \
  python3 -m pip install --no-build-isolation --no-deps -e . >"$OUT/build.log" 2>&1 || { log "build FAILED"; exit 1; }
python3 -c "import qkernels, json; print(json.dumps(qkernels.native_info()))" | tee -a "$OUT/summary.txt"

log "tests (all, CUDA-marked ones included)"
python3 -m pytest -q tests -rs >"$OUT/tests.log" 2>&1; rc=$?
tail -n 5 "$OUT/tests.log" | tee -a "$OUT/summary.txt"

# benchmarks.run runs every benchmarks/bench_*.py, the GPU ones included (bench_gemv_cuda: fused GEMV + LoRA vs cuBLAS,
# bitsandbytes and the device copy bandwidth); their JSON lands in benchmarks/results/*-cuda-<gpu>.json, copied below.
if [ -f benchmarks/run.py ]; then
  log "benchmarks"
  python3 -m benchmarks.run >"$OUT/bench.log" 2>&1 || log "benchmarks FAILED"
  grep -E "^[0-9]+x[0-9]+: worst fraction" "$OUT/bench.log" | tee -a "$OUT/summary.txt"  # bench_gemv_cuda targets
  cp -r benchmarks/results "$OUT/" 2>/dev/null || true
fi
exit $rc
