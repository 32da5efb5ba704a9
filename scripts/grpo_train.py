"""GRPO from an SFT checkpoint: sample groups, score them with weighted rewards, clipped update
with a KL penalty to the reference. LoRA by default.

    python -m scripts.grpo_train --init out/sft --out out/grpo                          # CPU default
    python -m scripts.grpo_train --init out/sft --rewards "accuracy=1,format=0.2,reward_model=0.5" \\
        --reward-model out/rm --kl-beta 0.04 --inner-epochs 2 --loss-norm sequence
    torchrun --nproc_per_node=8 -m scripts.grpo_train --init out/sft ...   # 8 x 8 = 64 prompts per step

Prompts come from the TRAIN splits of --tasks (a weighted mixture, after the governance gate);
each step takes --prompts-per-rank of them on every process (a group stays on its rank), or
--prompts-per-step in all, split across the ranks, and samples --group-size completions each. The reference policy (KL) is the policy at the
start of RL (--reference init: the SFT adapters as loaded, kept as a small snapshot; or fresh
adapters switched off) or the base weights with the adapters off (--reference base); with
--full it is a frozen copy. Evaluation on the VAL split of --eval-tasks at the start (the
SFT model), every --eval-every steps, and at the end: pass@1 (greedy) and pass@k (k samples).
The start and end numbers, with 95% bootstrap intervals, go to <out>/grpo_eval.json.

Rewards are verifiers (nanostoney/rewards.py): accuracy is the task's own check (arith: the final
number; stoney_lexicon: the exact gloss or term; MC: the letter), chain adds partial credit per
gold line up to the first wrong one. Groups whose rewards are all equal are skipped (grpo.py).
--depth-curriculum draws arith prompts at depth 1 first and deeper ones in later stages (the
plan prints the stages); --shuffle-rewards is the control run: the same training with each
step's rewards permuted across its batch, so any gain it shows is not from the verifier.

Logged every step (W&B and <out>/metrics.jsonl): reward mean/std overall, per reward
function and per task; the groups skipped (groups/skipped, groups/skipped_frac) and whether the
rewards were shuffled (reward/shuffled, reward/shuffle_moved: the share of rows that got another
row's reward); KL (k3, sampled policy vs reference); clip fraction; policy entropy at
the sampled positions; completion length; attention entropy per layer; for MC tasks the
letter diagnostics of nanostoney/letters.py, measured on the policy that sampled, before it
moves; the time of each phase.
"""
import argparse
import functools
import os
import time

import torch
from tqdm import tqdm

from nanostoney import batches, checkpoint, cli, grpo, letters, lora, optim, probes, rewards, train
from nanostoney.governance import add_manifest_arg
from nanostoney.dist import (all_reduce_mean, all_reduce_sum, autocast_ctx, check_same_inputs, check_shared, cleanup,
                             init_dist, map_over_ranks, print0)
from nanostoney.cli import run_main
from nanostoney.errors import UserError
from nanostoney.evaluate import generate_completions, length_budget, task_accuracy
from nanostoney.files import write_json
from nanostoney.logging import add_logging_args, from_args
from nanostoney.metrics import bootstrap_ci, pass_at_k
from nanostoney.reward_model import load_reward_model
from nanostoney.tasks import get_task
from nanostoney.tasks.subset import subset

# the open tasks, rewarded by their verifiers (the final number; the exact gloss or term; yes / no),
# with the multiple-choice ones (issue 25); eval: each with its *_unseen control
DEFAULT_TASKS = "arith=1,stoney_lexicon=1,stoney_verb=1,arith_mc=1,stoney_mc=1"
DEFAULT_EVAL_TASKS = "arith,stoney_lexicon,stoney_lexicon_unseen,arith_mc,stoney_mc,stoney_mc_unseen"


