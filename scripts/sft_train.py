"""Supervised fine-tuning on chat tasks: loss on assistant tokens only, LoRA by default.

    python -m scripts.sft_train --init out/base --out out/sft                       # LoRA, CPU
    python -m scripts.sft_train --init out/base --full --lr 1e-3 ...                # full fine-tune
    torchrun --nproc_per_node=8 -m scripts.sft_train --init out/base ...            # 8 GPUs

Trains on a --tasks mixture of TRAIN splits; val loss and greedy accuracy on trained vs val items
(95% bootstrap intervals, share of bare-letter answers) go to <out>/sft_eval.json. Saves the LoRA
adapters naming their base, and with --save-merged the merged weights in <out>/merged.
"""
import os

from nanostoney import batches, checkpoint, cli, evaluate, lora, optim, stage, train
from nanostoney.dist import print0
from nanostoney.logging import add_logging_args, from_args
from nanostoney.tasks import TASKS, get_task
from nanostoney.tasks.subset import subset

# the open tasks with the multiple-choice ones, so an open question is answered with a number or a
# word, and a letter only where options are given
DEFAULT_TASKS = "arith=1,stoney_lexicon=1,stoney_verb=1,arith_mc=1,stoney_mc=1"


def parse_args(argv=None):
    p = stage.parser("Supervised fine-tuning (LoRA or full) on chat tasks.", "out/base",
                     "base checkpoint: a run dir (its latest step) or a step dir", DEFAULT_TASKS,
                     "mixture: name=weight,... (train splits only)", max_train=16,
                     max_train_help="use only the first N train examples of each task that fit --sequence-len "
                                    "(0 = all); small N = learnable in minutes on CPU")
    lora.add_lora_args(p, rank=32)
    p.add_argument("--sequence-len", type=cli.positive_int, default=None,
                   help="max tokens per conversation; default: the base model's")
    p.add_argument("--keep-truncated", action="store_true",
                   help="train on conversations longer than --sequence-len, cut (default: leave them out, "
                        "since the answer comes last)")
    p.add_argument("--eval-examples", type=cli.nonneg_int, default=16,
                   help="items per task and split for periodic accuracy")
    p.add_argument("--eval-loss-examples", type=cli.positive_int, default=64,
                   help="val conversations per task for the val loss")
    p.add_argument("--final-eval-examples", type=cli.nonneg_int, default=100,
                   help="items per task and split at the end")
    p.add_argument("--max-new-tokens", type=cli.positive_int, default=384, help="generation cap for accuracy")
    p.add_argument("--save-merged", action="store_true", help="also save LoRA merged into the weights (<out>/merged)")
    train.add_loop_args(p, num_iterations=600, device_batch_size=8, eval_every=200, save_every=0,
                        unit="conversations", entropy_every=50, warmup_steps=10)
    optim.add_optim_args(p, optimizer="adamw", matrix_lr=5e-3, embedding_lr=0.02, unembedding_lr=0.0004,
                         matrix_flags=("--lr", "--matrix-lr"))
    add_logging_args(p)
    return p.parse_args(argv)


def item_sets(tasks, train_sets, loader, k):
    """k trained items (in the order the run draws them) and k val items per task, and k val items
    of its control twin (e.g. stoney_mc_unseen); stoney_qa (chrF) is left to scripts.eval."""
    sets = {}
    for t, task in enumerate(tasks):
        if task.name == "stoney_qa":
            continue
        sets[(task, "train")] = [train_sets[t][i] for i in loader.first_drawn(t, k)]
        sets[(task, "val")] = subset(task, "val", k)
        if task.name + "_unseen" in TASKS:
            twin = get_task(task.name + "_unseen")
            sets[(twin, "val")] = subset(twin, "val", k)
    return sets


def final_report(args, model, tok, tasks, train_sets, loader, final, info, logger):
    """{"chance", "step", "val_loss", "tasks": {task: {split: accuracy row}}}: trained vs val items."""
    report = {"chance": 0.2, "step": args.num_iterations, "val_loss": final.get("val/loss"), "tasks": {}}
    if args.final_eval_examples > 0:
        table = evaluate.accuracy_table(model, tok, item_sets(tasks, train_sets, loader, args.final_eval_examples),
                                        info, args.max_new_tokens, seed=args.seed)
        for (name, split), r in table.items():
            report["tasks"].setdefault(name, {})[split] = r
            logger.summary({f"final/acc/{name}/{split}": r["accuracy"],
                            f"final/letter_answers/{name}/{split}": r["letter_answers"]})
            print0(f"final {name:>10} {split:>5}: {r['accuracy']:.3f} [{r['ci95'][0]:.3f}, {r['ci95'][1]:.3f}] "
                   f"(n={r['n']}; answered {r['answered']:.2f}, with a letter {r['letter_answers']:.2f})"
                   + "".join(f"; depth {d} {v['accuracy']['value']:.2f} (n={v['n']})"
                             for d, v in r["by_depth"].items()))
    return report


