"""Reading txt / jsonl / json / parquet files and hub datasets, with errors that name the file.

Tasks read `bundled_rows` (data/) or `hub_rows` (source "hub" fails loudly, "auto" falls back to
the bundled file). --data corpora are expanded (`expand_sources`) and named for the governance
gate (`gate_name`); pretraining reads parquet only, so other text is written once into parquet
shards in the cache (NANOSTONEY_CACHE, default ~/.cache/nanostoney), keyed by a hash of its content.
"""
import functools
import glob
import hashlib
import itertools
import json
import os
import random
import socket
import sys
import urllib.parse
from pathlib import Path

from nanostoney.errors import UserError

DATA_DIR = Path(__file__).resolve().parent.parent / "data"

# Bundled files, relative to the data directory. AQuA's bundled dev set is our train split
# and its test set is cut into val/test; the Stoney file is cut 80/10/10 (see tasks/).
BUNDLED = {
    "stoney": {"all": "stoney/stoney_valid.jsonl"},
    "aqua": {"train": "aqua_rat/dev.json", "heldout": "aqua_rat/test.json"},
    "gsm8k": {"train": "gsm8k/train.jsonl", "test": "gsm8k/test.jsonl"},
    # not shipped: where a local copy is read from when present (tasks/mmlu.py), else the hub
    "mmmlu_yo": {"all": "mmmlu/mmlu_YO-NG.csv"},
    "mmlu_en": {"all": "mmlu/all_test.jsonl"},
}
# Hub copies: (dataset id, config, split). A hub copy only ever replaces the *training* pool;
# val/test stay the bundled ones so that evaluations are comparable between the two modes.
HUB = {
    "stoney": ("HarleyCooper/StoneyNakoda45k", None, "train"),
    "aqua": ("deepmind/aqua_rat", "raw", "train"),
    "gsm8k": ("openai/gsm8k", "main", "train"),
    "mmmlu_yo": ("openai/MMMLU", "YO_NG", "test"),
    "mmlu_en": ("cais/mmlu", "all", "test"),
}
SOURCES = ("bundled", "hub", "auto")
TEXT_EXTS = (".txt", ".jsonl", ".json", ".parquet")


def hub_label(family):
    """The name a hub source goes by in messages and in the manifest (path_glob hf://...)."""
    return "hf://" + HUB[family][0]


# -----------------------------------------------------------------------------
# JSON-lines files

def iter_jsonl(path):
    """(line number, value) of every non-blank line; a bad line or non-UTF-8 file is a UserError naming it."""
    try:
        with open(path, encoding="utf-8") as f:
            for lineno, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    yield lineno, json.loads(line)
                except json.JSONDecodeError as e:
                    raise UserError(f"{path}:{lineno}: malformed JSON line ({e.msg}); "
                                    f"fix or remove that line.") from None
    except UnicodeDecodeError:
        raise UserError(f"{path}: not UTF-8 text; convert it or leave it out.") from None


def read_jsonl(path):
    """Rows (JSON objects) of a JSON-lines file."""
    if not Path(path).is_file():
        raise UserError(f"data file {path} does not exist; check the path (bundled files live under {DATA_DIR}).")
    rows = []
    for lineno, row in iter_jsonl(path):
        if not isinstance(row, dict):
            raise UserError(f"{path}:{lineno}: expected a JSON object on each line, "
                            f"got {type(row).__name__}; fix that line.")
        rows.append(row)
    return rows


@functools.lru_cache(maxsize=32)
def _read_jsonl_cached(path, mtime, size):
    return read_jsonl(path)


def load_local(path):
    """Rows of a JSON-lines file, cached per process version (mtime, size); a fresh list."""
    path = Path(path).resolve()
    st = path.stat() if path.is_file() else None
    rows = _read_jsonl_cached(path, st and st.st_mtime_ns, st and st.st_size)
    if not rows:
        raise UserError(f"data file {path} has no rows; point at a file with one JSON object per line.")
    return [dict(r) for r in rows]


