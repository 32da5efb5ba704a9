"""The governance gate: default-deny, our manifest and the upstream one, one-sentence refusals."""
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from nanostoney import governance
from nanostoney.errors import UserError
from nanostoney.governance import check_sources, glob_matches, load_manifest
from nanostoney.tasks import sources_for_tasks

ROOT = Path(__file__).resolve().parent.parent
UPSTREAM = ROOT / "tests" / "fixtures" / "upstream_SOURCE_MANIFEST.yml"
OURS = ROOT / "data" / "SOURCE_MANIFEST.yml"
STONEY = ROOT / "data" / "stoney" / "stoney_valid.jsonl"


@pytest.mark.parametrize("manifest", [OURS, UPSTREAM])
def test_manifests_follow_the_upstream_schema(manifest):
    jsonschema = pytest.importorskip("jsonschema")
    yaml = pytest.importorskip("yaml")
    schema = json.loads((ROOT / "data" / "source_manifest.schema.json").read_text())
    jsonschema.validate(yaml.safe_load(manifest.read_text()), schema)


def test_gate_reads_a_copied_manifest(tmp_path):
    manifest = tmp_path / "SOURCE_MANIFEST.yml"
    shutil.copy(OURS, manifest)
    (tmp_path / "stoney").mkdir()
    f = tmp_path / "stoney" / "stoney_valid.jsonl"
    shutil.copy(STONEY, f)  # the reviewed bytes, wherever they are kept (a clone, ../shared/data)
    assert check_sources([str(f)], "training", manifest=manifest) == [(str(f), "stoney_valid_jsonl")]


@pytest.mark.parametrize("where", ["beside_its_manifest", "anywhere"])
def test_a_file_named_like_an_approved_one_with_other_content_is_refused(tmp_path, where):
    """Approval binds to content (the records' sha256), not to a file name: a private file called
    stoney_valid.jsonl, beside a copied manifest or anywhere on disk, is not the reviewed one."""
    manifest = tmp_path / "m" / "SOURCE_MANIFEST.yml"
    manifest.parent.mkdir()
    shutil.copy(OURS, manifest)
    f = (manifest.parent if where == "beside_its_manifest" else tmp_path / "private") / "stoney" / "stoney_valid.jsonl"
    f.parent.mkdir(parents=True)
    f.write_bytes(STONEY.read_bytes() + b'{"messages": []}\n')  # one line more than the reviewed file
    for m in (manifest, OURS):
        with pytest.raises(UserError) as e:
            check_sources([str(f)], "training", manifest=m)
        msg = str(e.value)
        assert str(f) in msg and "stoney_valid_jsonl" in msg and "content" in msg and msg.count(". ") == 0
    shutil.copy(STONEY, f)
    assert check_sources([str(f)], "training") == [(str(f), "stoney_valid_jsonl")]


def test_every_bundled_record_binds_to_content():
    path, records = load_manifest()
    for rec in records:
        if "://" not in rec["path_glob"] and not rec["path_glob"].startswith(("mmmlu/", "mmlu/", "fineweb")):
            files = sorted(path.parent.glob(rec["path_glob"]))
            assert files and rec.get("sha256"), rec["source_id"]
            assert sorted(governance.file_sha256(f) for f in files) == sorted(
                [rec["sha256"]] if isinstance(rec["sha256"], str) else rec["sha256"]), rec["source_id"]


def test_bundled_sources_are_approved_for_training_and_release():
    sources = sources_for_tasks(["stoney_qa", "stoney_mc", "aqua_mc", "gsm8k_mc"])
    assert str(STONEY) in sources and len(sources) == 5
    assert [s for s, _ in check_sources(sources, "training")] == sources
    assert [s for s, _ in check_sources(sources, "public_release")] == sources
    assert dict(check_sources([str(STONEY)], "training"))[str(STONEY)] == "stoney_valid_jsonl"
    assert dict(check_sources([str(STONEY)], "upload"))[str(STONEY)] == "stoney_valid_jsonl_public_release"


