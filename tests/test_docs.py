"""The docs a reader follows: every file they name is in the repository, and BENCHMARKS.md is a
reference (figures with their commands), not a diary keyed by issue numbers."""
import os
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DOCS = [ROOT / "README.md", ROOT / "BENCHMARKS.md", *sorted((ROOT / "docs").glob("*.md"))]

# A path that starts with one of the repository's own folders is a claim that the file is there.
# .scratch/ (ignored local notes) and shared/ (the sessions' folder) are never in a clone.
REPO_DIRS = "nanostoney|scripts|bench|tests|docs|data|rustbpe|\\.ci"
OUTSIDE = ("/.scratch", "/shared")
PATH = re.compile(rf"(?<![\w./~$-])((?:{REPO_DIRS}|\.scratch|shared)/[\w./-]*)")
# `python -m scripts.eval`, `bench.report_seeds`, `nanostoney.tasks`: a module that must exist.
MODULE = re.compile(r"(?<![\w./])(scripts|bench|nanostoney)\.([a-z_]\w*)")
# A file named alone (`loader.py`, `run_stoney_small.sh`): some file of that name must exist.
BARE = re.compile(r"(?<![\w./-])([A-Za-z_][\w-]*\.(?:py|sh))\b")
LINK = re.compile(r"\]\(([^)\s#]+)[^)]*\)")
# An issue reference: "#25", "issue 27", "issues 9 and 16"; not "#!" or a URL's "#anchor".
ISSUE = re.compile(r"(?<![\w&/#])#\d+\b|\b[Ii]ssues?\s+#?\d+")


def repo_file_names():
    """Names of the files a clone holds: build outputs, environments and run folders left out."""
    skip = {"target", "out", "runs", "wandb", "__pycache__"}
    names = set()
    for _, dirs, files in os.walk(ROOT):
        dirs[:] = [d for d in dirs if d not in skip and (d == ".ci" or not d.startswith("."))]
        names.update(files)
    return names


def missing_paths(doc, names):
    text = doc.read_text()
    missing = []
    for m in PATH.finditer(text):
        path = m.group(1).rstrip(".")
        if ("/" + path).startswith(OUTSIDE) or not (ROOT / path).exists():
            missing.append(path)
    for m in MODULE.finditer(text):
        base = ROOT / m.group(1) / m.group(2)
        if not (base.with_suffix(".py").exists() or (base / "__init__.py").exists()):
            missing.append(f"{m.group(1)}.{m.group(2)}")
    missing += [m.group(1) for m in BARE.finditer(text) if m.group(1) not in names]
    for m in LINK.finditer(text):
        target = m.group(1)
        if "://" not in target and not target.startswith("mailto:") and not (doc.parent / target).exists():
            missing.append(target)
    return list(dict.fromkeys(missing))


def test_every_file_the_docs_name_is_in_the_repository():
    names = repo_file_names()
    missing = {doc.relative_to(ROOT).as_posix(): missing_paths(doc, names) for doc in DOCS}
    missing = {doc: paths for doc, paths in missing.items() if paths}
    assert not missing, f"the docs name files the repository lacks: {missing}"


def test_the_checker_sees_a_missing_path_and_ignores_urls(tmp_path):
    doc = tmp_path / "x.md"
    doc.write_text("see `nanostoney/nothing.py`, .scratch/notes.md, `python -m scripts.nothing`, "
                   "gone.py and [a link](nothing.md); but not https://example.org/scripts/x.py, "
                   "`~/.cache/nanostoney/shards`, /shared/out or [nanochat](https://github.com/k/n)")
    assert missing_paths(doc, {"x.md"}) == ["nanostoney/nothing.py", ".scratch/notes.md",
                                            "scripts.nothing", "gone.py", "nothing.md"]


def test_benchmarks_and_readme_name_no_issue_numbers():
    found = {name: ISSUE.findall((ROOT / name).read_text()) for name in ("BENCHMARKS.md", "README.md")}
    found = {name: hits for name, hits in found.items() if hits}
    assert not found, f"issue numbers belong in docs/LOG.md, not here: {found}"


def test_the_issue_pattern():
    hits = ISSUE.findall("issue 27; (issues 9 and 16); pre-#16 corpus; #!/usr/bin/env bash; "
                         "https://x.org/page#12; &#39; C#1")
    assert hits == ["issue 27", "issues 9", "#16"]
