"""Interpretability: which attention heads a model uses to answer, and how that differs between
reasoning over Stoney Nakoda and reasoning over math.

Everything is measured at one place, the *answer slot*: the task prompt rendered with
`tokenizer.render_prompt`, then a rationale, then "</think>\\nAnswer:", so the next token is the
answer's first token (for multiple choice, the letter). Which rationale (the *context*):
- "own" (default): the model's own greedy completion of the prompt (evaluate.complete_task);
- "gold": the gold rationale (teacher forcing);
- "cloze" (multiple choice): no options and no rationale of the model's. The question alone,
  then the answers' shared beginning (nanostoney.cloze.answer_texts: "<think>'grotto' in Stoney
  Nakoda is `", "<think>19 + 7 = "), so the slot is the first token where the options' answers
  part: the token that decides which answer the model writes, with nothing of it in the context.
  The item is right when the model's cloze pick is (cloze.cloze_choices). This is the slot of
  a model that knows answers but cannot name their letters (a small one: BENCHMARKS.md).
Either way the rationale is cut before its first sentence that states the answer: a sentence
naming an option letter ("which is option E", "(E)", "E)", "the answer is", "Answer:") or stating
the gold answer or the model's own answer (the option's text, or its number for a numeric
option). Every MC gold rationale ends "..., which is option L.": left in, the statistics would
measure copying a letter a few tokens back. Cut, the slot is where the model commits. Whether
the model got an item right is its own greedy completion's verdict (task.evaluate).

Statistics (per example, then means with bootstrap intervals over examples, per family and item
group: train, held-out (val + test), held-out right, held-out wrong; see DEFINITIONS):
- attention entropy per layer and head, over all query positions and at the answer slot
- attention mass from the answer slot onto labelled regions of the context: structure
  (bos, template, system, question, options, rest of the prompt, rationale, answer cue) and
  lexical (Stoney-term words, English words, digits, operators, other)
- head roles: previous-token, induction (on repeated random tokens), attention sink, option
  lookup
- logit lens: log-prob and rank of the answer token read from every layer's residual stream
- head ablation: the drop in the answer's log-prob when one head (or the top-k heads) is
  zeroed or replaced by its mean output
These are exploratory. The claims are a few declared headline tests (HEADLINES, at the end):
permutation p-values, Holm-corrected across every headline test of the report, intervals at
the Bonferroni level; heads are chosen on a selection subset of items and scored on a
disjoint one.

Probes come from nanostoney.probes; our own (ItemProbe, PatternProbe, RowAblate) subclass
probes.Probe, so one forward collects every statistic of a prompt, and ablations run batched,
one ablation per batch row, each row starting from the clean residual stream at the first
layer it ablates (blocks before it cannot change). The per-item passes (item_records,
ablate_single, ablate_sets) are functions of a list of items, so ranks can share the items.
"""
import itertools
import math
import re
import unicodedata
from dataclasses import dataclass, field

import numpy as np
import torch
from tqdm import tqdm

from nanostoney import cloze, minimal_pairs, patching, probes
from nanostoney.patching import blocks_from  # noqa: F401 (also interp.blocks_from)
from nanostoney.answers import LETTERS, MARKER, NUMBER_RE, answer_after, format_answer, numbers_equal, \
    option_letters, parse_letter, parse_number, rationale_part
from nanostoney.dist import get_rank, map_over_ranks
from nanostoney.errors import UserError
from nanostoney.evaluate import complete_task
from nanostoney.gpt import unwrap
from nanostoney.metrics import bootstrap_means, holm, mean_difference
from nanostoney.tasks.base import stable_hash
from nanostoney.tasks.stoney import WORD_RE, Lang, load_corpus
from nanostoney.tasks.subset import subset
from nanostoney.tokenizer import SYSTEM_JOIN

STRUCT_REGIONS = ("bos", "template", "system", "question", "options", "prompt_other", "rationale", "answer_cue")
LEXICAL_REGIONS = ("stoney_term", "english", "digit", "operator", "other")
SPLIT_GROUPS = ("train", "heldout")
OUTCOME_GROUPS = ("heldout_right", "heldout_wrong")  # held-out items the model's own greedy answer gets right/wrong
RATIONALE_CONTEXTS = ("own", "gold")  # the slot after a rationale, at "Answer:" (context_text)
CONTEXTS = RATIONALE_CONTEXTS + ("cloze",)
ABLATION_MODES = ("zero", "mean")
HEADLINE_MODE = "mean"  # the ablation the headline tests use (zero ablation stays exploratory)
ROLE_THRESHOLDS = {"previous_token": 0.5, "induction": 0.3, "sink": 0.5, "option_lookup": 0.3}
OPERATOR_CHARS = set("+-−*×÷/=^%<>")
DIRECTIONS = {"s2e": "term → gloss", "e2s": "gloss → term"}
ALPHA = 0.05  # family-wise error rate of the headline tests
MIN_N = 10  # items a side for a headline test: 10 sign flips reach p = 2 / 2**10 at best

DEFINITIONS = {
    "context": "what precedes the answer slot: the prompt, then a rationale cut before its first sentence that "
               "states the answer, then '</think>\\nAnswer:'. own = the model's own greedy completion (default); "
               "gold = the gold rationale (teacher forcing). A sentence states the answer when it names an option "
               "letter ('option E', '(E)', 'E)', 'the answer is', 'Answer:') or mentions the gold answer or the "
               "model's own answer (an option's text, or its number when the option is one number). cloze = the "
               "question without its options, then the beginning every option's answer shares (no rationale).",
    "answer_position": "the answer slot: the position after the context where the answer's first token (the "
                       "letter for multiple choice; for cloze the gold answer's token where the options' answers "
                       "part) is predicted; statistics are read there.",
    "right_wrong": "held-out items split by the model's own greedy completion of the prompt: right when "
                   "task.evaluate accepts it (heldout_right), else heldout_wrong; for cloze, right when the "
                   "model's cloze pick is the gold option.",
    "answer_logprob": "log-probability (nats) of the gold answer's first token at the answer slot.",
    "accuracy": "multiple choice: the correct letter (cloze: the gold answer's token) has the highest logit among "
                "the five options' tokens at the slot; "
                "open answers (and MC when the tokenizer does not give the five letters as single tokens in that "
                "place): the gold first token is the model's top-1 token.",
    "entropy": "attention entropy in nats, -sum_j p_j log p_j, averaged over every query position of the context "
               "(position 0, which sees only itself, counts as 0); exact (probes.attention_entropy_probe).",
    "entropy_answer": "attention entropy (nats) of the answer slot's query; log(T) would be uniform over the "
                      "T context tokens.",
    "entropy_norm": "entropy as a share of its maximum, H_i / log(i + 1), averaged over query positions i >= 1: "
                    "free of the growth of entropy with prompt length (families differ in length); "
                    "entropy_answer_norm: H / log(T) at the answer slot.",
    "struct_mass": "attention mass from the answer slot onto each structural region: bos (first token), "
                   "template (the other special tokens), system, question, options, prompt_other (the rest of "
                   "the user turn), rationale (assistant text through </think>), answer_cue (the rest, "
                   "e.g. '\\nAnswer:'). A token belongs to the region of its first non-space character.",
    "lex_mass": "attention mass from the answer slot onto lexical classes: digit (a token with a digit), "
                "operator (+ - * / = ^ % < > and the like, not hyphens inside words), stoney_term (a letter word "
                "judged Stoney by the Stoney task's language judge: Stoney letters, vocabularies learned from "
                "the bundled conversations, a character-trigram fallback; Stoney prompts only), english (other "
                "letter words), other (spaces, punctuation, special tokens). A token takes the first class it "
                "touches in that order.",
    "token_share": "the share of context tokens in each region: the mass that uniform attention would give it.",
    "previous_token": "mean attention from each query i >= 1 onto token i - 1, over the task prompts.",
    "sink": "mean attention from each query i >= 1 onto the first token (<|bos|>), over the task prompts.",
    "induction": "on <|bos|> + R + R (R: random tokens), mean attention from each token of the second copy onto "
                 "the token that followed its earlier occurrence; interval over random sequences.",
    "option_lookup": "multiple choice only: attention mass from the answer slot onto the tokens of the "
                     "correct option's line ('E) 32400').",
    "option_share": "option_lookup divided by the mass on all five option lines (about 0.2 when a head does not "
                    "prefer the correct one).",
    "logit_lens": "for each depth l (0 = embeddings, l = after block l), the residual stream at the answer "
                  "slot read through the final norm and lm_head: log-prob of the answer token, top-1 rate "
                  "(rank 1), mean log10 rank, and for multiple choice the letter accuracy; the last depth is the "
                  "model's own output. decodable (one rule for every family, interp.decodable): the answer token is "
                  "top-1 of the whole vocabulary at that depth.",
    "lens_first": "the first block depth (l >= 1, after block l) from which the answer stays decodable "
                  "through the output; undefined for an item whose answer is not decodable at the output. Depth 0 "
                  "(the embeddings) is left out: it decodes frequent answer words without reading the question; "
                  "lens_embedding reports that rate as a baseline.",
    "ablation": "drop in the answer's log-prob (base minus ablated; positive = the head helps) when one head's "
                "output is set to zero (zero) or to its mean over every position of every analysed prompt of "
                "this checkpoint (mean), one head at a time.",
    "subsets": "items are hash-split (by task and id) into a selection subset (every train item and about half "
               "of the held-out items) and a score subset (the other held-out items): heads are chosen on the "
               "first, their ablation effect is scored on the second.",
    "topk_ablation": "the same drop when k heads are ablated together: 'own' = the family's top-k heads (largest "
                     "mean single-head drop on the family's selection items), '<family>' = the other family's "
                     "heads, 'random' = the mean over random sets of k heads (a control).",
    "overlap": "agreement of the families' head maps: Jaccard index of their top-k heads and Spearman rank "
               "correlation of their mean single-head drops.",
    "interval": "exploratory tables and figures: 95% percentile bootstrap over examples (seeded), not corrected "
                "for multiple comparisons.",
    "headline": "the declared headline tests (HEADLINES), on held-out items: two-sided permutation p-values "
                "(sign flips for paired differences, label shuffles for two samples), Holm-Bonferroni adjusted "
                "across every headline test of the report (family-wise error 0.05); intervals are percentile "
                "bootstrap intervals at the Bonferroni level 1 - 0.05/m for m tests (simultaneous 95%). A result "
                "is significant when its Holm p is below 0.05 and its interval excludes 0. A test enters only with "
                "at least 10 items a side (decided before looking at the outcome).",
    "minimal_pair": "one held-out item read twice with the model's own assistant text held fixed: clean, and with "
                    "one thing in the question changed (math: an operand the model's chain copies from the question, "
                    "read where the chain writes it; Stoney: the term, from another item of the same task and "
                    "direction, read at the answer after the model's own rationale); the two prompts have the "
                    "same length and differ in at most 4 tokens (nanostoney.minimal_pairs).",
    "patching": "activation patching: one activation of the clean run copied into the corrupted run (the residual "
                "stream entering each block at the changed token and at the slot, and each head's output at the "
                "slot); restored = LD(patched) - LD(corrupt), LD = logit of the clean answer's token minus the "
                "corrupted answer's at the slot, in nats; 'of the gap' = mean restored / mean (LD(clean) - "
                "LD(corrupt)). A site passes when its sign-flip p, Holm-corrected over every site of both "
                "families, is below 0.05 and its Bonferroni-level interval lies above 0 (nanostoney.patching).",
    "roles": "a head gets a role when its score is at least the threshold: " +
             ", ".join(f"{k} >= {v}" for k, v in ROLE_THRESHOLDS.items()) + ".",
    "role_thresholds": ROLE_THRESHOLDS,
}


