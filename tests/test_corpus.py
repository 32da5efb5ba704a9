"""The pretraining corpus: every extraction fact is read, no control term or source is, no
held-out arith combination is; augmentation renders each fact K different ways; bad flags get
one sentence and exit 2."""
import argparse
import collections
import re
import types

import pytest
import torch

from nanostoney.answers import LETTERS
from nanostoney import corpus
from nanostoney.errors import UserError
from nanostoney.tasks import BUNDLED_TASKS as TASK_NAMES, get_task
from nanostoney.tasks.stoney_corpus import load_corpus
from nanostoney.tasks.subset import subset

HELD_OUT = ("val", "test")
CONTROL_PARTS = ("unseen_val", "unseen_test")


@pytest.fixture(scope="module")
def training_texts():
    """Every text a default run trains on: pretraining with every fact template (which is also
    the tokenizer's text, without the renderings), and the train split of every trainable task
    (SFT, reward-model pairs, GRPO prompts, STaR)."""
    texts = corpus.pretraining_texts(augment=len(corpus.FACT_TEMPLATES))
    for name in TASK_NAMES:
        task = get_task(name)
        if not task.control:
            for ex in task.examples("train"):
                texts.append(corpus.task_text(ex))
                texts += [t for t in (ex.get("option_rationales") or {}).values()]
                texts += ex.get("wrong_answers") or []
    return texts


def _word_index(texts):
    index = collections.defaultdict(set)
    for i, t in enumerate(texts):
        for w in re.findall(r"[^\W\d_]+", t.casefold()):
            index[w].add(i)
    return index


def test_the_unseen_control_shares_no_term_and_no_source_with_any_training_text(training_texts):
    """A control term is written nowhere in any training text, and none of the conversations it
    came from (nor any other control conversation) is one. This is what keeps stoney_*_unseen a
    null: a control that scores above chance means something leaked."""
    stoney = [t.casefold() for t in training_texts if re.search("[îâûṯẖ`]", t)]
    index = _word_index(stoney)
    lex = load_corpus()["lexicon"]
    controls = [p for part in CONTROL_PARTS for p in lex[part]]
    assert len(controls) > 250
    leaked = []
    for p in controls:
        words = re.findall(r"[^\W\d_]+", p["term_key"])
        candidates = set.intersection(*(index.get(w, set()) for w in words))
        pattern = re.compile(r"(?<!\w)" + re.escape(p["term_key"].rstrip("-")) + r"(?!\w)")
        leaked += [p["term"] for i in candidates if pattern.search(stoney[i])]
    assert leaked == []
    blob = "\n".join(training_texts)
    convs = load_corpus()["convs"]
    for part in CONTROL_PARTS:
        for c in convs[part]:
            assert c["user"] not in blob and c["assistant"] not in blob
    # and the control tasks' items are no task's training items
    control_ids = {s for n in TASK_NAMES if get_task(n).control for split in HELD_OUT
                   for ex in get_task(n).examples(split) for s in ex.get("source_ids", [ex["source_id"]])}
    train_ids = {s for n in TASK_NAMES if not get_task(n).control
                 for ex in get_task(n).examples("train") for s in ex.get("source_ids", [ex["source_id"]])}
    assert control_ids and not control_ids & train_ids


def test_every_extraction_fact_is_in_the_pretraining_text():
    """The held-out (val/test) Stoney questions ask about facts the base model read: their source
    conversations are pretraining documents, and with augmentation each fact is also stated."""
    texts = set(corpus.pretraining_texts())
    convs = load_corpus()["convs"]
    for part in ("train",) + HELD_OUT:
        for c in convs[part]:
            assert corpus.conversation_text(c) in texts
    blob = "\n".join(corpus.pretraining_texts(augment=2))
    for ex in get_task("stoney_mc").examples("val"):
        asked = re.search(r"`([^`]+)`", ex["messages"][0]["content"])  # s2e; e2s's term is its gold option
        term = asked.group(1) if asked else ex["choices"][LETTERS.index(ex["answer"])]
        assert f"`{term}`" in blob


def test_questions_in_the_pretraining_text_are_train_items_only():
    """Mixed training: the train split of arith_mc and stoney_mc is pretraining text; no val/test
    arith problem is, and no question asks about a held-out (val/test) Stoney term."""
    texts = set(corpus.pretraining_texts())
    blob = "\n".join(texts)
    for name in corpus.CORPUS_TASKS:
        assert all(corpus.task_text(ex) in texts for ex in get_task(name).examples("train"))
    for split in HELD_OUT:
        for ex in get_task("arith").examples(split):
            assert ex["messages"][0]["content"] not in blob
        for ex in get_task("stoney_mc").examples(split):
            a, b = ex["regions"]["question"]
            assert ex["messages"][0]["content"][a:b] not in blob


def test_augmentation_renders_each_fact_k_different_ways():
    pairs = corpus.extraction_pairs()
    k = 3
    pages = corpus.fact_pages(pairs, k)
    lines = [line for page in pages for line in page.split("\n")]
    assert len(lines) == k * len(pairs) and all(len(page.split("\n")) <= corpus.PAGE for page in pages)
    per_term = collections.defaultdict(set)
    for line in lines:
        per_term[re.search(r"`([^`]+)`", line).group(1)].add(line)
    assert all(len(v) == k for v in per_term.values() if v)  # k distinct sentences per fact
    assert corpus.fact_pages(pairs, 0) == []
    used = collections.Counter(corpus.FACT_TEMPLATES.index(t) for t in corpus.FACT_TEMPLATES)
    assert len(used) == len(corpus.FACT_TEMPLATES)
    assert corpus.pretraining_texts(1) == corpus.pretraining_texts(1)  # deterministic


