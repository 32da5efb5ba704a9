"""Supervised fine-tuning on chat tasks: loss on assistant tokens only, LoRA by default.

    python scripts/sft_train.py --init out/base --out out/sft                       # LoRA, CPU
    python scripts/sft_train.py --init out/base --full --lr 1e-3 ...                # full fine-tune
    torchrun --nproc_per_node=8 scripts/sft_train.py --init out/base ...            # 8 GPUs

The training set is a mixture of tasks by weight (--tasks name=weight,...), drawn from their
TRAIN splits only; the files behind those tasks pass the governance gate first. Every
--eval-every steps: the masked val loss, and greedy accuracy (through the Engine) on a few
trained items and a few val items of every multiple-choice task. At the end: the same on
--final-eval-examples items with 95% bootstrap intervals, written to <out>/sft_eval.json.
Saves the LoRA adapters (small, naming their base checkpoint) and, with --save-merged, the
merged weights as an ordinary checkpoint in <out>/merged.

CPU defaults (LoRA r=32, alpha 32, on every linear layer, AdamW lr 5e-3, 600 steps of 8
conversations, the first 16 fitting train items per task) are sized for about 5 minutes on 2
quiet cores and a depth-4 base: enough to learn the trained items, not to generalise. Measured
on that base: LoRA at lr 3e-3 barely moved in 150 steps, at 3e-2 it diverged; --full learns the
trained items fastest (100% in 300 steps). On a GPU use all examples: --max-train-examples 0.
"""
import argparse
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402

from nanostoney import batches as B  # noqa: E402
from nanostoney import train as T  # noqa: E402
from nanostoney.data import add_manifest_arg  # noqa: E402
from nanostoney.errors import UserError, run_main  # noqa: E402
from nanostoney.logging import add_logging_args, from_args  # noqa: E402

DEFAULT_TASKS = "stoney_qa=1,stoney_lexicon=1,stoney_mc=2,aqua_mc=1,gsm8k_mc=2"


