"""Train the BPE tokenizer (rustbpe) and save it for the training scripts.

    python -m scripts.tok_train                                  # bundled corpus, vocab 4096
    python -m scripts.tok_train --vocab-size 65536 --data my_corpus/ --out out/tokenizer
    torchrun --nproc_per_node=8 -m scripts.tok_train     # works too: rank 0 trains, the others wait

Default corpus: the bundled data's train splits (nanostoney.tasks.corpus_texts), so no
held-out item shapes the vocabulary. `--data` takes the same files/dirs/globs/hub ids as
scripts.base_train; every source passes the governance gate first. `--vocab-size` counts the 256
byte tokens and the special tokens too, so it is the model's vocabulary size.
"""
import argparse
import time

from nanostoney.data import add_manifest_arg, check_sources, gated_documents
from nanostoney.dist import barrier, cleanup, init_dist
from nanostoney.errors import run_main
from nanostoney.tasks import CORPUS_TASKS, corpus_texts, sources_for_tasks
from nanostoney.tokenizer import Tokenizer

SAMPLES = ["îchiyach", "yuṯẖach", "owîchakiyayaktach", "Janet’s ducks lay 16 eggs per day.", "12345 + 678 = 13023"]


def parse_args(argv=None):
    p = argparse.ArgumentParser(description="Train the nanostoney BPE tokenizer.")
    p.add_argument("--vocab-size", type=int, default=4096, help="total vocabulary: bytes + merges + special tokens")
    p.add_argument("--out", default="out/tokenizer", help="directory to write tokenizer.json into")
    p.add_argument("--data", nargs="+", default=None,
                   help="training text: files (txt/jsonl/json/parquet), dirs, globs or a hub id; default: the bundled corpus")
    p.add_argument("--text-column", default="text", help="field/column holding the text in jsonl/parquet/hub data")
    add_manifest_arg(p)
    p.add_argument("--threads", type=int, default=None, help="threads for training (default: all cores)")
    return p.parse_args(argv)


def load_texts(args):
    """The training documents, after the governance gate."""
    if args.data is None:
        check_sources(sources_for_tasks(CORPUS_TASKS), use="training", manifest=args.manifest)
        return corpus_texts("train")
    return gated_documents(args.data, args.manifest, args.text_column)[0]


def main(argv=None):
    args = parse_args(argv)
    # under torchrun (the pipeline's --nproc) rank 0 trains and saves; the others wait for it
    info = init_dist("cpu")
    texts = load_texts(args)  # on every rank: bad input stops them all, none waits
    if info.is_master:
        train(args, texts)
    barrier()
    cleanup()


def train(args, texts):
    n_bytes = sum(len(t.encode()) for t in texts)
    print(f"training on {len(texts)} documents, {n_bytes / 1e6:.2f} MB, vocab size {args.vocab_size}")
    t0 = time.perf_counter()
    tok = Tokenizer.train(texts, args.vocab_size, num_threads=args.threads)
    print(f"trained in {time.perf_counter() - t0:.2f} s")
    tok.save(args.out)
    n_tokens = sum(map(len, tok.encode_batch(texts)))
    print(f"saved to {args.out}: {tok.vocab_size} tokens; {n_bytes / n_tokens:.2f} bytes/token on the training text")
    for s in SAMPLES:
        pieces = [tok.decode([i]) for i in tok.encode(s)]
        print(f"  {s!r} -> {len(pieces)} tokens {pieces}")


if __name__ == "__main__":
    run_main(main)
