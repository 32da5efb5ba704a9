"""The reasoning report over training seeds: which of its claims hold in every seed?

    python -m bench.report_seeds --seeds 3 --out out/seeds                 # 3 CPU speedruns, end to end
    python -m bench.report_seeds --seeds 2 --out out/seeds_tiny -- --size tiny

Trains --seeds runs end to end (run_stoney_small.sh with SEED=s and --out OUT/seed_s; arguments
after `--` go to it; a finished stage is not rerun, so an interrupted bench continues), then reads
each run's report (OUT/seed_s/report/metrics.json) and tabulates every claim per seed and pooled:
- each declared headline test (nanostoney.interp.definitions.HEADLINES) of the last checkpoint, by test id;
- each patched site of each declared patching group (patching.summary) of the last checkpoint.
A claim holds in every seed when it is significant (passes its correction) in every seed with the
same sign. Pooled: the mean of the per-seed effects and their range (the seeds are the unit: an
item bootstrap within one run says nothing about another training run). Writes OUT/seeds.json,
OUT/summary.md, and OUT/report/ (the first seed's report, its first screen saying which claims
hold in every seed).
"""
import argparse
import json
import os
import subprocess
import sys

import numpy as np

from nanostoney import cli
from nanostoney.cli import run_main
from nanostoney.errors import UserError
from nanostoney.interp import render

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def parse_args(argv=None):
    argv = list(sys.argv[1:] if argv is None else argv)
    extra = argv[argv.index("--") + 1:] if "--" in argv else []
    argv = argv[:argv.index("--")] if "--" in argv else argv
    p = argparse.ArgumentParser(description="Train N seeds end to end; which report claims hold in every seed.")
    p.add_argument("--seeds", type=cli.positive_int, default=3, help="training seeds 0..N-1")
    p.add_argument("--out", default="out/seeds", help="OUT/seed_s per seed, then seeds.json, summary.md, report/")
    p.add_argument("--no-train", action="store_true", help="only tabulate the runs already in --out")
    return p.parse_args(argv), extra


def train(seed, out, extra):
    """One end-to-end run (run_stoney_small.sh skips the stages it finished before)."""
    env = {**os.environ, "SEED": str(seed)}
    cmd = ["bash", os.path.join(REPO, "run_stoney_small.sh"), "--out", out] + extra
    print(f"seed {seed}: SEED={seed} {' '.join(cmd)}", flush=True)
    r = subprocess.run(cmd, env=env, cwd=REPO)
    if r.returncode != 0:
        raise UserError(f"the run of seed {seed} failed (exit {r.returncode}); its logs are in {out}/logs, and "
                        f"rerunning this command continues it.")


def load_report(out):
    path = os.path.join(out, "report", "metrics.json")
    if not os.path.isfile(path):
        raise UserError(f"{path} does not exist; train that seed first (drop --no-train).")
    with open(path) as f:
        return json.load(f)


def claims_of(metrics):
    """{claim: (effect, holds)} of the last checkpoint of one report: its headline tests and the
    patched sites of its declared patching groups."""
    last = list(metrics["checkpoints"])[-1]
    out = {}
    for t in metrics["headline"]["tests"]:
        if t["checkpoint"] == last:
            name = t["kind"] + "".join(f" {t[k]}" for k in ("family", "layer") if t.get(k) is not None)
            out[name] = (t["diff"], bool(t["significant"]))
    pat = metrics["checkpoints"][last].get("patching") or {}
    for g in pat.get("declared", []):
        for r in pat["groups"][g]["sites"]:
            out[f"patch {g} {r['site']}"] = (r["mean"], bool(r["passes"]))
    return out


def pool(per_seed):
    """{claim: {"per_seed", "holds", "pooled", "lo", "hi", "every_seed"}} over the seeds' claims;
    a claim missing in a seed (too few items there) does not hold in every seed."""
    names = sorted({c for claims in per_seed for c in claims})
    out = {}
    for name in names:
        got = [claims.get(name) for claims in per_seed]
        effects = [g[0] for g in got if g is not None and g[0] is not None]
        signs = {np.sign(g[0]) for g in got if g is not None and g[0] is not None}
        every = all(g is not None and g[1] for g in got) and len(signs) == 1
        out[name] = {"per_seed": [None if g is None else {"effect": g[0], "holds": g[1]} for g in got],
                     "pooled": float(np.mean(effects)) if effects else None,
                     "lo": float(min(effects)) if effects else None, "hi": float(max(effects)) if effects else None,
                     "every_seed": bool(every)}
    return out


def summary_md(claims, n_seeds):
    lines = [f"# Report claims over {n_seeds} training seeds", "",
             "| claim | " + " | ".join(f"seed {s}" for s in range(n_seeds)) + " | pooled mean [range] | every seed |",
             "|---" * (n_seeds + 3) + "|"]
    for name, c in claims.items():
        cells = ["—" if s is None else f"{s['effect']:+.3g}{' ✓' if s['holds'] else ''}" for s in c["per_seed"]]
        pooled = "—" if c["pooled"] is None else f"{c['pooled']:+.3g} [{c['lo']:+.3g}, {c['hi']:+.3g}]"
        lines.append(f"| {name} | " + " | ".join(cells) + f" | {pooled} | {'yes' if c['every_seed'] else 'no'} |")
    lines += ["", "✓: significant after the report's own correction in that seed."]
    return "\n".join(lines) + "\n"


def main(argv=None):
    args, extra = parse_args(argv)
    outs = [os.path.join(args.out, f"seed_{s}") for s in range(args.seeds)]
    if not args.no_train:
        for s, out in enumerate(outs):
            train(s, out, extra)
    reports = [load_report(out) for out in outs]
    claims = pool([claims_of(m) for m in reports])
    seeds = {"n_seeds": args.seeds, "runs": outs, "claims": claims}
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "seeds.json"), "w") as f:
        json.dump(render.clean_json(seeds), f, indent=1)
    with open(os.path.join(args.out, "summary.md"), "w") as f:
        f.write(summary_md(claims, args.seeds))
    first = dict(reports[0], seeds=seeds)
    render.write_report(os.path.join(args.out, "report"), first)
    held = [c for c, v in claims.items() if v["every_seed"]]
    print(f"{len(held)} of {len(claims)} claims hold in every one of {args.seeds} seeds; "
          f"{os.path.join(args.out, 'summary.md')}, report in {os.path.join(args.out, 'report', 'index.html')}")
    return seeds


if __name__ == "__main__":
    run_main(main)
