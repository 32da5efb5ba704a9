"""Tasks: disjoint splits, no leakage into training corpora, balanced letters, verifiers that
accept the gold and reject a distractor, and surface-cue baselines near chance. (What the
pretraining corpus may and may not hold is tests/test_corpus.py.)"""
import collections
import hashlib
import json
import os
import re
import subprocess
import sys

import pytest

from nanostoney.answers import LETTERS, answer_after, answer_part, parse_letter, parse_number
from nanostoney.errors import UserError
from nanostoney.metrics import sentence_chrf
from nanostoney.tasks import BUNDLED_TASKS as TASK_NAMES, get_task
from nanostoney.tasks.base import SPLITS, baselines, normalize
from nanostoney.tasks.stoney_corpus import GROUP_PARTS, Lang, _conversations, extract_pairs, load_corpus
from nanostoney.tasks.subset import subset

MC_TASKS = [n for n in TASK_NAMES if get_task(n).kind == "mc"]
HELD_OUT = ("val", "test")
TRAINABLE = [n for n in TASK_NAMES if not get_task(n).control]


def splits_of(task):
    return HELD_OUT if task.control else SPLITS


def _sources(ex):
    return set(ex.get("source_ids") or [ex["source_id"]])


def _user(ex):
    return next(m["content"] for m in ex["messages"] if m["role"] == "user")


@pytest.mark.parametrize("name", TASK_NAMES)
def test_examples_follow_the_contract(name):
    task = get_task(name)
    assert task.family in ("stoney", "math") and task.kind in ("mc", "open", "numeric")
    if task.control:
        with pytest.raises(UserError, match="control"):
            task.examples("train")
    for split in splits_of(task):
        exs = task.examples(split)
        assert exs and exs is task.examples(split)  # built once, cached
        assert len({e["id"] for e in exs}) == len(exs)
        for ex in exs[:50]:
            msgs = ex["messages"]
            assert msgs[-1]["role"] == "assistant" and msgs[-2]["role"] == "user"
            assert task.prompt(ex) == msgs[:-1]
            if task.kind != "open" or "lexicon" in name:
                assert re.fullmatch(r"<think>.+</think>\nAnswer: .+", msgs[-1]["content"], re.S)
                assert answer_after(msgs[-1]["content"]) == ex["answer"]
            # regions are spans of the rendered user text (system prepended, as the tokenizer does)
            rendered = (msgs[0]["content"] + "\n\n" if msgs[0]["role"] == "system" else "") + msgs[-2]["content"]
            a, b = ex["regions"]["question"]
            assert 0 <= a < b <= len(rendered) and rendered[a:b].strip() == rendered[a:b]
            if task.kind == "mc":
                assert len(ex["choices"]) == 5 and ex["answer"] in LETTERS
                for letter, choice in zip(LETTERS, ex["choices"]):
                    s, e = ex["regions"][f"option_{letter}"]
                    assert rendered[s:e] == f"- {choice} {letter}"  # the letter right after its text
                assert len({normalize(c) for c in ex["choices"]}) == 5, ex["choices"]


DIGEST = """
import hashlib, json, sys
if "--no-datasets" in sys.argv:
    sys.modules["datasets"] = None  # the plain JSON-lines reader, as on a machine without datasets
from nanostoney.tasks import get_task
h = hashlib.sha1()
for name in ("stoney_mc", "stoney_qa", "gsm8k_mc", "aqua_mc", "arith_mc", "stoney_mc_unseen"):
    for split in ("train", "val", "test"):
        for ex in get_task(name).splits()[split]:
            h.update(json.dumps([ex["id"], ex["messages"], ex["answer"]], sort_keys=True).encode())
print(h.hexdigest())
"""


