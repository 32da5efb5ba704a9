"""stoney_verb: "Is `term` a verb in Stoney Nakoda? Answer yes or no." A two-step question (recall
the gloss, then read it: a "to ..." gloss is a verb), so Stoney hop counts can match arith's depth 2.

Stoney verbs mostly end in -ch, so items are balanced within every term ending (as many verbs as
non-verbs): "answer by the ending" and "always yes" score 50%. Splits follow the lexicon.
"""
import collections

from nanostoney.answers import answer_part, format_answer
from nanostoney.tasks.base import normalize, short_id, stable_hash
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
        question = QUESTION.format(term=p["term"])
        answer = "yes" if is_verb(p) else "no"
        reasoning = REASONING[is_verb(p)].format(term=p["term"], gloss=p["gloss"])
        return {"id": f"{self.name}/{short_id(p['term_key'])}", "source_id": p["sources"][0],
                "source_ids": p["sources"], "depth": 2,
                "messages": [{"role": "user", "content": question},
                             {"role": "assistant", "content": format_answer(reasoning, answer)}],
                "answer": answer, "regions": {"question": (0, len(question))}}

    def evaluate(self, example, completion):
        return normalize(answer_part(completion)) == example["answer"]


class StoneyVerbUnseen(StoneyVerb):
    name, control = "stoney_verb_unseen", True
