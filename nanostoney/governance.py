"""The governance gate, `check_sources(paths, use)`: default-deny, approval bound to content.

Stoney Nakoda belongs to its First Nations community: every source that enters training needs a
SOURCE_MANIFEST.yml record approved_for_training, every upload/publish approved_for_public_release.
The schema is upstream's, unchanged, so the upstream manifest can be read as is. Derived data
inherits its source's status (every task names its files: `tasks.sources_for_tasks`).
"""
import fnmatch
import functools
import hashlib
import os
from pathlib import Path, PurePosixPath

import yaml

from nanostoney.errors import UserError
from nanostoney.sources import DATA_DIR, expand_sources, gate_name

DEFAULT_MANIFEST = DATA_DIR / "SOURCE_MANIFEST.yml"
STATUSES = ("unknown", "internal_only", "approved_for_training", "approved_for_public_release",
            "restricted", "removed_pending_review")
BLOCKING = ("restricted", "removed_pending_review")  # a removal request stops every workflow
APPROVALS = ("approved_for_training", "approved_for_public_release")  # in order of reach
REQUIRED_KEYS = ("source_id", "path_glob", "data_type", "origin", "rights_holder", "permission_status",
                 "license", "allowed_uses", "prohibited_uses", "contains_sensitive_content",
                 "review_contact", "notes")
# Each use the gate knows and the status a record needs to grant it (upstream's vocabulary).
USES = {"training": "approved_for_training", "upload": "approved_for_public_release",
        "public_release": "approved_for_public_release", "publishing": "approved_for_public_release"}


@functools.lru_cache(maxsize=16)
def _load_manifest(path, mtime):
    try:
        doc = yaml.safe_load(Path(path).read_text(encoding="utf-8"))
    except Exception as e:
        first = str(e).splitlines()[0] if str(e) else ""
        raise UserError(f"manifest {path} is not valid YAML ({type(e).__name__}: {first}); fix the file.") from None
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
    """(resolved manifest path, records), its required fields and statuses checked."""
    path = Path(path or DEFAULT_MANIFEST).resolve()
    if not path.is_file():
        raise UserError(f"manifest {path} does not exist; pass --manifest pointing at a SOURCE_MANIFEST.yml.")
    return path, _load_manifest(str(path), path.stat().st_mtime_ns)


def glob_matches(path_glob, source, manifest_dir):
    """Does a record's path_glob cover `source` (a file, an hf:// id or a generated:// name)? Globs
    are relative to the manifest's directory, per path component (`*` never crosses a `/`); a file
    outside it is matched on its trailing components, so upstream's "OpenAIFineTune/*.jsonl" covers
    ".../OpenAIFineTune/stoney_train.jsonl" wherever the user keeps the upstream files."""
    if "://" in path_glob or "://" in str(source):  # hf://owner/name, generated://nanostoney/arith
        return fnmatch.fnmatchcase(str(source), path_glob)
    pattern = PurePosixPath(path_glob).parts
    p = Path(source).resolve()
    try:
        parts = p.relative_to(manifest_dir).parts
    except ValueError:
        parts = p.parts[-len(pattern):]
    return len(parts) == len(pattern) and all(fnmatch.fnmatchcase(a, b) for a, b in zip(parts, pattern))


def _grants(rec, use):
    """The status the use needs and, "subject to allowed_uses", the use allowed and not prohibited.
    Public release does not imply training."""
    return (rec["permission_status"] == USES[use] and use in (rec["allowed_uses"] or [])
            and use not in (rec["prohibited_uses"] or []))


def _vetoes(rec, use):
    """Does a matching record refuse the use whatever the others say (the most restrictive wins)?
    One that approves nothing does, or an approval reaching as far as the use that prohibits it (a
    training approval that prohibits upload, beside a release record, speaks only for training)."""
    status = rec["permission_status"]
    return status not in APPROVALS or (use in (rec["prohibited_uses"] or [])
                                       and APPROVALS.index(status) >= APPROVALS.index(USES[use]))


@functools.lru_cache(maxsize=64)
def _sha256(path, mtime, size):
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(1 << 20):
            h.update(block)
    return h.hexdigest()


def file_sha256(path):
    """sha256 of a file's bytes (None when it is not a readable file); cached per version."""
    try:
        st = os.stat(path)
        return _sha256(os.path.realpath(path), st.st_mtime_ns, st.st_size) if os.path.isfile(path) else None
    except OSError:
        return None


def _same_content(rec, source):
    """Approval binds to content: a record with `sha256` (one or a list) covers only files with those bytes."""
    want = rec.get("sha256")
    return not want or file_sha256(str(source)) in ([want] if isinstance(want, str) else want)


def _why_refused(source, use, matches, vetoes, where):
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
    """The gate: [(source, source_id)], or a one-sentence UserError for the first source without a
    record granting `use` (a key of USES). `manifest`: a path or a list whose records are pooled,
    each glob relative to its own manifest; default data/SOURCE_MANIFEST.yml."""
    if use not in USES:
        raise UserError(f"unknown data use {use!r}; use one of {', '.join(USES)}.")
    loaded = [load_manifest(m) for m in (manifest if isinstance(manifest, (list, tuple)) else [manifest])]
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


def gated_sources(values, manifest=None):
    """The files and hub ids of --data values, once the gate has approved all for training."""
    sources = expand_sources(values)
    check_sources([gate_name(s) for s in sources], use="training", manifest=manifest)
    return sources
