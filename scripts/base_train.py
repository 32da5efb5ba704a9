"""Pretrain a GPT on a text corpus: one process, torchrun on 8 GPUs, or several nodes.

    python -m scripts.base_train --tokenizer out/tokenizer --out out/base --num-iterations 500   # CPU
    torchrun --nproc_per_node=8 -m scripts.base_train --depth 20 --device-batch-size 32 \
        --sequence-len 2048 --data ~/.cache/nanostoney/fineweb-edu-100b-shuffle   # 32 x 2048 x 8 = 524288 tokens/step

The bundled corpus (nanostoney/corpus.py) or `--data`, streamed by nanostoney/loader.py after the
governance gate. A fresh model on the bundled corpus runs the curriculum (nanostoney/curriculum.py);
--init continues pretraining a checkpoint (the speedrun's knowledge stage).
"""
import functools
import math
import os

import torch

from nanostoney import checkpoint, cli, corpus, curriculum, evaluate, loader, optim, published, stage, train
from nanostoney.dist import check_same_inputs, cleanup, local_rank_0_first, print0
from nanostoney.errors import UserError
from nanostoney.governance import add_manifest_arg, check_sources
from nanostoney.gpt import GPT, config_for_depth
from nanostoney.logging import add_logging_args, from_args
from nanostoney.sources import expand_sources, gate_name, parquet_files, texts_shard
from nanostoney.tasks import arith
from nanostoney.tokenizer import Tokenizer

# measured on the CPU config (docs/science_log.md)
CURRICULUM = curriculum.Curriculum(copy_steps=400, arith_rows=2, drill_rows=1)
SAMPLE_PROMPTS = ["The Stoney Nakoda word for", "Question: A farmer has 12 cows and buys 5 more.",
                  "Janet has three apples and"]


def parse_args(argv=None):
    p = cli.ArgumentParser(description="Pretrain a nanostoney GPT.")
    p.add_argument("--tokenizer", default="out/tokenizer", help="tokenizer dir from scripts.tok_train")
    p.add_argument("--init", default=None,
                   help="continue pretraining this checkpoint (a web base, a published nanochat model) instead of "
                        "a fresh model: its architecture and tokenizer (--depth, --head-dim, --tokenizer unused)")
    p.add_argument("--data", nargs="+", default=None,
                   help="training text: files (txt/jsonl/json/parquet), dirs, globs or a hub id; "
                        "default: the bundled corpus")
    p.add_argument("--val-data", nargs="+", default=None,
                   help="validation text (same forms); default with --data: its last row group")
    p.add_argument("--text-column", default="text", help="field/column holding the text in jsonl/parquet/hub data")
    p.add_argument("--val-split", default="validation", help="split of a hub dataset given to --val-data")
    add_manifest_arg(p)
    corpus.add_corpus_args(p)
    g = p.add_argument_group("curriculum (nanostoney/curriculum.py; default on a fresh model on the bundled corpus)")
    g.add_argument("--copy-steps", type=cli.nonneg_int, default=None,
                   help=f"first steps that read copy drills only (default {CURRICULUM.copy_steps}; else 0)")
    g.add_argument("--arith-rows", type=cli.nonneg_int, default=None,
                   help=f"rows of each device batch after the copy stage that are fresh train-split arith problems "
                        f"(default {CURRICULUM.arith_rows}; else 0)")
    g.add_argument("--drill-rows", type=cli.nonneg_int, default=None,
                   help=f"rows of each device batch after the copy stage that are copy drills "
                        f"(default {CURRICULUM.drill_rows}; else 0)")
    p.add_argument("--depth", type=cli.positive_int, default=4, help="layers; width = 64 x depth (nanochat's preset rule)")
    p.add_argument("--head-dim", type=cli.positive_int, default=64)
    p.add_argument("--sequence-len", type=cli.positive_int, default=256)
    p.add_argument("--target-param-data-ratio", type=cli.positive_float, default=20.0,
                   help="training tokens per parameter; sets the steps when --num-iterations is not given")
    p.add_argument("--eval-tokens", type=cli.positive_int, default=32768, help="validation tokens per evaluation")
    p.add_argument("--sample-tokens", type=cli.nonneg_int, default=32,
                   help="tokens per periodic sample (0 = no samples)")
    p.add_argument("--keep-last", type=cli.nonneg_int, default=2, help="checkpoints to keep (0 = all)")
    train.add_loop_args(p, num_iterations=None, device_batch_size=8, eval_every=100, save_every=None, unit="tokens",
                        sample_every=250, entropy_every=50)
    optim.add_optim_args(p, optimizer="adamw")
    add_logging_args(p)
    return p.parse_args(argv)


