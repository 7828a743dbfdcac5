#!/usr/bin/env bash
# The prepared check for a lent CUDA GPU (about 3-5 minutes on an H100):
#   bash benchmarks/gpu_check.sh [LOG]
# It trains, samples, checkpoints and resumes the cars64 model on synthetic 64x64 images, then
# prints cars64 training img/s, MFU and peak memory. The log is kept under benchmarks/.
set -euo pipefail
cd "$(dirname "$0")/.."
log=${1:-benchmarks/gpu_check_$(date +%Y-%m-%d).log}
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader || true
PYTHONUNBUFFERED=1 timeout 480 python3 benchmarks/gpu_check.py 2>&1 | tee "$log"
