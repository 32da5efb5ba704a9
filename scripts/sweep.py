"""Run a W&B sweep's grid locally: one subprocess per point, W&B offline, a results table.

    python -m scripts.sweep                                   # sweep.yaml, out/sweep
    python -m scripts.sweep --config sweep.yaml --out out/sweep -- --num-iterations 40 --eval-every 0

Runs `program` of the sweep.yaml `wandb sweep` takes (method grid) once per point, with --name=value
flags as a W&B agent would plus whatever follows `--`, into <out>/<point>/; then <out>/results.json
and results.md (each sft_eval.json's val loss and accuracies). Exit 1 when every point failed.
"""
import itertools
import os
import subprocess
import sys
import time

import yaml

from nanostoney import cli
from nanostoney.errors import RunFailed, UserError
from nanostoney.files import read_json, write_json, write_text

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def load_sweep(path):
    if not os.path.isfile(path):
        raise UserError(f"sweep config {path} does not exist; pass --config (e.g. sweep.yaml).")
    try:
        with open(path, encoding="utf-8") as f:
            cfg = yaml.safe_load(f)
    except UnicodeDecodeError:
        raise UserError(f"{path} is not UTF-8 text; save it as UTF-8.") from None
    except Exception as e:
        raise UserError(f"{path} is not valid YAML ({type(e).__name__}); fix the file.") from None
    if not isinstance(cfg, dict) or "program" not in cfg or not isinstance(cfg.get("parameters"), dict):
        raise UserError(f"{path} needs `program:` and a `parameters:` mapping (W&B sweep format).")
    program = cfg["program"]
    if not isinstance(program, str) or os.path.dirname(os.path.normpath(program)) != "scripts" or \
            not program.endswith(".py") or not os.path.isfile(os.path.join(ROOT, program)):
        raise UserError(f"{path}: program {program!r} is not one of the training scripts; name one as "
                        f"scripts/NAME.py (e.g. scripts/sft_train.py).")
    if cfg.get("method", "grid") != "grid":
        raise UserError(f"{path}: method {cfg['method']!r}; the local runner does grids only "
                        f"(use `wandb agent` for random/bayes).")
    return cfg


def grid_points(parameters):
    """([{name: value}] over the product of every `values` list, fixed `value`s added; the axis names)."""
    for name, spec in parameters.items():
        if not isinstance(spec, dict) or not ("values" in spec or "value" in spec) or \
                "values" in spec and not isinstance(spec["values"], list):
            raise UserError(f"sweep parameter {name!r} needs `values: [...]` (a list) or `value: x`.")
    axes = {name: spec["values"] for name, spec in parameters.items() if "values" in spec}
    fixed = {name: spec["value"] for name, spec in parameters.items() if "values" not in spec}
    empty = [n for n, values in axes.items() if not values]
    if empty:
        raise UserError(f"sweep parameter {empty[0]!r} has an empty `values` list, so the grid has no point; "
                        f"give it at least one value.")
    return [{**dict(zip(axes, combo)), **fixed} for combo in itertools.product(*axes.values())], list(axes)


def point_name(point, axes):
    return "_".join(f"{n.replace('-', '')}{point[n]}" for n in axes) or "point"


def read_result(out_dir):
    """Final numbers of one point from its sft_eval.json ({} where a run wrote none)."""
    path = os.path.join(out_dir, "sft_eval.json")
    if not os.path.isfile(path):
        return {}
    rep = read_json(path)
    return {"val_loss": rep.get("val_loss"), **{f"{task}/{split}": r["accuracy"]
                                               for task, splits in rep.get("tasks", {}).items()
                                               for split, r in splits.items()}}


