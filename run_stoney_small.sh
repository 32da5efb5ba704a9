#!/usr/bin/env bash
# The whole nanostoney pipeline, end to end:
#   tokenizer -> base pretraining -> LoRA SFT -> reward model -> GRPO -> eval -> comparison report
# On a machine with GPUs every training stage runs under torchrun on all of them; without one it
# runs a CPU-sized configuration (25 minutes on 2 idle cores). The plan (every stage's command)
# is printed before anything runs.
#
#   bash run_stoney_small.sh                 # bundled corpus; finished stages are skipped on rerun
#   bash run_stoney_small.sh --force         # rerun every stage
#   bash run_stoney_small.sh --depth 12      # bigger model (or DEPTH=12 bash run_stoney_small.sh)
#   bash run_stoney_small.sh --until sft     # stop after a stage
#   bash run_stoney_small.sh --nproc 4       # every stage under torchrun with 4 processes (GPUs or CPU)
#   bash run_stoney_small.sh --size tiny     # minutes-sized stages, for tests (sizes: tiny, cpu, cpu-long, gpu)
#   bash run_stoney_small.sh --size cpu-long # CPU, a copy stage first: the model copies from its context
#   bash run_stoney_small.sh --pretrain web  # GPUs: FineWeb-Edu -> 65k tokenizer -> base at 20 tokens
#                                            #   per parameter -> knowledge -> mid (chat format, full) -> SFT -> ...
#   bash run_stoney_small.sh --from-nanochat hf:OWNER/NAME   # or a local nanochat / transformers dir:
#                                            #   knowledge -> SFT -> reward model -> GRPO -> eval -> report on it
# (knowledge: the published or web base reads the bundled corpus, so held-out Stoney questions ask
# about facts it has read; README, "The experiment: tasks")
#   bash run_stoney_small.sh --nnodes 2 --node-rank 0 --master-addr 10.0.0.1   # on each node (rank 1 on the
#                                            #   other): every torchrun stage spans the nodes; $OUT, checkpoints and
#                                            #   --from-nanochat on a filesystem all nodes share (docs/RUNNING.md)
#   bash run_stoney_small.sh --plan ...      # print the plan and stop
#   BASE_ARGS="--num-iterations 50" bash run_stoney_small.sh    # a stage's flags (COPY BASE KNOWLEDGE MID SFT RM GRPO
#                                                                 #   EVAL REPORT)
#
# A training stage that was stopped midway (Ctrl-C, a kill, a crash) continues from its last
# checkpoint on the next run (--resume: copy, base, sft, grpo) or trains again (--overwrite: rm);
# $OUT is locked while the script runs, so a second run on it is refused.
# Batch sizes are per device, so the global batch grows with --nproc (see docs/RUNNING.md, "World sizes").
# W&B: online when WANDB_API_KEY is set (the server is checked once here; unreachable = offline
# run files), offline run files otherwise; WANDB_MODE=disabled turns it off.
set -euo pipefail
cd "$(dirname "$0")"

usage="use --force, --plan, --depth N, --out DIR, --until STAGE, --nproc N, --size tiny|cpu|cpu-long|gpu, --pretrain bundled|web, --from-nanochat ID_OR_DIR, --nnodes N --node-rank R --master-addr HOST [--master-port P]"
value() {  # value FLAG VALUE: an option that takes a value has one
    if [ -z "$2" ] || [ "${2#--}" != "$2" ]; then
        echo "error: $1 needs a value ($usage)" >&2; exit 2
    fi
}
FORCE=${FORCE:-0}
PLAN_ONLY=0
PRETRAIN=${PRETRAIN:-bundled}
FROM_NANOCHAT=${FROM_NANOCHAT:-}
UNTIL=report
NPROC=${NPROC:-}
SIZE=${SIZE:-}
NNODES=1
NODE_RANK=0
MASTER_ADDR=
MASTER_PORT=29500
while [ $# -gt 0 ]; do
    case "$1" in
        --force) FORCE=1 ;;
        --plan) PLAN_ONLY=1 ;;
        --pretrain) value "$1" "${2:-}"; PRETRAIN="$2"; shift ;;
        --from-nanochat) value "$1" "${2:-}"; FROM_NANOCHAT="$2"; shift ;;
        --depth) value "$1" "${2:-}"; DEPTH="$2"; shift ;;
        --out) value "$1" "${2:-}"; OUT="$2"; shift ;;
        --until) value "$1" "${2:-}"; UNTIL="$2"; shift ;;
        --nproc) value "$1" "${2:-}"; NPROC="$2"; shift ;;
        --size) value "$1" "${2:-}"; SIZE="$2"; shift ;;
        --nnodes) value "$1" "${2:-}"; NNODES="$2"; shift ;;
        --node-rank) value "$1" "${2:-}"; NODE_RANK="$2"; shift ;;
        --master-addr) value "$1" "${2:-}"; MASTER_ADDR="$2"; shift ;;
        --master-port) value "$1" "${2:-}"; MASTER_PORT="$2"; shift ;;
        *) echo "error: unknown option $1 ($usage)" >&2; exit 2 ;;
    esac
    shift