def test_splits_and_examples_are_deterministic():
    """Same examples in another process with another hash seed, read without `datasets`."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = dict(os.environ, PYTHONHASHSEED="12345", PYTHONPATH=root)
    out = subprocess.run([sys.executable, "-c", DIGEST, "--no-datasets"], capture_output=True, text=True, env=env)
    assert out.returncode == 0, out.stderr
    h = hashlib.sha1()
    for name in ("stoney_mc", "stoney_qa", "gsm8k_mc", "aqua_mc", "arith_mc", "stoney_mc_unseen"):
        for split in SPLITS:
            for ex in get_task(name).splits()[split]:
                h.update(json.dumps([ex["id"], ex["messages"], ex["answer"]], sort_keys=True).encode())
    assert out.stdout.strip() == h.hexdigest()


@pytest.mark.parametrize("name", TASK_NAMES)
def test_splits_are_disjoint_by_source_and_prompt(name):
    task = get_task(name)
    srcs = {s: set().union(*(_sources(e) for e in task.splits()[s])) for s in SPLITS}
    prompts = {s: {_user(e) for e in task.splits()[s]} for s in SPLITS}
    for a, b in (("train", "val"), ("train", "test"), ("val", "test")):
        assert not srcs[a] & srcs[b], (name, a, b)
        assert not prompts[a] & prompts[b], (name, a, b)


def _question(ex):
    a, b = ex["regions"]["question"]
    msgs = ex["messages"]
    shown = (msgs[0]["content"] + "\n\n" if msgs[0]["role"] == "system" else "") + msgs[-2]["content"]
    return shown[a:b]


def test_no_held_out_item_or_source_in_any_task_train_split():
    """SFT, reward-model pairs and GRPO draw from train splits: no val/test item, question or
    source of any task is in one (the pretraining text is tests/test_corpus.py's)."""
    train_srcs, train_questions, train_prompts = set(), set(), set()
    for name in TRAINABLE:
        for ex in get_task(name).examples("train"):
            train_srcs |= _sources(ex)
            train_questions.add(_question(ex))
            train_prompts.add(_user(ex))
    for name in TASK_NAMES:
        for split in HELD_OUT:
            for ex in get_task(name).examples(split):
                assert not _sources(ex) & train_srcs, (name, split, ex["id"])
                assert _question(ex) not in train_questions, (name, split, ex["id"])
                assert _user(ex) not in train_prompts, (name, split, ex["id"])


def test_stoney_groups_split_into_extraction_and_control_parts():
    corpus = load_corpus()
    parts = [p for p, _ in GROUP_PARTS]
    ids = {p: {c["source_id"] for c in corpus["convs"][p]} for p in parts}
    assert sum(map(len, ids.values())) == len(set().union(*ids.values())) == 2000
    for p, share in GROUP_PARTS:  # every part near its share of the 2000 conversations
        assert abs(len(ids[p]) / 2000 - share) < 0.05, (p, len(ids[p]))
    # a control item's sources, terms and glosses belong to no extraction pair
    extraction = [q for p in SPLITS for q in corpus["lexicon"][p]]
    terms = {q["term_key"] for q in extraction}
    glosses = {g for q in extraction for g in q["gloss_keys"]}
    for p in ("unseen_val", "unseen_test"):
        for q in corpus["lexicon"][p]:
            assert q["term_key"] not in terms and not set(q["gloss_keys"]) & glosses
            assert set(q["sources"]) <= ids[p]


@pytest.mark.parametrize("name", ["stoney_mc", "gsm8k_mc", "aqua_mc", "arith_mc", "stoney_mc_unseen"])
def test_letters_are_balanced(name):
    task = get_task(name)
    for split in splits_of(task):
        counts = collections.Counter(e["answer"] for e in task.examples(split))
        assert set(counts) == set(LETTERS)
        assert max(counts.values()) - min(counts.values()) <= 1, (split, counts)


@pytest.mark.parametrize("name", ["stoney_mc", "gsm8k_mc", "arith_mc", "stoney_mc_unseen"])
def test_surface_cue_baselines_stay_near_chance(name):
    task = get_task(name)
    for split in splits_of(task):
        exs = task.examples(split)
        tol = 0.04 if len(exs) > 1000 else 0.06
        for cue, acc in baselines(exs).items():
            # what the cue is worth used either way: following it, or avoiding its pick (a picker
            # below chance, e.g. arith_mc's shortest chain, which is a stopped-early distractor
            # more often than the gold, is worth (1 - acc) / 4 to one who avoids it)
            assert max(acc, (1 - acc) / 4) <= 0.2 + tol, (name, split, cue, acc)


def test_gsm8k_mc_options_are_sorted_plausible_numbers():
    for ex in get_task("gsm8k_mc").examples("val"):
        nums = [parse_number(c) for c in ex["choices"]]
        assert nums == sorted(nums)
        gold = nums[LETTERS.index(ex["answer"])]
        if gold > 0:
            assert all(0 < n and max(n / gold, gold / n) <= 10 for n in nums)
        if gold == int(gold):
            assert all(n == int(n) for n in nums)


@pytest.mark.parametrize("name", TASK_NAMES)
def test_verifiers_accept_gold_and_reject_a_distractor(name):
    task = get_task(name)
    for ex in subset(task, "val", 100):
        gold = ex["messages"][-1]["content"]
        assert task.evaluate(ex, gold) and task.reward(ex, gold) == 1.0
        if task.kind == "mc":
            wrong = next(L for L in LETTERS if L != ex["answer"])
            bad = f"<think>...</think>\nAnswer: {wrong}"
            assert not task.evaluate(ex, bad) and task.reward(ex, bad) == 0.0
            assert task.evaluate(ex, f"Answer: ({ex['answer']}) {ex['choices'][LETTERS.index(ex['answer'])]}")
        elif task.kind == "numeric":
            bad = f"Answer: {float(ex['answer']) + 1:g}"
            assert not task.evaluate(ex, bad)
            assert task.evaluate(ex, f"<think>x</think>\nAnswer: ${float(ex['answer']):,.2f}")
        elif "verb" in name:  # yes / no, the word itself
            flip = {"yes": "no", "no": "yes"}[ex["answer"]]
            assert not task.evaluate(ex, f"<think>x</think>\nAnswer: {flip}") and task.evaluate(ex, f"Answer: {ex['answer'].title()}.")
            assert not task.evaluate(ex, "Answer: A")
        elif "lexicon" in name:
            other = next(e for e in task.examples("val") if normalize(e["answer"]) not in
                         {normalize(a) for a in ex["aliases"] + [ex["answer"]]})
            assert not task.evaluate(ex, f"Answer: {other['answer']}")
        else:  # stoney_qa: chrF against the reference
            other = next(e for e in task.examples("val") if e["id"] != ex["id"])
            assert not task.evaluate(ex, other["answer"]) and task.reward(ex, other["answer"]) < 0.5
        assert not task.evaluate(ex, "") and task.reward(ex, "") == 0.0
        assert 0.0 <= task.reward(ex, "Answer: garbage") <= 1.0


def test_lexicon_match_keeps_diacritics_and_ignores_case():
    task = get_task("stoney_lexicon")
    ex = next(e for e in task.examples("train") if e["direction"] == "e2s" and "â" in e["answer"])
    assert task.evaluate(ex, f"Answer: `{ex['answer'].upper()}`.")
    assert not task.evaluate(ex, "Answer: " + ex["answer"].replace("â", "a"))  # â is not a
    s2e = next(e for e in task.examples("train") if e["direction"] == "s2e" and e["answer"].startswith("to "))
    assert task.evaluate(s2e, "Answer: " + s2e["answer"][3:].upper())  # "to" optional


def test_extract_answer_and_parsers():
    assert answer_after("<think>Answer: A?</think>\nAnswer: C") == "C"
    assert answer_after("no answer here") is None
    assert [parse_letter(x) for x in ("C", "(c)", "D) 600", "E.", "Both", "", None)] == \
        ["C", "C", "D", "E", None, None, None]
    assert parse_number("$1,080.50 dollars") == 1080.5 and parse_number("-3") == -3 and parse_number("none") is None
    assert answer_part("<think>x</think>\nAnswer: keya") == "keya" and answer_part("just text") == "just text"


def test_chrf_matches_sacrebleu():
    sacrebleu = pytest.importorskip("sacrebleu")
    pairs = [("the cat sat on the mat", "the cat is on the mat"), ("îyârhe", "îyârhe hîrhpa"),
             ("", "reference"), ("completely different", "nothing alike"), ("same", "same")]
    for hyp, ref in pairs:
        assert sentence_chrf(hyp, ref) == pytest.approx(sacrebleu.sentence_chrf(hyp, [ref]).score, abs=1e-6)
        assert sentence_chrf(hyp, ref, word_order=2) == pytest.approx(
            sacrebleu.sentence_chrf(hyp, [ref], word_order=2).score, abs=1e-6)


def test_extractor_on_hand_written_sentences():
    from nanostoney import sources
    lang = Lang(_conversations(*sources.bundled_rows("stoney", "all")))  # English/Stoney judged from the corpus

    def found(text):
        return {(t, g) for t, g, _ in extract_pairs(text, lang)}
    assert found("You would use `îbuṯẖach`. This stative verb means 'to be thirsty'.") == \
        {("îbuṯẖach", "to be thirsty")}
    assert found("`îthîya` is an \"alienable noun\" meaning \"sunset\".") == {("îthîya", "sunset")}
    assert found("Both 'to conceal something' (`anarhmân aiyach`) end in -ach.") == \
        {("anarhmân aiyach", "to conceal something")}
    assert found("The direct translation for 'aspen' is `warhtîja`.") == {("warhtîja", "aspen")}
    # hedges, parts of speech and another term's meaning are not glosses
    assert found("The element \"tûmnârhti\" is likely the Stoney word for \"bee\".") == set()
    assert found("`wîchasta` (alienable noun) is common.") == set()
    assert found("changing the element for 'over' (like 'iyabi') to one meaning 'under'") == set()


def test_lexicon_size_and_mc_derivation():
    corpus = load_corpus()
    pairs = [p for s, _ in GROUP_PARTS for p in corpus["lexicon"][s]]
    assert len(pairs) > 1500
    assert len({p["term_key"] for p in pairs}) == len(pairs)  # a term maps to one gloss
    lex, mc = get_task("stoney_lexicon"), get_task("stoney_mc")
    control = {"val": "unseen_val", "test": "unseen_test"}
    for split in SPLITS:
        assert len(mc.examples(split)) >= 0.95 * len(lex.examples(split))
        pool = {normalize(x) for p in corpus["lexicon"][split] for x in (p["term"], p["gloss"])}
        for ex in mc.examples(split):  # options come from the same split's pairs only
            assert all(normalize(c) in pool for c in ex["choices"]), ex["id"]
    for split, part in control.items():  # control options come from the control pool only
        pool = {normalize(x) for p in corpus["lexicon"][part] for x in (p["term"], p["gloss"])}
        for ex in get_task("stoney_mc_unseen").examples(split):
            assert all(normalize(c) in pool for c in ex["choices"]), ex["id"]


def test_stoney_verb_is_balanced_so_spelling_and_yes_are_at_chance():
    """The two-step task: as many verbs as non-verbs within every term ending (Stoney verbs
    mostly end in -ch), so neither "always yes" nor "answer by the ending" beats 50%."""
    for name in ("stoney_verb", "stoney_verb_unseen"):
        task = get_task(name)
        for split in splits_of(task):
            exs = task.examples(split)
            by_end = collections.defaultdict(collections.Counter)
            for ex in exs:
                term = re.search(r"`(.+?)`", _user(ex)).group(1)
                by_end[normalize(term)[-2:]][ex["answer"]] += 1
                assert ("so a verb" in ex["messages"][-1]["content"]) == (ex["answer"] == "yes")
            assert all(c["yes"] == c["no"] for c in by_end.values()), (name, split)
            assert len(exs) >= 40


def test_held_out_stoney_questions_need_their_question():
    """A held-out Stoney item is no verbatim completion of a pretraining sentence: its question
    is in no pretraining text, and no option's worked answer (what cloze scores) restates the
    question's term or gloss, so the answer alone cannot be checked against a remembered
    sentence; swapping in another item's question changes what is asked."""
    from nanostoney import cloze, corpus
    texts = corpus.pretraining_texts(augment=len(corpus.FACT_TEMPLATES))
    joined = "\n".join(texts)
    for name in ("stoney_mc", "stoney_lexicon", "stoney_verb"):
        task = get_task(name)
        for ex in subset(task, "val", 60):
            question = _user(ex)[slice(*ex["regions"]["question"])]
            assert question not in joined, (name, question)
            if task.kind == "mc":
                asked = re.search(r"[`'](.+?)[`']", question).group(1)
                assert all(asked not in t for t in cloze.answer_texts(ex)), ex["id"]


def test_blind_baseline_inputs_swap_or_drop_the_question_only():
    """scripts.eval's question-blind baselines: every item gets another item's question (same
    direction) or none, keeping its own options, worked answers and gold."""
    from nanostoney.tasks.base import with_other_question, without_question
    exs = subset(get_task("stoney_mc"), "val", 40)
    swapped = with_other_question(exs)
    assert [e["answer"] for e in swapped] == [e["answer"] for e in exs]
    for ex, sw in zip(exs, swapped):
        assert _user(sw) != _user(ex) and sw["choices"] == ex["choices"]
        assert sw["messages"][-1] == ex["messages"][-1] and sw["option_rationales"] == ex["option_rationales"]
        other = next(e for e in exs if _user(e) == _user(sw))
        assert other["direction"] == ex["direction"]
    assert sorted(_user(e) for e in swapped) == sorted(_user(e) for e in exs)   # a permutation of the questions
    assert all(_user(e) == "" for e in without_question(exs))
