"""mmlu_yo / mmlu_en on small files written here in the hubs' schemas (no network): loading from a
local copy (csv, jsonl, parquet) and through the hub-id code path (datasets.load_dataset
patched to serve the file), the four-option answer format, the governance gate with and without
the records, the alignment check between the languages, and the MC machinery at four options
(RM negatives, letter diagnostics, interp items)."""
import csv
import json

import pytest
import torch
import yaml

from nanostoney import governance, letters, reward_model
from nanostoney.answers import answer_after, parse_letter
from nanostoney.errors import UserError
from nanostoney.interp import items
from nanostoney.tasks import get_task, mmlu

SUBJECTS = ("abstract_algebra", "anatomy", "virology")


def english_rows(n_per_subject=20):
    """cais/mmlu schema: question, subject, choices, answer (0-3), in subject order."""
    return [{"question": f"Question {k} about {s}?", "subject": s,
             "choices": [f"{s} option {k}-{j}" for j in range(4)], "answer": (k * 7 + len(s)) % 4}
            for s in SUBJECTS for k in range(n_per_subject)]


def yoruba_rows(english):
    """openai/MMMLU schema (with the older revisions' unnamed index column): the same items."""
    return [{"Unnamed: 0": str(i), "Question": "Ìbéèrè " + r["question"], **{L: "Yorùbá " + c for L, c in
            zip("ABCD", r["choices"])}, "Answer": "ABCD"[r["answer"]], "Subject": r["subject"]}
            for i, r in enumerate(english)]


def write_csv(path, rows):
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", encoding="utf-8", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)


def write_jsonl(path, rows):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")


@pytest.fixture(scope="module")
def copies(tmp_path_factory):
    """A data directory holding local copies of both files, in the hubs' own schemas."""
    root = tmp_path_factory.mktemp("mmlu_data")
    en = english_rows()
    write_csv(root / "mmmlu" / "mmlu_YO-NG.csv", yoruba_rows(en))
    write_jsonl(root / "mmlu" / "all_test.jsonl", en)
    return root


def test_mmlu_yo_loads_from_a_local_copy_in_the_hub_schema(copies):
    task = get_task("mmlu_yo", data_dir=copies)
    assert task.sources() == [str(copies / "mmmlu" / "mmlu_YO-NG.csv")] and task.family == "yoruba"
    exs = [ex for s in ("train", "val", "test") for ex in task.examples(s)]
    assert len(exs) == 60 and len({ex["id"] for ex in exs}) == 60
    ex = task.examples("train")[0]
    user = ex["messages"][0]["content"]
    assert user.startswith("Ìbéèrè") and "\n- Yorùbá" in user and user.endswith(" D")  # four options: no E
    assert ex["answer"] in "ABCD" and len(ex["choices"]) == 4 and set(ex["regions"]) >= {f"option_{L}" for L in "ABCD"}
    gold = ex["messages"][-1]["content"]
    assert gold.startswith("<think>") and parse_letter(answer_after(gold)) == ex["answer"]   # the shared format
    assert task.evaluate(ex, gold) and not task.evaluate(ex, gold.replace(f"Answer: {ex['answer']}", "Answer: E"))


def test_splits_are_by_item_and_shared_by_both_languages(copies):
    yo, en = get_task("mmlu_yo", data_dir=copies), get_task("mmlu_en", data_dir=copies)
    for split in ("train", "val", "test"):
        assert [e["source_id"] for e in yo.examples(split)] == [e["source_id"] for e in en.examples(split)]
        assert [e["answer"] for e in yo.examples(split)] == [e["answer"] for e in en.examples(split)]
    assert mmlu.check_alignment(data_dir=copies) == 1.0
    shuffled = mmlu.items(english_rows()[::-1], "x")   # each subject in reverse: misaligned
    assert mmlu.alignment(mmlu.load_items("mmmlu_yo", "bundled", copies), shuffled) < 0.5


def test_parquet_and_jsonl_copies_read_the_same_items(copies, tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq
    rows = yoruba_rows(english_rows())
    (tmp_path / "mmmlu").mkdir()
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "mmmlu" / "mmlu_YO-NG.parquet")
    write_jsonl(tmp_path / "j" / "mmmlu" / "mmlu_YO-NG.jsonl", rows)
    want = mmlu.load_items("mmmlu_yo", "bundled", copies)
    assert mmlu.load_items("mmmlu_yo", "bundled", tmp_path) == want
    assert mmlu.load_items("mmmlu_yo", "bundled", tmp_path / "j") == want


