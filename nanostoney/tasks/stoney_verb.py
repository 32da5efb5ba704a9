"""stoney_verb: "Is `term` a verb in Stoney Nakoda? Answer yes or no." Two steps (recall the gloss, read
it: "to ..." is a verb), so Stoney hop counts can match arith's depth 2. Stoney verbs mostly end in
-ch, so items are balanced within every term ending: "answer by the ending" scores 50%.
"""
import collections

from nanostoney.answers import answer_part
from nanostoney.tasks.base import normalize, open_example, short_id, stable_hash
from nanostoney.tasks.stoney import StoneyTask

QUESTION = "Is `{term}` a verb in Stoney Nakoda? Answer yes or no."
REASONING = {True: "Looking up `{term}`: '{gloss}', so a verb.", False: "Looking up `{term}`: '{gloss}', so not a verb."}
ENDING = 2  # letters of the term's ending the items are balanced on


def is_verb(pair):
    return pair["kind"] == "verb"


def balanced_pairs(pairs):
    """Per term ending, the same number of verbs and non-verbs (the first of each in hash order)."""
    by_end = collections.defaultdict(lambda: {True: [], False: []})
    for p in pairs:
        by_end[normalize(p["term"])[-ENDING:]][is_verb(p)].append(p)
    out = []
    for sides in by_end.values():
        n = min(len(sides[True]), len(sides[False]))
        for side in (True, False):
            out += sorted(sides[side], key=lambda p: stable_hash("stoney_verb/" + p["term_key"]))[:n]
    return sorted(out, key=lambda p: p["term_key"])


class StoneyVerb(StoneyTask):
    name, kind = "stoney_verb", "open"

    def _build(self):
        return {s: [self._example(p) for p in balanced_pairs(pairs)] for s, pairs in self.parts("lexicon").items()}

    def _example(self, p):
        return open_example(f"{self.name}/{short_id(p['term_key'])}", p["sources"][0], QUESTION.format(term=p["term"]),
                            REASONING[is_verb(p)].format(term=p["term"], gloss=p["gloss"]),
                            "yes" if is_verb(p) else "no", source_ids=p["sources"], depth=2)

    def evaluate(self, example, completion):
        return normalize(answer_part(completion)) == example["answer"]


class StoneyVerbUnseen(StoneyVerb):
    name, control = "stoney_verb_unseen", True
