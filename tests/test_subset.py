"""n examples of a split: one helper, hash-ordered and balanced on direction, letter and depth;
no code takes a prefix of an ordered split."""
import collections
import re
from pathlib import Path

import pytest

from nanostoney.tasks import BUNDLED_TASKS as TASK_NAMES, get_task
from nanostoney.tasks.subset import balanced_order, subset

ROOT = Path(__file__).resolve().parent.parent


def spread(counts):
    return max(counts.values()) - min(counts.values()) if counts else 0


@pytest.mark.parametrize("name", [n for n in TASK_NAMES if n not in ("gsm8k", "gsm8k_mc", "aqua_mc", "stoney_qa")]
                         + ["gsm8k_mc"])
@pytest.mark.parametrize("n", [5, 16, 64, 100])
def test_subsets_are_balanced_on_direction_letter_and_depth(name, n):
    task = get_task(name)
    exs = subset(task, "val", n)
    n = min(n, len(task.examples("val")))  # stoney_verb's val split holds fewer than 100
    assert len(exs) == n and len({e["id"] for e in exs}) == n
    if "verb" in name:
        assert spread(collections.Counter(e["answer"] for e in exs)) <= 1
    for key in ("direction", "depth"):
        counts = collections.Counter(e[key] for e in exs if e.get(key))
        assert spread(counts) <= 1, (key, counts)
    if task.kind == "mc":
        letters = collections.Counter(e["answer"] for e in exs)
        assert spread(letters) <= 1 and (n < 5 or len(letters) == 5), letters
        for d in ("s2e", "e2s"):  # and the letters within each direction
            within = collections.Counter(e["answer"] for e in exs if e.get("direction") == d)
            assert spread(within) <= 2 if n >= 10 else True, within


def test_subset_is_hash_chosen_not_a_prefix_and_deterministic():
    task = get_task("stoney_mc")
    val = task.examples("val")
    first = subset(task, "val", 40)
    assert [e["id"] for e in first] != [e["id"] for e in val[:40]]
    assert [e["id"] for e in first] == [e["id"] for e in subset(task, "val", 40)]
    assert [e["id"] for e in subset(task, "val", 64)][:40] == [e["id"] for e in first]  # nested
    assert {e["id"] for e in subset(task, "val", 0)} == {e["id"] for e in val}           # 0 = all
    assert len(subset(task, "val", 10 ** 6)) == len(val)
    # a different salt draws other items, equally balanced
    other = balanced_order(val, salt="other")[:40]
    assert {e["id"] for e in other} != {e["id"] for e in first}
    assert spread(collections.Counter(e["answer"] for e in other)) <= 1


def test_no_prefix_slice_of_an_ordered_split_remains():
    """Every "n examples" goes through tasks.subset: no `.examples(...)[:n]` (or a slice of a
    list that came straight from .examples) in the library, scripts or benches."""
    prefix = re.compile(r"\.examples\([^)]*\)\s*\[[^\]]*:")
    named = re.compile(r"^\s*(\w+)\s*=\s*\w+\.examples\(")
    bad = []
    for folder in ("nanostoney", "scripts", "bench"):
        for path in sorted((ROOT / folder).rglob("*.py")):
            lines = path.read_text().splitlines()
            names = {m.group(1) for line in lines if (m := named.match(line))}
            for i, line in enumerate(lines, 1):
                if prefix.search(line) or any(re.search(rf"\b{v}\s*\[[^\]]*:", line) for v in names):
                    bad.append(f"{path.relative_to(ROOT)}:{i}: {line.strip()}")
    assert bad == []
