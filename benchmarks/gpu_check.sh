#!/usr/bin/env bash
# The prepared check for a lent CUDA GPU, in under 8 minutes:
#   bash benchmarks/gpu_check.sh [LOG]
# 1. gpu_check.py: trains (bf16 + torch.compile), samples, checkpoints and resumes the cars64
#    model on synthetic 64x64 images, runs every sampler and the evaluation on it;
# 2. train_throughput.py for cars64: img/s, MFU against the matmul peak measured in the same
#    run, peak memory, the input pipeline's rate, and the original's 6.1M images in hours.
# The log is kept under benchmarks/.
set -uo pipefail
cd "$(dirname "$0")/.."
log=${1:-benchmarks/gpu_check_$(date +%Y-%m-%d).log}
{
  nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
  PYTHONUNBUFFERED=1 timeout 280 python3 benchmarks/gpu_check.py
  PYTHONUNBUFFERED=1 timeout 200 python3 benchmarks/train_throughput.py --models cars64 \
    --variants fp32,bf16,bf16+compile --json "${log%.log}.json"
} 2>&1 | tee "$log"
