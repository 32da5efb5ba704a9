"""Benchmark BPE training: our rustbpe vs Hugging Face `tokenizers` vs PyPI `rustbpe` 0.1.0.

All three learn a byte-level BPE with the same split pattern and vocabulary size on the same
corpus of at least 30 MB: the bundled Stoney/AQuA/GSM8K text (~6 MB) followed by real text that
every machine with Python has offline, the standard library's sources and docs, read in sorted
path order, each distinct file once, until 30 MB. Nothing is repeated.

PyPI's rustbpe is a benchmark-only dependency. Install it apart from the project so it never
shadows anything, then point the benchmark at it:

    pip install --target /tmp/rustbpe010 rustbpe==0.1.0
    .venv/bin/python -m bench.tokenizer_bench --rustbpe010 /tmp/rustbpe010

Each trainer runs in its own fresh process (same corpus, same interpreter); the time is the
training call alone, best of --repeat runs, as wall time and as the process's CPU time (all
threads). Other load on the machine inflates wall time but hardly CPU time; compare ratios
measured in the same run.
"""
import argparse
import hashlib
import json
import os
import platform
import resource
import subprocess
import sys
import sysconfig
import time

from nanostoney import cli
from nanostoney.cli import run_main
from nanostoney.tokenizer import SPLIT_PATTERN

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

DOC_SUFFIXES = (".py", ".md", ".rst", ".txt")


def bundled_texts():
    """Every text field of the bundled data sets, in file order."""
    texts = []
    with open(os.path.join(REPO, "data/stoney/stoney_valid.jsonl"), encoding="utf-8") as f:
        for line in f:
            texts += [m["content"] for m in json.loads(line)["messages"]]
    for split in ("dev", "test"):
        with open(os.path.join(REPO, f"data/aqua_rat/{split}.json"), encoding="utf-8") as f:
            for line in f:
                d = json.loads(line)
                texts += [d["question"], "\n".join(d["options"]), d["rationale"]]
    for split in ("train", "test"):
        with open(os.path.join(REPO, f"data/gsm8k/{split}.jsonl"), encoding="utf-8") as f:
            for line in f:
                d = json.loads(line)
                texts += [d["question"], d["answer"]]
    return texts


def build_corpus(min_bytes):
    """(texts, {part: bytes}): the bundled data, then files of Python's standard library in
    sorted path order until `min_bytes`. The same Python version gives the same corpus."""
    texts = bundled_texts()
    parts = {"bundled data": sum(len(t.encode()) for t in texts)}
    total = parts["bundled data"]
    stdlib = sysconfig.get_paths()["stdlib"]
    paths = []
    for root, dirs, files in os.walk(stdlib):
        dirs[:] = sorted(d for d in dirs if d != "site-packages")  # only the standard library itself
        paths += [os.path.join(root, f) for f in files if f.endswith(DOC_SUFFIXES)]
    seen = set()
    for path in sorted(paths):
        if total >= min_bytes:
            break
        try:
            with open(path, encoding="utf-8") as f:
                text = f.read()
        except (UnicodeDecodeError, OSError):  # a few test files are deliberately not UTF-8
            continue
        digest = hashlib.sha1(text.encode()).digest()
        if not text.strip() or digest in seen:  # the same file twice is not new text
            continue
        seen.add(digest)
        texts.append(text)
        top = os.path.relpath(path, stdlib).split(os.sep)[0]
        parts[top] = parts.get(top, 0) + len(text.encode())
        total += len(text.encode())
    if total < min_bytes:
        sys.exit(f"only {total} bytes of text found, need {min_bytes}")
    return texts, parts


