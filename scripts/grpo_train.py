"""GRPO from an SFT checkpoint: sample groups, score them with weighted rewards, clipped update
with a KL penalty to the reference. LoRA by default.

    python scripts/grpo_train.py --init out/sft --out out/grpo                          # CPU default
    python scripts/grpo_train.py --init out/sft --rewards "accuracy=1,format=0.2,reward_model=0.5" \\
        --reward-model out/rm --kl-beta 0.04 --inner-epochs 2 --loss-norm sequence
    torchrun --nproc_per_node=8 scripts/grpo_train.py --init out/sft --prompts-per-step 64 ...

Prompts come from the TRAIN splits of --tasks (a weighted mixture, after the governance gate);
each step takes --prompts-per-step of them (split across ranks, a group stays on its rank)
and samples --group-size completions each. The reference policy (KL) is the policy at the
start of RL (--reference init: the SFT adapters as loaded, kept as a small snapshot; or fresh
adapters switched off) or the base weights with the adapters off (--reference base); with
--full it is a frozen copy. Evaluation on the VAL split of --eval-tasks at the start (the
SFT model), every --eval-every steps, and at the end: pass@1 (greedy) and pass@k (k samples).
The start and end numbers, with 95% bootstrap intervals, go to <out>/grpo_eval.json.

Logged every step (W&B and <out>/metrics.jsonl): reward mean/std overall, per reward
function and per task; KL (k3, sampled policy vs reference); clip fraction; policy entropy at
the sampled positions; completion length; attention entropy per layer; for MC tasks the
letter-level KL (policy vs reference over the A-E logits at the answer slot), the letter margin
(gold logit minus best other) and the counts of predicted letters; the time of each phase.
"""
import argparse
import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402

from nanostoney import batches as B  # noqa: E402
from nanostoney import train as T  # noqa: E402
from nanostoney.data import add_manifest_arg  # noqa: E402
from nanostoney.errors import UserError, run_main  # noqa: E402
from nanostoney.logging import add_logging_args, from_args  # noqa: E402

DEFAULT_TASKS = "stoney_mc=1,gsm8k_mc=1"
DEFAULT_EVAL_TASKS = "stoney_mc,gsm8k_mc,aqua_mc"


def parse_args(argv=None):
    p = argparse.ArgumentParser(description="GRPO (LoRA or full) from an SFT checkpoint.")
    p.add_argument("--init", default="out/sft", help="SFT output: adapter dir, run dir or step dir")
    p.add_argument("--tasks", default=DEFAULT_TASKS, help="training prompts: name=weight,... (train splits)")
    p.add_argument("--eval-tasks", default=DEFAULT_EVAL_TASKS, help="comma list evaluated on their val split")
    p.add_argument("--max-train-examples", type=int, default=0, help="first N train examples per task (0 = all)")
    add_manifest_arg(p)
    p.add_argument("--rewards", default="accuracy=1,format=0.2",
                   help="weighted reward functions: accuracy, format, reasoning_steps, length, repetition, chrf, reward_model")
    p.add_argument("--reward-model", default=None, help="scripts/rm_train.py output, for the reward_model reward")
    p.add_argument("--full", action="store_true", help="full fine-tune (reference = frozen copy) instead of LoRA")
    p.add_argument("--lora-rank", type=int, default=16, help="fresh adapters only (an adapter --init keeps its own)")
    p.add_argument("--lora-alpha", type=float, default=32.0)
    p.add_argument("--lora-targets", default="all,head")
    p.add_argument("--lora-dropout", type=float, default=0.0)
    p.add_argument("--reference", default="init", choices=["init", "base"],
                   help="KL reference: the policy at the start of RL, or the base weights with adapters off")
    p.add_argument("--prompts-per-step", type=int, default=8, help="prompts per step, all ranks together")
    p.add_argument("--group-size", type=int, default=8, help="G: completions per prompt")
    p.add_argument("--max-new-tokens", type=int, default=128)
    p.add_argument("--temperature", type=float, default=1.0, help="sampling temperature of the rollouts")
    p.add_argument("--top-k", type=int, default=None)
    p.add_argument("--clip-eps", type=float, default=0.2)
    p.add_argument("--kl-beta", type=float, default=0.04)
    p.add_argument("--inner-epochs", type=int, default=1, help="mu: optimizer steps per batch of rollouts")
    p.add_argument("--no-std-scaling", action="store_true", help="advantages r - mean(group), not divided by std")
    p.add_argument("--loss-norm", default="token", choices=["token", "sequence"])
    p.add_argument("--letter-every", type=int, default=1, help="steps between MC letter diagnostics; 0 = never")
    p.add_argument("--eval-examples", type=int, default=32, help="val items per eval task, periodic evals")
    p.add_argument("--final-eval-examples", type=int, default=64,
                   help="val items per eval task at the start (the SFT model) and the end; 0 = skip both")
    p.add_argument("--pass-k", type=int, default=4, help="samples per item for pass@k (0 = greedy only)")
    p.add_argument("--eval-temperature", type=float, default=1.0)
    p.add_argument("--probe-prompts", type=int, default=8,
                   help="training prompts per task whose mean reward is measured at the start and the end "
                        "(G fixed-seed samples each); 0 = skip")
    T.add_loop_args(p, num_iterations=40, device_batch_size=16, eval_every=0, save_every=0,
                    entropy_every=1, warmup_steps=0, warmdown_ratio=0.0)
    # lr 3e-4 with 8 prompts per step raised training reward in 3 of 3 seeds on CPU; lr 1e-3 with 4
    # prompts drifted (KL 0.4) without raising it (BENCHMARKS.md, GRPO over three seeds)
    T.add_optim_args(p, optimizer="adamw", matrix_lr=3e-4, embedding_lr=1e-3, unembedding_lr=1e-4,
                     matrix_flags=("--lr", "--matrix-lr"))
    add_logging_args(p)
    return p.parse_args(argv)


