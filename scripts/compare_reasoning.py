"""Compare how checkpoints reason over Stoney Nakoda and over math: the interpretability report.

    python -m scripts.compare_reasoning --checkpoints base=out/base sft=out/sft grpo=out/grpo \
        --max-examples 16 --out out/report
    python -m scripts.compare_reasoning --checkpoints nanochat=~/.cache/nanochat/base_checkpoints/d20 \
        --tokenizer ~/.cache/nanochat/tokenizer --device cuda --max-examples 200
    torchrun --nproc_per_node=8 -m scripts.compare_reasoning --checkpoints ...      # 8 GPUs

Checkpoints: anything checkpoint.load_model takes. Tasks: stoney_lexicon (family "stoney") vs arith
(family "math") by default. The first screen is activation patching on minimal pairs of held-out
items, then a few declared headline tests (Holm-corrected); the rest is exploratory. Writes
<out>/index.html, figures/*.png and metrics.json, each moved into place whole; an --out holding
files we did not write is refused unless --overwrite. Under torchrun the work is shared out over
the ranks; the numbers do not depend on the number of processes.
"""
import os
import sys
import time

import torch
from tqdm import tqdm

from nanostoney import cli, evaluate, lora
from nanostoney.checkpoint import git_commit, load_model
from nanostoney.cli import run_main
from nanostoney.dist import autocast_ctx, check_shared, cleanup, init_dist, print0
from nanostoney.errors import UserError
from nanostoney.interp import ablation, causal, contexts, items, render, run, stats
from nanostoney.interp.definitions import CONTEXTS, DEFINITIONS
from nanostoney.logging import MODES, Logger
from nanostoney.tasks import get_task
from nanostoney.tasks.stoney_corpus import Lang, load_corpus
from nanostoney.tokenizer import Tokenizer

DEFAULT_TASKS = ("stoney_lexicon", "arith")  # open answers: the model writes its answer itself


