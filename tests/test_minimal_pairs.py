"""Minimal pairs on real task items: the operands a chain copies, and term swaps, each a pair of
prompts of one length that differ in a few tokens, read at the right slot."""
import pytest

from nanostoney.interp import pairs as minimal_pairs
from nanostoney.tasks import get_task
from nanostoney.tokenizer import Tokenizer


def test_copied_operands_are_the_numbers_the_chain_takes_from_the_question():
    q = "Mia has 7 shells. Mia finds 5 more shells. Then Mia gives away half of the shells. How many?"
    chain = "<think>7 + 5 = 12\n12 / 2 = 6</think>\nAnswer: 6"
    got = minimal_pairs.copied_operands(q, chain)
    assert got == [(chain.index("7"), "7"), (chain.index("5"), "5")]  # 12 was computed, 2 is "half"
    wordy = "<think>First, 7 + 5 = 12. Then she halves it: 12 / 2 = 6</think>"
    assert [n for _, n in minimal_pairs.copied_operands(q, wordy)] == ["7", "5"]
    assert minimal_pairs.copied_operands("She has 17 cups.", "<think>7 + 1 = 8</think>") == []


@pytest.fixture(scope="module")
def setup():
    arith, lex = get_task("arith"), get_task("stoney_lexicon")
    ariths = arith.examples("val")[:12]
    lexes = [ex for ex in lex.examples("val") if ex["direction"] == "s2e"][:40]
    texts = [m["content"] for ex in ariths + lexes for m in ex["messages"]]
    return arith, lex, ariths, lexes, Tokenizer.train(texts * 3, 600)


def check(tok, pair):
    assert len(pair.clean) == len(pair.corrupt) and pair.target != pair.foil
    diff = [i for i, (a, b) in enumerate(zip(pair.clean, pair.corrupt)) if a != b]
    assert diff and diff[0] == pair.pos and len(diff) <= minimal_pairs.MAX_CHANGED
    assert pair.clean[-1] == pair.corrupt[-1]  # the assistant text is the same in both runs


def test_operand_pairs_on_arith(setup):
    arith, _, ariths, _, tok = setup
    pairs = [p for ex in ariths for p in minimal_pairs.operand_pairs(
        tok, arith, ex, ex["messages"][-1]["content"], True, 512)]
    assert len(pairs) >= len(ariths)  # every chain copies at least its start value
    for p in pairs:
        check(tok, p)
        assert p.slot == "operand" and p.family == "math"
        clean = tok.decode(p.clean + [p.target])
        assert clean.split("<|assistant_start|>")[-1].rstrip()[-1].isdigit()  # the slot writes a number
        assert tok.decode([p.target]).strip()[:1] != tok.decode([p.foil]).strip()[:1] or \
            tok.decode([p.target]) != tok.decode([p.foil])


def test_term_pairs_on_stoney(setup):
    _, lex, _, lexes, tok = setup
    rows = [(ex, ex["messages"][-1]["content"], None) for ex in lexes]
    pairs = minimal_pairs.term_pairs(tok, lex, rows, 512)
    assert len(pairs) >= 5
    for p in pairs:
        check(tok, p)
        assert p.slot == "answer" and p.direction == "s2e"
        assert tok.decode(p.clean).rstrip().endswith("Answer:")
