"""Evaluate checkpoints on chat tasks: accuracy, cloze, pass@k, chrF++, MAUVE (and COMET when present).

    python -m scripts.eval --checkpoints out/base out/sft out/grpo                  # CPU default
    python -m scripts.eval --checkpoints base=out/base sft=out/sft --tasks stoney_mc,gsm8k \
        --split test --max-examples 0 --num-samples 16 --max-new-tokens 512          # full run
    torchrun --nproc_per_node=8 -m scripts.eval --checkpoints ...                   # 8 GPUs

A checkpoint is a run, step or LoRA dir, a nanochat / transformers NanoChat dir or hf:OWNER/NAME.
Multiple-choice tasks also get cloze with another item's question and with none (chance for a model
that reads its question). Output: the table, --out JSON and W&B. Nothing is downloaded.
"""
import argparse
import json
import os
import time

from nanostoney import cli, cloze, evaluate, lora
from nanostoney.checkpoint import load_model
from nanostoney.cli import run_main
from nanostoney.dist import check_shared, cleanup, init_dist, print0
from nanostoney.errors import UserError
from nanostoney.files import write_json, write_text
from nanostoney.logging import add_logging_args, from_args
from nanostoney.metrics import model_features
from nanostoney.tasks import TASK_NAMES, get_task
from nanostoney.tasks.base import with_other_question, without_question
from nanostoney.tasks.subset import subset

# MAUVE and COMET (imported when they are first used) must never fetch a featuriser or a model
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"

BLIND = {"cloze_other_question": with_other_question, "cloze_no_question": without_question}
DEFAULT_TASKS = ("stoney_mc,stoney_mc_unseen,stoney_lexicon,stoney_lexicon_unseen,stoney_verb,stoney_verb_unseen,"
                 "stoney_qa,stoney_qa_unseen,arith_mc,arith")
FORMAT = "nanostoney-eval-1"


def parse_args(argv=None):
    p = cli.ArgumentParser(description="Evaluate checkpoints on chat tasks.")
    p.add_argument("--checkpoints", nargs="+", required=True,
                   help="checkpoints (ours, LoRA adapters, nanochat, transformers NanoChat, hf:OWNER/NAME), as PATH or NAME=PATH")
    p.add_argument("--tasks", nargs="+", default=[DEFAULT_TASKS], help="comma- or space-separated task names")
    p.add_argument("--split", default="val", choices=["train", "val", "test"])
    p.add_argument("--max-examples", type=cli.nonneg_int, default=50,
                   help="examples per task, a fixed hash-chosen subset (0 = the whole split)")
    p.add_argument("--num-samples", type=cli.nonneg_int, default=2,
                   help="sampled completions per prompt for pass@k, k = 1, 2, 4, ... up to it (0 = none)")
    p.add_argument("--temperature", type=cli.positive_float, default=1.0, help="temperature of the sampled completions")
    p.add_argument("--top-k", type=cli.positive_int, default=None, help="top-k of the sampled completions (default: none)")
    p.add_argument("--seed", type=cli.nonneg_int, default=0, help="seed of the sampled completions and the bootstrap")
    p.add_argument("--max-new-tokens", type=cli.positive_int, default=128,
                   help="generation cap per completion (each task also stops at its longest reference + 16)")
    p.add_argument("--batch-size", type=cli.positive_int, default=32, help="completions generated together")
    p.add_argument("--n-boot", type=cli.positive_int, default=1000, help="bootstrap resamples of each interval")
    p.add_argument("--mauve", action=argparse.BooleanOptionalAction, default=True, help="MAUVE on open answers")
    p.add_argument("--mauve-boot", type=cli.positive_int, default=50,
                   help="bootstrap resamples of MAUVE intervals (each is a k-means fit)")
    p.add_argument("--mauve-featurizer", default=None,
                   help="checkpoint whose final hidden states featurise MAUVE texts (default: the evaluated model)")
    p.add_argument("--comet", action=argparse.BooleanOptionalAction, default=True,
                   help="COMET on open answers when unbabel-comet and a checkpoint are installed")
    p.add_argument("--comet-model", default=None,
                   help="local COMET checkpoint (default: Unbabel/wmt22-comet-da in the local HF cache)")
    p.add_argument("--device", type=cli.device, default="auto", help="auto, cpu, cuda, cuda:N, mps")
    p.add_argument("--out", type=cli.out_path, default="out/eval/results.json",
                   help="results JSON (its metrics.jsonl and wandb/ go into the folder <out without .json>-logs/)")
    p.add_argument("--completions", default=None, help="also write every completion to this JSON-lines file")
    p.add_argument("--overwrite", action="store_true",
                   help="replace an --out/--completions file that nanostoney did not write")
    add_logging_args(p)
    return p.parse_args(argv)


