"""STaR (Zelikman et al. 2022, arXiv 2203.14465): rejection-sampling fine-tuning, the baseline
RL is compared against.

    python -m scripts.star_train --init out/sft --out out/star                      # CPU default
    python -m scripts.star_train --init out/sft --rounds 3 --rationalize ...

Each round: sample --samples-per-prompt rationales on --prompts-per-round TRAIN prompts per
task with the current model; keep those the task's verifier accepts (deduplicated); with
--rationalize, prompts the model still failed are retried with the answer given as a hint,
and correct rationales are kept WITHOUT the hint (the paper's rationalisation). Then SFT on
every rationale kept so far, through the same loss, batches and loop as scripts/sft_train.py
(nanostoney.batches.SFTBatches + nanostoney.train.train_loop). As in the paper each round
fine-tunes again from --init (--continue trains on from the previous round instead).
Greedy accuracy on the VAL split of --eval-tasks after every round, and the kept counts,
go to <out>/star_eval.json; the last round's model is saved in <out>.
"""
import os

import torch

from nanostoney import batches, checkpoint, cli, evaluate, lora, optim, train
from nanostoney.cli import run_main
from nanostoney.dist import autocast_ctx, check_shared, cleanup, init_dist, map_over_ranks, print0
from nanostoney.engine import Engine
from nanostoney.errors import UserError
from nanostoney.files import write_json
from nanostoney.governance import add_manifest_arg
from nanostoney.logging import add_logging_args, from_args
from nanostoney.tasks import get_task
from nanostoney.tasks.subset import subset

DEFAULT_TASKS = "stoney_mc=1,arith_mc=1"


def parse_args(argv=None):
    p = cli.ArgumentParser(description="STaR: sample rationales, keep the correct ones, SFT, repeat.")
    p.add_argument("--init", default="out/sft", help="SFT output: adapter dir, run dir or step dir")
    p.add_argument("--tasks", default=DEFAULT_TASKS, help="name=weight,... (train prompts; weights mix the SFT)")
    p.add_argument("--eval-tasks", default="stoney_mc,stoney_mc_unseen,arith_mc")
    p.add_argument("--eval-examples", type=cli.nonneg_int, default=64,
                   help="val items per eval task after each round; 0 = skip")
    add_manifest_arg(p)
    p.add_argument("--rounds", type=cli.positive_int, default=2)
    p.add_argument("--prompts-per-round", type=cli.positive_int, default=64, help="train prompts per task per round")
    p.add_argument("--samples-per-prompt", type=cli.positive_int, default=4)
    p.add_argument("--temperature", type=cli.positive_float, default=1.0)
    p.add_argument("--max-new-tokens", type=cli.positive_int, default=128)
    p.add_argument("--rationalize", action="store_true", help="retry failed prompts with the answer as a hint")
    p.add_argument("--continue", dest="continue_", action="store_true",
                   help="train each round on from the previous one (default: restart from --init, as STaR)")
    lora.add_lora_args(p)
    train.add_loop_args(p, num_iterations=30, device_batch_size=8, eval_every=0, save_every=0,
                        unit="conversations", warmup_steps=3)
    optim.add_optim_args(p, optimizer="adamw", matrix_lr=1e-3, embedding_lr=0.02, unembedding_lr=0.0004,
                         matrix_flags=("--lr", "--matrix-lr"))
    add_logging_args(p)
    return p.parse_args(argv)


def hinted(task, ex):
    """The prompt with the gold answer given as a hint (rationalisation)."""
    msgs = task.prompt(ex)
    msgs[-1] = {**msgs[-1], "content": msgs[-1]["content"] + f"\n\n(Hint: the answer is {ex['answer']}.)"}
    return msgs


