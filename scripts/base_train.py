"""Pretrain a GPT on a text corpus: one process, torchrun on 8 GPUs, or several nodes.

    python -m scripts.base_train --tokenizer out/tokenizer --out out/base            # CPU default
    torchrun --nproc_per_node=8 -m scripts.base_train --depth 20 --device-batch-size 32 \
        --sequence-len 2048 --num-iterations 5000 ...     # 8xH100: 32 x 2048 x 8 = 524288 tokens/step

Batch sizes are per device: a step is --device-batch-size rows of --sequence-len tokens on each
process, x --grad-accum-steps (so the global batch grows with the world size); an explicit
--total-batch-size fixes the global batch instead and must be a multiple of the per-pass size.

Default corpus: the bundled data's train splits (nanostoney.tasks.corpus_texts), held out
against the val splits of the same tasks. `--data` takes txt/jsonl/json/parquet files,
directories or globs, or a hub dataset id; every source passes the governance gate first.
The CPU default (depth 4 = 256 wide, 4 heads of 64; 256-token rows; 2048-token steps on one
process; 500 steps, about 1M tokens) is sized for about 5 minutes on 2 quiet cores. The default optimizer is AdamW:
on this CPU config Muon (--optimizer muon) reached the same val bpb per step (0.959 vs 0.959
after 300 steps) at about 19% more compute per step; see BENCHMARKS.md.
"""
import os


from nanostoney import batches, cli, evaluate, optim, train
from nanostoney.data import add_manifest_arg, check_sources, gated_documents
from nanostoney.dist import check_shared, cleanup, init_dist, print0
from nanostoney.errors import UserError, run_main
from nanostoney.gpt import GPT, config_for_depth
from nanostoney.logging import add_logging_args, from_args
from nanostoney.tasks import CORPUS_TASKS, corpus_texts, sources_for_tasks
from nanostoney.tokenizer import Tokenizer

SAMPLE_PROMPTS = ["The Stoney Nakoda word for", "Question: A farmer has 12 cows and buys 5 more.",
                  "Janet has three apples and"]


def parse_args(argv=None):
    p = cli.ArgumentParser(description="Pretrain a nanostoney GPT.")
    p.add_argument("--tokenizer", default="out/tokenizer", help="tokenizer dir from scripts.tok_train")
    p.add_argument("--data", nargs="+", default=None,
                   help="training text: files (txt/jsonl/json/parquet), dirs, globs or a hub id; "
                        "default: the bundled corpus")
    p.add_argument("--val-data", nargs="+", default=None,
                   help="validation text (same forms); default with --data: the last --val-docs documents")
    p.add_argument("--val-docs", type=cli.positive_int, default=100, help="documents held out of --data when no --val-data")
    p.add_argument("--text-column", default="text", help="field/column holding the text in jsonl/parquet/hub data")
    p.add_argument("--val-split", default="validation", help="split of a hub dataset given to --val-data")
    add_manifest_arg(p)
    p.add_argument("--depth", type=cli.positive_int, default=4, help="layers; width = 64 x depth (nanochat's preset rule)")
    p.add_argument("--head-dim", type=cli.positive_int, default=64)
    p.add_argument("--sequence-len", type=cli.positive_int, default=256)
    p.add_argument("--eval-tokens", type=cli.positive_int, default=32768, help="validation tokens per evaluation")
    p.add_argument("--sample-tokens", type=cli.nonneg_int, default=32, help="tokens per periodic sample (0 = no samples)")
    p.add_argument("--keep-last", type=cli.nonneg_int, default=2, help="checkpoints to keep (0 = all)")
    train.add_loop_args(p, num_iterations=500, device_batch_size=8, eval_every=100, save_every=250, unit="tokens",
                        sample_every=250, entropy_every=50)
    optim.add_optim_args(p, optimizer="adamw")
    add_logging_args(p)
    return p.parse_args(argv)


