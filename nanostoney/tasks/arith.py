"""Arithmetic word problems a small model can learn: generated, multi-step, exactly verified.

- arith:    open numeric answer, compared as a number.
- arith_mc: five sorted numeric options, each wrong one the question misread, then solved right,
  with its own rationale (every chain line a true equation); the gold's rank (letter) is balanced.

    Mia has 7 shells. Mia finds 5 more shells. Then Mia gives away half of the shells.
    How many shells does Mia have now?
    <think>Mia finds 5 more shells: 7 + 5 = 12
    Mia gives away half of the shells: 12 / 2 = 6</think>
    Answer: 6

A chain line re-reads its step first, so the operand is copied, not looked up (docs/science_log.md,
"Issue 25"). A hash of (template, numbers) picks the split and the wording; the gate checks GATE_NAME.
"""
import functools
import random
import re

from nanostoney.answers import (LETTERS, answer_after, format_answer, format_number, numbers_equal, parse_number,
                                picked)
from nanostoney.tasks.base import (MCTask, Task, balanced_slots, mc_example, open_example, short_id, split_by_hash,
                                   stable_hash)

GATE_NAME = "generated://nanostoney/arith"
DEPTHS = (1, 2, 3, 4)
MAX_VALUE = 99
# problems per depth and split; depth 1 has fewer distinct combinations than its quotas ask
QUOTA = {"train": 750, "val": 100, "test": 100}
SEED = 1234

NAMES = ("Mia", "Leo", "Ava", "Sam", "Noah", "Zoe", "Ella", "Max", "Lily", "Omar", "Nina", "Ravi",
         "Ada", "Ben", "Cara", "Dev", "Iris", "Jon", "Kai", "Rosa")
OBJECTS = ("apples", "shells", "stamps", "marbles", "books", "coins", "pencils", "cards", "stones", "beads",
           "eggs", "buttons", "feathers", "shirts", "cups", "kites", "plums", "nails", "ribbons", "seeds")
START = "{name} has {n} {obj}."
QUESTION = "How many {obj} does {name} have now?"
# step templates: (operation, fixed operand or None, sentence)
STEPS = (
    ("+", None, "{name} buys {n} more {obj}."),
    ("+", None, "{name} finds {n} more {obj}."),
    ("+", None, "A friend gives {name} {n} more {obj}."),
    ("-", None, "{name} gives away {n} {obj}."),
    ("-", None, "{name} loses {n} {obj}."),
    ("-", None, "{name} sells {n} {obj}."),
    ("*", 2, "{name} doubles the {obj}."),
    ("*", 3, "{name} triples the {obj}."),
    ("*", None, "{name} ends up with {n} times as many {obj}."),
    ("/", 2, "{name} gives away half of the {obj}."),
    ("/", None, "{name} splits the {obj} into {n} equal piles and keeps one pile."),
)
OPERANDS = {"+": range(1, 11), "-": range(1, 11), "*": range(2, 4), "/": range(2, 4)}


def apply(op, a, n):
    """a op n, or None when the result is not a whole number in 1..MAX_VALUE."""
    if op == "/":
        v = a // n if a % n == 0 else None
    else:
        v = {"+": a + n, "-": a - n, "*": a * n}[op]
    return v if v is not None and 1 <= v <= MAX_VALUE else None


def run(start, steps):
    """[values after each step] of a chain of (op, operand), or None if a value leaves 1..99."""
    values, v = [], start
    for op, n in steps:
        v = apply(op, v, n)
        if v is None:
            return None
        values.append(v)
    return values


def rationale(start, steps, values, phrases):
    """One line per step: its sentence, then its equation ("Mia sells 3 stamps: 12 - 3 = 9")."""
    return "\n".join(f"{ph}: {a} {op} {n} = {v}"
                     for ph, a, (op, n), v in zip(phrases, [start] + values[:-1], steps, values))


def sample_problem(rng, depth):
    """(template, start, operands) drawn from rng, or None when a value would leave 1..99."""
    template = tuple(rng.randrange(len(STEPS)) for _ in range(depth))
    start = rng.randint(2, 20)
    operands = tuple(STEPS[t][1] or rng.choice(OPERANDS[STEPS[t][0]]) for t in template)
    steps = [(STEPS[t][0], n) for t, n in zip(template, operands)]
    return None if run(start, steps) is None else (template, start, operands)