@torch.no_grad()
def collect(model, tok, task, examples, args, info, seed, hint=False):
    """[(example index, completion text)] of correct samples, in fixed chunks of 8 prompts shared
    out over the ranks (chunk i draws with seed + i: the same rationales at any world size)."""
    model.eval()
    engine = Engine(model, tok)
    stop = tok.token_id("<|assistant_end|>")

    def chunk_kept(i):
        chunk = range(i, min(i + 8, len(examples)))
        prompts = [tok.render_prompt({"messages": hinted(task, examples[j]) if hint else task.prompt(examples[j])})
                   for j in chunk]
        with autocast_ctx(info):
            gen = engine.generate(prompts, args.max_new_tokens, temperature=args.temperature, seed=seed + i,
                                  num_samples=args.samples_per_prompt)
        kept = []
        for r, toks in enumerate(gen.tokens):
            j = chunk[gen.prompt_index[r]]
            text = tok.decode(toks[:-1] if toks and toks[-1] == stop else toks)
            if gen.stopped[r] and task.evaluate(examples[j], text):
                kept.append((j, text))
        return kept

    return [k for part in map_over_ranks(chunk_kept, list(range(0, len(examples), 8)), info) for k in part]


def sample_round(model, tok, tasks, kept, args, info, seed):
    """Sample (and rationalise) every task's prompts of this round; add the correct rationales to
    `kept` ({task: {(example index, text): None}}, insertion-ordered). Returns the round's record."""
    record = {"sampled_correct": {}, "kept_total": {}}
    for t_idx, task in enumerate(tasks):
        exs = task.examples("train")
        pick = torch.randperm(len(exs), generator=torch.Generator().manual_seed(seed + t_idx))
        pick = pick[:args.prompts_per_round].tolist()
        chosen = [exs[i] for i in pick]
        got = collect(model, tok, task, chosen, args, info, seed)
        solved = {j for j, _ in got}
        if args.rationalize:
            failed = [j for j in range(len(chosen)) if j not in solved]
            hint_got = collect(model, tok, task, [chosen[j] for j in failed], args, info, seed + 7, hint=True)
            got += [(failed[j], text) for j, text in hint_got]
        for j, text in got:
            kept[task.name][(pick[j], text)] = None
        record["sampled_correct"][task.name] = len(solved) / max(1, len(chosen))
        record["kept_total"][task.name] = len(kept[task.name])
    return record


def rendered_rationales(tok, tasks, kept, mix, seq_len):
    """(rendered rows per task, mixture weights) of the tasks with a kept rationale that fits."""
    rendered, weights = [], []
    for task in tasks:
        exs = task.examples("train")
        convs = [{"messages": task.prompt(exs[i]) + [{"role": "assistant", "content": text}]}
                 for i, text in kept[task.name]]
        rows = batches.render_examples(tok, convs, seq_len + 1)[0] if convs else []
        if rows:
            rendered.append(rows)
            weights.append(mix[task.name])
    return rendered, weights


def fine_tune(model, rendered, weights, pad_id, args, info, logger, seed, offset):
    """SFT on the kept rationales with the SFT stage's own batches, loss and loop."""
    model.train()
    accum = train.batch_geometry(args, info)[1]
    optimizer = optim.optimizer_from_args(model, args)
    loader = batches.SFTBatches(rendered, weights, args.num_iterations, args.device_batch_size, accum, info,
                                pad_id, seed=seed)
    train.train_loop(info=info, model=model, optimizer=optimizer, args=args, get_batch=loader.get,
                     grad_accum=accum, start_step=0, logger=_Offset(logger, offset),
                     train_model=train.training_module(model, args, info))


