"""Train a reward model: the SFT trunk with a scalar head, Bradley-Terry loss on (chosen,
rejected) pairs built from ground truth. LoRA by default.

    python -m scripts.rm_train --init out/sft --out out/rm                          # CPU default
    python -m scripts.rm_train --init out/sft --sampled-negatives 64 ...            # + SFT mistakes
    torchrun --nproc_per_node=8 -m scripts.rm_train --init out/sft ...   # 8 x 8 pairs x 2 accum per step

Pairs (nanostoney/reward_model.py): gold vs a wrong answer whose rationale argues for it, plus the
init policy's own wrong samples (--sampled-negatives, --eval-sampled). Pairwise accuracy per task
and family before and after, with 95% bootstrap intervals, in <out>/rm_eval.json.
"""
import os

import torch

from nanostoney import batches, cli, lora, reward_model, stage, train
from nanostoney.dist import autocast_ctx, map_over_ranks, print0
from nanostoney.errors import UserError
from nanostoney.logging import add_logging_args, from_args
from nanostoney.metrics import bootstrap_ci
from nanostoney.tasks.subset import subset

DEFAULT_TASKS = "stoney_mc,stoney_lexicon,arith_mc,arith"


def parse_args(argv=None):
    p = stage.parser("Reward model (Bradley-Terry) on ground-truth pairs.", "out/sft",
                     "trunk: SFT output (adapter dir, run dir or step dir)", DEFAULT_TASKS,
                     "comma list of tasks to build pairs from", max_train=1000,
                     max_train_help="N balanced, hash-chosen train examples per task to build pairs from (0 = all)")
    p.add_argument("--eval-split", default="val", choices=["val", "test"])
    p.add_argument("--eval-pairs", type=cli.positive_int, default=100, help="held-out pairs per task")
    p.add_argument("--sampled-negatives", type=cli.nonneg_int, default=0,
                   help="train prompts per task on which to sample wrong answers from the init model")
    p.add_argument("--eval-sampled", type=cli.nonneg_int, default=32,
                   help="held-out prompts per task on which the init policy's wrong answers become eval pairs")
    p.add_argument("--samples-per-prompt", type=cli.positive_int, default=4)
    p.add_argument("--sample-max-new-tokens", type=cli.positive_int, default=128)
    p.add_argument("--max-len", type=cli.positive_int, default=None,
                   help="drop pairs longer than this; default the model's sequence_len")
    lora.add_lora_args(p, targets="all")
    p.add_argument("--lr", type=cli.nonneg_float, default=1e-3, help="AdamW LR of the trunk (adapters or all weights)")
    p.add_argument("--head-lr", type=cli.nonneg_float, default=1e-3, help="AdamW LR of the scalar head")
    p.add_argument("--weight-decay", type=cli.nonneg_float, default=0.0)
    train.add_loop_args(p, num_iterations=60, device_batch_size=8, eval_every=0, save_every=0, unit="pairs",
                        grad_accum_steps=2, warmup_steps=5)
    add_logging_args(p)
    return p.parse_args(argv)


def family_table(rm, eval_sets, info, seed=0):
    """{task or family: {"n", "accuracy": (point, lo, hi), "margin"}} from per-task pair lists (scored in
    fixed batches of 16 shared out over the ranks: the same numbers at any world size)."""
    out, fam = {}, {}
    for name, pairs in eval_sets.items():
        if not pairs:
            continue
        seqs = [p["chosen"] for p in pairs] + [p["rejected"] for p in pairs]
        chunks = [seqs[i:i + 16] for i in range(0, len(seqs), 16)]
        s = torch.tensor([v for part in map_over_ranks(lambda c: rm.score(c).tolist(), chunks, info) for v in part])
        c, r = s[:len(pairs)], s[len(pairs):]
        wins = ((c > r).float() + 0.5 * (c == r).float()).tolist()
        out[name] = {"n": len(wins), "accuracy": bootstrap_ci(wins, seed=seed), "margin": (c - r).mean().item()}
        kind = "/policy" if pairs[0]["kind"] == "sampled" else ""
        fam.setdefault(pairs[0]["family"] + kind, []).extend(wins)
    for family, wins in fam.items():
        out[f"family/{family}"] = {"n": len(wins), "accuracy": bootstrap_ci(wins, seed=seed)}
    return out


def policy_pairs(gpt, tok, task, split, n, args, info, max_len):
    """Gold vs the init policy's wrong samples on n balanced items of a split."""
    return reward_model.sampled_pairs(gpt, tok, task, subset(task, split, n), args.samples_per_prompt,
                                      args.sample_max_new_tokens, seed=args.seed, max_len=max_len, info=info,
                                      autocast_factory=lambda: autocast_ctx(info))


