#!/usr/bin/env bash
# The whole nanostoney pipeline, end to end, on the bundled data:
#   tokenizer -> base pretraining -> LoRA SFT -> reward model -> GRPO -> eval -> comparison report
# On a machine with GPUs every stage runs under torchrun on all of them; without one it runs a
# CPU-sized configuration (16 minutes on 2 idle cores) in one process, or under torchrun with
# --nproc N CPU processes (gloo).
#
#   bash run_stoney_small.sh                 # everything; finished stages are skipped on rerun
#   bash run_stoney_small.sh --force         # rerun every stage
#   bash run_stoney_small.sh --depth 12      # bigger model (or DEPTH=12 bash run_stoney_small.sh)
#   bash run_stoney_small.sh --nproc 4       # every stage under torchrun with 4 processes (GPUs or CPU)
#   bash run_stoney_small.sh --size tiny     # minutes-sized stages, for tests (sizes: tiny, cpu, gpu)
#
# Batch sizes are per device, so the global batch grows with --nproc (see README, "World sizes").
# W&B: online when WANDB_API_KEY is set, offline run files otherwise; WANDB_MODE=disabled turns it off.
set -euo pipefail
cd "$(dirname "$0")"

FORCE=${FORCE:-0}
NPROC=${NPROC:-}
SIZE=${SIZE:-}
while [ $# -gt 0 ]; do
    case "$1" in
        --force) FORCE=1 ;;
        --depth) DEPTH="$2"; shift ;;
        --out) OUT="$2"; shift ;;
        --nproc) NPROC="$2"; shift ;;
        --size) SIZE="$2"; shift ;;
        *) echo "error: unknown option $1 (use --force, --depth N, --out DIR, --nproc N, --size tiny|cpu|gpu)" >&2
           exit 2 ;;
    esac
    shift
done
if [ -n "$NPROC" ] && ! [[ "$NPROC" =~ ^[1-9][0-9]*$ ]]; then
    echo "error: --nproc $NPROC is not a positive whole number of processes (e.g. --nproc 8)." >&2
    exit 2
fi
if [ -n "$SIZE" ] && ! [[ "$SIZE" =~ ^(tiny|cpu|gpu)$ ]]; then
    echo "error: --size $SIZE is not one of tiny, cpu, gpu (the stage sizes to run)." >&2
    exit 2
fi

source scripts/setup_env.sh

OUT=${OUT:-out}
mkdir -p "$OUT/logs"
WANDB=${WANDB_MODE:-auto}

NGPU=$(uv run --frozen python -c "import torch; print(torch.cuda.device_count())")
if [ "$NGPU" -gt 0 ]; then
    SIZE=${SIZE:-gpu}
    NPROC=${NPROC:-$NGPU}
    DEPTH=${DEPTH:-12}
else
    SIZE=${SIZE:-cpu}
    NPROC=${NPROC:-1}
    DEPTH=${DEPTH:-4}
fi
if [ "$NGPU" -gt 0 ] || [ "$NPROC" -gt 1 ]; then
    # torchrun picks one GPU per process (NCCL), or CPU processes talking over gloo
    LAUNCH="uv run --frozen torchrun --standalone --nproc_per_node=$NPROC"
else
    LAUNCH="uv run --frozen python"
fi
echo "nanostoney: $NGPU GPU(s), $NPROC process(es), depth $DEPTH, $SIZE sizes, outputs in $OUT/"

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

