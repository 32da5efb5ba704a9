"""What each training stage of run_stoney_small.sh will do, from its flags alone (its --plan).

    python -m scripts.speedrun_plan --depth 12 --vocab-size 65536 --world-size 8 \
        base "$BASE_ARGS" sft "$SFT_ARGS" rm "$RM_ARGS" grpo "$GRPO_ARGS"

Per stage: its steps, tokens, the epochs they read of its train items (or corpus), and the
estimated peak memory per device on a GPU at depth 12 and 20 (nanostoney/memory.py). Each stage's
flags go through its own parser, so the plan uses its defaults. Conversation token counts are
estimated at CHARS_PER_TOKEN characters a token (marked ~).
"""
import argparse
import math
import shlex

import torch

from nanostoney import corpus, lora, memory
from nanostoney.gpt import GPT, config_for_depth
from nanostoney.tasks import get_task
from nanostoney.tasks.subset import subset
from scripts import base_train, grpo_train, rm_train, sft_train

CHARS_PER_TOKEN = 4.0
PARSERS = {"base": base_train.parse_args, "knowledge": base_train.parse_args, "mid": sft_train.parse_args,
           "sft": sft_train.parse_args, "rm": rm_train.parse_args, "grpo": grpo_train.parse_args}
MEMORY_DEPTHS = (12, 20)
DEVICE_GB = 80


def task_items(names, cap):
    """(train examples the stage reads, ~tokens per example) over tasks `names`, `cap` per task (0 = all)."""
    n = chars = 0
    for name in names:
        exs = subset(get_task(name), "train", cap) if cap else get_task(name).examples("train")
        n += len(exs)
        sample = exs[:200]  # characters per item from the first 200
        chars += sum(len(m["content"]) for ex in sample for m in ex["messages"]) * len(exs) / max(1, len(sample))
    return n, chars / CHARS_PER_TOKEN / max(1, n)


def memory_words(stage, a, vocab, seq_len, head_dim):
    """"depth 12 ~x GB, depth 20 ~y GB per device (80 GB: fits)" for the stage's device batch on a GPU."""
    words, fits = [], True
    full = stage in ("base", "knowledge") or getattr(a, "full", False)
    placed = stage in ("base", "knowledge", "mid", "sft")  # train.place (bf16 embedding) and compiled by default
    for d in MEMORY_DEPTHS:
        with torch.device("meta"):  # no memory
            m = GPT(config_for_depth(d, vocab, seq_len, head_dim))
        if placed:
            m.transformer.wte.to(dtype=torch.bfloat16)
        if not full:
            lora.apply_lora(m, a.lora_rank, a.lora_alpha, a.lora_dropout, a.lora_targets)
        plan = memory.estimate(m, a.device_batch_size * (2 if stage == "rm" else 1), seq_len, "cuda",
                               placed if a.compile is None else a.compile, getattr(a, "optimizer", "adamw"),
                               lm_head=stage != "rm")
        fits &= plan.total <= memory.RESERVE * DEVICE_GB * memory.GB
        words.append(f"depth {d} ~{plan.total / memory.GB:.1f} GB")
    return f"memory per device: {', '.join(words)} ({DEVICE_GB} GB GPU: {'fits' if fits else 'DOES NOT FIT'})"


def base_line(args, a):
    total = a.total_batch_size or a.device_batch_size * a.sequence_len * args.world_size
    with torch.device("meta"):
        params = GPT(config_for_depth(args.depth, args.vocab_size, a.sequence_len, a.head_dim)).num_params()
    steps = a.num_iterations or max(1, math.ceil(a.target_param_data_ratio * params / total))
    tokens = steps * total
    if a.data:  # the web corpus: downloaded for this budget (download_corpus --tokens)
        have, what = args.web_tokens or tokens, "the web corpus downloaded for it"
    else:
        text = sum(len(t.encode()) for t in corpus.pretraining_texts(a.augment, a.corpus_tasks))
        have, what = text / CHARS_PER_TOKEN, f"the bundled corpus (~{text / CHARS_PER_TOKEN / 1e6:.1f}M tokens)"
    why = "" if tokens <= 3 * have else " (more than 3: the bundled corpus is small; its plan warns)"
    return f"{steps:,} steps x {total:,} tokens = {tokens:,} tokens; {what}: {tokens / have:.2f} epochs{why}"


def chat_line(args, stage, a):
    """(the plan's words, ~tokens per train item)."""
    names = [t.split("=")[0] for t in a.tasks.split(",") if t.strip()]
    items, per_item = task_items(names, a.max_train_examples)
    if stage == "grpo":
        per_step = a.prompts_per_step or a.prompts_per_rank * args.world_size
        read = a.num_iterations * per_step
        return (f"{a.num_iterations:,} steps x {per_step} prompts x {a.group_size} samples = {read:,} prompts "
                f"(<= {read * a.group_size * a.max_new_tokens:,} sampled tokens) of {items:,} train items: "
                f"{read / items:.2f} epochs", per_item)
    accum = a.grad_accum_steps or a.default_grad_accum_steps
    per_step = a.total_batch_size or a.device_batch_size * args.world_size * accum
    read = a.num_iterations * per_step
    unit, rows = ("pairs", 2) if stage == "rm" else ("conversations", 1)
    first = "" if a.max_train_examples == 0 else f" (first {a.max_train_examples} per task)"
    return (f"{a.num_iterations:,} steps x {per_step} {unit} = {read:,} (~{read * per_item * rows:,.0f} tokens) "
            f"of {items:,} train items{first}: {read / items:.2f} epochs", per_item)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--depth", type=int, required=True)
    p.add_argument("--vocab-size", type=int, required=True)
    p.add_argument("--world-size", type=int, default=1)
    p.add_argument("--web-tokens", type=int, default=None)
    p.add_argument("stages", nargs="*", help="NAME ARGS pairs")
    args = p.parse_args(argv)
    seq_len, head_dim = 2048, 128
    for name, flags in zip(args.stages[::2], args.stages[1::2]):
        a = PARSERS[name](shlex.split(flags))
        if name in ("base", "knowledge"):
            words = base_line(args, a)
            if name == "base":
                seq_len, head_dim = a.sequence_len, a.head_dim
            rows_len = seq_len
        else:
            words, per_item = chat_line(args, name, a)
            # GRPO trains on prompt + sampled completion, far shorter than the model's context
            rows_len = seq_len if name != "grpo" else min(seq_len, 2 * math.ceil(per_item) + a.max_new_tokens)
        print(f"{name} plan: {words}; {memory_words(name, a, args.vocab_size, rows_len, head_dim)}")


if __name__ == "__main__":
    main()