def parse_tasks(specs):
    names = [n for spec in specs for n in spec.replace(",", " ").split()]
    if not names:
        raise UserError(f"--tasks is empty; name at least one of {', '.join(TASK_NAMES)}.")
    for n in names:
        if n not in TASK_NAMES:
            raise UserError(f"unknown task {n!r}; valid tasks are {', '.join(TASK_NAMES)}.")
    return list(dict.fromkeys(names))


def load_for_eval(path, device):
    """(model, tokenizer, meta), LoRA merged: sampled only, so one matmul per layer instead of three."""
    model, tok, meta = load_model(path, device=device)
    if tok is None:
        raise UserError(f"checkpoint {path} has no tokenizer; save it with its tokenizer/ (or put "
                        f"nanochat's tokenizer.pkl next to it).")
    lora.merge_lora(model)
    return model, tok, meta


# -----------------------------------------------------------------------------
# the table

def fmt(metric, entry):
    if entry is None:
        return ""
    v, ci = entry["value"], entry["ci95"]
    d = 1 if metric == "chrf++" else 3  # chrF++ is on sacrebleu's 0-100 scale
    return f"{v:.{d}f}" + (f" [{ci[0]:.{d}f}, {ci[1]:.{d}f}]" if ci else "")


def metric_order(names):
    rank = {"accuracy": 0, "cloze": 0.5, "answered": 1, "chrf++": 3, "mauve": 4, "comet": 5}
    return sorted(names, key=lambda m: (2, int(m[5:]), m) if m.startswith("pass@") else (rank.get(m, 6), 0, m))


def format_table(results, split):
    """One block per task (and per family), a row per checkpoint, a column per metric."""
    ckpts = results["checkpoints"]
    first = next(iter(ckpts.values()))
    heads = [("tasks", t, f"{t} ({r['family']}, {r['kind']}; {split} n={r['n']})")
             for t in results["config"]["tasks"] for r in [first["tasks"][t]]]
    heads += [("families", f, f"{f} family, pooled over {', '.join(r['tasks'])} (n={r['n']})")
              for f in sorted(first["families"]) for r in [first["families"][f]]]
    lines = []
    for group, key, head in heads:
        rows = [(c, r[group][key]) for c, r in ckpts.items()]
        metrics = metric_order({m for _, r in rows for m in r["metrics"]})
        table = [["checkpoint"] + metrics] + [[c] + [fmt(m, r["metrics"].get(m)) for m in metrics] for c, r in rows]
        widths = [max(len(row[i]) for row in table) for i in range(len(table[0]))]
        lines.append(head)
        for j, row in enumerate(table):
            lines.append("| " + " | ".join(cell.ljust(w) for cell, w in zip(row, widths)) + " |")
            if j == 0:
                lines.append("|" + "|".join("-" * (w + 2) for w in widths) + "|")
        lines.append("")
    return "\n".join(lines)


def metric_entries(results):
    """[(checkpoint, task or family, its result, metric, {"value", "ci95"})] of every number."""
    return [(c, t, tr, m, e) for c, r in results["checkpoints"].items() for group in ("tasks", "families")
            for t, tr in r[group].items() for m, e in tr["metrics"].items()]