# -----------------------------------------------------------------------------
# scores from attention patterns (pure functions; p is [..., Tq, Tk], rows sum to 1)

def pattern_entropy(p, dim=-1):
    """Entropy in nats of attention distributions along `dim` (0 log 0 = 0)."""
    return -(p * torch.log(p.clamp_min(1e-30))).sum(dim)


def previous_token_score(p):
    """[..., T, T] causal pattern -> [...]: mean over queries i >= 1 of p[i, i-1]."""
    return torch.diagonal(p, offset=-1, dim1=-2, dim2=-1).mean(-1)


def normalized_entropy(p):
    """[..., T, T] causal pattern -> [...]: mean over queries i >= 1 of H_i / log(i + 1), the
    entropy as a share of its maximum (uniform over the i + 1 visible keys), which removes the
    growth of entropy with prompt length."""
    T = p.size(-1)
    return (pattern_entropy(p[..., 1:, :]) / torch.log(torch.arange(2, T + 1, device=p.device, dtype=p.dtype))).mean(-1)


def sink_score(p):
    """[..., T, T] -> [...]: mean over queries i >= 1 of the mass on key 0."""
    return p[..., 1:, 0].mean(-1)


def induction_score(p, n_rep, start=1):
    """[..., T, T] on a sequence prefix(start) + R + R with len(R) = n_rep -> [...]: mean over the
    second copy's tokens of the mass on the token after the same token's first occurrence."""
    j = torch.arange(n_rep, device=p.device)
    return p[..., start + n_rep + j, start + 1 + j].mean(-1)


def region_mass(rows, labels, n_regions):
    """rows [..., T] attention, labels [T] region ids (-1 = none) -> [..., R] mass per region."""
    labels = torch.as_tensor(labels, device=rows.device)
    onehot = torch.nn.functional.one_hot(labels.clamp(min=0), n_regions).to(rows.dtype)
    onehot = onehot * (labels >= 0)[:, None].to(rows.dtype)
    return rows @ onehot


def classify_heads(scores, thresholds=None):
    """{role: [(layer, head), ...]} for every role score map [L, H] at or above its threshold."""
    thresholds = thresholds or ROLE_THRESHOLDS
    out = {}
    for role, s in scores.items():
        if role in thresholds and s is not None:
            s = np.asarray(s)
            out[role] = [(int(l), int(h)) for l, h in zip(*np.nonzero(s >= thresholds[role]))]
    return out


# -----------------------------------------------------------------------------
# items: an example turned into token ids, the answer position and per-token labels

@dataclass
class Item:
    task: str
    family: str
    split: str
    id: str
    ids: list                 # context tokens; the last one is the answer position
    target: int               # the answer's first token (scored at the answer position)
    struct: np.ndarray        # [T] index into STRUCT_REGIONS
    lexical: np.ndarray       # [T] index into LEXICAL_REGIONS
    option: np.ndarray = None  # [T] option index 0..4 of each token's option line, -1 elsewhere
    answer_index: int = None   # index of the correct option (MC)
    letter_ids: list = None    # the five candidate answer tokens (MC)
    tokens: list = field(default_factory=list)  # display strings
    own_correct: bool = None   # the model's own greedy completion of the prompt is right
    depth: int = 0             # reasoning steps of an arith item (1-4); 0 for other tasks
    direction: str = None      # Stoney lexicon items: s2e (term -> gloss) or e2s (gloss -> term)

    @property
    def key(self):
        return f"{self.task}/{self.id}"

    @property
    def group(self):
        return "train" if self.split == "train" else "heldout"

    @property
    def outcome(self):
        """heldout_right / heldout_wrong by the model's own greedy answer; None for train items."""
        if self.group != "heldout" or self.own_correct is None:
            return None
        return OUTCOME_GROUPS[0] if self.own_correct else OUTCOME_GROUPS[1]

    @property
    def subset(self):
        """"select" (heads are chosen here: train items and a hash half of the held-out ones) or
        "score" (the other held-out items: chosen heads are scored here)."""
        return "select" if self.split == "train" or stable_hash(f"subset/{self.key}") % 2 == 0 else "score"

    @property
    def pos(self):
        return len(self.ids) - 1


def token_offsets(tokenizer, text):
    """(ids, [(char_start, char_end)]) of `text` as tokenizer.encode tokenizes it."""
    hf = getattr(tokenizer, "hf", None)
    if hf is not None:
        enc = hf.encode(text, add_special_tokens=False)
        return list(enc.ids), [tuple(o) for o in enc.offsets]
    ids, offsets, pos = tokenizer.encode(text), [], 0  # decode token by token
    for i in ids:
        piece = tokenizer.decode([i])
        start = text.find(piece, pos) if piece else pos
        start = pos if start < 0 else start
        offsets.append((start, start + len(piece)))
        pos = start + len(piece)
    return ids, offsets


def first_char_label(char_labels, offsets, text):
    """Per token: the label of its first non-space character (of its first character if blank)."""
    out = []
    for a, b in offsets:
        j = next((c for c in range(a, b) if not text[c].isspace()), a)
        out.append(char_labels[j] if j < len(char_labels) else -1)
    return out


def word_judge():
    """(judge(word) -> "s"|"e", description): the Stoney task's own language judge."""
    lang = Lang([c for convs in load_corpus()["convs"].values() for c in convs])
    return lang.word, "nanostoney.tasks.stoney.Lang over the bundled conversations"


def lexical_char_labels(text, family, judge):
    """Per character: index into LEXICAL_REGIONS before token-level priority is applied."""
    lab = np.full(len(text), LEXICAL_REGIONS.index("other"))
    if family == "stoney":
        for m in WORD_RE.finditer(text):
            cls = "stoney_term" if judge(m.group(0)) == "s" else "english"
            lab[m.start():m.end()] = LEXICAL_REGIONS.index(cls)
    else:
        for m in WORD_RE.finditer(text):
            lab[m.start():m.end()] = LEXICAL_REGIONS.index("english")
    for i, ch in enumerate(text):
        if ch.isdigit() or (ch in ".," and 0 < i < len(text) - 1 and text[i - 1].isdigit() and text[i + 1].isdigit()):
            lab[i] = LEXICAL_REGIONS.index("digit")
        elif ch in OPERATOR_CHARS and not (ch == "-" and 0 < i < len(text) - 1 and text[i - 1].isalpha()
                                           and text[i + 1].isalpha()):
            lab[i] = LEXICAL_REGIONS.index("operator")
    return lab