def main(argv=None):
    args = parse_args(argv)
    if args.resume is not None:
        raise UserError("--resume: star_train does not resume (each round starts again from --init); rerun it with "
                        "--overwrite.")
    out = cli.claim_out(args.out or "out/star", overwrite=args.overwrite, inputs={"--init": args.init})
    info = train.apply_dtype(init_dist(args.device, seed=args.seed), args.dtype)
    check_shared({"--init": args.init})
    mix, tasks, sources = batches.training_tasks(args.tasks, args.manifest)
    eval_tasks = [get_task(n.strip()) for n in args.eval_tasks.split(",") if n.strip()]

    def fresh():
        return checkpoint.load_for_training(args.init, args.full, args.lora_rank, args.lora_alpha,
                                            args.lora_targets, args.lora_dropout, info.device)

    model, tok, init_ckpt, base_ckpt = fresh()
    total_batch, accum = train.batch_geometry(args, info)
    train.print_plan("STaR", info, model, args.num_iterations, total_batch, "conversations",
                     f"{args.device_batch_size} x {info.world_size} proc x {accum} accum",
                     extra=f"per round; {args.rounds} rounds of {args.prompts_per_round} prompts per task x "
                           f"{args.samples_per_prompt} samples (split across processes), then SFT")
    logger = from_args(args, config={**vars(args), "model": vars(model.config), "data_sources": sources,
                                     "init_checkpoint": os.path.abspath(init_ckpt)}, out_dir=out)

    def accuracy():
        res = {}
        for task in eval_tasks if args.eval_examples > 0 else ():
            c = evaluate.task_accuracy(model, tok, task, subset(task, "val", args.eval_examples), info,
                                       args.max_new_tokens)
            res[task.name] = sum(c) / max(1, len(c))
        return res

    report = {"init": os.path.abspath(init_ckpt), "rounds": [], "start": accuracy()}
    print0("start (init) val accuracy: " + ", ".join(f"{k} {v:.3f}" for k, v in report["start"].items()))
    logger.log({f"star/acc/{k}": v for k, v in report["start"].items()}, step=0)
    kept = {t.name: {} for t in tasks}
    offset = 0
    for rnd in range(args.rounds):
        seed = args.seed * 1000 + rnd * 100
        record = {"round": rnd + 1, **sample_round(model, tok, tasks, kept, args, info, seed)}
        print0(f"round {rnd + 1}: prompts solved by sampling "
               + ", ".join(f"{k} {v:.2f}" for k, v in record["sampled_correct"].items())
               + "; rationales kept so far " + ", ".join(f"{k} {v}" for k, v in record["kept_total"].items()))
        rendered, weights = rendered_rationales(tok, tasks, kept, mix, model.config.sequence_len)
        if rendered:
            if not args.continue_ and rnd > 0:
                model, tok, _, base_ckpt = fresh()
            fine_tune(model, rendered, weights, tok.token_id("<|assistant_end|>"), args, info, logger, seed, offset)
            offset += args.num_iterations
        else:
            why = "none fits in the model's sequence_len" if any(kept.values()) else "none yet"
            print0(f"round {rnd + 1}: no correct rationale to train on ({why}).")
        record["accuracy"] = accuracy()
        report["rounds"].append(record)
        if rendered:
            logger.log({f"star/acc/{k}": v for k, v in record["accuracy"].items()}
                       | {f"star/kept/{k}": v for k, v in record["kept_total"].items()}, step=offset)
            print0(f"round {rnd + 1}: val accuracy " + ", ".join(f"{k} {v:.3f}" for k, v in record["accuracy"].items()))

    train.save_run(out, model, offset, None, info, {"stage": "star", "init": os.path.abspath(init_ckpt),
                                                     "rounds": args.rounds, "seed": args.seed},
                   base_checkpoint=base_ckpt, tokenizer=tok, replace=args.overwrite)
    if info.is_master:
        write_json(os.path.join(out, "star_eval.json"), report)
    logger.finish()
    print0(f"done: model and star_eval.json in {out}")
    cleanup()


class _Offset:
    """The run's logger with steps shifted, so every round's loop logs after the previous one."""

    def __init__(self, logger, offset):
        self.logger, self.offset = logger, offset

    def log(self, metrics, step=None):
        self.logger.log(metrics, step=None if step is None else step + self.offset)


if __name__ == "__main__":
    run_main(main)
