"""No answer text inside a probed context: the answer slot is read after a rationale cut before
it states the answer, whichever rationale is used and however it names the answer. Checked on
many held-out items of every task with an answer line, by a checker independent of interp."""
import re
import unicodedata

import pytest

from nanostoney.interp import contexts, definitions, items
from nanostoney.answers import LETTERS, answer_after
from nanostoney.tasks import BUNDLED_TASKS as TASK_NAMES, get_task
from nanostoney.tasks.subset import subset
from nanostoney.tokenizer import Tokenizer

N_ITEMS = 60
TASKS = [n for n in TASK_NAMES if answer_after(get_task(n).examples("val")[0]["messages"][-1]["content"])]


@pytest.fixture(scope="module")
def tok():
    texts = [m["content"] for name in TASKS if not get_task(name).control
             for ex in subset(get_task(name), "train", 100) for m in ex["messages"]]
    return Tokenizer.train(texts, 900)


def gold_text(ex):
    return ex["messages"][-1]["content"]


def answer_strings(ex):
    """What would give the answer away: the gold option's text (MC) or the gold answer."""
    return [ex["choices"][LETTERS.index(ex["answer"])]] if ex.get("choices") else [answer_after(gold_text(ex))]


def numeric(text):
    """The value of a plain-number answer ("$1,080", "64 minutes"), else None."""
    m = re.fullmatch(r"\s*(?:Rs\.?\s*|\$)?(-?\d[\d,]*(?:\.\d+)?)\s*(?:%|[A-Za-z]+(?:/[A-Za-z]+)?)?\s*", text)
    return float(m.group(1).replace(",", "")) if m else None


def leaks(tok, ex, ids):
    """What of the answer the context after the prompt still says (empty: nothing)."""
    start = ids.index(tok.token_id("<|assistant_start|>")) + 1
    text = unicodedata.normalize("NFC", tok.decode(ids[start:]))
    found = []
    if ex.get("choices"):
        L = ex["answer"]
        if re.search(rf"option\s*\(?{L}\b|\({L}\)|(?<![A-Za-z]){L}\)", text, flags=re.I):
            found.append(f"letter {L}")
    for s in answer_strings(ex):
        s = unicodedata.normalize("NFC", s.strip())
        if re.search(r"(?<!\w)" + re.escape(s) + r"(?!\w)", text, flags=re.I):
            found.append(s)
        value = numeric(s)
        if value is not None and any(abs(float(x.replace(",", "")) - value) < 1e-9
                                     for x in re.findall(r"\d[\d,]*(?:\.\d+)?", text)):
            found.append(f"value {s}")
        seq = tok.encode(" " + s)
        if len(s) >= 3 and any(ids[start + i:start + i + len(seq)] == seq for i in range(len(ids) - start)):
            found.append(f"tokens of {s!r}")
    return found


def completions(ex):
    """The ways a model's own rationale can state the answer: the gold text word for word, the
    option text, a bare letter, an options line, a wrong answer argued for."""
    g = gold_text(ex)
    answer = answer_after(g)
    out = [g, f"<think>First we look at it. It is {answer_strings(ex)[0]}! Done.</think>\nAnswer: {answer}"]
    if ex.get("choices"):
        L, text = ex["answer"], answer_strings(ex)[0]
        other = LETTERS[(LETTERS.index(L) + 1) % 5]
        out += [f"<think>Some reasoning here.\nSo the right one is ({L}).</think>\nAnswer: {L}",
                f"<think>Checking the options.\n{L}) {text}\nThat settles it.</think>\nAnswer: {L}",
                f"<think>Checking the options.\n- {text} {L}\nThat settles it.</think>\nAnswer: {L}",
                f"<think>It must be {ex['choices'][LETTERS.index(other)]}; option {other}.</think>\nAnswer: {other}"]
    return out


class Judge:
    def __call__(self, word):
        return "e"


@pytest.mark.parametrize("name", TASKS)
def test_no_answer_text_in_the_probed_context(tok, name):
    task = get_task(name)
    examples = items.select_examples(task, N_ITEMS)["val"][:N_ITEMS]
    caught = stating = 0
    for ex in examples:
        # the checker is not blind: a gold rationale that states the answer gives it away uncut
        # (the open Stoney answers' rationale, "Looking up `term`.", states nothing to catch)
        think = gold_text(ex).split("</think>")[0]
        if any(re.search(r"(?<!\w)" + re.escape(a.strip()) + r"(?!\w)", think, re.I) for a in answer_strings(ex)):
            stating += 1
            caught += bool(leaks(tok, ex, items.prepare_item(tok, task, ex, "val", Judge(), gold_text(ex)).ids))
        for completion in completions(ex):
            for context in definitions.RATIONALE_CONTEXTS:
                item = items.prepare_item(tok, task, ex, "val", Judge(), contexts.context_text(ex, completion, context))
                assert not leaks(tok, ex, item.ids), (ex["id"], context, completion, tok.decode(item.ids))
                assert tok.decode(item.ids).rstrip().endswith("Answer:")  # the slot: the answer comes next
                assert answer_after(gold_text(ex)).startswith(tok.decode([item.target]).strip())
    assert caught >= 0.9 * stating


@pytest.mark.parametrize("name", [n for n in TASKS if get_task(n).kind == "mc"])
def test_cloze_context_has_no_options_and_no_answer_text(tok, name):
    """The cloze slot reads the question without options, then only what every option's answer
    shares: nothing in it tells the gold from a distractor."""
    task = get_task(name)
    examples = items.select_examples(task, N_ITEMS)["val"][:N_ITEMS]
    slots = [(ex, contexts.cloze_slot(task, ex)) for ex in examples]
    assert sum(s is None for _, s in slots) <= 0.2 * len(examples)  # (its number as an operand, a start value)
    for ex, (prompt, gold, slot, answers) in [(ex, s) for ex, s in slots if s is not None]:
        item = items.prepare_item(tok, task, ex, "val", Judge(), None, (prompt, gold, slot, answers))
        start = item.ids.index(tok.token_id("<|assistant_start|>")) + 1
        read = tok.decode(item.ids[:start])
        assert not any(f"- {c} {L}" in read for L, c in zip(LETTERS, ex["choices"])), read  # no option lines
        shared = tok.decode(item.ids[start:])
        assert all(a.startswith(shared) for a in answers), (shared, answers)
        assert not leaks(tok, ex, item.ids), (ex["id"], shared)
        assert tok.encode(gold)[len(item.ids) - start] == item.target  # the gold answer's next token