def main(argv=None):
    args = parse_args(argv)
    out, info = stage.start(args, "sft", {"--init": args.init})
    weights, tasks, sources, model, tok, init_ckpt, base_ckpt = stage.load(args, info)
    train.place(model, info).train()  # (a bf16 embedding under bf16 autocast on CUDA, as base_train)
    seq_len = args.sequence_len or model.config.sequence_len
    total_batch, accum = train.batch_geometry(args, info)
    mem = train.memory_plan("SFT", model, args, info, seq_len, accum, compile_default=True)
    optimizer = optim.optimizer_from_args(model, args)
    # data: --max-train-examples balanced, hash-chosen train conversations that fit, per task; val rows for the loss
    train_sets, rendered = batches.render_train_sets(tok, tasks, seq_len + 1, args.max_train_examples,
                                                     drop_truncated=not args.keep_truncated)
    pad_id = tok.token_id("<|assistant_end|>")
    loader = batches.SFTBatches(rendered, list(weights.values()), args.num_iterations, args.device_batch_size,
                                accum, info, pad_id, seed=args.seed)
    val_rows = [row for task in tasks for row in batches.render_examples(
        tok, subset(task, "val", args.eval_loss_examples), seq_len + 1, drop_truncated=False)[0]]
    mode = {"base_checkpoint": os.path.abspath(init_ckpt), "full": args.full, "seed": args.seed,
            "total_batch_size": total_batch, "tasks": args.tasks,
            "max_train_examples": args.max_train_examples, "optimizer": args.optimizer}
    start_step = train.resume(args, out, model, optimizer, info, expect=mode)["step"]
    train_model = train.training_module(model, args, info, compile_default=True)
    logger = from_args(args, out_dir=out, config={
        **vars(args), "model": vars(model.config), "grad_accum": accum, "world_size": info.world_size,
        "trainable_params": sum(p.numel() for p in stage.trainable(model)),
        "train_examples": {n: len(r) for n, r in zip(weights, rendered)}, "data_sources": sources,
        "base_checkpoint": os.path.abspath(init_ckpt)})
    mean_len = sum(len(ids) for r in rendered for ids, _ in r) / sum(len(r) for r in rendered)
    train.print_plan("SFT", info, model, args.num_iterations, total_batch, "conversations",
                     f"{args.device_batch_size} x {info.world_size} proc x {accum} accum",
                     tokens_per_step=total_batch * mean_len,
                     extra=f"{'full' if args.full else f'LoRA r={args.lora_rank}'} from {init_ckpt}; train examples "
                           + ", ".join(f"{n}={len(r)}" for n, r in zip(weights, rendered)))
    print0(f"SFT {mem.describe()}")

    def validate(step):
        metrics = {"val/loss": evaluate.masked_loss(model, val_rows, pad_id, info)}
        if args.eval_examples > 0:
            table = evaluate.accuracy_table(model, tok, item_sets(tasks, train_sets, loader, args.eval_examples),
                                            info, args.max_new_tokens)
            metrics.update({f"acc/{name}/{split}": r["accuracy"] for (name, split), r in table.items()})
        print0(f"step {step}: " + ", ".join(f"{k} {v:.3f}" for k, v in metrics.items()))
        return metrics

    save = stage.saver(out, model, optimizer, info, {**mode, "stage": "sft", "num_iterations": args.num_iterations},
                       base_ckpt, tok, args)
    final = train.train_loop(info=info, model=model, optimizer=optimizer, args=args, get_batch=loader.get,
                             grad_accum=accum, start_step=start_step, logger=logger, evaluate=validate,
                             save=save, train_model=train_model)
    report = final_report(args, model, tok, tasks, train_sets, loader, final, info, logger)
    if args.save_merged and not args.full and info.is_master:
        lora.remove_lora(model, merge=True)
        checkpoint.save_checkpoint(os.path.join(out, "merged"), model, args.num_iterations, tokenizer=tok,
                                   meta={**mode, "stage": "sft-merged"}, replace=args.overwrite)
    logger.summary(final)
    stage.finish(info, logger, out, "sft_eval.json", report, f"done: adapters/checkpoint in {out}")


if __name__ == "__main__":
    cli.run_main(main)
