"""Compare how checkpoints reason over Stoney Nakoda and over math: the interpretability report.

    python -m scripts.compare_reasoning --checkpoints base=out/base sft=out/sft grpo=out/grpo \
        --max-examples 16 --out out/report
    python -m scripts.compare_reasoning --checkpoints nanochat=~/.cache/nanochat/base_checkpoints/d20 \
        --tokenizer ~/.cache/nanochat/tokenizer --device cuda --max-examples 200

Checkpoints: our run/step dirs, LoRA adapter dirs, nanochat or transformers NanoChat dirs,
hf:OWNER/NAME (anything nanostoney.checkpoint.load_model takes). Tasks: default stoney_mc +
stoney_lexicon (family "stoney") vs aqua_mc + gsm8k_mc (family "math"); up to --max-examples
examples of each task from each split (a seeded sample, the same for every checkpoint). Writes
<out>/index.html (opens offline), <out>/figures/*.png and <out>/metrics.json (every number and
the configuration); the directory appears complete or not at all. With --wandb the figures and
tables go to W&B too.
The definitions of the statistics are in nanostoney/interp.py (DEFINITIONS) and in the report.
"""
import argparse
import os
import sys
import time

import torch
from tqdm import tqdm

from nanostoney import interp, published, report
from nanostoney.checkpoint import git_commit, load_model
from nanostoney.errors import UserError, run_main
from nanostoney.logging import MODES, Logger
from nanostoney.tasks import get_task
from nanostoney.tokenizer import Tokenizer

DEFAULT_TASKS = ("stoney_mc", "stoney_lexicon", "aqua_mc", "gsm8k_mc")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description="Interpretability report: Stoney Nakoda vs math reasoning.")
    p.add_argument("--checkpoints", nargs="+", required=True, metavar="NAME=PATH",
                   help="checkpoints to compare, in order (e.g. base=out/base sft=out/sft grpo=out/grpo)")
    p.add_argument("--tasks", nargs="+", default=list(DEFAULT_TASKS))
    p.add_argument("--max-examples", type=int, default=16, help="examples per task and split")
    p.add_argument("--out", default="out/report", help="report directory (replaced atomically)")
    p.add_argument("--tokenizer", default=None,
                   help="tokenizer dir for checkpoints that carry none (default: the base checkpoint's, if named)")
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    p.add_argument("--max-len", type=int, default=None,
                   help="skip prompts longer than this many tokens (default: each model's sequence_len)")
    p.add_argument("--rationale", default="gold", choices=("gold", "empty"),
                   help="context before the answer: the gold rationale, or an empty <think></think>")
    p.add_argument("--top-k", type=int, default=5, help="heads ablated together per family")
    p.add_argument("--random-sets", type=int, default=3, help="random k-head sets (control)")
    p.add_argument("--induction-seqs", type=int, default=16)
    p.add_argument("--induction-len", type=int, default=32, help="length of the repeated random block")
    p.add_argument("--figure-examples", type=int, default=1, help="example prompts drawn per family")
    p.add_argument("--delta", nargs="*", default=None, metavar="NEW:OLD",
                   help="paired comparisons to draw (default: grpo:sft when both names are given)")
    p.add_argument("--n-boot", type=int, default=1000)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--source", default="bundled", help="task data source (see nanostoney.tasks.get_task)")
    p.add_argument("--wandb", nargs="?", const="auto", default="disabled", choices=MODES,
                   help="log figures and tables to W&B (bare --wandb = auto)")
    p.add_argument("--wandb-project", default=None)
    p.add_argument("--wandb-entity", default=None)
    p.add_argument("--run-name", default=None)
    p.add_argument("--threads", type=int, default=None,
                   help="torch CPU threads (default: torch's own; 1 is fastest on a shared, busy machine)")
    p.add_argument("--no-progress", action="store_true")
    return p.parse_args(argv)


def parse_checkpoints(specs):
    out = {}
    for spec in specs:
        name, sep, path = spec.partition("=")
        if not sep:
            name, path = os.path.basename(os.path.normpath(spec)), spec
        if not name or not path:
            raise UserError(f"--checkpoints entry {spec!r} is malformed; write NAME=PATH.")
        if name in out:
            raise UserError(f"checkpoint name {name!r} is given twice; give each checkpoint its own name.")
        path = published.resolve(os.path.expanduser(path))  # hf:OWNER/NAME -> its local copy
        if not os.path.exists(path):
            raise UserError(f"checkpoint {name} = {path} does not exist; check the path.")
        out[name] = path
    return out


def parse_deltas(specs, names):
    if specs is None:
        low = {n.lower(): n for n in names}
        new = next((n for k, n in low.items() if "grpo" in k), None)
        old = next((n for k, n in low.items() if "sft" in k), None)
        return [(new, old)] if new and old else []
    out = []
    for s in specs:
        new, sep, old = s.partition(":")
        if not sep or new not in names or old not in names:
            raise UserError(f"--delta {s!r} must be NEW:OLD with both names among --checkpoints ({', '.join(names)}).")
        out.append((new, old))
    return out