def load_corpus(args):
    """(train docs, val docs, the source files behind them), after the governance gate."""
    if args.data is None:
        sources = sources_for_tasks(CORPUS_TASKS)
        check_sources(sources, use="training", manifest=args.manifest)
        return corpus_texts("train"), corpus_texts("val"), sources
    docs, sources = gated_documents(args.data, args.manifest, args.text_column)
    if args.val_data:
        val_docs, val_sources = gated_documents(args.val_data, args.manifest, args.text_column, split=args.val_split)
        return docs, val_docs, sources + val_sources
    n_val = min(args.val_docs, len(docs) // 10)
    if n_val < 1:
        raise UserError(f"--data holds {len(docs)} documents, too few to hold out validation ones; "
                        f"add data or pass --val-data.")
    return docs[:-n_val], docs[-n_val:], sources


def main(argv=None):
    args = parse_args(argv)
    if not os.path.isdir(args.tokenizer):
        raise UserError(f"tokenizer directory {args.tokenizer} does not exist; train one with "
                        f"python -m scripts.tok_train or pass --tokenizer.")
    if args.head_dim < 2:
        raise UserError(f"--head-dim {args.head_dim} is too small; rotary embeddings need at least 2 channels per head.")
    out = cli.claim_out(args.out or "out/base", overwrite=args.overwrite, resume=args.resume is not None)
    info = train.apply_dtype(init_dist(args.device, seed=args.seed), args.dtype)
    check_shared({"--tokenizer": args.tokenizer})
    tok = Tokenizer.load(args.tokenizer)
    total_batch, accum = train.batch_geometry(args, info, args.sequence_len)

    train_docs, val_docs, sources = load_corpus(args)
    train_tokens = batches.tokenize_documents(tok, train_docs)
    val_tokens = batches.tokenize_documents(tok, val_docs)
    windows = batches.TokenWindows(train_tokens, args.sequence_len, seed=args.seed, what="training corpus")
    val_windows = batches.TokenWindows(val_tokens, args.sequence_len, shuffle=False, what="validation corpus")

    config = config_for_depth(args.depth, tok.vocab_size, args.sequence_len, args.head_dim)
    model = GPT(config)
    model.init_weights()
    model.to(info.device)
    optimizer = optim.optimizer_from_args(model, args)
    # what must not change between a run and its --resume (the data order depends on it)
    geometry = {"total_batch_size": total_batch, "sequence_len": args.sequence_len,
                "seed": args.seed, "optimizer": args.optimizer}
    start_step = train.resume(args, out, model, optimizer, info, expect=geometry)
    train_model = train.training_module(model, args, info, compile_default=True)
    loader = batches.PretrainBatches(windows, args.device_batch_size, accum, info)
    token_bytes = evaluate.token_byte_lengths(tok, info.device)

    run_config = {**vars(args), "model": vars(config), "grad_accum": accum, "world_size": info.world_size,
                  "num_params": model.num_params(), "flops_per_token": model.estimate_flops(),
                  "train_tokens": len(train_tokens), "val_tokens": len(val_tokens), "data_sources": sources}
    logger = from_args(args, config=run_config, out_dir=out)
    epochs = total_batch * args.num_iterations / len(train_tokens)
    train.print_plan("base", info, model, args.num_iterations, total_batch, "tokens",
                     f"{args.device_batch_size} x {args.sequence_len} x {info.world_size} proc x {accum} accum",
                     extra=f"corpus {len(train_tokens):,} train / {len(val_tokens):,} val tokens, {epochs:.2f} epochs; "
                           f"{config.n_head} heads, vocab {config.vocab_size}")

    def validate(step):
        rows = max(1, args.eval_tokens // args.sequence_len)
        bpb = evaluate.evaluate_bpb(model, batches.eval_batches(val_windows, args.device_batch_size, info, rows),
                                    token_bytes, info)
        print0(f"step {step}: val bpb {bpb:.4f}")
        return {"val/bpb": bpb}

    def sample(step):
        if not info.is_master or args.sample_tokens <= 0:
            return
        prompts = [[tok.bos_id] + tok.encode(p) for p in SAMPLE_PROMPTS]
        outs = evaluate.generate_completions(model, tok, prompts, max_new_tokens=args.sample_tokens)
        rows = [[p, c[0]] for p, c in zip(SAMPLE_PROMPTS, outs)]
        for p, c in rows:
            print0(f"  sample | {p}{c!r}")
        logger.log_table("samples", ["prompt", "completion"], rows, step=step)

    def save(step):
        meta = {**geometry, "data_position": loader.position(step), "data_sources": sources,
                "num_iterations": args.num_iterations, "stage": "base"}
        train.save_run(out, model, step, optimizer, info, meta, tokenizer_dir=args.tokenizer,
                       keep_last=args.keep_last or None, replace=args.overwrite)

    final = train.train_loop(info=info, model=model, optimizer=optimizer, args=args, get_batch=loader.get,
                             grad_accum=accum, start_step=start_step, logger=logger, evaluate=validate,
                             sample=sample, save=save, train_model=train_model)
    logger.summary(final)
    logger.finish()
    print0(f"done: val bpb {final.get('val/bpb', float('nan')):.4f}; checkpoint in {out}")
    cleanup()


if __name__ == "__main__":
    run_main(main)
