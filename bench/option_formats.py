"""Which multiple-choice format can a base model that copies learn to read the letter from? Fine-
tunes every weight of --init on fresh option drills of one format (curriculum.option_drill) and
measures, on 200 other fresh drills of that format, p(gold letter) teacher forced right before the
letter, and how often the gold letter is the likeliest of the five, every 100 steps.

    python -m bench.option_formats --init out/copy_base --format letter_after --steps 400

Formats: letter_first ("C) 72" ... "The answer is 72, which is option C.", the tasks' old one),
bracket_after ("72 (C)" ... "The answer is 72 (C)."), letter_after ("- 72 C" ... "The answer is
72 C.", the tasks' own: the letter is the token after the value, as an induction head copies).
"""
import random

import torch

from nanostoney import cli
from nanostoney.answers import LETTERS, option_line, picked
from nanostoney.cli import run_main
from nanostoney.curriculum import option_drill, option_values, pack

FORMATS = {"letter_first": (lambda L, v: f"{L}) {v}", lambda v, L: f"{v}, which is option {L}"),
           "bracket_after": (lambda L, v: f"{v} ({L})", lambda v, L: f"{v} ({L})"),
           "letter_after": (option_line, picked)}


def letter_slot(values, k, line, pick):
    """(the drill's text up to its pick's letter, the text that goes before a letter there)."""
    text = option_drill(values, k, line, pick)
    head = pick(values[k], "\0").split("\0")[0]  # "72, which is option " / "72 (" / "72 "
    cut = text.index("<think>The answer is ") + len("<think>The answer is ") + len(head)
    before = " " if head.endswith(" ") else ""  # " C" is one token: the space goes with the letter
    return text[:cut - len(before)], before


@torch.no_grad()
def read_letters(model, tok, line, pick, n=200):
    """(mean p(gold letter), share of drills whose gold letter is the likeliest of the five)."""
    rng, probs, hits = random.Random(99), [], []
    for _ in range(n):
        values, k = option_values(rng)
        context, before = letter_slot(values, k, line, pick)
        ids = [tok.bos_id] + tok.encode(context)
        letters = [tok.encode(context + before + L)[len(ids) - 1] for L in LETTERS]
        p = torch.softmax(model(torch.tensor([ids], device=model.get_device()))[0, -1].float(), -1)[letters]
        probs.append(p[k].item())
        hits.append(int(p.argmax().item() == k))
    return sum(probs) / n, sum(hits) / n


def main():
    p = cli.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--init", required=True, help="base checkpoint (run or step dir)")
    p.add_argument("--format", choices=sorted(FORMATS), default="letter_after")
    p.add_argument("--steps", type=cli.nonneg_int, default=400)
    p.add_argument("--lr", type=cli.finite_float(lo=0, lo_open=True), default=3e-4, help="AdamW, every weight")
    p.add_argument("--rows", type=cli.positive_int, default=8, help="rows of --row-len tokens per step")
    p.add_argument("--row-len", type=cli.positive_int, default=256)
    args = p.parse_args()
    from nanostoney.checkpoint import load_model
    model, tok, _ = load_model(args.init)
    line, pick = FORMATS[args.format]
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.0)
    rng = random.Random(7)
    for step in range(args.steps + 1):
        if step % 100 == 0 or step == args.steps:
            model.eval()
            print(f"{args.format} step {step}: p(gold letter) %.3f, gold letter likeliest %.3f"
                  % read_letters(model, tok, line, pick), flush=True)
            model.train()
        if step == args.steps:
            break
        rows = torch.tensor([pack(rng, tok, args.row_len, lambda r: option_drill(*option_values(r), line, pick))
                             for _ in range(args.rows)], device=model.get_device())
        model(rows[:, :-1].contiguous(), rows[:, 1:].contiguous()).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)


if __name__ == "__main__":
    run_main(main)
