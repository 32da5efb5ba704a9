"""DPO from an SFT checkpoint: prefer one answer over another without a reward model. LoRA by default.

    python -m scripts.dpo_train --init out/sft --out out/dpo                              # CPU default
    python -m scripts.dpo_train --init out/sft --pairs on_policy --on-policy-prompts 64   # STaR-then-DPO
    torchrun --nproc_per_node=8 -m scripts.dpo_train --init out/sft ...   # 8 x 8 pairs per step

Pairs (nanostoney/dpo.py) from the TRAIN splits of --tasks. Greedy val accuracy of --eval-tasks and
the implicit-reward accuracy on held-out pairs, at the start and the end with 95% bootstrap
intervals, in <out>/dpo_eval.json.
"""
import argparse
import os

import torch

from nanostoney import batches, cli, dpo, letters, lora, optim, policy, probes, reward_model, stage, train
from nanostoney.dist import all_reduce_sum, autocast_ctx, map_over_ranks, print0
from nanostoney.errors import UserError
from nanostoney.logging import add_logging_args, from_args
from nanostoney.metrics import bootstrap_ci
from nanostoney.tasks import get_task
from nanostoney.tasks.subset import subset

DEFAULT_TASKS = "stoney_mc=1,arith_mc=1"
PAIR_KINDS = ("ground_truth", "on_policy", "both")


def parse_args(argv=None):
    p = stage.parser("DPO (LoRA or full) from an SFT checkpoint.", "out/sft",
                     "SFT output: adapter dir, run dir or step dir", DEFAULT_TASKS,
                     "training pairs: name=weight,... (train splits)", "stoney_mc,stoney_mc_unseen,arith_mc", 1000,
                     max_train_help="train examples per task for ground-truth pairs, a balanced subset (0 = all)")
    p.add_argument("--pairs", default="ground_truth", choices=PAIR_KINDS, help="where the preference pairs come from")
    p.add_argument("--on-policy-prompts", type=cli.positive_int, default=32, help="train prompts per task sampled")
    p.add_argument("--samples-per-prompt", type=cli.positive_int, default=4)
    p.add_argument("--temperature", type=cli.positive_float, default=1.0, help="sampling temperature (on-policy pairs)")
    p.add_argument("--max-new-tokens", type=cli.positive_int, default=128)
    p.add_argument("--beta", type=cli.positive_float, default=0.1, help="DPO beta: larger stays nearer the reference")
    p.add_argument("--reference", default="init", choices=policy.REFERENCES,
                   help="the policy at the start, or the base weights with adapters off")
    p.add_argument("--letter-every", type=cli.nonneg_int, default=1,
                   help="steps between MC letter diagnostics; 0 = never")
    p.add_argument("--eval-pairs", type=cli.nonneg_int, default=32, help="held-out (val) pairs per task, start and end")
    p.add_argument("--final-eval-examples", type=cli.nonneg_int, default=64,
                   help="val items per eval task, greedy, at the start and the end; 0 = skip")
    lora.add_lora_args(p)
    train.add_loop_args(p, num_iterations=40, device_batch_size=8, eval_every=0, save_every=0, unit="pairs",
                        entropy_every=1, warmup_steps=0, warmdown_ratio=0.0)
    optim.add_optim_args(p, optimizer="adamw", matrix_lr=3e-4, embedding_lr=1e-3, unembedding_lr=1e-4,
                         matrix_flags=("--lr", "--matrix-lr"))
    add_logging_args(p)
    return p.parse_args(argv)


def ground_truth_pairs(task, tok, split, limit, max_len):
    return dpo.pairs_from_conversations(reward_model.build_pairs(task, tok, split, limit, max_len))


def on_policy_pairs(model, tok, task, args, info, max_len):
    """(correct, wrong) sample pairs of the policy on hashed train prompts (any world size: the same pairs)."""
    model.eval()
    exs = subset(task, "train", args.on_policy_prompts, salt=f"dpo/{task.name}/{args.seed}")
    got = policy.sample_completions(model, tok, [task.prompt(ex) for ex in exs], args.samples_per_prompt,
                                    args.max_new_tokens, args.temperature, args.seed * 7919, info,
                                    lambda: autocast_ctx(info))
    pairs = []
    for ex, rows in zip(exs, got):
        prompt = tok.render_prompt({"messages": task.prompt(ex)})
        pick = dpo.on_policy_pair([ids for ids, _, _ in rows], [stopped and task.evaluate(ex, text)
                                                                for _, text, stopped in rows])
        if pick and len(prompt) + max(map(len, pick)) <= max_len:
            pairs.append({"task": task.name, "family": task.family, "id": ex["id"], "kind": "on_policy",
                          "answer": ex["answer"], "options": len(ex.get("choices") or []), "prompt": prompt,
                          "chosen": pick[0], "rejected": pick[1]})
    model.train()
    return pairs


