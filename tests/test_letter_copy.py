"""bench.letter_copy: the teacher-forced context stops right before the gold pick's letter in every
bundled multiple-choice task, and a tokenizer that cannot write a letter as one token is refused."""
import pytest

from bench import letter_copy
from nanostoney.answers import LETTERS
from nanostoney.errors import UserError
from nanostoney.gpt import GPT, GPTConfig
from nanostoney.tasks import get_task
from test_grpo import byte_tokenizer

MC = ("arith_mc", "stoney_mc", "aqua_mc", "gsm8k_mc", "stoney_mc_unseen")


@pytest.mark.parametrize("name", MC)
def test_the_context_ends_right_before_the_gold_letter(name):
    for ex in get_task(name).examples("val")[:50]:
        gold = ex["messages"][-1]["content"]
        context, before = letter_copy.letter_slot(ex)
        assert gold.startswith(context + before + ex["answer"] + "."), (ex["id"], context[-40:], gold[-60:])
        assert ex["answer"] in LETTERS


def test_a_byte_tokenizer_is_refused():
    tok = byte_tokenizer()
    model = GPT(GPTConfig(sequence_len=2048, vocab_size=tok.vocab_size, n_layer=1, n_head=2, n_kv_head=2, n_embd=32))
    model.init_weights()
    task = get_task("arith_mc")
    with pytest.raises(UserError, match="one token"):
        letter_copy.read_letters(model, tok, task, task.examples("val")[:1])


def test_only_multiple_choice_tasks_are_read():
    with pytest.raises(UserError, match="multiple-choice"):
        letter_copy.mc_task("arith")
    assert letter_copy.mc_task("stoney_mc") == "stoney_mc"