def training_pairs(args, gpt, tok, tasks, max_len, info):
    """(pairs in a seeded order, counts per task and kind): sampled before the trunk is touched."""
    pairs, counts = [], {}
    for task in tasks:
        ps = reward_model.build_pairs(task, tok, "train", args.max_train_examples, max_len)
        if args.sampled_negatives > 0:
            ps += policy_pairs(gpt, tok, task, "train", args.sampled_negatives, args, info, max_len)
        counts[task.name] = {k: sum(p["kind"] == k for p in ps) for k in ("ground_truth", "sampled")}
        pairs += ps
    if not pairs:
        raise UserError(f"no training pairs for tasks {[t.name for t in tasks]}: none has a wrong answer with its "
                        f"own rationale (GSM8K and AQuA have none; add --sampled-negatives N) that fits in "
                        f"{max_len} tokens (else raise --max-len).")
    order = torch.randperm(len(pairs), generator=torch.Generator().manual_seed(args.seed)).tolist()
    return [pairs[i] for i in order], counts


def accuracy_line(table, when):
    return f"{when}: " + ", ".join(f"{k} {v['accuracy'][0]:.3f}" for k, v in table.items())


def held_out_pairs(args, gpt, tok, tasks, max_len, info):
    """{task (or task/policy): pairs} from --eval-split: ground truth and the init policy's mistakes."""
    eval_sets = {t.name: reward_model.build_pairs(t, tok, args.eval_split, args.eval_pairs, max_len) for t in tasks}
    for t in tasks if args.eval_sampled > 0 else ():
        eval_sets[f"{t.name}/policy"] = policy_pairs(gpt, tok, t, args.eval_split, args.eval_sampled, args, info,
                                                     max_len)
    return eval_sets


def main(argv=None):
    args = parse_args(argv)
    if args.resume is not None:
        raise UserError("--resume: rm_train does not resume (it trains in about a minute); rerun it with --overwrite.")
    out, info = stage.start(args, "rm", {"--init": args.init})
    mix, tasks, sources, gpt, tok, init_ckpt, base_ckpt = stage.load(args, info)
    max_len = args.max_len or gpt.config.sequence_len
    total_batch, accum = train.batch_geometry(args, info)
    mem = train.memory_plan("reward model", gpt, args, info, max_len, accum, rows_per_item=2, lm_head=False)
    pairs, counts = training_pairs(args, gpt, tok, tasks, max_len, info)
    eval_sets = held_out_pairs(args, gpt, tok, tasks, max_len, info)
    rm = reward_model.RewardModel(gpt).to(info.device)
    optimizer = torch.optim.AdamW([{"params": stage.trainable(gpt), "lr": args.lr, "role": "trunk"},
                                   {"params": list(rm.head.parameters()), "lr": args.head_lr, "role": "head"}],
                                  betas=(0.9, 0.95), weight_decay=args.weight_decay)
    for g in optimizer.param_groups:
        g["initial_lr"] = g["lr"]
    logger = from_args(args, out_dir=out, config={
        **vars(args), "model": vars(gpt.config), "pairs": counts,
        "eval_pairs": {k: len(v) for k, v in eval_sets.items()}, "data_sources": sources,
        "init_checkpoint": os.path.abspath(init_ckpt)})
    mean_len = sum(len(p["chosen"]) + len(p["rejected"]) for p in pairs) / len(pairs)
    train.print_plan("reward model", info, rm, args.num_iterations, total_batch, "pairs",
                     f"{args.device_batch_size} x {info.world_size} proc x {accum} accum",
                     tokens_per_step=total_batch * mean_len,
                     extra=f"{'full' if args.full else 'LoRA'} on {init_ckpt}; train pairs "
                           + ", ".join(f"{k}={v['ground_truth']}+{v['sampled']}" for k, v in counts.items())
                           + f"; held-out ({args.eval_split}) "
                           + ", ".join(f"{k}={len(v)}" for k, v in eval_sets.items()))
    print0(f"reward model {mem.describe()}")

    def batch(step, micro):
        g = batches.first_row(step, micro, accum, info.world_size, info.rank, args.device_batch_size)
        return [pairs[(g + i) % len(pairs)] for i in range(args.device_batch_size)]

    tables = {}

    def validate(step):
        if step not in tables:
            tables[step] = family_table(rm, eval_sets, info, args.seed)
            print0(accuracy_line(tables[step], f"step {step}" if step else "held-out pairwise accuracy before"))
        return {f"rm/acc/{k}": v["accuracy"][0] for k, v in tables[step].items()}
    logger.log(validate(0), step=0)

    def save(step):
        meta = {"init": os.path.abspath(init_ckpt), "tasks": list(mix), "seed": args.seed, "data_sources": sources,
                "pairs": counts, **reward_model.head_meta(rm)}
        train.save_run(out, gpt, step, optimizer, info, meta, base_checkpoint=base_ckpt, replace=args.overwrite)

    n = args.num_iterations
    train.train_loop(info=info, model=rm, optimizer=optimizer, args=args, get_batch=batch, grad_accum=accum,
                     start_step=0, logger=logger, evaluate=validate, save=save,
                     train_model=train.training_module(rm, args, info),
                     loss_fn=lambda model, b: reward_model.pair_loss(model, b, info.device))
    print0(accuracy_line(tables[n], "held-out pairwise accuracy after"))
    logger.summary({f"final/rm/acc/{k}": v["accuracy"][0] for k, v in tables[n].items()})
    stage.finish(info, logger, out, "rm_eval.json",
                 {"split": args.eval_split, "pairs": counts, "before": tables[0], "after": tables[n]},
                 f"done: reward model and rm_eval.json in {out}")


if __name__ == "__main__":
    cli.run_main(main)
