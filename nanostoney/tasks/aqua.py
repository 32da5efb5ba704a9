"""AQuA-RAT: algebra word problems with five options and a rationale (the <think> block). The options
are reordered to put the gold on a balanced letter, and letters the rationale names follow them.
Splits: the bundled dev set (or the hub's) is train; the test set is cut into val and test by hash.
"""
import functools
import random
import re

from nanostoney.answers import LETTERS, picked
from nanostoney.errors import UserError
from nanostoney.sources import bundled_path, bundled_rows, hub_label, hub_rows
from nanostoney.tasks.base import MCTask, balanced_slots, mc_example, short_id, split_by_hash, stable_hash

OPTION_RE = re.compile(r"^\s*([A-E])\s*\)\s*(.*)$", re.DOTALL)
_REF = r"(?:the\s+)?(?:correct\s+)?(?:answer|ans|option|choice)\b[^A-Za-z\n]{0,4}(?:is\s+)?(?:option\s*)?\(?"
CLOSING_RE = re.compile(r"(?:\n|^|(?<=[.!\s]))\W*(?:" + _REF + r"[A-E]|[A-E](?:\s+is the answer)?)[\W]*$", re.I)
REF_RE = re.compile(r"\b(" + _REF + r")([A-E])\b", re.I)


def relabel(problem, target):
    """The problem with the gold at letter `target` and the rationale's letters renamed to match."""
    old = problem["choices"]
    gold = LETTERS.index(problem["answer"])
    wrong = [i for i in range(5) if i != gold]
    random.Random(stable_hash(problem["source_id"])).shuffle(wrong)
    order = wrong[:target] + [gold] + wrong[target:]           # new position -> old position
    new_letter = {LETTERS[o]: LETTERS[n] for n, o in enumerate(order)}
    rationale = problem["rationale"]
    while True:  # drop the closing "Answer: D" (there can be two, "Answer D\nD")
        m = CLOSING_RE.search(rationale)
        if not m or not rationale[:m.start()].strip():
            break
        rationale = rationale[:m.start()].rstrip()
    rationale = REF_RE.sub(lambda m: m.group(1) + new_letter[m.group(2).upper()], rationale)
    return dict(problem, choices=[old[o] for o in order], answer=LETTERS[target], rationale=rationale)


def parse_problem(row, where):
    """A problem dict from an AQuA row, or None for a malformed one (a few of the hub's 97k lack options)."""
    if not all(k in row for k in ("question", "options", "correct")):
        raise UserError(f"{where}: row lacks 'question', 'options' or 'correct'; AQuA rows need all three.")
    choices = []
    for letter, opt in zip(LETTERS, row["options"] or []):
        m = OPTION_RE.match(str(opt))
        if not m or m.group(1) != letter:
            return None
        choices.append(" ".join(m.group(2).split()))
    if len(choices) != 5 or row["correct"] not in LETTERS:
        return None
    q = row["question"].strip()
    return {"question": q, "choices": choices, "answer": row["correct"],
            "rationale": (row.get("rationale") or "").strip(), "source_id": "aqua:" + short_id(q)}


def _problems(rows, path):
    return [p for k, row in enumerate(rows) if (p := parse_problem(row, f"{path} row {k + 1}"))]


@functools.lru_cache(maxsize=None)
def load_problems(source="bundled", data_dir=None):
    """({split: [problem]}, [sources]), read once per process."""
    held_rows, held_path = bundled_rows("aqua", "heldout", data_dir)
    held = _problems(held_rows, held_path)
    val = [p for p in held if split_by_hash(p["source_id"], val=0.5, test=0.5) == "val"]
    test = [p for p in held if split_by_hash(p["source_id"], val=0.5, test=0.5) == "test"]
    hub = hub_rows("aqua", source)
    if hub:
        pool, used = _problems(*hub), [hub[1], held_path]
    else:
        train_rows, train_path = bundled_rows("aqua", "train", data_dir)
        pool, used = _problems(train_rows, train_path), [train_path, held_path]
    seen, train = {p["source_id"] for p in held}, []
    for p in pool:  # a repeated problem enters train once, a held-out one never
        if p["source_id"] not in seen:
            seen.add(p["source_id"])
            train.append(p)
    return {"train": train, "val": val, "test": test}, used


def sources(source="bundled", data_dir=None):
    """The files (and hub id) behind aqua_mc, known without loading except for "auto"."""
    if source == "auto":
        return list(load_problems(source, data_dir)[1])
    train = hub_label("aqua") if source == "hub" else str(bundled_path("aqua", "train", data_dir))
    return [train, str(bundled_path("aqua", "heldout", data_dir))]


class AquaMC(MCTask):
    name, family = "aqua_mc", "math"

    def sources(self):
        return sources(self.source, self.data_dir)

    def _build(self):
        splits, _ = load_problems(self.source, self.data_dir)
        out = {}
        for split, probs in splits.items():
            slots = balanced_slots([p["source_id"] for p in probs], salt="aqua_mc")
            out[split] = []
            for p in probs:
                p = relabel(p, slots[p["source_id"]])
                reasoning = (f"{p['rationale'] or 'The rationale is missing.'}\nThe answer is "
                             f"{picked(p['choices'][LETTERS.index(p['answer'])], p['answer'])}.")
                out[split].append(mc_example("aqua_mc/" + p["source_id"], p["source_id"], p["question"],
                                             p["choices"], p["answer"], reasoning))
        return out
