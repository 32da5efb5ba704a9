"""Loading the bundled files, the hub fallback, and bad input: one clear sentence, exit code 2."""
import functools
import json
import os
import shutil
from pathlib import Path

import pytest

from nanostoney import sources
from nanostoney.cli import run_main
from nanostoney.errors import UserError
from nanostoney.tasks import get_task

ROOT = Path(__file__).resolve().parent.parent


def test_bundled_files_load_with_expected_rows():
    for family, part, n in [("stoney", "all", 2000), ("aqua", "train", 254), ("aqua", "heldout", 254),
                            ("gsm8k", "train", 7473), ("gsm8k", "test", 1319)]:
        rows, path = sources.bundled_rows(family, part)
        assert len(rows) == n, path
        assert Path(path).is_file()


def test_cached_reader_returns_fresh_rows():
    path = ROOT / "data" / "aqua_rat" / "test.json"
    plain = sources.read_jsonl(path)
    assert plain == sources.load_local(path)
    sources.load_local(path)[0]["question"] = "changed"  # a caller's edit does not reach the cache
    assert sources.load_local(path) == plain


def _write(path, lines):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(line + "\n" for line in lines))
    return path


def _gsm_row(q="Ann has 2 apples and buys 3. How many?", a="2+3 = <<2+3=5>>5\n#### 5"):
    return json.dumps({"question": q, "answer": a})


def test_missing_file(tmp_path):
    with pytest.raises(UserError, match="does not exist") as e:
        get_task("gsm8k", data_dir=tmp_path).examples("train")
    assert str(tmp_path) in str(e.value)


def test_malformed_line_names_file_and_line(tmp_path):
    _write(tmp_path / "gsm8k" / "test.jsonl", [_gsm_row()])
    bad = _write(tmp_path / "gsm8k" / "train.jsonl", [_gsm_row(), _gsm_row("Q2"), '{"question": "Q3", "answer"'])
    with pytest.raises(UserError) as e:
        get_task("gsm8k", data_dir=tmp_path).examples("train")
    assert f"{bad.resolve()}:3: malformed JSON line" in str(e.value)


def test_empty_file(tmp_path):
    _write(tmp_path / "stoney" / "stoney_valid.jsonl", [])
    with pytest.raises(UserError, match="has no rows"):
        get_task("stoney_qa", data_dir=tmp_path).examples("train")


def test_empty_split(tmp_path):
    rows = [json.loads(line) for line in (ROOT / "data" / "stoney" / "stoney_valid.jsonl").open().readlines()[:2]]
    _write(tmp_path / "stoney" / "stoney_valid.jsonl", [json.dumps(r) for r in rows])
    task = get_task("stoney_qa", data_dir=tmp_path)
    errors = []
    for split in ("train", "val", "test"):
        try:
            task.examples(split)
        except UserError as e:
            errors.append(str(e))
    assert errors and all("has no examples in its" in m for m in errors)


def test_wrong_row_shape(tmp_path):
    _write(tmp_path / "gsm8k" / "test.jsonl", [json.dumps({"question": "q"})])
    _write(tmp_path / "gsm8k" / "train.jsonl", [_gsm_row()])
    with pytest.raises(UserError, match="lacks 'question' or 'answer'"):
        get_task("gsm8k", data_dir=tmp_path).examples("test")


def test_unknown_task_split_and_source():
    with pytest.raises(UserError, match="valid tasks are stoney_qa, stoney_lexicon"):
        get_task("stoney_quiz")
    with pytest.raises(UserError, match="unknown split"):
        get_task("gsm8k").examples("dev")
    with pytest.raises(UserError, match="unknown data source"):
        get_task("gsm8k", source="huggingface")


def test_bad_input_exits_with_code_2(tmp_path, capsys):
    """Script level: run_main turns the UserError into one line on stderr and exit code 2."""
    from scripts import check_data
    _write(tmp_path / "gsm8k" / "test.jsonl", [_gsm_row()])
    bad = _write(tmp_path / "gsm8k" / "train.jsonl", ["{not json"])
    before = sorted(p.name for p in tmp_path.rglob("*"))
    # (a swapped-in file is not the reviewed one: the gate refuses it by its content before reading it)
    for argv, needle in [(["--tasks", "gsm8k", "--data-dir", str(tmp_path)], f"{bad.resolve()} may not be used"),
                         (["--tasks", "nosuchtask"], "unknown task 'nosuchtask'")]:
        with pytest.raises(SystemExit) as e:
            run_main(lambda: check_data.main(argv))
        assert e.value.code == 2
        err = capsys.readouterr().err
        assert err.startswith("error: ") and needle in err and err.count("\n") == 1
    assert sorted(p.name for p in tmp_path.rglob("*")) == before  # nothing written


def test_hub_explicit_failure_is_an_error_and_auto_falls_back(monkeypatch, capsys):
    def offline(family):
        raise UserError(f"could not load {sources.HUB[family][0]} from the Hugging Face Hub (ConnectionError); ...")
    monkeypatch.setattr(sources, "_load_hub", offline)
    with pytest.raises(UserError, match="could not load deepmind/aqua_rat"):
        sources.hub_rows("aqua", "hub")
    assert sources.hub_rows("aqua", "bundled") is None
    assert sources.hub_rows("aqua", "auto") is None
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "unreachable" in err and "aqua_rat/dev.json" in err
    # a task built with source="auto" then uses the bundled files
    task = get_task("aqua_mc", source="auto")
    assert len(task.examples("train")) == 254
    assert task.sources() == [str(sources.bundled_path("aqua", p)) for p in ("train", "heldout")]


def test_hub_rows_replace_only_the_training_pool(monkeypatch):
    """With a (fake) hub copy, train comes from it minus anything held out; val/test stay bundled."""
    bundled = get_task("aqua_mc")
    held = bundled.examples("test")[0]
    test_rows = sources.read_jsonl(ROOT / "data" / "aqua_rat" / "test.json")
    leaked = next(r for r in test_rows if r["question"].strip() in held["messages"][0]["content"])
    fresh = dict(leaked, question="A brand new problem: what is 2 + 2?")
    monkeypatch.setattr(sources, "_load_hub", lambda family: [leaked, fresh])
    monkeypatch.setattr(sources, "_hub_reachable", lambda: True)
    from nanostoney.tasks import aqua
    # a fresh cache for this test only: the fake hub rows must not outlive it
    monkeypatch.setattr(aqua, "load_problems", functools.lru_cache(maxsize=None)(aqua.load_problems.__wrapped__))
    task = aqua.AquaMC(source="hub")
    train = task.examples("train")
    assert len(train) == 1 and "brand new problem" in train[0]["messages"][0]["content"]
    assert [e["id"] for e in task.examples("test")] == [e["id"] for e in bundled.examples("test")]
    assert task.sources()[0] == "hf://deepmind/aqua_rat"


def test_data_dir_copy_gives_identical_tasks(tmp_path):
    shutil.copytree(ROOT / "data" / "stoney", tmp_path / "stoney")
    a, b = get_task("stoney_mc"), get_task("stoney_mc", data_dir=tmp_path)
    assert [e["messages"] for e in a.examples("val")] == [e["messages"] for e in b.examples("val")]
    assert os.path.dirname(b.sources()[0]) == str(tmp_path / "stoney")