def make_problem(template, start, operands):
    key = f"{'.'.join(map(str, template))}|{start},{','.join(map(str, operands))}"
    h = stable_hash("arith/words/" + key)
    name, obj = NAMES[h % len(NAMES)], OBJECTS[(h // len(NAMES)) % len(OBJECTS)]
    steps = [(STEPS[t][0], n) for t, n in zip(template, operands)]
    values = run(start, steps)
    opening = START.format(name=name, n=start, obj=obj)
    # each step's sentence without its full stop: what a chain line re-reads
    phrases = [STEPS[t][2].format(name=name, n=n, obj=obj).rstrip(".") for t, n in zip(template, operands)]
    text = " ".join([opening] + [f"{s}." for s in phrases] + [QUESTION.format(name=name, obj=obj)])
    return {"key": key, "source_id": "arith:" + short_id(key), "question": text, "depth": len(template),
            "opening": opening, "start": start, "steps": steps, "values": values, "final": values[-1],
            "phrases": phrases, "rationale": rationale(start, steps, values, phrases),
            "template": tuple(template), "name": name, "obj": obj}


def generate(quota=None, seed=SEED):
    """{split: [problem]}: per depth, seeded draws filed under their hash split until quotas fill."""
    quota = quota or QUOTA
    out = {s: [] for s in quota}
    for depth in DEPTHS:
        rng = random.Random(f"{seed}/{depth}")
        seen, have, misses = set(), {s: 0 for s in quota}, 0
        while any(have[s] < quota[s] for s in quota) and misses < 20_000:
            drawn = sample_problem(rng, depth)
            if drawn is None or drawn in seen:
                misses += 1
                continue
            seen.add(drawn)
            misses = 0
            p = make_problem(*drawn)
            split = split_by_hash(p["key"])
            if have[split] < quota[split]:
                have[split] += 1
                out[split].append(p)
    return out


@functools.lru_cache(maxsize=None)
def load_problems():
    return generate()


# -----------------------------------------------------------------------------
# wrong answers: chains whose every line is true, wrong only by how the question was read

def misreadings(p):
    """{kind: [(start, steps)]}: the question misread (a number, an operation, a step), solved right."""
    start, steps = p["start"], p["steps"]
    numbers = {int(x) for x in re.findall(r"\d+", p["question"])}
    out = {"operand": [], "start": [], "operation": [], "skipped": [], "repeated": [], "stopped": []}
    for i, (op, n) in enumerate(steps):
        near = {2, 3} if op in "*/" else numbers | {n - 2, n - 1, n + 1, n + 2}
        out["operand"] += [(start, steps[:i] + [(op, m)] + steps[i + 1:]) for m in sorted(near) if m != n and m > 0]
        for wrong in SWAPS[op]:
            out["operation"].append((start, steps[:i] + [(wrong, n)] + steps[i + 1:]))
            out["operation"].append((start, [(wrong if o == op else o, m) for o, m in steps]))
        out["skipped"].append((start, steps[:i] + steps[i + 1:]))
        out["repeated"].append((start, steps[:i + 1] + steps[i:]))
    out["start"] = [(s, steps) for s in sorted(numbers | {start - 2, start - 1, start + 1, start + 2})
                    if s != start and s > 0]
    out["stopped"] = [(start, steps[:k]) for k in range(1, len(steps))]
    return out


SWAPS = {"+": "-*", "-": "+/", "*": "+/", "/": "-*"}


def wrong_chains(p):
    """[(value, rationale)] of the distinct misreadings whose chain stays in 1..99 and misses the gold."""
    out, seen = [], set()
    for readings in misreadings(p).values():
        for start, steps in readings:
            values = run(start, steps) if steps else None
            key = (start, tuple(steps))
            if not values or values[-1] == p["final"] or key in seen:
                continue
            seen.add(key)
            # each line re-reads its step as the misreading tells it: only the question shows the slip
            phrases = [told(p, i, op, n) for i, (op, n) in enumerate(steps)]
            out.append((values[-1], rationale(start, steps, values, phrases)))
    return out


def told(p, i, op, n):
    """Step (op, n) in words: by the question's template at i if it can, else the first that can."""
    for t in (*p["template"][i:i + 1], *p["template"], *range(len(STEPS))):
        sop, fixed, text = STEPS[t]
        if sop == op and fixed in (None, n):
            return text.format(name=p["name"], n=n, obj=p["obj"]).rstrip(".")
    raise ValueError(f"no sentence tells the step {op} {n}")


def candidates(p):
    """{wrong value: rationale}: per value the first misreading as long as the gold, else the first."""
    out = {}
    for v, why in wrong_chains(p):
        if v not in out or (_lines(out[v]) != p["depth"] and _lines(why) == p["depth"]):
            out[v] = why
    return out


def _lines(why):
    return why.count("\n") + 1


def choose_options(p, rank):
    """The five sorted (value, why), gold `rank`-th, same-length chains first, then a hash order."""
    g, cands = p["final"], candidates(p)
    order = sorted(cands, key=lambda v: (_lines(cands[v]) != p["depth"], stable_hash(f"{p['key']}/{v}")))
    low = [v for v in order if v < g][:rank]
    high = [v for v in order if v > g][:4 - rank]
    if len(low) < rank or len(high) < 4 - rank:
        return None
    return sorted([(v, cands[v]) for v in low + high] + [(g, p["rationale"])])


# -----------------------------------------------------------------------------
# the tasks

def answer_text(value, reasoning, letter=None):
    """The assistant text for a chain: its lines, then the answer (and the option for MC)."""
    if letter is None:
        return format_answer(reasoning, format_number(value))
    return format_answer(mc_reasoning(value, reasoning, letter), letter)


def mc_reasoning(value, reasoning, letter):
    return f"{reasoning}\nThe answer is {picked(format_number(value), letter)}."


class ArithTask(Task):
    family = "math"

    def sources(self):
        return [GATE_NAME]


class Arith(ArithTask):
    name, kind = "arith", "numeric"

    def _build(self):
        return {s: [self._example(p) for p in probs] for s, probs in load_problems().items()}

    def _example(self, p):
        return open_example("arith/" + p["source_id"], p["source_id"], p["question"], p["rationale"],
                            format_number(p["final"]), depth=p["depth"],
                            wrong_answers=[answer_text(v, why) for v, why in _distinct_wrong(p)])

    def evaluate(self, example, completion):
        return numbers_equal(parse_number(answer_after(completion)), float(example["answer"]))


def _distinct_wrong(p):
    """Wrong chains with distinct final values (the first rationale of each), nearest first."""
    out = {}
    for v, why in wrong_chains(p):
        if v != p["final"] and v not in out:
            out[v] = why
    return sorted(out.items(), key=lambda x: (abs(x[0] - p["final"]), x[0]))


class ArithMC(ArithTask, MCTask):
    name = "arith_mc"

    def _build(self):
        return {s: self._mc(probs) for s, probs in load_problems().items()}

    def _mc(self, problems):
        """As gsm8k_mc, per depth (so every depth is letter-balanced)."""
        out, total = [], [0] * 5  # total: over all depths, the tie-breaker that balances the whole split
        for depth in DEPTHS:
            probs = [p for p in problems if p["depth"] == depth]
            slots = balanced_slots([p["source_id"] for p in probs], salt="arith_mc")
            feasible = [(p, {r: o for r in range(5) if (o := choose_options(p, r))}) for p in probs]
            feasible = [(p, by) for p, by in feasible if by]
            counts, chosen = [0] * 5, {}
            for p, by in sorted(feasible, key=lambda x: (len(x[1]), slots[x[0]["source_id"]])):
                r = min(by, key=lambda r: (counts[r], total[r], (r - slots[p["source_id"]]) % 5))
                counts[r] += 1
                total[r] += 1
                chosen[p["source_id"]] = r
            for p, by in feasible:
                options, letter = by[chosen[p["source_id"]]], LETTERS[chosen[p["source_id"]]]
                out.append(mc_example(
                    "arith_mc/" + p["source_id"], p["source_id"], p["question"],
                    [format_number(v) for v, _ in options], letter, mc_reasoning(p["final"], p["rationale"], letter),
                    depth=p["depth"],
                    option_rationales={L: answer_text(v, why, L) for L, (v, why) in zip(LETTERS, options)}))
        return out
