"""Given the gold pick's text, does a chat model write its letter? On held-out items of multiple-
choice tasks, the gold chain teacher forced up to the pick's letter ("... The answer is 72" / "It
means to look out"), then p(gold letter) among the five and how often it is the likeliest, by the
item's depth or direction. It separates the two things a greedy letter needs: recalling the
answer's text (eval's accuracy and cloze) and copying the letter that follows that text in the
options (this).

    python -m bench.letter_copy --checkpoints sft=out/sft --tasks arith_mc stoney_mc --items 200
"""
import random

import torch

from nanostoney import cli
from nanostoney.answers import LETTERS, picked
from nanostoney.cli import run_main
from nanostoney.errors import UserError
from nanostoney.tasks import BUNDLED_TASKS, TASKS, get_task


def letter_slot(example):
    """(the gold chain up to its pick's letter, the text that goes before the letter there)."""
    gold = example["messages"][-1]["content"]
    L = example["answer"]
    pick = picked(example["choices"][LETTERS.index(L)], L)
    if pick not in gold:
        raise UserError(f"{example['id']}'s gold answer does not name its option as {pick!r}; "
                        f"this bench reads tasks in the letter-after format (e.g. arith_mc, stoney_mc).")
    cut = gold.rindex(pick) + len(pick) - len(L)
    return gold[:cut].rstrip(" "), " "  # " C" is one token: the space goes with the letter


@torch.no_grad()
def read_letters(model, tok, task, examples):
    """[(p(gold letter) among the five, gold letter likeliest)] per example."""
    out = []
    for ex in examples:
        context, before = letter_slot(ex)
        prompt = tok.render_prompt({"messages": task.prompt(ex)})
        ids = prompt + tok.encode(context)
        letters = [(prompt + tok.encode(context + before + L))[len(ids)] for L in LETTERS]
        if len(set(letters)) < len(LETTERS):
            raise UserError("this tokenizer does not write each letter as one token after the pick's text; "
                            "use the run's own BPE tokenizer (a byte-level one cannot be read this way).")
        logits = model(torch.tensor([ids], device=model.get_device()))[0, -1].float()
        p = torch.softmax(logits[letters], -1)
        k = LETTERS.index(ex["answer"])
        out.append((p[k].item(), int(p.argmax().item() == k)))
    return out


def mc_task(name):
    mc = [n for n in BUNDLED_TASKS if TASKS[n].kind == "mc"]
    if name not in mc:
        raise UserError(f"{name} is not a bundled multiple-choice task; pick from {', '.join(mc)}.")
    return name


def summary(rows):
    return f"n {len(rows)}: p(gold letter) {sum(p for p, _ in rows) / len(rows):.2f}, " \
           f"likeliest {sum(h for _, h in rows) / len(rows):.2f}"


def main():
    p = cli.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--checkpoints", nargs="+", required=True, help="NAME=DIR (or DIR) of chat models")
    p.add_argument("--tasks", nargs="+", type=mc_task, default=["arith_mc", "stoney_mc"])
    p.add_argument("--split", default="val", choices=["train", "val", "test"])
    p.add_argument("--items", type=cli.positive_int, default=200, help="items per task, a seeded random sample")
    args = p.parse_args()
    from nanostoney.checkpoint import load_model
    for spec in args.checkpoints:
        name, _, path = spec.rpartition("=")
        model, tok, _ = load_model(path)
        if tok is None:
            raise UserError(f"{path} has no tokenizer; pass a nanostoney run or step directory.")
        for t in args.tasks:
            task = get_task(t)
            items = task.examples(args.split)
            items = random.Random(0).sample(items, min(args.items, len(items)))
            rows = read_letters(model, tok, task, items)
            print(f"{name or path} {t} {args.split}: {summary(rows)}")
            for field in ("depth", "direction"):
                for value in sorted({ex[field] for ex in items if ex.get(field) is not None}, key=str):
                    print(f"  {field} {value}: {summary([r for r, ex in zip(rows, items) if ex.get(field) == value])}")


if __name__ == "__main__":
    run_main(main)