def parse_args(argv=None):
    p = argparse.ArgumentParser(description="Supervised fine-tuning (LoRA or full) on chat tasks.")
    p.add_argument("--init", default="out/base", help="base checkpoint: a run dir (its latest step) or a step dir")
    p.add_argument("--tasks", default=DEFAULT_TASKS, help="mixture: name=weight,... (train splits only)")
    p.add_argument("--max-train-examples", type=int, default=16,
                   help="use only the first N train examples of each task that fit --sequence-len (0 = all); "
                        "small N = learnable in minutes on CPU")
    add_manifest_arg(p)
    p.add_argument("--full", action="store_true", help="full fine-tune instead of LoRA")
    p.add_argument("--lora-rank", type=int, default=32)
    p.add_argument("--lora-alpha", type=float, default=32.0, help="adapter scale is alpha / rank")
    p.add_argument("--lora-targets", default="all,head",
                   help="comma list or alias: attn, mlp, all, head (lm_head), q, k, v, o")
    p.add_argument("--lora-dropout", type=float, default=0.0)
    p.add_argument("--sequence-len", type=int, default=None, help="max tokens per conversation; default: the base model's")
    p.add_argument("--keep-truncated", action="store_true",
                   help="train on conversations longer than --sequence-len, cut (default: leave them out, "
                        "since the answer comes last)")
    p.add_argument("--total-batch-size", type=int, default=8, help="conversations per optimizer step, all processes")
    p.add_argument("--eval-examples", type=int, default=16, help="items per MC task and split for periodic accuracy")
    p.add_argument("--eval-loss-examples", type=int, default=64, help="val conversations per task for the val loss")
    p.add_argument("--final-eval-examples", type=int, default=100, help="items per MC task and split at the end")
    p.add_argument("--max-new-tokens", type=int, default=384, help="generation cap for accuracy")
    p.add_argument("--save-merged", action="store_true", help="also save LoRA merged into the weights (<out>/merged)")
    T.add_loop_args(p, num_iterations=600, device_batch_size=8, eval_every=200, save_every=0,
                    entropy_every=50, warmup_steps=10)
    T.add_optim_args(p, optimizer="adamw", matrix_lr=5e-3, embedding_lr=0.02, unembedding_lr=0.0004,
                     matrix_flags=("--lr", "--matrix-lr"))
    add_logging_args(p)
    return p.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    from nanostoney import checkpoint, lora
    from nanostoney.dist import cleanup, init_dist, print0

    info = init_dist(args.device, seed=args.seed)
    T.apply_dtype(info, args.dtype)
    out = args.out or "out/sft"
    weights, tasks, sources = B.training_tasks(args.tasks, args.manifest)
    names = list(weights)

    base_ckpt = checkpoint.latest_checkpoint(args.init) if os.path.isdir(args.init) else None
    if base_ckpt is None:
        raise UserError(f"--init {args.init}: no checkpoint there; run scripts/base_train.py first "
                        f"or point --init at its --out directory.")
    model, tok, _ = checkpoint.load_model(base_ckpt, device=info.device)
    if tok is None:
        raise UserError(f"{base_ckpt} has no tokenizer/ directory; re-save the base with its tokenizer.")
    model.train()
    seq_len = args.sequence_len or model.config.sequence_len
    if args.full:
        for p_ in model.parameters():
            p_.requires_grad_(True)
    else:
        lora.apply_lora(model, args.lora_rank, args.lora_alpha, args.lora_dropout, args.lora_targets)
    accum = T.grad_accum_steps(args.total_batch_size, args.device_batch_size, 1, info.world_size,
                               unit="conversations")
    optimizer = T.build_optimizer(model, args.optimizer, args.matrix_lr, args.embedding_lr,
                                  args.unembedding_lr, args.scalar_lr, args.weight_decay)

    # data: the first --max-train-examples fitting train conversations per task; val rows for the loss
    train_sets, rendered = B.render_train_sets(tok, tasks, seq_len + 1, args.max_train_examples,
                                               drop_truncated=not args.keep_truncated)
    pad_id = tok.token_id("<|assistant_end|>")
    loader = B.SFTBatches(rendered, [weights[n] for n in names], args.num_iterations, args.device_batch_size,
                          accum, info, pad_id, seed=args.seed)
    val_rows = []
    for task in tasks:
        val_rows += B.render_examples(tok, task.examples("val")[:args.eval_loss_examples], seq_len + 1,
                                      drop_truncated=False)[0]

    def item_sets(k):
        """k trained items (in the order the run draws them) and k val items per MC task."""
        sets = {}
        for t, task in enumerate(tasks):
            if task.kind == "mc":
                sets[(task, "train")] = [train_sets[t][i] for i in loader.first_drawn(t, k)]
                sets[(task, "val")] = task.examples("val")[:k]
        return sets

    mode = {"base_checkpoint": os.path.abspath(base_ckpt), "full": args.full, "seed": args.seed,
            "total_batch_size": args.total_batch_size, "tasks": args.tasks,
            "max_train_examples": args.max_train_examples, "optimizer": args.optimizer}
    start_step = 0
    resume = T.resolve_resume(args.resume, out)
    if resume:
        start_step = T.resume_run(resume, model, optimizer, info, expect=mode)["step"]
    train_model = T.wrap_ddp(torch.compile(model) if args.compile else model, info)

    run_config = {**vars(args), "model": vars(model.config), "grad_accum": accum, "world_size": info.world_size,
                  "trainable_params": sum(p_.numel() for p_ in model.parameters() if p_.requires_grad),
                  "train_examples": {n: len(r) for n, r in zip(names, rendered)}, "data_sources": sources,
                  "base_checkpoint": os.path.abspath(base_ckpt)}
    logger = from_args(args, config=run_config, out_dir=out)
    print0(f"SFT {'full' if args.full else f'LoRA r={args.lora_rank}'} from {base_ckpt}: "
           f"{run_config['trainable_params']:,} trainable params; train examples "
           + ", ".join(f"{n}={len(r)}" for n, r in zip(names, rendered)))

    def evaluate(step):
        metrics = {"val/loss": T.masked_loss(model, val_rows, pad_id, info)}
        if args.eval_examples > 0:
            table = T.accuracy_table(model, tok, item_sets(args.eval_examples), info, args.max_new_tokens)
            metrics.update({f"acc/{name}/{split}": r["accuracy"] for (name, split), r in table.items()})
        print0(f"step {step}: " + ", ".join(f"{k} {v:.3f}" for k, v in metrics.items()))
        return metrics

    def save(step):
        T.save_run(out, model, step, optimizer, info, {**mode, "stage": "sft", "num_iterations": args.num_iterations},
                   base_checkpoint=None if args.full else base_ckpt, tokenizer=tok)

    final = T.train_loop(info=info, model=model, optimizer=optimizer, args=args, get_batch=loader.get,
                         grad_accum=accum, start_step=start_step, logger=logger, evaluate=evaluate,
                         save=save, train_model=train_model)

    # final accuracy with intervals: trained items vs held-out (val) items
    report = {"chance": 0.2, "step": args.num_iterations, "val_loss": final.get("val/loss"), "tasks": {}}
    if args.final_eval_examples > 0:
        table = T.accuracy_table(model, tok, item_sets(args.final_eval_examples), info, args.max_new_tokens,
                                 seed=args.seed)
        for (name, split), r in table.items():
            report["tasks"].setdefault(name, {})[split] = r
            logger.summary({f"final/acc/{name}/{split}": r["accuracy"]})
            print0(f"final {name:>10} {split:>5}: {r['accuracy']:.3f} [{r['ci95'][0]:.3f}, {r['ci95'][1]:.3f}] "
                   f"(n={r['n']})")
    if info.is_master:
        tmp = os.path.join(out, "sft_eval.json.tmp")
        with open(tmp, "w") as f:
            json.dump(report, f, indent=2)
        os.replace(tmp, os.path.join(out, "sft_eval.json"))
    if args.save_merged and not args.full and info.is_master:
        lora.remove_lora(model, merge=True)
        checkpoint.save_checkpoint(os.path.join(out, "merged"), model, args.num_iterations, tokenizer=tok,
                                   meta={**mode, "stage": "sft-merged"})
    logger.summary({k: v for k, v in final.items()})
    logger.finish()
    print0(f"done: adapters/checkpoint in {out}")
    cleanup()


if __name__ == "__main__":
    run_main(main)