def bundled_path(family, part, data_dir=None):
    return Path(data_dir or DATA_DIR) / BUNDLED[family][part]


def bundled_rows(family, part, data_dir=None):
    """(rows, path) of a bundled file. `data_dir` swaps in a directory of the same layout."""
    path = bundled_path(family, part, data_dir)
    return load_local(path), str(path)


# -----------------------------------------------------------------------------
# the Hugging Face Hub

def _hub_reachable(timeout=3.0):
    """A quick TCP check, so an offline machine learns it in seconds rather than after `datasets`' retries."""
    if os.environ.get("HF_HUB_OFFLINE") in ("1", "true") or os.environ.get("HF_DATASETS_OFFLINE") in ("1", "true"):
        return True
    host = urllib.parse.urlparse(os.environ.get("HF_ENDPOINT", "https://huggingface.co")).hostname
    try:
        socket.create_connection((host, 443), timeout=timeout).close()
        return True
    except OSError:
        return False


def hub_dataset(name, config=None, split="train"):
    """A Hugging Face hub dataset, or a UserError naming it when it cannot be loaded."""
    import datasets  # lazy: heavy, and only hub users need it (the core path reads local files)
    datasets.disable_progress_bars()
    if not _hub_reachable():
        raise UserError(f"the Hugging Face Hub is unreachable, so {name} cannot be loaded; "
                        "check the connection or use local files.")
    try:
        return datasets.load_dataset(name, config, split=split)
    except Exception as e:  # offline, no such dataset or split, gated...: all the same to the user
        raise UserError(f"could not load {name} (split {split}) from the Hugging Face Hub "
                        f"({type(e).__name__}); check the name and the connection, or use local files.") from None


@functools.lru_cache(maxsize=8)
def _load_hub(family):
    name, config, split = HUB[family]
    return hub_dataset(name, config, split).to_list()


def hub_rows(family, source):
    """(rows, "hf://id") of the hub's training pool, or None when the bundled file should be used."""
    if source == "bundled":  # (get_task has checked `source`)
        return None
    try:
        rows = _load_hub(family)
    except UserError:
        if source == "hub":
            raise
        print(f"note: the Hugging Face Hub is unreachable for {HUB[family][0]}, so the bundled "
              f"{BUNDLED[family].get('train', BUNDLED[family].get('all'))} is used instead.", file=sys.stderr)
        return None
    if not rows:
        raise UserError(f"{hub_label(family)} returned no rows; use the bundled files (source='bundled').")
    return [dict(r) for r in rows], hub_label(family)


# -----------------------------------------------------------------------------
# --data corpora: documents of files, directories, globs or a hub dataset

def expand_sources(sources):
    """Files and hub ids of --data values: a file, a directory (its data files, sorted), a glob, a hub id."""
    out = []
    for src in sources:
        pattern = any(ch in src for ch in "*?[")
        if os.path.isdir(src):
            files = sorted(f for f in glob.glob(os.path.join(src, "**", "*"), recursive=True) if f.endswith(TEXT_EXTS))
            why = f"the directory has no {'/'.join(TEXT_EXTS)} files"
        elif os.path.isfile(src) or looks_like_hub_id(src) and not pattern:
            files, why = [src], None
        elif pattern:
            files, why = sorted(glob.glob(src)), "the pattern matches no file"
        else:
            raise UserError(f"--data {src}: no such file or directory (nor a hub dataset id like owner/name).")
        if not files:
            raise UserError(f"--data {src}: {why}.")
        out += files
    return out


def looks_like_hub_id(src):
    return src.count("/") == 1 and not src.startswith((".", "/")) and not src.endswith(TEXT_EXTS)


def gate_name(src):
    """How the governance manifest names a source: a local path, or hf://owner/name."""
    return src if os.path.exists(src) or "://" in src else "hf://" + src  # (generated://... names itself)