def parse_args(argv=None):
    p = cli.ArgumentParser(description="Interpretability report: Stoney Nakoda vs math reasoning.")
    p.add_argument("--checkpoints", nargs="+", required=True, metavar="[NAME=]PATH",
                   help="checkpoints to compare, in order (e.g. base=out/base sft=out/sft grpo=out/grpo; a bare "
                        "PATH is named by its folder)")
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
    p.add_argument("--context", default="own", choices=CONTEXTS,
                   help="what precedes the answer slot: the model's own greedy rationale, its answer sentence "
                        "removed (own), the gold one (gold, teacher forced), or for multiple choice the question "
                        "without options and the options' shared answer beginning (cloze: a model that knows "
                        "answers but cannot name letters)")
    p.add_argument("--top-k", type=cli.positive_int, default=5, help="heads ablated together per family")
    p.add_argument("--random-sets", type=cli.nonneg_int, default=ablation.RANDOM_SETS,
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


def parse_deltas(specs, names):
    if specs is None:
        new, old = (next((n for n in names if word in n.lower()), None) for word in ("grpo", "sft"))
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


def word_judge():
    """(judge(word) -> "s" | "e", description): the Stoney task's own language judge."""
    lang = Lang([c for convs in load_corpus()["convs"].values() for c in convs])
    return lang.word, "nanostoney.tasks.stoney_corpus.Lang over the bundled conversations"


def check_flags(args):
    """(checkpoints, deltas, tasks, examples): every flag checked before any model is loaded."""
    if args.induction_len < 2:  # the one range the flag types do not say: a block needs two tokens to repeat
        raise UserError(f"--induction-len {args.induction_len} is out of range; use 2 or more.")
    ckpts = evaluate.named_checkpoints(args.checkpoints)
    deltas = parse_deltas(args.delta, list(ckpts))
    tasks = [get_task(name, source=args.source) for name in args.tasks]
    examples = {t.name: (t, items.select_examples(t, args.max_examples, args.seed)) for t in tasks}
    for t, by in examples.values():
        contexts.answer_cue(t, next(ex for rows in by.values() for ex in rows))
        if args.context == "cloze" and t.kind != "mc":
            raise UserError(f"--context cloze needs multiple-choice tasks and {t.name} has no options; "
                            f"drop it from --tasks or use --context own.")
    return ckpts, deltas, tasks, examples


def measure(args, ckpts, examples, judge, extra_tok, info):
    """({name: summary}, {name: per-item records}, {name: its configuration}) of every checkpoint."""
    summaries, recs, ck_cfg = {}, {}, {}
    for name, path in tqdm(list(ckpts.items()), desc="checkpoints", disable=args.no_progress or not info.is_master):
        model, tok, meta = load_model(path, device=info.device)
        lora.merge_lora(model)  # only read here, never saved: the merged weights are the same function
        tok = tok or extra_tok or base_tokenizer(meta)
        if tok is None:
            raise UserError(f"checkpoint {name} ({path}) carries no tokenizer; pass --tokenizer DIR.")
        print0(f"{name}: depth {model.config.n_layer} (width {model.config.n_embd}), "
               f"{model.num_params() / 1e6:.2f}M params")
        t1 = time.time()
        with autocast_ctx(info):
            summaries[name], recs[name] = run.run_checkpoint(
                model, tok, examples, judge=judge, limit=args.max_examples, top_k=args.top_k,
                n_random_sets=args.random_sets, n_induction=args.induction_seqs, induction_len=args.induction_len,
                seed=args.seed, n_boot=args.n_boot, max_len=args.max_len, figure_examples=args.figure_examples,
                context=args.context, progress=not args.no_progress, info=info)
        if info.is_master:
            ck_cfg[name] = {"path": os.path.abspath(path), "model": summaries[name]["model"],
                            "step": meta.get("step"), "source": meta.get("source", "nanostoney"),
                            "seconds": round(time.time() - t1, 1)}
        del model
    return summaries, recs, ck_cfg


def publish(args, metrics):
    """Write the report into --out (and to W&B with --wandb); returns its folder."""
    logger = None if args.wandb == "disabled" else Logger(
        mode=args.wandb, project=args.wandb_project, entity=args.wandb_entity, run_name=args.run_name,
        config=metrics["config"], out_dir=args.out)
    try:
        out = render.write_report(args.out, metrics, logger=logger)
    finally:
        if logger is not None:
            logger.finish()
    return out


def main(argv=None):
    args = parse_args(argv)
    t0 = time.time()
    if args.threads:
        torch.set_num_threads(args.threads)
    ckpts, deltas, tasks, examples = check_flags(args)
    families = sorted({t.family for t in tasks}, key=lambda f: (f != "stoney", f))
    info = init_dist(args.device)
    inputs = {f"the {name} checkpoint": path for name, path in ckpts.items()} | {"--tokenizer": args.tokenizer}
    check_shared(inputs)
    judge, judge_desc = word_judge()
    extra_tok = Tokenizer.load(args.tokenizer) if args.tokenizer else None
    cli.claim_out(args.out, overwrite=args.overwrite, training=False, own=render.REPORT_FILES + cli.SHARED_FILES,
                  inputs=inputs)
    print0(f"report plan: {info.world_size} process(es) on {info.device.type}; {len(ckpts)} checkpoint(s) x "
           f"{len(tasks)} tasks x up to {args.max_examples} items per split, shared out over the processes")
    summaries, recs, ck_cfg = measure(args, ckpts, examples, judge, extra_tok, info)
    if not info.is_master:
        cleanup()
        return None
    delta_out = {f"{new} vs {old}": stats.paired_delta(recs, new, old, args.n_boot, args.seed) for new, old in deltas}
    headline = stats.headlines(recs, deltas, families, seed=args.seed)
    config = {k: v for k, v in vars(args).items() if k != "checkpoints"} | dict(
        checkpoints=ck_cfg, families=families, family_of={t.name: t.family for t in tasks}, device=info.device.type,
        world_size=info.world_size, word_judge=judge_desc,
        candidates={t: {s: len(v) for s, v in by.items()} for t, (_, by) in examples.items()},
        deltas=[f"{n} vs {o}" for n, o in deltas], elapsed_s=round(time.time() - t0, 1), git_commit=git_commit(),
        torch_version=torch.__version__,
        command="python -m scripts.compare_reasoning " + " ".join(sys.argv[1:] if argv is None else argv))
    metrics = {"config": config, "definitions": DEFINITIONS, "created": time.strftime("%Y-%m-%d %H:%M:%S"),
               "headline": headline, "checkpoints": summaries, "deltas": delta_out}
    metrics["summary"] = render.summary(metrics)
    out = publish(args, metrics)
    print(f"report: {os.path.join(out, 'index.html')} ({time.time() - t0:.0f}s)")
    for line in causal.lead(metrics) + metrics["summary"]:
        print(" -", line)
    cleanup()
    return out


if __name__ == "__main__":
    run_main(main)
