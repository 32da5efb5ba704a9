"""Train a reward model: the SFT trunk with a scalar head, Bradley-Terry loss on
(chosen, rejected) pairs built from ground truth. LoRA by default.

    python scripts/rm_train.py --init out/sft --out out/rm                          # CPU default
    python scripts/rm_train.py --init out/sft --sampled-negatives 64 ...            # + SFT mistakes
    torchrun --nproc_per_node=8 scripts/rm_train.py --init out/sft --total-batch-size 256 ...

Pairs (nanostoney/reward_model.py): from the TRAIN split of each task, the gold answer vs the
same answer made wrong (MC: another letter and that option's text; numeric: a nearby wrong
number; lexicon: another item's gloss); with --sampled-negatives N, also gold vs the wrong
answers the init model samples on N train prompts per task. Held-out pairs are built the same
way from --eval-split (val by default); the pairwise accuracy per task and per family
(stoney / math), before and after training, with 95% bootstrap intervals, goes to
<out>/rm_eval.json. The reward model is saved through checkpoint.py (adapters naming their
base, or the full trunk, plus the head) and loads with reward_model.load_reward_model.
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
from nanostoney.dist import gather_lists  # noqa: E402
from nanostoney.errors import UserError, run_main  # noqa: E402
from nanostoney.logging import add_logging_args, from_args  # noqa: E402

DEFAULT_TASKS = "stoney_mc,stoney_lexicon,gsm8k_mc,aqua_mc,gsm8k"


def parse_args(argv=None):
    p = argparse.ArgumentParser(description="Reward model (Bradley-Terry) on ground-truth pairs.")
    p.add_argument("--init", default="out/sft", help="trunk: SFT output (adapter dir, run dir or step dir)")
    p.add_argument("--tasks", default=DEFAULT_TASKS, help="comma list of tasks to build pairs from")
    p.add_argument("--max-train-examples", type=int, default=1000,
                   help="first N train examples per task to build pairs from (0 = all)")
    p.add_argument("--eval-split", default="val", choices=["val", "test"])
    p.add_argument("--eval-pairs", type=int, default=100, help="held-out pairs per task")
    p.add_argument("--sampled-negatives", type=int, default=0,
                   help="train prompts per task on which to sample wrong answers from the init model")
    p.add_argument("--samples-per-prompt", type=int, default=4)
    p.add_argument("--sample-max-new-tokens", type=int, default=128)
    p.add_argument("--max-len", type=int, default=None, help="drop pairs longer than this; default the model's sequence_len")
    add_manifest_arg(p)
    p.add_argument("--full", action="store_true", help="train the whole trunk instead of LoRA adapters")
    p.add_argument("--lora-rank", type=int, default=16)
    p.add_argument("--lora-alpha", type=float, default=32.0)
    p.add_argument("--lora-targets", default="all")
    p.add_argument("--lora-dropout", type=float, default=0.0)
    p.add_argument("--total-batch-size", type=int, default=16, help="pairs per optimizer step, all processes")
    p.add_argument("--lr", type=float, default=1e-3, help="AdamW LR of the trunk (adapters or all weights)")
    p.add_argument("--head-lr", type=float, default=1e-3, help="AdamW LR of the scalar head")
    p.add_argument("--weight-decay", type=float, default=0.0)
    T.add_loop_args(p, num_iterations=60, device_batch_size=8, eval_every=0, save_every=0, warmup_steps=5)
    add_logging_args(p)
    return p.parse_args(argv)


def family_table(rm, eval_sets, seed=0):
    """{task or family: {"n", "accuracy": (point, lo, hi), "margin"}} from per-task pair lists."""
    from nanostoney.metrics import bootstrap_ci
    out, fam = {}, {}
    for name, pairs in eval_sets.items():
        if not pairs:
            continue
        c = rm.score([p["chosen"] for p in pairs])
        r = rm.score([p["rejected"] for p in pairs])
        wins = ((c > r).float() + 0.5 * (c == r).float()).tolist()
        out[name] = {"n": len(wins), "accuracy": bootstrap_ci(wins, seed=seed), "margin": (c - r).mean().item()}
        fam.setdefault(pairs[0]["family"], []).extend(wins)
    for family, wins in fam.items():
        out[f"family/{family}"] = {"n": len(wins), "accuracy": bootstrap_ci(wins, seed=seed)}
    return out


def main(argv=None):
    args = parse_args(argv)
    from nanostoney import checkpoint, grpo
    from nanostoney import reward_model as RM
    from nanostoney.data import check_sources, sources_for_tasks
    from nanostoney.dist import autocast_ctx, barrier, cleanup, init_dist, print0
    from nanostoney.tasks import get_task

    info = init_dist(args.device, seed=args.seed)
    T.apply_dtype(info, args.dtype)
    out = args.out or "out/rm"
    names = [n.strip() for n in args.tasks.split(",") if n.strip()]
    if not names:
        raise UserError("--tasks names no task; e.g. --tasks stoney_mc,gsm8k_mc.")
    tasks = [get_task(n) for n in names]
    sources = sources_for_tasks(names)
    check_sources(sources, use="training", manifest=args.manifest)

    gpt, tok, init_ckpt, base_ckpt = grpo.load_for_training(
        args.init, args.full, args.lora_rank, args.lora_alpha, args.lora_targets, args.lora_dropout,
        device=info.device)
    max_len = args.max_len or gpt.config.sequence_len

    # pairs: ground truth from train; optionally the init model's own mistakes (sampled before
    # the trunk is touched, so they are the SFT policy's)
    train_pairs, counts = [], {}
    for task in tasks:
        ps = RM.build_pairs(task, tok, "train", args.max_train_examples, max_len)
        if args.sampled_negatives > 0:
            mine = task.examples("train")[info.rank:args.sampled_negatives:info.world_size]
            sampled = RM.sampled_pairs(gpt, tok, task, mine, args.samples_per_prompt, args.sample_max_new_tokens,
                                       seed=args.seed + info.rank, max_len=max_len)
            ps += gather_lists(sampled, info)
        counts[task.name] = {"ground_truth": sum(p["kind"] == "ground_truth" for p in ps),
                             "sampled": sum(p["kind"] == "sampled" for p in ps)}
        train_pairs += ps
    if not train_pairs:
        raise UserError(f"no training pairs fit in {max_len} tokens for tasks {names}; raise --max-len "
                        f"or pick other --tasks.")
    eval_sets = {t.name: RM.build_pairs(t, tok, args.eval_split, args.eval_pairs, max_len) for t in tasks}
    order = torch.randperm(len(train_pairs), generator=torch.Generator().manual_seed(args.seed)).tolist()
    train_pairs = [train_pairs[i] for i in order]

    rm = RM.RewardModel(gpt).to(info.device)
    trunk = [p for p in gpt.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW([{"params": trunk, "lr": args.lr}, {"params": list(rm.head.parameters()),
                                   "lr": args.head_lr}], betas=(0.9, 0.95), weight_decay=args.weight_decay)
    for g in optimizer.param_groups:
        g["initial_lr"] = g["lr"]
    accum = T.grad_accum_steps(args.total_batch_size, args.device_batch_size, 1, info.world_size, unit="pairs")
    train_model = T.wrap_ddp(rm, info)
    logger = from_args(args, config={**vars(args), "model": vars(gpt.config), "pairs": counts,
                                     "eval_pairs": {k: len(v) for k, v in eval_sets.items()},
                                     "data_sources": sources, "init_checkpoint": os.path.abspath(init_ckpt)},
                       out_dir=out)
    print0(f"reward model on {init_ckpt} ({'full' if args.full else 'LoRA'}): "
           + ", ".join(f"{k}={v['ground_truth']}+{v['sampled']}" for k, v in counts.items())
           + f" train pairs; held-out ({args.eval_split}) " + ", ".join(f"{k}={len(v)}" for k, v in eval_sets.items()))

    def batch(step, micro):
        g = B.first_row(step, micro, accum, info.world_size, info.rank, args.device_batch_size)
        return [train_pairs[(g + i) % len(train_pairs)] for i in range(args.device_batch_size)]

    def report_line(table, when):
        return f"{when}: " + ", ".join(f"{k} {v['accuracy'][0]:.3f}" for k, v in table.items())

    start = family_table(rm, eval_sets, args.seed)
    print0(report_line(start, "held-out pairwise accuracy before"))
    logger.log({f"rm/acc/{k}": v["accuracy"][0] for k, v in start.items()}, step=0)
    n = args.num_iterations
    from tqdm import tqdm
    for step in tqdm(range(n), disable=not info.is_master, dynamic_ncols=True):
        T.set_lr(optimizer, T.lr_multiplier(step, n, args.warmup_steps, args.warmdown_ratio, args.final_lr_frac))
        loss_sum, acc_sum = 0.0, 0.0
        for micro in range(accum):
            pairs = batch(step, micro)
            last = micro == accum - 1
            sync = train_model.no_sync() if (info.is_distributed and not last) else _null()
            with sync:
                with autocast_ctx(info):
                    c, r = RM.pair_forward(train_model, [(p["chosen"], p["rejected"]) for p in pairs], info.device)
                loss = RM.bt_loss(c, r)
                (loss / accum).backward()
            loss_sum += loss.item() / accum
            acc_sum += (c > r).float().mean().item() / accum
        gn = torch.nn.utils.clip_grad_norm_([p for p in rm.parameters() if p.requires_grad],
                                            args.grad_clip if args.grad_clip > 0 else float("inf"))
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        done = step + 1
        if done % max(1, args.log_every) == 0 or done == n:
            logger.log({"rm/loss": loss_sum, "rm/train_acc": acc_sum, "rm/grad_norm": gn.item()}, step=done)
        if args.eval_every > 0 and done % args.eval_every == 0 and done < n:
            table = family_table(rm, eval_sets, args.seed)
            logger.log({f"rm/acc/{k}": v["accuracy"][0] for k, v in table.items()}, step=done)
            print0(report_line(table, f"step {done}"))

    final = family_table(rm, eval_sets, args.seed)
    print0(report_line(final, "held-out pairwise accuracy after"))
    logger.log({f"rm/acc/{k}": v["accuracy"][0] for k, v in final.items()}, step=n)
    logger.summary({f"final/rm/acc/{k}": v["accuracy"][0] for k, v in final.items()})
    states = checkpoint.gather_rng_states()
    if info.is_master:
        RM.save_reward_model(out, rm, n, optimizer=optimizer, base_checkpoint=None if args.full else base_ckpt,
                             meta={"init": os.path.abspath(init_ckpt), "tasks": names, "seed": args.seed,
                                   "data_sources": sources, "pairs": counts}, rng_states=states)
        tmp = os.path.join(out, "rm_eval.json.tmp")
        with open(tmp, "w") as f:
            json.dump({"split": args.eval_split, "pairs": counts, "before": start, "after": final}, f, indent=2)
        os.replace(tmp, os.path.join(out, "rm_eval.json"))
    barrier()
    logger.finish()
    print0(f"done: reward model and rm_eval.json in {out}")
    cleanup()


def _null():
    from contextlib import nullcontext
    return nullcontext()


if __name__ == "__main__":
    run_main(main)
