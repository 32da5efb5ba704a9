"""Minimal pairs on the model's own reasoning, for activation patching (patching.py). Each pair holds
the model's own assistant text fixed and changes one thing in the question, so that the rendered
prompts have the same length and differ in at most MAX_CHANGED tokens:
- math, the operand slots: a number the chain copies from the question (an operand of an
  "a op b = c" line that the question states and no earlier line computed) is replaced; read
  where the chain writes it, target and foil the two numbers' tokens.
- Stoney, the answer slot: the question of another item of the same task and direction that
  differs only in its term; read at the answer after the model's own rationale (contexts.py).
  Multiple-choice prompts differ in their options as well, so they make no pairs.
"""
import re

from nanostoney.answers import answer_after
from nanostoney.interp.contexts import answer_start
from nanostoney.interp.patching import Pair
from nanostoney.tasks.base import stable_hash

MAX_CHANGED = 4  # tokens a corrupted prompt may differ in: one operand or one term, not a new question
EQUATION = re.compile(r"(\d+(?:\.\d+)?)\s*([-+*/×÷x])\s*(\d+(?:\.\d+)?)\s*=\s*(\d+(?:\.\d+)?)")


def whole_number(n):
    return re.compile(r"(?<![\d.])" + re.escape(n) + r"(?!\d|\.\d)")


def copied_operands(question, chain):
    """[(char in chain, number)]: the operands of the chain's "a op b = c" lines that the question
    states (as a whole number) and that no earlier line computed."""
    out, computed = [], set()
    for m in EQUATION.finditer(chain):
        for g in (1, 3):
            n = m.group(g)
            if n not in computed and whole_number(n).search(question):
                out.append((m.start(g), n))
        computed.add(m.group(4))
    return out


def slot_tokens(tokenizer, text, char, clean, other):
    """(context ids, target, foil) where `text` continues at `char` with `clean` or with `other`:
    the context is every token of text[:char] + clean that ends before `char`; None when the two
    continuations tokenize the context differently or start with the same token."""
    a, b = tokenizer.encode(text[:char] + clean), tokenizer.encode(text[:char] + other)
    # the longest run of tokens that decodes to a prefix of text[:char] (a character split over
    # byte tokens decodes to a prefix only once all of its bytes are in)
    k = max(j for j in range(len(a) + 1) if text[:char].startswith(tokenizer.decode(a[:j])))
    if k >= len(a) or k >= len(b) or a[:k] != b[:k] or a[k] == b[k]:
        return None
    return a[:k], a[k], b[k]


def changed(x, y):
    """Positions where two equally long token lists differ, or None when their lengths differ."""
    return None if len(x) != len(y) else [i for i, (p, q) in enumerate(zip(x, y)) if p != q]


def make_pair(tokenizer, key, family, prompts, text, char, answers, slot, own_correct, max_len):
    """A Pair of two prompts (clean, corrupt) read after the same assistant `text`, the slot at
    `char` where the clean answer answers[0] or the corrupted answers[1] would be written."""
    clean_p, corrupt_p = (tokenizer.render_prompt(p) for p in prompts)
    diff = changed(clean_p, corrupt_p)
    at = slot_tokens(tokenizer, text, char, *answers)
    if not diff or len(diff) > MAX_CHANGED or at is None or len(clean_p) + len(at[0]) + 1 > max_len:
        return None
    head, target, foil = at
    return Pair(key=key, family=family, clean=clean_p + head, corrupt=corrupt_p + head, pos=diff[0],
                target=target, foil=foil, slot=slot, own_correct=own_correct)


def other_numbers(n, key):
    """Numbers with as many digits as n, near it first, in an order salted by `key`."""
    v = int(float(n))
    near = [v + d for d in range(-9, 10) if d and v + d > 0 and len(str(v + d)) == len(str(v))]
    return [str(x) for x in sorted(near, key=lambda x: (abs(x - v) > 3, stable_hash(f"{key}/{x}")))]


def operand_pairs(tokenizer, task, example, completion, own_correct, max_len):
    """The math pairs of one item: one per operand its chain copies from the question."""
    prompt, out = task.prompt(example), []
    question = prompt[-1]["content"]
    for char, n in copied_operands(question, completion):
        for new in other_numbers(n, example["id"]):
            corrupt = prompt[:-1] + [{**prompt[-1], "content": whole_number(n).sub(new, question, count=1)}]
            pair = make_pair(tokenizer, f"{task.name}/{example['id']}@{char}", task.family, (prompt, corrupt),
                             completion, char, (n, new), "operand", own_correct, max_len)
            if pair is not None:
                out.append(pair)
                break
    return out


def term_pairs(tokenizer, task, rows, max_len, donors=None):
    """The Stoney pairs: rows [(example, context text, own_correct)] of one task; each item is paired
    with the first donor (default: the rows' examples), in hash order, of its direction whose prompt
    makes a pair with its own, read at the answer slot after its own context."""
    by_len = {}
    for d in donors if donors is not None else [ex for ex, _, _ in rows]:
        by_len.setdefault((d.get("direction"), len(tokenizer.render_prompt(task.prompt(d)))), []).append(d)
    out = []
    for ex, context, own_correct in rows:
        same = by_len.get((ex.get("direction"), len(tokenizer.render_prompt(task.prompt(ex)))), [])
        gold = answer_after(ex["messages"][-1]["content"])
        for d in sorted((d for d in same if d["id"] != ex["id"]), key=lambda d: stable_hash(f"{ex['id']}/{d['id']}")):
            pair = make_pair(tokenizer, f"{task.name}/{ex['id']}", task.family, (task.prompt(ex), task.prompt(d)),
                             context, answer_start(context), (gold, answer_after(d["messages"][-1]["content"])),
                             "answer", own_correct, max_len)
            if pair is not None:
                pair.direction = ex.get("direction")
                out.append(pair)
                break
    return out


def build_pairs(tokenizer, examples, chosen, completions, contexts, verdicts, max_len):
    """Every minimal pair of the held-out items: math operand pairs on the model's own completion,
    Stoney answer pairs after each item's context. completions, contexts, verdicts: {(task, id):
    the model's completion, the context text of its answer slot, whether it is right}."""
    out = []
    for name, split_rows in chosen.items():
        task = examples[name][0]
        held = [ex for split, ex in split_rows if split != "train"]
        if task.family == "math":
            for ex in held:
                k = (name, ex["id"])
                out += operand_pairs(tokenizer, task, ex, completions[k], verdicts[k], max_len)
        else:
            rows = [(ex, contexts[(name, ex["id"])], verdicts[(name, ex["id"])]) for ex in held
                    if (name, ex["id"]) in contexts]
            donors = [d for split, exs in examples[name][1].items() if split != "train" for d in exs]
            out += term_pairs(tokenizer, task, rows, max_len, donors)
    return out
