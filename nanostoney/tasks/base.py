"""What every task shares: the Task class, deterministic splits, the multiple-choice format
(one for all families, so Stoney and math differ in content, not shape) and the surface-cue baselines.
    user:      "{question}\n\n- ... A\n- ... B\n- ... C\n- ... D\n- ... E"  (MC tasks; MMLU stops at D)
    assistant: "<think>{reasoning}</think>\nAnswer: {answer}"
"""
import abc
import collections
import hashlib
import math
import re
import statistics
import unicodedata

from nanostoney.answers import (LETTERS, OPTION_MARK, answer_after, format_answer, option_letters, option_line,
                                parse_letter, parse_number)
from nanostoney.errors import UserError
from nanostoney.tokenizer import SYSTEM_JOIN  # how the tokenizer folds a system message into the user turn

SPLITS = ("train", "val", "test")


def stable_hash(text):
    """An integer hash, the same on every machine and run (unlike hash())."""
    return int(hashlib.sha1(text.encode("utf-8")).hexdigest()[:15], 16)


def short_id(text):
    return hashlib.sha1(text.encode("utf-8")).hexdigest()[:12]


def split_by_hash(key, val=0.1, test=0.1):
    """train/val/test by a hash of the *source*: all derived from one source lands in one split."""
    u = (stable_hash(key) % 10_000) / 10_000
    return "val" if u < val else "test" if u < val + test else "train"


def normalize(text):
    """Case-folded, spaces collapsed, edge punctuation trimmed, diacritics KEPT (distinct Stoney sounds)."""
    text = unicodedata.normalize("NFC", unicodedata.normalize("NFC", text).casefold())
    text = " ".join(text.split())
    return text.strip(" \t\n.,;:!?\"'`“”‘’()[]{}*_")


def user_regions(system, user, regions):
    """(user text with the system message folded in as the tokenizer does, regions shifted to it)."""
    if not system:
        return user, dict(regions)
    shift = len(system) + len(SYSTEM_JOIN)
    out = {"system": (0, len(system))}
    out.update({k: (a + shift, b + shift) for k, (a, b) in regions.items()})
    return system + SYSTEM_JOIN + user, out


def render_mc(question, choices):
    """(user text, regions: char spans of the question, the options block and each option line)."""
    option_letters(len(choices))  # 2..5 options
    text = question.strip() + "\n\n"
    regions = {"question": (0, len(question.strip()))}
    start = len(text)
    for letter, choice in zip(LETTERS, choices):
        line = option_line(letter, choice)
        regions[f"option_{letter}"] = (len(text), len(text) + len(line))
        text += line + "\n"
    text = text.rstrip("\n")
    regions["options"] = (start, len(text))
    return text, regions


def question_only_text(user_text):
    """A rendered MC user text without its options block (the text itself when it has none): the
    block is last, its lines joined by single newlines, so it starts at the last blank line."""
    cut = user_text.rfind("\n\n" + OPTION_MARK)
    return user_text[:cut] if cut >= 0 else user_text


def open_example(eid, source_id, question, reasoning, answer, **extra):
    user = [{"role": "user", "content": question}]
    return {"id": eid, "source_id": source_id, **extra,
            "messages": user + [{"role": "assistant", "content": format_answer(reasoning, answer)}],
            "answer": answer, "regions": {"question": (0, len(question))}}


def mc_example(eid, source_id, question, choices, answer_letter, reasoning, **extra):
    user, regions = render_mc(question, choices)
    return {"id": eid, "source_id": source_id,
            "messages": [{"role": "user", "content": user},
                         {"role": "assistant", "content": format_answer(reasoning, answer_letter)}],
            "answer": answer_letter, "regions": regions, "choices": list(choices), **extra}


class Task(abc.ABC):
    """Examples per split, a prompt, a reward in [0, 1] and a verifier; a control has no train split."""
    name = family = kind = None
    control = False

    def __init__(self, source="bundled", data_dir=None):
        self.source = source
        self.data_dir = data_dir
        self._splits = None

    @abc.abstractmethod
    def _build(self):
        """{split: [example]} for this source."""

    @abc.abstractmethod
    def sources(self):
        """The files or hf:// ids the examples come from (what the governance gate checks)."""

    def splits(self):
        if self._splits is None:
            self._splits = self._build()
        return self._splits

    def examples(self, split):
        if split not in SPLITS:
            raise UserError(f"unknown split {split!r} for task {self.name}; use one of {', '.join(SPLITS)}.")
        rows = self.splits()[split]
        if not rows and self.control:
            raise UserError(f"task {self.name} is a control (no training text holds its items), so it has no "
                            f"{split} split; use it for evaluation on val or test only.")
        if not rows:
            raise UserError(f"task {self.name} has no examples in its {split} split (sources: "
                            f"{', '.join(self.sources())}); the data file is empty or too small to split.")
        return rows

    def prompt(self, example):
        """The conversation minus the gold assistant turn (what the model is asked)."""
        return [dict(m) for m in example["messages"][:-1]]

    def reward(self, example, completion):
        return 1.0 if self.evaluate(example, completion) else 0.0

    @abc.abstractmethod
    def evaluate(self, example, completion):
        """Is the completion's answer correct for this example?"""

    def __repr__(self):
        return f"<Task {self.name} ({self.family}, {self.kind}) source={self.source}>"


class MCTask(Task):
    """Multiple choice: the verifier reads the letter after the last "Answer:"."""
    kind = "mc"

    def evaluate(self, example, completion):
        return parse_letter(answer_after(completion)) == example["answer"]