def write_table(out, rows, axes, goal_key):
    cols = sorted({k for r in rows for k in r["result"]} - {"val_loss"})
    lines = ["| " + " | ".join(axes + ["val loss"] + cols + ["status", "s"]) + " |",
             "|" + "---|" * (len(axes) + len(cols) + 3)]
    fmt = lambda v: "" if v is None else f"{v:.4f}" if isinstance(v, float) else str(v)  # noqa: E731
    for r in rows:
        lines.append("| " + " | ".join([str(r["params"][a]) for a in axes] + [fmt(r["result"].get("val_loss"))]
                                      + [fmt(r["result"].get(c)) for c in cols] + [r["status"], f"{r['seconds']:.0f}"])
                     + " |")
    done = [r for r in rows if r["result"].get("val_loss") is not None]
    if done:
        best = min(done, key=lambda r: r["result"]["val_loss"])
        lines += ["", f"best {goal_key}: " + ", ".join(f"{a}={best['params'][a]}" for a in axes)
                  + f" (val loss {best['result']['val_loss']:.4f})"]
    write_text(os.path.join(out, "results.md"), "\n".join(lines) + "\n")
    return "\n".join(lines)


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    i = argv.index("--") if "--" in argv else len(argv)
    argv, extra = argv[:i], argv[i + 1:]
    p = cli.ArgumentParser(description="Run a W&B sweep grid locally (offline) and tabulate it.")
    p.add_argument("--config", default=os.path.join(ROOT, "sweep.yaml"))
    p.add_argument("--out", type=cli.out_path, default="out/sweep")
    p.add_argument("--overwrite", action="store_true",
                   help="rerun into an --out holding an earlier sweep (each point is passed --overwrite)")
    p.add_argument("--wandb", default="offline", choices=["offline", "disabled"], help="W&B mode of each point")
    p.add_argument("--dry-run", action="store_true", help="print the commands only")
    args = p.parse_args(argv)
    cfg = load_sweep(args.config)
    points, axes = grid_points(cfg["parameters"])
    module = os.path.splitext(os.path.normpath(cfg["program"]))[0].replace(os.sep, ".")  # scripts.sft_train
    goal_key = (cfg.get("metric") or {}).get("name", "val/loss")
    if not args.dry_run:
        cli.claim_out(args.out, overwrite=args.overwrite, training=False, finished=("results.json",),
                      own=("results.json", "results.md", "*.log", *(point_name(pt, axes) for pt in points))
                      + cli.SHARED_FILES)
        if args.overwrite:
            extra = extra + ["--overwrite"]
    rows = []
    for point in points:
        name = point_name(point, axes)
        out_dir = os.path.join(args.out, name)
        cmd = [sys.executable, "-m", module] + [f"--{k}={v}" for k, v in point.items()] + extra + \
              ["--wandb", args.wandb, "--run-name", name, "--out", out_dir]
        print(" ".join(cmd), flush=True)
        if args.dry_run:
            continue
        t0 = time.time()
        r = subprocess.run(cmd, capture_output=True, text=True)
        err = [ln for ln in r.stderr.strip().splitlines() if ln.startswith("error:")]
        status = "ok" if r.returncode == 0 else (err[-1] if err else f"exit {r.returncode}")
        rows.append({"name": name, "params": point, "status": status, "seconds": time.time() - t0,
                     "result": read_result(out_dir) if r.returncode == 0 else {}})
        print(f"  -> {status}: {rows[-1]['result']}", flush=True)
        write_text(os.path.join(out_dir if os.path.isdir(out_dir) else args.out, f"{name}.log"),
                   r.stdout + "\n--- stderr ---\n" + r.stderr)
    if args.dry_run:
        return
    write_json(os.path.join(args.out, "results.json"), {"config": os.path.abspath(args.config), "extra_args": extra,
                                                        "metric": goal_key, "points": rows})
    print(write_table(args.out, rows, axes, goal_key))
    print(f"results in {os.path.join(args.out, 'results.md')} and results.json")
    failed = [r for r in rows if r["status"] != "ok"]
    if failed and len(failed) == len(rows):
        raise RunFailed(f"every point of the sweep failed (the first: {failed[0]['status']}); see the logs in "
                        f"{args.out}.")
    if failed:
        print(f"note: {len(failed)} of {len(rows)} points failed; see results.md.", file=sys.stderr)


if __name__ == "__main__":
    cli.run_main(main)
