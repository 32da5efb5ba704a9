"""Download FineWeb-Edu shards for web pretraining into the cache (run_stoney_small.sh --pretrain web).

    python -m scripts.download_corpus --num-shards 8        # about 0.8 GB: the tokenizer's text
    python -m scripts.download_corpus --tokens 3.7e9        # enough shards for 3.7B training tokens

nanochat's karpathy/fineweb-edu-100b-shuffle: FineWeb-Edu (ODC-By 1.0) in shuffled parquet shards
of about 250M characters, into <cache>/fineweb-edu-100b-shuffle/, which the manifest record
fineweb_edu_100b_shuffle approves (the gate is checked). Shards already there are kept; each is
written under a temporary name and renamed. Then: python -m scripts.base_train --data <that folder>.
"""
import math
import os
import time
from concurrent.futures import ThreadPoolExecutor

from nanostoney import cli, loader
from nanostoney.cli import run_main
from nanostoney.errors import UserError
from nanostoney.governance import add_manifest_arg, check_sources
from nanostoney.sources import cache_dir

REPO = "karpathy/fineweb-edu-100b-shuffle"
FOLDER = "fineweb-edu-100b-shuffle"
NUM_SHARDS = 1823
SHARD = "shard_{:05d}.parquet"
# about 250M characters a shard at about 4.8 characters per token (nanochat's 65,536-token
# tokenizer on FineWeb-Edu): a planning figure; base_train prints the measured estimate
TOKENS_PER_SHARD = 50e6


def parse_args(argv=None):
    p = cli.ArgumentParser(description="Download FineWeb-Edu parquet shards for pretraining.")
    g = p.add_mutually_exclusive_group(required=True)
    g.add_argument("--num-shards", type=cli.positive_int, help="shards to have (the first N)")
    g.add_argument("--tokens", type=cli.positive_float, help=f"enough shards for this many training tokens "
                                                             f"(~{TOKENS_PER_SHARD / 1e6:.0f}M tokens a shard)")
    p.add_argument("--out", type=cli.out_path, default=None,
                   help=f"folder (default <cache>/{FOLDER}); a folder nanostoney did not make is refused unless "
                        f"--overwrite, and even then no file of its is replaced")
    p.add_argument("--overwrite", action="store_true",
                   help="download into an --out that holds other files (none of theirs is replaced)")
    p.add_argument("--workers", type=cli.positive_int, default=4, help="parallel downloads")
    add_manifest_arg(p)
    return p.parse_args(argv)


def fetch(i, out, attempts=3):
    """One shard into `out` (a few attempts with a pause, then one sentence)."""
    from huggingface_hub import constants, hf_hub_download  # lazy: only this script downloads
    for attempt in range(attempts):
        try:
            return hf_hub_download(REPO, SHARD.format(i), repo_type="dataset", local_dir=out)
        except Exception as e:
            if constants.HF_HUB_OFFLINE or attempt == attempts - 1:
                why = "HF_HUB_OFFLINE is set" if constants.HF_HUB_OFFLINE else type(e).__name__
                raise UserError(f"could not download {SHARD.format(i)} of {REPO} ({why}); check the "
                                f"connection and run again (the shards already in {out} are kept).") from None
            time.sleep(2 ** attempt)


def main(argv=None):
    args = parse_args(argv)
    n = args.num_shards if args.num_shards is not None else math.ceil(args.tokens / TOKENS_PER_SHARD)
    if not 1 <= n <= NUM_SHARDS:
        raise UserError(f"{n} shards asked for; {REPO} has 1 to {NUM_SHARDS}.")
    out = args.out or os.path.join(cache_dir(), FOLDER)
    files = [os.path.join(out, SHARD.format(i)) for i in range(n)]
    missing = [i for i, f in enumerate(files) if not os.path.isfile(f)]
    # only the missing shards (and huggingface_hub's .cache) are written; the cache folder is ours by its place
    own = () if args.out is None else (".cache", *(SHARD.format(i) for i in missing))
    cli.claim_out(out, overwrite=args.overwrite or args.out is None, training=False, own=own)
    print(f"{n} shards of {REPO} in {out}: {n - len(missing)} there, {len(missing)} to download")
    if missing:
        from tqdm import tqdm
        with ThreadPoolExecutor(args.workers) as pool:
            list(tqdm(pool.map(lambda i: fetch(i, out), missing), total=len(missing), desc="shards"))
    corpus = loader.Corpus(files, what="downloaded corpus")  # every footer readable, a text column
    check_sources(files, use="training", manifest=args.manifest)
    size = sum(os.path.getsize(f) for f in files)
    print(f"ready: {n} shards, {size / 1e9:.2f} GB, {corpus.text_bytes / 1e9:.2f} GB of text "
          f"(~{n * TOKENS_PER_SHARD / 1e9:.1f}B tokens), approved for training; "
          f"python -m scripts.base_train --data {out}")


if __name__ == "__main__":
    run_main(main)