# Per-stage sizes. Batch flags are per device: the defaults scale with the number of processes.
case "$SIZE" in
    cpu)  # 16 minutes end to end on 2 idle cores, one process (stage times in BENCHMARKS.md)
        TOK_ARGS=""
        BASE_ARGS="--num-iterations 500 --eval-every 100"
        SFT_ARGS="--num-iterations 300 --final-eval-examples 32 --eval-every 0"
        RM_ARGS="--num-iterations 100"
        GRPO_ARGS="--num-iterations 30 --final-eval-examples 16 --rewards accuracy=1,format=0.2,reward_model=0.2"
        EVAL_ARGS="--max-examples 50 --num-samples 2"
        REPORT_ARGS="--max-examples 16" ;;
    gpu)  # 32 x 1024 tokens x 8 GPUs x 2 accum = 524288 tokens per step on 8 GPUs
        TOK_ARGS=""
        BASE_ARGS="--sequence-len 1024 --device-batch-size 32 --grad-accum-steps 2 --num-iterations 2000"
        SFT_ARGS="--num-iterations 1000"
        RM_ARGS="--num-iterations 300"
        GRPO_ARGS="--num-iterations 200 --rewards accuracy=1,format=0.2,reward_model=0.2"
        EVAL_ARGS="--max-examples 500 --num-samples 8"
        REPORT_ARGS="--max-examples 100" ;;
    tiny)  # every stage for real, a few steps each: the pipeline test (tests/test_pipeline.py)
        DEPTH=${DEPTH_TINY:-2}
        TOK_ARGS="--vocab-size 1024"
        BASE_ARGS="--num-iterations 4 --eval-every 0 --eval-tokens 2048 --save-every 0 --sample-tokens 8"
        SFT_ARGS="--num-iterations 3 --eval-every 0 --eval-examples 2 --eval-loss-examples 4
                  --final-eval-examples 2 --max-new-tokens 16"
        RM_ARGS="--num-iterations 2 --max-train-examples 16 --eval-pairs 8"
        GRPO_ARGS="--num-iterations 2 --prompts-per-rank 1 --group-size 2 --max-new-tokens 16 --max-train-examples 32
                   --final-eval-examples 2 --pass-k 2 --probe-prompts 1 --eval-tasks stoney_mc
                   --rewards accuracy=1,format=0.2,reward_model=0.2"
        EVAL_ARGS="--max-examples 3 --num-samples 2 --max-new-tokens 16 --n-boot 50 --mauve-boot 2"
        REPORT_ARGS="--max-examples 2 --n-boot 50 --induction-seqs 2 --random-sets 1" ;;
esac
COMMON="--wandb $WANDB"

stage tokenizer $LAUNCH -m scripts.tok_train --out "$OUT/tokenizer" $TOK_ARGS
stage base $LAUNCH -m scripts.base_train --tokenizer "$OUT/tokenizer" --depth "$DEPTH" \
    --out "$OUT/base" --run-name base $COMMON $BASE_ARGS
stage sft $LAUNCH -m scripts.sft_train --init "$OUT/base" --out "$OUT/sft" --run-name sft $COMMON $SFT_ARGS
stage rm $LAUNCH -m scripts.rm_train --init "$OUT/sft" --out "$OUT/rm" --run-name rm $COMMON $RM_ARGS
stage grpo $LAUNCH -m scripts.grpo_train --init "$OUT/sft" --reward-model "$OUT/rm" --out "$OUT/grpo" \
    --run-name grpo $COMMON $GRPO_ARGS
stage eval $LAUNCH -m scripts.eval --checkpoints base="$OUT/base" sft="$OUT/sft" grpo="$OUT/grpo" \
    --out "$OUT/eval/results.json" --run-name eval $COMMON $EVAL_ARGS
stage report $LAUNCH -m scripts.compare_reasoning --checkpoints base="$OUT/base" sft="$OUT/sft" grpo="$OUT/grpo" \
    --out "$OUT/report" --run-name report $COMMON $REPORT_ARGS

echo
echo "nanostoney: done. Stage times (s) in $OUT/stage_times.tsv, logs in $OUT/logs/"
echo "  report:      $OUT/report/index.html"
echo "  eval table:  $OUT/eval/results.json"
echo "  checkpoints: $OUT/base $OUT/sft $OUT/rm $OUT/grpo"
