"""Pretraining on a large parquet corpus: peak memory and time to the first step (issue 17).

    .venv/bin/python -m bench.corpus_bench                   # 228 MB of parquet in 5 shards, depth 2

Builds the corpus once under --dir: shard_00000 .. shard_0000N.parquet of documents cut from the
Python standard library's sources (text every machine with Python has offline; nothing from the
Stoney data), 1024 documents per row group as in nanochat's shards, until the files weigh --mb;
a manifest approving exactly those files; a 4096-token tokenizer trained on their first 8 MB.
Then runs scripts.base_train on it as a user would and watches the process: peak RSS (VmHWM),
peak private memory (RssAnon: RSS less the shared libraries' pages), seconds from launch to the
printed plan and to the end of the first optimizer step (validation only at the end), and steps
per second after that; and, in this process, the seconds the loader takes to its first batch.
Before the streaming loader, base_train read and tokenized the whole corpus first: on 228 MB of
parquet it reached 24 GB and was killed before step 0 (issue 17).
"""
import argparse
import json
import os
import random
import subprocess
import sys
import sysconfig
import threading
import time

from nanostoney.cli import run_main
from nanostoney.errors import UserError

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MANIFEST = """schema_version: "1.0"
records:
  - source_id: corpus_bench
    path_glob: "shard_*.parquet"
    data_type: benchmark_text
    origin: windows of the Python standard library's source files, written by bench/corpus_bench.py
    rights_holder: Python Software Foundation
    permission_status: approved_for_training
    license: PSF-2.0
    allowed_uses:
      - training
    prohibited_uses: []
    contains_sensitive_content: false
    review_contact: "nanostoney maintainers"
    notes: "benchmark corpus; never leaves the machine"
"""


def parse_args(argv=None):
    p = argparse.ArgumentParser(description="Peak memory and time to the first step on a large parquet corpus.")
    p.add_argument("--dir", default="out/bench_corpus", help="where the corpus, tokenizer and run go")
    p.add_argument("--mb", type=float, default=228.0, help="size of the parquet files together (MB)")
    p.add_argument("--shards", type=int, default=5)
    p.add_argument("--depth", type=int, default=2)
    p.add_argument("--steps", type=int, default=30, help="optimizer steps of the run")
    args = p.parse_args(argv)
    if args.mb <= 0 or args.shards < 1 or args.depth < 1 or args.steps < 2:
        raise UserError("--mb must be positive, --shards and --depth at least 1, --steps at least 2.")
    return args


def documents(seed=0):
    """Endless documents: 20-400 consecutive lines from a random standard-library source file."""
    root = sysconfig.get_paths()["stdlib"]
    files = sorted(os.path.join(d, f) for d, _, fs in os.walk(root) for f in fs if f.endswith(".py"))
    texts = []
    for path in files:
        try:
            with open(path, encoding="utf-8") as f:
                lines = f.read().splitlines()
        except (UnicodeDecodeError, OSError):
            continue
        if len(lines) > 20:
            texts.append(lines)
    rng = random.Random(seed)
    while True:
        lines = rng.choice(texts)
        start = rng.randrange(len(lines))
        yield "\n".join(lines[start:start + rng.randint(20, 400)])