def load_corpus(args, info):
    """(train corpus, validation corpus, sources) after the governance gate, as parquet."""
    column = args.text_column
    train_src, val_src = expand_sources(args.data or []), expand_sources(args.val_data or [])
    sources = train_src + val_src if args.data else corpus.pretraining_sources(args.corpus_tasks)
    if args.arith_rows and arith.GATE_NAME not in sources:  # the curriculum's fresh problems
        sources = sources + [arith.GATE_NAME]
    check_sources([gate_name(s) for s in sources], use="training", manifest=args.manifest)

    def parquet():
        if args.data is None:  # the bundled corpus (nanostoney/corpus.py) and its validation text
            return ([texts_shard("bundled-train", corpus.pretraining_texts(args.augment, args.corpus_tasks), column)],
                    [texts_shard("bundled-val", corpus.validation_texts(args.corpus_tasks), column)])
        return parquet_files(train_src, column), parquet_files(val_src, column, args.val_split)

    train_files, val_files = local_rank_0_first(parquet, info)
    train_text = loader.Corpus(train_files, column, what="training corpus")
    if not val_files:
        return (*train_text.split_last(), sources)
    return train_text, loader.Corpus(val_files, column, what="validation corpus"), sources


def make_curriculum(args):
    """The flags, else CURRICULUM for a fresh model on the bundled corpus and none for --data / --init."""
    default = CURRICULUM if args.data is None and args.init is None else curriculum.Curriculum()
    c = curriculum.Curriculum(*(default.__dict__[k] if getattr(args, k) is None else getattr(args, k)
                                for k in ("copy_steps", "arith_rows", "drill_rows")), seed=args.seed)
    if c.arith_rows + c.drill_rows >= args.device_batch_size:
        raise UserError(f"--arith-rows {c.arith_rows} + --drill-rows {c.drill_rows} leave no corpus row of the "
                        f"{args.device_batch_size}-row device batch; lower them or raise --device-batch-size.")
    return c


def plan_steps(args, num_params, total_batch):
    """--num-iterations, or enough steps for --target-param-data-ratio tokens per parameter."""
    if args.num_iterations is None:
        args.num_iterations = max(1, math.ceil(args.target_param_data_ratio * num_params / total_batch))
    return args.num_iterations


def corpus_plan(args, num_params, total_batch, corpus, tok, plan):
    """(corpus tokens, the plan's words): what the run reads of the corpus against what it holds."""
    tokens = args.num_iterations * total_batch
    share = curriculum.corpus_rows(plan, args.device_batch_size) / args.device_batch_size
    read = max(0, args.num_iterations - plan.copy_steps) * total_batch * share
    have, exact = loader.estimate_tokens(corpus, tok)
    epochs = read / max(1, have)
    words = (f"{tokens / num_params:.1f} tokens per parameter; training corpus {'' if exact else '~'}{have:,} tokens "
             f"({corpus.text_bytes / 1e6:,.1f} MB of text in {len(corpus.units):,} row groups): {epochs:.2f} epochs")
    if epochs > 1:
        print0(f"warning: this run reads its training corpus {epochs:.1f} times; add data (python -m "
               f"scripts.download_corpus) or lower --num-iterations / --target-param-data-ratio.")
    return have, words


