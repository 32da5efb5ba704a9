"""Sources: reading any txt / jsonl / json / parquet file or hub dataset, with one error path.

1. Task data. Every task reads rows through `bundled_rows` (the JSON-lines files under data/) or
   `hub_rows` (the full sets on the Hugging Face Hub, for users who are online). The bundled
   files are the default. Asking for the hub explicitly (source="hub") and failing is an
   error; preferring it (source="auto") and failing prints one sentence and falls back to the
   bundled file.
2. Corpora given with --data (files, directories, globs or a hub id) are expanded by
   `expand_sources`, named for the governance gate (governance.py) by `gate_name` and read one
   document at a time by `iter_documents`, with errors that name the file and line.
3. Pretraining reads parquet only (loader.py): other text is written once into parquet shards in
   the cache (NANOSTONEY_CACHE, default ~/.cache/nanostoney), keyed by a hash of its content.
A parquet file that cannot be read is always the same sentence (`parquet_error`).
"""
import functools
import glob
import hashlib
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
    """(line number, value) of every non-blank line of a JSON-lines file. A bad line or a file
    that is not UTF-8 is a UserError naming it, so the user can open the file at the right place."""
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
    path = Path(path)
    if not path.is_file():
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
    """Rows of a local JSON-lines file, cached per process (keyed on the file's mtime and size,
    so an edited file is re-read). Returns a fresh list."""
    path = Path(path).resolve()
    if not path.is_file():
        raise UserError(f"data file {path} does not exist; check the path (bundled files live under {DATA_DIR}).")
    st = path.stat()
    rows = _read_jsonl_cached(path, st.st_mtime_ns, st.st_size)
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
    """A quick TCP check of the hub, so an offline machine learns it in seconds rather than
    after `datasets`' retries. Skipped when the user runs the hub offline from its cache."""
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
    """(rows, "hf://id") of the hub's training pool, or None when the bundled file should be
    used: source "bundled" never touches the network; "hub" fails loudly; "auto" says in
    one sentence that the hub is unreachable and returns None."""
    if source not in SOURCES:
        raise UserError(f"unknown data source {source!r}; use one of {', '.join(SOURCES)}.")
    if source == "bundled":
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
    """Files and hub ids from --data values: a file, a directory (its data files, sorted),
    a glob, or an owner/name hub dataset id (kept as is)."""
    out = []
    for src in sources:
        if os.path.isdir(src):
            files = sorted(f for f in glob.glob(os.path.join(src, "**", "*"), recursive=True)
                           if f.endswith(TEXT_EXTS))
            if not files:
                raise UserError(f"--data {src}: the directory has no {'/'.join(TEXT_EXTS)} files.")
            out.extend(files)
        elif os.path.isfile(src):
            out.append(src)
        elif any(ch in src for ch in "*?["):
            files = sorted(glob.glob(src))
            if not files:
                raise UserError(f"--data {src}: the pattern matches no file.")
            out.extend(files)
        elif looks_like_hub_id(src):
            out.append(src)
        else:
            raise UserError(f"--data {src}: no such file or directory (nor a hub dataset id "
                            f"like owner/name).")
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
            pass
        raise UserError(f"{where}: 'messages' must be a list of {{role, content}} objects.")
    raise UserError(f"{where}: the record has no string {text_key!r} field (nor 'messages'); "
                    f"pass --text-column to name the text field.")


def iter_documents(path, text_key="text", max_chars=None):
    """Documents of one local file, one at a time: .txt is one document; .jsonl/.json one per
    line; .parquet one per row of the text column (a batch of rows at a time). max_chars: long documents come in pieces of at most that
    many characters (cut after whitespace where there is some) and a .txt is read in blocks, so
    memory stays bounded by the longest JSON line whatever the size of the file."""
    if path.endswith(".parquet"):
        docs = _parquet_documents(path, text_key)
    elif path.endswith(".txt"):
        docs = _text_blocks(path, max_chars)
    else:
        docs = (_record_text(rec, f"{path}:{lineno}", text_key) for lineno, rec in iter_jsonl(path))
    for doc in docs:
        yield from (pieces(doc, max_chars) if max_chars else [doc])


def check_readable(path):
    """A UserError naming `path` (and the line) when it is missing, not UTF-8, or malformed; the
    file is streamed, so any size is fine. Hub ids (hf://...) are not read."""
    if str(path).startswith("hf://") or looks_like_hub_id(str(path)) and not os.path.exists(path):
        return
    if not os.path.isfile(path):
        raise UserError(f"{path} does not exist or is not a file; check the path.")
    if str(path).endswith(".parquet"):  # its first text column (the check reads that one)
        schema = open_parquet(str(path)).schema_arrow
        column = next((f.name for f in schema if is_text(f.type)), (schema.names or ["text"])[0])
        next(_parquet_documents(str(path), column), None)
    elif str(path).endswith(".txt"):
        for _ in _text_blocks(str(path), 1 << 20):
            pass
    else:
        for _ in iter_jsonl(path):
            pass