def parse_args(argv=None):
    p = cli.ArgumentParser(description="GRPO (LoRA or full) from an SFT checkpoint.")
    p.add_argument("--init", default="out/sft", help="SFT output: adapter dir, run dir or step dir")
    p.add_argument("--tasks", default=DEFAULT_TASKS, help="training prompts: name=weight,... (train splits)")
    p.add_argument("--eval-tasks", default=DEFAULT_EVAL_TASKS, help="comma list evaluated on their val split")
    p.add_argument("--max-train-examples", type=cli.nonneg_int, default=0,
                   help="N balanced, hash-chosen train examples per task (0 = all)")
    add_manifest_arg(p)
    p.add_argument("--rewards", default="accuracy=1,format=0.2",
                   help="weighted reward functions: accuracy, chain (partial credit per gold line), format, "
                        "reasoning_steps, length, repetition, chrf, reward_model")
    p.add_argument("--shuffle-rewards", action="store_true",
                   help="control run: permute the rewards across each step's batch before the advantages")
    p.add_argument("--depth-curriculum", action="store_true",
                   help="draw multi-depth tasks' prompts (arith) at depth 1 first, deeper in later stages")
    p.add_argument("--reward-model", default=None, help="scripts.rm_train output, for the reward_model reward")
    lora.add_lora_args(p)
    p.add_argument("--reference", default="init", choices=["init", "base"],
                   help="KL reference: the policy at the start of RL, or the base weights with adapters off")
    p.add_argument("--prompts-per-rank", type=cli.positive_int, default=8, help="prompts per step on each process")
    p.add_argument("--prompts-per-step", type=cli.positive_int, default=None,
                   help="prompts per step, all ranks together (default: --prompts-per-rank x processes); "
                        "a multiple of the number of processes")
    p.add_argument("--group-size", type=cli.positive_int, default=8, help="G: completions per prompt")
    p.add_argument("--max-new-tokens", type=cli.positive_int, default=128)
    p.add_argument("--temperature", type=cli.nonneg_float, default=1.0, help="sampling temperature of the rollouts")
    p.add_argument("--top-k", type=cli.positive_int, default=None)
    p.add_argument("--clip-eps", type=cli.finite_float(0, 1, lo_open=True), default=0.2)
    p.add_argument("--kl-beta", type=cli.nonneg_float, default=0.04)
    p.add_argument("--inner-epochs", type=cli.positive_int, default=1, help="mu: optimizer steps per batch of rollouts")
    p.add_argument("--no-std-scaling", action="store_true", help="advantages r - mean(group), not divided by std")
    p.add_argument("--loss-norm", default="token", choices=["token", "sequence"])
    p.add_argument("--letter-every", type=cli.nonneg_int, default=1, help="steps between MC letter diagnostics; 0 = never")
    p.add_argument("--eval-examples", type=cli.nonneg_int, default=32, help="val items per eval task, periodic evals")
    p.add_argument("--final-eval-examples", type=cli.nonneg_int, default=64,
                   help="val items per eval task at the start (the SFT model) and the end; 0 = skip both")
    p.add_argument("--pass-k", type=cli.nonneg_int, default=4, help="samples per item for pass@k (0 = greedy only)")
    p.add_argument("--eval-temperature", type=cli.positive_float, default=1.0)
    p.add_argument("--probe-prompts", type=cli.nonneg_int, default=8,
                   help="training prompts per task whose mean reward is measured at the start and the end "
                        "(G fixed-seed samples each); 0 = skip")
    train.add_loop_args(p, num_iterations=40, device_batch_size=16, eval_every=0, save_every=0,
                        entropy_every=1, warmup_steps=0, warmdown_ratio=0.0)
    # lr 3e-4 with 8 prompts per step raised training reward in 3 of 3 seeds on CPU; lr 1e-3 with 4
    # prompts drifted (KL 0.4) without raising it (BENCHMARKS.md, GRPO over three seeds)
    optim.add_optim_args(p, optimizer="adamw", matrix_lr=3e-4, embedding_lr=1e-3, unembedding_lr=1e-4,
                         matrix_flags=("--lr", "--matrix-lr"))
    add_logging_args(p)
    return p.parse_args(argv)


# -----------------------------------------------------------------------------
# evaluation: greedy pass@1 and sampled pass@k on val items


def sampled_correct(model, tok, task, examples, k, temperature, max_new_tokens, info, seed=0):
    """[[bool] * k per example] (ranks split the examples and gather)."""
    prompts = [tok.render_prompt({"messages": task.prompt(ex)}) for ex in examples]
    texts = generate_completions(model, tok, prompts, info, num_samples=k, temperature=temperature,
                                 max_new_tokens=length_budget(tok, examples, max_new_tokens), seed=seed,
                                 desc=f"pass@{k} {task.name}")
    return [[bool(task.evaluate(ex, t)) for t in ts] for ex, ts in zip(examples, texts)]


