"""The Stoney Nakoda corpus behind the Stoney tasks: the bundled conversations, the lexicon pulled
out of them, and their split into parts (GROUP_PARTS), after knowledge extraction (Physics of
Language Models, Part 3.1): conversation groups (union-find over shared terms and glosses) go to one
part each. EXTRACTION parts are pretraining text, but SFT and RL ask only about train; CONTROL parts
are in no training text (chance). A pair is kept only when the text states it in one of a few shapes
(`term` (gloss), "term" means 'gloss', ...); which side is Stoney is judged from the corpus (Lang).
"""
import collections
import functools
import math
import re
import unicodedata

from nanostoney.answers import WORD_RE
from nanostoney.errors import UserError
from nanostoney.sources import bundled_rows, hub_rows
from nanostoney.tasks.base import SPLITS, normalize, short_id, stable_hash


# -----------------------------------------------------------------------------
# conversations

def parse_conversation(row, where):
    msgs = row.get("messages") if isinstance(row, dict) else None
    if not isinstance(msgs, list) or not all(isinstance(m, dict) and "role" in m and "content" in m for m in msgs):
        raise UserError(f"{where}: expected {{\"messages\": [{{\"role\": ..., \"content\": ...}}, ...]}}; "
                        "fix that row.")
    roles = [m["role"] for m in msgs]
    if roles not in (["system", "user", "assistant"], ["user", "assistant"]):
        return None  # multi-turn or odd shapes: not a single question/answer, skip
    conv = {m["role"]: m["content"].strip() for m in msgs}
    conv["source_id"] = "stoney:" + short_id(conv["user"] + "\n" + conv["assistant"])
    return conv


def _conversations(rows, path):
    out = {}
    for k, row in enumerate(rows):
        if c := parse_conversation(row, f"{path} row {k + 1}"):
            out.setdefault(c["source_id"], c)
    return list(out.values())


# -----------------------------------------------------------------------------
# the lexicon extractor

QUOTE_RE = re.compile(
    r"`(?P<bt>[^`\n]+)`"
    r"|\"(?P<dq>[^\"\n]+)\""
    r"|“(?P<cq>[^”\n]+)”"
    r"|(?<![\w'])'(?P<sq>(?=\S)[^'\n]*?(?:'\w[^'\n]*?)*)(?<=\S)'(?!\w)")
STONEY_LETTERS = set("îâûṯẖôÎÂÛṮẖÔ")
POS_RE = re.compile(
    r"^(?:an?\s+|the\s+)?(?:(?:active|stative|impersonal|reflexive|reciprocal|transitive|intransitive|alienable|"
    r"inalienable|dependent|unspecified|possessive|causative|passive|plural|singular|proper|common|verbal|nominal|"
    r"descriptive|compound|directional)\s+)*(?:nouns?|verbs?|adjectives?|adverbs?|phrases?|verb\s+phrases?|"
    r"noun\s+phrases?|pronouns?|particles?|interjections?|postpositions?|conjunctions?|suffix(?:es)?|"
    r"prefix(?:es)?|transitive|intransitive|stative|part\s+of\s+speech|expressions?|forms?|entry|entries|"
    r"reciprocal|reflexive|plural|singular|diminutive|causative|roots?|stems?|morphemes?|quantifiers?|classifiers?)$",
    re.I)
HEDGE_RE = re.compile(r"\b(?:presumably|possibly|probably|likely|perhaps|maybe|related\s+to|associated\s+with|"
                      r"refers?\s+to|something\s+like|e\.g|i\.e|etc|literally|lit)\b", re.I)
CONNECTOR_RE = re.compile(
    r"(?:\b(?:specifically|literally|directly|simply|also|precisely|actually|which)\s+)?"
    r"(?:\bmeans|\bmeaning|\btranslates(?:\s+directly)?\s+(?:to|as)|\bis\s+translated\s+as|"
    r"\bdirectly\s+translates\s+to|\bstands\s+for)\s*:?\s*$", re.I)
THIS_RE = re.compile(r"^(?:this|the|that)\s+(?:\w+\s+){0,3}?(?:term|phrase|word|verb|noun|expression|entry)\b|^it\b",
                     re.I)


def _spans(text):
    """Quoted spans as (start, end, inner text, quote kind)."""
    return [(m.start(), m.end(), m.group(m.lastgroup), m.lastgroup) for m in QUOTE_RE.finditer(text)]


