#!/usr/bin/env bash
# The whole nanostoney pipeline, end to end, on the bundled data:
#   tokenizer -> base pretraining -> LoRA SFT -> reward model -> GRPO -> eval -> comparison report
# On a machine with GPUs every training stage runs under torchrun on all of them; without one it
# runs a CPU-sized configuration (about half an hour on 2 cores).
#
#   bash run_stoney_small.sh                 # everything; finished stages are skipped on rerun
#   bash run_stoney_small.sh --force         # rerun every stage
#   bash run_stoney_small.sh --depth 12      # bigger model (or DEPTH=12 bash run_stoney_small.sh)
#
# W&B: online when WANDB_API_KEY is set, offline run files otherwise; WANDB_MODE=disabled turns it off.
set -euo pipefail
cd "$(dirname "$0")"

FORCE=${FORCE:-0}
while [ $# -gt 0 ]; do
    case "$1" in
        --force) FORCE=1 ;;
        --depth) DEPTH="$2"; shift ;;
        --out) OUT="$2"; shift ;;
        *) echo "error: unknown option $1 (use --force, --depth N, --out DIR)" >&2; exit 2 ;;
    esac
    shift
done

source scripts/setup_env.sh

OUT=${OUT:-out}
mkdir -p "$OUT/logs"
WANDB=${WANDB_MODE:-auto}

NGPU=$(uv run --frozen python -c "import torch; print(torch.cuda.device_count())")
if [ "$NGPU" -gt 0 ]; then
    DEPTH=${DEPTH:-12}
    LAUNCH="uv run --frozen torchrun --standalone --nproc_per_node=$NGPU"
    SIZE="gpu"
else
    DEPTH=${DEPTH:-4}
    LAUNCH="uv run --frozen python"
    SIZE="cpu"
fi
PY="uv run --frozen python"
echo "nanostoney: $NGPU GPU(s), depth $DEPTH, outputs in $OUT/"

# stage NAME COMMAND...: run once, log to $OUT/logs/NAME.log, record its time; skip when done.
stage() {
    local name=$1; shift
    if [ -f "$OUT/.done_$name" ] && [ "$FORCE" != 1 ]; then
        echo "== $name: already done (skipped; --force reruns it)"
        return
    fi
    echo "== $name"
    local start=$SECONDS
    "$@" 2>&1 | tee "$OUT/logs/$name.log"
    local took=$((SECONDS - start))
    printf '%s\t%s\n' "$name" "$took" >> "$OUT/stage_times.tsv"
    echo "== $name done in ${took}s"
    touch "$OUT/.done_$name"
}

stage tokenizer $PY scripts/tok_train.py --out "$OUT/tokenizer"
