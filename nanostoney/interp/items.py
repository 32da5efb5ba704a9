"""Items: one example as the token ids the model reads up to its answer slot, the answer's token,
and a label per token (structural region, lexical class, option line) that attention mass is
summed over."""
from dataclasses import dataclass, field

import numpy as np

from nanostoney.answers import WORD_RE, option_letters
from nanostoney.errors import UserError
from nanostoney.interp.contexts import cloze_slot, context_text, letter_slot
from nanostoney.interp.definitions import LEXICAL_REGIONS, OUTCOME_GROUPS, STRUCT_REGIONS
from nanostoney.tasks.base import stable_hash
from nanostoney.tasks.subset import subset
from nanostoney.tokenizer import SYSTEM_JOIN

OPERATOR_CHARS = set("+-−*×÷/=^%<>")
TEMPLATE = ("<|bos|>", "<|user_start|>", "<|user_end|>", "<|assistant_start|>")  # around a single user turn


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
        if self.group == "heldout" and self.own_correct is not None:
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
        start = max(text.find(piece, pos), pos)  # where the piece is not found (a split character): here
        offsets.append((start, start + len(piece)))
        pos = start + len(piece)
    return ids, offsets


def first_char_label(char_labels, offsets, text):
    """Per token: the label of its first non-space character (of its first character if blank)."""
    first = [next((c for c in range(a, b) if not text[c].isspace()), a) for a, b in offsets]
    return [char_labels[j] if j < len(char_labels) else -1 for j in first]


def lexical_char_labels(text, family, judge):
    """Per character: index into LEXICAL_REGIONS before token-level priority is applied."""
    lab = np.full(len(text), LEXICAL_REGIONS.index("other"))
    for m in WORD_RE.finditer(text):
        stoney = family == "stoney" and judge(m.group(0)) == "s"
        lab[m.start():m.end()] = LEXICAL_REGIONS.index("stoney_term" if stoney else "english")
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
    other = {LEXICAL_REGIONS.index("other")}
    return [next(c for c in priority if c in (set(char_lab[a:b].tolist()) if b > a else other)) for a, b in offsets]


def user_text(prompt):
    """The first user turn as the tokenizer renders it (the system message folded in)."""
    if prompt[0]["role"] == "system":
        return prompt[0]["content"] + SYSTEM_JOIN + prompt[1]["content"]
    return prompt[0]["content"]


def display_token(text):
    """A token's text for figure labels (newlines, tabs and other control characters made visible)."""
    text = text.replace("\n", "↵").replace("\t", "⇥")
    return "".join(ch if ch.isprintable() else f"\\x{ord(ch):02x}" for ch in text)


def prepare_item(tokenizer, task, example, split, judge, assistant, slot=None):
    """An Item for one example: the prompt and every token of `assistant` (context_text's) before the
    answer after its last "Answer:"; or of `slot`, a cloze_slot (assistant is then ignored)."""
    prompt, gold, start, candidates = slot or letter_slot(task, example, assistant)
    prompt_ids = tokenizer.render_prompt(prompt)
    text = user_text(prompt)
    u_ids, u_off = token_offsets(tokenizer, text)
    template = [tokenizer.token_id(s) for s in TEMPLATE]
    if prompt_ids != template[:2] + u_ids + template[2:]:
        raise UserError(f"task {task.name} renders prompts of more than one user turn; interp needs "
                        f"single-turn prompts.")
    a_ids, a_off = token_offsets(tokenizer, gold)
    k = next(j for j, (a, b) in enumerate(a_off) if b > start)  # first token touching the answer
    ids = prompt_ids + a_ids[:k]
    # structure labels
    R = {name: i for i, name in enumerate(STRUCT_REGIONS)}
    ch = np.full(len(text), R["prompt_other"])
    regions = example.get("regions", {})
    for name in [n for n in ("system", "question", "options") if n in regions]:
        ch[slice(*regions[name])] = R[name]
    think_end = gold.find("</think>") + len("</think>") if "</think>" in gold else 0
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
    item.tokens = (list(TEMPLATE[:2]) + [display_token(text[a:b]) for a, b in u_off] + list(TEMPLATE[2:])
                   + [display_token(gold[a:b]) for a, b in a_off[:k]])
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
    c_ids = [tokenizer.encode(candidate) for candidate in candidates]
    letters = [c[k] if len(c) > k and c[:k] == head_ids else None for c in c_ids]
    answer = str(example.get("answer", "")).strip()
    if answer in options:
        item.answer_index = options.index(answer)
        if None not in letters and len(set(letters)) == len(options):  # else the tokenizer splits letters unevenly
            item.letter_ids = letters


def select_examples(task, n, seed=0, spare=10):
    """{split: [example]}: up to n * spare examples per split, balanced and hash-ordered by tasks.subset
    (salted by the seed), so that the first n that fit a model's context (fitting_examples) stay balanced."""
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


def build_items(tokenizer, examples, chosen, completions, judge, context, max_len, vocab_size):
    """(items, {task: number skipped}): an Item per chosen example that fits max_len and the vocabulary.
    completions: {(task, id): the model's greedy completion}, for "cloze" whether its cloze pick is right."""
    items, skipped = [], {}
    for name, pairs in chosen.items():
        task = examples[name][0]
        for split, ex in pairs:
            own = completions[(name, ex["id"])]
            if context == "cloze":
                slot = cloze_slot(task, ex)
                it = slot and prepare_item(tokenizer, task, ex, split, judge, None, slot)
            else:
                it = prepare_item(tokenizer, task, ex, split, judge, context_text(ex, own, context))
            if it is None or len(it.ids) > max_len or max(it.ids + [it.target]) >= vocab_size:
                skipped[name] = skipped.get(name, 0) + 1
                continue
            it.own_correct = own if context == "cloze" else bool(task.evaluate(ex, own))
            items.append(it)
    if not items:
        raise UserError(f"every selected example is longer than {max_len} tokens; raise --max-len.")
    return items, skipped