done
if [ -n "${DEPTH:-}" ] && ! [[ "$DEPTH" =~ ^[1-9][0-9]*$ ]]; then
    echo "error: --depth must be a positive integer, got '$DEPTH'" >&2; exit 2
fi
case "$PRETRAIN" in
    bundled|web) ;;
    *) echo "error: --pretrain $PRETRAIN is not a corpus; use --pretrain bundled or --pretrain web." >&2; exit 2 ;;
esac
if [ -n "$FROM_NANOCHAT" ] && [ "$PRETRAIN" = web ]; then
    echo "error: --from-nanochat skips pretraining, so --pretrain web does not apply; pass one of them." >&2; exit 2
fi
MODE=$PRETRAIN
[ -n "$FROM_NANOCHAT" ] && MODE="nanochat:$FROM_NANOCHAT"
STAGES="corpus_head tokenizer corpus copy base knowledge mid sft rm grpo eval report"
if [[ " $STAGES " != *" $UNTIL "* ]]; then
    echo "error: --until $UNTIL is not a stage; use one of: $STAGES" >&2; exit 2
fi
if [ -n "$NPROC" ] && ! [[ "$NPROC" =~ ^[1-9][0-9]*$ ]]; then
    echo "error: --nproc $NPROC is not a positive whole number of processes (e.g. --nproc 8)." >&2; exit 2
fi
if [ -n "$SIZE" ] && ! [[ "$SIZE" =~ ^(tiny|cpu|cpu-long|gpu)$ ]]; then
    echo "error: --size $SIZE is not one of tiny, cpu, cpu-long, gpu (the stage sizes to run)." >&2; exit 2
fi
if ! [[ "$NNODES" =~ ^[1-9][0-9]*$ ]]; then
    echo "error: --nnodes $NNODES is not a positive whole number of nodes (e.g. --nnodes 2)." >&2; exit 2
fi
if [ "$NNODES" = 1 ] && [ "$NODE_RANK$MASTER_ADDR" != 0 ]; then
    echo "error: --node-rank and --master-addr are for several nodes; pass --nnodes N as well." >&2; exit 2
fi
if ! [[ "$NODE_RANK" =~ ^[0-9]+$ ]] || [ "$NODE_RANK" -ge "$NNODES" ]; then
    echo "error: --node-rank $NODE_RANK is not a node of --nnodes $NNODES; number the nodes 0 to $((NNODES - 1))." >&2; exit 2
fi
if [ "$NNODES" -gt 1 ] && ! [[ "$MASTER_ADDR" =~ ^[A-Za-z0-9._:-]+$ ]]; then
    echo "error: --nnodes $NNODES needs --master-addr HOST, the address of node 0 that every node can reach" \
         "(got '$MASTER_ADDR')." >&2; exit 2
fi
if ! [[ "$MASTER_PORT" =~ ^[1-9][0-9]*$ ]] || [ "$MASTER_PORT" -gt 65535 ]; then
    echo "error: --master-port $MASTER_PORT is not a TCP port (1-65535); node 0 listens there." >&2; exit 2
fi

source scripts/setup_env.sh

OUT=${OUT:-out}
PY="uv run --frozen python"
# finished stages of another mode (another tokenizer, another base) must not be reused
if [ "$FORCE" != 1 ] && ls "$OUT"/.done_* >/dev/null 2>&1 && [ "$(cat "$OUT/.mode" 2>/dev/null || echo bundled)" != "$MODE" ]; then
    echo "error: $OUT holds stages of another run ($(cat "$OUT/.mode" 2>/dev/null || echo bundled)); pass --out DIR" \
         "for this one ($MODE) or --force to redo them." >&2
    exit 2