# -----------------------------------------------------------------------------
# evaluation: greedy pass@1 and sampled pass@k on val items


def sampled_correct(model, tok, task, examples, k, temperature, max_new_tokens, info, seed=0):
    """[[bool] * k per example] (ranks split the examples and gather)."""
    from nanostoney.evaluate import generate_completions, length_budget
    prompts = [tok.render_prompt({"messages": task.prompt(ex)}) for ex in examples]
    texts = generate_completions(model, tok, prompts, info, num_samples=k, temperature=temperature,
                                 max_new_tokens=length_budget(tok, examples, max_new_tokens), seed=seed,
                                 desc=f"pass@{k} {task.name}")
    return [[bool(task.evaluate(ex, t)) for t in ts] for ex, ts in zip(examples, texts)]


def evaluate(model, tok, eval_tasks, n, args, info, seed=0):
    """{task: {"pass@1": (point, lo, hi), "pass@k": ..., "n": items}} on the val split."""
    from nanostoney.metrics import bootstrap_ci, pass_at_k
    out = {}
    for task in eval_tasks:
        exs = task.examples("val")[:n]
        greedy = T.task_accuracy(model, tok, task, exs, info, args.max_new_tokens)
        row = {"n": len(exs), "pass@1": bootstrap_ci([float(c) for c in greedy], seed=args.seed)}
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
    return {f"{prefix}/{name}/{k}": v[0] for name, row in table.items() for k, v in row.items() if k != "n"}


# -----------------------------------------------------------------------------


