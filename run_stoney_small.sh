#!/usr/bin/env bash
# The whole nanostoney pipeline, end to end:
#   tokenizer -> base pretraining -> LoRA SFT -> reward model -> GRPO -> eval -> comparison report
# On a machine with GPUs every training stage runs under torchrun on all of them; without one it
# runs a CPU-sized configuration (16 minutes on 2 idle cores). The plan (every stage's command)
# is printed before anything runs.
#
#   bash run_stoney_small.sh                 # bundled corpus; finished stages are skipped on rerun
#   bash run_stoney_small.sh --force         # rerun every stage
#   bash run_stoney_small.sh --depth 12      # bigger model (or DEPTH=12 bash run_stoney_small.sh)
#   bash run_stoney_small.sh --pretrain web  # GPUs: FineWeb-Edu -> 65k tokenizer -> base at 20 tokens
#                                            #   per parameter -> mid (chat format, full) -> SFT -> ...
#   bash run_stoney_small.sh --from-nanochat hf:OWNER/NAME   # or a local nanochat / transformers dir:
#                                            #   SFT -> reward model -> GRPO -> eval -> report on it
#   bash run_stoney_small.sh --plan ...      # print the plan and stop
#
# W&B: online when WANDB_API_KEY is set, offline run files otherwise; WANDB_MODE=disabled turns it off.
set -euo pipefail
cd "$(dirname "$0")"

FORCE=${FORCE:-0}
PLAN_ONLY=0
PRETRAIN=${PRETRAIN:-bundled}
FROM_NANOCHAT=${FROM_NANOCHAT:-}
while [ $# -gt 0 ]; do
    case "$1" in
        --force) FORCE=1 ;;
        --plan) PLAN_ONLY=1 ;;
        --depth) DEPTH="$2"; shift ;;
        --out) OUT="$2"; shift ;;
        --pretrain) PRETRAIN="$2"; shift ;;
        --from-nanochat) FROM_NANOCHAT="$2"; shift ;;
        *) echo "error: unknown option $1 (use --force, --plan, --depth N, --out DIR, --pretrain bundled|web," \
                "--from-nanochat ID_OR_DIR)" >&2; exit 2 ;;
    esac
    shift
done
case "$PRETRAIN" in
    bundled|web) ;;
    *) echo "error: --pretrain $PRETRAIN is not a corpus; use --pretrain bundled or --pretrain web." >&2; exit 2 ;;
esac
if [ -n "$FROM_NANOCHAT" ] && [ "$PRETRAIN" = web ]; then
    echo "error: --from-nanochat skips pretraining, so --pretrain web does not apply; pass one of them." >&2
    exit 2
fi
MODE=$PRETRAIN
[ -n "$FROM_NANOCHAT" ] && MODE="nanochat:$FROM_NANOCHAT"

source scripts/setup_env.sh

OUT=${OUT:-out}
mkdir -p "$OUT/logs"
WANDB=${WANDB_MODE:-auto}
# finished stages of another mode (another tokenizer, another base) must not be reused
if [ "$FORCE" != 1 ] && ls "$OUT"/.done_* >/dev/null 2>&1 && [ "$(cat "$OUT/.mode" 2>/dev/null || echo bundled)" != "$MODE" ]; then
    echo "error: $OUT holds stages of another run ($(cat "$OUT/.mode" 2>/dev/null || echo bundled)); pass --out DIR" \
         "for this one ($MODE) or --force to redo them." >&2
    exit 2
fi
[ "$PLAN_ONLY" = 1 ] || echo "$MODE" > "$OUT/.mode"

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
if [ "$PRETRAIN" = web ] && [ "$SIZE" = cpu ]; then
    echo "error: --pretrain web reads billions of tokens and needs GPUs; on CPU use the bundled corpus." >&2
    exit 2