def _sentences(text, spans):
    """Sentence (start, end) bounds; a full stop inside a quote does not end a sentence."""
    inside = {i for a, b, _, _ in spans for i in range(a, b)}
    bounds, start = [], 0
    for m in re.finditer(r"[.!?]\s+", text):
        if m.start() not in inside:
            bounds.append((start, m.end()))
            start = m.end()
    bounds.append((start, len(text)))
    return bounds


def _prose_and_quotes(text):
    return QUOTE_RE.sub(" ", text), [s[2] for s in _spans(text)]


def _trigrams(word):
    w = f"^{word.lower()}$"
    return [w[i:i + 3] for i in range(len(w) - 2)]


class Lang:
    """Which language a span is in ("s", "e" or None), learned from the corpus: no word list needed."""

    def __init__(self, convs):
        prose_seen, stoney = collections.Counter(), collections.Counter()
        for c in convs:
            words = set()
            for text in (c["user"], c["assistant"]):
                prose, quotes = _prose_and_quotes(text)
                words |= {w.lower() for w in WORD_RE.findall(prose) if not STONEY_LETTERS & set(w)}
                for q in quotes:
                    if STONEY_LETTERS & set(q):
                        stoney.update(w.lower() for w in WORD_RE.findall(q))
            prose_seen.update(words)
        self.english = {w for w, n in prose_seen.items() if n >= 2 and w not in stoney}
        self.stoney = set(stoney)
        self.grams = {}
        for side, words in (("e", self.english), ("s", self.stoney)):
            counts = collections.Counter(g for w in words for g in _trigrams(w))
            self.grams[side] = (counts, sum(counts.values()), len(counts) + 1)

    def _logp(self, word, side):
        counts, total, vocab = self.grams[side]
        return sum(math.log((counts[g] + 0.5) / (total + 0.5 * vocab)) for g in _trigrams(word))

    def word(self, w):
        w = w.lower()
        if STONEY_LETTERS & set(w) or (w in self.stoney and w not in self.english):
            return "s"
        if w in self.english:
            return "e"
        return "s" if self._logp(w, "s") > self._logp(w, "e") else "e"

    def known_english(self, text):
        """Every word is one of the prose's English words."""
        words = WORD_RE.findall(text)
        return bool(words) and all(w.lower() in self.english for w in words)

    def __call__(self, text):
        text = text.strip()
        words = WORD_RE.findall(text)
        if not words or len(words) > 10 or re.search(r"[\d`\"“”;:/=+*_()\[\]]|(?:^|\W)'|'(?:\W|$)", text):
            return None
        votes = [self.word(w) for w in words]
        if all(v == "e" for v in votes) or (len(words) >= 4 and votes.count("e") >= len(words) - 1
                                            and not STONEY_LETTERS & set(text)):
            return None if POS_RE.match(text.rstrip(".,;:!? ")) else "e"
        if len(words) <= 6 and votes.count("s") >= max(1, len(words) - 1):
            return "s"
        return None


def clean(text):
    """A term or gloss tidied, a sentence-initial capital undone ("Gathkâch" -> "gathkâch")."""
    text = " ".join(text.strip().strip(".,;:!?").split())
    if len(text) > 1 and text[0].isupper() and not any(ch.isupper() for ch in text[1:]) \
            and not re.match(r"I\b", text):
        return text[0].lower() + text[1:]
    return text


# words between a term and its gloss that mean the text is contrasting, hedging or pointing elsewhere
NOT_DIRECT_RE = re.compile(r"\)|\b(?:not|while|whereas|but|than|instead|rather|contrast|differ\w*|unlike|and|or|both|"
                           r"either|neither|also|compared?|versus|vs|one|another|other|like|likely|probably|possibly|"
                           r"may|might|could|seems?|appears?|suggests?|perhaps|if)\b", re.I)
ASKS_TERM_RE = re.compile(r"\b(?:term|word|phrase|verb|noun|express|say|translate|refer|describe|call)\w*\b", re.I)
ASKS_MEANING_RE = re.compile(r"\b(?:mean|meaning|translat\w*|english)\b", re.I)
LEAD_E_RE = re.compile(r"\b(?:for|express|expressing|translate|translating|say|saying)\s*$", re.I)
LEAD_FOR_RE = re.compile(r"\b(?:term|word|phrase|noun|verb|translation|expression|equivalent)\s+for\s*$", re.I)