def test_hub_stoney_set_is_refused_until_approved():
    sources = sources_for_tasks(["stoney_qa"], source="hub")  # known without downloading anything
    assert sources[0] == "hf://HarleyCooper/StoneyNakoda45k"
    with pytest.raises(UserError) as e:
        check_sources(sources, "training")
    msg = str(e.value)
    assert "hf://HarleyCooper/StoneyNakoda45k" in msg and "unknown" in msg
    assert "approved_for_training" in msg and str(OURS) in msg
    # the maths hub sets are recorded
    check_sources(sources_for_tasks(["aqua_mc", "gsm8k"], source="hub"), "training")


def test_upstream_manifest_unchanged_approves_finetune_files_and_refuses_dictionaries(tmp_path):
    # the user keeps the upstream files anywhere: globs match on trailing components
    ok = tmp_path / "OpenAIFineTune" / "x.jsonl"
    bad = tmp_path / "Dictionaries" / "stoney_dictionary.jsonl"
    assert check_sources([str(ok)], "training", manifest=UPSTREAM) == [(str(ok), "openai_finetune_jsonl")]
    assert check_sources([str(ok)], "public_release", manifest=UPSTREAM) == \
        [(str(ok), "openai_finetune_jsonl_public_release")]
    with pytest.raises(UserError) as e:
        check_sources([str(bad)], "training", manifest=UPSTREAM)
    msg = str(e.value)
    assert str(bad) in msg and "unknown" in msg and "dictionaries_stoney_raw" in msg
    assert "add a record" in msg and str(UPSTREAM) in msg
    assert msg.count(". ") == 0  # one sentence


def test_upstream_manifest_does_not_cover_our_copy():
    with pytest.raises(UserError, match="no record"):
        check_sources([str(STONEY)], "training", manifest=UPSTREAM)
    # pooled with ours, it does; the maths files need ours too
    pooled = [UPSTREAM, OURS]
    assert len(check_sources(sources_for_tasks(["stoney_qa", "gsm8k"]), "training", manifest=pooled)) == 3


def _manifest(tmp_path, records):
    base = dict(data_type="x", origin="x", rights_holder="x", license="x", contains_sensitive_content=False,
                review_contact="x", notes="x")
    lines = ['schema_version: "1.0"', "records:"]
    for r in records:
        r = dict(base, **r)
        lines.append(f"  - source_id: {r.pop('source_id')}")
        for k, v in r.items():
            lines.append(f"    {k}: {json.dumps(v)}")
    path = tmp_path / "SOURCE_MANIFEST.yml"
    path.write_text("\n".join(lines) + "\n")
    return path


def test_restricted_record_wins_over_an_approval(tmp_path):
    m = _manifest(tmp_path, [
        dict(source_id="ok", path_glob="*.jsonl", permission_status="approved_for_training",
             allowed_uses=["training"], prohibited_uses=[]),
        dict(source_id="takedown", path_glob="a.jsonl", permission_status="removed_pending_review",
             allowed_uses=[], prohibited_uses=["training"]),
    ])
    check_sources([str(tmp_path / "b.jsonl")], "training", manifest=m)
    with pytest.raises(UserError, match="removed_pending_review"):
        check_sources([str(tmp_path / "a.jsonl")], "training", manifest=m)


@pytest.mark.parametrize("other", [
    dict(permission_status="unknown", allowed_uses=[], prohibited_uses=["training"]),
    dict(permission_status="internal_only", allowed_uses=[], prohibited_uses=[]),
    dict(permission_status="approved_for_training", allowed_uses=[], prohibited_uses=["training"]),
    dict(permission_status="approved_for_public_release", allowed_uses=["upload"], prohibited_uses=["training"]),
])
def test_most_restrictive_of_pooled_records_wins(tmp_path, other):
    """A broad approval in one manifest (*.jsonl) does not override another manifest's unknown or
    prohibiting record for the same file."""
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    broad = _manifest(tmp_path / "a", [dict(source_id="all_jsonl", path_glob="*.jsonl",
                                            permission_status="approved_for_training", allowed_uses=["training"],
                                            prohibited_uses=[])])
    narrow = _manifest(tmp_path / "b", [dict(source_id="under_review", path_glob="x.jsonl", **other)])
    f = tmp_path / "a" / "x.jsonl"
    check_sources([str(f)], "training", manifest=broad)
    for pooled in ([broad, narrow], [narrow, broad]):
        with pytest.raises(UserError) as e:
            check_sources([str(f)], "training", manifest=pooled)
        assert "under_review" in str(e.value) and "most restrictive" in str(e.value)


