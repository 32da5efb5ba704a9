"""Data: reading the bundled files (or their hub copies), and the governance gate.

Two jobs, both small:

1. Loading. Every task reads rows through `bundled_rows` (the files under data/, through
   `datasets` when it is installed, else a plain JSON-lines reader, so the core training path
   needs only torch, numpy and tokenizers) or `hub_rows` (the full sets on the Hugging Face
   Hub, for users who are online). The bundled files are the default. Asking for the hub
   explicitly (source="hub") and failing is an error; preferring it (source="auto") and
   failing prints one sentence and falls back to the bundled file.

2. The governance gate, `check_sources(paths, use)`. Stoney Nakoda is the language of a First
   Nations community and the upstream project runs a default-deny policy: every source that
   enters training must match a record in SOURCE_MANIFEST.yml with permission_status
   approved_for_training, and every upload/publish needs approved_for_public_release. We
   read the upstream schema unchanged, so `--manifest` can point at the upstream repo's own
   manifest. Derived data (tasks, distractors, preference pairs) inherits its source's
   status: every task knows the files behind it (`sources_for_tasks`), and training scripts
   gate those.
"""
import fnmatch
import functools
import json
import os
import socket
import sys
import urllib.parse
from pathlib import Path, PurePosixPath

from nanostoney.errors import UserError

DATA_DIR = Path(__file__).resolve().parent.parent / "data"
DEFAULT_MANIFEST = DATA_DIR / "SOURCE_MANIFEST.yml"

# Bundled files, relative to the data directory. AQuA's bundled dev set is our train split
# and its test set is cut into val/test; the Stoney file is cut 80/10/10 (see tasks/).
BUNDLED = {
    "stoney": {"all": "stoney/stoney_valid.jsonl"},
    "aqua": {"train": "aqua_rat/dev.json", "heldout": "aqua_rat/test.json"},
    "gsm8k": {"train": "gsm8k/train.jsonl", "test": "gsm8k/test.jsonl"},
}
# Hub copies: (dataset id, config, split). A hub copy only ever replaces the *training* pool;
# val/test stay the bundled ones so that evaluations are comparable between the two modes.
HUB = {
    "stoney": ("HarleyCooper/StoneyNakoda45k", None, "train"),
    "aqua": ("deepmind/aqua_rat", "raw", "train"),
    "gsm8k": ("openai/gsm8k", "main", "train"),
}
SOURCES = ("bundled", "hub", "auto")


def hub_label(family):
    """The name a hub source goes by in messages and in the manifest (path_glob hf://...)."""
    return "hf://" + HUB[family][0]


# -----------------------------------------------------------------------------
# reading files