def evaluate_tasks(model, tok, eval_tasks, n, args, info, seed=0):
    """{task: {"pass@1": (point, lo, hi), "pass@k": ..., "n": items, "items": {"id", "correct"}}} on
    the val split (the per-item greedy results let start and end be compared item by item)."""
    out = {}
    for task in eval_tasks:
        exs = subset(task, "val", n)
        greedy = task_accuracy(model, tok, task, exs, info, args.max_new_tokens)
        row = {"n": len(exs), "pass@1": bootstrap_ci([float(c) for c in greedy], seed=args.seed),
               "items": {"id": [ex["id"] for ex in exs], "correct": [int(c) for c in greedy]}}
        if args.pass_k > 0:
            samples = sampled_correct(model, tok, task, exs, args.pass_k, args.eval_temperature,
                                      args.max_new_tokens, info, seed=seed)
            vals = [pass_at_k(args.pass_k, sum(s), args.pass_k) for s in samples]
            row[f"pass@{args.pass_k}"] = bootstrap_ci(vals, seed=args.seed)
            row["sampled_pass@1"] = bootstrap_ci([sum(s) / len(s) for s in samples], seed=args.seed)
        out[task.name] = row
    model.train()
    return out


def eval_metrics(table, prefix="eval"):
    return {f"{prefix}/{name}/{k}": v[0] for name, row in table.items() for k, v in row.items()
            if k not in ("n", "items")}


def pass_line(when, name, row, args, start=None):
    line = f"{when} {name:>10}: pass@1 {row['pass@1'][0]:.3f}"
    if start is not None:
        line += f" [{row['pass@1'][1]:.3f}, {row['pass@1'][2]:.3f}] (start {start:.3f}, n={row['n']})"
    return line + (f"  pass@{args.pass_k} {row[f'pass@{args.pass_k}'][0]:.3f}" if args.pass_k > 0 else "")


# -----------------------------------------------------------------------------
# rewards of a step's completions


class RewardFn:
    """reward_fn(prompt_index, completions) for grpo.score over the prompts `items` [(task index,
    example)]: each completion's weighted rewards, scored per task in one batch."""

    def __init__(self, items, tasks, tok, weights, fns, stop_ids):
        self.items, self.tasks, self.tok = items, tasks, tok
        self.weights, self.fns, self.stop_ids = weights, fns, stop_ids

    def __call__(self, prompt_index, completions):
        texts = [self.tok.decode([t for t in c if t not in self.stop_ids]) for c in completions]
        n = len(completions)
        totals, parts = [0.0] * n, {k: [0.0] * n for k in self.weights}
        by_task = {}
        for r in range(n):
            by_task.setdefault(self.items[prompt_index[r]][0], []).append(r)
        for ti, rows in by_task.items():
            exs = [self.items[prompt_index[r]][1] for r in rows]
            t_, p_ = rewards.combine_batch(self.weights, exs, [texts[r] for r in rows], self.tasks[ti], self.fns)
            for j, r in enumerate(rows):
                totals[r] = t_[j]
                for k in self.weights:
                    parts[k][r] = p_[k][j]
        return totals, parts


def task_reward_metrics(ro, items, tasks, weights):
    """reward/<task>/mean and reward/<task>/<reward> over all ranks' rows of each task."""
    sums = []
    for ti in range(len(tasks)):
        rows = [r for r, pi in enumerate(ro.prompt_index) if items[pi][0] == ti]
        sums += [float(len(rows)), float(ro.rewards[rows].sum()) if rows else 0.0]
        sums += [float(ro.parts[k][rows].sum()) if rows else 0.0 for k in weights]
    sums = all_reduce_sum(sums)
    out, width = {}, 2 + len(weights)
    for ti, task in enumerate(tasks):
        cnt, total, *parts = sums[ti * width:(ti + 1) * width]
        if cnt > 0:
            out[f"reward/{task.name}/mean"] = total / cnt
            out.update({f"reward/{task.name}/{k}": v / cnt for k, v in zip(weights, parts)})
    return out


def probe_items(schedule, train_sets, n_tasks, k):
    """[(task index, example)]: the first k distinct training prompts per task in schedule order."""
    seen = {t: [] for t in range(n_tasks)}
    for t, i in schedule:
        if len(seen[t]) < k and i not in seen[t]:
            seen[t].append(i)
    return [(t, train_sets[t][i]) for t in range(n_tasks) for i in seen[t]]


