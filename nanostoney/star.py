"""STaR (Zelikman et al. 2022, arXiv 2203.14465): rejection-sampling fine-tuning, RL's baseline. A
round keeps the sampled rationales the verifier accepts (failed prompts retried with the answer as
a hint, kept without it), then fine-tunes on all kept so far with the SFT stage's batches and loop.

    kept = {task.name: {} for task in tasks}
    record = sample_round(model, tok, tasks, kept, args, info, seed)
    rendered, weights = rendered_rationales(tok, tasks, kept, mix, seq_len)
    fine_tune(model, rendered, weights, pad_id, args, info, logger, seed, offset)
"""
import torch

from nanostoney import batches, optim, train
from nanostoney.dist import autocast_ctx
from nanostoney.policy import sample_completions


def hinted(task, ex):
    """The prompt with the gold answer given as a hint (rationalisation)."""
    msgs = task.prompt(ex)
    msgs[-1] = {**msgs[-1], "content": msgs[-1]["content"] + f"\n\n(Hint: the answer is {ex['answer']}.)"}
    return msgs


def collect(model, tok, task, examples, args, info, seed, hint=False):
    """[(example index, completion text)] of the correct samples."""
    model.eval()
    got = sample_completions(model, tok, [hinted(task, ex) if hint else task.prompt(ex) for ex in examples],
                             args.samples_per_prompt, args.max_new_tokens, args.temperature, seed, info,
                             lambda: autocast_ctx(info))
    return [(j, text) for j, rows in enumerate(got) for _, text, stopped in rows
            if stopped and task.evaluate(examples[j], text)]


def sample_round(model, tok, tasks, kept, args, info, seed):
    """Add this round's correct rationales to `kept` ({task: {(example index, text): None}}); its record."""
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
                     grad_accum=accum, start_step=0, logger=OffsetLogger(logger, offset),
                     train_model=train.training_module(model, args, info))


class OffsetLogger:
    """The run's logger with steps shifted, so every round's loop logs after the previous one."""

    def __init__(self, logger, offset):
        self.logger, self.offset = logger, offset

    def log(self, metrics, step=None):
        self.logger.log(metrics, step=None if step is None else step + self.offset)