def training_pairs(args, model, tok, tasks, mix, info):
    """(pair pools, mixture weights, task names, counts) from the init policy: the same at every start."""
    max_len = model.config.sequence_len
    pools, weights, names, counts = [], [], [], {}
    for task in tasks:
        pool = []
        if args.pairs in ("ground_truth", "both"):
            pool += ground_truth_pairs(task, tok, "train", args.max_train_examples, max_len)
        if args.pairs in ("on_policy", "both"):
            pool += on_policy_pairs(model, tok, task, args, info, max_len)
        counts[task.name] = {k: sum(p["kind"] == k for p in pool) for k in ("ground_truth", "on_policy")}
        if pool:
            pools.append(pool)
            weights.append(mix[task.name])
            names.append(task.name)
    if not pools:
        raise UserError(f"no {args.pairs} pairs for tasks {', '.join(t.name for t in tasks)} (on-policy pairs need "
                        f"a prompt the model answers both right and wrong); raise --on-policy-prompts or "
                        f"--samples-per-prompt, or use --pairs ground_truth.")
    return pools, weights, names, counts


@torch.no_grad()
def heldout_table(model, reference, held, cfg, info, seed=0):
    """{task: {"n", "accuracy": (point, lo, hi), "margin"}}: the share of held-out pairs whose
    implicit reward prefers the chosen answer (fixed chunks of 8 shared out over the ranks)."""
    def margins(chunk):
        pi_w, pi_l, ref_w, ref_l, _, _ = dpo.pair_forward(model, reference, dpo.as_triples(chunk), cfg,
                                                          model.get_device())
        return (cfg.beta * ((pi_w - ref_w) - (pi_l - ref_l))).tolist()
    out = {}
    for name, pairs in held.items():
        if not pairs:
            continue
        m = [x for part in map_over_ranks(margins, [pairs[i:i + 8] for i in range(0, len(pairs), 8)], info)
             for x in part]
        out[name] = {"n": len(m), "accuracy": bootstrap_ci([float(x > 0) for x in m], seed=seed),
                     "margin": sum(m) / len(m)}
    return out


def measure(run, when):
    """The held-out pair table and (if asked) the greedy accuracy table, printed."""
    args, info = run.args, run.info
    row = {"pairs": heldout_table(run.model, run.reference, run.held, run.cfg, info, args.seed)}
    if args.final_eval_examples > 0:
        row["accuracy"] = {t.name: stage.greedy_accuracy(run.model, run.tok, t, args.final_eval_examples, info,
                                                         args.max_new_tokens, args.seed)[0] for t in run.eval_tasks}
        run.model.train()
    for kind, table in row.items():
        print0(f"{when} {'held-out pair' if kind == 'pairs' else 'val'} accuracy: "
               + ", ".join(f"{k} {v['accuracy'][0]:.3f} [{v['accuracy'][1]:.3f}, {v['accuracy'][2]:.3f}]"
                           for k, v in table.items()))
    return row


def dpo_update(run, step):
    """One DPO step on this rank's micro-batches of the schedule; the metrics over all ranks' pairs."""
    args, info, B = run.args, run.info, run.args.device_batch_size
    done = step + 1
    firsts = [batches.first_row(step, m, run.accum, info.world_size, info.rank, B) for m in range(run.accum)]
    drawn = [[run.pools[t][i] for t, i in run.schedule[g:g + B]] for g in firsts]
    ent = probes.EntropyProbe(run.model.config.n_layer, run.model.config.n_head) \
        if train.every(args.entropy_every, done) else None
    lm = {}
    if run.letters and run.mc_names and train.every(args.letter_every, done):
        # letters/* after the chosen answers of the MC pairs, on the policy before this step moves it (a collective)
        mc = [p for mb in drawn for p in mb if get_task(p["task"]).kind == "mc"]
        lm = letters.finish(letters.letter_sums(
            run.model, run.reference, [p["prompt"] for p in mc], [p["chosen"] for p in mc],
            [(r, p["task"], p["answer"], p["options"]) for r, p in enumerate(mc)], run.mc_names, run.letters,
            run.stop_ids, run.cfg), run.mc_names)
    s = dpo.dpo_step(run.model, run.optimizer, [dpo.as_triples(mb) for mb in drawn], run.cfg, run.reference,
                     run.total_batch, run.params, ent)
    keys = sorted(s)
    sums = dict(zip(keys, all_reduce_sum([s[k] for k in keys])))
    metrics = dpo.summarize(sums)
    metrics["grad_norm"] = sums["grad_norm"] / info.world_size  # the same (synced) number on every rank
    metrics["train/lr_mult"] = run.optimizer.param_groups[0]["lr"] / run.optimizer.param_groups[0]["initial_lr"]
    if ent is not None:
        metrics.update(train.attention_entropy_metrics(ent.all_reduce()))
    return metrics | lm


