"""When does the CPU speedrun's model start copying from its context? The depth-4 model trained
on repeated-span drills alone (curriculum.span_row, or spans from a small alphabet), printing
bench.knowledge_probe's induction gain and order gain every 100 steps.

    python -m bench.induction_drills --tokenizer out/tokenizer --optimizer muon --sequence-len 64 --rows 32 \
        --tie --embedding-lr 0 --steps 4000 --out drilled      # copies over the whole vocabulary by ~4,000

One JSON line per 100 steps and at the last: step, gain on random ordinary tokens, order gain (the
gain less its shuffled-copy control), gain on the alphabet, the best head's induction and
previous-token scores (interp.attention's), the training loss, seconds.
Results and the machine they ran on: docs/science_log.md, "When copying starts", and the entries after it.
"""
import argparse
import json
import random
import time

import numpy as np
import torch

from nanostoney import cli, optim
from nanostoney.checkpoint import load_model, save_checkpoint
from nanostoney.cli import run_main
from nanostoney.curriculum import FIRST_ORDINARY, span_row, tie_embedding
from nanostoney.errors import UserError
from nanostoney.gpt import GPT, config_for_depth
from nanostoney.interp.attention import induction_gain, induction_scores, order_gain
from nanostoney.tokenizer import Tokenizer


def alphabet_row(rng, tok, seq_len, alphabet, local=0):
    """span_row's shape (a span of 8-40 tokens repeated 2-3 times, 0-6 tokens between) over the
    first `alphabet` ordinary tokens (0: all of them). local > 0 draws the row's spans from `local`
    of those tokens, chosen afresh for each row: every token of the row is then in its context, so
    raising the context's tokens is worth little and only copying the next one lowers the loss,
    and no fixed small set of tokens can be learned by heart."""
    top = FIRST_ORDINARY + alphabet if alphabet else tok.vocab_size - len(tok.special_tokens)
    pool = rng.sample(range(FIRST_ORDINARY, top), local) if local else range(FIRST_ORDINARY, top)
    ids = []
    while len(ids) < seq_len + 1:
        span = [rng.choice(pool) for _ in range(rng.randint(8, 40))]
        ids.append(tok.bos_id)
        for _ in range(rng.randint(2, 3)):
            ids += span + [rng.choice(pool) for _ in range(rng.randint(0, 6))]
    return np.array(ids[:seq_len + 1], dtype=np.int64)


def alphabet_at(step, grow, alphabet):
    """The alphabet of this step: --grow "64:600,256:400" draws from 64 tokens for 600 steps, then
    256 for 400, then --alphabet (0: span_row)."""
    end = 0
    for size, steps in grow:
        end += steps
        if step < end:
            return size
    return alphabet


def grow_stages(text):
    """--grow "64:600,256:400" -> [(64, 600), (256, 400)]."""
    try:
        return [tuple(int(v) for v in stage.split(":", 1)) for stage in text.split(",") if stage]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a list of ALPHABET:STEPS pairs such as 64:600,256:400")


def drill_model(args, tok):
    """The CPU speedrun's depth-4 model; --tie shares lm_head with the embedding (scaled by
    --embedding-std so the logits start small). --init continues a drill checkpoint (--out),
    untied: lm_head is its own copy of the embedding, as in nanochat."""
    torch.manual_seed(args.seed)
    if args.init:
        model, saved_tok, _ = load_model(args.init)
        if saved_tok is None or saved_tok.vocab_size != tok.vocab_size:
            raise UserError(f"--init {args.init} was not trained with --tokenizer {args.tokenizer}; pass the tokenizer it was.")
        return model.train()
    model = GPT(config_for_depth(4, tok.vocab_size, args.sequence_len, args.head_dim))
    model.init_weights()
    if args.tie:
        tie_embedding(model, args.embedding_std)
    return model


def drill_optimizer(args, model):
    """nanochat's groups (optim.py), or "plain": one AdamW over every parameter at --matrix-lr."""
    if args.optimizer == "plain":
        return torch.optim.AdamW(model.parameters(), lr=args.matrix_lr or 1e-3, betas=(0.9, 0.95), weight_decay=0.0)
    return optim.build_optimizer(model, args.optimizer, matrix_lr=args.matrix_lr, embedding_lr=args.embedding_lr,
                                 unembedding_lr=args.unembedding_lr)