fi
if [ "$PLAN_ONLY" != 1 ] && [ "$NODE_RANK" = 0 ]; then  # a plan changes nothing; other nodes share node 0's $OUT
    # the whole run holds $OUT/.lock (a second run on the same $OUT is refused); removed on exit
    $PY -m nanostoney.cli "$OUT" --pid $$ --command-line "bash $0 $*"
    trap 'rm -f "$OUT/.lock"' EXIT
fi
if [ "$PLAN_ONLY" != 1 ] && [ "$NODE_RANK" != 0 ]; then
    # node 0 claims the shared $OUT (its marker); writing here first would make it a folder not ours
    for _ in $(seq 600); do [ -e "$OUT/.nanostoney" ] && break; sleep 1; done
    if ! [ -e "$OUT/.nanostoney" ]; then
        echo "error: node 0 has not claimed $OUT in 10 minutes; start node 0 with the same --out (a folder both nodes share)." >&2
        exit 2
    fi
fi
if [ "$PLAN_ONLY" != 1 ]; then
    trap 'exit 130' INT
    trap 'exit 143' TERM
    mkdir -p "$OUT/logs"
fi
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
else
    SIZE=${SIZE:-$([ "$PRETRAIN" = web ] && echo gpu || echo cpu)}  # (web on CPU: the plan of the GPU run)
    NPROC=${NPROC:-1}
fi
DEPTH=${DEPTH:-$([[ "$SIZE" == cpu* ]] && echo 4 || echo 12)}
if [ "$NNODES" -gt 1 ]; then  # every node runs this script; torchrun meets at node 0's address
    LAUNCH="uv run --frozen torchrun --nnodes=$NNODES --node_rank=$NODE_RANK --master_addr=$MASTER_ADDR"
    LAUNCH="$LAUNCH --master_port=$MASTER_PORT --nproc_per_node=$NPROC"
elif [ "$NGPU" -gt 0 ] || [ "$NPROC" -gt 1 ]; then
    # torchrun picks one GPU per process (NCCL), or CPU processes talking over gloo
    LAUNCH="uv run --frozen torchrun --standalone --nproc_per_node=$NPROC"
else
    LAUNCH="$PY"
fi
if [ "$PRETRAIN" = web ] && [ "$NGPU" -eq 0 ] && [ "$PLAN_ONLY" != 1 ]; then
    echo "error: --pretrain web reads billions of tokens and needs GPUs; on CPU use the bundled corpus" \
         "(--plan shows what it would run)." >&2
    exit 2
