"""nanostoney.cloze: multiple choice scored by each option's answer, with no options in the context."""
import re

import pytest
import torch

from nanostoney import cloze
from nanostoney.answers import LETTERS
from nanostoney.gpt import GPT, GPTConfig
from nanostoney.tasks import get_task
from nanostoney.tasks.subset import subset
from nanostoney.tokenizer import Tokenizer

MC_TASKS = ("stoney_mc", "stoney_mc_unseen", "arith_mc", "gsm8k_mc", "aqua_mc")


@pytest.fixture(scope="module")
def tok():
    texts = [m["content"] for ex in subset(get_task("stoney_mc"), "train", 200) for m in ex["messages"]]
    return Tokenizer.train(texts + [a for ex in subset(get_task("stoney_mc"), "train", 40)
                                    for a in cloze.answer_texts(ex)], 700)


@pytest.mark.parametrize("name", MC_TASKS)
def test_answers_name_no_letter_and_the_question_no_options(name):
    task = get_task(name)
    for ex in subset(task, "val", 30):
        answers = cloze.answer_texts(ex)
        assert len(answers) == len(ex["choices"]) and len(set(answers)) == len(set(ex["choices"]))  # (AQuA repeats some)
        for text, choice in zip(answers, ex["choices"]):
            assert text.endswith(f"Answer: {choice}") and not re.search(r"option\s*[A-E]\b", text), text
        asked = cloze.question_only(task, ex)[-1]["content"]
        assert not any(f"- {c} {L}" in asked for L, c in zip(LETTERS, ex["choices"])) and asked in ex["messages"][-2]["content"]


def test_batched_scores_equal_one_row_at_a_time(tok):
    """Padding rows to one length changes nothing (causal attention; the pads come after)."""
    torch.manual_seed(0)
    model = GPT(GPTConfig(sequence_len=256, vocab_size=tok.vocab_size, n_layer=2, n_head=2, n_kv_head=2, n_embd=64))
    task = get_task("stoney_mc")
    rows = [r for ex in subset(task, "val", 3) for r in cloze.scored_rows(tok, task, ex)]
    assert len({len(ids) for ids, _, _ in rows}) > 1  # rows of different lengths
    together = cloze.option_logprobs(model, rows)
    alone = [cloze.option_logprobs(model, [r])[0] for r in rows]
    assert together == pytest.approx(alone, abs=1e-4)


def test_token_batches_and_rows_longer_than_the_context(tok):
    rows = [([1] * n, 1, 1) for n in (5, 9, 3, 12, 2)]
    assert [len(b) for b in cloze.token_batches(rows, 20)] == [2, 1, 1, 1]  # 2 x 9, then 12 alone, ...
    model = GPT(GPTConfig(sequence_len=8, vocab_size=tok.vocab_size, n_layer=1, n_head=2, n_kv_head=2, n_embd=32))
    ids = list(range(3, 23))  # 20 tokens, 12 past the context: the left ones are dropped
    long, tail = cloze.option_logprobs(model, [(ids, 17, 3), (ids[12:], 5, 3)])
    assert long == pytest.approx(tail, abs=1e-5)


def test_scores_start_where_the_answers_part(tok):
    task = get_task("stoney_mc")
    ex = subset(task, "val", 1)[0]
    prompt_len = len(tok.render_prompt({"messages": cloze.question_only(task, ex)}))
    rows = cloze.scored_rows(tok, task, ex)
    shared = cloze.common_prefix(cloze.answer_texts(ex))
    for (ids, first, chars), text in zip(rows, cloze.answer_texts(ex)):
        assert tok.decode(ids[prompt_len:first]) == text[:len(text) - chars]  # the shared part, not scored
        assert len(text) - chars <= shared and first > prompt_len


def test_a_model_taught_the_facts_picks_them_and_an_untaught_one_does_not(tok):
    """A tiny model trained on 20 items' gold answers (the assistant turn after the question
    without options) picks those answers by cloze; the same model untrained is near chance."""
    task = get_task("stoney_mc")
    exs = subset(task, "train", 20)
    torch.manual_seed(0)
    model = GPT(GPTConfig(sequence_len=256, vocab_size=tok.vocab_size, n_layer=2, n_head=2, n_kv_head=2, n_embd=128))
    before = sum(cloze.cloze_correct(model, tok, task, exs))
    convs = []
    for ex in exs:
        gold = cloze.answer_texts(ex)[LETTERS.index(ex["answer"])]
        convs.append(tok.render_conversation({"messages": cloze.question_only(task, ex)
                                              + [{"role": "assistant", "content": gold}]}))
    T = max(len(ids) for ids, _ in convs)
    x = torch.zeros(len(convs), T, dtype=torch.long)
    y = torch.full((len(convs), T), -1, dtype=torch.long)
    for r, (ids, mask) in enumerate(convs):
        x[r, :len(ids)] = torch.tensor(ids)
        y[r, :len(ids) - 1] = torch.tensor([t if m else -1 for t, m in zip(ids[1:], mask[1:])])
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    for _ in range(150):
        loss = model(x, targets=y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    after = sum(cloze.cloze_correct(model, tok, task, exs))
    assert before <= 10 and after >= 18, (before, after)
