"""STaR (Zelikman et al. 2022, arXiv 2203.14465): rejection-sampling fine-tuning, the baseline
RL is compared against.

    python -m scripts.star_train --init out/sft --out out/star                      # CPU default
    python -m scripts.star_train --init out/sft --rounds 3 --rationalize ...

Each round (nanostoney/star.py): sample rationales on TRAIN prompts, keep those the verifier accepts,
then SFT on every rationale kept so far, from --init again as in the paper (--continue: from the
previous round). Greedy val accuracy after every round goes to <out>/star_eval.json.
"""
import os

from nanostoney import cli, evaluate, lora, optim, stage, star, train
from nanostoney.dist import print0
from nanostoney.errors import UserError
from nanostoney.logging import add_logging_args, from_args
from nanostoney.tasks.subset import subset

DEFAULT_TASKS = "stoney_mc=1,arith_mc=1"


def parse_args(argv=None):
    p = stage.parser("STaR: sample rationales, keep the correct ones, SFT, repeat.", "out/sft",
                     "SFT output: adapter dir, run dir or step dir", DEFAULT_TASKS,
                     "name=weight,... (train prompts; weights mix the SFT)", "stoney_mc,stoney_mc_unseen,arith_mc")
    p.add_argument("--eval-examples", type=cli.nonneg_int, default=64,
                   help="val items per eval task after each round; 0 = skip")
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


def accuracy(model, tok, eval_tasks, args, info):
    """{task: greedy val accuracy} on --eval-examples items per eval task."""
    res = {}
    for task in eval_tasks if args.eval_examples > 0 else ():
        c = evaluate.task_accuracy(model, tok, task, subset(task, "val", args.eval_examples), info, args.max_new_tokens)
        res[task.name] = sum(c) / max(1, len(c))
    return res


def main(argv=None):
    args = parse_args(argv)
    if args.resume is not None:
        raise UserError("--resume: star_train does not resume (each round starts again from --init); rerun it with "
                        "--overwrite.")
    out, info = stage.start(args, "star", {"--init": args.init})
    mix, tasks, sources, model, tok, init_ckpt, base_ckpt = stage.load(args, info)
    eval_tasks = stage.eval_tasks(args.eval_tasks)
    total_batch, accum = train.batch_geometry(args, info)
    train.print_plan("STaR", info, model, args.num_iterations, total_batch, "conversations",
                     f"{args.device_batch_size} x {info.world_size} proc x {accum} accum",
                     extra=f"per round; {args.rounds} rounds of {args.prompts_per_round} prompts per task x "
                           f"{args.samples_per_prompt} samples (split across processes), then SFT")
    logger = from_args(args, config={**vars(args), "model": vars(model.config), "data_sources": sources,
                                     "init_checkpoint": os.path.abspath(init_ckpt)}, out_dir=out)
    report = {"init": os.path.abspath(init_ckpt), "rounds": [], "start": accuracy(model, tok, eval_tasks, args, info)}
    print0("start (init) val accuracy: " + ", ".join(f"{k} {v:.3f}" for k, v in report["start"].items()))
    logger.log({f"star/acc/{k}": v for k, v in report["start"].items()}, step=0)
    kept = {t.name: {} for t in tasks}
    offset = 0
    for rnd in range(args.rounds):
        seed = args.seed * 1000 + rnd * 100
        record = {"round": rnd + 1, **star.sample_round(model, tok, tasks, kept, args, info, seed)}
        print0(f"round {rnd + 1}: prompts solved by sampling "
               + ", ".join(f"{k} {v:.2f}" for k, v in record["sampled_correct"].items())
               + "; rationales kept so far " + ", ".join(f"{k} {v}" for k, v in record["kept_total"].items()))
        rendered, weights = star.rendered_rationales(tok, tasks, kept, mix, model.config.sequence_len)
        if rendered:
            if not args.continue_ and rnd > 0:
                model, tok, _, base_ckpt = stage.load_policy(args, info)
            star.fine_tune(model, rendered, weights, tok.token_id("<|assistant_end|>"), args, info, logger, seed,
                           offset)
            offset += args.num_iterations
        else:
            why = "none fits in the model's sequence_len" if any(kept.values()) else "none yet"
            print0(f"round {rnd + 1}: no correct rationale to train on ({why}).")
        record["accuracy"] = accuracy(model, tok, eval_tasks, args, info)
        report["rounds"].append(record)
        if rendered:
            logger.log({f"star/acc/{k}": v for k, v in record["accuracy"].items()}
                       | {f"star/kept/{k}": v for k, v in record["kept_total"].items()}, step=offset)
            print0(f"round {rnd + 1}: val accuracy " + ", ".join(f"{k} {v:.3f}" for k, v in record["accuracy"].items()))
    train.save_run(out, model, offset, None, info, {"stage": "star", "init": os.path.abspath(init_ckpt),
                                                     "rounds": args.rounds, "seed": args.seed},
                   base_checkpoint=base_ckpt, tokenizer=tok, replace=args.overwrite)
    stage.finish(info, logger, out, "star_eval.json", report, f"done: model and star_eval.json in {out}")


if __name__ == "__main__":
    cli.run_main(main)
