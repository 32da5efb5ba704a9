"""n examples of a task's split: hash-ordered and balanced, never a prefix of the split's list.

    subset(task, "val", 64)           # 64 val items: directions, letters and depths balanced
    balanced_order(examples, salt)    # the whole list in that order (its first n = the subset)

Splits are stored in orders that carry structure (stoney_mc lists every e2s item first), so
the first n items of a split can be one translation direction, skewed letters or one depth.
Here the examples are grouped into strata by what must be balanced (translation direction,
gold letter of an MC item or yes / no, arith depth), each stratum is ordered by a hash of the
ids, and the next example always comes from the stratum whose direction, letter and depth have been taken
least so far: any prefix of the result has each of them within one item of even (while the
strata last).
"""
import collections

from nanostoney.answers import LETTERS
from nanostoney.tasks.base import stable_hash

YES_NO = ("yes", "no")  # the gold of a yes / no task (stoney_verb), balanced like a letter


def stratum(ex):
    """What an example is balanced on: (direction, depth, gold letter or yes / no), "" / 0 where
    it has none."""
    letter = ex["answer"] if (ex.get("choices") and ex.get("answer") in LETTERS) or ex.get("answer") in YES_NO else ""
    return (ex.get("direction") or "", ex.get("depth") or 0, letter)


def balanced_order(examples, salt=""):
    """All `examples`, each stratum in hash order of the ids, the strata interleaved so that every
    prefix is as balanced as the strata allow on each of direction, depth and letter."""
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
    """n balanced, hash-chosen examples of a task's split (n <= 0 or n >= its size: all of
    them, in the balanced order). An empty split is task.examples' one-sentence UserError."""
    exs = balanced_order(task.examples(split), salt or f"{task.name}/{split}")
    return exs if n <= 0 else exs[:n]