@torch.no_grad()
def probe_row(model, tok, step, alphabet, loss, t0):
    model.eval()
    scores = induction_scores(model, tok.vocab_size - len(tok.special_tokens), n_seqs=8, n_rep=24, bos_id=tok.bos_id)
    row = {"step": step, "gain": round(induction_gain(model, tok), 3), "order_gain": round(order_gain(model, tok), 3),
           "alphabet": alphabet,
           "alphabet_gain": round(induction_gain(model, tok, high=FIRST_ORDINARY + alphabet), 3) if alphabet else None,
           "induction_head": round(float(scores["induction"].mean(0).max()), 2),
           "previous_token_head": round(float(scores["previous_token_random"].mean(0).max()), 2),
           "loss": loss, "seconds": round(time.time() - t0)}
    model.train()
    return row


def main():
    p = cli.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tokenizer", default="out/tokenizer")
    p.add_argument("--steps", type=cli.positive_int, default=500)
    p.add_argument("--optimizer", default="adamw", choices=["adamw", "muon", "plain"])
    p.add_argument("--matrix-lr", type=cli.positive_float, default=None)
    p.add_argument("--head-dim", type=cli.positive_int, default=64)
    p.add_argument("--embedding-lr", type=cli.nonneg_float, default=0.2, help="0 freezes the embedding")
    p.add_argument("--unembedding-lr", type=cli.nonneg_float, default=0.004)
    p.add_argument("--tie", action="store_true", help="lm_head is the embedding (its LR: --embedding-lr)")
    p.add_argument("--embedding-std", type=cli.positive_float, default=0.05, help="with --tie: the embedding's init scale")
    p.add_argument("--alphabet", type=cli.nonneg_int, default=0, help="draw spans from this many tokens (0 = span_row)")
    p.add_argument("--local", type=cli.nonneg_int, default=0,
                   help="draw each row's spans from this many tokens of the alphabet, chosen afresh per row (0 = off)")
    p.add_argument("--grow", type=grow_stages, default=[], help='alphabet stages before --alphabet, e.g. "64:600,256:400"')
    p.add_argument("--rows", type=cli.positive_int, default=8)
    p.add_argument("--sequence-len", type=cli.positive_int, default=256)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--init", default=None, help="continue from this drill checkpoint (--out), untied")
    p.add_argument("--out", default=None, help="save the last step here as a checkpoint (bench.knowledge_probe reads it)")
    args = p.parse_args()
    torch.set_num_threads(1)
    tok = Tokenizer.load(args.tokenizer)
    if args.head_dim < 2:
        raise UserError(f"--head-dim {args.head_dim} is too small; rotary embeddings need at least 2 channels per head.")
    ordinary = tok.vocab_size - len(tok.special_tokens) - FIRST_ORDINARY
    if max([args.alphabet] + [size for size, _ in args.grow]) > ordinary:
        raise UserError(f"an alphabet in --alphabet/--grow is larger than the tokenizer's {ordinary} ordinary tokens; use at most {ordinary}.")
    if args.local > (args.alphabet or ordinary):
        raise UserError(f"--local {args.local} is more tokens than the alphabet has ({args.alphabet or ordinary}); use fewer.")
    model = drill_model(args, tok)
    opt = drill_optimizer(args, model)
    rng, t0, loss = random.Random(args.seed), time.time(), None
    for step in range(args.steps + 1):
        alphabet = alphabet_at(step, args.grow, args.alphabet)
        if step % 100 == 0 or step == args.steps:
            print(json.dumps(probe_row(model, tok, step, alphabet, loss, t0)), flush=True)
        if step == args.steps:
            break
        rows = [alphabet_row(rng, tok, args.sequence_len, alphabet, args.local) if alphabet or args.local
                else span_row(rng, tok, args.sequence_len) for _ in range(args.rows)]
        x = torch.from_numpy(np.stack(rows))
        loss_t = model(x[:, :-1].contiguous(), x[:, 1:].contiguous())
        loss_t.backward()
        loss = round(loss_t.item(), 3)
        opt.step()
        opt.zero_grad(set_to_none=True)
    if args.out:  # a tied lm_head is saved as its own copy of the embedding: the file loads untied
        save_checkpoint(args.out, model, args.steps, tokenizer=tok, meta={"drills": vars(args)})


if __name__ == "__main__":
    run_main(main)
