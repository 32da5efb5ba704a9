"""Copying first: a fresh GPT learns to copy from its context before it reads the corpus.

    python -m scripts.copy_train --tokenizer out/tokenizer --out out/copy            # 4,000 steps, CPU
    python -m scripts.base_train --init out/copy --arith-rows 2 --drill-rows 1       # then the corpus

A depth-4 model pretrained on the bundled corpus never copies from its context, nor does one
trained on copy drills with nanochat's untied, trained embedding. Repeated random spans
(curriculum.span_row) on 64-token rows, with lm_head tied to a frozen embedding, grow copying
in order over the whole vocabulary in 2,500-4,000 steps of 2,048 tokens (docs/science_log.md).
This stage trains exactly that. Its checkpoint holds lm_head as its own copy of the embedding,
so base_train --init continues it untied, as nanochat trains. Each evaluation prints the order
gain (interp.attention.order_gain: the induction gain less its shuffled-copy control);
copying is there when it passes ~1 nat.
"""
import os
import random

import numpy as np
import torch

from nanostoney import cli, curriculum, optim, stage, train
from nanostoney.dist import cleanup, print0
from nanostoney.errors import UserError
from nanostoney.gpt import GPT, config_for_depth
from nanostoney.interp.attention import induction_gain, order_gain
from nanostoney.logging import add_logging_args, from_args
from nanostoney.tokenizer import Tokenizer


def parse_args(argv=None):
    p = cli.ArgumentParser(description="Train a fresh GPT to copy from its context (the stage before base_train).")
    p.add_argument("--tokenizer", default="out/tokenizer", help="tokenizer dir from scripts.tok_train")
    p.add_argument("--depth", type=cli.positive_int, default=4,
                   help="layers; width = 64 x depth (nanochat's preset rule)")
    p.add_argument("--head-dim", type=cli.positive_int, default=64)
    p.add_argument("--sequence-len", type=cli.positive_int, default=256,
                   help="the model's context: that of the base_train run that continues it")
    p.add_argument("--row-len", type=cli.positive_int, default=64,
                   help="tokens per drill row (256-token rows grew no copying by step 400; 64 did)")
    p.add_argument("--embedding-std", type=cli.positive_float, default=0.05,
                   help="scale of the frozen embedding, which is also lm_head, so the logits start small")
    train.add_loop_args(p, num_iterations=4000, device_batch_size=32, eval_every=250, save_every=500, unit="tokens")
    # the measured recipe: constant LR, no clipping (bench.induction_drills trains this way)
    p.set_defaults(warmdown_ratio=0.0, grad_clip=0.0)
    optim.add_optim_args(p, optimizer="muon")
    add_logging_args(p)
    args = p.parse_args(argv)
    if args.row_len > args.sequence_len:
        p.error(f"--row-len {args.row_len} is longer than the model's --sequence-len {args.sequence_len}; "
                f"lower --row-len or raise --sequence-len")
    return args


def copy_model(args, tok):
    """A fresh GPT with nanochat's init whose embedding (and tied lm_head) stays frozen."""
    model = GPT(config_for_depth(args.depth, tok.vocab_size, args.sequence_len, args.head_dim))
    model.init_weights()
    curriculum.tie_embedding(model, args.embedding_std)
    model.transformer.wte.weight.requires_grad_(False)
    return model


def drill_batches(args, tok, info, accum):
    """get(step, micro): device-batch rows of repeated random spans, a pure function of the seed, the step
    and the micro-batch's place in the global batch, so N ranks train on what one process accumulates."""
    def get(step, micro):
        rng = random.Random(f"copy/{args.seed}/{step}/{info.rank * accum + micro}")
        rows = torch.from_numpy(np.stack([curriculum.span_row(rng, tok, args.row_len)
                                          for _ in range(args.device_batch_size)])).to(info.device)
        return rows[:, :-1].contiguous(), rows[:, 1:].contiguous()
    return get


def main(argv=None):
    args = parse_args(argv)
    if not os.path.isdir(args.tokenizer):
        raise UserError(f"tokenizer directory {args.tokenizer} does not exist; train one with "
                        f"python -m scripts.tok_train or pass --tokenizer.")
    tok = Tokenizer.load(args.tokenizer)
    if args.head_dim < 2:
        raise UserError(f"--head-dim {args.head_dim} is too small; rotary embeddings need at least 2 channels "
                        f"per head.")
    out, info = stage.start(args, "copy", {"--tokenizer": args.tokenizer})
    total_batch, accum = train.batch_geometry(args, info, args.row_len)
    model = copy_model(args, tok)
    train.place(model, info)
    mem = train.memory_plan("copy", model, args, info, args.row_len, accum)
    optimizer = optim.optimizer_from_args(model, args)
    geometry = {"total_batch_size": total_batch, "row_len": args.row_len, "seed": args.seed,
                "optimizer": args.optimizer, "tokenizer": tok.fingerprint()}
    resumed = train.resume(args, out, model, optimizer, info, expect=geometry)
    train_model = train.training_module(model, args, info)
    train.print_plan("copy", info, model, args.num_iterations, total_batch, "tokens",
                     f"{args.device_batch_size} x {args.row_len} x {info.world_size} proc x {accum} accum",
                     extra=f"repeated random spans, lm_head tied to the frozen embedding; "
                           f"~{mem.total / 1e9:.2f} GB per device")
    logger = from_args(args, out_dir=out, config={**vars(args), "model": vars(model.config), "grad_accum": accum,
                                                  "world_size": info.world_size, "num_params": model.num_params()})

    @torch.no_grad()
    def evaluate(step):
        model.eval()
        gain, order = induction_gain(model, tok), order_gain(model, tok)
        model.train()
        print0(f"step {step}: induction gain {gain:+.3f} nats, order gain {order:+.3f} (copying: > 1)")
        return {"copy/induction_gain": gain, "copy/order_gain": order}

    def save(step):
        train.save_run(out, model, step, optimizer, info, {**geometry, "stage": "copy"}, tokenizer=tok,
                       replace=args.overwrite)

    final = train.train_loop(info=info, model=model, optimizer=optimizer, args=args,
                             get_batch=drill_batches(args, tok, info, accum), grad_accum=accum,
                             start_step=resumed["step"], logger=logger, evaluate=evaluate, save=save,
                             train_model=train_model)
    logger.summary(final)
    logger.finish()
    print0(f"done: order gain {final['copy/order_gain']:+.3f} nats; checkpoint in {out} "
           f"(python -m scripts.base_train --init {out} continues it untied)")
    cleanup()


if __name__ == "__main__":
    cli.run_main(main)
