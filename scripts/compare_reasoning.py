"""Compare how checkpoints reason over Stoney Nakoda and over math: the interpretability report.

    python -m scripts.compare_reasoning --checkpoints base=out/base sft=out/sft grpo=out/grpo \
        --max-examples 16 --out out/report
    python -m scripts.compare_reasoning --checkpoints nanochat=~/.cache/nanochat/base_checkpoints/d20 \
        --tokenizer ~/.cache/nanochat/tokenizer --device cuda --max-examples 200
    torchrun --nproc_per_node=8 -m scripts.compare_reasoning --checkpoints ...      # 8 GPUs

Checkpoints: our run/step dirs, LoRA adapter dirs, nanochat or transformers NanoChat dirs,
hf:OWNER/NAME (anything nanostoney.checkpoint.load_model takes). Tasks: default stoney_lexicon
(family "stoney": held-out items ask about facts read in pretraining, never asked in training, in
both directions) vs arith (family "math": generated multi-step problems, held out by template and
numbers), both open: the model writes its chain and its answer itself; stoney_mc, arith_mc,
aqua_mc and gsm8k_mc by --tasks. The first screen is causal: activation patching on minimal pairs
of the held-out items (nanostoney.minimal_pairs, nanostoney.patching), Holm-corrected. Up to --max-examples examples of each task from
each split (tasks.subset: balanced and hash-ordered, the same for every checkpoint). Each item is read after the
model's own greedy rationale with its answer sentence removed (--context gold: the gold rationale,
teacher forced, with its answer sentence removed; --context cloze: the question without options,
then the options' shared answer beginning, for a model that knows answers but cannot name
letters). The report's summary is a few declared headline tests (interp.HEADLINES) with
Holm-corrected p-values and Bonferroni-level intervals; every other table and figure is exploratory. Writes <out>/index.html (opens offline),
<out>/figures/*.png and <out>/metrics.json (every number and the configuration): built in a temporary folder inside <out>, then each moved in whole,
index.html last; nothing else in <out> is touched, and a directory holding files we did not write is
refused unless --overwrite. With --wandb the figures and tables go to W&B too. The
definitions of the statistics are in nanostoney/interp.py (DEFINITIONS) and in the report.
Under torchrun the generations, per-item forwards and ablations are shared out over the ranks and
gathered in order; rank 0 computes the statistics and writes the report, whose numbers do not
depend on the number of processes. On CUDA the forwards run under bf16 autocast, LoRA adapters merged.
"""
import os
import sys
import time

import torch
from tqdm import tqdm

from nanostoney import cli, interp, lora, published, report, report_causal
from nanostoney.checkpoint import git_commit, load_model
from nanostoney.cli import run_main
from nanostoney.dist import autocast_ctx, check_shared, cleanup, init_dist, print0
from nanostoney.errors import UserError
from nanostoney.logging import MODES, Logger
from nanostoney.tasks import get_task
from nanostoney.tokenizer import Tokenizer

DEFAULT_TASKS = ("stoney_lexicon", "arith")  # open answers: the model writes its answer itself


