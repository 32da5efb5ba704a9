"""Data: reading files (the bundled sets, --data corpora, hub copies) and the governance gate.

1. Reading. Every task reads rows through `bundled_rows` (the JSON-lines files under data/) or
   `hub_rows` (the full sets on the Hugging Face Hub, for users who are online). The bundled
   files are the default. Asking for the hub explicitly (source="hub") and failing is an
   error; preferring it (source="auto") and failing prints one sentence and falls back to the
   bundled file. Pretraining and tokenizer corpora given with --data (txt / jsonl / json /
   parquet files, directories, globs or a hub id) are expanded by `expand_sources`, named for
   the gate by `gate_name` and read one document at a time by `iter_documents`, with errors
   that name the file and line (pretraining streams them through loader.py).

2. The governance gate, `check_sources(paths, use)`. Stoney Nakoda is the language of a First
   Nations community and the upstream project runs a default-deny policy: every source that
   enters training must match a record in SOURCE_MANIFEST.yml with permission_status
   approved_for_training, and every upload/publish needs approved_for_public_release. We
   read the upstream schema unchanged, so `--manifest` can point at the upstream repo's own
   manifest. Derived data (tasks, distractors, preference pairs) inherits its source's
   status: every task knows the files behind it (`tasks.sources_for_tasks`), and training
   scripts gate those.
"""
import fnmatch
import functools
import glob
import hashlib
import json
import os
import socket
import sys
import urllib.parse
from pathlib import Path, PurePosixPath

import yaml

from nanostoney.errors import UserError

DATA_DIR = Path(__file__).resolve().parent.parent / "data"
DEFAULT_MANIFEST = DATA_DIR / "SOURCE_MANIFEST.yml"

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
    if str(path).endswith(".parquet"):
        next(_parquet_documents(str(path), _first_column(str(path))), None)
    elif str(path).endswith(".txt"):
        for _ in _text_blocks(str(path), 1 << 20):
            pass
    else:
        for _ in iter_jsonl(path):
            pass


def _first_column(path):
    import pyarrow.parquet as pq
    try:
        schema = pq.ParquetFile(path).schema_arrow  # the first text column (its check reads that one)
        return next((f.name for f in schema if str(f.type) in ("string", "large_string")), schema.names[0])
    except Exception as e:
        raise UserError(f"{path}: not a readable parquet file ({e}).") from None


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


def _parquet_documents(path, text_key):
    import pyarrow.parquet as pq  # lazy: only --data parquet needs pyarrow
    try:
        table = pq.ParquetFile(path)
    except Exception as e:
        raise UserError(f"{path}: not a readable parquet file ({e}).") from None
    if text_key not in table.schema_arrow.names:
        raise UserError(f"{path}: no {text_key!r} column (columns: {', '.join(table.schema_arrow.names)}); "
                        f"pass --text-column.")
    kind = table.schema_arrow.field(text_key).type
    if str(kind) not in ("string", "large_string"):
        raise UserError(f"{path}: column {text_key!r} holds {kind}, not text; pass --text-column naming the text "
                        f"column.")
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


def gated_sources(values, manifest=None):
    """The files and hub ids of --data values, once the gate has approved every one for training."""
    sources = expand_sources(values)
    check_sources([gate_name(s) for s in sources], use="training", manifest=manifest)
    return sources


def stream_documents(sources, text_key="text", split="train", max_chars=None):
    """The documents of gated sources one at a time (iter_documents per local file)."""
    for src in sources:
        if os.path.isfile(src):
            yield from iter_documents(src, text_key, max_chars)
        else:
            yield from (p for doc in hub_documents(src, split, text_key)[1]
                        for p in (pieces(doc, max_chars) if max_chars else [doc]))


# -----------------------------------------------------------------------------
# the governance gate

STATUSES = ("unknown", "internal_only", "approved_for_training", "approved_for_public_release",
            "restricted", "removed_pending_review")
BLOCKING = ("restricted", "removed_pending_review")  # a removal request stops every workflow
REQUIRED_KEYS = ("source_id", "path_glob", "data_type", "origin", "rights_holder", "permission_status",
                 "license", "allowed_uses", "prohibited_uses", "contains_sensitive_content",
                 "review_contact", "notes")
