"""When does the CPU speedrun's model start copying from its context? The depth-4 model trained
on repeated-span drills alone (curriculum.span_row, or spans from a small alphabet), printing
bench.knowledge_probe's induction gain every 100 steps (and the gain on the alphabet's tokens).

    python -m bench.induction_drills --tokenizer out/tokenizer --optimizer muon --alphabet 64 --steps 1500

One JSON line per 100 steps: step, gain on random ordinary tokens, gain on the alphabet, seconds.
Results and the machine they ran on: docs/science_log.md, "When copying starts".
"""
import json
import random
import time

import numpy as np
import torch

from bench.knowledge_probe import induction_gain
from nanostoney import cli, optim
from nanostoney.cli import run_main
from nanostoney.curriculum import FIRST_ORDINARY, span_row
from nanostoney.gpt import GPT, config_for_depth
from nanostoney.tokenizer import Tokenizer


def alphabet_row(rng, tok, seq_len, alphabet):
    """span_row's shape (a span of 8-40 tokens repeated 2-3 times, 0-6 tokens between) over the
    first `alphabet` ordinary tokens only."""
    draw = lambda: rng.randrange(FIRST_ORDINARY, FIRST_ORDINARY + alphabet)
    ids = []
    while len(ids) < seq_len + 1:
        span = [draw() for _ in range(rng.randint(8, 40))]
        ids.append(tok.bos_id)
        for _ in range(rng.randint(2, 3)):
            ids += span + [draw() for _ in range(rng.randint(0, 6))]
    return np.array(ids[:seq_len + 1], dtype=np.int64)


def main():
    p = cli.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tokenizer", default="out/tokenizer")
    p.add_argument("--steps", type=int, default=500)
    p.add_argument("--optimizer", default="adamw", choices=["adamw", "muon"])
    p.add_argument("--matrix-lr", type=float, default=None)
    p.add_argument("--head-dim", type=int, default=64)
    p.add_argument("--alphabet", type=int, default=0, help="draw spans from this many tokens (0 = span_row)")
    p.add_argument("--rows", type=int, default=8)
    p.add_argument("--sequence-len", type=int, default=256)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()
    torch.set_num_threads(1)
    tok = Tokenizer.load(args.tokenizer)
    torch.manual_seed(args.seed)
    model = GPT(config_for_depth(4, tok.vocab_size, args.sequence_len, args.head_dim))
    model.init_weights()
    opt = optim.build_optimizer(model, args.optimizer, matrix_lr=args.matrix_lr)
    rng, t0 = random.Random(args.seed), time.time()
    for step in range(args.steps + 1):
        if step % 100 == 0:
            with torch.no_grad():
                model.eval()
                row = {"step": step, "gain": round(induction_gain(model, tok), 3),
                       "alphabet_gain": round(induction_gain(model, tok, high=FIRST_ORDINARY + args.alphabet), 3) if args.alphabet else None,
                       "seconds": round(time.time() - t0)}
                model.train()
            print(json.dumps(row), flush=True)
        if step == args.steps:
            break
        rows = [alphabet_row(rng, tok, args.sequence_len, args.alphabet) if args.alphabet
                else span_row(rng, tok, args.sequence_len) for _ in range(args.rows)]
        x = torch.from_numpy(np.stack(rows))
        model(x[:, :-1].contiguous(), x[:, 1:].contiguous()).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)


if __name__ == "__main__":
    run_main(main)
