"""Train the BPE tokenizer (rustbpe) and save it for the training scripts.

    python -m scripts.tok_train                                  # bundled corpus, vocab 4096
    python -m scripts.tok_train --vocab-size 65536 --data my_corpus/ --out out/tokenizer
    python -m scripts.tok_train --vocab-size 65536 --data ~/.cache/nanostoney/fineweb-edu-100b-shuffle \
        --max-chars 2000000000                                   # nanochat's 2B characters of web text

Default corpus: the bundled data's train splits (nanostoney.tasks.corpus_texts), so no
held-out item shapes the vocabulary. `--data` takes the same files/dirs/globs/hub ids as
scripts.base_train; every source passes the governance gate first, and its documents stream
(a parquet row group at a time) into the trainer, up to --max-chars. `--vocab-size` counts the
256 byte tokens and the special tokens too, so it is the model's vocabulary size.
"""
import argparse
import os
import time

from nanostoney.data import add_manifest_arg, check_sources, expand_sources, gate_name, hub_documents, iter_documents
from nanostoney.errors import UserError, run_main
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
    p.add_argument("--max-chars", type=int, default=0, help="read at most this many characters (0 = all)")
    p.add_argument("--threads", type=int, default=None, help="threads for training (default: all cores)")
    return p.parse_args(argv)


def load_texts(args):
    """The training documents (an iterator), after the governance gate."""
    if args.data is None:
        check_sources(sources_for_tasks(CORPUS_TASKS), use="training", manifest=args.manifest)
        return iter(corpus_texts("train"))
    sources = expand_sources(args.data)
    check_sources([gate_name(s) for s in sources], use="training", manifest=args.manifest)
    return (t for s in sources
            for t in (iter_documents(s, args.text_column) if os.path.isfile(s)
                      else hub_documents(s, text_key=args.text_column)[1]) if t)


class Reading:
    """Passes documents through up to max_chars, counting them and keeping a sample (the first
    SAMPLE bytes) to measure the trained tokenizer on."""
    SAMPLE = 10_000_000

    def __init__(self, texts, max_chars):
        self.texts, self.max_chars, self.docs, self.chars, self.bytes, self.sample = texts, max_chars, 0, 0, 0, []

    def __iter__(self):
        for t in self.texts:
            if self.max_chars and self.chars >= self.max_chars:
                break
            t = t[:self.max_chars - self.chars] if self.max_chars else t
            self.docs, self.chars, self.bytes = self.docs + 1, self.chars + len(t), self.bytes + len(t.encode())
            if self.bytes <= self.SAMPLE:
                self.sample.append(t)
            yield t


def main(argv=None):
    args = parse_args(argv)
    if args.max_chars < 0:
        raise UserError(f"--max-chars {args.max_chars} is negative; give a character count or 0 for all.")
    reading = Reading(load_texts(args), args.max_chars)
    print(f"training on {'the first ' + format(args.max_chars, ',') + ' characters of ' if args.max_chars else ''}"
          f"the text, vocab size {args.vocab_size}")
    t0 = time.perf_counter()
    tok = Tokenizer.train(reading, args.vocab_size, num_threads=args.threads)
    print(f"trained in {time.perf_counter() - t0:.2f} s on {reading.docs} documents, {reading.bytes / 1e6:.2f} MB")
    tok.save(args.out)
    sample_bytes = sum(len(t.encode()) for t in reading.sample)
    n_tokens = sum(map(len, tok.encode_batch(reading.sample)))
    print(f"saved to {args.out}: {tok.vocab_size} tokens; {sample_bytes / max(1, n_tokens):.2f} bytes/token on "
          f"{'the' if sample_bytes == reading.bytes else 'the first ' + f'{sample_bytes / 1e6:.1f} MB of the'} "
          f"training text")
    for s in SAMPLES:
        pieces = [tok.decode([i]) for i in tok.encode(s)]
        print(f"  {s!r} -> {len(pieces)} tokens {pieces}")


if __name__ == "__main__":
    run_main(main)
