#!/usr/bin/env bash
# The whole nanostoney pipeline, end to end, on the bundled data:
#   tokenizer -> base pretraining -> LoRA SFT -> reward model -> GRPO -> eval -> comparison report
# On a machine with GPUs every training stage runs under torchrun on all of them; without one it
# runs a CPU-sized configuration (16 minutes on 2 idle cores).
#
#   bash run_stoney_small.sh                 # everything; finished stages are skipped on rerun
#   bash run_stoney_small.sh --force         # rerun every stage
#   bash run_stoney_small.sh --depth 12      # bigger model (or DEPTH=12 bash run_stoney_small.sh)
#   bash run_stoney_small.sh --until sft     # stop after a stage
#   bash run_stoney_small.sh --nproc 4       # every stage under torchrun with 4 processes (GPUs or CPU)
#   bash run_stoney_small.sh --size tiny     # minutes-sized stages, for tests (sizes: tiny, cpu, gpu)
#   BASE_ARGS="--num-iterations 50" bash run_stoney_small.sh    # a stage's flags (BASE SFT RM GRPO EVAL REPORT)
#
# A training stage that was stopped midway (Ctrl-C, a kill, a crash) continues from its last
# checkpoint on the next run (--resume: base, sft, grpo) or trains again (--overwrite: rm);
# $OUT is locked while the script runs, so a second run on it is refused.
# Batch sizes are per device, so the global batch grows with --nproc (see README, "World sizes").
# W&B: online when WANDB_API_KEY is set (the server is checked once here; unreachable = offline
# run files), offline run files otherwise; WANDB_MODE=disabled turns it off.
set -euo pipefail
cd "$(dirname "$0")"

STAGES="tokenizer base sft rm grpo eval report"
usage="use --force, --depth N, --out DIR, --until STAGE, --nproc N, --size tiny|cpu|gpu"
value() {  # value FLAG VALUE: an option that takes a value has one
    if [ -z "$2" ] || [ "${2#--}" != "$2" ]; then
        echo "error: $1 needs a value ($usage)" >&2; exit 2
    fi
}
FORCE=${FORCE:-0}
UNTIL=report
NPROC=${NPROC:-}
SIZE=${SIZE:-}
while [ $# -gt 0 ]; do
    case "$1" in
        --force) FORCE=1 ;;
        --depth) value "$1" "${2:-}"; DEPTH="$2"; shift ;;
        --out) value "$1" "${2:-}"; OUT="$2"; shift ;;
        --until) value "$1" "${2:-}"; UNTIL="$2"; shift ;;
        --nproc) value "$1" "${2:-}"; NPROC="$2"; shift ;;
        --size) value "$1" "${2:-}"; SIZE="$2"; shift ;;
        *) echo "error: unknown option $1 ($usage)" >&2; exit 2 ;;
    esac
    shift
done
if [ -n "${DEPTH:-}" ] && ! [[ "$DEPTH" =~ ^[1-9][0-9]*$ ]]; then
    echo "error: --depth must be a positive integer, got '$DEPTH'" >&2; exit 2
fi
if [[ " $STAGES " != *" $UNTIL "* ]]; then
    echo "error: --until $UNTIL is not a stage; use one of: $STAGES" >&2; exit 2
fi
if [ -n "$NPROC" ] && ! [[ "$NPROC" =~ ^[1-9][0-9]*$ ]]; then
    echo "error: --nproc $NPROC is not a positive whole number of processes (e.g. --nproc 8)." >&2; exit 2
fi
if [ -n "$SIZE" ] && ! [[ "$SIZE" =~ ^(tiny|cpu|gpu)$ ]]; then
    echo "error: --size $SIZE is not one of tiny, cpu, gpu (the stage sizes to run)." >&2; exit 2
fi

source scripts/setup_env.sh