@pytest.mark.parametrize("status,allowed,prohibited", [
    ("unknown", [], []), ("internal_only", ["training"], []), ("restricted", ["training"], []),
    ("approved_for_public_release", ["training", "upload"], []),  # release does not imply training
    ("approved_for_training", [], []),  # "subject to allowed_uses"
    ("approved_for_training", ["training"], ["training"]),
])
def test_default_deny(tmp_path, status, allowed, prohibited):
    m = _manifest(tmp_path, [dict(source_id="s", path_glob="d/*.jsonl", permission_status=status,
                                  allowed_uses=allowed, prohibited_uses=prohibited)])
    with pytest.raises(UserError, match="may not be used for training"):
        check_sources([str(tmp_path / "d" / "x.jsonl")], "training", manifest=m)


def test_release_needs_a_release_record(tmp_path):
    m = _manifest(tmp_path, [dict(source_id="s", path_glob="x.jsonl", permission_status="approved_for_training",
                                  allowed_uses=["training"], prohibited_uses=[])])
    check_sources([str(tmp_path / "x.jsonl")], "training", manifest=m)
    with pytest.raises(UserError, match="approved_for_public_release"):
        check_sources([str(tmp_path / "x.jsonl")], "upload", manifest=m)


def test_glob_is_relative_to_the_manifest_directory(tmp_path):
    d = tmp_path.resolve()
    assert glob_matches("stoney/*.jsonl", str(d / "stoney" / "a.jsonl"), d)
    assert not glob_matches("stoney/*.jsonl", str(d / "x" / "stoney" / "a.jsonl"), d)  # under it: full path
    assert not glob_matches("*.jsonl", str(d / "stoney" / "a.jsonl"), d)  # * does not cross /
    assert glob_matches("stoney/*.jsonl", "/elsewhere/stoney/a.jsonl", d)  # outside: trailing parts
    assert glob_matches("hf://deepmind/aqua_rat", "hf://deepmind/aqua_rat", d)
    assert not glob_matches("hf://deepmind/aqua_rat", "hf://someone/aqua_rat", d)


def test_bad_manifests_and_uses(tmp_path):
    with pytest.raises(UserError, match="does not exist"):
        check_sources([str(STONEY)], manifest=tmp_path / "nope.yml")
    broken = tmp_path / "broken.yml"
    broken.write_text('schema_version: "1.0"\nrecords:\n  - source_id: a\n    path_glob: "*"\n')
    with pytest.raises(UserError, match="lacks"):
        load_manifest(broken)
    with pytest.raises(UserError, match="unknown data use"):
        check_sources([str(STONEY)], use="sharing")


def test_check_data_script_exit_codes(tmp_path):
    script = ["-m", "scripts.check_data"]  # from another directory: the repo root on PYTHONPATH
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    approved = tmp_path / "OpenAIFineTune" / "x.jsonl"  # the upstream manifest approves this glob
    approved.parent.mkdir()
    approved.write_text('{"messages": [{"role": "user", "content": "hi"}]}\n')
    before = sorted(os.listdir(tmp_path))
    refused = subprocess.run([sys.executable, *script, "--manifest", str(UPSTREAM), str(STONEY)],
                             capture_output=True, text=True, env=env, cwd=tmp_path)
    assert refused.returncode == 2, refused.stderr
    assert refused.stderr.startswith("error: ") and "no record" in refused.stderr
    assert "Traceback" not in refused.stderr
    ok = subprocess.run([sys.executable, *script, "--manifest", str(UPSTREAM), "--use", "training",
                         str(approved)], capture_output=True, text=True, env=env)
    assert ok.returncode == 0 and "ok:" in ok.stdout, ok.stderr
    assert sorted(os.listdir(tmp_path)) == before  # nothing written


def test_default_manifest_path_is_the_shipped_one():
    assert governance.DEFAULT_MANIFEST == OURS
    path, records = load_manifest()
    assert path == OURS and len(records) >= 4
