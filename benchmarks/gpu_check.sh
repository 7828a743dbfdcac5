#!/usr/bin/env bash
# The prepared check for a lent CUDA GPU (about 4-6 minutes on an H100; 2 without compile):
#   bash benchmarks/gpu_check.sh [LOG] [PARTS]    PARTS: e2e,sampling,throughput,compile
# It trains, samples, checkpoints and resumes the cars64 model on synthetic 64x64 images, runs
# every sampler and the evaluation on it, then prints cars64 training img/s, MFU and peak
# memory. The log is kept under benchmarks/.
set -euo pipefail
cd "$(dirname "$0")/.."
log=${1:-benchmarks/gpu_check_$(date +%Y-%m-%d).log}
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader || true
parts=${2:-e2e,sampling,throughput,compile}
PYTHONUNBUFFERED=1 timeout 540 python3 benchmarks/gpu_check.py --parts "$parts" 2>&1 | tee "$log"