def parse_args(argv=None):
    p = cli.ArgumentParser(description="Interpretability report: Stoney Nakoda vs math reasoning.")
    p.add_argument("--checkpoints", nargs="+", required=True, metavar="NAME=PATH",
                   help="checkpoints to compare, in order (e.g. base=out/base sft=out/sft grpo=out/grpo)")
    p.add_argument("--tasks", nargs="+", default=list(DEFAULT_TASKS))
    p.add_argument("--max-examples", type=cli.positive_int, default=16, help="examples per task and split")
    p.add_argument("--out", type=cli.out_path, default="out/report",
                   help="report directory (our files in it are replaced whole; nothing else is touched)")
    p.add_argument("--overwrite", action="store_true",
                   help="write the report into an --out that holds files nanostoney did not write (they are kept)")
    p.add_argument("--tokenizer", default=None,
                   help="tokenizer dir for checkpoints that carry none (default: the base checkpoint's, if named)")
    p.add_argument("--device", type=cli.device, default="auto", help="auto, cpu, cuda (auto: cuda when available)")
    p.add_argument("--max-len", type=cli.positive_int, default=None,
                   help="skip prompts longer than this many tokens (default: each model's sequence_len)")
    p.add_argument("--context", default="own", choices=interp.CONTEXTS,
                   help="what precedes the answer slot: the model's own greedy rationale, its answer sentence "
                        "removed (own), the gold one (gold, teacher forced), or for multiple choice the question "
                        "without options and the options' shared answer beginning (cloze: a model that knows "
                        "answers but cannot name letters)")
    p.add_argument("--top-k", type=cli.positive_int, default=5, help="heads ablated together per family")
    p.add_argument("--random-sets", type=cli.nonneg_int, default=interp.RANDOM_SETS,
                   help="random k-head sets drawn afresh for the null of \"top-k heads beat random\" (all of them when "
                        "there are fewer; under 100 the test is left out)")
    p.add_argument("--induction-seqs", type=cli.positive_int, default=16)
    p.add_argument("--induction-len", type=cli.positive_int, default=32, help="length of the repeated random block")
    p.add_argument("--figure-examples", type=cli.nonneg_int, default=1, help="example prompts drawn per family")
    p.add_argument("--delta", nargs="*", default=None, metavar="NEW:OLD",
                   help="paired comparisons to draw (default: grpo:sft when both names are given)")
    p.add_argument("--n-boot", type=cli.positive_int, default=1000)
    p.add_argument("--seed", type=cli.nonneg_int, default=0)
    p.add_argument("--source", default="bundled", help="task data source (see nanostoney.tasks.get_task)")
    p.add_argument("--wandb", nargs="?", const="auto", default="disabled", choices=MODES,
                   help="log figures and tables to W&B (bare --wandb = auto)")
    p.add_argument("--wandb-project", default=None)
    p.add_argument("--wandb-entity", default=None)
    p.add_argument("--run-name", default=None)
    p.add_argument("--threads", type=cli.positive_int, default=None,
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


def check_ranges(args):
    """The one range the flag types do not say: an induction block needs two tokens to repeat."""
    if args.induction_len < 2:
        raise UserError(f"--induction-len {args.induction_len} is out of range; use 2 or more.")


def main(argv=None):
    args = parse_args(argv)
    t0 = time.time()
    if args.threads:
        torch.set_num_threads(args.threads)
    check_ranges(args)
    ckpts = parse_checkpoints(args.checkpoints)
    deltas = parse_deltas(args.delta, list(ckpts))
    tasks = [get_task(name, source=args.source) for name in args.tasks]
    examples = {t.name: (t, interp.select_examples(t, args.max_examples, args.seed)) for t in tasks}
    for t, by in examples.values():  # fail before loading any model
        interp.answer_cue(t, next(ex for rows in by.values() for ex in rows))
        if args.context == "cloze" and t.kind != "mc":
            raise UserError(f"--context cloze needs multiple-choice tasks and {t.name} has no options; "
                            f"drop it from --tasks or use --context own.")
    families = sorted({t.family for t in tasks}, key=lambda f: (f != "stoney", f))
    info = init_dist(args.device)
    check_shared({f"the {name} checkpoint": path for name, path in ckpts.items()} | {"--tokenizer": args.tokenizer})
    device = info.device
    judge, judge_desc = interp.word_judge()
    extra_tok = Tokenizer.load(args.tokenizer) if args.tokenizer else None
    cli.claim_out(args.out, overwrite=args.overwrite, training=False, own=report.REPORT_FILES + cli.SHARED_FILES,
                  inputs={f"the {name} checkpoint": path for name, path in ckpts.items()} | {"--tokenizer": args.tokenizer})
    print0(f"report plan: {info.world_size} process(es) on {device.type}; {len(ckpts)} checkpoint(s) x "
           f"{len(tasks)} tasks x up to {args.max_examples} items per split, shared out over the processes")
    results, ck_cfg = {}, {}
    for name, path in tqdm(list(ckpts.items()), desc="checkpoints", disable=args.no_progress or not info.is_master):
        model, tok, meta = load_model(path, device=device)
        lora.merge_lora(model)  # only read here, never saved: the merged weights are the same function
        tok = tok or extra_tok or base_tokenizer(meta)
        if tok is None:
            raise UserError(f"checkpoint {name} ({path}) carries no tokenizer; pass --tokenizer DIR.")
        print0(f"{name}: depth {model.config.n_layer} (width {model.config.n_embd}), "
               f"{model.num_params() / 1e6:.2f}M params")
        t1 = time.time()
        with autocast_ctx(info):
            results[name] = interp.run_checkpoint(
                model, tok, examples, limit=args.max_examples, top_k=args.top_k, n_random_sets=args.random_sets,
                n_induction=args.induction_seqs, induction_len=args.induction_len, seed=args.seed,
                n_boot=args.n_boot, max_len=args.max_len, figure_examples=args.figure_examples,
                context=args.context, judge=judge, progress=not args.no_progress, info=info)
        if info.is_master:
            ck_cfg[name] = {"path": os.path.abspath(path), "model": results[name]["model"],
                            "step": meta.get("step"), "source": meta.get("source", "nanostoney"),
                            "seconds": round(time.time() - t1, 1)}
        del model
    if not info.is_master:
        cleanup()
        return None
    delta_out = {f"{new} vs {old}": interp.paired_delta(results, new, old, args.n_boot, args.seed)
                 for new, old in deltas}
    headline = interp.headlines(results, deltas, families, seed=args.seed)
    for r in results.values():
        r.pop("_recs")
    config = {k: v for k, v in vars(args).items() if k not in ("checkpoints",)}
    config.update(checkpoints=ck_cfg, families=families,
                  family_of={t.name: t.family for t in tasks}, device=device.type, world_size=info.world_size,
                  word_judge=judge_desc,
                  candidates={t: {s: len(v) for s, v in by.items()} for t, (_, by) in examples.items()},
                  deltas=[f"{n} vs {o}" for n, o in deltas], elapsed_s=round(time.time() - t0, 1),
                  git_commit=git_commit(), torch_version=torch.__version__,
                  command="python -m scripts.compare_reasoning " + " ".join(sys.argv[1:] if argv is None else argv))
    metrics = {"config": config, "definitions": interp.DEFINITIONS, "created": time.strftime("%Y-%m-%d %H:%M:%S"),
               "headline": headline, "checkpoints": results, "deltas": delta_out}
    metrics["summary"] = report.summary(metrics)
    logger = None
    if args.wandb != "disabled":
        logger = Logger(mode=args.wandb, project=args.wandb_project, entity=args.wandb_entity,
                        run_name=args.run_name, config=config, out_dir=args.out)
    try:
        out = report.write_report(args.out, metrics, logger=logger)
    finally:
        if logger is not None:
            logger.finish()
    print(f"report: {os.path.join(out, 'index.html')} ({time.time() - t0:.0f}s)")
    for line in report_causal.lead(metrics) + metrics["summary"]:
        print(" -", line)
    cleanup()
    return out


if __name__ == "__main__":
    run_main(main)
