"""Stoney Nakoda tasks over the bundled conversations (stoney_corpus.py): stoney_qa (the conversations,
reward = chrF / 100), stoney_lexicon (term <-> gloss pairs asked both ways, exact match after
normalize) and stoney_mc (five options of the same kind, the gold's length rank balanced).
"""
import bisect
import collections
import random
import re

from nanostoney.answers import LETTERS, answer_part, format_answer, picked
from nanostoney.metrics import sentence_chrf
from nanostoney.sources import bundled_path, hub_label
from nanostoney.tasks.base import (MCTask, Task, balanced_slots, mc_example, normalize, open_example, short_id,
                                   stable_hash, user_regions)
from nanostoney.tasks.stoney_corpus import CONTROL, EXTRACTION, coarse_kind, load_corpus

def sources(source="bundled", data_dir=None):
    """The file (and hub id) behind the Stoney tasks, known without loading except for "auto"."""
    if source == "auto":
        return list(load_corpus(source, data_dir)["sources"])
    path = str(bundled_path("stoney", "all", data_dir))
    return [hub_label("stoney"), path] if source == "hub" else [path]


class StoneyTask(Task):
    family = "stoney"

    def sources(self):
        return sources(self.source, self.data_dir)

    def corpus(self):
        return load_corpus(self.source, self.data_dir)

    def parts(self, what):
        """{split: [conv or pair]} of this task ("convs" or "lexicon")."""
        d = self.corpus()[what]
        if self.control:
            return {"train": [], **{s: d[part] for s, part in CONTROL.items()}}
        return {s: d[s] for s in EXTRACTION}


class StoneyQA(StoneyTask):
    name, kind = "stoney_qa", "open"
    CHRF_PASS = 50.0  # a loose bar: the reference is one of many good answers

    def _build(self):
        return {s: [self._example(c) for c in convs] for s, convs in self.parts("convs").items()}

    def _example(self, c):
        system = c.get("system")
        user, regions = user_regions(system, c["user"], {"question": (0, len(c["user"]))})
        msgs = ([{"role": "system", "content": system}] if system else []) + [
            {"role": "user", "content": c["user"]}, {"role": "assistant", "content": c["assistant"]}]
        return {"id": f"{self.name}/" + c["source_id"], "source_id": c["source_id"], "messages": msgs,
                "answer": c["assistant"], "regions": regions}

    def reward(self, example, completion):
        return sentence_chrf(answer_part(completion), example["answer"]) / 100.0

    def evaluate(self, example, completion):
        return sentence_chrf(answer_part(completion), example["answer"]) >= self.CHRF_PASS


def english_key(text):
    """Normalised English gloss without a leading "to"/article ("to be thirsty" == "be thirsty")."""
    return re.sub(r"^(?:to|a|an|the)\s+", "", normalize(text))


# (question, gold reasoning): the question is unlike every pretraining sentence, and the answer never
# restates the question's side, so the answer alone says nothing.
Q_S2E = "Translate `{term}` from Stoney Nakoda into English."
Q_E2S = "Translate '{gloss}' from English into Stoney Nakoda."
LEXICON_TEXTS = {("open", "s2e"): (Q_S2E, "Looking up `{term}`."),
                 ("open", "e2s"): (Q_E2S, "Looking up '{gloss}'."),
                 ("mc", "s2e"): (Q_S2E, "It means {picked}."),
                 ("mc", "e2s"): (Q_E2S, "It is {picked}.")}


def lexicon_texts(kind, item, letter=None, choice=None):
    """(question, gold reasoning) of an item; choice: an option asserted in the answer's place."""
    question, reasoning = LEXICON_TEXTS[(kind, item["dir"])]
    words = {"term": item["pair"]["term"], "gloss": item["pair"]["gloss"]}
    if choice is not None:
        words["gloss" if item["dir"] == "s2e" else "term"] = choice
    words["picked"] = picked(words["gloss" if item["dir"] == "s2e" else "term"], letter)
    return question.format(**words), reasoning.format(**words)


