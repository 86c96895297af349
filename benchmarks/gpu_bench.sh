#!/usr/bin/env bash
# Issue 17, item 5: one short GPU run (a few minutes on a recent GPU) of the bench's single-slide,
# cohort, bfloat16 and streaming rows and a training step, beside the published formulation.
# Needs torch with CUDA and the project's dependencies installed; run from anywhere:
#     bash benchmarks/gpu_bench.sh            # add --compile to time torch.compile as well
# Writes gpu_bench.txt into $OUT when set (the device runner's output folder), else here.
set -euo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}"
out="${OUT:-.}/gpu_bench.txt"
{
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
  python -c "import torch; print('cuda', torch.cuda.is_available(), torch.__version__)"
  timeout 540 python scripts/gpu_bench.py --device cuda "$@"
} 2>&1 | tee "$out"
