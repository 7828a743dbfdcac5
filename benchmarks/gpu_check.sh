#!/usr/bin/env bash
# The prepared check for a lent CUDA GPU: about 8 minutes expected on a fresh machine, at most
# 10 (its three parts are capped at 230, 260 and 120 s, so that one slow compile cannot cost the
# rest; the closing profile has not yet run on a GPU):
#   bash benchmarks/gpu_check.sh [LOG]
# 1. gpu_check.py: checks that attention runs on SDPA's fused kernels; trains (bf16 +
#    torch.compile), samples, checkpoints and resumes the cars64 model on synthetic 64x64
#    images, runs every sampler and the evaluation on it;
# 2. train_throughput.py for cars64: img/s, MFU against the matmul peak measured in the same
#    run, peak memory, the input pipeline's rate, and the original's 6.1M images in hours;
# 3. where the fastest variant's time goes (--profile: kernel time by kind, the top kernels,
#    the ops behind copies): what stands between its MFU and the peak.
# On a fresh machine each torch.compile of cars64 takes one to two minutes (the e2e run's, and
# batch 256's in step 2); the profile reuses step 2's compiled code from inductor's cache.
# The log (and its JSON) is kept under benchmarks/results/.
set -uo pipefail
cd "$(dirname "$0")/.."
log=${1:-benchmarks/results/gpu_check_$(date +%Y-%m-%d).log}
{
  nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
  PYTHONUNBUFFERED=1 timeout 230 python3 benchmarks/gpu_check.py
  # each step over fp32 in turn, then a larger batch (bf16+compile at 64 reuses the compile
  # cache of the end-to-end run above)
  PYTHONUNBUFFERED=1 timeout 260 python3 benchmarks/train_throughput.py --models cars64 \
    --variants fp32,bf16,fp16,bf16+cl,bf16+compile,bf16+compile@256 --json "${log%.log}.json"
  PYTHONUNBUFFERED=1 timeout 120 python3 benchmarks/train_throughput.py --models cars64 \
    --variants bf16+compile@256 --profile
} 2>&1 | tee "$log"
