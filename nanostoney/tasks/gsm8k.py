"""GSM8K word problems: gsm8k (open numeric answer) and gsm8k_mc (five sorted options), same splits.
gsm8k_mc's wrong options are numbers a wrong step gives (an operator slipped and carried through, an
intermediate result, a scale slip); the gold's rank (= letter) is balanced. Val: a hashed ~7% of train.
"""
import functools
import operator
import re

from nanostoney.answers import LETTERS, answer_after, format_number, numbers_equal, parse_number, picked
from nanostoney.errors import UserError
from nanostoney.sources import bundled_path, bundled_rows, hub_label, hub_rows
from nanostoney.tasks.base import MCTask, Task, balanced_slots, mc_example, open_example, short_id, split_by_hash

CALC_RE = re.compile(r"<<([^<>=]*)=([^<>]*)>>")
SAFE_EXPR = re.compile(r"^[\d\s.+\-*/()]+$")
VAL_FRACTION = 0.07


def split_answer(answer_text):
    """(rationale without calculator annotations, final number as text) of a GSM8K answer."""
    body, sep, final = answer_text.rpartition("####")
    if not sep:
        return None, None
    value = parse_number(final)
    return CALC_RE.sub("", body).strip(), (format_number(value) if value is not None else None)


OPERATORS = {"+": operator.add, "-": operator.sub, "*": operator.mul, "/": operator.truediv}
TOKEN_RE = re.compile(r"\s*(?:(\d+(?:\.\d+)?|\.\d+)|(.))")


@functools.lru_cache(maxsize=65536)
def _eval(expr):
    """Value of an arithmetic expression, or None: a recursive-descent parser, safe and faster than eval."""
    if not SAFE_EXPR.match(expr):
        return None
    tokens = [(float(n) if n else op) for n, op in TOKEN_RE.findall(expr) if n or op.strip()]
    pos = 0

    def peek():
        return tokens[pos] if pos < len(tokens) else None

    def atom():
        nonlocal pos
        t = peek()
        pos += 1
        if t == "-":
            return -atom()
        if t == "(":
            v = level()
            if peek() != ")":
                raise ValueError
            pos += 1
            return v
        if isinstance(t, float):
            return t
        raise ValueError

    def level(k=0):  # k = 0: a sum of products, k = 1: a product of atoms; left to right
        nonlocal pos
        v = level(1) if k == 0 else atom()
        while peek() in (("+", "-"), ("*", "/"))[k]:
            op = peek()
            pos += 1
            v = OPERATORS[op](v, level(1) if k == 0 else atom())
        return v

    try:
        v = level()
    except (ValueError, ZeroDivisionError, OverflowError):
        return None
    return v if pos == len(tokens) and abs(v) < 1e15 else None


def calc_steps(answer_text):
    """The calculator annotations <<expr=value>> of a rationale, as (expr, value) pairs."""
    return [(expr.strip(), v) for expr, value in CALC_RE.findall(answer_text)
            if (v := parse_number(value)) is not None and _eval(expr) is not None]


def _rerun(steps, i, new_value):
    """Final value of the chain when step i yields `new_value`, carried into the later steps."""
    wrong = {steps[i][1]: new_value}
    value = new_value
    for expr, old in steps[i + 1:]:
        def swap(m):
            x = float(m.group(0))
            return format_number(wrong[x]) if x in wrong else m.group(0)
        value = _eval(re.sub(r"\d+(?:\.\d+)?", swap, expr))
        if value is None:
            return None
        wrong[old] = value
    return value


def wrong_answers(steps, gold_value):
    """Numbers a wrong reasoning step gives, most plausible first."""
    out = []
    for i in reversed(range(len(steps))):  # slips late in the chain first
        expr = steps[i][0]
        for pos in [m.start() for m in re.finditer(r"(?<=[\d)\s])[+\-*/]", expr)]:
            for op in "+-*/":
                if op != expr[pos]:
                    v = _eval(expr[:pos] + op + expr[pos + 1:])
                    if v is not None:
                        out.append(_rerun(steps, i, v))
    out += [v for _, v in steps]  # stopping early
    out += [gold_value * 10, gold_value / 10, gold_value * 2, gold_value / 2, gold_value * 3]
    return out


def choose_options(gold_value, candidates, rank):
    """The five sorted options, gold `rank`-th smallest, distractors of its kind; None if impossible."""
    whole = abs(gold_value - round(gold_value)) < 1e-9
    seen, below, above = {round(gold_value, 6)}, [], []
    for v in candidates:
        if v is None or abs(v) > 1e9 or (whole and abs(v - round(v)) > 1e-9) or (gold_value >= 0 > v):
            continue
        if gold_value > 0 and (v <= 0 or max(v / gold_value, gold_value / v) > 10):
            continue  # a different order of magnitude is easy to rule out
        if not whole and abs(v * 100 - round(v * 100)) > 1e-9:
            continue
        key = round(v, 6)
        if key in seen:
            continue
        seen.add(key)
        (below if v < gold_value else above).append(v)
    if len(below) < rank or len(above) < 4 - rank:
        return None
    # nearest first: the gold sits in a cluster of look-alikes, not beside far-off numbers
    return sorted(sorted(below, key=lambda v: -v)[:rank] + [gold_value] + sorted(above)[:4 - rank])