def test_corpus_flags_are_checked():
    for bad, says in (("999", "0 .no fact renderings. to 64"), ("-1", "integer >= 0")):
        with pytest.raises(argparse.ArgumentTypeError, match=says):
            corpus.augment_count(bad)
    for bad, says in (("gsm8k,nope", "unknown task 'nope'"), ("stoney_mc_unseen", "control"), (" , ", "names no task")):
        with pytest.raises(argparse.ArgumentTypeError, match=says):
            corpus.task_list(bad)
    assert corpus.task_list(" gsm8k, aqua_mc ") == ["gsm8k", "aqua_mc"]
    assert "hf://" not in " ".join(corpus.pretraining_sources())
    assert "generated://nanostoney/arith" in corpus.pretraining_sources()


def test_knowledge_probe_scores_the_gold_letter_and_the_gold_statement():
    """bench.knowledge_probe: the letter context stops right before the gold letter, and the
    option statements differ only in the option (the gold one states the item's own fact)."""
    from bench import knowledge_probe as kp
    for name in kp.TASKS:
        task = get_task(name)
        for ex in subset(task, "val", 10):
            context, with_letter = kp.letter_context(ex)
            choice = ex["choices"][LETTERS.index(ex["answer"])]
            assert context.endswith(f" {choice}") and with_letter == f"{context} {ex['answer']}"
            texts = kp.option_texts(task, ex)
            prefixes = {t[:start] for t, start in texts}
            assert len(texts) == 5 and len(prefixes) == 1
            gold = texts["ABCDE".index(ex["answer"])][0]
            assert ex["choices"]["ABCDE".index(ex["answer"])] in gold[texts[0][1]:]


def test_the_default_corpus_passes_the_gate_as_base_train_names_it():
    """base_train gates its sources through sources.gate_name, which must leave generated:// alone
    (it once became hf://generated://..., refused: the default run could not start)."""
    from nanostoney.governance import check_sources
    from nanostoney.sources import gate_name
    names = [gate_name(s) for s in corpus.pretraining_sources()]
    assert "generated://nanostoney/arith" in names and not [n for n in names if n.startswith("hf://generated")]
    check_sources(names, use="training")


class _RuleModel(torch.nn.Module):
    """Logits from a rule, for the probe: "copy" predicts the token that followed the last earlier
    occurrence of the current token; "bag" spreads its mass over every token seen so far."""
    def __init__(self, rule, vocab_size):
        super().__init__()
        self.rule, self.vocab_size = rule, vocab_size

    def get_device(self):
        return torch.device("cpu")

    def forward(self, idx):
        logits = torch.zeros(*idx.shape, self.vocab_size)
        for b, row in enumerate(idx.tolist()):
            for t in range(len(row)):
                if self.rule == "bag":
                    logits[b, t, row[:t + 1]] = 10.0
                else:
                    nxt = [row[j + 1] for j in range(t) if row[j] == row[t]]
                    if nxt:
                        logits[b, t, nxt[-1]] = 10.0
        return logits


def test_order_gain_tells_copying_from_raising_the_context():
    """Both rule models gain on the second copy; only the copier gains more in order than shuffled
    (the bag model's order gain is not positive: shuffling hides no token from it)."""
    from nanostoney.interp.attention import induction_gain, order_gain
    tok = types.SimpleNamespace(vocab_size=600, special_tokens=["<|bos|>"] * 9, bos_id=591)
    copier, bag = (_RuleModel(r, tok.vocab_size) for r in ("copy", "bag"))
    assert induction_gain(copier, tok) > 5 and induction_gain(bag, tok) > 1
    assert order_gain(copier, tok) > 5
    assert order_gain(bag, tok) <= 0.01


def test_order_gain_by_head_names_the_head_it_zeroes():
    """Every output projection zero but head 2 of layer 1: zeroing any other head loses nothing,
    zeroing that one loses what it adds (a layer or head mix-up would name another)."""
    from nanostoney.gpt import GPT, GPTConfig
    from nanostoney.interp.attention import order_gain_by_head
    torch.manual_seed(0)
    model = GPT(GPTConfig(sequence_len=64, vocab_size=600, n_layer=2, n_head=4, n_kv_head=4, n_embd=64))
    model.init_weights()  # zero output projections: no block writes to the residual stream
    with torch.no_grad():
        model.lm_head.weight.normal_(0, 0.1)
        model.transformer.h[1].attn.c_proj.weight[:, 2 * 16:3 * 16].normal_(0, 0.5)
    tok = types.SimpleNamespace(vocab_size=600, special_tokens=["<|bos|>"] * 9, bos_id=591)
    lost = order_gain_by_head(model.eval(), tok)
    assert lost.shape == (2, 4) and abs(lost[1, 2]) > 1e-4
    lost[1, 2] = 0
    assert abs(lost).max() < 1e-5