def _paren_pairs(text, spans, tags, lang):
    """`term` (gloss) and 'gloss' (`term`): a parenthesis right after a quoted span."""
    out = []
    for (a, b, inner, _), tag in zip(spans, tags):
        m = re.match(r"\s*\(\s*([^()]{1,80}?)\s*\)", text[b:])
        if not m or tag is None:
            continue
        par = m.group(1).strip()
        q = QUOTE_RE.fullmatch(par)
        par_inner = q.group(q.lastgroup) if q else par
        if "," in par_inner or re.match(r"(?:e\.g\.|i\.e\.|like|vs\.?|or|and|as|see|cf\.|literally|lit\.)\b",
                                        par_inner, re.I):
            continue
        ptag = lang(par_inner)
        if tag == "s" and ptag == "e":
            out.append((inner, par_inner, "paren"))
        elif tag == "e" and ptag == "s" and (lang.known_english(inner) or (q and q.lastgroup == "bt")
                                             or STONEY_LETTERS & set(par_inner)):
            # the rarer order, 'gloss' (`term`): only when the sides are unmistakable, else
            # "'abe' (leaf) and 'aberagen' (pop)" would give the pair pop -> aberagen
            out.append((par_inner, inner, "paren-rev"))
    return out


def extract_pairs(text, lang):
    """[(term, gloss, rule)] stated in one message (see the module docstring for the shapes)."""
    spans = _spans(text)
    tags = [lang(s[2]) for s in spans]
    out = _paren_pairs(text, spans, tags, lang)
    sentences = _sentences(text, spans)

    def sentence_of(pos):
        return next(k for k, (s, e) in enumerate(sentences) if s <= pos < e or e == len(text))

    for k, ((a, b, inner, _), tag) in enumerate(zip(spans, tags)):
        if tag != "e":
            continue
        k_sent = sentence_of(a)
        s_start, s_end = sentences[k_sent]
        before = text[s_start:a]
        prev_s = [(sa, sb, si) for (sa, sb, si, _), t in zip(spans, tags) if t == "s" and s_start <= sa and sb <= a]
        conn = CONNECTOR_RE.search(before)
        if conn:
            # `term` ... means 'gloss': the nearest Stoney span before the connector, close by
            c_at = conn.start() + s_start
            cands = [x for x in prev_s if x[1] <= c_at]
            if cands:
                sa, sb, si = cands[-1]
                between = text[sb:c_at]
                # a quoted part-of-speech label may sit between: `x` is an "active verb" meaning 'y'
                between_spans = [xi for xa, _, xi, _ in spans if sb <= xa < c_at]
                if len(WORD_RE.findall(between)) <= 8 and not NOT_DIRECT_RE.search(between) \
                        and all(POS_RE.match(x.strip(" .,;:!?")) for x in between_spans):
                    out.append((si, inner, "means"))
            elif THIS_RE.match(before.strip()) and k_sent > 0:
                # "`term`. This verb means 'gloss'": exactly one quoted span in the sentence before
                ps, pe = sentences[k_sent - 1]
                prev = [(si, t) for (sa, _, si, _), t in zip(spans, tags) if ps <= sa < pe]
                if len(prev) == 1 and prev[0][1] == "s":
                    out.append((prev[0][0], inner, "this-means"))
            continue
        if LEAD_FOR_RE.search(before) and prev_s:
            # `term` is the Stoney noun for 'gloss'
            sa, sb, si = prev_s[-1]
            between = text[sb:a]
            if re.search(r"\bis\b", between) and len(WORD_RE.findall(between)) <= 10 \
                    and not NOT_DIRECT_RE.search(between) and not any(sb <= xa < a for xa, _, _, _ in spans):
                out.append((si, inner, "is-for"))
            continue
        if LEAD_E_RE.search(before):
            # the word for 'gloss' is `term` / to express 'gloss', you would use `term`
            nxt = next(((xa, xb, xi, t) for (xa, xb, xi, _), t in zip(spans, tags) if xa > a), None)
            if nxt is not None and nxt[3] == "s" and nxt[0] < s_end:
                between = text[b:nxt[0]]
                if re.search(r"\b(?:is|be|use|used|uses)\b", between) and len(WORD_RE.findall(between)) <= 12 \
                        and not NOT_DIRECT_RE.search(between):
                    out.append((nxt[2], inner, "for-is"))
            elif nxt is None or nxt[0] >= s_end:
                # ... is an unquoted term: "The direct translation for 'close your eyes' is îsta rhmuṯẖach."
                word = r"[^\W\d_][^\s.,;:!?()\"'`]*"
                m = re.match(r"\s*,?\s*(?:is|would be)\s+(" + word + r"(?:\s+" + word + r"){0,3})\s*[.!;]", text[b:])
                if m and lang(m.group(1)) == "s" and STONEY_LETTERS & set(m.group(1)):
                    out.append((m.group(1), inner, "for-is"))
    return [p for p in (_clean_pair(t, g, rule) for t, g, rule in out) if p]