def _problems(rows, path):
    out = []
    for k, row in enumerate(rows):
        if "question" not in row or "answer" not in row:
            raise UserError(f"{path}: row {k + 1} lacks 'question' or 'answer'; GSM8K rows need both.")
        body, final = split_answer(row["answer"])
        if final is None:
            raise UserError(f"{path}: row {k + 1} has no '#### <number>' final answer; fix that row.")
        out.append({"question": row["question"].strip(), "rationale": body, "final": final,
                    "steps": calc_steps(row["answer"]), "source_id": "gsm8k:" + short_id(row["question"].strip())})
    return out


@functools.lru_cache(maxsize=None)
def load_problems(source="bundled", data_dir=None):
    """({split: [problem]}, [sources]) shared by gsm8k and gsm8k_mc, read once per process."""
    test_rows, test_path = bundled_rows("gsm8k", "test", data_dir)
    test = _problems(test_rows, test_path)
    held_ids = {p["source_id"] for p in test}
    train_rows, train_path = bundled_rows("gsm8k", "train", data_dir)
    bundled_train = _problems(train_rows, train_path)
    # val: a hashed slice of the bundled train file (kept even when the hub supplies train)
    val = [p for p in bundled_train if split_by_hash(p["source_id"], val=VAL_FRACTION, test=0) == "val"]
    held_ids |= {p["source_id"] for p in val}
    hub = hub_rows("gsm8k", source)
    pool, used = (_problems(*hub), [hub[1], train_path, test_path]) if hub else (bundled_train, [train_path, test_path])
    train = [p for p in pool if p["source_id"] not in held_ids]
    return {"train": _dedupe(train), "val": _dedupe(val), "test": _dedupe(test)}, used


def _dedupe(problems):
    first = {}
    for p in problems:
        first.setdefault(p["source_id"], p)
    return list(first.values())


def sources(source="bundled", data_dir=None):
    """The files (and hub id) behind the GSM8K tasks, known without loading except for "auto"."""
    if source == "auto":
        return list(load_problems(source, data_dir)[1])
    paths = [str(bundled_path("gsm8k", part, data_dir)) for part in ("train", "test")]
    return ([hub_label("gsm8k")] if source == "hub" else []) + paths


class GSM8KTask(Task):
    family = "math"

    def sources(self):
        return sources(self.source, self.data_dir)

    def problems(self):
        return load_problems(self.source, self.data_dir)[0]


class GSM8K(GSM8KTask):
    name, kind = "gsm8k", "numeric"

    def _build(self):
        return {split: [open_example("gsm8k/" + p["source_id"], p["source_id"], p["question"], p["rationale"],
                                     p["final"]) for p in probs] for split, probs in self.problems().items()}

    def evaluate(self, example, completion):
        return numbers_equal(parse_number(answer_after(completion)), float(example["answer"]))


class GSM8KMC(GSM8KTask, MCTask):
    name = "gsm8k_mc"

    def _build(self):
        return {split: self._mc(probs) for split, probs in self.problems().items()}

    def _mc(self, problems):
        """Per problem its least-used feasible gold rank, most constrained first (the rank is the letter)."""
        slots = balanced_slots([p["source_id"] for p in problems], salt="gsm8k_mc")
        feasible = []
        for p in problems:
            g = float(p["final"])
            cands = wrong_answers(p["steps"], g)
            by_rank = {r: o for r in range(5) if (o := choose_options(g, cands, r))}
            if by_rank:  # else too few wrong numbers of the right kind (a handful of problems)
                feasible.append((p, by_rank))
        counts, chosen = [0] * 5, {}
        for p, by_rank in sorted(feasible, key=lambda x: (len(x[1]), slots[x[0]["source_id"]])):
            r = min(by_rank, key=lambda r: (counts[r], (r - slots[p["source_id"]]) % 5))
            counts[r] += 1
            chosen[p["source_id"]] = r
        out = []
        for p, by_rank in feasible:
            r = chosen[p["source_id"]]
            reasoning = f"{p['rationale']}\nThe answer is {picked(p['final'], LETTERS[r])}."
            out.append(mc_example("gsm8k_mc/" + p["source_id"], p["source_id"], p["question"],
                                  [format_number(v) for v in by_rank[r]], LETTERS[r], reasoning))
        return out