def flat_metrics(results):
    """{"ckpt/task/metric": value, ..._lo, ..._hi} for W&B."""
    out = {}
    for c, t, _, m, e in metric_entries(results):
        out[f"{c}/{t}/{m}"] = e["value"]
        if e["ci95"]:
            out[f"{c}/{t}/{m}_lo"], out[f"{c}/{t}/{m}_hi"] = e["ci95"]
    return out


# -----------------------------------------------------------------------------

def check_flags(args):
    """(task names, {name: path}, {what: input path}): bad flags fail before any slow work."""
    tasks_wanted = parse_tasks(args.tasks)
    ckpts = evaluate.named_checkpoints(args.checkpoints)
    if args.mauve_featurizer and not os.path.exists(args.mauve_featurizer):
        raise UserError(f"--mauve-featurizer {args.mauve_featurizer} does not exist; pass a checkpoint "
                        f"directory, or leave it out to featurise with each evaluated model.")
    cli.refuse_same({"--out": args.out, "--completions": args.completions, "the log folder of --out": log_dir(args)})
    inputs = {f"the {name} checkpoint": path for name, path in ckpts.items()}
    inputs["--mauve-featurizer"] = args.mauve_featurizer
    cli.claim_out_file(args.out, overwrite=args.overwrite, is_ours=ours_results, inputs=inputs)
    if args.completions:
        cli.claim_out_file(args.completions, overwrite=args.overwrite, is_ours=ours_completions, flag="--completions",
                           inputs=inputs)
    cli.claim_out(log_dir(args), overwrite=args.overwrite, training=False, own=cli.SHARED_FILES, inputs=inputs,
                  flag="the log folder of --out")
    return tasks_wanted, ckpts, inputs


def log_dir(args):
    """The run's log folder, ours, beside the results file (results.json -> results-logs/)."""
    return os.path.splitext(args.out)[0] + "-logs"


def ours_results(path):
    """A results file this script wrote (so a rerun may replace it)."""
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f).get("format") == FORMAT
    except (OSError, ValueError, AttributeError):
        return False


def ours_completions(path):
    try:
        with open(path, encoding="utf-8") as f:
            first = json.loads(f.readline() or "{}")
        return isinstance(first, dict) and {"checkpoint", "task", "greedy"} <= set(first)
    except (OSError, ValueError):
        return False


def evaluate_checkpoint(name, path, tasks, examples, featurizer, args, info, notes, completions):
    """The results entry of one checkpoint (on rank 0); appends to notes and completions."""
    model, tok, meta = load_for_eval(path, info.device)
    c = model.config
    print0(f"{name}: depth {c.n_layer} (width {c.n_embd}), {model.num_params() / 1e6:.2f}M params")
    fmodel, ftok = featurizer or (model, tok)

    def featurize(texts):
        return model_features(fmodel, ftok, texts, device=info.device)

    entry = {"path": os.path.abspath(path), "resolved": meta.get("checkpoint", os.path.abspath(path)),
             "step": meta.get("step"), "stage": meta.get("stage"), "lora": "base" in meta, "tasks": {}}
    for task in tasks:
        exs = examples[task.name]
        greedy, sampled = evaluate.complete_task(model, tok, task, exs, info, args.num_samples, args.temperature,
                                                 args.top_k, args.max_new_tokens, args.seed, args.batch_size)
        picked = cloze.cloze_correct(model, tok, task, exs, info) if task.kind == "mc" else None
        # the baselines that never read the question: cloze with another item's question, and with none
        blind = {k: cloze.cloze_correct(model, tok, task, f(exs), info) for k, f in BLIND.items()} \
            if task.kind == "mc" else {}
        if not info.is_master:
            continue
        comet = args.comet and not any(n.startswith("COMET skipped") for n in notes)
        res, task_notes = evaluate.score_task(task, exs, greedy, sampled, featurize=featurize if args.mauve else None,
                                              n_boot=args.n_boot, mauve_boot=args.mauve_boot, seed=args.seed,
                                              comet=comet, comet_model=args.comet_model, cloze=picked)
        notes += [n for n in task_notes if n not in notes]
        for k, got in blind.items():
            res["metrics"][k] = evaluate.mean_ci(got, args.n_boot, args.seed)
        entry["tasks"][task.name] = res
        if args.completions:
            completions += [{"checkpoint": name, "task": task.name, "id": ex["id"], "greedy": g, "sampled": s}
                            for ex, g, s in zip(exs, greedy, sampled)]
        print0(f"  {name} {task.name}: accuracy {res['metrics']['accuracy']['value']:.3f}"
               + (f", cloze {res['metrics']['cloze']['value']:.3f}" if picked is not None else ""))
    if info.is_master:
        entry["families"] = evaluate.family_metrics(entry["tasks"], n_boot=args.n_boot, seed=args.seed)
    return entry