def _lexicon_items(pairs):
    """Questions both ways: one per term (s2e), one per gloss (e2s, any term with that gloss accepted)."""
    items, by_gloss = [], collections.defaultdict(list)
    for p in pairs:
        by_gloss[p["gloss_key"]].append(p)
        items.append({"dir": "s2e", "key": p["term_key"], "pair": p, "prompt_text": p["term"], "answer": p["gloss"],
                      "aliases": sorted(p["gloss_keys"]), "sources": p["sources"]})
    for g, ps in sorted(by_gloss.items()):
        p = min(ps, key=lambda p: (-len(p["evidence"]), p["term_key"]))
        items.append({"dir": "e2s", "key": g, "pair": p, "prompt_text": p["gloss"], "answer": p["term"],
                      "aliases": sorted({q["term_key"] for q in pairs if g in q["gloss_keys"]}),
                      "sources": sorted({s for q in ps for s in q["sources"]})})
    return items


class StoneyLexicon(StoneyTask):
    name, kind = "stoney_lexicon", "open"

    def _build(self):
        return {s: [self._example(it) for it in _lexicon_items(pairs)] for s, pairs in self.parts("lexicon").items()}

    def _example(self, it):
        return open_example(f"{self.name}/{it['dir']}/{short_id(it['key'])}", it["sources"][0],
                            *lexicon_texts(self.kind, it), it["answer"], source_ids=it["sources"],
                            direction=it["dir"], aliases=it["aliases"])

    def evaluate(self, example, completion):
        got = answer_part(completion)
        if example.get("direction") == "s2e":
            return english_key(got) in {english_key(a) for a in example["aliases"] + [example["answer"]]}
        return normalize(got) in set(example["aliases"]) | {normalize(example["answer"])}


STOPWORDS = {"to", "be", "a", "an", "the", "of", "something", "someone", "one", "it", "is", "in", "on", "for", "with",
             "and", "or", "at", "by", "up", "out", "oneself", "someone's", "one's", "from", "into", "not"}


def _content_words(text):
    return {w for w in normalize(text).split() if w not in STOPWORDS}


class _Pool:
    """Candidate options (text, info) sorted by length: distractors are found walking out from the gold."""

    def __init__(self, entries):
        self.items = sorted(((len(t), stable_hash(t), t, info) for t, info in entries), key=lambda x: x[:2])
        self.keys = [x[:2] for x in self.items]

    def pick(self, gold_text, rank, ok, distinct_endings=False):
        """Four texts passing ok, the gold `rank`-th shortest of five; distinct_endings: no shared ending."""
        g = (len(gold_text), stable_hash(gold_text))
        i = bisect.bisect_left(self.keys, g)
        shorter, longer, seen = [], [], {normalize(gold_text)}
        endings = {normalize(gold_text)[-2:]}

        def take(t, info, out):
            n = normalize(t)
            if n in seen or (distinct_endings and n[-2:] in endings) or not ok(info):
                return
            seen.add(n)
            endings.add(n[-2:])
            out.append(t)
        for j in range(i - 1, -1, -1):
            if len(shorter) == rank:
                break
            take(self.items[j][2], self.items[j][3], shorter)
        for j in range(i, len(self.items)):
            if len(longer) == 4 - rank:
                break
            if self.keys[j] > g:
                take(self.items[j][2], self.items[j][3], longer)
        if len(shorter) < rank or len(longer) < 4 - rank:
            return None
        return shorter + longer


