"""GRPO from an SFT checkpoint: sample groups, score them with weighted rewards, clipped update
with a KL penalty to the reference. LoRA by default.

    python -m scripts.grpo_train --init out/sft --out out/grpo                          # CPU default
    python -m scripts.grpo_train --init out/sft --rewards "accuracy=1,format=0.2,reward_model=0.5" \\
        --reward-model out/rm --kl-beta 0.04 --inner-epochs 2 --loss-norm sequence
    torchrun --nproc_per_node=8 -m scripts.grpo_train --init out/sft ...   # 8 x 8 = 64 prompts per step

Prompts from the TRAIN splits of --tasks (a group stays on its rank), rewarded by verifiers
(nanostoney/rewards.py); --shuffle-rewards is the control run. Val pass@1 and pass@k of
--eval-tasks at the start and the end, with 95% bootstrap intervals, in <out>/grpo_eval.json.
"""
import argparse
import functools
import os

from nanostoney import batches, cli, grpo, lora, optim, policy, rewards, stage, train
from nanostoney.dist import autocast_ctx, print0
from nanostoney.errors import UserError
from nanostoney.evaluate import generate_completions, length_budget
from nanostoney.logging import add_logging_args, from_args
from nanostoney.metrics import bootstrap_ci, pass_at_k
from nanostoney.reward_model import load_reward_model
from nanostoney.tasks.subset import subset

# the open tasks, rewarded by their verifiers (the final number; the exact gloss or term; yes / no),
# with the multiple-choice ones; eval: each with its *_unseen control
DEFAULT_TASKS = "arith=1,stoney_lexicon=1,stoney_verb=1,arith_mc=1,stoney_mc=1"
DEFAULT_EVAL_TASKS = "arith,stoney_lexicon,stoney_lexicon_unseen,arith_mc,stoney_mc,stoney_mc_unseen"


def parse_args(argv=None):
    p = stage.parser("GRPO (LoRA or full) from an SFT checkpoint.", "out/sft",
                     "SFT output: adapter dir, run dir or step dir", DEFAULT_TASKS,
                     "training prompts: name=weight,... (train splits)", DEFAULT_EVAL_TASKS, 0)
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
    # prompts drifted (KL 0.4) without raising it (docs/LOG.md, 2026-11-21: GRPO over three seeds)
    optim.add_optim_args(p, optimizer="adamw", matrix_lr=3e-4, embedding_lr=1e-3, unembedding_lr=1e-4,
                         matrix_flags=("--lr", "--matrix-lr"))
    add_logging_args(p)
    return p.parse_args(argv)


def evaluate_tasks(model, tok, eval_tasks, n, args, info, seed=0):
    """{task: {"n", "pass@1": (point, lo, hi), "items": {"id", "correct"}, "pass@k", "sampled_pass@1"}}
    on n val items (the per-item greedy results let start and end be compared item by item)."""
    out = {}
    for task in eval_tasks:
        exs = subset(task, "val", n)
        row, greedy = stage.greedy_accuracy(model, tok, task, n, info, args.max_new_tokens, args.seed)
        row = {"n": row["n"], "pass@1": row["accuracy"],
               "items": {"id": [ex["id"] for ex in exs], "correct": [int(c) for c in greedy]}}
        if args.pass_k > 0:
            texts = generate_completions(model, tok, [tok.render_prompt({"messages": task.prompt(ex)}) for ex in exs],
                                         info, num_samples=args.pass_k, temperature=args.eval_temperature,
                                         max_new_tokens=length_budget(tok, exs, args.max_new_tokens), seed=seed,
                                         desc=f"pass@{args.pass_k} {task.name}")
            samples = [[bool(task.evaluate(ex, t)) for t in ts] for ex, ts in zip(exs, texts)]
            vals = [pass_at_k(args.pass_k, sum(s), args.pass_k) for s in samples]
            row[f"pass@{args.pass_k}"] = bootstrap_ci(vals, seed=args.seed)
            row["sampled_pass@1"] = bootstrap_ci([sum(s) / len(s) for s in samples], seed=args.seed)
        out[task.name] = row
    model.train()
    return out


def eval_metrics(table, prefix="eval"):
    return {f"{prefix}/{name}/{k}": v[0] for name, row in table.items() for k, v in row.items()
            if k not in ("n", "items")}


