"""Contexts: what the model reads before the answer slot, with no answer in it: the prompt, a
rationale ("own": the model's greedy completion; "gold": teacher forced) cut before its first
sentence that names an option letter or states an answer (else the statistics would measure
copying a letter a few tokens back), then "</think>\nAnswer:"; or "cloze": the question without
options, then the options' shared answer beginning, so the slot is where their answers part."""
import re
import unicodedata

from nanostoney import cloze
from nanostoney.answers import LETTERS, MARKER, NUMBER_RE, answer_after, format_answer, numbers_equal, \
    option_letters, parse_letter, parse_number, rationale_part
from nanostoney.errors import UserError

# a sentence that names an option letter (as an option line ends: "- 72 C", "It is 72 C.") or announces the answer
LETTER_NAMING = re.compile(r"(?i:\boption)\s*\(?[A-E]\b|\([A-E]\)|(?<!\w)[A-E]\)|(?<=\S) [A-E](?=[.;\n]|$)"
                           r"|(?i:\banswer\s*(?:is\b|:))")
SENTENCE_END = re.compile(r"\n|[.!?;](?=\s)")
STATED_VALUE = re.compile(r"(?i:answer is)\s*(.+?)(?: [A-E])?\s*(?:,\s|\.\s|\.?$|\n|;)", re.MULTILINE)


def answer_value(text):
    """The number an answer text states ("$27.30", "64 minutes", "Rs. 4270", "4,800"), or None
    when it is not one number with at most a unit (a formula "12/25", a pair, "None of these")."""
    nums = NUMBER_RE.findall(text)
    if len(nums) != 1 or re.search(r"[^\sA-Za-z.%$€£₹/]", NUMBER_RE.sub("", text)):
        return None
    return parse_number(nums[0])


def mention_positions(text, answers):
    """Where `text` first mentions each of `answers`: an answer that is one number wherever a number
    of that size appears (so "= 72" and "72.0" count, "172" does not), any answer as a whole word
    or phrase, ignoring case."""
    hits = []
    for ans in filter(None, (unicodedata.normalize("NFC", (a or "").strip()) for a in answers)):
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
    m = LETTER_NAMING.search(rationale)
    hits = mention_positions(rationale, answers) + ([m.start()] if m else [])
    if not hits:
        return rationale.strip()
    starts = [0] + [e.end() for e in SENTENCE_END.finditer(rationale) if e.end() <= min(hits)]
    return rationale[:max(starts)].strip()


def option_text(example, letter):
    choices = example.get("choices")
    return choices[LETTERS.index(letter)] if choices and letter and letter in LETTERS[:len(choices)] else None


def stated_answers(example, completion=None):
    """Texts whose mention states an answer: the gold answer (for MC the gold option's text) and
    the answer of the model's `completion` (its chosen option's text, or its open answer)."""
    gold = answer_after(example["messages"][-1]["content"]) or ""
    own = answer_after(completion) if completion else None
    out = [option_text(example, gold) if example.get("choices") else gold]
    out += [option_text(example, parse_letter(own)) if example.get("choices") else own] if own else []
    said = STATED_VALUE.search(completion or "")  # "The answer is 27 D": 27 too
    return [a for a in out + [said.group(1) if said else None] if a]


def context_text(example, completion, context="own"):
    """The assistant text the answer slot is read after: "<think>{rationale}</think>\\nAnswer: {gold}",
    the rationale being the model's own (`completion`, context "own") or the gold one ("gold"),
    cut by strip_answer before it states the gold answer or the model's own answer."""
    gold = example["messages"][-1]["content"]
    rationale = unicodedata.normalize("NFC", rationale_part(completion if context == "own" else gold))
    return format_answer(strip_answer(rationale, stated_answers(example, completion)), answer_after(gold))


def cloze_slot(task, example):
    """(prompt, assistant, slot, candidates) of the cloze context: the question without options, the
    gold answer's text, the character where the options' answers part, and every option's answer
    text; None when their shared beginning already states the gold answer."""
    answers = cloze.answer_texts(example)
    gold, slot = answers[LETTERS.index(example["answer"])], cloze.common_prefix(answers)
    if mention_positions(gold[:slot], [option_text(example, example["answer"])]):
        return None  # every option's chain passes through the gold value first: no unseen decision to probe
    return cloze.question_only(task, example), gold, slot, answers


def answer_start(text):
    """The character where the answer after the last "Answer:" starts."""
    return len(text) - len(text[text.rfind(MARKER) + len(MARKER):].lstrip())


def letter_slot(task, example, assistant):
    """(prompt, assistant, slot, candidates) after a rationale: the slot is the first character
    of the answer after the last "Answer:"; the candidates are the assistant text with each
    option letter in the answer's place."""
    start = answer_start(assistant)
    if MARKER not in assistant or start >= len(assistant):
        raise UserError(f"example {example['id']} of task {task.name} has no answer after 'Answer:'; fix the "
                        f"task data.")
    options = option_letters(len(example["choices"])) if example.get("choices") else ()
    return task.prompt(example), assistant, start, [assistant[:start] + c for c in options]


def answer_cue(task, example):
    """A UserError when the task's gold assistant text has no "Answer:" line."""
    if MARKER not in example["messages"][-1]["content"]:
        raise UserError(f"task {task.name} has no 'Answer:' line in its gold answers, so it has no answer "
                        f"position; pick tasks with one (e.g. stoney_mc, stoney_lexicon, aqua_mc, gsm8k_mc).")