def test_the_hub_id_code_path_reads_openai_mmmlu_yo_ng(copies, tmp_path, monkeypatch):
    datasets = pytest.importorskip("datasets")
    calls = []
    rows = mmlu.read_table(str(copies / "mmmlu" / "mmlu_YO-NG.csv"))

    def load_dataset(name, config=None, split=None):
        calls.append((name, config, split))
        return datasets.Dataset.from_list(rows)

    monkeypatch.setattr(datasets, "load_dataset", load_dataset)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")   # the reachability check trusts the cache: no socket
    hub = get_task("mmlu_yo", source="hub", data_dir=tmp_path)
    assert hub.sources() == ["hf://openai/MMMLU"]
    assert calls == [] and len(hub.examples("train")) > 0 and calls == [("openai/MMMLU", "YO_NG", "test")]
    local = get_task("mmlu_yo", data_dir=copies)
    assert hub.examples("val") == local.examples("val")
    # nothing bundled and no local copy: the default source is the hub id (and the gate sees that)
    assert get_task("mmlu_yo", data_dir=tmp_path).sources() == ["hf://openai/MMMLU"]
    assert get_task("mmlu_en", data_dir=tmp_path).sources() == ["hf://cais/mmlu"]


def manifest_without_mmlu(path):
    doc = yaml.safe_load(governance.DEFAULT_MANIFEST.read_text())
    doc["records"] = [r for r in doc["records"] if "mmlu" not in r["source_id"]]
    path.write_text(yaml.safe_dump(doc))
    return path


@pytest.mark.parametrize("local", [True, False])
def test_the_gate_passes_mmlu_only_with_its_records(copies, tmp_path, local):
    srcs = [s for name in ("mmlu_yo", "mmlu_en")
            for s in get_task(name, data_dir=copies if local else tmp_path).sources()]
    assert [sid for _, sid in governance.check_sources(srcs)] == (
        ["mmmlu_yoruba_local", "mmlu_english_local"] if local else ["mmmlu_yoruba_hub", "mmlu_english_hub"])
    bare = manifest_without_mmlu(tmp_path / "MANIFEST.yml")
    with pytest.raises(UserError, match="may not be used for training: it has no record"):
        governance.check_sources(srcs[:1], manifest=bare)
    with pytest.raises(UserError, match="may not be used for upload"):   # training only, no release record
        governance.check_sources(srcs[:1], use="upload")


def test_a_file_in_another_schema_is_one_sentence(tmp_path):
    write_csv(tmp_path / "mmmlu" / "mmlu_YO-NG.csv", [{"text": "hello", "label": "A"}])
    with pytest.raises(UserError, match=r"row 1: a row lacks 'Question'"):
        get_task("mmlu_yo", data_dir=tmp_path).examples("train")
    write_csv(tmp_path / "x" / "mmmlu" / "mmlu_YO-NG.csv", [{"Question": "q", "A": "1", "B": "2", "C": "3", "D": "4",
                                                             "Answer": "E", "Subject": "s"}])
    with pytest.raises(UserError, match="four options, an answer A-D"):
        get_task("mmlu_yo", data_dir=tmp_path / "x").examples("train")


def test_four_options_through_the_mc_machinery(copies):
    from test_grpo import byte_tokenizer
    tok = byte_tokenizer()
    task = get_task("mmlu_yo", data_dir=copies)
    # no ground-truth negative: MMLU has no rationale arguing for a wrong option (the reward model's
    # rule since #16), so its DPO pairs are on-policy ones
    assert all(reward_model.rejected_text(task, ex) is None for ex in task.examples("train")[:12])
    # letter diagnostics renormalise over the row's own four letters
    pol, ref = torch.randn(3, 5), torch.randn(3, 5)
    pol[:, 4] = ref[:, 4] = 50.0   # a huge E logit must not count for a four-option row
    st = letters.letter_summary(pol, ref, [0, 1, 2], [4, 4, 4])
    assert (st["pred"] < 4).all() and torch.isfinite(st["kl"]).all() and (st["kl"] >= -1e-6).all()
    assert torch.equal(letters.letter_summary(pol, pol, [0, 1, 2], [4, 4, 4])["kl"], torch.zeros(3))
    # and the report's items: option regions and the answer index over four options
    ex = task.examples("val")[0]
    item = items.prepare_item(tok, task, ex, "val", lambda w: "e", ex["messages"][-1]["content"])
    assert item.answer_index == "ABCD".index(ex["answer"]) and len(item.letter_ids) == 4
    assert set(item.option[item.option >= 0].tolist()) == {0, 1, 2, 3}