def cpu_seconds():
    """CPU time of this process, all threads: unlike wall time, barely moved by other load."""
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def train_once(trainer, texts, vocab_size, rustbpe010):
    """Trains once in this process; returns (wall seconds, cpu seconds, mergeable ranks as hex list)."""
    if trainer == "ours":
        import nanostoney_rustbpe
        tok = nanostoney_rustbpe.Tokenizer()
        t0, c0 = time.perf_counter(), cpu_seconds()
        tok.train_from_iterator(iter(texts), vocab_size, pattern=SPLIT_PATTERN)
        dt, dc = time.perf_counter() - t0, cpu_seconds() - c0
        return dt, dc, [b.hex() for b, _ in sorted(tok.get_mergeable_ranks(), key=lambda x: x[1])]
    if trainer == "rustbpe010":
        sys.path.insert(0, rustbpe010)
        import rustbpe
        tok = rustbpe.Tokenizer()
        t0, c0 = time.perf_counter(), cpu_seconds()
        tok.train_from_iterator(iter(texts), vocab_size, pattern=SPLIT_PATTERN)
        dt, dc = time.perf_counter() - t0, cpu_seconds() - c0
        return dt, dc, [b.hex() for b, _ in sorted(tok.get_mergeable_ranks(), key=lambda x: x[1])]
    if trainer == "hf":
        from tokenizers import Regex, Tokenizer, models, pre_tokenizers, trainers
        tok = Tokenizer(models.BPE())
        tok.pre_tokenizer = pre_tokenizers.Sequence([
            pre_tokenizers.Split(Regex(SPLIT_PATTERN), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ])
        trainer_ = trainers.BpeTrainer(vocab_size=vocab_size, show_progress=False, min_frequency=0,
                                       initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
        t0, c0 = time.perf_counter(), cpu_seconds()
        tok.train_from_iterator(texts, trainer_)
        dt, dc = time.perf_counter() - t0, cpu_seconds() - c0
        return dt, dc, None
    raise ValueError(trainer)


def main():
    p = cli.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--vocab-size", type=cli.positive_int, default=8192)
    p.add_argument("--min-mb", type=cli.positive_float, default=30.0, help="corpus size in MB (10^6 bytes)")
    p.add_argument("--repeat", type=cli.positive_int, default=3, help="runs per trainer; the best is reported")
    p.add_argument("--rustbpe010", default="/tmp/rustbpe010",
                   help="directory holding PyPI rustbpe==0.1.0 (pip install --target DIR rustbpe==0.1.0)")
    p.add_argument("--worker", help=argparse.SUPPRESS)  # internal: run one trainer, print JSON
    args = p.parse_args()
    min_bytes = int(args.min_mb * 1e6)

    if args.worker:
        texts, _ = build_corpus(min_bytes)
        dt, dc, ranks = train_once(args.worker, texts, args.vocab_size, args.rustbpe010)
        print(json.dumps({"seconds": dt, "cpu_seconds": dc, "ranks": ranks}))
        return

    texts, parts = build_corpus(min_bytes)
    total = sum(parts.values())
    print(f"corpus: {total / 1e6:.1f} MB in {len(texts)} texts ({os.cpu_count()} CPUs)")
    print(f"  bundled data (Stoney, AQuA, GSM8K) {parts.pop('bundled data') / 1e6:.1f} MB; "
          f"Python {platform.python_version()} standard library .py/.md/.rst/.txt files, {sum(parts.values()) / 1e6:.1f} MB, "
          f"sorted by path from {min(parts)} to {max(parts)} (largest: "
          + ", ".join(f"{k} {v / 1e6:.1f} MB" for k, v in sorted(parts.items(), key=lambda kv: -kv[1])[:4]) + ")")
    print(f"vocab size {args.vocab_size}, pattern {SPLIT_PATTERN!r}")

    trainers = [("ours", "nanostoney_rustbpe"), ("hf", "tokenizers BpeTrainer")]
    if os.path.isdir(os.path.join(args.rustbpe010, "rustbpe")):
        trainers.append(("rustbpe010", "PyPI rustbpe 0.1.0"))
    else:
        print(f"PyPI rustbpe 0.1.0 not found in {args.rustbpe010}; "
              f"install with: pip install --target {args.rustbpe010} rustbpe==0.1.0")

    best, best_cpu, ranks = {}, {}, {}
    for name, label in trainers:
        times, cpus = [], []
        for _ in range(args.repeat):
            cmd = [sys.executable, "-m", "bench.tokenizer_bench", "--worker", name, "--vocab-size", str(args.vocab_size),
                   "--min-mb", str(args.min_mb), "--rustbpe010", args.rustbpe010]
            out = json.loads(subprocess.run(cmd, check=True, capture_output=True, text=True).stdout)
            times.append(out["seconds"])
            cpus.append(out["cpu_seconds"])
            ranks[name] = out["ranks"]
        best[name], best_cpu[name] = min(times), min(cpus)
        print(f"{label:24s} wall {best[name]:6.2f} s  cpu {best_cpu[name]:6.2f} s   "
              f"(wall of each run: {', '.join(f'{t:.2f}' for t in times)})")
    for name, label in trainers[1:]:
        print(f"{label} / ours: {best[name] / best['ours']:.2f}x wall, {best_cpu[name] / best_cpu['ours']:.2f}x cpu")
    if "rustbpe010" in ranks:
        same = ranks["ours"] == ranks["rustbpe010"]
        print(f"same merges as PyPI rustbpe 0.1.0: {'yes' if same else 'NO'}")


if __name__ == "__main__":
    run_main(main)
