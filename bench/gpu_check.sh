#!/usr/bin/env bash
# The GPU path on one GPU, in under 10 minutes (budget per part in brackets, H100 80 GB):
#   1. MFU and peak memory of the real training step at depth 12 and 20, --pretrain web shapes
#      (16 x 2048 tokens per device, vocab 65,536, heads of 128), beside memory.py's plan   [<= 200 s]
#   2. rollout tokens/s of the KV-cache engine at depth 12 (GRPO's sampling)                 [<= 60 s]
#   3. a small 1-GPU speedrun: every stage of run_stoney_small.sh at --size tiny on CUDA
#      (torch.compile, bf16, NCCL-free single process)                                       [<= 330 s]
# Writes gpu_check.log and the speedrun's logs under OUT (default out/gpu_check).
#
#   bash bench/gpu_check.sh           # on a machine with a GPU
#   bash bench/gpu_check.sh --dry     # on CPU: parts 1 and 2 at tiny shapes (checks the code), no speedrun
set -euo pipefail
cd "$(dirname "$0")/.."
DRY=0
[ "${1:-}" = --dry ] && DRY=1
OUT=${OUT:-out/gpu_check}
mkdir -p "$OUT"
source scripts/setup_env.sh
export PYTORCH_CUDA_ALLOC_CONF=${PYTORCH_CUDA_ALLOC_CONF:-expandable_segments:True}
PY="uv run --frozen python"
if [ "$DRY" = 0 ] && [ "$($PY -c 'import torch; print(torch.cuda.device_count())')" -eq 0 ]; then
    echo "error: no GPU is visible; run bash bench/gpu_check.sh --dry on CPU." >&2
    exit 2
fi
T() { timeout "$1" "${@:2}"; }  # each part has a hard limit so the whole check stays under 10 minutes

echo "== 1. training step: MFU and peak memory vs the plan"
if [ "$DRY" = 1 ]; then
    T 120 $PY -m bench.gpu_check --dry | tee "$OUT/gpu_check.log"
else
    T 200 $PY -m bench.gpu_check --depths 12,20 --device-batch-size 16 | tee "$OUT/gpu_check.log"
fi

echo "== 2. rollout tokens/s (KV cache)"
if [ "$DRY" = 1 ]; then
    T 120 $PY -m bench.model_bench --mode rollout --depths 2 --prompts 2 --samples 2 --prompt-len 16 --new-tokens 8 \
        | tee -a "$OUT/gpu_check.log"
else
    T 60 $PY -m bench.model_bench --mode rollout --depths 12 | tee -a "$OUT/gpu_check.log"
fi

if [ "$DRY" = 0 ]; then
    echo "== 3. small 1-GPU speedrun (--size tiny, every stage)"
    T 330 bash run_stoney_small.sh --size tiny --nproc 1 --force --out "$OUT/speedrun"
    cat "$OUT/speedrun/stage_times.tsv"
fi
echo "gpu_check: results in $OUT/gpu_check.log"