def _clean_pair(term, gl, rule):
    """(term, gloss, rule) tidied, or None for a gloss that hedges or names a grammatical category."""
    term, gl = clean(term), clean(gl)
    if not term or not gl or normalize(term) == normalize(gl) or HEDGE_RE.search(gl) or POS_RE.match(gl):
        return None
    return term, gl, rule


def extract_qa_pair(conv, lang):
    """A pair stated by the exchange: a question quoting one gloss (term), the answer one term (gloss)."""
    qs = [(s[2], lang(s[2])) for s in _spans(conv["user"])]
    ans = [(s[2], lang(s[2])) for s in _spans(conv["assistant"])]
    q_e = {normalize(t) for t, tag in qs if tag == "e"}
    q_s = {normalize(t) for t, tag in qs if tag == "s"}
    a_e = {normalize(t): t for t, tag in ans if tag == "e"}
    a_s = {normalize(t): t for t, tag in ans if tag == "s"}
    if len(q_e) == 1 and not q_s and len(a_s) == 1 and not any(tag is None for _, tag in qs) \
            and ASKS_TERM_RE.search(conv["user"]):
        gl = next(t for t, tag in qs if tag == "e")
        return _clean_pair(next(iter(a_s.values())), gl, "qa")
    if len(q_s) == 1 and not q_e and len(a_e) == 1 and not any(tag is None for _, tag in ans) \
            and ASKS_MEANING_RE.search(conv["user"]):
        term = next(t for t, tag in qs if tag == "s")
        return _clean_pair(term, next(iter(a_e.values())), "qa")
    return None


POS_WORD_RE = re.compile(r"\b(noun|verb|adjective|adverb)s?\b", re.I)


def pos_near(text, term):
    """The one part of speech named in the sentence where `term` first appears, else None."""
    i = text.casefold().find(term.casefold())
    if i < 0:
        return None
    start = max(text.rfind(". ", 0, i), text.rfind("? ", 0, i), text.rfind("|| ", 0, i)) + 1
    ends = [j for j in (text.find(". ", i), text.find("? ", i)) if j >= 0]
    sentence = text[start:min(ends) if ends else len(text)]
    found = {m.lower() for m in POS_WORD_RE.findall(sentence)}
    return found.pop() if len(found) == 1 else None


def gloss_kind(gloss, pos=None):
    """The kind a distractor must share: "verb" ("to ..."), the stated part of speech, word or phrase."""
    g = normalize(gloss)
    if g.startswith("to "):
        return "verb"
    if pos in ("noun", "adjective", "adverb"):
        return pos
    return "word" if len(g.split()) == 1 else "phrase"


def coarse_kind(kind):
    """The fallback kind when a split has too few options of the exact kind."""
    return "verb" if kind == "verb" else "other"


def build_lexicon(convs):
    """One pair per term: its most frequent gloss, each side in its most frequent spelling."""
    lang = Lang(convs)
    glosses = collections.defaultdict(collections.Counter)   # term key -> gloss -> count
    spellings = collections.defaultdict(collections.Counter)
    gloss_spelling = collections.defaultdict(collections.Counter)
    sources = collections.defaultdict(set)
    rules = collections.defaultdict(list)
    pos = collections.defaultdict(collections.Counter)
    for c in convs:
        for text in (c["user"], c["assistant"]):
            qa = extract_qa_pair(c, lang) if text is c["assistant"] else None
            pairs = extract_pairs(text, lang) + ([qa] if qa else [])
            for term, gl, rule in pairs:
                key = normalize(term)
                glosses[key][normalize(gl)] += 1
                spellings[key][term] += 1
                gloss_spelling[normalize(gl)][gl] += 1
                sources[key].add(c["source_id"])
                rules[key].append((rule, term, gl))
                pos[key][pos_near(text, term)] += 1
    lexicon = []
    for key in sorted(glosses):
        g = min(glosses[key], key=lambda x: (-glosses[key][x], not x.startswith("to "), len(x), x))
        term = min(spellings[key], key=lambda x: (-spellings[key][x], not x[:1].islower(), x))
        gl = min(gloss_spelling[g], key=lambda x: (-gloss_spelling[g][x], not x[:1].islower(), x))
        stated = [p for p, _ in pos[key].most_common() if p]
        lexicon.append({"term": term, "gloss": gl, "term_key": key, "gloss_key": g,
                        "kind": gloss_kind(gl, stated[0] if stated else None),
                        "gloss_keys": sorted(glosses[key]), "sources": sorted(sources[key]), "evidence": rules[key]})
    return lexicon


