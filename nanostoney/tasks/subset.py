"""n examples of a task's split, hash-ordered and balanced (a split's own order carries structure):
strata (direction, depth, gold letter or yes / no) are each in hash order, and the next example comes
from the stratum whose values were taken least, so every prefix is within one item of even on each.
"""
import collections

from nanostoney.answers import LETTERS
from nanostoney.tasks.base import stable_hash

YES_NO = ("yes", "no")  # the gold of a yes / no task (stoney_verb), balanced like a letter


def stratum(ex):
    """(direction, depth, gold letter or yes / no), "" / 0 where the example has none."""
    letter = ex["answer"] if (ex.get("choices") and ex.get("answer") in LETTERS) or ex.get("answer") in YES_NO else ""
    return (ex.get("direction") or "", ex.get("depth") or 0, letter)


def balanced_order(examples, salt=""):
    """All `examples`, the strata interleaved so that every prefix is as balanced as they allow."""
    queues = collections.defaultdict(list)
    for ex in examples:
        queues[stratum(ex)].append(ex)
    for rows in queues.values():
        rows.sort(key=lambda ex: stable_hash(f"{salt}/{ex['id']}"), reverse=True)  # pop() takes the first
    taken = collections.Counter()  # (dimension, value) -> examples taken
    out = []
    while queues:
        key = min(queues, key=lambda k: (sum(taken[d, v] for d, v in enumerate(k)), k))
        out.append(queues[key].pop())
        taken.update(enumerate(key))
        if not queues[key]:
            del queues[key]
    return out


def subset(task, split, n=0, salt=""):
    """n balanced, hash-chosen examples of a task's split (n <= 0: all of them, in that order)."""
    exs = balanced_order(task.examples(split), salt or f"{task.name}/{split}")
    return exs if n <= 0 else exs[:n]