def check_start(args):
    """What the run starts from exists, before --out is claimed and the corpus read; and a fresh model
    whose blocks alone (12 x layers x width^2 parameters, 16 bytes each with gradient and AdamW
    moments) exceed the GPU's or machine's memory is refused before minutes of allocating."""
    if args.init:
        if not os.path.exists(published.resolve(args.init)):
            raise UserError(f"--init {args.init} does not exist; pass a checkpoint directory (a base run, a nanochat "
                            f"checkpoint dir) or hf:OWNER/NAME.")
        return
    if not os.path.isdir(args.tokenizer):
        raise UserError(f"tokenizer directory {args.tokenizer} does not exist; train one with "
                        f"python -m scripts.tok_train or pass --tokenizer.")
    if args.head_dim < 2:
        raise UserError(f"--head-dim {args.head_dim} is too small; rotary embeddings need at least 2 channels per head.")
    width = 64 * args.depth
    need = 16 * 12 * args.depth * width ** 2
    on_gpu = args.device.startswith("cuda") or args.device == "auto" and torch.cuda.is_available()
    if on_gpu:
        have, where = torch.cuda.get_device_properties(0).total_memory, "GPU memory"
    else:
        have, where = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"), "memory of this machine"
    if need > have:
        raise UserError(f"--depth {args.depth} makes a model of about {12 * args.depth * width ** 2:.2g} parameters, "
                        f"which needs about {need / 1e9:,.0f} GB for its weights, gradients and optimizer state, "
                        f"more than the {have / 1e9:,.0f} GB of {where}; pick a smaller --depth.")


def load_model(args):
    """(model, tokenizer): fresh with nanochat's initialisation, or --init's with every weight trainable."""
    if not args.init:
        tok = Tokenizer.load(args.tokenizer)
        model = GPT(config_for_depth(args.depth, tok.vocab_size, args.sequence_len, args.head_dim))
        model.init_weights()
        return model, tok
    model, tok, ckpt, _ = checkpoint.load_for_training(args.init, full=True)
    if args.sequence_len > model.config.sequence_len:
        raise UserError(f"--sequence-len {args.sequence_len} is longer than the {model.config.sequence_len} positions "
                        f"of --init {args.init}; pass --sequence-len {model.config.sequence_len} or less.")
    args.init = ckpt  # the checkpoint itself, for the run's meta and a --resume check
    return model, tok


def stage_name(init):
    """base for a fresh model or one from the copy stage (scripts.copy_train), else knowledge (continued pretraining)."""
    if init is None:
        return "base"
    return "base" if checkpoint.read_meta_if_any(init).get("stage") == "copy" else "knowledge"


def print_plan(args, info, model, total_batch, accum, train_corpus, tok, plan, val_rows, mem):
    """The plan on rank 0; returns the corpus tokens."""
    corpus_tokens, corpus_words = corpus_plan(args, model.num_params(), total_batch, train_corpus, tok, plan)
    train.print_plan("base", info, model, args.num_iterations, total_batch, "tokens",
                     f"{args.device_batch_size} x {args.sequence_len} x {info.world_size} proc x {accum} accum",
                     extra=f"{corpus_words}; {val_rows} validation rows; {model.config.n_head} heads, "
                           f"vocab {model.config.vocab_size}; a checkpoint every "
                           f"{args.save_every or args.num_iterations} steps")
    print0(plan.describe(args.num_iterations, args.device_batch_size))
    print0(f"base {mem.describe()}")
    return corpus_tokens


def sample(model, tok, args, info, logger, step):
    """Greedy continuations of SAMPLE_PROMPTS, printed and logged as a table (rank 0)."""
    if not info.is_master or args.sample_tokens <= 0:
        return
    prompts = [[tok.bos_id] + tok.encode(p) for p in SAMPLE_PROMPTS]
    outs = evaluate.generate_completions(model, tok, prompts, max_new_tokens=args.sample_tokens)
    rows = [[p, c[0]] for p, c in zip(SAMPLE_PROMPTS, outs)]
    for p, c in rows:
        print0(f"  sample | {p}{c!r}")
    logger.log_table("samples", ["prompt", "completion"], rows, step=step)