# -----------------------------------------------------------------------------
# splits: conversations grouped by shared terms and glosses, a group per split

def mentions(convs, term_keys):
    """{term_key: {source_id}} of the conversations whose text has every word of the term."""
    index = collections.defaultdict(set)
    for c in convs:
        for w in WORD_RE.findall(unicodedata.normalize("NFC", c["user"] + " " + c["assistant"])):
            index[w.casefold()].add(c["source_id"])
    words = {key: [w.casefold() for w in WORD_RE.findall(key)] for key in term_keys}
    return {key: set.intersection(*(index.get(w, set()) for w in ws)) if ws else set() for key, ws in words.items()}


# the parts a conversation group can go to, with their shares (val/test first: where the 80/10/10 split had them)
GROUP_PARTS = (("val", 0.1), ("test", 0.1), ("unseen_val", 0.1), ("unseen_test", 0.1), ("train", 0.6))
EXTRACTION = SPLITS
CONTROL = {"val": "unseen_val", "test": "unseen_test"}


def group_part(key):
    """The part (GROUP_PARTS) a conversation group goes to, by a hash of its first id."""
    u, edge = (stable_hash(key) % 10_000) / 10_000, 0.0
    for part, share in GROUP_PARTS:
        edge += share
        if u < edge:
            return part
    return GROUP_PARTS[-1][0]


MAX_MENTIONS = 10  # a "term" in more conversations is a common word: vague, and it would glue the splits


def assign_splits(convs, lexicon):
    """({source_id: part}, lexicon with each pair's split), one part per union-find group."""
    parent = {c["source_id"]: c["source_id"] for c in convs}

    def find(x):
        while parent[x] != x:
            parent[x] = parent[parent[x]]
            x = parent[x]
        return x

    def union(ids):
        ids = [find(i) for i in ids]
        for i in ids[1:]:
            a, b = sorted((ids[0], i))
            parent[find(b)] = find(a)

    seen = mentions(convs, [p["term_key"] for p in lexicon])
    lexicon = [p for p in lexicon if len(seen[p["term_key"]]) <= MAX_MENTIONS]
    by_gloss = collections.defaultdict(set)
    for p in lexicon:
        union(sorted(set(p["sources"]) | seen[p["term_key"]]))
        for g in p["gloss_keys"]:
            by_gloss[g] |= set(p["sources"])
    for ids in by_gloss.values():
        union(sorted(ids))
    groups = collections.defaultdict(list)
    for c in convs:
        groups[find(c["source_id"])].append(c["source_id"])
    split = {i: group_part(min(ids)) for ids in groups.values() for i in ids}
    return split, [dict(p, split=split[p["sources"][0]]) for p in lexicon]


@functools.lru_cache(maxsize=None)
def load_corpus(source="bundled", data_dir=None):
    """{"convs": {part: [conv]}, "lexicon": {part: [pair]}, "sources": [...]}, built once per process."""
    rows, path = bundled_rows("stoney", "all", data_dir)
    convs = _conversations(rows, path)
    conv_split, lexicon = assign_splits(convs, build_lexicon(convs))
    parts = [part for part, _ in GROUP_PARTS]
    out = {"convs": {s: [c for c in convs if conv_split[c["source_id"]] == s] for s in parts},
           "lexicon": {s: [p for p in lexicon if p["split"] == s] for s in parts},
           "sources": [path]}
    hub = hub_rows("stoney", source)
    if hub:
        out = _with_hub_train(out, *hub, path)
    return out


def _with_hub_train(out, rows, label, path):
    """The hub as training pool, minus anything held out here or mentioning a held-out term or gloss."""
    held_parts = [part for part, _ in GROUP_PARTS if part != "train"]
    held_ids = {c["source_id"] for part in held_parts for c in out["convs"][part]}
    held_pairs = [p for part in held_parts for p in out["lexicon"][part]]
    held_terms = {p["term_key"] for p in held_pairs}
    held_glosses = {g for p in held_pairs for g in p["gloss_keys"]}
    convs = _conversations(rows, label)
    bad = set().union(*mentions(convs, held_terms).values()) if held_terms else set()
    train = [c for c in convs if c["source_id"] not in held_ids and c["source_id"] not in bad]
    lexicon = [p for p in build_lexicon(train) if p["term_key"] not in held_terms
               and not set(p["gloss_keys"]) & held_glosses]
    out = dict(out, sources=[label, path])
    out["convs"] = dict(out["convs"], train=train)
    out["lexicon"] = dict(out["lexicon"], train=lexicon)
    return out