OUT=${OUT:-out}
PY="uv run --frozen python"
# the whole run holds $OUT/.lock (a second run on the same $OUT is refused); removed on exit
$PY -m nanostoney.cli "$OUT" --pid $$ --command-line "bash $0 $*"
trap 'rm -f "$OUT/.lock"' EXIT
trap 'exit 130' INT
trap 'exit 143' TERM
mkdir -p "$OUT/logs"
WANDB=${WANDB_MODE:-auto}
if [ "$WANDB" != disabled ] && [ "$WANDB" != offline ] && [ -n "${WANDB_API_KEY:-}" ] && \
        ! $PY -c "import sys; from nanostoney.logging import wandb_reachable; sys.exit(not wandb_reachable())"; then
    echo "note: W&B cannot be reached, so every stage records offline run files (wandb sync them later)."
    WANDB=offline
fi

NGPU=$($PY -c "import torch; print(torch.cuda.device_count())")
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
    LAUNCH="$PY"
fi
echo "nanostoney: $NGPU GPU(s), $NPROC process(es), depth $DEPTH, $SIZE sizes, outputs in $OUT/"

# again NAME DIR ARGS: what a training stage needs when DIR holds an earlier attempt: --resume
# when it stopped midway after a checkpoint (base, sft, grpo), else --overwrite (train again).
again() {
    local name=$1 dir=$2 iters latest
    if [ -z "$(ls "$dir" 2>/dev/null)" ]; then
        return
    fi
    iters=$(grep -o -- '--num-iterations [0-9]*' <<< "$3" | tail -1 | cut -d' ' -f2)
    latest=$(sed -n 's/^step_0*\([0-9]\)/\1/p' "$dir/latest" 2>/dev/null || true)
    if [ "$FORCE" != 1 ] && [[ " base sft grpo " == *" $name "* ]] && [ -n "$latest" ] && \
            [ "$latest" -lt "${iters:-0}" ]; then
        echo "--resume"
    else
        echo "--overwrite"
    fi
}

# stage NAME COMMAND...: run once, log to $OUT/logs/NAME.log, record its time; skip when done.
stage() {
    local name=$1; shift
    if [ -f "$OUT/.done_$name" ] && [ "$FORCE" != 1 ]; then
        echo "== $name: already done (skipped; --force reruns it)"
    else
        local how=""
        [[ " $* " == *" --resume "* ]] && how=" (resuming from its last checkpoint)"
        echo "== $name$how"
        local start=$SECONDS
        "$@" 2>&1 | tee -a "$OUT/logs/$name.log"
        local took=$((SECONDS - start))
        printf '%s\t%s\n' "$name" "$took" >> "$OUT/stage_times.tsv"
        echo "== $name done in ${took}s"
        touch "$OUT/.done_$name"
    fi
    if [ "$name" = "$UNTIL" ]; then
        echo "nanostoney: stopped after $name (--until); logs in $OUT/logs/"
        exit 0
    fi
}