def measure_pass(run, report, logger, when):
    """Val pass@k at the "start" (the SFT model) or the "final" one, into the report."""
    args, info = run.args, run.info
    if args.final_eval_examples <= 0:
        return
    report[when] = evaluate_tasks(run.model, run.tok, run.eval_tasks, args.final_eval_examples, args, info,
                                  seed=args.seed)
    logger.log(eval_metrics(report[when]), step=0 if when == "start" else args.num_iterations)
    if when == "final":
        logger.summary(eval_metrics(report["final"], "final"))
    for name, row in report[when].items():
        start = report.get("start", {}).get(name, {}).get("pass@1", [float("nan")])[0]
        print0(f"{when} {name:>10}: pass@1 {row['pass@1'][0]:.3f}"
               + (f" [{row['pass@1'][1]:.3f}, {row['pass@1'][2]:.3f}] (start {start:.3f}, n={row['n']})"
                  if when == "final" else "")
               + (f"  pass@{args.pass_k} {row[f'pass@{args.pass_k}'][0]:.3f}" if args.pass_k > 0 else ""))


def measure_reward(run, report, logger, when):
    """The mean reward on the probe prompts (fixed samples: only the policy differs), into the report."""
    if not run.probe:
        return
    got = report[f"train_reward_{when}"] = grpo.probe_reward(run.model, run.tok, run.probe, run.tasks, run.cfg,
                                                             run.reward_fn_for, run.info, run.args.seed)
    start = report.get("train_reward_start", {})
    if when == "final":
        logger.summary({f"final/train_reward/{k}": v for k, v in got.items()})
    print0(f"{when} reward on training prompts: " + ", ".join(
        f"{k} {v:.3f}" + (f" (start {start.get(k, float('nan')):.3f})" if when == "final" else "")
        for k, v in got.items()))


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
    if args.clip_eps >= 1:
        raise UserError(f"--clip-eps must be in (0, 1), got {args.clip_eps}.")
    weights = rewards.parse_weights(args.rewards)
    if not any(weights.values()):
        raise UserError(f"--rewards {args.rewards!r} weighs every reward 0, so there is no learning signal; "
                        f"give at least one reward a non-zero weight.")
    if "reward_model" in weights and not args.reward_model:
        raise UserError("--rewards uses reward_model but no --reward-model PATH was given; "
                        "train one with python -m scripts.rm_train.")
    return weights


def setup(args, info, weights):
    """Everything a run needs, as a namespace (the prompt schedule: a pure function of step and rank)."""
    mix, tasks, sources, model, tok, init_ckpt, base_ckpt = stage.load(args, info)
    reference = policy.make_reference(model, args.reference)  # before any resume moves the policy
    rm = load_reward_model(args.reward_model, device=info.device)[0] if "reward_model" in weights else None
    fns = rewards.build_rewards(weights, rm, tok)
    cfg = grpo.GRPOConfig(group_size=args.group_size, max_new_tokens=args.max_new_tokens,
                          temperature=args.temperature, top_k=args.top_k, clip_eps=args.clip_eps,
                          kl_beta=args.kl_beta, inner_epochs=args.inner_epochs,
                          std_scaling=not args.no_std_scaling, loss_norm=args.loss_norm,
                          micro_batch=args.device_batch_size, grad_clip=args.grad_clip, stop_ids=stage.stop_ids(tok),
                          autocast=lambda: autocast_ctx(info), shuffle_rewards=args.shuffle_rewards)
    optimizer = optim.optimizer_from_args(model, args)
    train_sets = [subset(task, "train", args.max_train_examples) for task in tasks]
    schedule = batches.mixture_schedule([len(s) for s in train_sets], list(mix.values()),
                                        args.num_iterations * args.prompts_per_step, seed=args.seed)
    if args.depth_curriculum:
        schedule = batches.depth_curriculum(schedule, train_sets, args.prompts_per_step, args.num_iterations)
    letter_ids, mc_names = stage.letter_setup(tok, tasks, args.letter_every)
    return argparse.Namespace(
        args=args, info=info, tasks=tasks, eval_tasks=stage.eval_tasks(args.eval_tasks), sources=sources, model=model,
        tok=tok, init_ckpt=init_ckpt, base_ckpt=base_ckpt, reference=reference, weights=weights, cfg=cfg,
        optimizer=optimizer, params=stage.trainable(model), train_sets=train_sets, schedule=schedule,
        letters=letter_ids, mc_names=mc_names,
        # a fixed set of training prompts (the first ones the run draws per task), scored before and after
        probe=grpo.probe_items(schedule, train_sets, len(tasks), args.probe_prompts),
        reward_fn_for=functools.partial(grpo.RewardFn, tasks=tasks, tok=tok, weights=weights, fns=fns,
                                        stop_ids=cfg.stop_ids))