class StoneyMC(StoneyTask, MCTask):
    name, kind = "stoney_mc", "mc"

    def _build(self):
        return {s: self._mc(pairs) for s, pairs in self.parts("lexicon").items()}

    def _mc(self, pairs):
        items = _lexicon_items(pairs)
        info = {p["term_key"]: {"pair": p, "words": _content_words(p["gloss"]),
                                "gloss_keys": set(p["gloss_keys"]) | {english_key(g) for g in p["gloss_keys"]}}
                for p in pairs}
        pools = {}
        groups = collections.defaultdict(list)
        for p in pairs:
            groups[p["kind"]].append(p)
            if coarse_kind(p["kind"]) != p["kind"]:
                groups[coarse_kind(p["kind"])].append(p)
        for kind, same in groups.items():
            pools[("s2e", kind)] = _Pool((p["gloss"], info[p["term_key"]]) for p in same)
            pools[("e2s", kind)] = _Pool((p["term"], info[p["term_key"]]) for p in same)
            for end in {normalize(p["term"])[-2:] for p in same}:
                pools[("e2s", kind, end)] = _Pool((p["term"], info[p["term_key"]]) for p in same
                                                  if normalize(p["term"])[-2:] == end)
        ids = [f"{it['dir']}/{it['key']}" for it in items]
        letter_slot = balanced_slots(ids, salt="stoney_mc/letter")
        length_slot = balanced_slots(ids, salt="stoney_mc/length")
        counts = {"letter": [0] * 5, "length": [0] * 5}
        out = []
        for it, iid in sorted(zip(items, ids), key=lambda x: letter_slot[x[1]]):
            ranks = sorted(range(5), key=lambda r: (counts["length"][r], (r - length_slot[iid]) % 5))
            rank, distractors = next(((r, d) for r in ranks if (d := self._distractors(it, info, pools, r))),
                                     (None, None))
            if not distractors:
                continue  # too few same-kind options in this split (rare)
            counts["length"][rank] += 1
            letter = min(range(5), key=lambda r: (counts["letter"][r], (r - letter_slot[iid]) % 5))
            counts["letter"][letter] += 1
            random.Random(stable_hash(iid)).shuffle(distractors)
            choices = distractors[:letter] + [it["answer"]] + distractors[letter:]
            L = LETTERS[letter]
            question, reasoning = lexicon_texts(self.kind, it, L)
            # every option with the sentence that asserts it (the reward model's negatives)
            options = {X: format_answer(lexicon_texts(self.kind, it, X, choice=c)[1], X)
                       for X, c in zip(LETTERS, choices)}
            out.append(mc_example(f"{self.name}/{it['dir']}/{short_id(it['key'])}", it["sources"][0], question,
                                  choices, L, reasoning, source_ids=it["sources"], direction=it["dir"],
                                  option_rationales=options))
        return sorted(out, key=lambda ex: ex["id"])

    def _distractors(self, it, info, pools, rank):
        """Same-kind glosses (s2e) or terms (e2s), never one that could also be right."""
        me = info[it["pair"]["term_key"]]
        aliases = set(it["aliases"])
        words = set().union(*(info[a]["words"] for a in aliases if a in info), me["words"])

        def ok(q):
            return (q["pair"]["term_key"] not in aliases and not q["gloss_keys"] & me["gloss_keys"]
                    and not q["words"] & words)
        p = it["pair"]
        for kind in (p["kind"], coarse_kind(p["kind"])):  # the exact kind, else verb / not verb
            if it["dir"] == "s2e":
                got = pools[("s2e", kind)].pick(p["gloss"], rank, ok)
            else:
                # terms with the gold's ending; else five different endings; else any
                same_end = pools.get(("e2s", kind, normalize(p["term"])[-2:]))
                got = ((same_end and same_end.pick(p["term"], rank, ok))
                       or pools[("e2s", kind)].pick(p["term"], rank, ok, distinct_endings=True)
                       or pools[("e2s", kind)].pick(p["term"], rank, ok))
            if got:
                return got
        return None


# the controls: the same tasks over the control terms, which no training text holds

class StoneyQAUnseen(StoneyQA):
    name, control = "stoney_qa_unseen", True


class StoneyLexiconUnseen(StoneyLexicon):
    name, control = "stoney_lexicon_unseen", True


class StoneyMCUnseen(StoneyMC):
    name, control = "stoney_mc_unseen", True