# Each use the gate knows and the status a record needs to grant it (upstream's vocabulary).
USES = {"training": "approved_for_training", "upload": "approved_for_public_release",
        "public_release": "approved_for_public_release", "publishing": "approved_for_public_release"}


def _read_yaml(path):
    try:
        return yaml.safe_load(path.read_text(encoding="utf-8"))
    except Exception as e:
        first = str(e).splitlines()[0] if str(e) else ""
        raise UserError(f"manifest {path} is not valid YAML ({type(e).__name__}: {first}); fix the file.") from None


@functools.lru_cache(maxsize=16)
def _load_manifest(path, mtime):
    doc = _read_yaml(Path(path))
    if not isinstance(doc, dict) or not isinstance(doc.get("records"), list) or not doc["records"]:
        raise UserError(f"manifest {path} needs a non-empty `records:` list (see data/source_manifest.schema.json).")
    for k, rec in enumerate(doc["records"]):
        if not isinstance(rec, dict):
            raise UserError(f"manifest {path}: record {k} is not a mapping; see data/source_manifest.schema.json.")
        missing = [key for key in REQUIRED_KEYS if key not in rec]
        if missing:
            raise UserError(f"manifest {path}: record {rec.get('source_id', k)!r} lacks {', '.join(missing)}; "
                            "every record needs all fields of data/source_manifest.schema.json.")
        if rec["permission_status"] not in STATUSES:
            raise UserError(f"manifest {path}: record {rec['source_id']!r} has permission_status "
                            f"{rec['permission_status']!r}; use one of {', '.join(STATUSES)}.")
    return tuple(doc["records"])


def load_manifest(path=None):
    """(resolved manifest path, records). The schema's required fields and status values are
    checked here so a broken manifest fails with one sentence, not a KeyError later."""
    path = Path(path or DEFAULT_MANIFEST).resolve()
    if not path.is_file():
        raise UserError(f"manifest {path} does not exist; pass --manifest pointing at a SOURCE_MANIFEST.yml.")
    return path, _load_manifest(str(path), path.stat().st_mtime_ns)


def glob_matches(path_glob, source, manifest_dir):
    """Does a manifest record's path_glob cover `source` (a file path, an hf:// id or the
    generated:// name of a generated task)?

    Globs are relative to the manifest's directory (fnmatch per path component, so `*`
    never crosses a `/`). A file outside that directory is matched on its trailing
    components instead, so the upstream manifest's "OpenAIFineTune/*.jsonl" covers
    ".../OpenAIFineTune/stoney_train.jsonl" wherever the user keeps the upstream files."""
    if "://" in path_glob or "://" in str(source):  # hf://owner/name, generated://nanostoney/arith
        return fnmatch.fnmatchcase(str(source), path_glob)
    pattern = PurePosixPath(path_glob).parts
    p = Path(source).resolve()
    try:
        parts = p.relative_to(manifest_dir).parts
        if len(parts) != len(pattern):
            return False
    except ValueError:
        parts = p.parts[-len(pattern):]
        if len(parts) != len(pattern):
            return False
    return all(fnmatch.fnmatchcase(a, b) for a, b in zip(parts, pattern))


def _grants(rec, use):
    """A record grants a use when its status is the one the use needs and, as upstream says,
    "subject to allowed_uses": the use is allowed and not prohibited. Public release does not
    imply training (upstream: training requires approved_for_training)."""
    return (rec["permission_status"] == USES[use] and use in (rec["allowed_uses"] or [])
            and use not in (rec["prohibited_uses"] or []))


APPROVALS = ("approved_for_training", "approved_for_public_release")  # in order of reach


def _vetoes(rec, use):
    """A matching record that refuses the use whatever the others say (the most restrictive record
    wins): one that approves nothing (unknown, internal_only, restricted, removed_pending_review),
    or an approval reaching as far as the use that prohibits it. (A training approval that
    prohibits upload, as upstream writes it beside a release record, speaks only for training.)"""
    status = rec["permission_status"]
    if status not in APPROVALS:
        return True
    return use in (rec["prohibited_uses"] or []) and APPROVALS.index(status) >= APPROVALS.index(USES[use])


