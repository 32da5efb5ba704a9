#!/usr/bin/env bash
# The whole nanostoney pipeline, end to end, on the bundled data:
#   tokenizer -> base pretraining -> LoRA SFT -> reward model -> GRPO -> eval -> comparison report
# On a machine with GPUs every training stage runs under torchrun on all of them; without one it
# runs a CPU-sized configuration (16 minutes on 2 idle cores).
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

if [ "$SIZE" = cpu ]; then
    # CPU-sized: 16 minutes end to end on 2 idle cores (stage times in BENCHMARKS.md).
    BASE_ARGS="--num-iterations 500 --eval-every 100"
    SFT_ARGS="--num-iterations 300 --final-eval-examples 32 --eval-every 0"
    RM_ARGS="--num-iterations 100"
    GRPO_ARGS="--num-iterations 30 --final-eval-examples 16 --rewards accuracy=1,format=0.2,reward_model=0.2"
    EVAL_ARGS="--max-examples 50 --num-samples 2"
    REPORT_ARGS="--max-examples 16"
else
    BASE_ARGS="--sequence-len 1024 --total-batch-size 524288 --device-batch-size 32 --num-iterations 2000"
    SFT_ARGS="--num-iterations 1000"
    RM_ARGS="--num-iterations 300"
    GRPO_ARGS="--num-iterations 200 --rewards accuracy=1,format=0.2,reward_model=0.2"
    EVAL_ARGS="--max-examples 500 --num-samples 8"
    REPORT_ARGS="--max-examples 100"
fi
COMMON="--wandb $WANDB"

stage tokenizer $PY -m scripts.tok_train --out "$OUT/tokenizer"
stage base $LAUNCH -m scripts.base_train --tokenizer "$OUT/tokenizer" --depth "$DEPTH" \
    --out "$OUT/base" --run-name base $COMMON $BASE_ARGS
stage sft $LAUNCH -m scripts.sft_train --init "$OUT/base" --out "$OUT/sft" --run-name sft $COMMON $SFT_ARGS
stage rm $LAUNCH -m scripts.rm_train --init "$OUT/sft" --out "$OUT/rm" --run-name rm $COMMON $RM_ARGS
stage grpo $LAUNCH -m scripts.grpo_train --init "$OUT/sft" --reward-model "$OUT/rm" --out "$OUT/grpo" \
    --run-name grpo $COMMON $GRPO_ARGS
stage eval $PY -m scripts.eval --checkpoints base="$OUT/base" sft="$OUT/sft" grpo="$OUT/grpo" \
    --out "$OUT/eval/results.json" --run-name eval $COMMON $EVAL_ARGS
stage report $PY -m scripts.compare_reasoning --checkpoints base="$OUT/base" sft="$OUT/sft" grpo="$OUT/grpo" \
    --out "$OUT/report" --run-name report $COMMON $REPORT_ARGS

echo
echo "nanostoney: done. Stage times (s) in $OUT/stage_times.tsv, logs in $OUT/logs/"
echo "  report:      $OUT/report/index.html"
echo "  eval table:  $OUT/eval/results.json"
echo "  checkpoints: $OUT/base $OUT/sft $OUT/rm $OUT/grpo"