def pieces(text, max_chars):
    """`text` in consecutive pieces of at most max_chars, each cut just before a whitespace
    (the last in the second half of the piece, if any), so a cut rarely splits a word."""
    while len(text) > max_chars:
        cut = max(text.rfind(" ", max_chars // 2, max_chars), text.rfind("\n", max_chars // 2, max_chars))
        cut = cut if cut > 0 else max_chars
        yield text[:cut]
        text = text[cut:]
    if text:
        yield text


def _text_blocks(path, max_chars):
    """A .txt file: the whole file as one document, or (max_chars) blocks of it read in turn."""
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
    """The one sentence for a parquet file (or a row group of one) that cannot be read."""
    first = (str(e).splitlines() or [""])[0][:200]
    return UserError(f"{where}: not a readable parquet file ({type(e).__name__}: {first}); re-download or "
                     f"remove it.")


def open_parquet(path):
    """pq.ParquetFile(path): its footer read, or parquet_error."""
    import pyarrow.parquet as pq  # lazy: the core path imports without pyarrow
    try:
        return pq.ParquetFile(path)
    except Exception as e:
        raise parquet_error(path, e) from None


def parquet_rows(path):
    """Every row of a parquet file as a dict."""
    table = open_parquet(path)
    try:
        return table.read().to_pylist()
    except Exception as e:
        raise parquet_error(path, e) from None


def is_text(kind):
    return str(kind) in ("string", "large_string")


def check_text_column(path, schema, column):
    """A UserError unless the arrow `schema` of `path` has a text column named `column`."""
    if column not in schema.names:
        raise UserError(f"{path}: no {column!r} column (columns: {', '.join(schema.names)}); pass --text-column.")
    kind = schema.field(column).type
    if not is_text(kind):
        raise UserError(f"{path}: column {column!r} holds {kind}, not text; pass --text-column naming the text "
                        f"column.")


def _parquet_documents(path, text_key):
    table = open_parquet(path)
    check_text_column(path, table.schema_arrow, text_key)
    for batch in table.iter_batches(columns=[text_key]):
        yield from (t for t in batch.column(0).to_pylist() if t)


def hub_documents(name, split="train", text_key="text"):
    """(the dataset's fingerprint, its documents) of a Hugging Face hub dataset split (needs the
    network, or its `datasets` cache); the documents stream a batch of rows at a time."""
    ds = hub_dataset(name, split=split)
    if text_key not in ds.column_names:
        raise UserError(f"hub dataset {name}: no {text_key!r} column (columns: "
                        f"{', '.join(ds.column_names)}); pass --text-column.")
    return ds._fingerprint, (t for batch in ds.iter(batch_size=1024) for t in batch[text_key] if t)


def stream_documents(sources, text_key="text", split="train", max_chars=None):
    """The documents of gated sources one at a time (iter_documents per local file)."""
    for src in sources:
        if os.path.isfile(src):
            yield from iter_documents(src, text_key, max_chars)
        else:
            yield from (p for doc in hub_documents(src, split, text_key)[1]
                        for p in (pieces(doc, max_chars) if max_chars else [doc]))


# -----------------------------------------------------------------------------
# the cache of text converted to parquet (what pretraining reads)

CACHE_ROW_GROUP = 64  # documents per row group in the shards we write (units small enough to mix)


def cache_dir():
    return os.environ.get("NANOSTONEY_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "nanostoney")


def _write_shard(path, docs, column):
    """docs (an iterable of str) -> a parquet file at `path`, CACHE_ROW_GROUP rows per row group,
    written to a temporary name and renamed (a killed writer leaves no half shard)."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    os.makedirs(os.path.dirname(path), exist_ok=True)
    tmp = f"{path}.tmp-{os.getpid()}"
    schema = pa.schema([(column, pa.string())])
    rows = 0
    try:
        with pq.ParquetWriter(tmp, schema, write_statistics=False) as writer:
            chunk = []
            for doc in docs:
                chunk.append(doc)
                if len(chunk) == CACHE_ROW_GROUP:
                    writer.write_table(pa.table({column: chunk}, schema=schema))
                    rows, chunk = rows + len(chunk), []
            if chunk:
                writer.write_table(pa.table({column: chunk}, schema=schema))
                rows += len(chunk)
        if rows == 0:
            raise UserError(f"{path}: the source holds no documents; check the files and --text-column.")
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    return path


def cached_shard(name, key, docs, column="text"):
    """<cache>/corpus/<name>-<key>.parquet, written from `docs` the first time only."""
    path = os.path.join(cache_dir(), "corpus", f"{name}-{key[:20]}.parquet")
    return path if os.path.isfile(path) else _write_shard(path, docs, column)


def texts_shard(name, texts, column="text", seed=0):
    """A list of texts (the bundled corpus) as one cached shard, documents in a seeded shuffled
    order so that each row group mixes the tasks the texts come from."""
    order = list(texts)
    random.Random(seed).shuffle(order)
    h = hashlib.sha256(f"{seed}\0".encode())
    for t in order:
        h.update(t.encode())
        h.update(b"\0")
    return cached_shard(name, h.hexdigest(), order, column)


def file_shard(path, column="text"):
    """A txt/jsonl/json file as a cached shard (keyed by the file's bytes and the column)."""
    h = hashlib.sha256(f"{column}\0".encode())
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    stem = os.path.splitext(os.path.basename(path))[0]
    return cached_shard(stem, h.hexdigest(), (t for t in iter_documents(path, column) if t), column)


def hub_shard(name, split, column="text"):
    """A Hugging Face hub dataset split as a cached shard (keyed by its `datasets` fingerprint)."""
    fingerprint, docs = hub_documents(name, split, column)
    key = hashlib.sha256(f"{name}\0{split}\0{column}\0{fingerprint}".encode()).hexdigest()
    return cached_shard(name.replace("/", "--"), key, docs, column)


def parquet_files(sources, column="text", split="train"):
    """Parquet paths for expanded --data sources (expand_sources): parquet files as they
    are, other files and hub datasets converted once into the cache. Gate the sources first."""
    out = []
    for src in sources:
        if src.endswith(".parquet"):
            out.append(src)
        elif os.path.isfile(src):
            out.append(file_shard(src, column))
        else:
            out.append(hub_shard(src, split, column))
    return out