def read_jsonl(path):
    """Rows of a JSON-lines file (one object per line, blank lines skipped). A bad line is a
    UserError naming file:line, so the user can open the file at the right place."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"data file {path} does not exist; check the path (bundled files live under {DATA_DIR}).")
    rows = []
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise UserError(f"{path}:{lineno}: malformed JSON line ({e.msg}); fix or remove that line.") from None
            if not isinstance(row, dict):
                raise UserError(f"{path}:{lineno}: expected a JSON object on each line, "
                                f"got {type(row).__name__}; fix that line.")
            rows.append(row)
    return rows


def _datasets():
    """The `datasets` module, or None where it is not installed (e.g. a bare GPU box)."""
    try:
        import datasets
    except ImportError:
        return None
    datasets.disable_progress_bars()
    return datasets


@functools.lru_cache(maxsize=32)
def _load_local(path, mtime, size):
    ds = _datasets()
    if ds is not None:
        try:
            return ds.load_dataset("json", data_files=path, split="train").to_list()
        except Exception:
            pass  # re-read below: names the bad line, or works where datasets' schema inference did not
    return read_jsonl(path)


def load_local(path):
    """Rows of a local JSON-lines file, through `datasets` when installed. Cached per process
    (keyed on the file's mtime and size, so an edited file is re-read). Returns a fresh list."""
    path = Path(path).resolve()
    if not path.is_file():
        raise UserError(f"data file {path} does not exist; check the path (bundled files live under {DATA_DIR}).")
    st = path.stat()
    rows = _load_local(str(path), st.st_mtime_ns, st.st_size)
    if not rows:
        raise UserError(f"data file {path} has no rows; point at a file with one JSON object per line.")
    return [dict(r) for r in rows]


def bundled_path(family, part, data_dir=None):
    return Path(data_dir or DATA_DIR) / BUNDLED[family][part]


def bundled_rows(family, part, data_dir=None):
    """(rows, path) of a bundled file. `data_dir` swaps in a directory of the same layout."""
    path = bundled_path(family, part, data_dir)
    return load_local(path), str(path)


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


@functools.lru_cache(maxsize=8)
def _load_hub(family):
    ds = _datasets()
    if ds is None:
        raise UserError(f"loading {hub_label(family)} needs the `datasets` package; "
                        "install it or use source='bundled'.")
    name, config, split = HUB[family]
    if not _hub_reachable():
        raise UserError(f"the Hugging Face Hub is unreachable, so {name} cannot be loaded; "
                        "check the connection or use the bundled files (source='bundled').")
    try:
        return ds.load_dataset(name, config, split=split).to_list()
    except Exception as e:  # offline, no such dataset, gated...: all the same to the user
        raise UserError(f"could not load {name} from the Hugging Face Hub ({type(e).__name__}); "
                        "check the connection or use the bundled files (source='bundled').") from None


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
# corpora built from the tasks

def training_corpus_texts(source="bundled", data_dir=None):
    """Plain texts for pretraining / tokenizer training: the *train* split of stoney_qa, aqua_mc
    and gsm8k, one text per conversation (its turns joined by blank lines). No val/test item
    and no conversation a held-out item was derived from is in here (tests/test_tasks.py)."""
    from nanostoney.tasks import get_task  # tasks import this module; import here to avoid a cycle
    texts = []
    for name in ("stoney_qa", "aqua_mc", "gsm8k"):
        for ex in get_task(name, source=source, data_dir=data_dir).examples("train"):
            texts.append("\n\n".join(m["content"] for m in ex["messages"]))
    return texts


def sources_for_tasks(task_names, source="bundled", data_dir=None):
    """The source files (or hf:// ids) behind the given tasks, for the governance gate:
    derived data inherits its source's status, so gate these, not the task names."""
    from nanostoney.tasks import get_task
    out = []
    for name in task_names:
        for s in get_task(name, source=source, data_dir=data_dir).sources():
            if s not in out:
                out.append(s)
    return out


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


def _parse_scalar(s):
    s = s.strip()
    if s in ("[]",):
        return []
    if s.startswith('"'):
        return json.loads(s)
    if s.startswith("'"):
        return s[1:-1].replace("''", "'")
    if s.startswith("[") and s.endswith("]"):
        return [_parse_scalar(x) for x in s[1:-1].split(",") if x.strip()]
    return {"true": True, "false": False, "null": None, "~": None}.get(s, s)


def _strip_comment(line):
    """Drop a `#` comment that is outside quotes."""
    quote = None
    for i, ch in enumerate(line):
        if quote:
            if ch == quote:
                quote = None
        elif ch in "\"'":
            quote = ch
        elif ch == "#" and (i == 0 or line[i - 1] in " \t"):
            return line[:i]
    return line


def mini_yaml(text):
    """The subset of YAML that manifests use (mappings, block lists, quoted or bare scalars,
    [] and booleans), for machines without pyyaml: the gate must run on the core path."""
    lines = []
    for raw in text.splitlines():
        line = _strip_comment(raw).rstrip()
        if line.strip():
            lines.append((len(line) - len(line.lstrip(" ")), line.strip()))

    def block(i, indent):
        if lines[i][1].startswith("- ") or lines[i][1] == "-":
            out = []
            while i < len(lines) and lines[i][0] == indent and lines[i][1].startswith("-"):
                rest = lines[i][1][1:].strip()
                if ":" in rest and not rest.startswith(('"', "'")):
                    # "- key: value" opens a mapping whose keys sit two columns in
                    lines[i] = (indent + 2, rest)
                    item, i = block(i, indent + 2)
                else:
                    item, i = _parse_scalar(rest), i + 1
                out.append(item)
            return out, i
        out = {}
        while i < len(lines) and lines[i][0] == indent:
            key, sep, value = lines[i][1].partition(":")
            if not sep:
                raise ValueError(f"line {lines[i][1]!r} is not 'key: value'")
            i += 1
            if value.strip():
                out[key.strip()] = _parse_scalar(value)
            elif i < len(lines) and (lines[i][0] > indent or (lines[i][0] == indent and lines[i][1].startswith("-"))):
                out[key.strip()], i = block(i, lines[i][0])
            else:
                out[key.strip()] = None
        return out, i

    if not lines:
        return None
    value, i = block(0, lines[0][0])
    if i != len(lines):
        raise ValueError(f"unexpected indentation at {lines[i][1]!r}")
    return value


def _read_yaml(path):
    text = path.read_text(encoding="utf-8")
    try:
        import yaml
    except ImportError:
        yaml = None
    try:
        return yaml.safe_load(text) if yaml else mini_yaml(text)
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
    """Does a manifest record's path_glob cover `source` (a file path or an hf:// id)?

    Globs are relative to the manifest's directory (fnmatch per path component, so `*`
    never crosses a `/`). A file outside that directory is matched on its trailing
    components instead, so the upstream manifest's "OpenAIFineTune/*.jsonl" covers
    ".../OpenAIFineTune/stoney_train.jsonl" wherever the user keeps the upstream files."""
    if path_glob.startswith("hf://") or str(source).startswith("hf://"):
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
    data/SOURCE_MANIFEST.yml. Several matching records: any record granting the use allows it,
    except that a matching restricted/removed_pending_review record always refuses."""
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
        grant = next((r for r in matches if _grants(r, use)), None)
        if grant is None:
            if matches:
                status = "its manifest status is " + ", ".join(
                    f"{r['permission_status']} (record {r['source_id']!r})" for r in matches)
            else:
                status = f"it has no record in {where} (default-deny)"
            raise UserError(f"{source} may not be used for {use}: {status}; {fix}.")
        approved.append((str(source), grant["source_id"]))
    return approved