def main(argv=None):
    args = parse_args(argv)
    from nanostoney import grpo, rewards
    from nanostoney.dist import autocast_ctx, cleanup, init_dist, print0
    from nanostoney.tasks import get_task
    from tqdm import tqdm

    info = init_dist(args.device, seed=args.seed)
    T.apply_dtype(info, args.dtype)
    out = args.out or "out/grpo"
    if args.compile:
        raise UserError("--compile is not supported by grpo_train (sampling and the gathered-logit "
                        "forward run eagerly); drop the flag.")
    if args.prompts_per_step % info.world_size:
        raise UserError(f"--prompts-per-step {args.prompts_per_step} must be a multiple of the "
                        f"{info.world_size} processes, so every rank takes whole groups.")
    mix, tasks, sources = B.training_tasks(args.tasks, args.manifest)
    names = list(mix)
    eval_tasks = [get_task(n.strip()) for n in args.eval_tasks.split(",") if n.strip()]
    weights = rewards.parse_weights(args.rewards)

    model, tok, init_ckpt, base_ckpt = grpo.load_for_training(
        args.init, args.full, args.lora_rank, args.lora_alpha, args.lora_targets, args.lora_dropout,
        device=info.device)
    reference = grpo.make_reference(model, args.reference)  # before any resume moves the policy
    rm = None
    if "reward_model" in weights:
        if not args.reward_model:
            raise UserError("--rewards uses reward_model but no --reward-model PATH was given; "
                            "train one with scripts/rm_train.py.")
        from nanostoney.reward_model import load_reward_model
        rm = load_reward_model(args.reward_model, device=info.device)[0]
    fns = rewards.build_rewards(weights, rm, tok)

    stop_ids = [tok.token_id("<|assistant_end|>"), tok.token_id("<|bos|>")]
    cfg = grpo.GRPOConfig(group_size=args.group_size, max_new_tokens=args.max_new_tokens,
                          temperature=args.temperature, top_k=args.top_k, clip_eps=args.clip_eps,
                          kl_beta=args.kl_beta, inner_epochs=args.inner_epochs,
                          std_scaling=not args.no_std_scaling, loss_norm=args.loss_norm,
                          micro_batch=args.device_batch_size, grad_clip=args.grad_clip, stop_ids=stop_ids,
                          autocast=lambda: autocast_ctx(info)).check()
    optimizer = T.build_optimizer(model, args.optimizer, args.matrix_lr, args.embedding_lr,
                                  args.unembedding_lr, args.scalar_lr, args.weight_decay)
    params = [p for p in model.parameters() if p.requires_grad]

    # the prompt schedule: a pure function of (step, rank), so --resume continues it exactly
    train_sets = []
    for task in tasks:
        exs = task.examples("train")
        train_sets.append(exs[:args.max_train_examples] if args.max_train_examples > 0 else exs)
    n = args.num_iterations
    P = args.prompts_per_step
    schedule = B.mixture_schedule([len(s) for s in train_sets], [mix[k] for k in names], n * P, seed=args.seed)
    letters = grpo.letter_tokens(tok.encode)
    mc_tasks = [t.name for t in tasks if t.kind == "mc"]
    if letters is None and mc_tasks and args.letter_every:
        print0("note: 'Answer: X' is not one token per letter in this tokenizer; letter diagnostics are off.")

    def reward_fn_for(items):
        def reward_fn(prompt_index, completions):
            texts = [tok.decode([t for t in c if t not in stop_ids]) for c in completions]
            R = len(completions)
            totals, parts = [0.0] * R, {k: [0.0] * R for k in weights}
            by_task = {}
            for r in range(R):
                by_task.setdefault(items[prompt_index[r]][0], []).append(r)
            for ti, rows in by_task.items():
                exs = [items[prompt_index[r]][1] for r in rows]
                t_, p_ = rewards.combine_batch(weights, exs, [texts[r] for r in rows], tasks[ti], fns)
                for j, r in enumerate(rows):
                    totals[r] = t_[j]
                    for k in weights:
                        parts[k][r] = p_[k][j]
            return totals, parts
        return reward_fn

    mode = {"init": os.path.abspath(init_ckpt), "full": args.full, "seed": args.seed, "tasks": args.tasks,
            "prompts_per_step": P, "group_size": args.group_size, "rewards": args.rewards}
    start_step = 0
    resume = T.resolve_resume(args.resume, out)
    if resume:
        start_step = T.resume_run(resume, model, optimizer, info, expect=mode)["step"]
    run_config = {**vars(args), "model": vars(model.config), "world_size": info.world_size,
                  "trainable_params": sum(p_.numel() for p_ in params), "data_sources": sources,
                  "init_checkpoint": os.path.abspath(init_ckpt),
                  "base_checkpoint": os.path.abspath(base_ckpt) if base_ckpt else None}
    logger = from_args(args, config=run_config, out_dir=out)
    print0(f"GRPO {'full' if args.full else 'LoRA'} from {init_ckpt}: {run_config['trainable_params']:,} "
           f"trainable params; {P} prompts x G={args.group_size} per step; rewards {weights}; "
           f"beta={args.kl_beta} clip={args.clip_eps} mu={args.inner_epochs} norm={args.loss_norm}")

    report = {"chance": 0.2, "init": os.path.abspath(init_ckpt), "args": vars(args), "steps": n}
    if start_step == 0 and args.final_eval_examples > 0:
        table = evaluate(model, tok, eval_tasks, args.final_eval_examples, args, info, seed=args.seed)
        report["start"] = table
        logger.log(eval_metrics(table), step=0)
        for name, row in table.items():
            print0(f"start {name:>10}: pass@1 {row['pass@1'][0]:.3f}"
                   + (f"  pass@{args.pass_k} {row[f'pass@{args.pass_k}'][0]:.3f}" if args.pass_k > 0 else ""))

    # a fixed set of training prompts (the first ones the run draws per task), scored before and after
    probe = probe_items(schedule, train_sets, len(tasks), args.probe_prompts)
    if start_step == 0 and probe:
        report["train_reward_start"] = probe_reward(model, tok, probe, tasks, cfg, reward_fn_for, info, args.seed)
        print0("start reward on training prompts: " + ", ".join(
            f"{k} {v:.3f}" for k, v in report["train_reward_start"].items()))

    def every(k, step):
        return k > 0 and step % k == 0

    pbar = tqdm(range(start_step, n), initial=start_step, total=n, disable=not info.is_master, dynamic_ncols=True)
    for step in pbar:
        done = step + 1
        T.set_lr(optimizer, T.lr_multiplier(step, n, args.warmup_steps, args.warmdown_ratio, args.final_lr_frac))
        entries = schedule[step * P:(step + 1) * P][info.rank::info.world_size]
        items = [(ti, train_sets[ti][i]) for ti, i in entries]
        prompts = [tok.render_prompt({"messages": tasks[ti].prompt(ex)}) for ti, ex in items]
        seed = (args.seed * 1_000_003 + step) * info.world_size + info.rank

        T.sync_device(info.device)
        t0 = time.perf_counter()
        ro = grpo.sample(model, prompts, cfg, seed=seed)
        t1 = time.perf_counter()
        grpo.score(ro, reward_fn_for(items), cfg)
        t2 = time.perf_counter()
        # old / reference log-probs; the A-E logits at answer slots inside completions come along
        do_letters = bool(letters and mc_tasks and every(args.letter_every, done))
        slots = answer_slots(grpo, ro, items, tasks, letters, stop_ids) if do_letters else None
        measure = every(args.entropy_every, done)
        ent = grpo.RealTokenEntropy(model.config.n_layer, model.config.n_head) if measure else None
        prep = grpo.prepare(model, ro, cfg, reference, ent, peek=(slots[0], letters[1]) if do_letters else None)
        world_tokens, world_seqs = grpo.world_sum([prep["tokens"], float(len(ro.completions))], info.device)
        t3 = time.perf_counter()
        # completions without an answer slot: one extra forward with "Answer: " appended
        letter_sums = letter_metrics(grpo, model, reference, ro, items, tasks, mc_tasks, letters, slots,
                                     prep["peek"], cfg) if do_letters else None
        t4 = time.perf_counter()
        upd = grpo.update(model, optimizer, ro, cfg, params, world_tokens, world_seqs)
        T.sync_device(info.device)
        t5 = time.perf_counter()

        times = {"sample": t1 - t0, "score": t2 - t1, "logprobs": t3 - t2, "letters": t4 - t3, "update": t5 - t4}
        metrics = grpo.summarize(ro, prep, upd, cfg, times)
        metrics.update(task_reward_sums(ro, items, tasks, weights))
        if measure:
            metrics.update(T.entropy_metrics(ent.all_reduce()))
        metrics = world_mean(metrics, info)
        if letter_sums is not None:
            metrics.update(finish_letters(letter_sums, mc_tasks, info))
        metrics = finish_task_rewards(metrics, tasks, weights)
        metrics["train/lr_mult"] = optimizer.param_groups[0]["lr"] / optimizer.param_groups[0]["initial_lr"]
        metrics["rollout/tokens_per_s"] = (sum(len(c) for c in ro.completions) * info.world_size
                                           / max(times["sample"], 1e-9))
        logger.log(metrics, step=done)
        pbar.set_postfix(r=f"{metrics['reward/mean']:.3f}", kl=f"{metrics['kl/mean']:.4f}",
                         len=f"{metrics['completion/length']:.0f}")
        if info.is_master and every(args.log_every, done):
            pbar.write(step_line(done, metrics, tasks))
        if every(args.eval_every, done) and done < n and args.eval_examples > 0:
            table = evaluate(model, tok, eval_tasks, args.eval_examples, args, info, seed=args.seed + done)
            logger.log(eval_metrics(table), step=done)
        if every(args.save_every, done) and done < n:
            save(out, model, done, optimizer, info, mode, args, base_ckpt, tok)
    pbar.close()

    if probe:
        report["train_reward_final"] = probe_reward(model, tok, probe, tasks, cfg, reward_fn_for, info, args.seed)
        logger.summary({f"final/train_reward/{k}": v for k, v in report["train_reward_final"].items()})
        start_r = report.get("train_reward_start", {})
        print0("final reward on training prompts: " + ", ".join(
            f"{k} {v:.3f} (start {start_r.get(k, float('nan')):.3f})" for k, v in report["train_reward_final"].items()))

    table = {}
    if args.final_eval_examples > 0:
        table = evaluate(model, tok, eval_tasks, args.final_eval_examples, args, info, seed=args.seed)
        report["final"] = table
        logger.log(eval_metrics(table), step=n)
        logger.summary(eval_metrics(table, "final"))
    for name, row in table.items():
        before = report.get("start", {}).get(name, {}).get("pass@1", [float("nan")])[0]
        print0(f"final {name:>10}: pass@1 {row['pass@1'][0]:.3f} [{row['pass@1'][1]:.3f}, {row['pass@1'][2]:.3f}]"
               f" (start {before:.3f}, n={row['n']})"
               + (f"  pass@{args.pass_k} {row[f'pass@{args.pass_k}'][0]:.3f}" if args.pass_k > 0 else ""))
    save(out, model, n, optimizer, info, mode, args, base_ckpt, tok)
    if info.is_master:
        tmp = os.path.join(out, "grpo_eval.json.tmp")
        with open(tmp, "w") as f:
            json.dump(report, f, indent=2, default=str)
        os.replace(tmp, os.path.join(out, "grpo_eval.json"))
    logger.finish()
    print0(f"done: checkpoint and grpo_eval.json in {out}")
    cleanup()


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
    so start and end differ only by the policy (ranks split the prompts and sum)."""
    from nanostoney import grpo
    mine = items[info.rank::info.world_size]
    sums = [0.0] * (2 * len(tasks))
    for i in range(0, len(mine), 8):
        chunk = mine[i:i + 8]
        ro = grpo.sample(model, [tok.render_prompt({"messages": tasks[t].prompt(ex)}) for t, ex in chunk],
                         cfg, seed=seed * 7919 + info.rank * 104729 + i)
        grpo.score(ro, reward_fn_for(chunk), cfg)
        for r, pi in enumerate(ro.prompt_index):
            sums[2 * chunk[pi][0]] += float(ro.rewards[r])
            sums[2 * chunk[pi][0] + 1] += 1.0
    sums = grpo.world_sum(sums, info.device)
    return {task.name: sums[2 * t] / sums[2 * t + 1] for t, task in enumerate(tasks) if sums[2 * t + 1] > 0}


def save(out, model, step, optimizer, info, mode, args, base_ckpt, tok):
    T.save_run(out, model, step, optimizer, info, {**mode, "stage": "grpo", "num_iterations": args.num_iterations},
               base_checkpoint=None if args.full else base_ckpt, tokenizer=tok)


def step_line(done, m, tasks):
    per_task = " ".join(f"{t.name}={m.get(f'reward/{t.name}/mean', float('nan')):.2f}" for t in tasks)
    return (f"step {done}: reward {m['reward/mean']:.3f} ({per_task}) kl {m['kl/mean']:.4f} "
            f"clip {m['clip_frac']:.3f} ent {m['policy/entropy']:.2f} len {m['completion/length']:.0f} | "
            f"sample {m['time/sample_s']:.1f}s score {m['time/score_s']:.1f}s letters {m['time/letters_s']:.1f}s "
            f"logprobs {m['time/logprobs_s']:.1f}s update {m['time/update_s']:.1f}s")


def world_mean(metrics, info):
    """Every rank has the same keys and the same number of rows: average the values."""
    if not info.is_distributed:
        return metrics
    import torch.distributed as dist
    keys = sorted(metrics)
    t = torch.tensor([float(metrics[k]) for k in keys], dtype=torch.float64, device=info.device)
    dist.all_reduce(t)
    return dict(zip(keys, (t / info.world_size).tolist()))


def task_reward_sums(ro, items, tasks, weights):
    """Sums and counts per training task (finished after the world sum/mean)."""
    out = {}
    for ti, task in enumerate(tasks):
        rows = [r for r, pi in enumerate(ro.prompt_index) if items[pi][0] == ti]
        out[f"_n/{task.name}"] = float(len(rows))
        out[f"_sum/{task.name}"] = float(ro.rewards[rows].sum()) if rows else 0.0
        for k in weights:
            out[f"_sum/{task.name}/{k}"] = float(ro.parts[k][rows].sum()) if rows else 0.0
    return out


def finish_task_rewards(metrics, tasks, weights):
    for task in tasks:
        cnt = metrics.pop(f"_n/{task.name}")
        s = metrics.pop(f"_sum/{task.name}")
        parts = {k: metrics.pop(f"_sum/{task.name}/{k}") for k in weights}
        if cnt > 0:
            metrics[f"reward/{task.name}/mean"] = s / cnt
            for k, v in parts.items():
                metrics[f"reward/{task.name}/{k}"] = v / cnt
    return metrics


def answer_slots(grpo, ro, items, tasks, letters, stop_ids):
    """For the MC rows: ({row: completion index of the answer letter}, {row: forced prefix}) --
    the first kind is read from prepare()'s forwards, the second needs letter_logits()."""
    marker = letters[0]
    inside, forced = {}, {}
    for r, pi in enumerate(ro.prompt_index):
        if tasks[items[pi][0]].kind != "mc":
            continue
        k, prefix = grpo.answer_slot(ro.completions[r], marker, stop_ids)
        if k is not None:
            inside[r] = k
        else:
            forced[r] = ro.prompts[r] + prefix
    return inside, forced