@torch.no_grad()
def probe_reward(model, tok, items, tasks, cfg, reward_fn_for, info, seed):
    """{task name: mean total reward} over G samples of each probe prompt, same seed every call,
    so start and end differ only by the policy (fixed chunks of 8 prompts shared out over the
    ranks, chunk i seeded by i: the same numbers at any world size)."""
    def chunk_rewards(i):
        chunk = items[i:i + 8]
        ro = grpo.sample(model, [tok.render_prompt({"messages": tasks[t].prompt(ex)}) for t, ex in chunk],
                         cfg, seed=seed * 7919 + i)
        grpo.score(ro, reward_fn_for(chunk), cfg)
        return [(chunk[pi][0], float(ro.rewards[r])) for r, pi in enumerate(ro.prompt_index)]

    got = [x for part in map_over_ranks(chunk_rewards, list(range(0, len(items), 8)), info) for x in part]
    by_task = {}
    for t, r in got:
        by_task.setdefault(tasks[t].name, []).append(r)
    return {name: sum(rs) / len(rs) for name, rs in by_task.items()}


# -----------------------------------------------------------------------------
# the run


def depth_curriculum(schedule, train_sets, per_step, n_steps):
    """The prompt schedule with every entry of a task whose train items have several depths
    (arith, arith_mc) redrawn among its items no deeper than the step's stage: with D depths,
    stage k (depth <= k-th smallest) covers steps [(k-1) n / D, k n / D). Other tasks as they were."""
    depths = [sorted({ex["depth"] for ex in s if ex.get("depth")}) for s in train_sets]
    out = []
    for j, (t, i) in enumerate(schedule):
        ds = depths[t]
        if len(ds) < 2:
            out.append((t, i))
            continue
        limit = ds[min(len(ds) - 1, (j // per_step) * len(ds) // n_steps)]
        pool = [k for k, ex in enumerate(train_sets[t]) if ex.get("depth", 0) <= limit]
        out.append((t, pool[i % len(pool)]))
    return out


def curriculum_stages(schedule, train_sets, per_step):
    """"steps a-b: depth <= d" per stage of the schedule, for the plan (first deep task)."""
    deep = next((t for t, s in enumerate(train_sets) if len({ex.get("depth") for ex in s}) > 1), None)
    if deep is None:
        return "no task with several depths"
    stages = {}
    for j, (t, i) in enumerate(schedule):
        if t == deep:
            d = train_sets[t][i]["depth"]
            lo, hi = stages.get(d, (j // per_step, j // per_step))
            stages[d] = (lo, j // per_step)
    return "; ".join(f"steps {lo + 1}-{hi + 1}: depth <= {d}" for d, (lo, hi) in sorted(stages.items()))


def step_line(done, m, tasks):
    per_task = " ".join(f"{t.name}={m.get(f'reward/{t.name}/mean', float('nan')):.2f}" for t in tasks)
    return (f"step {done}: reward {m['reward/mean']:.3f} ({per_task}) kl {m['kl/mean']:.4f} "
            f"clip {m['clip_frac']:.3f} ent {m['policy/entropy']:.2f} len {m['completion/length']:.0f} "
            f"equal groups skipped {m['groups/skipped_frac']:.2f}{' (rewards shuffled)' if m['reward/shuffled'] else ''} | "
            f"sample {m['time/sample_s']:.1f}s score {m['time/score_s']:.1f}s letters {m['time/letters_s']:.1f}s "
            f"logprobs {m['time/logprobs_s']:.1f}s update {m['time/update_s']:.1f}s")


def grpo_config(args, tok, info):
    stop_ids = [tok.token_id("<|assistant_end|>"), tok.token_id("<|bos|>")]
    return grpo.GRPOConfig(group_size=args.group_size, max_new_tokens=args.max_new_tokens,
                           temperature=args.temperature, top_k=args.top_k, clip_eps=args.clip_eps,
                           kl_beta=args.kl_beta, inner_epochs=args.inner_epochs,
                           std_scaling=not args.no_std_scaling, loss_norm=args.loss_norm,
                           micro_batch=args.device_batch_size, grad_clip=args.grad_clip, stop_ids=stop_ids,
                           autocast=lambda: autocast_ctx(info), shuffle_rewards=args.shuffle_rewards).check()


def reward_functions(args, tok, info):
    """(weights, {name: reward callable}) from --rewards (and --reward-model)."""
    weights = rewards.parse_weights(args.rewards)
    rm = load_reward_model(args.reward_model, device=info.device)[0] if "reward_model" in weights else None
    return weights, rewards.build_rewards(weights, rm, tok)


def rl_step(step, run):
    """One GRPO step on this rank's share of the step's prompts; returns the logged metrics."""
    args, info, model, cfg = run.args, run.info, run.model, run.cfg
    done, P = step + 1, args.prompts_per_step
    entries = run.schedule[step * P:(step + 1) * P][info.rank::info.world_size]
    items = [(ti, run.train_sets[ti][i]) for ti, i in entries]
    prompts = [run.tok.render_prompt({"messages": run.tasks[ti].prompt(ex)}) for ti, ex in items]
    seed = (args.seed * 1_000_003 + step) * info.world_size + info.rank
    measure = train.every(args.entropy_every, done)
    ent = probes.EntropyProbe(model.config.n_layer, model.config.n_head) if measure else None
    train.sync_device(info.device)
    ro = grpo.experience(model, prompts, run.reward_fn_for(items), cfg, run.reference, seed, ent)
    # the letter diagnostics measure the policy that sampled, before the update moves it
    t0 = time.perf_counter()
    sums = None
    if run.letters and run.mc_names and train.every(args.letter_every, done):
        mc_rows = [(r, run.tasks[items[pi][0]].name, items[pi][1]["answer"], len(items[pi][1]["choices"]))
                   for r, pi in enumerate(ro.prompt_index) if run.tasks[items[pi][0]].kind == "mc"]
        sums = letters.letter_sums(model, run.reference, ro, mc_rows, run.mc_names, run.letters, cfg.stop_ids, cfg)
    ro.times["letters"] = time.perf_counter() - t0
    grpo.learn(model, run.optimizer, ro, cfg, run.params)
    train.sync_device(info.device)
    metrics = grpo.summarize(ro, cfg)
    if measure:
        metrics.update(train.attention_entropy_metrics(ent.all_reduce()))
    metrics = all_reduce_mean(metrics)
    metrics.update(task_reward_metrics(ro, items, run.tasks, run.weights))
    if sums is not None:
        metrics.update(letters.finish(sums, run.mc_names))
    metrics["train/lr_mult"] = run.optimizer.param_groups[0]["lr"] / run.optimizer.param_groups[0]["initial_lr"]
    metrics["rollout/tokens_per_s"] = (sum(len(c) for c in ro.completions) * info.world_size
                                       / max(ro.times["sample"], 1e-9))
    return metrics


def setup(args, info):
    """Everything a run needs, as a namespace: tasks and their prompt schedule (a pure function
    of (step, rank), so --resume continues it exactly), policy, reference, rewards, optimizer."""
    mix, tasks, sources = batches.training_tasks(args.tasks, args.manifest)
    eval_tasks = [get_task(n.strip()) for n in args.eval_tasks.split(",") if n.strip()]
    model, tok, init_ckpt, base_ckpt = checkpoint.load_for_training(
        args.init, args.full, args.lora_rank, args.lora_alpha, args.lora_targets, args.lora_dropout, info.device)
    reference = grpo.make_reference(model, args.reference)  # before any resume moves the policy
    weights, fns = reward_functions(args, tok, info)
    cfg = grpo_config(args, tok, info)
    optimizer = optim.optimizer_from_args(model, args)
    train_sets = [subset(task, "train", args.max_train_examples) for task in tasks]
    schedule = batches.mixture_schedule([len(s) for s in train_sets], list(mix.values()),
                                        args.num_iterations * args.prompts_per_step, seed=args.seed)
    if args.depth_curriculum:
        schedule = depth_curriculum(schedule, train_sets, args.prompts_per_step, args.num_iterations)
    letter_ids = letters.letter_tokens(tok.encode)
    mc_names = [t.name for t in tasks if t.kind == "mc"]
    if letter_ids is None and mc_names and args.letter_every:
        print0("note: 'Answer: X' is not one token per letter in this tokenizer; letter diagnostics are off.")
    return argparse.Namespace(
        args=args, info=info, tasks=tasks, eval_tasks=eval_tasks, sources=sources, model=model, tok=tok,
        init_ckpt=init_ckpt, base_ckpt=base_ckpt, reference=reference, weights=weights, cfg=cfg,
        optimizer=optimizer, params=[p for p in model.parameters() if p.requires_grad], train_sets=train_sets,
        schedule=schedule, letters=letter_ids, mc_names=mc_names,
        reward_fn_for=functools.partial(RewardFn, tasks=tasks, tok=tok, weights=weights, fns=fns,
                                        stop_ids=cfg.stop_ids))


def measure_start(run, report, logger):
    """The SFT model's val pass@k and its reward on the probe prompts, into the report."""
    args, info = run.args, run.info
    if args.final_eval_examples > 0:
        report["start"] = evaluate_tasks(run.model, run.tok, run.eval_tasks, args.final_eval_examples, args, info,
                                         seed=args.seed)
        logger.log(eval_metrics(report["start"]), step=0)
        for name, row in report["start"].items():
            print0(pass_line("start", name, row, args))
    if run.probe:
        report["train_reward_start"] = probe_reward(run.model, run.tok, run.probe, run.tasks, run.cfg,
                                                    run.reward_fn_for, info, args.seed)
        print0("start reward on training prompts: " + ", ".join(
            f"{k} {v:.3f}" for k, v in report["train_reward_start"].items()))


def measure_final(run, report, logger):
    """The final reward on the probe prompts and val pass@k, into the report."""
    args, info, n = run.args, run.info, run.args.num_iterations
    if run.probe:
        report["train_reward_final"] = probe_reward(run.model, run.tok, run.probe, run.tasks, run.cfg,
                                                    run.reward_fn_for, info, args.seed)
        logger.summary({f"final/train_reward/{k}": v for k, v in report["train_reward_final"].items()})
        start_r = report.get("train_reward_start", {})
        print0("final reward on training prompts: " + ", ".join(
            f"{k} {v:.3f} (start {start_r.get(k, float('nan')):.3f})" for k, v in report["train_reward_final"].items()))
    if args.final_eval_examples > 0:
        report["final"] = evaluate_tasks(run.model, run.tok, run.eval_tasks, args.final_eval_examples, args, info,
                                         seed=args.seed)
        logger.log(eval_metrics(report["final"]), step=n)
        logger.summary(eval_metrics(report["final"], "final"))
        for name, row in report["final"].items():
            start = report.get("start", {}).get(name, {}).get("pass@1", [float("nan")])[0]
            print0(pass_line("final", name, row, args, start=start))


def plan_extra(args, run):
    """The plan's last line: generation, adapters, rewards, knobs, the control and the curriculum."""
    return (f"at most {args.max_new_tokens} new tokens each; {'full' if args.full else 'LoRA'} "
            f"from {run.init_ckpt}; rewards {run.weights}; beta={args.kl_beta} clip={args.clip_eps} "
            f"mu={args.inner_epochs} norm={args.loss_norm}"
            + ("; REWARDS SHUFFLED across each batch (control run)" if args.shuffle_rewards else "")
            + (f"; depth curriculum: {curriculum_stages(run.schedule, run.train_sets, args.prompts_per_step)}"
               if args.depth_curriculum else ""))


def check_flags(args):
    """Combinations that would run without a learning signal, refused before any work."""
    world = int(os.environ.get("WORLD_SIZE") or 1)
    if args.compile:
        raise UserError("--compile is not supported by grpo_train (sampling and the gathered-logit "
                        "forward run eagerly); drop the flag.")
    if args.prompts_per_step is None:
        args.prompts_per_step = args.prompts_per_rank * world
    if args.prompts_per_step % world:
        raise UserError(f"--prompts-per-step {args.prompts_per_step} must be a multiple of the {world} processes, "
                        f"so every rank takes whole groups; or leave it out (--prompts-per-rank x processes).")
    if args.temperature == 0:
        raise UserError("--temperature 0 makes every completion of a group the same, so GRPO has nothing to "
                        "compare; use a temperature > 0 (e.g. 1.0).")
    if args.group_size < 2:
        raise UserError(f"--group-size must be at least 2 (advantages compare within a group), got {args.group_size}.")
    weights = rewards.parse_weights(args.rewards)
    if not any(weights.values()):
        raise UserError(f"--rewards {args.rewards!r} weighs every reward 0, so there is no learning signal; "
                        f"give at least one reward a non-zero weight.")
    if "reward_model" in weights and not args.reward_model:
        raise UserError("--rewards uses reward_model but no --reward-model PATH was given; "
                        "train one with python -m scripts.rm_train.")


def main(argv=None):
    args = parse_args(argv)
    check_flags(args)
    out = cli.claim_out(args.out or "out/grpo", overwrite=args.overwrite, resume=args.resume is not None,
                        inputs={"--init": args.init, "--reward-model": args.reward_model})
    info = train.apply_dtype(init_dist(args.device, seed=args.seed), args.dtype)
    check_shared({"--init": args.init, "--reward-model": args.reward_model})
    run = setup(args, info)
    check_same_inputs(run.sources, run.tok)  # several nodes: the same task data and tokenizer on every rank
    n = args.num_iterations
    mode = {"init": os.path.abspath(run.init_ckpt), "full": args.full, "seed": args.seed, "tasks": args.tasks,
            "prompts_per_step": args.prompts_per_step, "group_size": args.group_size, "rewards": args.rewards,
            "shuffle_rewards": args.shuffle_rewards, "depth_curriculum": args.depth_curriculum}
    start_step = train.resume(args, out, run.model, run.optimizer, info, expect=mode)["step"]
    run_config = {**vars(args), "model": vars(run.model.config), "world_size": info.world_size,
                  "trainable_params": sum(p.numel() for p in run.params), "data_sources": run.sources,
                  "init_checkpoint": os.path.abspath(run.init_ckpt),
                  "base_checkpoint": os.path.abspath(run.base_ckpt) if run.base_ckpt else None}
    logger = from_args(args, config=run_config, out_dir=out)
    P, G = args.prompts_per_step, args.group_size
    # a micro-batch row is a prompt and its completion: the longest of the first prompts + --max-new-tokens
    longest = max(len(run.tok.render_prompt({"messages": task.prompt(ex)}))
                  for task, exs in zip(run.tasks, run.train_sets) for ex in exs[:64])
    mem = train.memory_plan("GRPO", run.model, args, info,
                            min(run.model.config.sequence_len, longest + args.max_new_tokens), None)
    train.print_plan("GRPO", info, run.model, n, P * G, "completions",
                     f"{P} prompts x G={G}; {P // info.world_size} prompts per process",
                     extra=plan_extra(args, run))
    print0(f"GRPO {mem.describe()}")

    def save(step):
        train.save_run(out, run.model, step, run.optimizer, info, {**mode, "stage": "grpo", "num_iterations": n},
                       base_checkpoint=run.base_ckpt, tokenizer=run.tok, replace=args.overwrite)

    report = {"chance": 0.2, "init": os.path.abspath(run.init_ckpt), "args": vars(args), "steps": n}
    # a fixed set of training prompts (the first ones the run draws per task), scored before and after
    run.probe = probe_items(run.schedule, run.train_sets, len(run.tasks), args.probe_prompts)
    if start_step == 0:
        measure_start(run, report, logger)
    pbar = tqdm(range(start_step, n), initial=start_step, total=n, disable=not info.is_master, dynamic_ncols=True)
    for step in pbar:
        done = step + 1
        optim.set_lr(run.optimizer, optim.lr_multiplier(step, n, args.warmup_steps, args.warmdown_ratio,
                                                        args.final_lr_frac))
        metrics = rl_step(step, run)
        train.check_finite(done, loss=metrics["loss/pg"] + metrics["loss/kl_k3"], grad_norm=metrics["grad_norm"],
                           reward=metrics["reward/mean"])
        logger.log(metrics, step=done)
        pbar.set_postfix(r=f"{metrics['reward/mean']:.3f}", kl=f"{metrics['kl/mean']:.4f}",
                         len=f"{metrics['completion/length']:.0f}")
        if info.is_master and train.every(args.log_every, done):
            pbar.write(step_line(done, metrics, run.tasks))
        if train.every(args.eval_every, done) and done < n and args.eval_examples > 0:
            table = evaluate_tasks(run.model, run.tok, run.eval_tasks, args.eval_examples, args, info,
                                   seed=args.seed + done)
            logger.log(eval_metrics(table), step=done)
        if train.every(args.save_every, done) and done < n:
            save(done)
    pbar.close()
    measure_final(run, report, logger)
    save(n)
    if info.is_master:
        write_json(os.path.join(out, "grpo_eval.json"), report)
    logger.finish()
    print0(f"done: checkpoint and grpo_eval.json in {out}")
    cleanup()


if __name__ == "__main__":
    run_main(main)
