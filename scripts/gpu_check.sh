#!/usr/bin/env bash
# One script for a GPU machine: build qkernels with CUDA, run the GPU tests and the GPU benchmarks, write results to $OUT.
#
# Usage on the lent GPU machine (python3 + torch with CUDA + nvcc there, no network):
#   bash scripts/gpu_check.sh            # results under ${OUT:-./gpu-out}
# bitsandbytes (the oracle) is not installed there: download its wheel here first and carry .whl along:
#   echo /.whl/ >> .git/info/exclude
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#       --platform manylinux_2_24_x86_64 --platform manylinux_2_17_x86_64 -d .whl bitsandbytes==0.50.2
# Then unpack $OUT/bench-results.tar.gz into benchmarks/results/ (files named with the GPU) and commit it.
#
# The device tool allows 10 minutes per call and returns at most 8 files from $OUT, so:
# - every stage runs under `timeout` against one deadline (GPU_CHECK_BUDGET seconds, default 560, from the start),
#   in priority order: build, the GPU-marked tests, the GPU benchmarks, then the rest of the tests;
# - STAGES picks stages (default "build gputests bench resttests"); on a machine still warm from an earlier call the
#   build is incremental, so a second call can be e.g. STAGES="build bench";
# - $OUT receives summary.txt, build.log, tests.log, bench.log, bench-results.tar.gz (the JSON of this run only) and,
#   when tests fail, failures.txt: each failing test's id and report tail, written the moment it fails
#   (tests/conftest.py), so a run cut at the deadline, before pytest's summary, still says which tests failed.
# GPU_CHECK_DRY_RUN=1 prints every timed command instead of running it (no GPU, nvcc or wheel install needed);
# PYTHON picks the interpreter (default python3). tests/test_gpu_check.py runs the script that way.
set -uo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
OUT=${OUT:-$PWD/gpu-out}
mkdir -p "$OUT"
rm -f "$OUT/failures.txt"  # appended to by every pytest run below
START=$SECONDS
BUDGET=${GPU_CHECK_BUDGET:-560}
STAGES=${STAGES-build gputests bench resttests}
PY=${PYTHON:-python3}
DRY=${GPU_CHECK_DRY_RUN:-0}
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} QKERNELS_TEST_FAILURES=$OUT/failures.txt
log() { echo "[gpu_check +$((SECONDS - START))s] $*" | tee -a "$OUT/summary.txt"; }
left() { echo $((BUDGET - (SECONDS - START))); }
want() { [[ " $STAGES " == *" $1 "* ]]; }
# Run "$@" with at most min(left - reserve, cap) seconds; skip it (rc 124) when under 20 s would remain.
run_for() {
  local reserve=$1 cap=$2; shift 2
  local t=$(( $(left) - reserve )); (( t > cap )) && t=$cap
  if (( t < 20 )); then log "skipped (out of time): $*"; return 124; fi
  if [[ $DRY == 1 ]]; then log "dry run, ${t}s: $*"; return 0; fi
  timeout -k 10 "$t" "$@"
}

if [[ $DRY != 1 ]]; then
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>&1 | tee -a "$OUT/summary.txt"
fi
"$PY" -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda)" 2>&1 | tee -a "$OUT/summary.txt"

if [[ $DRY != 1 ]] && ls .whl/*.whl >/dev/null 2>&1; then
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    && export PYTHONPATH=$PYTHONPATH:/tmp/site
fi

rc=0
if want build; then
  log "build (QKERNELS_CUDA=1, in place)"
  # build_ext --inplace puts qkernels/_C*.so beside the sources (PYTHONPATH above): no editable-install machinery.
  QKERNELS_CUDA=1 QKERNELS_CUDA_ARCHS="${QKERNELS_CUDA_ARCHS:-80;90}" \
    run_for 200 400 "$PY" setup.py build_ext --inplace >>"$OUT/build.log" 2>&1 \
    || { r=$?; log "build FAILED (rc=$r; 124: timed out or skipped)"; tail -n 30 "$OUT/build.log" | tee -a "$OUT/summary.txt"
         exit 1; }
fi
"$PY" -c "import qkernels, json; print(json.dumps(qkernels.native_info()))" 2>&1 | tee -a "$OUT/summary.txt"

# pytest-xdist / pytest-timeout are in the image; use them when present (Triton compiles in parallel, a hung test
# cannot eat the whole call).
PYTEST=("$PY" -m pytest -q -rfEs --durations=15 -p no:cacheprovider)
"$PY" -c "import xdist" 2>/dev/null && PYTEST+=(-n "${GPU_CHECK_WORKERS:-8}")
"$PY" -c "import pytest_timeout" 2>/dev/null && PYTEST+=(--timeout=240)

if want gputests; then
  log "tests marked cuda"
  echo "=== pytest -m cuda" >>"$OUT/tests.log"
  run_for 150 420 "${PYTEST[@]}" -m cuda tests >>"$OUT/tests.log" 2>&1; r=$?
  (( r != 0 )) && rc=$r
  (( r == 124 )) && log "GPU tests cut at the deadline or not started (failures.txt: what failed before it)"
  tail -n 3 "$OUT/tests.log" | tee -a "$OUT/summary.txt"
  if [[ -s $OUT/failures.txt ]]; then
    log "$(grep -c '^FAILED ' "$OUT/failures.txt") failed so far; first ones:"
    grep '^FAILED ' "$OUT/failures.txt" | head -n 20 | tee -a "$OUT/summary.txt"
  fi
fi

if want bench; then
  # The GPU benchmarks only (bench_gemv is the CPU GEMV); their JSON goes to a fresh folder, archived into one file.
  log "benchmarks"
  BENCH_DIR=$(mktemp -d)
  for b in bench_gemv_cuda bench_triton bench_quant bench_train bench_block bench_decode; do
    [ -f "benchmarks/$b.py" ] || continue
    echo "=== $b" >>"$OUT/bench.log"
    run_for 40 240 "$PY" -m "benchmarks.$b" --results-dir "$BENCH_DIR" >>"$OUT/bench.log" 2>&1 || log "$b FAILED or timed out"
  done
  grep -E "^[0-9]+x[0-9]+: worst fraction" "$OUT/bench.log" | tee -a "$OUT/summary.txt"  # bench_gemv_cuda targets
  tar czf "$OUT/bench-results.tar.gz" -C "$BENCH_DIR" . 2>/dev/null
fi

if want resttests; then
  log "tests not marked cuda (CI runs these too)"
  echo "=== pytest -m 'not cuda'" >>"$OUT/tests.log"
  run_for 10 600 "${PYTEST[@]}" -m "not cuda" tests >>"$OUT/tests.log" 2>&1; r=$?
  (( r != 0 && r != 124 )) && rc=$r
  tail -n 3 "$OUT/tests.log" | tee -a "$OUT/summary.txt"
fi
log "done, rc=$rc"
exit $rc
