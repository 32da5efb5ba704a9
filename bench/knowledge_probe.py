"""What a BASE checkpoint knows, before any fine-tuning: five-option accuracy by log-likelihood.

    python bench/knowledge_probe.py --checkpoints out/base/step_000500 out/base/step_001000 --items 200

For each multiple-choice item, each option is written out the way the pretraining text states
such things, and the option whose continuation the model finds most likely (summed token
log-probability) is its answer:
- stoney_mc / stoney_mc_unseen: "`term` means 'OPTION'." (s2e) or "'gloss' in Stoney Nakoda
  is `OPTION`." (e2s); held-out items ask about extraction facts read in pretraining, the
  control items about terms no training text holds (must stay at chance).
- arith_mc: the question, then each option's own chain "<think>...</think>\\nAnswer: v"
  (the gold's correct chain, or the wrong-step chain that argues for a distractor).
Cheap (forward passes only), so it can trace held-out knowledge against pretraining steps; the
pipeline's own numbers (SFT/GRPO, generated answers) come from scripts/eval.py.
"""
import argparse
import json
import os
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

import torch  # noqa: E402

from nanostoney.errors import UserError, run_main  # noqa: E402
from nanostoney.tasks import get_task  # noqa: E402
from nanostoney.answers import LETTERS  # noqa: E402
from nanostoney.tasks.subset import subset  # noqa: E402

TASKS = ("stoney_mc", "stoney_mc_unseen", "arith_mc")


def option_texts(task, ex):
    """[(full text, char offset where the scored continuation starts)] for the five options."""
    out = []
    for letter, choice in zip(LETTERS, ex["choices"]):
        if task.family == "stoney":
            a, b = ex["regions"]["question"]
            q = ex["messages"][-2]["content"][a:b]
            if ex["direction"] == "s2e":
                term = q.split("`")[1]
                prefix, cont = f"`{term}` means '", f"{choice}'."
            else:
                gloss = q.split("'", 1)[1].rsplit("'", 1)[0]
                prefix, cont = f"'{gloss}' in Stoney Nakoda is `", f"{choice}`."
        else:
            think = ex["option_rationales"][letter].split("</think>")[0]
            chain = think.rsplit("\n", 1)[0]  # drop "The answer is v, which is option L."
            prefix = ex["messages"][-2]["content"].split("\n\nA) ")[0] + "\n\n"
            cont = f"{chain}</think>\nAnswer: {choice}"
        out.append((prefix + cont, len(prefix)))
    return out


@torch.no_grad()
def score(model, tok, texts, batch=32):
    """Summed log-probability of each text's tokens from its offset on (tokens that overlap it)."""
    rows = []
    for text, start in texts:
        enc = tok.hf.encode(text, add_special_tokens=False)
        first = next(j for j, (s, e) in enumerate(enc.offsets) if e > start)
        rows.append(([tok.bos_id] + enc.ids, first + 1))
    out = []
    for i in range(0, len(rows), batch):
        chunk = rows[i:i + batch]
        T = max(len(ids) for ids, _ in chunk)
        idx = torch.zeros(len(chunk), T, dtype=torch.long)
        for r, (ids, _) in enumerate(chunk):
            idx[r, :len(ids)] = torch.tensor(ids)
        logp = torch.log_softmax(model(idx.to(model.get_device())).float(), -1).cpu()
        for r, (ids, first) in enumerate(chunk):
            tgt = torch.tensor(ids[first:])
            out.append(logp[r, first - 1:len(ids) - 1].gather(1, tgt[:, None]).sum().item())
    return out


def probe(model, tok, task, exs):
    """[1 if the gold option scores highest else 0] per example."""
    texts = [t for ex in exs for t in option_texts(task, ex)]
    s = score(model, tok, texts)
    return [int(max(range(5), key=lambda k: s[5 * i + k]) == LETTERS.index(ex["answer"]))
            for i, ex in enumerate(exs)]


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--checkpoints", nargs="+", required=True, help="base checkpoint dirs (run or step dirs)")
    p.add_argument("--tasks", default=",".join(TASKS))
    p.add_argument("--split", default="val", choices=["val", "test"])
    p.add_argument("--items", type=int, default=200, help="balanced, hash-chosen items per task (0 = all)")
    p.add_argument("--out", default=None, help="also write the table as JSON here")
    args = p.parse_args()
    from nanostoney.checkpoint import load_model
    from nanostoney.metrics import bootstrap_ci
    names = [n for n in args.tasks.split(",") if n]
    for n in names:
        if n not in TASKS:
            raise UserError(f"--tasks: {n!r} has no probe; use some of {', '.join(TASKS)}.")
    rows = {}
    for ckpt in args.checkpoints:
        model, tok, _ = load_model(ckpt)
        if tok is None:
            raise UserError(f"{ckpt} has no tokenizer; pass a checkpoint saved with one.")
        rows[ckpt] = {}
        for n in names:
            task = get_task(n)
            hits = probe(model, tok, task, subset(task, args.split, args.items))
            rows[ckpt][n] = {"n": len(hits), "accuracy": bootstrap_ci([float(h) for h in hits])}
            if task.name == "arith_mc":
                exs = subset(task, args.split, args.items)
                for d in (1, 2, 3, 4):
                    h = [x for x, ex in zip(hits, exs) if ex["depth"] == d]
                    rows[ckpt][f"{n}/depth{d}"] = {"n": len(h), "accuracy": bootstrap_ci([float(x) for x in h])}
        print(ckpt + ": " + ", ".join(f"{k} {v['accuracy'][0]:.3f} [{v['accuracy'][1]:.3f}, {v['accuracy'][2]:.3f}]"
                                      for k, v in rows[ckpt].items()), flush=True)
    if args.out:
        with open(args.out + ".tmp", "w") as f:
            json.dump(rows, f, indent=2)
        os.replace(args.out + ".tmp", args.out)


if __name__ == "__main__":
    run_main(main)