fi
[ "$PLAN_ONLY" = 1 ] || echo "$MODE" > "$OUT/.mode"
if [ "$PRETRAIN" = web ]; then
    WEB=$($PY -c "import os; from nanostoney.sources import cache_dir; print(os.path.join(cache_dir(), 'fineweb-edu-100b-shuffle'))")
    # base_train's budget: 20 tokens per parameter of the depth-$DEPTH model with a 65,536-token vocabulary
    WEB_TOKENS=$($PY -c "import torch; from nanostoney.gpt import GPT, config_for_depth
with torch.device('meta'): print(20 * GPT(config_for_depth($DEPTH, 65536, 2048)).num_params())")
fi

# again NAME DIR ARGS: what a training stage needs when DIR holds an earlier attempt: --resume
# when it stopped midway after a checkpoint (copy, base, knowledge, mid, sft, grpo), else --overwrite (train again).
again() {
    local name=$1 dir=$2 iters latest
    if [ -z "$(ls "$dir" 2>/dev/null)" ]; then
        return
    fi
    iters=$(grep -o -- '--num-iterations [0-9]*' <<< "$3" | tail -1 | cut -d' ' -f2)
    latest=$(sed -n 's/^step_0*\([0-9]\)/\1/p' "$dir/latest" 2>/dev/null || true)
    # (no --num-iterations: the steps come from the token budget, and base_train checks the step)
    if [ "$FORCE" != 1 ] && [[ " copy base knowledge mid sft grpo " == *" $name "* ]] && [ -n "$latest" ] && \
            { [ -z "$iters" ] || [ "$latest" -lt "$iters" ]; }; then
        echo "--resume"
    else
        echo "--overwrite"
    fi
}

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
    cpu|cpu-long)  # cpu: 25 minutes end to end on 2 idle cores, one process (stage times in BENCHMARKS.md).
        # 2000 base steps store the held-out Stoney facts; a CPU-sized model picks held-out answers
        # well above chance by cloze (eval's "cloze": each option's answer scored, no options shown)
        # but cannot read a letter off the options, so its greedy letter accuracy stays at chance
        # (BENCHMARKS.md, "Eval"). The report reads the open tasks on the model's own reasoning
        # (compare_reasoning's default): 100 items per split, 200 held-out items per family.
        DEFAULT_TOK=""
        # the curriculum (nanostoney/curriculum.py, base_train's defaults, named here for the plan):
        # copy drills first, then the corpus with fresh train-split arith and drill rows
        DEFAULT_BASE="--num-iterations 2000 --eval-every 250 --copy-steps 400 --arith-rows 2 --drill-rows 1"
        DEFAULT_KNOWLEDGE="--num-iterations 500 --eval-every 250"
        DEFAULT_SFT="--num-iterations 300 --max-train-examples 0 --final-eval-examples 100 --eval-every 0"
        DEFAULT_RM="--num-iterations 100"
        DEFAULT_GRPO="--num-iterations 30 --final-eval-examples 16 --rewards accuracy=1,format=0.2,reward_model=0.2"
        DEFAULT_EVAL="--max-examples 100 --num-samples 2 --tasks stoney_mc,stoney_mc_unseen,arith_mc,arith"
        DEFAULT_REPORT="--max-examples 100"
        if [ "$SIZE" = cpu-long ]; then
            # copying first (scripts/copy_train.py): 4,000 steps of repeated random spans, lm_head tied to a
            # frozen embedding; the base goes on from it untied, with the curriculum's rows (no drill-only steps),
            # the embedding still frozen: with it trained, a seed can lose its copying and the MC letter with it
            # (BENCHMARKS.md, "The option format": arith_mc 0.57-0.73 in 3 frozen seeds, 0.21 trained)
            DEFAULT_COPY="--num-iterations 4000 --eval-every 250"
            DEFAULT_BASE="--num-iterations 2000 --eval-every 250 --arith-rows 2 --drill-rows 1 --embedding-lr 0"
            # and the open Stoney task by generation, both directions, against its unseen control
            DEFAULT_EVAL="$DEFAULT_EVAL,stoney_lexicon,stoney_lexicon_unseen"
        fi ;;
    gpu)  # 8 x 1024 tokens x 8 GPUs = 65,536 tokens per step on 8 GPUs (web: 524,288)
        DEFAULT_TOK=""
        # The bundled corpus is about 1M tokens: 200 steps of 65,536 tokens read it about 13 times
        # (base_train's plan says how often). A model worth probing: --pretrain web or --from-nanochat.
        DEFAULT_BASE="--sequence-len 1024 --total-batch-size 65536 --device-batch-size 8 --num-iterations 200"
        DEFAULT_KNOWLEDGE="$DEFAULT_BASE"  # the bundled corpus read about 13 times, as the bundled base does
        # --pretrain web, nanochat's shapes: 2048-token rows, 0.5M-token steps, steps from 20 tokens per
        # parameter, heads of 128 channels, up to ~10M validation tokens (20 x 524,288; the held-out last
        # row group of the shards may hold fewer: base_train's plan prints the rows). Not nanochat's optimizer:
        # AdamW for every weight (nanochat: Muon for the block matrices; ours is neither sharded across
        # ranks nor compiled), at a matrix LR of 1e-3 rather than the CPU-tuned 3e-3: between GPT-3's
        # 6e-4 (125M) and modded-nanogpt's tuned AdamW baseline 1.8e-3 (124M), unmeasured here. 16 rows per
        # device, not nanochat's 32: the memory plan puts 32 x 2048 at depth 20 over 80 GB (a second
        # accumulation step on 8 GPUs keeps the global batch).
        [ "$PRETRAIN" = web ] && DEFAULT_BASE="--data $WEB --sequence-len 2048 --total-batch-size 524288
            --device-batch-size 16 --head-dim 128 --eval-tokens 10485760 --eval-every 250 --matrix-lr 1e-3"
        # every train item (sft_train's default of 16 per task is the CPU size): 200 steps of 64
        # conversations read the 4,975 stoney_mc + arith_mc items about 2.6 times
        DEFAULT_SFT="--max-train-examples 0 --total-batch-size 64 --num-iterations 200"
        # every train item: 150 steps of 128 pairs read the 9,950 pairs about 1.9 times
        DEFAULT_RM="--max-train-examples 0 --total-batch-size 128 --num-iterations 150"
        # every train item (grpo_train's default): 200 steps of 64 prompts read the 4,975 about 2.6 times
        DEFAULT_GRPO="--num-iterations 200 --prompts-per-step 64 --rewards accuracy=1,format=0.2,reward_model=0.2"
        DEFAULT_EVAL="--max-examples 500 --num-samples 8"
        DEFAULT_REPORT="--max-examples 100" ;;
    tiny)  # every stage for real, a few steps each: the pipeline test (tests/test_pipeline.py)
        DEPTH=${DEPTH_TINY:-2}
        DEFAULT_TOK="--vocab-size 1024"
        DEFAULT_BASE="--num-iterations 4 --eval-every 0 --eval-tokens 2048 --save-every 0 --sample-tokens 8 --augment 0
                   --copy-steps 2 --arith-rows 2 --drill-rows 1"
        DEFAULT_KNOWLEDGE="$DEFAULT_BASE"
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
COPY_ARGS=${COPY_ARGS-${DEFAULT_COPY:-}}
BASE_ARGS=${BASE_ARGS-$DEFAULT_BASE}
KNOWLEDGE_ARGS=${KNOWLEDGE_ARGS-$DEFAULT_KNOWLEDGE}
SFT_ARGS=${SFT_ARGS-$DEFAULT_SFT}
RM_ARGS=${RM_ARGS-$DEFAULT_RM}
GRPO_ARGS=${GRPO_ARGS-$DEFAULT_GRPO}
EVAL_ARGS=${EVAL_ARGS-$DEFAULT_EVAL}
REPORT_ARGS=${REPORT_ARGS-$DEFAULT_REPORT}
COMMON="--wandb $WANDB"
# SEED=N: the training seed of every training stage (bench/report_seeds.py trains one run per seed)
TRAIN="$COMMON --seed ${SEED:-0}"
# midtraining (nanochat's mid stage): every weight, on the chat format of the Stoney conversations
# and the math tasks, so the chat tokens are learned before the LoRA stages
MID_ARGS=${MID_ARGS-"--full --lr 1e-3 --tasks stoney_qa=1,stoney_lexicon=1,stoney_mc=1,arith=1,arith_mc=1,gsm8k=1,gsm8k_mc=1,aqua_mc=1
    --max-train-examples 0 --total-batch-size 64 --device-batch-size 8 --num-iterations 300 --eval-every 0"}

pipeline() {
    local init
    if [ -n "$FROM_NANOCHAT" ]; then
        BASE="$FROM_NANOCHAT"
    else
        BASE="$OUT/base"
        if [ "$PRETRAIN" = web ]; then
            stage corpus_head $PY -m scripts.download_corpus --num-shards 8
            stage tokenizer $LAUNCH -m scripts.tok_train --vocab-size 65536 --data "$WEB" --max-chars 2000000000 \
                --out "$OUT/tokenizer" $(again tokenizer "$OUT/tokenizer" "")
            stage corpus $PY -m scripts.download_corpus --tokens "$WEB_TOKENS"
        else
            stage tokenizer $LAUNCH -m scripts.tok_train --out "$OUT/tokenizer" $TOK_ARGS \
                $(again tokenizer "$OUT/tokenizer" "")
        fi
        local start_from=(--tokenizer "$OUT/tokenizer" --depth "$DEPTH")
        if [ -n "$COPY_ARGS" ]; then
            stage copy $LAUNCH -m scripts.copy_train --tokenizer "$OUT/tokenizer" --depth "$DEPTH" --out "$OUT/copy" \
                --run-name copy $TRAIN $COPY_ARGS $(again copy "$OUT/copy" "$COPY_ARGS")
            start_from=(--init "$OUT/copy")
        fi
        stage base $LAUNCH -m scripts.base_train "${start_from[@]}" \
            --out "$OUT/base" --run-name base $TRAIN $BASE_ARGS $(again base "$OUT/base" "$BASE_ARGS")
    fi
    init="$BASE"
    if [ -n "$FROM_NANOCHAT" ] || [ "$PRETRAIN" = web ]; then
        # continued pretraining on the bundled corpus: the Stoney facts held-out questions ask about,
        # which neither the web nor a published model has read
        stage knowledge $LAUNCH -m scripts.base_train --init "$BASE" --out "$OUT/knowledge" --run-name knowledge \
            $TRAIN $KNOWLEDGE_ARGS $(again knowledge "$OUT/knowledge" "$KNOWLEDGE_ARGS")
        init="$OUT/knowledge"
    fi
    if [ "$PRETRAIN" = web ]; then
        stage mid $LAUNCH -m scripts.sft_train --init "$init" --out "$OUT/mid" --run-name mid $TRAIN $MID_ARGS \
            $(again mid "$OUT/mid" "$MID_ARGS")
        init="$OUT/mid"
    fi
    stage sft $LAUNCH -m scripts.sft_train --init "$init" --out "$OUT/sft" --run-name sft $TRAIN $SFT_ARGS \
        $(again sft "$OUT/sft" "$SFT_ARGS")
    stage rm $LAUNCH -m scripts.rm_train --init "$OUT/sft" --out "$OUT/rm" --run-name rm $TRAIN $RM_ARGS \
        $(again rm "$OUT/rm" "$RM_ARGS")
    stage grpo $LAUNCH -m scripts.grpo_train --init "$OUT/sft" --reward-model "$OUT/rm" --out "$OUT/grpo" \
        --run-name grpo $TRAIN $GRPO_ARGS $(again grpo "$OUT/grpo" "$GRPO_ARGS")
    stage eval $LAUNCH -m scripts.eval --checkpoints base="$BASE" sft="$OUT/sft" grpo="$OUT/grpo" \
        --out "$OUT/eval/results.json" --run-name eval $COMMON $EVAL_ARGS
    stage report $LAUNCH -m scripts.compare_reasoning --checkpoints base="$BASE" sft="$OUT/sft" grpo="$OUT/grpo" \
        --out "$OUT/report" --run-name report $COMMON $REPORT_ARGS
}

echo "nanostoney plan: $NGPU GPU(s), $NPROC process(es), $SIZE sizes, $([ -n "$FROM_NANOCHAT" ] && \
    echo "the published model $FROM_NANOCHAT" || echo "depth $DEPTH on the $PRETRAIN corpus"), outputs in $OUT/"
if [ "$PRETRAIN" = web ]; then
    echo "web corpus: base reads ~$(awk "BEGIN {printf \"%.2f\", $WEB_TOKENS / 1e9}")B tokens (20 per parameter of" \
         "$(awk "BEGIN {printf \"%.0f\", $WEB_TOKENS / 20e6}")M), from FineWeb-Edu shards in $WEB"
fi
PLAN=1 pipeline
if [ "$PLAN_ONLY" = 1 ]; then
    # per training stage: items and epochs, tokens, steps, and the memory per GPU at depth 12 and 20
    echo "stage plans (depth $DEPTH; memory on a GPU at depth 12 and 20):"
    plans=()
    [ -z "$FROM_NANOCHAT" ] && plans+=(base "$BASE_ARGS")
    [ -n "$FROM_NANOCHAT" ] || [ "$PRETRAIN" = web ] && plans+=(knowledge "$KNOWLEDGE_ARGS")
    [ "$PRETRAIN" = web ] && plans+=(mid "$MID_ARGS")
    $PY -m scripts.speedrun_plan --depth "$DEPTH" --world-size "$NPROC" \
        --vocab-size "$([ "$PRETRAIN" = web ] || [ -n "$FROM_NANOCHAT" ] && echo 65536 || echo 4096)" ${WEB_TOKENS:+--web-tokens "$WEB_TOKENS"} \
        "${plans[@]}" sft "$SFT_ARGS" rm "$RM_ARGS" grpo "$GRPO_ARGS"
    exit 0
fi
PLAN=0 pipeline

echo
echo "nanostoney: done. Stage times (s) in $OUT/stage_times.tsv, logs in $OUT/logs/"
echo "  report:      $OUT/report/index.html"
echo "  eval table:  $OUT/eval/results.json"
[ -z "$FROM_NANOCHAT" ] && [ "$PRETRAIN" = bundled ] || BASE="$BASE $OUT/knowledge"
echo "  checkpoints: $BASE $([ "$PRETRAIN" = web ] && echo "$OUT/mid ")$OUT/sft $OUT/rm $OUT/grpo"