def main(argv=None):
    args = parse_args(argv)
    check_start(args)
    plan = make_curriculum(args)
    args.arith_rows = plan.arith_rows
    out, info = stage.start(args, "base", {"--init": args.init} if args.init else {"--tokenizer": args.tokenizer})
    total_batch, accum = train.batch_geometry(args, info, args.sequence_len)
    train_corpus, val_corpus, sources = load_corpus(args, info)
    # the model after the corpus: a corpus conversion's transient memory must not stack on the weights
    model, tok = load_model(args)
    check_same_inputs(sources, tok)  # several nodes: the same corpus files and tokenizer on every rank
    train.place(model, info)
    mem = train.memory_plan("base", model, args, info, args.sequence_len, accum, compile_default=True)
    plan_steps(args, model.num_params(), total_batch)
    if args.save_every is None:  # sized to the run: about ten checkpoints, none closer than 250 steps
        args.save_every = max(250, math.ceil(args.num_iterations / 10))
    optimizer = optim.optimizer_from_args(model, args)
    # what must not change between a run and its --resume (the data order depends on it)
    geometry = {"total_batch_size": total_batch, "sequence_len": args.sequence_len, "curriculum": vars(plan),
                "seed": args.seed, "optimizer": args.optimizer, "corpus": train_corpus.key(), "init": args.init,
                "tokenizer": tok.fingerprint()}
    resumed = train.resume(args, out, model, optimizer, info, expect=geometry)
    train_model = train.training_module(model, args, info, compile_default=True)
    data = loader.PretrainLoader(train_corpus, tok, args.sequence_len,
                                 curriculum.corpus_rows(plan, args.device_batch_size), accum, info, seed=args.seed,
                                 position=resumed.get("data_position"))
    get_batch = curriculum.batches(plan, data, tok, args.sequence_len, args.device_batch_size, info)
    val_rows = loader.validation_rows(val_corpus, tok, args.sequence_len, max(1, args.eval_tokens // args.sequence_len))
    token_bytes = evaluate.token_byte_lengths(tok, info.device)

    corpus_tokens = print_plan(args, info, model, total_batch, accum, train_corpus, tok, plan, len(val_rows), mem)
    logger = from_args(args, out_dir=out, config={
        **vars(args), "model": vars(model.config), "grad_accum": accum, "world_size": info.world_size,
        "num_params": model.num_params(), "flops_per_token": model.estimate_flops(), "train_tokens": corpus_tokens,
        "val_tokens": val_rows.numel(), "data_sources": sources})

    def validate(step):
        bpb = evaluate.evaluate_bpb(model, loader.eval_batches(val_rows, args.device_batch_size, info),
                                    token_bytes, info)
        print0(f"step {step}: val bpb {bpb:.4f}")
        return {"val/bpb": bpb}

    stage_label = stage_name(args.init)  # read once: the --init checkpoint's meta does not change

    def save(step):
        meta = {**geometry, "data_position": data.position(step), "data_sources": sources,
                "num_iterations": args.num_iterations, "stage": stage_label}
        train.save_run(out, model, step, optimizer, info, meta, tokenizer=tok,
                       keep_last=args.keep_last or None, replace=args.overwrite)

    final = train.train_loop(info=info, model=model, optimizer=optimizer, args=args, get_batch=get_batch,
                             grad_accum=accum, start_step=resumed["step"], logger=logger, evaluate=validate,
                             sample=functools.partial(sample, model, tok, args, info, logger), save=save,
                             train_model=train_model)
    logger.summary(final)
    logger.finish()
    print0(f"done: val bpb {final.get('val/bpb', float('nan')):.4f}; checkpoint in {out}")
    cleanup()


if __name__ == "__main__":
    cli.run_main(main)