def token_lexical(char_lab, offsets):
    """A token takes the highest-priority class among its characters (order of LEXICAL_REGIONS,
    except that digit and operator outrank words)."""
    priority = [LEXICAL_REGIONS.index(c) for c in ("digit", "operator", "stoney_term", "english", "other")]
    out = []
    for a, b in offsets:
        present = set(char_lab[a:b].tolist()) if b > a else {LEXICAL_REGIONS.index("other")}
        out.append(next(c for c in priority if c in present))
    return out


def user_text(prompt):
    """The first user turn as the tokenizer renders it (the system message folded in)."""
    msgs = [m for m in prompt]
    if msgs and msgs[0]["role"] == "system":
        return msgs[0]["content"] + SYSTEM_JOIN + msgs[1]["content"]
    return msgs[0]["content"]


def display_token(text):
    """A token's text for figure labels (newlines, tabs and other control characters made visible)."""
    text = text.replace("\n", "↵").replace("\t", "⇥")
    return "".join(ch if ch.isprintable() else f"\\x{ord(ch):02x}" for ch in text)


def answer_cue(task, example):
    """Where the gold assistant text's last "Answer:" starts; a UserError when there is none."""
    cue = example["messages"][-1]["content"].rfind(MARKER)
    if cue < 0:
        raise UserError(f"task {task.name} has no 'Answer:' line in its gold answers, so it has no answer "
                        f"position; pick tasks with one (e.g. stoney_mc, stoney_lexicon, aqua_mc, gsm8k_mc).")
    return cue


# -----------------------------------------------------------------------------
# contexts: what the model reads before the answer slot, with no answer in it

# a sentence that names an option letter or announces the answer
LETTER_NAMING = re.compile(r"(?i:\boption)\s*\(?[A-E]\b|\([A-E]\)|(?<!\w)[A-E]\)|(?i:\banswer\s*(?:is\b|:))")
SENTENCE_END = re.compile(r"\n|[.!?;](?=\s)")
STATED_VALUE = re.compile(r"(?i:answer is)\s*(.+?)\s*(?:,\s|\.\s|\.?$|\n|;)", re.MULTILINE)


def answer_value(text):
    """The number an answer text states ("$27.30", "64 minutes", "Rs. 4270", "4,800"), or None
    when it is not one number with at most a unit (a formula "12/25", a pair, "None of these")."""
    nums = NUMBER_RE.findall(text)
    rest = NUMBER_RE.sub("", text)
    if len(nums) != 1 or re.search(r"[^\sA-Za-z.%$€£₹/]", rest):
        return None
    return parse_number(nums[0])


def mention_positions(text, answers):
    """Where `text` first mentions each of `answers`: an answer that is one number wherever a number
    of that size appears (so "= 72" and "72.0" count, "172" does not), any answer as a whole word
    or phrase, ignoring case."""
    hits = []
    for ans in answers:
        ans = unicodedata.normalize("NFC", (ans or "").strip())
        if not ans:
            continue
        value = answer_value(ans)
        if value is not None:
            hits += [m.start() for m in NUMBER_RE.finditer(text.replace("$", " "))
                     if numbers_equal(abs(parse_number(m.group(0)) or 0.0), abs(value))][:1]
        m = re.search(r"(?<!\w)" + re.escape(ans) + r"(?!\w)", text, flags=re.IGNORECASE)
        hits += [m.start()] if m else []
    return hits


def strip_answer(rationale, answers):
    """The rationale up to its first sentence (or ';' clause) that states an answer: names an
    option letter, says "the answer is" / "Answer:", or mentions one of `answers`."""
    hits = mention_positions(rationale, answers)
    m = LETTER_NAMING.search(rationale)
    hits += [m.start()] if m else []
    if not hits:
        return rationale.strip()
    first = min(hits)
    starts = [0] + [e.end() for e in SENTENCE_END.finditer(rationale) if e.end() <= first]
    return rationale[:max(starts)].strip()


def option_text(example, letter):
    choices = example.get("choices")
    return choices[LETTERS.index(letter)] if choices and letter and letter in LETTERS[:len(choices)] else None


def stated_answers(example, completion=None):
    """Texts whose mention states an answer: the gold answer (for MC the gold option's text) and
    the answer of the model's `completion` (its chosen option's text, or its open answer)."""
    gold = answer_after(example["messages"][-1]["content"]) or ""
    out = [option_text(example, gold) if example.get("choices") else gold]
    own = answer_after(completion) if completion else None
    if own:
        out.append(option_text(example, parse_letter(own)) if example.get("choices") else own)
    said = STATED_VALUE.search(completion or "")  # "The answer is 27, which is option D": 27 too
    return [a for a in out + [said.group(1) if said else None] if a]


def context_text(example, completion, context="own"):
    """The assistant text the answer slot is read after: "<think>{rationale}</think>\\nAnswer: {gold}",
    the rationale being the model's own (`completion`, context "own") or the gold one ("gold"),
    cut by strip_answer before it states the gold answer or the model's own answer."""
    if context not in RATIONALE_CONTEXTS:
        raise UserError(f"unknown context {context!r}; use one of {', '.join(RATIONALE_CONTEXTS)}.")
    gold = example["messages"][-1]["content"]
    rationale = unicodedata.normalize("NFC", rationale_part(completion if context == "own" else gold))
    return format_answer(strip_answer(rationale, stated_answers(example, completion)), answer_after(gold))


def cloze_slot(task, example):
    """(prompt, assistant, slot, candidates) of the cloze context: the question without its
    options, the gold answer's text, the character where the options' answers first differ, and
    every option's answer text (their tokens at the slot are the candidates); None when the
    shared beginning already states the gold answer (an arith chain whose start value is it)."""
    answers = cloze.answer_texts(example)
    gold, slot = answers[LETTERS.index(example["answer"])], cloze.common_prefix(answers)
    if mention_positions(gold[:slot], [option_text(example, example["answer"])]):
        return None  # every option's chain passes through the gold value first: no unseen decision to probe
    return cloze.question_only(task, example), gold, slot, answers


def letter_slot(task, example, assistant):
    """(prompt, assistant, slot, candidates) after a rationale: the slot is the first character
    of the answer after the last "Answer:"; the candidates are the assistant text with each
    option letter in the answer's place."""
    cue = assistant.rfind(MARKER)
    start = cue + len(MARKER)
    while start < len(assistant) and assistant[start].isspace():
        start += 1
    if cue < 0 or start >= len(assistant):
        raise UserError(f"example {example['id']} of task {task.name} has no answer after 'Answer:'; fix the "
                        f"task data.")
    options = option_letters(len(example["choices"])) if example.get("choices") else ()
    return task.prompt(example), assistant, start, [assistant[:start] + c for c in options]


def prepare_item(tokenizer, task, example, split, judge, assistant, slot=None):
    """An Item for one example read after `assistant`, an assistant text whose last "Answer:" line
    holds the gold answer (context_text makes one): the context is the prompt and every token of
    `assistant` before the answer's first token. slot: a (prompt, assistant, slot, candidates) of
    cloze_slot instead (assistant is then ignored)."""
    prompt, gold, start, candidates = slot or letter_slot(task, example, assistant)
    prompt_ids = tokenizer.render_prompt(prompt)
    text = user_text(prompt)
    u_ids, u_off = token_offsets(tokenizer, text)
    bos, us, ue, ast = (tokenizer.token_id(s) for s in ("<|bos|>", "<|user_start|>", "<|user_end|>",
                                                         "<|assistant_start|>"))
    if prompt_ids != [bos, us] + u_ids + [ue, ast]:
        raise UserError(f"task {task.name} renders prompts of more than one user turn; interp needs "
                        f"single-turn prompts.")
    a_ids, a_off = token_offsets(tokenizer, gold)
    k = next(j for j, (a, b) in enumerate(a_off) if b > start)  # first token touching the answer
    ids = prompt_ids + a_ids[:k]
    # structure labels
    R = {name: i for i, name in enumerate(STRUCT_REGIONS)}
    ch = np.full(len(text), R["prompt_other"])
    regions = example.get("regions", {})
    for name in ("system", "question", "options"):
        if name in regions:
            a, b = regions[name]
            ch[a:b] = R[name]
    think_end = gold.find("</think>")
    think_end = think_end + len("</think>") if think_end >= 0 else 0
    a_ch = np.where(np.arange(len(gold)) < think_end, R["rationale"], R["answer_cue"])
    struct = ([R["bos"], R["template"]] + first_char_label(ch, u_off, text) + [R["template"]] * 2
              + first_char_label(a_ch, a_off[:k], gold))
    # lexical labels
    other = LEXICAL_REGIONS.index("other")
    lex = ([other] * 2 + token_lexical(lexical_char_labels(text, task.family, judge), u_off) + [other] * 2
           + token_lexical(lexical_char_labels(gold, task.family, judge), a_off[:k]))
    item = Item(task=task.name, family=task.family, split=split, id=example["id"], ids=ids, target=a_ids[k],
                struct=np.array(struct), lexical=np.array(lex), depth=example.get("depth") or 0,
                direction=example.get("direction"))
    if example.get("choices") and all(f"option_{c}" in regions for c in option_letters(len(example["choices"]))):
        mc_fields(item, tokenizer, example, text, u_off, candidates, a_ids[:k])
    # labels from the text each token covers, so a character split over byte tokens still reads well
    item.tokens = (["<|bos|>", "<|user_start|>"] + [display_token(text[a:b]) for a, b in u_off] +
                   ["<|user_end|>", "<|assistant_start|>"] + [display_token(gold[a:b]) for a, b in a_off[:k]])
    return item


