"""Train the BPE tokenizer (rustbpe) and save it for the training scripts.

    python -m scripts.tok_train                                  # bundled corpus, vocab 4096
    python -m scripts.tok_train --vocab-size 65536 --data my_corpus/ --out out/tokenizer
    python -m scripts.tok_train --vocab-size 65536 --data ~/.cache/nanostoney/fineweb-edu-100b-shuffle \
        --max-chars 2000000000                                   # nanochat's 2B characters of web text
    torchrun --nproc_per_node=8 -m scripts.tok_train     # works too: rank 0 trains, the others wait

Default corpus: base_train's pretraining text without fact renderings, so no control term and no
held-out arith problem shapes the vocabulary; `--data` takes what scripts.base_train takes, gated
first. `--vocab-size` counts the bytes and special tokens too: it is the model's vocabulary size.
"""
import time

from nanostoney import cli
from nanostoney.cli import run_main
from nanostoney.corpus import add_corpus_args, pretraining_sources, pretraining_texts
from nanostoney.dist import barrier, cleanup, init_dist
from nanostoney.governance import add_manifest_arg, check_sources, gated_sources
from nanostoney.sources import stream_documents
from nanostoney.tokenizer import Tokenizer

SAMPLES = ["îchiyach", "yuṯẖach", "owîchakiyayaktach", "Janet’s ducks lay 16 eggs per day.",
           "12345 + 678 = 13023"]
# text in pieces of at most this many characters, BUFFER at a time, so memory is bounded whatever the
# corpus (a 50 MB one-line JSONL took 10 GB encoded whole)
PIECE_CHARS = 1 << 14
BUFFER = 1024
SAMPLE_BYTES = 10_000_000  # the text the compression is measured on (all of it when smaller)
ENCODE_CHARS = 1 << 20  # the encoder keeps ~100 bytes per token: encode about 1M characters at a time
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_meta.json")  # what Tokenizer.save writes


def parse_args(argv=None):
    p = cli.ArgumentParser(description="Train the nanostoney BPE tokenizer.")
    p.add_argument("--vocab-size", type=cli.positive_int, default=4096,
                   help="total vocabulary: bytes + merges + special tokens")
    p.add_argument("--out", type=cli.out_path, default="out/tokenizer", help="directory to write tokenizer.json into")
    p.add_argument("--overwrite", action="store_true",
                   help="replace the tokenizer an earlier run wrote in --out, or write into an --out that holds "
                        "other files (none of theirs is replaced)")
    p.add_argument("--data", nargs="+", default=None, help="training text: files (txt/jsonl/json/parquet), "
                   "dirs, globs or a hub id; default: the bundled corpus")
    p.add_argument("--text-column", default="text", help="field/column holding the text in jsonl/parquet/hub data")
    add_manifest_arg(p)
    add_corpus_args(p, augment=False)
    p.add_argument("--max-chars", type=cli.nonneg_int, default=0, help="read at most this many characters (0 = all)")
    p.add_argument("--threads", type=cli.positive_int, default=None, help="threads for training (default: all cores)")
    return p.parse_args(argv)


def corpus(args):
    """The training text in pieces, after the governance gate."""
    if args.data is None:
        check_sources(pretraining_sources(args.corpus_tasks), use="training", manifest=args.manifest)
        return iter(pretraining_texts(0, args.corpus_tasks))
    sources = gated_sources(args.data, args.manifest)
    return stream_documents(sources, args.text_column, max_chars=PIECE_CHARS)


class Reading:
    """Text up to max_chars (0 = all), counted, its first SAMPLE_BYTES kept to measure the tokenizer on."""

    def __init__(self, texts, max_chars):
        self.texts, self.max_chars, self.pieces, self.chars, self.bytes, self.sample = texts, max_chars, 0, 0, 0, []

    def __iter__(self):
        for t in self.texts:
            if self.max_chars and self.chars >= self.max_chars:
                break
            t = t[:self.max_chars - self.chars] if self.max_chars else t
            self.pieces, self.chars, self.bytes = self.pieces + 1, self.chars + len(t), self.bytes + len(t.encode())
            if self.bytes <= SAMPLE_BYTES:
                self.sample.append(t)
            yield t


def count_tokens(tok, texts):
    """Tokens of the texts (pieces, or short bundled texts), encoded about ENCODE_CHARS characters at a time."""
    k = ENCODE_CHARS // PIECE_CHARS
    return sum(len(ids) for i in range(0, len(texts), k) for ids in tok.encode_batch(texts[i:i + k]))


def main(argv=None):
    args = parse_args(argv)
    info = init_dist("cpu")  # under torchrun rank 0 trains and saves; the others wait for it
    out = cli.claim_out(args.out, overwrite=args.overwrite, training=False, own=TOKENIZER_FILES + cli.SHARED_FILES,
                        finished=TOKENIZER_FILES)
    texts = corpus(args)  # on every rank: bad input stops them all, none waits
    if info.is_master:
        train(args, out, texts)
    barrier()
    cleanup()


def train(args, out, texts):
    reading = Reading(texts, args.max_chars)
    print(f"training on {'the first ' + format(args.max_chars, ',') + ' characters of ' if args.max_chars else ''}"
          f"{'the bundled corpus' if args.data is None else ' '.join(args.data)}, vocab size {args.vocab_size}")
    t0 = time.perf_counter()
    tok = Tokenizer.train(reading, args.vocab_size, num_threads=args.threads, buffer_size=BUFFER)
    print(f"trained on {reading.pieces} texts, {reading.bytes / 1e6:.2f} MB in {time.perf_counter() - t0:.2f} s")
    tok.save(out)
    sample_bytes = sum(len(t.encode()) for t in reading.sample)
    n_tokens = count_tokens(tok, reading.sample)
    print(f"saved to {out}: {tok.vocab_size} tokens; {sample_bytes / max(1, n_tokens):.2f} bytes/token on "
          f"{'the' if sample_bytes == reading.bytes else 'the first ' + f'{sample_bytes / 1e6:.1f} MB of the'} "
          f"training text")
    for s in SAMPLES:
        pieces = [tok.decode([i]) for i in tok.encode(s)]
        print(f"  {s!r} -> {len(pieces)} tokens {pieces}")


if __name__ == "__main__":
    run_main(main)
