"""What every fine-tuning stage (scripts/{sft,rm,grpo,dpo,star}_train.py) does the same way:
its opening flags, start (claim --out, start the processes), load (tasks and policy), the RL
stages' step loop, greedy val accuracy with its interval, and finish."""
import argparse
import os

import torch
from tqdm import tqdm

from nanostoney import batches, checkpoint, cli, letters, optim, train
from nanostoney.governance import add_manifest_arg
from nanostoney.dist import check_same_inputs, check_shared, cleanup, init_dist, print0
from nanostoney.errors import UserError
from nanostoney.evaluate import task_accuracy
from nanostoney.files import write_json
from nanostoney.metrics import bootstrap_ci
from nanostoney.tasks import get_task
from nanostoney.tasks.subset import subset


def task_mixture(text):
    """The argparse type of --tasks: a name=weight,... mixture of known tasks, none a control."""
    try:
        batches.mixture_tasks(text)
    except UserError as e:
        raise argparse.ArgumentTypeError(str(e)) from None
    return text


def parser(description, init, init_help, tasks, tasks_help, eval_tasks=None, max_train=None,
           eval_help="comma list evaluated on their val split",
           max_train_help="N balanced, hash-chosen train examples per task (0 = all)"):
    """The flags every stage opens with (--max-train-examples and --eval-tasks where given a default)."""
    p = cli.ArgumentParser(description=description)
    p.add_argument("--init", default=init, help=init_help)
    p.add_argument("--tasks", type=task_mixture, default=tasks, help=tasks_help)
    if max_train is not None:
        p.add_argument("--max-train-examples", type=cli.nonneg_int, default=max_train, help=max_train_help)
    if eval_tasks is not None:
        p.add_argument("--eval-tasks", default=eval_tasks, help=eval_help)
    add_manifest_arg(p)
    return p


def start(args, name, inputs):
    """(out, info): --out claimed (default out/<name>), the processes started with the run's seed and
    --dtype (auto: dist's choice), and the input paths checked to be the same on every node."""
    out = cli.claim_out(args.out or f"out/{name}", overwrite=args.overwrite, resume=args.resume is not None,
                        inputs=inputs)
    info = init_dist(args.device, seed=args.seed)
    if args.dtype != "auto":
        info.autocast_dtype = torch.bfloat16 if args.dtype == "bfloat16" else None
    check_shared(inputs)
    return out, info


def load_policy(args, info):
    """(model, tok, init checkpoint, base checkpoint): --init with LoRA adapters (or --full)."""
    if getattr(args, "reference", None) == "base" and args.full:
        raise UserError("--reference base needs LoRA adapters (the base is the model with them off); "
                        "with --full the reference is the initial model (--reference init).")
    return checkpoint.load_for_training(args.init, args.full, args.lora_rank, args.lora_alpha, args.lora_targets,
                                        args.lora_dropout, info.device)


def load(args, info):
    """(mixture, tasks, sources, model, tok, init checkpoint, base checkpoint): --tasks after the
    governance gate, and the policy; several nodes must hold the same task data and tokenizer."""
    mix, tasks, sources = batches.training_tasks(args.tasks, args.manifest)
    model, tok, init_ckpt, base_ckpt = load_policy(args, info)
    check_same_inputs(sources, tok)
    return mix, tasks, sources, model, tok, init_ckpt, base_ckpt


def eval_tasks(spec):
    return [get_task(n.strip()) for n in spec.split(",") if n.strip()]


def stop_ids(tok):
    return [tok.token_id("<|assistant_end|>"), tok.token_id("<|bos|>")]


def letter_setup(tok, tasks, letter_every):
    """(letter ids or None, names of the multiple-choice tasks) for the letter diagnostics."""
    letter_ids = letters.letter_tokens(tok.encode)
    mc_names = [t.name for t in tasks if t.kind == "mc"]
    if letter_ids is None and mc_names and letter_every:
        print0("note: 'Answer: X' is not one token per letter in this tokenizer; letter diagnostics are off.")
    return letter_ids, mc_names


def trainable(model):
    return [p for p in model.parameters() if p.requires_grad]


def saver(out, model, optimizer, info, meta, base_ckpt, tok, args):
    """save(step) on every rank: a checkpoint of the run with `meta`."""
    return lambda step: train.save_run(out, model, step, optimizer, info, meta, base_checkpoint=base_ckpt,
                                       tokenizer=tok, replace=args.overwrite)


def greedy_accuracy(model, tok, task, n, info, max_new_tokens, seed):
    """({"n", "accuracy": (point, lo, hi)}, per-item bools): greedy accuracy on n val items, 95% interval."""
    correct = task_accuracy(model, tok, task, subset(task, "val", n), info, max_new_tokens)
    return {"n": len(correct), "accuracy": bootstrap_ci([float(c) for c in correct], seed=seed)}, correct


def step_loop(args, info, optimizer, start_step, step_fn, logger, save, finite, postfix, after=None):
    """The RL stages' loop: LR schedule, step_fn(step) -> metrics, a stop at the first non-finite
    finite(metrics), the log, after(done, metrics, pbar), --save-every (the last save is the caller's)."""
    n = args.num_iterations
    pbar = tqdm(range(start_step, n), initial=start_step, total=n, disable=not info.is_master, dynamic_ncols=True)
    for step in pbar:
        done = step + 1
        optim.set_lr(optimizer, optim.lr_multiplier(step, n, args.warmup_steps, args.warmdown_ratio,
                                                    args.final_lr_frac))
        metrics = step_fn(step)
        train.check_finite(done, **finite(metrics))
        logger.log(metrics, step=done)
        pbar.set_postfix(**postfix(metrics))
        if after is not None:
            after(done, metrics, pbar)
        if train.every(args.save_every, done) and done < n:
            save(done)
    pbar.close()


def finish(info, logger, out, report_name, report, done_line):
    if info.is_master:
        write_json(os.path.join(out, report_name), report)
    logger.finish()
    print0(done_line)
    cleanup()