def _record_text(rec, where, text_key):
    """The text of one JSON record: rec[text_key], or a chat's message contents joined."""
    if isinstance(rec, dict) and isinstance(rec.get(text_key), str):
        return rec[text_key]
    if isinstance(rec, dict) and isinstance(rec.get("messages"), list):
        try:
            return "\n".join(m["content"] for m in rec["messages"])
        except (TypeError, KeyError):
            raise UserError(f"{where}: 'messages' must be a list of {{role, content}} objects.") from None
    raise UserError(f"{where}: the record has no string {text_key!r} field (nor 'messages'); "
                    f"pass --text-column to name the text field.")


def iter_documents(path, text_key="text", max_chars=None):
    """Documents of one local file: a .txt is one, a .jsonl/.json one a line, a .parquet one a row.
    max_chars: documents come in pieces of at most that many characters (a .txt read in blocks)."""
    if path.endswith(".parquet"):
        docs = _parquet_documents(path, text_key)
    elif path.endswith(".txt"):
        docs = _text_blocks(path, max_chars)
    else:
        docs = (_record_text(rec, f"{path}:{lineno}", text_key) for lineno, rec in iter_jsonl(path))
    return _cut(docs, max_chars)


def _cut(docs, max_chars):
    for doc in docs:
        yield from (pieces(doc, max_chars) if max_chars else [doc])


def check_readable(path):
    """A UserError naming `path` (and the line) when it is missing, not UTF-8, or malformed. Hub ids are not read."""
    path = str(path)
    if path.startswith("hf://") or looks_like_hub_id(path) and not os.path.exists(path):
        return
    if not os.path.isfile(path):
        raise UserError(f"{path} does not exist or is not a file; check the path.")
    if path.endswith(".parquet"):  # its first text column (the check reads that one)
        schema = open_parquet(path).schema_arrow
        column = next((f.name for f in schema if is_text(f.type)), (schema.names or ["text"])[0])
        next(_parquet_documents(path, column), None)
    else:
        for _ in _text_blocks(path, 1 << 20) if path.endswith(".txt") else iter_jsonl(path):
            pass