def publish(args, results, config, ckpts, completions, timings, total):
    """Rank 0: the JSON file(s), the table on stdout, and the W&B run."""
    write_json(args.out, results)
    if args.completions:
        write_text(args.completions, "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in completions))
    print("\n" + format_table(results, args.split))
    for n in results["notes"]:
        print(n)
    print(f"wrote {args.out}; {total:.1f} s in all (" + ", ".join(f"{c} {s:.1f} s" for c, s in timings.items()) + ")")
    logger = from_args(args, config={**config, "checkpoints": ckpts}, out_dir=log_dir(args))
    logger.summary({**flat_metrics(results), "eval/time_s": total})
    rows = [[c, t, m, e["value"], *(e["ci95"] or [None, None]), tr["n"]] for c, t, tr, m, e in metric_entries(results)]
    logger.log_table("eval/results", ["checkpoint", "task", "metric", "value", "lo", "hi", "n"], rows)
    logger.finish()


def main(argv=None):
    args = parse_args(argv)
    tasks_wanted, ckpts, inputs = check_flags(args)
    t_start = time.perf_counter()
    info = init_dist(args.device)
    check_shared(inputs)
    tasks = [get_task(n) for n in tasks_wanted]
    examples = {t.name: subset(t, args.split, args.max_examples) for t in tasks}
    featurizer = load_for_eval(args.mauve_featurizer, info.device)[:2] if args.mauve and args.mauve_featurizer else None
    config = {"split": args.split, "tasks": tasks_wanted, "max_examples": args.max_examples,
              "num_samples": args.num_samples, "ks": evaluate.powers_of_two(args.num_samples),
              "temperature": args.temperature, "top_k": args.top_k, "seed": args.seed,
              "max_new_tokens": args.max_new_tokens, "batch_size": args.batch_size, "n_boot": args.n_boot,
              "mauve": args.mauve, "mauve_boot": args.mauve_boot,
              "mauve_featurizer": os.path.abspath(args.mauve_featurizer) if args.mauve_featurizer else "self",
              "examples_per_task": {t: len(x) for t, x in examples.items()}}
    results = {"format": FORMAT, "config": config, "checkpoints": {}, "notes": []}
    completions, timings = [], {}
    print0(f"eval plan: {info.world_size} process(es) on {info.device.type}; {len(ckpts)} checkpoint(s) on "
           f"{', '.join(f'{t} ({len(x)})' for t, x in examples.items())} [{args.split}], greedy + "
           f"{args.num_samples} samples/prompt at T={args.temperature}, at most {args.max_new_tokens} new tokens, "
           f"batches of {args.batch_size} completions shared out over the processes")
    for name, path in ckpts.items():
        t0 = time.perf_counter()
        results["checkpoints"][name] = evaluate_checkpoint(name, path, tasks, examples, featurizer, args, info,
                                                           results["notes"], completions)
        timings[name] = time.perf_counter() - t0
        print0(f"{name}: evaluated in {timings[name]:.1f} s")
    if info.is_master:
        publish(args, results, config, ckpts, completions, timings, time.perf_counter() - t_start)
    cleanup()


if __name__ == "__main__":
    run_main(main)