def main(argv=None):
    args = parse_args(argv)
    if args.compile:
        raise UserError("--compile is not supported by dpo_train (the gathered-logit forward runs eagerly); "
                        "drop the flag.")
    out, info = stage.start(args, "dpo", {"--init": args.init})
    mix, tasks, sources, model, tok, init_ckpt, base_ckpt = stage.load(args, info)
    reference = policy.make_reference(model, args.reference)  # before any resume moves the policy
    cfg = dpo.DPOConfig(beta=args.beta, micro_batch=args.device_batch_size, grad_clip=args.grad_clip,
                        autocast=lambda: autocast_ctx(info))
    pools, weights, names, counts = training_pairs(args, model, tok, tasks, mix, info)
    held = {t.name: ground_truth_pairs(t, tok, "val", args.eval_pairs, model.config.sequence_len)
            for t in tasks} if args.eval_pairs > 0 else {}
    total_batch, accum = train.batch_geometry(args, info)
    schedule = batches.mixture_schedule([len(p) for p in pools], weights, args.num_iterations * total_batch, args.seed)
    letter_ids, mc_names = stage.letter_setup(tok, [t for t in tasks if t.name in names], args.letter_every)
    optimizer = optim.optimizer_from_args(model, args)
    run = argparse.Namespace(args=args, info=info, eval_tasks=stage.eval_tasks(args.eval_tasks), model=model, tok=tok,
                             reference=reference, cfg=cfg, pools=pools, held=held, schedule=schedule,
                             total_batch=total_batch, accum=accum, optimizer=optimizer, letters=letter_ids,
                             mc_names=mc_names, params=stage.trainable(model), stop_ids=stage.stop_ids(tok))
    n = args.num_iterations
    mode = {"init": os.path.abspath(init_ckpt), "full": args.full, "seed": args.seed, "tasks": args.tasks,
            "pairs": args.pairs, "total_batch": total_batch}
    start_step = train.resume(args, out, model, optimizer, info, expect=mode)["step"]
    logger = from_args(args, out_dir=out, config={
        **vars(args), "model": vars(model.config), "world_size": info.world_size, "pairs_per_task": counts,
        "data_sources": sources, "init_checkpoint": os.path.abspath(init_ckpt)})
    mean_len = sum(len(p["prompt"]) * 2 + len(p["chosen"]) + len(p["rejected"]) for pool in pools
                   for p in pool) / sum(len(pool) for pool in pools)
    train.print_plan("DPO", info, model, n, total_batch, "pairs",
                     f"{args.device_batch_size} x {info.world_size} proc x {accum} accum",
                     tokens_per_step=total_batch * mean_len,
                     extra=f"{'full' if args.full else 'LoRA'} from {init_ckpt}; beta={args.beta}; {args.pairs} pairs "
                           + ", ".join(f"{k}={v['ground_truth']}+{v['on_policy']}" for k, v in counts.items()))
    save = stage.saver(out, model, optimizer, info, {**mode, "stage": "dpo", "num_iterations": n}, base_ckpt, tok, args)
    report = {"init": os.path.abspath(init_ckpt), "args": vars(args), "steps": n, "pairs": counts}
    if start_step == 0:
        report["start"] = measure(run, "start")
    stage.step_loop(args, info, optimizer, start_step, lambda step: dpo_update(run, step), logger, save,
                    finite=lambda m: {"loss": m["loss"], "grad_norm": m["grad_norm"]},
                    postfix=lambda m: {"loss": f"{m['loss']:.3f}", "acc": f"{m['rewards/accuracy']:.2f}",
                                       "margin": f"{m['rewards/margin']:.3f}"})
    report["final"] = measure(run, "final")
    logger.summary({f"final/{kind}/{k}": v["accuracy"][0] for kind, t in report["final"].items() for k, v in t.items()})
    save(n)
    stage.finish(info, logger, out, "dpo_eval.json", report, f"done: checkpoint and dpo_eval.json in {out}")


if __name__ == "__main__":
    cli.run_main(main)