def letter_metrics(grpo, model, reference, ro, items, tasks, mc_tasks, letters, slots, peeked, cfg):
    """Sums per MC task of the letter KL, margin, answer-slot coverage, argmax accuracy and
    predicted-letter counts (finished by finish_letters after the sum over ranks)."""
    inside, forced = slots
    pol, ref = {r: pq[0] for r, pq in peeked.items()}, {r: pq[1] for r, pq in peeked.items()}
    if forced:
        rows = sorted(forced)
        p_, q_ = grpo.letter_logits(model, reference, [forced[r] for r in rows], letters[1], cfg.micro_batch,
                                    cfg.autocast)
        pol.update(zip(rows, p_))
        ref.update(zip(rows, q_))
    sums = {}
    for name in mc_tasks:
        for k in ("n", "kl", "margin", "found", "correct") + tuple(f"count_{L}" for L in grpo.LETTERS):
            sums[f"{name}/{k}"] = 0.0
    rows = sorted(pol)
    if not rows:
        return sums
    gold = [grpo.LETTERS.index(items[ro.prompt_index[r]][1]["answer"]) for r in rows]
    st = grpo.letter_summary(torch.stack([pol[r].cpu() for r in rows]), torch.stack([ref[r].cpu() for r in rows]), gold)
    for j, r in enumerate(rows):
        name = tasks[items[ro.prompt_index[r]][0]].name
        pred = st["pred"][j].item()
        sums[f"{name}/n"] += 1
        sums[f"{name}/kl"] += st["kl"][j].item()
        sums[f"{name}/margin"] += st["margin"][j].item()
        sums[f"{name}/found"] += float(r in inside)
        sums[f"{name}/correct"] += float(pred == gold[j])
        sums[f"{name}/count_{grpo.LETTERS[pred]}"] += 1
    return sums