def print_plan(args, run, info):
    P, G = args.prompts_per_step, args.group_size
    # a micro-batch row is a prompt and its completion: the longest of the first prompts + --max-new-tokens
    longest = max(len(run.tok.render_prompt({"messages": task.prompt(ex)}))
                  for task, exs in zip(run.tasks, run.train_sets) for ex in exs[:64])
    mem = train.memory_plan("GRPO", run.model, args, info,
                            min(run.model.config.sequence_len, longest + args.max_new_tokens), None)
    train.print_plan("GRPO", info, run.model, args.num_iterations, P * G, "completions",
                     f"{P} prompts x G={G}; {P // info.world_size} prompts per process",
                     extra=f"at most {args.max_new_tokens} new tokens each; {'full' if args.full else 'LoRA'} "
                           f"from {run.init_ckpt}; rewards {run.weights}; beta={args.kl_beta} clip={args.clip_eps} "
                           f"mu={args.inner_epochs} norm={args.loss_norm}"
                           + ("; REWARDS SHUFFLED across each batch (control run)" if args.shuffle_rewards else "")
                           + (f"; depth curriculum: {batches.curriculum_stages(run.schedule, run.train_sets, P)}"
                              if args.depth_curriculum else ""))
    print0(f"GRPO {mem.describe()}")


def main(argv=None):
    args = parse_args(argv)
    weights = check_flags(args)
    out, info = stage.start(args, "grpo", {"--init": args.init, "--reward-model": args.reward_model})
    run = setup(args, info, weights)
    n = args.num_iterations
    mode = {"init": os.path.abspath(run.init_ckpt), "full": args.full, "seed": args.seed, "tasks": args.tasks,
            "prompts_per_step": args.prompts_per_step, "group_size": args.group_size, "rewards": args.rewards,
            "shuffle_rewards": args.shuffle_rewards, "depth_curriculum": args.depth_curriculum}
    start_step = train.resume(args, out, run.model, run.optimizer, info, expect=mode)["step"]
    logger = from_args(args, out_dir=out, config={
        **vars(args), "model": vars(run.model.config), "world_size": info.world_size,
        "trainable_params": sum(p.numel() for p in run.params), "data_sources": run.sources,
        "init_checkpoint": os.path.abspath(run.init_ckpt),
        "base_checkpoint": os.path.abspath(run.base_ckpt) if run.base_ckpt else None})
    print_plan(args, run, info)
    save = stage.saver(out, run.model, run.optimizer, info, {**mode, "stage": "grpo", "num_iterations": n},
                       run.base_ckpt, run.tok, args)
    report = {"chance": 0.2, "init": os.path.abspath(run.init_ckpt), "args": vars(args), "steps": n}
    if start_step == 0:
        measure_pass(run, report, logger, "start")
        measure_reward(run, report, logger, "start")

    def after(done, m, pbar):
        if info.is_master and train.every(args.log_every, done):
            per_task = " ".join(f"{t.name}={m.get(f'reward/{t.name}/mean', float('nan')):.2f}" for t in run.tasks)
            pbar.write(f"step {done}: reward {m['reward/mean']:.3f} ({per_task}) kl {m['kl/mean']:.4f} "
                       f"clip {m['clip_frac']:.3f} ent {m['policy/entropy']:.2f} len {m['completion/length']:.0f} "
                       f"equal groups skipped {m['groups/skipped_frac']:.2f}"
                       f"{' (rewards shuffled)' if m['reward/shuffled'] else ''} | sample {m['time/sample_s']:.1f}s "
                       f"score {m['time/score_s']:.1f}s letters {m['time/letters_s']:.1f}s "
                       f"logprobs {m['time/logprobs_s']:.1f}s update {m['time/update_s']:.1f}s")
        if train.every(args.eval_every, done) and done < n and args.eval_examples > 0:
            table = evaluate_tasks(run.model, run.tok, run.eval_tasks, args.eval_examples, args, info,
                                   seed=args.seed + done)
            logger.log(eval_metrics(table), step=done)

    stage.step_loop(args, info, run.optimizer, start_step, lambda step: grpo.rl_step(step, run), logger, save,
                    finite=lambda m: {"loss": m["loss/pg"] + m["loss/kl_k3"], "grad_norm": m["grad_norm"],
                                      "reward": m["reward/mean"]},
                    postfix=lambda m: {"r": f"{m['reward/mean']:.3f}", "kl": f"{m['kl/mean']:.4f}",
                                       "len": f"{m['completion/length']:.0f}"}, after=after)
    measure_reward(run, report, logger, "final")
    measure_pass(run, report, logger, "final")
    save(n)
    stage.finish(info, logger, out, "grpo_eval.json", report, f"done: checkpoint and grpo_eval.json in {out}")


if __name__ == "__main__":
    cli.run_main(main)