def mc_fields(item, tokenizer, example, text, u_off, candidates, head_ids):
    """Option-line labels, the correct option's index and each option's token at the slot
    (`candidates`: the assistant text each option would have; its token there)."""
    regions, k = example["regions"], len(head_ids)
    options = option_letters(len(example["choices"]))
    ch_opt = np.full(len(text), -1)
    for n, c in enumerate(options):
        a, b = regions[f"option_{c}"]
        ch_opt[a:b] = n  # (past the end of a cloze prompt, which has no options: no label)
    item.option = np.array([-1, -1] + first_char_label(ch_opt, u_off, text) + [-1] * (2 + k))
    letters = []
    for candidate in candidates:
        c_ids = tokenizer.encode(candidate)
        letters.append(c_ids[k] if len(c_ids) > k and c_ids[:k] == head_ids else None)
    answer = str(example.get("answer", "")).strip()
    if answer in options:
        item.answer_index = options.index(answer)
        if None not in letters and len(set(letters)) == len(options):  # else the tokenizer splits letters unevenly
            item.letter_ids = letters


def select_examples(task, n, seed=0, spare=10):
    """{split: [example]}: up to n * spare examples per split, balanced and hash-ordered by
    tasks.subset (salted by the seed; the same for every checkpoint; never a prefix of the stored
    order). fitting_examples keeps the first n that fit the model's context, so a few over-long
    prompts do not shrink the sample, and any prefix of the order stays balanced."""
    splits = ("val", "test") if task.control else ("train", "val", "test")  # a control has no train split
    return {split: subset(task, split, n * spare, salt=f"{seed}/{task.name}/{split}") for split in splits}


def fitting_examples(tokenizer, examples, limit, max_len):
    """({task: [(split, example)]}, {task: number passed over}): of each split's list the first
    `limit` examples whose prompt and gold assistant text fit in max_len tokens."""
    chosen, skipped = {}, {}
    for name, (task, by_split) in examples.items():
        chosen[name] = []
        for split, rows in by_split.items():
            kept = 0
            for ex in rows:
                if limit is not None and kept >= limit:
                    break
                n = len(tokenizer.render_prompt(task.prompt(ex))) + len(tokenizer.encode(ex["messages"][-1]["content"]))
                if n > max_len:
                    skipped[name] = skipped.get(name, 0) + 1
                    continue
                chosen[name].append((split, ex))
                kept += 1
    return chosen, skipped


SLOT_ROOM = 16  # tokens kept free after a model's own rationale for the answer slot ("Answer: X")


def own_completions(model, tokenizer, examples, chosen, max_len, info=None, chunk=16):
    """{(task, id): the model's greedy completion of the example's prompt} (evaluate.complete_task:
    up to the task's longest reference + 16 tokens, and within max_len). Generated in chunks of
    `chunk` examples shared out over the ranks (the chunks do not depend on the world size)."""
    out = {}
    for name, pairs in chosen.items():
        if not pairs:
            continue
        task, exs = examples[name][0], [ex for _, ex in pairs]
        longest = max(len(tokenizer.render_prompt(task.prompt(ex))) for ex in exs)
        chunks = [exs[i:i + chunk] for i in range(0, len(exs), chunk)]
        budget = max(1, max_len - longest - SLOT_ROOM)  # the answer slot follows the context
        done = map_over_ranks(lambda part: complete_task(model, tokenizer, task, part, max_new_tokens=budget)[0],
                              chunks, info)
        greedy = [g for part in done for g in part]
        out.update({(name, ex["id"]): g for ex, g in zip(exs, greedy)})
    return out


def cloze_verdicts(model, tokenizer, examples, chosen, info=None):
    """{(task, id): whether the model's cloze pick of the example is the gold option} (multiple-choice
    tasks only: scripts.compare_reasoning checks)."""
    out = {}
    for name, pairs in chosen.items():
        task, exs = examples[name][0], [ex for _, ex in pairs]
        right = cloze.cloze_correct(model, tokenizer, task, exs, info)
        out.update({(name, ex["id"]): bool(r) for ex, r in zip(exs, right)})
    return out


# -----------------------------------------------------------------------------
# probes of our own

class ItemProbe(probes.Probe):
    """One forward of one prompt (batch 1): per layer, previous-token and sink scores, the answer
    row of every head's pattern, per-head output sums (for mean ablation) and, when asked, the
    full patterns (for figures). Patterns are formed one layer at a time and dropped."""

    def __init__(self, n_layer, pos, keep_full=False):
        self.pos, self.keep_full = pos, keep_full
        self.prev, self.sink, self.rows = [None] * n_layer, [None] * n_layer, [None] * n_layer
        self.full, self.out_sum, self.norm_ent = [None] * n_layer, [None] * n_layer, [None] * n_layer

    @torch.compiler.disable
    def on_attn(self, layer, q, k, v, y, mask):
        with torch.no_grad():
            p = probes.attention_pattern(q[:1], k[:1], mask)[0]  # [H, T, T]
            self.prev[layer] = previous_token_score(p).cpu()
            self.sink[layer] = sink_score(p).cpu()
            self.norm_ent[layer] = normalized_entropy(p).cpu()
            self.rows[layer] = p[:, self.pos].cpu()
            if self.keep_full:
                self.full[layer] = p.half().cpu()
            self.out_sum[layer] = y[0].float().sum(1).cpu()  # [H, head_dim]
        return y


class PatternProbe(probes.Probe):
    """Applies fn(pattern [B, H, T, T]) per layer and keeps the result (small scores only)."""

    def __init__(self, n_layer, fn):
        self.fn, self.out = fn, [None] * n_layer

    @torch.compiler.disable
    def on_attn(self, layer, q, k, v, y, mask):
        with torch.no_grad():
            self.out[layer] = self.fn(probes.attention_pattern(q, k, mask)).cpu()
        return y


class RowAblate(probes.Probe):
    """Ablation that differs per batch row: scale [B, L, H], use_mean [B] (1 = mean, 0 = zero
    ablation); head output y <- s*y + (1-s)*use_mean*mean, mean [L, H, head_dim]."""

    def __init__(self, scale, mean=None, use_mean=None):
        self.scale, self.mean, self.use_mean = scale, mean, use_mean

    @torch.compiler.disable
    def on_attn(self, layer, q, k, v, y, mask):
        s = self.scale[:, layer].to(y.device, y.dtype)[:, :, None, None]  # [B, H, 1, 1]
        y = y * s
        if self.mean is not None:
            w = (1 - s) * self.use_mean.to(y.device, y.dtype)[:, None, None, None]
            y = y + w * self.mean[layer].to(y.device, y.dtype)[None, :, None, :]
        return y


# -----------------------------------------------------------------------------
# measurements on a model

@torch.no_grad()
def analyse_item(model, item, keep_full=False):
    """Every per-example statistic of one item (numpy arrays), plus head-output sums."""
    gpt = unwrap(model)
    c = gpt.config
    device = gpt.get_device()
    x = torch.tensor([item.ids], device=device)
    probe = ItemProbe(c.n_layer, item.pos, keep_full)
    with probes.attention_entropy_probe(gpt, dtype=torch.float32) as ent, probes.attach(gpt, probe), \
            probes.residuals(gpt) as res:
        gpt(x)
    rows = torch.stack(probe.rows).float()  # [L, H, T]
    rec = {"entropy": ent.per_layer_head.cpu().numpy(),
           "entropy_answer": pattern_entropy(rows).numpy(),
           "entropy_norm": torch.stack(probe.norm_ent).numpy(),
           "entropy_answer_norm": (pattern_entropy(rows) / np.log(len(item.ids))).numpy(),
           "previous_token": torch.stack(probe.prev).numpy(),
           "sink": torch.stack(probe.sink).numpy(),
           "struct_mass": region_mass(rows, item.struct, len(STRUCT_REGIONS)).numpy(),
           "lex_mass": region_mass(rows, item.lexical, len(LEXICAL_REGIONS)).numpy(),
           "struct_share": np.bincount(item.struct, minlength=len(STRUCT_REGIONS)) / len(item.ids),
           "lex_share": np.bincount(item.lexical, minlength=len(LEXICAL_REGIONS)) / len(item.ids)}
    if item.answer_index is not None and item.option is not None:
        opt = torch.as_tensor(item.option)
        on_opt = region_mass(rows, opt, 5).numpy()  # [L, H, 5]
        rec["option_lookup"] = on_opt[..., item.answer_index]
        rec["option_share"] = on_opt[..., item.answer_index] / np.maximum(on_opt.sum(-1), 1e-9)
    # logit lens: every depth's residual at the answer position through the final norm + lm_head
    resid = torch.stack([r[0, item.pos] for r in res.resid])  # [L+1, C]
    logits = gpt.lm_logits(resid)
    logp = torch.log_softmax(logits, -1)
    tgt = logits[:, item.target]
    rec["lens_logprob"] = logp[:, item.target].cpu().numpy()
    rank = (logits > tgt[:, None]).sum(-1) + 1
    rec["lens_top1"] = (rank == 1).float().cpu().numpy()
    rec["lens_log10_rank"] = torch.log10(rank.float()).cpu().numpy()
    if item.letter_ids is not None:
        choice = logits[:, item.letter_ids].argmax(-1)
        rec["lens_choice"] = (choice == item.answer_index).float().cpu().numpy()
    rec["lens_decodable"] = decodable(logits, item.target)  # one rule, every family
    rec["lens_embedding"] = float(rec["lens_decodable"][0])  # a baseline: word frequency, not reading
    rec["lens_first"] = first_decodable(rec["lens_decodable"])
    rec["accuracy"] = float(rec.get("lens_choice", rec["lens_top1"])[-1])
    rec["answer_logprob"] = float(rec["lens_logprob"][-1])
    out_sum = torch.stack(probe.out_sum)  # [L, H, D]
    full = torch.stack(probe.full).numpy() if keep_full else None
    return rec, out_sum, full


