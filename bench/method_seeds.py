"""SFT -> STaR, SFT -> DPO and SFT -> GRPO side by side over seeds (issue 19's comparison): one run
of scripts.<method>_train per (method, seed) from the same --init, then ONE scripts.eval of the
SFT checkpoint and every run's final model on the same held-out items, and per task and metric
(greedy letter accuracy; for multiple choice also cloze accuracy, nanostoney/cloze.py) the paired
change (method - SFT, and between methods) on those items: the mean over seeds of each item's
change, a 95% bootstrap interval over items and a sign-flip permutation p, Holm-corrected over
every comparison of the table.

    python -m bench.method_seeds --init out/sft --out out/methods --tasks stoney_mc arith_mc \\
        --star "--rounds 2" --dpo "--pairs both" --grpo "--num-iterations 40"

--star / --dpo / --grpo: extra flags of that method's runs (one string each); --tasks are both
the training mixture and the evaluated tasks (--eval-split, --max-examples items each). A run
whose checkpoint exists is not redone (an unfinished one is run again over its directory).
Writes summary.md and summary.json in --out.
"""
import json
import os
import shlex
import subprocess
import sys

import numpy as np

from nanostoney import cli
from nanostoney.cli import run_main
from nanostoney.errors import UserError
from nanostoney.files import write_json, write_text
from nanostoney.metrics import holm, mean_difference

METHODS = ("star", "dpo", "grpo")


def run(cmd, log, env):
    print(f"{' '.join(cmd[1:])} (log in {log})", flush=True)
    with open(log, "w") as f:
        code = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT, env=env).returncode
    if code != 0:
        raise UserError(f"{cmd[2]} failed with exit code {code}; see {log}.")


def train_all(args, env):
    """{name "method_seed": its output directory}, training what is missing one run at a time."""
    outs = {}
    for method in args.methods:
        for seed in args.seeds:
            out = os.path.join(args.out, f"{method}_seed{seed}")
            outs[f"{method}_{seed}"] = out
            if os.path.isfile(os.path.join(out, "latest")):
                continue
            os.makedirs(os.path.join(args.out, "logs"), exist_ok=True)  # beside the run's folder: that is the stage's
            cmd = [sys.executable, "-m", f"scripts.{method}_train", "--init", args.init, "--out", out, "--seed",
                   str(seed), "--overwrite", "--tasks", ",".join(args.tasks), "--wandb", "disabled",
                   *shlex.split(getattr(args, method) or "")]
            run(cmd, os.path.join(args.out, "logs", f"{method}_seed{seed}.log"), env)
    return outs


def evaluate_all(args, outs, env):
    """scripts.eval of the SFT init and every run on the same items; returns its results JSON."""
    path = os.path.join(args.out, "eval.json")
    cmd = [sys.executable, "-m", "scripts.eval", "--checkpoints", f"sft={args.init}",
           *[f"{name}={out}" for name, out in outs.items()], "--tasks", *args.tasks, "--split", args.eval_split,
           "--max-examples", str(args.max_examples), "--num-samples", "0", "--no-mauve", "--no-comet",
           "--max-new-tokens", str(args.max_new_tokens), "--wandb", "disabled", "--out", path, "--overwrite"]
    run(cmd, os.path.join(args.out, "eval.log"), env)
    with open(path) as f:
        return json.load(f)


METRICS = {"correct": "greedy", "cloze": "cloze"}  # per_example key -> the table's name


def correct(results, name, task, key="correct"):
    ex = results["checkpoints"][name]["tasks"][task]["per_example"]
    return ex["id"], np.array(ex[key], dtype=float)


def seed_mean(results, method, seeds, task, key):
    """Per item, the mean over seeds of the method's 0/1 correctness (the same items for each)."""
    ids, first = correct(results, f"{method}_{seeds[0]}", task, key)
    rows = [first] + [correct(results, f"{method}_{s}", task, key)[1] for s in seeds[1:]]
    return ids, np.mean(rows, axis=0)


