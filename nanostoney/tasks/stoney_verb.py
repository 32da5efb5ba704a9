"""stoney_verb: a two-step Stoney question, so that Stoney hop counts can match arith's depth 2.

    user:      Is `îbuṯẖach` a verb in Stoney Nakoda? Answer yes or no.
    assistant: <think>Looking up `îbuṯẖach`: 'to be thirsty', so a verb.</think>
               Answer: yes

Step one recalls the term's gloss (read in pretraining, never asked about for a held-out term);
step two reads it: a "to ..." gloss is a verb (the approved data has no part-of-speech labels, so
the label is stoney_corpus.gloss_kind's). Stoney verbs mostly end in -ch (77% of verbs, 22% of the
rest), so items are balanced within every term ending: as many verbs as non-verbs, and "answer by
the ending" or "always yes" scores 50%. Splits and the *_unseen control follow the lexicon.
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