def finish_letters(sums, mc_tasks, info):
    from nanostoney.grpo import LETTERS, world_sum
    keys = sorted(sums)
    vals = dict(zip(keys, world_sum([sums[k] for k in keys], info.device)))
    out = {}
    tot = {k: 0.0 for k in ("n", "kl", "margin")}
    for name in mc_tasks:
        cnt = vals[f"{name}/n"]
        for L in LETTERS:
            out[f"letters/{name}/count_{L}"] = vals[f"{name}/count_{L}"]
        if cnt == 0:
            continue
        out[f"letters/{name}/kl"] = vals[f"{name}/kl"] / cnt
        out[f"letters/{name}/margin"] = vals[f"{name}/margin"] / cnt
        out[f"letters/{name}/answer_found"] = vals[f"{name}/found"] / cnt
        out[f"letters/{name}/argmax_correct"] = vals[f"{name}/correct"] / cnt
        for k in tot:
            tot[k] += vals[f"{name}/{k}"]
    if tot["n"]:
        out["letters/kl"] = tot["kl"] / tot["n"]
        out["letters/margin"] = tot["margin"] / tot["n"]
    for L in LETTERS:
        out[f"letters/count_{L}"] = sum(vals[f"{name}/count_{L}"] for name in mc_tasks)
    return out


if __name__ == "__main__":
    run_main(main)