def comparisons(results, methods, seeds, tasks):
    """[{task, metric, a, b, acc_a, acc_b, diff, lo, hi, p, p_holm}]: every method vs SFT and every
    pair of methods, paired over the task's items, per metric; Holm over the whole list."""
    out = []
    for task in tasks:
        for key, metric in METRICS.items():
            if key not in results["checkpoints"]["sft"]["tasks"][task]["per_example"]:
                continue  # (cloze: multiple-choice tasks only)
            ids, sft = correct(results, "sft", task, key)
            means = {"sft": sft}
            for m in methods:
                m_ids, means[m] = seed_mean(results, m, seeds, task, key)
                if m_ids != ids:
                    raise UserError(f"{m} and sft were evaluated on different {task} items; rerun the evaluation.")
            pairs = [(m, "sft") for m in methods] + [(a, b) for i, a in enumerate(methods) for b in methods[i + 1:]]
            for a, b in pairs:
                d = mean_difference(means[a], means[b], paired=True, seed=0)
                out.append({"task": task, "metric": metric, "a": a, "b": b, "n": len(ids),
                            "acc_a": float(means[a].mean()), "acc_b": float(means[b].mean()),
                            **{k: d[k] for k in ("diff", "lo", "hi", "p")}})
    for row, p in zip(out, holm([r["p"] for r in out])):
        row["p_holm"] = p
    return out


def table(rows, args):
    lines = [f"From {args.init}; seeds {', '.join(map(str, args.seeds))}; {args.eval_split} items, greedy letters "
             f"and cloze; each method's per-item accuracy is its mean over the seeds. Paired differences with 95% "
             f"bootstrap intervals over items; p by sign flips, Holm-corrected over the {len(rows)} comparisons.", "",
             "| task | metric | comparison | n | accuracy a | accuracy b | a - b [95% CI] | p (Holm) |", "|---" * 8 + "|"]
    for r in rows:
        lines.append(f"| {r['task']} | {r['metric']} | {r['a']} - {r['b']} | {r['n']} | {r['acc_a']:.3f} | {r['acc_b']:.3f} | "
                     f"{r['diff']:+.3f} [{r['lo']:+.3f}, {r['hi']:+.3f}] | {r['p_holm']:.3g} |")
    return "\n".join(lines) + "\n"


def main():
    p = cli.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--init", required=True, help="the SFT checkpoint every run starts from")
    p.add_argument("--out", default="out/method_seeds")
    p.add_argument("--methods", nargs="+", choices=METHODS, default=list(METHODS))
    p.add_argument("--seeds", type=cli.nonneg_int, nargs="+", default=[0, 1, 2])
    p.add_argument("--tasks", nargs="+", default=["stoney_mc", "arith_mc"], help="trained on and evaluated")
    p.add_argument("--eval-split", default="val", choices=["val", "test"])
    p.add_argument("--max-examples", type=cli.positive_int, default=100, help="held-out items per task")
    p.add_argument("--max-new-tokens", type=cli.positive_int, default=128)
    for m in METHODS:
        p.add_argument(f"--{m}", default="", help=f"extra flags of every scripts.{m}_train run (one quoted string)")
    p.add_argument("--threads", type=cli.positive_int, default=2, help="OMP_NUM_THREADS per run")
    args = p.parse_args()
    if not os.path.exists(args.init):
        raise UserError(f"--init {args.init} does not exist; train an SFT checkpoint first (python -m scripts.sft_train).")
    cli.claim_out(args.out, training=False, own=("*_seed*", "eval.json", "eval.log", "summary.*"))
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads), "WANDB_MODE": "disabled"}
    results = evaluate_all(args, train_all(args, env), env)
    rows = comparisons(results, args.methods, args.seeds, args.tasks)
    text = table(rows, args)
    print(text)
    write_text(os.path.join(args.out, "summary.md"), text)
    write_json(os.path.join(args.out, "summary.json"), {"init": args.init, "seeds": args.seeds, "rows": rows})


if __name__ == "__main__":
    run_main(main)