def pieces(text, max_chars):
    """`text` in pieces of at most max_chars, each cut before the last whitespace of its second half, if any."""
    while len(text) > max_chars:
        cut = max(text.rfind(" ", max_chars // 2, max_chars), text.rfind("\n", max_chars // 2, max_chars))
        cut = cut if cut > 0 else max_chars
        yield text[:cut]
        text = text[cut:]
    if text:
        yield text


def _text_blocks(path, max_chars):
    try:
        with open(path, encoding="utf-8") as f:
            if not max_chars:
                yield f.read()
                return
            rest = ""
            while block := f.read(max_chars):
                *done, rest = pieces(rest + block, max_chars)
                yield from done
            if rest:
                yield rest
    except UnicodeDecodeError:
        raise UserError(f"{path}: not UTF-8 text; convert it or leave it out.") from None


def parquet_error(where, e):
    first = (str(e).splitlines() or [""])[0][:200]
    return UserError(f"{where}: not a readable parquet file ({type(e).__name__}: {first}); re-download or remove it.")


def open_parquet(path):
    import pyarrow.parquet as pq  # lazy: the core path imports without pyarrow
    try:
        return pq.ParquetFile(path)
    except Exception as e:
        raise parquet_error(path, e) from None


def parquet_rows(path):
    table = open_parquet(path)
    try:
        return table.read().to_pylist()
    except Exception as e:
        raise parquet_error(path, e) from None


def is_text(kind):
    return str(kind) in ("string", "large_string")


def check_text_column(path, schema, column):
    if column not in schema.names:
        raise UserError(f"{path}: no {column!r} column (columns: {', '.join(schema.names)}); pass --text-column.")
    kind = schema.field(column).type
    if not is_text(kind):
        raise UserError(f"{path}: column {column!r} holds {kind}, not text; pass --text-column naming the text column.")


def _parquet_documents(path, text_key):
    table = open_parquet(path)
    check_text_column(path, table.schema_arrow, text_key)
    for batch in table.iter_batches(columns=[text_key]):
        yield from (t for t in batch.column(0).to_pylist() if t)


def hub_documents(name, split="train", text_key="text"):
    """(the dataset's fingerprint, its documents streamed) of a hub dataset split."""
    ds = hub_dataset(name, split=split)
    if text_key not in ds.column_names:
        raise UserError(f"hub dataset {name}: no {text_key!r} column (columns: "
                        f"{', '.join(ds.column_names)}); pass --text-column.")
    return ds._fingerprint, (t for batch in ds.iter(batch_size=1024) for t in batch[text_key] if t)


def stream_documents(sources, text_key="text", split="train", max_chars=None):
    """The documents of gated sources one at a time."""
    for src in sources:
        yield from (iter_documents(src, text_key, max_chars) if os.path.isfile(src)
                    else _cut(hub_documents(src, split, text_key)[1], max_chars))


# -----------------------------------------------------------------------------
# the cache of text converted to parquet (what pretraining reads)

CACHE_ROW_GROUP = 64  # documents per row group in the shards we write (units small enough to mix)


def cache_dir():
    return os.environ.get("NANOSTONEY_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "nanostoney")


def cached_shard(name, key, docs, column="text"):
    """<cache>/corpus/<name>-<key>.parquet, written from `docs` the first time only, CACHE_ROW_GROUP rows a
    row group, to a temporary name then renamed (a killed writer leaves no half shard)."""
    path = os.path.join(cache_dir(), "corpus", f"{name}-{key[:20]}.parquet")
    if os.path.isfile(path):
        return path
    import pyarrow as pa
    import pyarrow.parquet as pq
    os.makedirs(os.path.dirname(path), exist_ok=True)
    tmp = f"{path}.tmp-{os.getpid()}"
    schema = pa.schema([(column, pa.string())])
    rows = 0
    try:
        with pq.ParquetWriter(tmp, schema, write_statistics=False) as writer:
            docs = iter(docs)
            while chunk := list(itertools.islice(docs, CACHE_ROW_GROUP)):
                writer.write_table(pa.table({column: chunk}, schema=schema))
                rows += len(chunk)
        if rows == 0:
            raise UserError(f"{path}: the source holds no documents; check the files and --text-column.")
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    return path


def texts_shard(name, texts, column="text", seed=0):
    """Texts as one cached shard, in a seeded shuffled order so that each row group mixes their tasks."""
    order = list(texts)
    random.Random(seed).shuffle(order)
    key = hashlib.sha256(f"{seed}\0".encode() + b"".join(t.encode() + b"\0" for t in order)).hexdigest()
    return cached_shard(name, key, order, column)


def file_shard(path, column="text"):
    """A txt/jsonl/json file as a cached shard, keyed by its bytes and the column."""
    h = hashlib.sha256(f"{column}\0".encode())
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    stem = os.path.splitext(os.path.basename(path))[0]
    return cached_shard(stem, h.hexdigest(), (t for t in iter_documents(path, column) if t), column)


def hub_shard(name, split, column="text"):
    """A hub dataset split as a cached shard, keyed by its `datasets` fingerprint."""
    fingerprint, docs = hub_documents(name, split, column)
    key = hashlib.sha256(f"{name}\0{split}\0{column}\0{fingerprint}".encode()).hexdigest()
    return cached_shard(name.replace("/", "--"), key, docs, column)


def parquet_files(sources, column="text", split="train"):
    """Parquet paths of gated, expanded sources: other files and hub datasets converted once into the cache."""
    return [src if src.endswith(".parquet") else file_shard(src, column) if os.path.isfile(src)
            else hub_shard(src, split, column) for src in sources]
