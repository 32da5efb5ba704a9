"""MMLU in Yoruba (openai/MMMLU, YO_NG) and English (cais/mmlu): the same four-option questions in two
languages, both in MMLU's per-subject order, so an item is "mmlu:<subject>:<k>" in both (check_alignment
tests this). Read from a local copy under data/, else the hub; options keep their order.
"""
import collections
import csv
import functools
import os

from nanostoney.answers import LETTERS, picked
from nanostoney.errors import UserError
from nanostoney.sources import HUB, bundled_path, hub_dataset, hub_label, parquet_rows, read_jsonl
from nanostoney.tasks.base import MCTask, mc_example, split_by_hash

EXTS = (".csv", ".jsonl", ".parquet")


def read_table(path):
    """Rows (dicts) of a .csv (the hub's MMMLU files), .jsonl or .parquet file."""
    if path.endswith(".parquet"):
        return parquet_rows(path)
    if path.endswith(".jsonl"):
        return read_jsonl(path)
    try:
        with open(path, encoding="utf-8", newline="") as f:
            return list(csv.DictReader(f))
    except UnicodeDecodeError:
        raise UserError(f"{path}: not UTF-8 text; convert it or leave it out.") from None


def parse_row(row, where):
    """(subject, question, [4 choices], gold letter) of an MMMLU or a cais/mmlu row."""
    if "Question" in row:
        choices, answer, question, subject = [row.get(k) for k in "ABCD"], row.get("Answer"), row["Question"], \
            row.get("Subject")
    elif "question" in row and "choices" in row:
        choices, question, subject = list(row["choices"] or []), row["question"], row.get("subject")
        answer = LETTERS[int(row["answer"])] if str(row.get("answer")).isdigit() and int(row["answer"]) < 4 \
            else row.get("answer")
    else:
        raise UserError(f"{where}: a row lacks 'Question' (MMMLU schema: Question, A, B, C, D, Answer, Subject) and "
                        f"'question'/'choices' (cais/mmlu schema); point at a file in one of these schemas.")
    if len(choices) != 4 or any(c is None for c in choices) or answer not in LETTERS[:4] or not subject:
        raise UserError(f"{where}: a row needs four options, an answer A-D and a subject; fix the file.")
    return str(subject), str(question).strip(), [" ".join(str(c).split()) for c in choices], answer


def items(rows, where):
    """{item id: (subject, question, choices, letter)}, the id being (subject, position in subject)."""
    out, seen = {}, collections.Counter()
    for r, row in enumerate(rows):
        item = parse_row(row, f"{where} row {r + 1}")
        out[f"mmlu:{item[0]}:{seen[item[0]]}"] = item
        seen[item[0]] += 1
    return out


def alignment(yoruba, english):
    """Share of the items both hold whose gold letters agree (1.0 when aligned; ~0.25 if not)."""
    shared = [k for k in yoruba if k in english]
    return sum(yoruba[k][3] == english[k][3] for k in shared) / max(1, len(shared))


def local_copy(family, data_dir=None):
    """The local file of `family` under the data directory (any of EXTS), or None."""
    stem = os.path.splitext(bundled_path(family, "all", data_dir))[0]
    return next((stem + e for e in EXTS if os.path.isfile(stem + e)), None)


def sources(family, source="bundled", data_dir=None):
    """What the task reads: the local copy when present (and not source="hub"), else the hub id."""
    path = None if source == "hub" else local_copy(family, data_dir)
    return [path] if path else [hub_label(family)]


@functools.lru_cache(maxsize=None)
def load_items(family, source="bundled", data_dir=None):
    """{item id: (subject, question, choices, letter)} of the local copy or the hub."""
    path = sources(family, source, data_dir)[0]
    rows = hub_dataset(*HUB[family]).to_list() if path.startswith("hf://") else read_table(path)
    if not rows:
        raise UserError(f"{path} holds no rows; point at the MMMLU / MMLU test file.")
    return items(rows, path)


class _MMLU(MCTask):
    data_family = None

    def sources(self):
        return sources(self.data_family, self.source, self.data_dir)

    def _build(self):
        out = {"train": [], "val": [], "test": []}
        for iid, (subject, q, choices, letter) in load_items(self.data_family, self.source, self.data_dir).items():
            reasoning = f"The answer is {picked(choices[LETTERS.index(letter)], letter)}."
            out[split_by_hash(iid)].append(mc_example(f"{self.name}/{iid}", iid, q, choices, letter, reasoning,
                                                      subject=subject))
        return out


class MMLUYoruba(_MMLU):
    name, family, data_family = "mmlu_yo", "yoruba", "mmmlu_yo"


class MMLUEnglish(_MMLU):
    name, family, data_family = "mmlu_en", "english", "mmlu_en"


def check_alignment(source="bundled", data_dir=None):
    """alignment() of the two tasks' files (both must be readable)."""
    return alignment(load_items("mmmlu_yo", source, data_dir), load_items("mmlu_en", source, data_dir))
