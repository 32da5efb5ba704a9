"""GRPO from one SFT checkpoint over several seeds: does RL raise the reward on its own training
prompts, and what does it do to held-out accuracy? Runs scripts.grpo_train once per seed and
tabulates each run's grpo_eval.json (issue 6's three-seed figure). The held-out change is paired:
every seed scores the same val items at the start (the SFT model) and the end, so the interval is
a bootstrap over items of (GRPO correct - SFT correct), per seed and pooled over the seeds (each
item's change averaged over the seeds, then resampled).

    python -m bench.grpo_seeds --init out/sft --out out/grpo_seeds -- --num-iterations 40

Arguments after `--` go to every scripts.grpo_train run. A seed whose grpo_eval.json already exists is
not rerun. Writes summary.md and summary.json in --out.
"""
import json
import os
import statistics
import subprocess
import sys

from nanostoney import cli
from nanostoney.cli import run_main
from nanostoney.errors import UserError


def run_seeds(args, extra):
    """Start every missing seed, at most --jobs at a time; return {seed: grpo_eval.json dict}."""
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads), "WANDB_MODE": "disabled"}
    pending, running = list(args.seeds), []
    while pending or running:
        while pending and len(running) < args.jobs:
            seed = pending.pop(0)
            out = os.path.join(args.out, f"seed_{seed}")
            if os.path.exists(os.path.join(out, "grpo_eval.json")):
                continue
            os.makedirs(os.path.join(args.out, "logs"), exist_ok=True)  # beside the run's folder: that is the stage's
            cmd = [sys.executable, "-m", "scripts.grpo_train", "--init", args.init,  # an unfinished seed again
                   "--out", out, "--seed", str(seed), "--overwrite"] + extra
            log_path = os.path.join(args.out, "logs", f"seed_{seed}.log")
            log = open(log_path, "w")
            print(f"seed {seed}: {' '.join(cmd[1:])} (log in {log_path})", flush=True)
            running.append((seed, subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env), log))
        if not running:
            break
        seed, proc, log = running.pop(0)
        code = proc.wait()
        log.close()
        if code != 0:
            raise UserError(f"seed {seed} failed with exit code {code}; see {args.out}/logs/seed_{seed}.log.")
    results = {}
    for seed in args.seeds:
        with open(os.path.join(args.out, f"seed_{seed}", "grpo_eval.json")) as f:
            results[seed] = json.load(f)
    return results


def spread(values):
    mean = statistics.fmean(values)
    sd = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{mean:.3f} ± {sd:.3f}"


def paired_change(results, task, seeds):
    """{seed or "pooled": (mean change, lo, hi)}: per-item greedy correctness at the end minus at
    the start on the same val items, bootstrapped over items."""
    from nanostoney.metrics import bootstrap_ci
    diffs = {}
    for s in seeds:
        start, final = results[s]["start"][task]["items"], results[s]["final"][task]["items"]
        if start["id"] != final["id"]:
            raise UserError(f"seed {s}: start and final evaluated different {task} items; rerun that seed.")
        diffs[s] = [b - a for a, b in zip(start["correct"], final["correct"])]
    out = {s: bootstrap_ci(d) for s, d in diffs.items()}
    out["pooled"] = bootstrap_ci([sum(d[i] for d in diffs.values()) / len(diffs) for i in range(len(diffs[seeds[0]]))])
    return out


def summarize(results):
    """Markdown: training-prompt reward (start -> final) and held-out pass@1 (SFT -> GRPO) per task."""
    seeds = sorted(results)
    first = results[seeds[0]]
    lines = [f"GRPO from {first['init']}, {first['steps']} steps, seeds {', '.join(map(str, seeds))}."]
    if first.get("train_reward_start"):  # absent with --probe-prompts 0
        lines += ["", "Mean reward on the fixed training prompts (G samples each, same seed before and after):", "",
                  "| task | " + " | ".join(f"seed {s}: start → final" for s in seeds) + " | change, mean ± sd |",
                  "|---" * (len(seeds) + 2) + "|"]
    for task in first.get("train_reward_start", {}):
        pairs = [(results[s]["train_reward_start"][task], results[s]["train_reward_final"][task]) for s in seeds]
        lines.append(f"| {task} | " + " | ".join(f"{a:.3f} → {b:.3f}" for a, b in pairs)
                     + f" | {spread([b - a for a, b in pairs])} |")
    n = next(iter(first.get("final", {}).values()), {}).get("n", 0)
    lines += ["", f"Held-out (val) greedy pass@1, n = {n} per task; SFT is the same checkpoint for every seed:", "",
              "| task | SFT | " + " | ".join(f"GRPO seed {s}" for s in seeds) + " | GRPO mean ± sd |",
              "|---" * (len(seeds) + 3) + "|"]
    for task in first.get("final", {}):
        sft = first["start"][task]["pass@1"]
        grpo = [results[s]["final"][task]["pass@1"] for s in seeds]
        lines.append(f"| {task} | {sft[0]:.3f} [{sft[1]:.3f}, {sft[2]:.3f}] | "
                     + " | ".join(f"{g[0]:.3f} [{g[1]:.3f}, {g[2]:.3f}]" for g in grpo)
                     + f" | {spread([g[0] for g in grpo])} |")
    paired = [t for t in first.get("final", {}) if "items" in first["final"][t]]
    if paired:
        lines += ["", "Paired change of held-out pass@1, GRPO - SFT on the same items (95% bootstrap over items):", "",
                  "| task | " + " | ".join(f"seed {s}" for s in seeds) + " | pooled over seeds |",
                  "|---" * (len(seeds) + 2) + "|"]
        for task in paired:
            ch = paired_change(results, task, seeds)
            lines.append(f"| {task} | " + " | ".join(f"{ch[s][0]:+.3f} [{ch[s][1]:+.3f}, {ch[s][2]:+.3f}]"
                                                   for s in seeds + ["pooled"]) + " |")
    return "\n".join(lines) + "\n"


def main():
    argv = sys.argv[1:]
    extra = argv[argv.index("--") + 1:] if "--" in argv else []
    argv = argv[:argv.index("--")] if "--" in argv else argv
    p = cli.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--init", required=True, help="the SFT checkpoint every seed starts from")
    p.add_argument("--out", default="out/grpo_seeds")
    p.add_argument("--seeds", type=cli.nonneg_int, nargs="+", default=[0, 1, 2])
    p.add_argument("--jobs", type=cli.positive_int, default=1, help="runs at once (2 single-thread jobs suit 2 cores)")
    p.add_argument("--threads", type=cli.positive_int, default=1, help="OMP_NUM_THREADS per run")
    args = p.parse_args(argv)
    if not os.path.exists(args.init):
        raise UserError(f"--init {args.init} does not exist; train an SFT checkpoint first (python -m scripts.sft_train).")
    results = run_seeds(args, extra)
    table = summarize(results)
    print(table)
    for name, text in (("summary.md", table), ("summary.json", json.dumps(
            {str(s): {k: r.get(k) for k in ("train_reward_start", "train_reward_final", "start", "final")}
             for s, r in results.items()}, indent=2))):
        tmp = os.path.join(args.out, name + ".tmp")
        with open(tmp, "w") as f:
            f.write(text)
        os.replace(tmp, os.path.join(args.out, name))


if __name__ == "__main__":
    run_main(main)