def base_tokenizer(meta):
    """The tokenizer of the checkpoint this one was fine-tuned from, when it carries none itself."""
    inner = meta.get("base") or {}  # LoRA adapters: the meta of the checkpoint they sit on
    for base in (meta.get("base_checkpoint"), inner.get("checkpoint"), inner.get("base_checkpoint")):
        if base and os.path.isfile(os.path.join(base, "tokenizer", "tokenizer.json")):
            return Tokenizer.load(os.path.join(base, "tokenizer"))
    return None


def summary_lines(diffs, limit=6):
    """The most telling differences first: between families on held-out items, then between
    checkpoints, then the rest; larger relative gaps first. A family difference found in
    several checkpoints is one line that names them all."""
    merged, order = {}, []
    for d in diffs:
        key = (d["kind"], d["group"], d["claim"]) if d["kind"] == "family" else id(d)
        if key not in merged:
            merged[key] = []
            order.append(key)
        merged[key].append(d)
    lines = []
    for key in order:
        ds = merged[key]
        if ds[0]["kind"] == "family":
            if len(ds) == 1:
                where = ds[0]["checkpoint"] + (f" {ds[0]['values']}" if ds[0]["values"] else "")
            else:  # means only; the intervals are in the full list
                where = "; ".join(d["checkpoint"] + (f" {d['a_value']['mean']:.3g} vs {d['b_value']['mean']:.3g}"
                                                     if "a_value" in d else "") for d in ds)
            text = f"{ds[0]['group']}: {ds[0]['claim']} — {where}."
        else:
            text = ds[0]["text"]
        lines.append((ds[0]["group"] != "heldout", ds[0]["kind"] != "family", -len(ds),
                      -max(d.get("size", 0) for d in ds), text))
    return [t[-1] for t in sorted(lines)[:limit]]


def main(argv=None):
    args = parse_args(argv)
    t0 = time.time()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.max_examples < 1:
        raise UserError("--max-examples must be at least 1.")
    ckpts = parse_checkpoints(args.checkpoints)
    deltas = parse_deltas(args.delta, list(ckpts))
    tasks = [get_task(name, source=args.source) for name in args.tasks]
    examples = {t.name: (t, interp.select_examples(t, args.max_examples, args.seed)) for t in tasks}
    for t, by in examples.values():  # fail before loading any model
        interp.answer_cue(t, next(ex for rows in by.values() for ex in rows))
    families = sorted({t.family for t in tasks}, key=lambda f: (f != "stoney", f))
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    judge, judge_desc = interp.word_judge()
    extra_tok = Tokenizer.load(args.tokenizer) if args.tokenizer else None
    results, ck_cfg = {}, {}
    for name, path in tqdm(list(ckpts.items()), desc="checkpoints", disable=args.no_progress):
        model, tok, meta = load_model(path, device=device)
        tok = tok or extra_tok or base_tokenizer(meta)
        if tok is None:
            raise UserError(f"checkpoint {name} ({path}) carries no tokenizer; pass --tokenizer DIR.")
        t1 = time.time()
        results[name] = interp.run_checkpoint(
            model, tok, examples, limit=args.max_examples, top_k=args.top_k, n_random_sets=args.random_sets,
            n_induction=args.induction_seqs, induction_len=args.induction_len, seed=args.seed, n_boot=args.n_boot,
            max_len=args.max_len, figure_examples=args.figure_examples, rationale=args.rationale, judge=judge,
            progress=not args.no_progress)
        ck_cfg[name] = {"path": os.path.abspath(path), "model": results[name]["model"],
                        "step": meta.get("step"), "source": meta.get("source", "nanostoney"),
                        "seconds": round(time.time() - t1, 1)}
        del model
    delta_out = {f"{new} vs {old}": interp.paired_delta(results, new, old, args.n_boot, args.seed)
                 for new, old in deltas}
    diffs = interp.differences(results, families)
    for r in results.values():
        r.pop("_recs")
    config = {k: v for k, v in vars(args).items() if k not in ("checkpoints",)}
    config.update(checkpoints=ck_cfg, families=families,
                  family_of={t.name: t.family for t in tasks}, device=device, word_judge=judge_desc,
                  candidates={t: {s: len(v) for s, v in by.items()} for t, (_, by) in examples.items()},
                  deltas=[f"{n} vs {o}" for n, o in deltas], elapsed_s=round(time.time() - t0, 1),
                  git_commit=git_commit(), torch_version=torch.__version__,
                  command="python -m scripts.compare_reasoning " + " ".join(sys.argv[1:] if argv is None else argv))
    metrics = {"config": config, "definitions": interp.DEFINITIONS, "created": time.strftime("%Y-%m-%d %H:%M:%S"),
               "summary": {"top": summary_lines(diffs),
                           "note": "differences whose 95% bootstrap intervals over examples do not overlap; "
                                   "held-out = val + test"},
               "differences": diffs, "checkpoints": results, "deltas": delta_out}
    logger = None
    if args.wandb != "disabled":
        logger = Logger(mode=args.wandb, project=args.wandb_project, entity=args.wandb_entity,
                        run_name=args.run_name, config=config, out_dir=args.out + ".wandb")
    try:
        out = report.write_report(args.out, metrics, logger=logger)
    finally:
        if logger is not None:
            logger.finish()
    print(f"report: {os.path.join(out, 'index.html')} ({time.time() - t0:.0f}s)")
    for line in metrics["summary"]["top"]:
        print(" -", line)
    return out


if __name__ == "__main__":
    run_main(main)