def decodable(logits, target):
    """[depths] 1.0 where the answer token is top-1 of the whole vocabulary in the lens logits
    [depths, V]: THE decodability rule of the report, the same for every family (a margin among a
    few candidates would mean different things for five letters and for a number)."""
    rank = (logits > logits[:, target][:, None]).sum(-1) + 1
    return (rank == 1).float().cpu().numpy()


def first_decodable(decodable):
    """The first block depth (1..n_layer) from which the answer stays decodable through the output
    (NaN when the output itself does not decode it). Depth 0, the embeddings, is left out: it
    "decodes" a frequent answer word without reading anything (lens_embedding reports it)."""
    d = np.asarray(decodable)[1:] > 0.5
    if not d[-1]:
        return float("nan")
    wrong = np.nonzero(~d)[0]
    return float(wrong[-1] + 2) if wrong.size else 1.0


@torch.no_grad()
def ablation_logprob_drops(model, ids, target, rows, mean=None, max_batch_tokens=16384):
    """Drop of log p(target) at the last position of `ids` for each ablation in `rows`, a list of
    (scale [L, H], use_mean) with scale 0 on the ablated heads. Blocks before a row's first
    ablated layer are not recomputed: every row starts from the clean residual stream there,
    batched with one clean row that gives the baseline under the same arithmetic."""
    gpt = unwrap(model)
    L = gpt.config.n_layer
    x = torch.tensor([ids], device=gpt.get_device())
    with probes.residuals(gpt) as res:
        gpt.trunk(x)
    first = [int((s < 1).any(1).nonzero()[0]) if bool((s < 1).any()) else L for s, _ in rows]
    drops = torch.zeros(len(rows))
    chunk = max(2, max_batch_tokens // len(ids))
    for layer in sorted(set(first) - {L}):
        idx = [i for i, f in enumerate(first) if f == layer]
        for part in [idx[j:j + chunk - 1] for j in range(0, len(idx), chunk - 1)]:
            scale = torch.stack([torch.ones(L, gpt.config.n_head)] + [rows[i][0] for i in part])
            use_mean = torch.tensor([0.0] + [float(rows[i][1]) for i in part])
            with probes.attach(gpt, RowAblate(scale, mean, use_mean)):
                h = blocks_from(gpt, res.resid[layer].expand(len(part) + 1, -1, -1), layer)[:, -1]
            lp = torch.log_softmax(gpt.lm_logits(h), -1)[:, target].cpu()
            drops[part] = lp[0] - lp[1:]
    return drops


def head_set_scale(n_layer, n_head, heads):
    s = torch.ones(n_layer, n_head)
    for layer, head in heads:
        s[layer, head] = 0
    return s


def single_head_rows(n_layer, n_head, use_mean):
    return [(head_set_scale(n_layer, n_head, [(l, h)]), use_mean) for l in range(n_layer) for h in range(n_head)]


def ablation_drops(model, item, mean=None):
    """[L, H] drop of the answer's log-prob when each head alone is ablated (zero if mean is None)."""
    c = unwrap(model).config
    rows = single_head_rows(c.n_layer, c.n_head, mean is not None)
    return ablation_logprob_drops(model, item.ids, item.target, rows, mean).view(c.n_layer, c.n_head).numpy()


@torch.no_grad()
def pattern_scores(model, x):
    """{"previous_token", "sink"}: [B, L, H] scores of each row of the token batch x [B, T]."""
    gpt = unwrap(model)
    probe = PatternProbe(gpt.config.n_layer, lambda p: torch.stack([previous_token_score(p), sink_score(p)]))
    with probes.attach(gpt, probe):
        gpt(torch.as_tensor(x, device=gpt.get_device()))
    s = torch.stack(probe.out, 2).numpy()  # [2, B, L, H]
    return {"previous_token": s[0], "sink": s[1]}


@torch.no_grad()
def induction_scores(model, vocab_size, n_seqs=16, n_rep=32, seed=0, bos_id=None):
    """Per random sequence [N, L, H] induction and previous-token scores on <|bos|> + R + R."""
    gpt = unwrap(model)
    c = gpt.config
    n_rep = max(2, min(n_rep, (c.sequence_len - 1) // 2))
    g = torch.Generator().manual_seed(seed)
    r = torch.randint(0, vocab_size, (n_seqs, n_rep), generator=g)
    bos = torch.full((n_seqs, 1), bos_id if bos_id is not None else 0)
    x = torch.cat([bos, r, r], 1).to(gpt.get_device())
    probe = PatternProbe(c.n_layer, lambda p: torch.stack([induction_score(p, n_rep), previous_token_score(p)]))
    with probes.attach(gpt, probe):
        gpt(x)
    s = torch.stack(probe.out, 2).numpy()  # [2, N, L, H]
    return {"induction": s[0], "previous_token_random": s[1], "n_rep": n_rep}


# -----------------------------------------------------------------------------
# intervals over examples

def interval(values, n_boot=1000, seed=0):
    """{"mean", "lo", "hi", "n"} for values [N, ...]: the mean over examples and its bootstrap
    95% interval per entry (metrics.bootstrap_means: NaN entries left out), rounded for the
    report; None when there are no examples."""
    v = np.asarray(values, dtype=np.float64)
    if v.shape[0] == 0:
        return None
    point, lo, hi = bootstrap_means(v, n_boot, seed)
    r = (lambda a: np.round(a, 6).tolist()) if v.ndim > 1 else (lambda a: round(float(a), 6))
    return {"mean": r(point), "lo": r(lo), "hi": r(hi), "n": int(v.shape[0])}


# -----------------------------------------------------------------------------
# one checkpoint, every statistic

SCALAR_KEYS = ("answer_logprob", "accuracy", "own_correct", "lens_first", "lens_embedding")
ARRAY_KEYS = ("entropy", "entropy_answer", "entropy_norm", "entropy_answer_norm", "previous_token", "sink",
              "struct_mass", "lex_mass", "struct_share",
              "lex_share", "option_lookup", "option_share", "lens_logprob", "lens_top1", "lens_log10_rank",
              "lens_choice", "lens_decodable", "ablate_zero", "ablate_mean")


def derived(recs, key):
    """Per-example arrays for a statistic name, including reductions used by the figures."""
    base, _, red = key.partition(":")
    vals = [r.get(base) for r in recs]
    if all(v is None for v in vals):
        return None
    shape = np.shape(next(v for v in vals if v is not None))
    arr = np.stack([np.full(shape, np.nan) if v is None else np.asarray(v, dtype=np.float64) for v in vals])
    if red == "layer":      # mean over heads: [N, L] (or [N, L, R])
        arr = arr.mean(2)
    elif red == "all":      # mean over layers and heads: [N] (or [N, R])
        arr = arr.mean((1, 2))
    return arr


SUMMARY_KEYS = (list(SCALAR_KEYS) + list(ARRAY_KEYS) +
                ["entropy:layer", "entropy:all", "entropy_answer:layer", "entropy_answer:all", "entropy_norm:layer",
                 "entropy_norm:all", "entropy_answer_norm:layer", "entropy_answer_norm:all",
                 "previous_token:all", "sink:all", "option_lookup:all", "option_share:all",
                 "struct_mass:all", "lex_mass:all", "struct_mass:layer", "ablate_zero:all", "ablate_mean:all",
                 "chance"])


def summarize(recs, n_boot=1000, seed=0):
    out = {"n": len(recs)}
    for key in SUMMARY_KEYS:
        arr = derived(recs, key)
        if arr is not None:
            out[key] = interval(arr, n_boot, seed)
    for mode in ABLATION_MODES:
        for name in sorted({k for r in recs for k in r.get(f"topk_{mode}", {})}):
            arr = np.array([r.get(f"topk_{mode}", {}).get(name, np.nan) for r in recs], dtype=np.float64)
            out[f"topk_{mode}:{name}"] = interval(arr, n_boot, seed)
    return out


def spearman(a, b):
    ra = np.argsort(np.argsort(np.ravel(a))).astype(float)
    rb = np.argsort(np.argsort(np.ravel(b))).astype(float)
    if ra.std() == 0 or rb.std() == 0:
        return float("nan")
    return float(np.corrcoef(ra, rb)[0, 1])


def top_heads(drops, k):
    """The k heads with the largest mean drop, [(layer, head)], largest first."""
    m = np.asarray(drops)
    order = np.argsort(-m.ravel(), kind="stable")[:k]
    return [(int(i // m.shape[1]), int(i % m.shape[1])) for i in order]


def build_items(tokenizer, examples, chosen, completions, judge, context, max_len, vocab_size):
    """(items, {task: number skipped}): an Item per chosen example, read after its context
    (context_text of the model's completion, or cloze_slot); one whose context does not fit in
    max_len tokens (or the model's vocabulary), or has no cloze slot, is skipped. completions: {(task, id): the model's
    greedy completion}, for "cloze" {(task, id): whether its cloze pick is right}."""
    items, skipped = [], {}
    for name, pairs in chosen.items():
        task = examples[name][0]
        for split, ex in pairs:
            if context == "cloze":
                slot = cloze_slot(task, ex)
                it = slot and prepare_item(tokenizer, task, ex, split, judge, None, slot)
            else:
                completion = completions[(name, ex["id"])]
                it = prepare_item(tokenizer, task, ex, split, judge, context_text(ex, completion, context))
            if it is None or len(it.ids) > max_len or max(it.ids + [it.target]) >= vocab_size:
                skipped[name] = skipped.get(name, 0) + 1
                continue
            it.own_correct = completions[(name, ex["id"])] if context == "cloze" else bool(task.evaluate(ex, completion))
            items.append(it)
    if not items:
        raise UserError(f"every selected example is longer than {max_len} tokens; raise --max-len.")
    return items, skipped


def figure_item_keys(items, families, n):
    """The items drawn as example figures: each family's first n held-out items (any if none)."""
    keys = set()
    for fam in families:
        held = [it for it in items if it.family == fam and it.group == "heldout"] or \
            [it for it in items if it.family == fam]
        keys |= {it.key for it in held[:n]}
    return keys


def _bar(desc, progress, info):
    """A progress bar around this rank's share of the items (rank 0 only)."""
    rank = info.rank if info is not None else get_rank()
    return lambda idx: tqdm(idx, desc=desc, disable=not progress or rank != 0, leave=False)


def item_records(gpt, items, figure_keys=(), progress=True, info=None):
    """Pass 1, one forward per item: (records, every head's output summed over all positions
    [L, H, head_dim], the number of positions, {key: full patterns} of the figure items). Under
    torchrun the items are shared out over the ranks and every rank gets all results, summed in
    item order (the same numbers at any world size)."""
    done = map_over_ranks(lambda it: analyse_item(gpt, it, keep_full=it.key in figure_keys), items, info,
                          wrap=_bar("analyse", progress, info))
    out_sum = torch.stack([s for _, s, _ in done]).sum(0)
    n_pos = sum(len(it.ids) for it in items)
    recs, figures = [], {}
    for it, (rec, _, full) in zip(items, done):
        rec.update(task=it.task, family=it.family, split=it.split, group=it.group, id=it.id, key=it.key,
                   outcome=it.outcome, subset=it.subset, own_correct=float(it.own_correct), depth=it.depth,
                   direction=it.direction,
                   chance=1 / len(it.letter_ids) if it.letter_ids else None)  # a guess among the options
        recs.append(rec)
        if full is not None:
            figures[it.key] = {"id": it.id, "task": it.task, "family": it.family, "split": it.split,
                               "tokens": it.tokens, "struct": it.struct.tolist(), "full": full}
    return recs, out_sum, n_pos, figures


def drops_of(gpt, rows, means):
    """item -> its answer log-prob drops under each ablation row (numpy)."""
    return lambda it: ablation_logprob_drops(gpt, it.ids, it.target, rows, means).numpy()


def ablate_single(gpt, items, recs, means, progress=True, info=None):
    """Pass 2: every head ablated alone, zero and mean mode, into each record ([L, H] drops)."""
    L, H = gpt.config.n_layer, gpt.config.n_head
    single = single_head_rows(L, H, False) + single_head_rows(L, H, True)
    drops = map_over_ranks(drops_of(gpt, single, means), items, info, wrap=_bar("ablate heads", progress, info))
    for rec, d in zip(recs, drops):
        rec["ablate_zero"], rec["ablate_mean"] = d.reshape(2, L, H)


def choose_heads(recs, families, k):
    """{mode: {family: its k heads with the largest mean single-head drop}}, chosen on the
    family's selection subset only (all its items when that is empty), so the score subset
    judges them out of sample."""
    topk = {}
    for mode in ABLATION_MODES:
        topk[mode] = {}
        for fam in families:
            fr = [r for r in recs if r["family"] == fam]
            chosen = [r for r in fr if r["subset"] == "select"] or fr
            topk[mode][fam] = top_heads(np.mean([r[f"ablate_{mode}"] for r in chosen], 0), k)
    return topk


RANDOM_SETS = 100  # the least number of random k-head sets behind "top-k heads beat random heads"


def random_head_sets(n_layer, n_head, k, n_sets, seed):
    """The null's k-head sets: every one of the C(n, k) sets when there are at most n_sets of them,
    else n_sets distinct sets drawn afresh (seeded), never a few fixed ones."""
    n = n_layer * n_head
    as_heads = lambda s: [(int(i // n_head), int(i % n_head)) for i in s]  # noqa: E731
    if math.comb(n, k) <= n_sets:
        return [as_heads(s) for s in itertools.combinations(range(n), k)]
    rng, seen, out = np.random.default_rng(seed), set(), []
    while len(out) < n_sets:
        s = tuple(sorted(int(i) for i in rng.choice(n, k, replace=False)))
        if s not in seen:
            seen.add(s)
            out.append(as_heads(s))
    return out


def null_complete(n_layer, n_head, k, n_sets):
    """Whether n_sets random k-head sets make the null: RANDOM_SETS of them, or all C(n, k)."""
    return n_sets >= min(RANDOM_SETS, math.comb(n_layer * n_head, k))


def ablate_sets(gpt, items, recs, means, families, topk, random_sets, progress=True, info=None):
    """Pass 3: each family's top-k heads, and (mean ablation only, the headline's) random k-head
    sets, ablated together; per record topk_<mode> = {"own", <other family>, "random" (mean over
    the random sets; NaN when too few sets for the null, null_complete)}, and random_sets_mean:
    the drop of each random set (the null distribution of one k-set's drop)."""
    L, H = gpt.config.n_layer, gpt.config.n_head
    sets = {mode: [topk[mode][f] for f in families] + (random_sets if mode == HEADLINE_MODE else [])
            for mode in ABLATION_MODES}
    rows = [(head_set_scale(L, H, hs), mode == "mean") for mode in ABLATION_MODES for hs in sets[mode]]
    drops = map_over_ranks(drops_of(gpt, rows, means), items, info, wrap=_bar("ablate top-k", progress, info))
    k = len(next(iter(topk[HEADLINE_MODE].values())))
    enough = bool(random_sets) and null_complete(L, H, k, len(random_sets))
    for it, rec, drop in zip(items, recs, drops):
        start = 0
        for mode in ABLATION_MODES:
            dm = drop[start:start + len(sets[mode])]
            start += len(sets[mode])
            d = {("own" if f == it.family else f): float(dm[i]) for i, f in enumerate(families)}
            d["random"] = float(dm[len(families):].mean()) if enough and mode == HEADLINE_MODE else float("nan")
            rec[f"topk_{mode}"] = d
            if mode == HEADLINE_MODE:
                rec["random_sets_mean"] = np.asarray(dm[len(families):], dtype=np.float64)


def in_group(rec, grp):
    return grp in ("all", rec["group"], rec["outcome"])


def group_summaries(recs, families, task_names, n_boot, seed):
    """{"n_items", "families": {family or all: {group: summary}}, "tasks": {task: {group: scalars}},
    "depths": {family: {depth: summary of its held-out items}}} for the groups train, heldout,
    heldout_right, heldout_wrong and all; depths only where items record one (arith: 1-4 steps)."""
    out = {"n_items": {}, "families": {}, "tasks": {}, "depths": {}, "directions": {}}
    for fam in families + ["all"]:
        out["families"][fam] = {}
        for grp in SPLIT_GROUPS + OUTCOME_GROUPS + ("all",):
            sel = [r for r in recs if fam in (r["family"], "all") and in_group(r, grp)]
            if sel:
                out["families"][fam][grp] = summarize(sel, n_boot, seed)
    for fam in families:
        held = [r for r in recs if r["family"] == fam and r["group"] == "heldout" and r.get("depth")]
        for d in sorted({r["depth"] for r in held}):
            out["depths"].setdefault(fam, {})[str(d)] = summarize([r for r in held if r["depth"] == d], n_boot, seed)
        held = [r for r in recs if r["family"] == fam and r["group"] == "heldout" and r.get("direction")]
        for d in sorted({r["direction"] for r in held}):  # term -> gloss and gloss -> term apart
            out["directions"].setdefault(fam, {})[DIRECTIONS.get(d, d)] = summarize(
                [r for r in held if r["direction"] == d], n_boot, seed)
    for name in task_names:
        out["tasks"][name] = {}
        for grp in SPLIT_GROUPS + OUTCOME_GROUPS:
            sel = [r for r in recs if r["task"] == name and in_group(r, grp)]
            out["n_items"][f"{name}/{grp}"] = len(sel)
            if sel:
                s = {"n": len(sel)}
                for key in ("own_correct", "answer_logprob", "accuracy", "entropy:all", "sink:all",
                            "option_lookup:all"):
                    arr = derived(sel, key)
                    if arr is not None:
                        s[key] = interval(arr, n_boot, seed)
                out["tasks"][name][grp] = s
    return out


def head_maps(recs, families, mode=HEADLINE_MODE):
    """{family: {"mean": [L, H] mean single-head drop, "n"}} over the family's held-out score
    items: the out-of-sample map the report's first figure shows."""
    out = {}
    for fam in families:
        sel = [r[f"ablate_{mode}"] for r in recs if r["family"] == fam and r["group"] == "heldout"
               and r["subset"] == "score"]
        if sel:
            out[fam] = {"mean": np.mean(sel, 0).round(6).tolist(), "n": len(sel), "mode": mode}
    return out


def head_roles(out, k, topk, random_sets, families):
    """{"roles", "topk", "overlap"}: head roles from the all-items scores, the top-k heads and
    how much the first two families' heads overlap."""
    every = out["families"]["all"]["all"]
    scores = {"previous_token": every["previous_token"]["mean"], "sink": every["sink"]["mean"],
              "induction": out["induction"]["induction"]["mean"],
              "option_lookup": every["option_lookup"]["mean"] if "option_lookup" in every else None}
    overlap = {}
    if len(families) >= 2:
        a, b = families[:2]
        for mode in ABLATION_MODES:
            sa, sb = set(topk[mode][a]), set(topk[mode][b])
            ma = out["families"][a]["all"][f"ablate_{mode}"]["mean"]
            mb = out["families"][b]["all"][f"ablate_{mode}"]["mean"]
            overlap[mode] = {"families": [a, b], "jaccard": len(sa & sb) / len(sa | sb),
                             "shared": sorted([list(h) for h in sa & sb]), "spearman": spearman(ma, mb)}
    return {"roles": {r: [list(h) for h in hs] for r, hs in classify_heads(scores).items()},
            "topk": {"k": k, "heads": {m: {f: [list(h) for h in hs] for f, hs in v.items()} for m, v in topk.items()},
                     "random_sets": [[list(h) for h in s] for s in random_sets],
                     "chosen_on": "each family's selection subset (train items and a hash half of the "
                                  "held-out items)"},
            "overlap": overlap}


def example_figures(figures, topk):
    """Example attention figures: the answer row of every head and the full pattern of the
    family's most important head (largest mean zero-ablation drop)."""
    out = []
    for f in figures.values():
        lh = topk["zero"][f["family"]][0]
        full = f.pop("full")
        f.update(answer_rows=np.round(full[:, :, -1].astype(np.float32), 4).tolist(), head=list(lh),
                 pattern=np.round(full[lh[0], lh[1]].astype(np.float32), 4).tolist())
        out.append(f)
    return out


def context_samples(tokenizer, items, n=2):
    """The first n probed contexts of each task, as the model read them after the prompt (the
    report shows them, so a reader can check that no answer is in them)."""
    out, seen = [], {}
    for it in items:
        if seen.get(it.task, 0) < n and it.group == "heldout":
            seen[it.task] = seen.get(it.task, 0) + 1
            k = it.ids.index(tokenizer.token_id("<|assistant_start|>")) + 1
            out.append({"task": it.task, "id": it.id, "own_correct": it.own_correct,
                        "text": tokenizer.decode(it.ids[k:])})
    return out


def trace_pairs(gpt, tokenizer, examples, chosen, completions, context, max_len, progress=True, info=None):
    """(pairs, traces): activation patching on the minimal pairs of the held-out items, read on
    the model's own reasoning (minimal_pairs); none for the cloze context, which has no reasoning."""
    if context == "cloze":
        return [], []
    contexts, verdicts = {}, {}
    for name, rows in chosen.items():
        task = examples[name][0]
        for _, ex in rows:
            k = (name, ex["id"])
            contexts[k] = context_text(ex, completions[k], context)
            verdicts[k] = bool(task.evaluate(ex, completions[k]))
    pairs = minimal_pairs.build_pairs(tokenizer, examples, chosen, completions, contexts, verdicts, max_len)
    pairs = [p for p in pairs if max(p.clean + p.corrupt + [p.target, p.foil]) < gpt.config.vocab_size]
    traces = map_over_ranks(lambda p: patching.trace_pair(gpt, p), pairs, info, wrap=_bar("patch", progress, info))
    return pairs, traces


def run_checkpoint(model, tokenizer, examples, *, limit=None, context="own", top_k=5, n_random_sets=RANDOM_SETS,
                   n_induction=16, induction_len=32, seed=0, n_boot=1000, max_len=None, figure_examples=1,
                   judge=None, progress=True, info=None):
    """Every statistic for one model. examples: {task: (Task, {split: [example]})}; of each
    list the first `limit` examples whose prompt and gold fit in max_len tokens are analysed,
    each read after its context (`context`: "own", "gold" (see context_text) or "cloze" (cloze_slot)).

    Returns a JSON-able dict: per family and item group the bootstrap summaries, per task the
    scalars, head roles, top-k heads, their overlap and out-of-sample head maps, example
    contexts and data for example attention figures; "_recs" keeps the per-item records.
    Under torchrun (info: a DistInfo) generation and the per-item passes are shared out over the
    ranks; rank 0 computes the summaries and the other ranks return None."""
    gpt = unwrap(model).eval()
    c = gpt.config
    max_len = max_len or c.sequence_len
    chosen, skipped = fitting_examples(tokenizer, examples, limit, max_len)
    if context == "cloze":
        completions = cloze_verdicts(gpt, tokenizer, examples, chosen, info)
    else:
        completions = own_completions(gpt, tokenizer, examples, chosen, max_len, info)
    items, too_long = build_items(tokenizer, examples, chosen, completions, judge or word_judge()[0], context,
                                  max_len, c.vocab_size)
    for name, n in too_long.items():
        skipped[name] = skipped.get(name, 0) + n
    families = sorted({it.family for it in items}, key=lambda f: (f != "stoney", f))
    recs, out_sum, n_pos, figures = item_records(gpt, items, figure_item_keys(items, families, figure_examples),
                                                 progress, info)
    means = out_sum / n_pos
    ablate_single(gpt, items, recs, means, progress, info)
    k = max(1, min(top_k, c.n_layer * c.n_head - 1))
    topk = choose_heads(recs, families, k)
    random_sets = random_head_sets(c.n_layer, c.n_head, k, n_random_sets, seed)
    ablate_sets(gpt, items, recs, means, families, topk, random_sets, progress, info)
    pairs, traces = trace_pairs(gpt, tokenizer, examples, chosen, completions, context, max_len, progress, info)
    if (info.rank if info is not None else get_rank()) != 0:
        return None
    out = {"model": {"n_layer": c.n_layer, "n_head": c.n_head, "n_kv_head": c.n_kv_head, "n_embd": c.n_embd,
                     "vocab_size": c.vocab_size, "sequence_len": c.sequence_len}, "context": context}
    groups = group_summaries(recs, families, list(examples), n_boot, seed)
    out.update(n_items=groups["n_items"], skipped=skipped, families=groups["families"], tasks=groups["tasks"],
               depths=groups["depths"], directions=groups["directions"])
    vocab = min(c.vocab_size, tokenizer.vocab_size - len(getattr(tokenizer, "special_tokens", [])))
    ind = induction_scores(gpt, vocab, n_induction, induction_len, seed, tokenizer.bos_id)
    out["induction"] = {"n_rep": ind["n_rep"], "induction": interval(ind["induction"], n_boot, seed),
                        "previous_token_random": interval(ind["previous_token_random"], n_boot, seed)}
    out.update(head_roles(out, k, topk, random_sets, families))
    out["head_maps"] = head_maps(recs, families)
    out["examples"] = example_figures(figures, topk)
    out["contexts"] = context_samples(tokenizer, items)
    out["per_example"] = [{"key": r["key"], "split": r["split"], "subset": r["subset"],
                           "own_correct": r["own_correct"], "answer_logprob": round(r["answer_logprob"], 5),
                           "accuracy": r["accuracy"], "lens_first": r["lens_first"]} for r in recs]
    out["patching"] = patching.summary(pairs, traces, n_boot, seed)
    out["_recs"] = recs  # raw per-example arrays for the headline tests and paired deltas (dropped before writing)
    return out


# -----------------------------------------------------------------------------
# headline tests: a few comparisons declared in advance, corrected together

HEADLINES = {
    "topk_vs_random": "which heads carry the answer: the drop in the answer's log-prob when the family's top-k "
                      "heads (chosen on its selection subset) are mean-ablated together, minus the drop for "
                      "random k heads; paired per held-out score item",
    "topk_vs_other": "whether the families use different heads: the same drop for the family's own top-k heads "
                     "minus the other family's top-k heads; paired per held-out score item",
    "lens_first": "where the answer is decided: the first depth from which the logit lens decodes the answer, "
                  "first family minus second, over held-out items it decodes at the output",
    "entropy_answer": "how focused the answer slot's attention is, per layer: normalised entropy H / log T "
                      "(mean over heads), first family minus second, held-out items",
    "delta": "for each NEW:OLD checkpoint pair, the paired change per held-out item (by task and id) of "
             "topk_vs_random, lens_first and entropy_answer, per family",
}


def topk_drop(rec, heads):
    return rec.get(f"topk_{HEADLINE_MODE}", {}).get(heads, float("nan"))


def slot_entropy(rec):
    """[L] normalised entropy at the answer slot, mean over heads."""
    return np.asarray(rec["entropy_answer_norm"], dtype=np.float64).mean(1)


def heldout(recs, fam, score_only=False):
    return [r for r in recs if r["family"] == fam and r["group"] == "heldout"
            and (r["subset"] == "score" or not score_only)]


def checkpoint_specs(ck, recs, families):
    """The headline tests within one checkpoint: (description, x, y, paired) per test."""
    specs = []
    for fam in families:
        score = heldout(recs, fam, score_only=True)
        for other in ["random"] + [f for f in families if f != fam][:1]:
            kind = "topk_vs_random" if other == "random" else "topk_vs_other"
            specs.append(({"kind": kind, "checkpoint": ck, "family": fam, "a": fam, "b": other},
                          [topk_drop(r, "own") for r in score], [topk_drop(r, other) for r in score], True))
    if len(families) >= 2:
        a, b = families[:2]
        ha, hb = heldout(recs, a), heldout(recs, b)
        specs.append(({"kind": "lens_first", "checkpoint": ck, "a": a, "b": b},
                      [r["lens_first"] for r in ha], [r["lens_first"] for r in hb], False))
        for layer in range(len(slot_entropy(ha[0])) if ha else 0):
            specs.append(({"kind": "entropy_answer", "checkpoint": ck, "layer": layer, "a": a, "b": b},
                          [slot_entropy(r)[layer] for r in ha], [slot_entropy(r)[layer] for r in hb], False))
    return specs


def delta_specs(new, old, recs_new, recs_old, families):
    """The headline tests of one checkpoint pair, paired by item: new minus old per family."""
    ro = {r["key"]: r for r in recs_old}
    specs = []
    for fam in families:
        pairs = [(r, ro[r["key"]]) for r in heldout(recs_new, fam) if r["key"] in ro]
        score = [(n, o) for n, o in pairs if n["subset"] == "score"]
        head = {"checkpoint": f"{new} vs {old}", "family": fam, "a": new, "b": old}
        specs.append(({"kind": "delta_topk_vs_random", **head},
                      [topk_drop(n, "own") - topk_drop(n, "random") for n, _ in score],
                      [topk_drop(o, "own") - topk_drop(o, "random") for _, o in score], True))
        specs.append(({"kind": "delta_lens_first", **head},
                      [n["lens_first"] for n, _ in pairs], [o["lens_first"] for _, o in pairs], True))
        same_depth = bool(pairs) and len(slot_entropy(pairs[0][0])) == len(slot_entropy(pairs[0][1]))
        for layer in range(len(slot_entropy(pairs[0][0])) if same_depth else 0):
            specs.append(({"kind": "delta_entropy_answer", "layer": layer, **head},
                          [slot_entropy(n)[layer] for n, _ in pairs], [slot_entropy(o)[layer] for _, o in pairs],
                          True))
    return specs


def testable(x, y, paired):
    """MIN_N values on each side (MIN_N complete pairs when paired): fewer could not reach a
    corrected significance level, and would only dilute the correction of the others."""
    x, y = np.asarray(x, dtype=np.float64), np.asarray(y, dtype=np.float64)
    if paired:
        return x.size > 0 and int((~np.isnan(x - y)).sum()) >= MIN_N
    return int((~np.isnan(x)).sum()) >= MIN_N and int((~np.isnan(y)).sum()) >= MIN_N


def side_means(x, y, paired):
    x, y = np.asarray(x, dtype=np.float64), np.asarray(y, dtype=np.float64)
    if paired:
        ok = ~np.isnan(x - y)
        x, y = x[ok], y[ok]
    return float(np.nanmean(x)), float(np.nanmean(y))


def headline_tests(specs, n_boot=10000, n_perm=9999, seed=0, alpha=ALPHA):
    """Run the declared tests and correct them together: {"tests": [...], "m", "alpha",
    "correction", "interval_level"}. Each test gets the difference of means with a bootstrap
    interval at the Bonferroni level 1 - alpha/m (simultaneous coverage for all m), a
    two-sided permutation p and its Holm-Bonferroni adjusted p_holm. significant: p_holm < alpha
    and the interval excludes 0 (both must agree; with few items a bootstrap interval can be
    narrower than the exact test allows). Tests with fewer than MIN_N items a side are left out
    of m (and listed as untestable)."""
    ok = [s for s in specs if testable(*s[1:])]
    m = len(ok)
    tests = []
    for desc, x, y, paired in ok:
        tid = "/".join(f"{k}={v}" for k, v in desc.items())
        r = mean_difference(x, y, paired, n_boot, n_perm, seed + stable_hash(tid) % 2 ** 31, alpha / m)
        mean_a, mean_b = side_means(x, y, paired)
        tests.append({"id": tid, **desc, **r, "paired": paired, "mean_a": mean_a, "mean_b": mean_b})
    for t, p in zip(tests, holm([t["p"] for t in tests]) if tests else []):
        t["p_holm"] = float(p)
        t["significant"] = bool(p < alpha and (t["lo"] > 0 or t["hi"] < 0))
    return {"tests": tests, "m": m, "alpha": alpha, "correction": "Holm-Bonferroni", "n_perm": n_perm,
            "interval_level": 1 - alpha / m if m else None,
            "untestable": ["/".join(f"{k}={v}" for k, v in s[0].items()) for s in specs if not testable(*s[1:])]}


def headlines(results, deltas, families, n_boot=10000, n_perm=9999, seed=0):
    """Every headline test of a report (each checkpoint, each NEW:OLD pair), corrected together."""
    specs = [s for ck, res in results.items() for s in checkpoint_specs(ck, res["_recs"], families)]
    for new, old in deltas:
        specs += delta_specs(new, old, results[new]["_recs"], results[old]["_recs"], families)
    return headline_tests(specs, n_boot, n_perm, seed)


# -----------------------------------------------------------------------------
# exploratory: how one checkpoint moved relative to another, per statistic, paired by item

def paired_delta(results, new, old, n_boot=1000, seed=0):
    """How `new` moved each statistic relative to `old`, paired by example id: per family and
    split group, the bootstrap mean of (new - old) per example. Array statistics are compared
    only when their shapes agree (same architecture)."""
    rn = {r["key"]: r for r in results[new]["_recs"]}
    ro = {r["key"]: r for r in results[old]["_recs"]}
    ids = [i for i in rn if i in ro]
    keys = ["answer_logprob", "accuracy", "entropy:layer", "entropy_answer:layer", "entropy_norm:layer",
            "lens_logprob", "lens_top1",
            "struct_mass:all", "lex_mass:all", "previous_token", "sink", "option_lookup", "ablate_zero",
            "ablate_mean", "entropy:all", "sink:all", "option_lookup:all"]
    out = {"new": new, "old": old, "n_paired": len(ids), "families": {}}
    fams = sorted({rn[i]["family"] for i in ids}, key=lambda f: (f != "stoney", f))
    for fam in fams + ["all"]:
        out["families"][fam] = {}
        for grp in SPLIT_GROUPS + ("all",):
            sel = [i for i in ids if fam in (rn[i]["family"], "all") and grp in (rn[i]["group"], "all")]
            if not sel:
                continue
            d = {"n": len(sel)}
            for key in keys:
                a, b = derived([rn[i] for i in sel], key), derived([ro[i] for i in sel], key)
                if a is not None and b is not None and a.shape == b.shape:
                    d[key] = interval(a - b, n_boot, seed)
            out["families"][fam][grp] = d
    return out