# -----------------------------------------------------------------------------
# surface-cue baselines: pickers that never read the meaning. Each should be near 20%.

def _best(scores):
    """Indices of the best score, all when tied (a tie is a random choice: nothing from letter order)."""
    top = max(scores)
    return [i for i, x in enumerate(scores) if x == top]


def _ngrams(text, n=3):
    t = " ".join(text.casefold().split())
    return {t[i:i + n] for i in range(max(0, len(t) - n + 1))}


def _worked(ex):
    """Each option's answer as written: its own rationale where the task has one, else the option."""
    return [ex.get("option_rationales", {}).get(L, c) for L, c in zip(LETTERS, ex["choices"])]


def _numbers(ex):
    nums = [parse_number(c) for c in ex["choices"]]
    return None if any(n is None for n in nums) else nums


def _ending_counts(ex):
    """Per option, how many options (itself included) share its last two characters."""
    ends = [normalize(c)[-2:] for c in ex["choices"]]
    return [ends.count(e) for e in ends]


def pick_most_similar(ex):
    """Most character-3-gram overlap with the question (share of the option's 3-grams)."""
    a, b = ex["regions"]["question"]
    q = _ngrams(ex["messages"][-2]["content"][a:b])
    return _best([len(q & _ngrams(c)) / max(1, len(_ngrams(c))) for c in ex["choices"]])


def pick_median_number(ex):
    nums = _numbers(ex)
    return None if nums is None else _best([-abs(n - statistics.median(nums)) for n in nums])


def pick_central_number(ex):
    """The number closest to the others on a log scale (the "odd ones out are wrong" guess)."""
    nums = _numbers(ex)
    if nums is None:
        return None
    logs = [math.log10(abs(n) + 1) for n in nums]
    return _best([-sum(abs(a - b) for b in logs) for a in logs])


EQUATION_RE = re.compile(r"(-?\d+(?:\.\d+)?) ([-+*/x×]) (-?\d+(?:\.\d+)?) = (-?\d+(?:\.\d+)?)")


def equation_true(a, op, b, c):
    a, b, c = float(a), float(b), float(c)
    value = {"+": a + b, "-": a - b, "*": a * b, "x": a * b, "×": a * b, "/": a / b if b else math.nan}[op]
    return abs(value - c) <= 1e-6 * max(1.0, abs(c))


def pick_line_checker(ex):
    """The options whose worked chain has the fewest false "a op b = c" lines (None: no such line)."""
    found = [EQUATION_RE.findall(w) for w in _worked(ex)]
    if not any(found):
        return None
    return _best([-sum(not equation_true(*eq) for eq in eqs) for eqs in found])


PICKERS = {"line_checker": pick_line_checker,
           "longest": lambda ex: _best([len(c) for c in ex["choices"]]),
           "shortest": lambda ex: _best([-len(c) for c in ex["choices"]]),
           "longest_worked": lambda ex: _best([len(w) for w in _worked(ex)]),
           "shortest_worked": lambda ex: _best([-len(w) for w in _worked(ex)]),
           "most_similar_to_question": pick_most_similar,
           "median_number": pick_median_number, "central_number": pick_central_number,
           "odd_ending_out": lambda ex: _best([-n for n in _ending_counts(ex)]),
           "common_ending": lambda ex: _best(_ending_counts(ex))}


def answer_prior(train):
    """The "answer alone" picker: the options most often gold in `train`, never reading the question."""
    counts = collections.Counter(normalize(ex["choices"][LETTERS.index(ex["answer"])]) for ex in train)
    return lambda ex: _best([counts[normalize(c)] for c in ex["choices"]])


def baselines(examples, train=None):
    """{baseline: accuracy} of each letter, each picker where it applies and, given train, the prior."""
    out = {f"always_{L}": sum(ex["answer"] == L for ex in examples) / len(examples) for L in LETTERS}
    pickers = dict(PICKERS, **({"answer_prior": answer_prior(train)} if train else {}))
    for name, pick in pickers.items():
        picked = [(ex, best) for ex in examples if (best := pick(ex)) is not None]
        if picked:
            out[name] = sum((LETTERS.index(ex["answer"]) in best) / len(best) for ex, best in picked) / len(picked)
    return out


# -----------------------------------------------------------------------------
# the model baselines that never read the question (cloze in scripts.eval): chance for a model that reads it

def with_other_question(examples, salt="other-question"):
    """Each example with another's prompt (a derangement in hash order within its direction)."""
    groups = {}
    for i, ex in enumerate(examples):
        groups.setdefault(ex.get("direction"), []).append(i)
    out = list(examples)
    for idx in groups.values():
        order = sorted(idx, key=lambda i: stable_hash(f"{salt}/{examples[i]['id']}"))
        for a, b in zip(order, order[1:] + order[:1]):
            if a != b:
                out[a] = dict(examples[a], messages=[*examples[b]["messages"][:-1], examples[a]["messages"][-1]])
    return out


def without_question(examples):
    """Each example with an empty question: the answer alone."""
    return [dict(ex, messages=[{"role": "user", "content": ""}, ex["messages"][-1]]) for ex in examples]


def balanced_slots(keys, k=5, salt=""):
    """{key: slot 0..k-1}, counts within one of each other, in hash order of the keys (not file order)."""
    order = sorted(keys, key=lambda s: stable_hash(salt + s))
    return {key: i % k for i, key in enumerate(order)}