@functools.lru_cache(maxsize=64)
def _sha256(path, mtime, size):
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(1 << 20):
            h.update(block)
    return h.hexdigest()


def file_sha256(path):
    """sha256 of a local file's bytes (None when it is not a readable file); cached per version."""
    try:
        st = os.stat(path)
        return _sha256(os.path.realpath(path), st.st_mtime_ns, st.st_size) if os.path.isfile(path) else None
    except OSError:
        return None


def _same_content(rec, source):
    """Approval binds to content: a record with `sha256` (one digest or a list) covers only a file
    with those bytes, so a file of the same name elsewhere, with other content, is not approved."""
    want = rec.get("sha256")
    if not want:
        return True
    return file_sha256(str(source)) in ([want] if isinstance(want, str) else want)


def _why_refused(source, use, matches, vetoes, where):
    """Why no record lets `source` be used: the reason part of the gate's one sentence."""
    if vetoes and len(matches) > 1:
        r = vetoes[0]
        return (f"manifest record {r['source_id']!r} marks it {r['permission_status']}"
                + (f" and prohibits {use}" if use in (r["prohibited_uses"] or []) else "")
                + f", and the most restrictive of its {len(matches)} matching records wins")
    if not matches:
        return f"it has no record in {where} (default-deny)"
    bound = [r for r in matches if _grants(r, use) and not _same_content(r, source)]
    if bound:
        if not os.path.isfile(str(source)):
            return f"it is not a file, so its content cannot be checked against record {bound[0]['source_id']!r}"
        return (f"its content is not that of the file record {bound[0]['source_id']!r} approves (another sha256): "
                f"a file of the same name with other content is not the reviewed one")
    return "its manifest status is " + ", ".join(f"{r['permission_status']} (record {r['source_id']!r})"
                                                for r in matches)


def add_manifest_arg(parser):
    """The --manifest flag every script shares: repeatable, records pooled over all files given."""
    parser.add_argument("--manifest", action="append", default=None,
                        help="governance manifest (repeat the flag for several); default data/SOURCE_MANIFEST.yml")


def check_sources(paths, use="training", manifest=None):
    """The governance gate. Refuses (UserError, one sentence: the file, its status, how to record
    approval) any source without a manifest record granting `use`. Returns [(source, source_id)].

    `use`: "training", or "upload" / "public_release" / "publishing" (need approved_for_public_release).
    `manifest`: a path, or a list of paths whose records are pooled (each glob relative to its
    own manifest), e.g. the upstream manifest for Stoney plus ours for the math sets; default
    data/SOURCE_MANIFEST.yml. A record carrying sha256 covers only a file with those bytes. Several
    matching records: the most restrictive wins (_vetoes: a record approving nothing, or one
    prohibiting the use, refuses whatever the others grant); otherwise a record granting the use
    allows it."""
    if use not in USES:
        raise UserError(f"unknown data use {use!r}; use one of {', '.join(USES)}.")
    manifests = manifest if isinstance(manifest, (list, tuple)) else [manifest]
    loaded = [load_manifest(m) for m in manifests]
    where = " or ".join(str(p) for p, _ in loaded)
    fix = (f"if the rights holders approve it, add a record for it with permission_status {USES[use]} "
           f"and '{use}' in allowed_uses to {loaded[0][0]}")
    approved = []
    for source in paths:
        matches = [r for p, recs in loaded for r in recs if glob_matches(str(r["path_glob"]), source, p.parent)]
        blocking = [r for r in matches if r["permission_status"] in BLOCKING]
        if blocking:
            r = blocking[0]
            raise UserError(f"{source} may not be used for {use}: manifest record {r['source_id']!r} marks it "
                            f"{r['permission_status']}, which stops every workflow until its review is resolved "
                            f"in {where}.")
        vetoes = [r for r in matches if _vetoes(r, use)]
        grant = None if vetoes else next((r for r in matches if _grants(r, use) and _same_content(r, source)), None)
        if grant is None:
            raise UserError(f"{source} may not be used for {use}: {_why_refused(source, use, matches, vetoes, where)}; "
                            f"{fix}.")
        approved.append((str(source), grant["source_id"]))
    return approved