def build_corpus(args):
    """The shards (written once), their manifest and a tokenizer; returns the shard paths."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    os.makedirs(args.dir, exist_ok=True)
    paths = [os.path.join(args.dir, f"shard_{i:05d}.parquet") for i in range(args.shards)]
    if not all(os.path.isfile(p) for p in paths):
        docs = documents()
        for path in paths:
            tmp = path + ".tmp"
            with pq.ParquetWriter(tmp, pa.schema([("text", pa.string())])) as writer:
                while os.path.getsize(tmp) < args.mb * 1e6 / args.shards:
                    writer.write_table(pa.table({"text": [next(docs) for _ in range(1024)]}))
            os.replace(tmp, path)
    with open(os.path.join(args.dir, "MANIFEST.yml"), "w") as f:
        f.write(MANIFEST)
    tok_dir = os.path.join(args.dir, "tok")
    if not os.path.isfile(os.path.join(tok_dir, "tokenizer.json")):
        from nanostoney.tokenizer import Tokenizer
        sample, n = [], 0
        for t in pq.read_table(paths[0], columns=["text"]).column("text").to_pylist():
            sample.append(t)
            n += len(t)
            if n > 8e6:
                break
        Tokenizer.train(sample, 4096).save(tok_dir)
    return paths


def watch(cmd, metrics_path):
    """Run cmd; poll its memory and its metrics.jsonl. Returns the measurements."""
    t0 = time.time()
    proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env={**os.environ, "PYTHONUNBUFFERED": "1"})
    out = {"peak_rss_mb": 0.0, "peak_private_mb": 0.0, "first_step_s": None}
    lines = []  # (seconds since launch, line), read on a thread so polling never blocks
    reader = threading.Thread(target=lambda: lines.extend((time.time() - t0, line) for line in proc.stdout))
    reader.start()
    while proc.poll() is None:
        try:
            with open(f"/proc/{proc.pid}/status") as f:
                status = dict(line.split(":", 1) for line in f)
            out["peak_rss_mb"] = max(out["peak_rss_mb"], int(status["VmHWM"].split()[0]) / 1024)
            out["peak_private_mb"] = max(out["peak_private_mb"], int(status["RssAnon"].split()[0]) / 1024)
        except (OSError, KeyError, ValueError):
            pass
        time.sleep(0.05)
    reader.join()
    if proc.returncode != 0:
        raise UserError(f"base_train failed (exit {proc.returncode}): {lines[-1][1].strip() if lines else ''}")
    steps = [json.loads(line) for line in open(metrics_path) if '"train/loss"' in line]
    out["plan_s"] = next((t for t, line in lines if line.startswith("plan:")), None)
    out["plan"] = next((line.strip() for _, line in lines if line.startswith("plan:")), None)
    out["first_step_s"] = steps[0]["time"] - t0
    out["steps_per_s"] = (len(steps) - 1) / (steps[-1]["time"] - steps[0]["time"])
    out["wall_s"] = time.time() - t0
    return out


def first_batch_seconds(args, paths):
    """Seconds from nothing to the first batch in this process: footers, first row group, tokens."""
    from types import SimpleNamespace

    import torch

    from nanostoney import loader
    from nanostoney.tokenizer import Tokenizer
    tok = Tokenizer.load(os.path.join(args.dir, "tok"))
    t0 = time.perf_counter()
    corpus, _ = loader.Corpus(paths).split_last()
    info = SimpleNamespace(rank=0, world_size=1, local_rank=0, device=torch.device("cpu"))
    loader.PretrainLoader(corpus, tok, 256, 8, 1, info).get(0, 0)
    return time.perf_counter() - t0


def main(argv=None):
    args = parse_args(argv)
    paths = build_corpus(args)
    run_dir = os.path.join(args.dir, "run")
    cmd = [sys.executable, "-m", "scripts.base_train", "--tokenizer", os.path.join(args.dir, "tok"),
           "--data", *paths, "--manifest", os.path.join(args.dir, "MANIFEST.yml"), "--depth", str(args.depth),
           "--num-iterations", str(args.steps), "--eval-every", "0", "--save-every", "0",
           "--sample-tokens", "0", "--wandb", "disabled", "--device", "cpu", "--out", run_dir]
    if os.path.exists(os.path.join(run_dir, "metrics.jsonl")):
        os.remove(os.path.join(run_dir, "metrics.jsonl"))
    result = {"loader_first_batch_s": first_batch_seconds(args, paths)}
    result.update(watch(cmd, os.path.join(run_dir, "metrics.jsonl")))
    result.update(parquet_mb=sum(os.path.getsize(p) for p in paths) / 1e6, shards=len(paths), depth=args.depth,
                  steps=args.steps, command=" ".join(cmd[1:]))
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    run_main(main)