# Per-stage sizes; a stage's variable set in the environment wins (e.g. BASE_ARGS="--num-iterations 50").
# Batch flags are per device: the defaults scale with the number of processes.
case "$SIZE" in
    cpu)  # 16 minutes end to end on 2 idle cores, one process (stage times in BENCHMARKS.md)
        DEFAULT_TOK=""
        DEFAULT_BASE="--num-iterations 500 --eval-every 100"
        DEFAULT_SFT="--num-iterations 300 --final-eval-examples 32 --eval-every 0"
        DEFAULT_RM="--num-iterations 100"
        DEFAULT_GRPO="--num-iterations 30 --final-eval-examples 16 --rewards accuracy=1,format=0.2,reward_model=0.2"
        DEFAULT_EVAL="--max-examples 50 --num-samples 2"
        DEFAULT_REPORT="--max-examples 16" ;;
    gpu)  # 32 x 1024 tokens x 8 GPUs x 2 accum = 524288 tokens per step on 8 GPUs
        DEFAULT_TOK=""
        DEFAULT_BASE="--sequence-len 1024 --device-batch-size 32 --grad-accum-steps 2 --num-iterations 2000"
        DEFAULT_SFT="--num-iterations 1000"
        DEFAULT_RM="--num-iterations 300"
        DEFAULT_GRPO="--num-iterations 200 --rewards accuracy=1,format=0.2,reward_model=0.2"
        DEFAULT_EVAL="--max-examples 500 --num-samples 8"
        DEFAULT_REPORT="--max-examples 100" ;;
    tiny)  # every stage for real, a few steps each: the pipeline test (tests/test_pipeline.py)
        DEPTH=${DEPTH_TINY:-2}
        DEFAULT_TOK="--vocab-size 1024"
        DEFAULT_BASE="--num-iterations 4 --eval-every 0 --eval-tokens 2048 --save-every 0 --sample-tokens 8"
        DEFAULT_SFT="--num-iterations 3 --eval-every 0 --eval-examples 2 --eval-loss-examples 4
                  --final-eval-examples 2 --max-new-tokens 16"
        DEFAULT_RM="--num-iterations 2 --max-train-examples 16 --eval-pairs 8"
        DEFAULT_GRPO="--num-iterations 2 --prompts-per-rank 1 --group-size 2 --max-new-tokens 16 --max-train-examples 32
                   --final-eval-examples 2 --pass-k 2 --probe-prompts 1 --eval-tasks stoney_mc
                   --rewards accuracy=1,format=0.2,reward_model=0.2"
        DEFAULT_EVAL="--max-examples 3 --num-samples 2 --max-new-tokens 16 --n-boot 50 --mauve-boot 2"
        DEFAULT_REPORT="--max-examples 2 --n-boot 50 --induction-seqs 2 --random-sets 1" ;;
esac
TOK_ARGS=${TOK_ARGS-$DEFAULT_TOK}
BASE_ARGS=${BASE_ARGS-$DEFAULT_BASE}
SFT_ARGS=${SFT_ARGS-$DEFAULT_SFT}
RM_ARGS=${RM_ARGS-$DEFAULT_RM}
GRPO_ARGS=${GRPO_ARGS-$DEFAULT_GRPO}
EVAL_ARGS=${EVAL_ARGS-$DEFAULT_EVAL}
REPORT_ARGS=${REPORT_ARGS-$DEFAULT_REPORT}
COMMON="--wandb $WANDB"

stage tokenizer $LAUNCH -m scripts.tok_train --out "$OUT/tokenizer" $TOK_ARGS
stage base $LAUNCH -m scripts.base_train --tokenizer "$OUT/tokenizer" --depth "$DEPTH" \
    --out "$OUT/base" --run-name base $COMMON $BASE_ARGS $(again base "$OUT/base" "$BASE_ARGS")
stage sft $LAUNCH -m scripts.sft_train --init "$OUT/base" --out "$OUT/sft" --run-name sft $COMMON $SFT_ARGS \
    $(again sft "$OUT/sft" "$SFT_ARGS")
stage rm $LAUNCH -m scripts.rm_train --init "$OUT/sft" --out "$OUT/rm" --run-name rm $COMMON $RM_ARGS \
    $(again rm "$OUT/rm" "$RM_ARGS")
stage grpo $LAUNCH -m scripts.grpo_train --init "$OUT/sft" --reward-model "$OUT/rm" --out "$OUT/grpo" \
    --run-name grpo $COMMON $GRPO_ARGS $(again grpo "$OUT/grpo" "$GRPO_ARGS")
stage eval $LAUNCH -m scripts.eval --checkpoints base="$OUT/base" sft="$OUT/sft" grpo="$OUT/grpo" \
    --out "$OUT/eval/results.json" --run-name eval $COMMON $EVAL_ARGS
stage report $LAUNCH -m scripts.compare_reasoning --checkpoints base="$OUT/base" sft="$OUT/sft" grpo="$OUT/grpo" \
    --out "$OUT/report" --run-name report $COMMON $REPORT_ARGS

echo
echo "nanostoney: done. Stage times (s) in $OUT/stage_times.tsv, logs in $OUT/logs/"
echo "  report:      $OUT/report/index.html"
echo "  eval table:  $OUT/eval/results.json"
echo "  checkpoints: $OUT/base $OUT/sft $OUT/rm $OUT/grpo"