fi
if [ "$PRETRAIN" = web ]; then
    WEB=$($PY -c "import os; from nanostoney.loader import cache_dir; print(os.path.join(cache_dir(), 'fineweb-edu-100b-shuffle'))")
    # base_train's budget: 20 tokens per parameter of the depth-$DEPTH model with a 65,536-token vocabulary
    WEB_TOKENS=$($PY -c "import torch; from nanostoney.gpt import GPT, config_for_depth
with torch.device('meta'): print(20 * GPT(config_for_depth($DEPTH, 65536, 2048)).num_params())")
fi

# stage NAME COMMAND...: run once, log to $OUT/logs/NAME.log, record its time; skip when done.
# With PLAN=1 it only prints the stage and its command.
stage() {
    local name=$1; shift
    if [ "$PLAN" = 1 ]; then
        local state=""
        [ -f "$OUT/.done_$name" ] && [ "$FORCE" != 1 ] && state=" (done: skipped)"
        echo "  $name$state: $*"
        return
    fi
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
elif [ "$PRETRAIN" = web ]; then
    # nanochat's recipe: 2048-token rows, 0.5M-token steps, steps from 20 tokens per parameter
    BASE_ARGS="--data $WEB --sequence-len 2048 --total-batch-size 524288 --device-batch-size 32"
    SFT_ARGS="--num-iterations 1000"
    RM_ARGS="--num-iterations 300"
    GRPO_ARGS="--num-iterations 200 --rewards accuracy=1,format=0.2,reward_model=0.2"
    EVAL_ARGS="--max-examples 500 --num-samples 8"
    REPORT_ARGS="--max-examples 100"
else
    # The bundled corpus is about 1.4M tokens: 200 steps of 65,536 tokens read it about 9 times
    # (base_train's plan says how often). A model worth probing: --pretrain web or --from-nanochat.
    BASE_ARGS="--sequence-len 1024 --total-batch-size 65536 --device-batch-size 8 --num-iterations 200"
    SFT_ARGS="--num-iterations 1000"
    RM_ARGS="--num-iterations 300"
    GRPO_ARGS="--num-iterations 200 --rewards accuracy=1,format=0.2,reward_model=0.2"
    EVAL_ARGS="--max-examples 500 --num-samples 8"
    REPORT_ARGS="--max-examples 100"
fi
COMMON="--wandb $WANDB"
# midtraining (nanochat's mid stage): every weight, on the chat format of the Stoney conversations
# and the math tasks, so the chat tokens are learned before the LoRA stages
MID_ARGS="--full --lr 1e-3 --tasks stoney_qa=1,stoney_lexicon=1,stoney_mc=1,gsm8k=1,gsm8k_mc=1,aqua_mc=1
    --max-train-examples 0 --total-batch-size 64 --device-batch-size 8 --num-iterations 300 --eval-every 0"

pipeline() {
    if [ -n "$FROM_NANOCHAT" ]; then
        BASE="$FROM_NANOCHAT"
    else
        BASE="$OUT/base"
        if [ "$PRETRAIN" = web ]; then
            stage corpus_head $PY -m scripts.download_corpus --num-shards 8
            stage tokenizer $PY -m scripts.tok_train --vocab-size 65536 --data "$WEB" --max-chars 2000000000 \
                --out "$OUT/tokenizer"
            stage corpus $PY -m scripts.download_corpus --tokens "$WEB_TOKENS"
        else
            stage tokenizer $PY -m scripts.tok_train --out "$OUT/tokenizer"
        fi
        stage base $LAUNCH -m scripts.base_train --tokenizer "$OUT/tokenizer" --depth "$DEPTH" \
            --out "$OUT/base" --run-name base $COMMON $BASE_ARGS
    fi
    local init="$BASE"
    if [ "$PRETRAIN" = web ]; then
        stage mid $LAUNCH -m scripts.sft_train --init "$OUT/base" --out "$OUT/mid" --run-name mid $COMMON $MID_ARGS
        init="$OUT/mid"
    fi
    stage sft $LAUNCH -m scripts.sft_train --init "$init" --out "$OUT/sft" --run-name sft $COMMON $SFT_ARGS
    stage rm $LAUNCH -m scripts.rm_train --init "$OUT/sft" --out "$OUT/rm" --run-name rm $COMMON $RM_ARGS
    stage grpo $LAUNCH -m scripts.grpo_train --init "$OUT/sft" --reward-model "$OUT/rm" --out "$OUT/grpo" \
        --run-name grpo $COMMON $GRPO_ARGS
    stage eval $PY -m scripts.eval --checkpoints base="$BASE" sft="$OUT/sft" grpo="$OUT/grpo" \
        --out "$OUT/eval/results.json" --run-name eval $COMMON $EVAL_ARGS
    stage report $PY -m scripts.compare_reasoning --checkpoints base="$BASE" sft="$OUT/sft" grpo="$OUT/grpo" \
        --out "$OUT/report" --run-name report $COMMON $REPORT_ARGS
}

echo "nanostoney plan: $NGPU GPU(s), $([ -n "$FROM_NANOCHAT" ] && echo "the published model $FROM_NANOCHAT" \
    || echo "depth $DEPTH on the $PRETRAIN corpus"), outputs in $OUT/"
if [ "$PRETRAIN" = web ]; then
    echo "  base reads ~$(awk "BEGIN {printf \"%.2f\", $WEB_TOKENS / 1e9}")B tokens (20 per parameter of" \
         "$(awk "BEGIN {printf \"%.0f\", $WEB_TOKENS / 20e6}")M), from FineWeb-Edu shards in $WEB"
fi
PLAN=1 pipeline
[ "$PLAN_ONLY" = 1 ] && exit 0
PLAN=0 pipeline

echo
echo "nanostoney: done. Stage times (s) in $OUT/stage_times.tsv, logs in $OUT/logs/"
echo "  report:      $OUT/report/index.html"
echo "  eval table:  $OUT/eval/results.json"
echo "  checkpoints: $BASE $([ "$PRETRAIN" = web ] && echo "$OUT/mid ")$OUT/sft $OUT/rm $OUT/grpo"
