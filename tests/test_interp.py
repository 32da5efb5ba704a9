"""interp: scores checked on planted ground truth (hand-set weights and hand-made patterns), and
the answer position / region labels checked on a small tokenizer."""
import itertools
import math

import numpy as np
import pytest
import torch

from nanostoney import probes
from nanostoney.gpt import GPT, GPTConfig
from nanostoney.interp import ablation, attention, contexts, definitions, items, patching, run, stats
from nanostoney.metrics import bootstrap_ci
from nanostoney.tasks.base import MCTask, mc_example
from nanostoney.tasks.stoney_corpus import STONEY_LETTERS
from nanostoney.tokenizer import Tokenizer

BOS = 0


def planted_model():
    """Layer 0: head 0 is a previous-token head (rotary: q is k turned by one position, in the
    three fastest channel pairs), head 1 an attention sink (a slow channel where the key is +u on
    <|bos|> and -u elsewhere, the query always +u). Layer 1: zero queries, so uniform attention."""
    cfg = GPTConfig(sequence_len=64, vocab_size=40, n_layer=2, n_head=2, n_kv_head=2, n_embd=128)
    model = GPT(cfg)
    model.init_weights()
    d, half = 64, 32
    with torch.no_grad():
        wte = model.transformer.wte.weight
        wte.zero_()
        wte[:, 0] = -1.0
        wte[BOS, 0] = 1.0   # channel 0: is this <|bos|>?
        wte[:, 1] = 1.0     # channel 1: constant
        for block in model.transformer.h:
            block.attn.c_q.weight.zero_()
            block.attn.c_k.weight.zero_()
        a0 = model.transformer.h[0].attn
        for c in range(3):
            theta = 10000 ** (-2 * c / d)
            a0.c_q.weight[c, 1] = math.cos(theta)
            a0.c_q.weight[half + c, 1] = math.sin(theta)
            a0.c_k.weight[c, 1] = 1.0
        a0.c_q.weight[d + half - 1, 1] = 1.0   # head 1, slowest channel pair
        a0.c_k.weight[d + half - 1, 0] = 1.0
    return model.eval()


def random_prompts(n=4, T=32, vocab=40, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(1, vocab, (n, T), generator=g)
    x[:, 0] = BOS
    return x


def fake_item(ids, target=3):
    T = len(ids)
    return items.Item(task="t", family="math", split="val", id="x", ids=list(ids), target=target,
                       struct=np.zeros(T, dtype=int), lexical=np.zeros(T, dtype=int))


def test_planted_heads_are_classified():
    model = planted_model()
    recs = [attention.analyse_item(model, fake_item(x.tolist()))[0] for x in random_prompts()]
    prev, sink = (np.mean([r[k] for r in recs], 0) for k in ("previous_token", "sink"))  # [L, H]
    assert prev[0, 0] > 0.7 and sink[0, 1] > 0.95
    ind = attention.induction_scores(model, 40, n_seqs=4, n_rep=12, bos_id=BOS)["induction"].mean(0)
    roles = attention.classify_heads({"previous_token": prev, "sink": sink, "induction": ind})
    assert roles["previous_token"] == [(0, 0)]
    assert roles["sink"] == [(0, 1)]
    assert roles["induction"] == []


def test_scores_on_hand_made_patterns():
    T, n = 9, 4  # bos + R (4) + R (4)
    prev = torch.zeros(T, T)
    prev[0, 0] = 1
    prev[torch.arange(1, T), torch.arange(T - 1)] = 1
    ind = torch.eye(T)
    for j in range(n):
        ind[1 + n + j] = 0
        ind[1 + n + j, 2 + j] = 1
    assert attention.previous_token_score(prev) == 1.0
    assert attention.induction_score(prev, n) == 0.0
    assert attention.induction_score(ind, n) == 1.0
    assert attention.sink_score(prev) == pytest.approx(1 / (T - 1))
    assert attention.normalized_entropy(prev) == 0.0
    rows = torch.tensor([[0.5, 0.25, 0.25, 0.0]])
    assert torch.allclose(attention.region_mass(rows, torch.tensor([0, 1, 1, -1]), 2), torch.tensor([[0.5, 0.5]]))


def test_uniform_attention_has_entropy_log_n():
    for n in (1, 2, 7, 50):
        assert attention.pattern_entropy(torch.full((n,), 1.0 / n)).item() == pytest.approx(math.log(n), abs=1e-5)
    model = planted_model()
    with torch.no_grad():
        for block in model.transformer.h:
            block.attn.c_q.weight.zero_()   # every score 0: uniform over the visible keys
    T = 20
    rec, _, _ = attention.analyse_item(model, fake_item(random_prompts(1, T)[0].tolist()))
    assert np.allclose(rec["entropy_answer"], math.log(T), atol=1e-5)
    assert np.allclose(rec["entropy"], np.log(np.arange(1, T + 1)).mean(), atol=1e-4)
    assert np.allclose(rec["entropy_norm"], 1.0, atol=1e-4) and np.allclose(rec["entropy_answer_norm"], 1.0, atol=1e-4)


def random_model(seed=0):
    torch.manual_seed(seed)
    model = GPT(GPTConfig(sequence_len=32, vocab_size=61, n_layer=2, n_head=4, n_kv_head=4, n_embd=64))
    model.init_weights()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "c_proj" in name or "lm_head" in name:
                p.normal_(0, 0.1)
    return model.eval()


def test_ablating_a_head_with_zero_output_projection_changes_nothing():
    model = random_model()
    with torch.no_grad():
        model.transformer.h[1].attn.c_proj.weight[:, 2 * 16:3 * 16] = 0  # layer 1, head 2
    item = fake_item(torch.randint(0, 61, (12,)).tolist(), target=7)
    means = torch.randn(2, 4, 16)
    for mean in (None, means):
        drops = ablation.ablation_drops(model, item, mean)
        assert drops.shape == (2, 4)
        assert drops[1, 2] == 0.0
        assert np.abs(drops).max() > 1e-4
    # the batched per-row ablation (which reuses the clean stream before the first ablated
    # layer) equals a full forward under probes.ablate: one head, mean mode, and a set of heads
    x = torch.tensor([item.ids])

    def full_drop(**kw):
        with torch.no_grad():
            base = torch.log_softmax(model(x)[0, -1], -1)[7]
            with probes.ablate(model, **kw):
                return (base - torch.log_softmax(model(x)[0, -1], -1)[7]).item()

    assert ablation.ablation_drops(model, item)[0, 1] == pytest.approx(full_drop(heads=[(0, 1)]), abs=1e-5)
    assert ablation.ablation_drops(model, item, means)[1, 3] == pytest.approx(
        full_drop(heads=[(1, 3)], mean=means), abs=1e-5)
    rows = [(probes.head_set_scale(2, 4, [(0, 2), (1, 0)]), False), (torch.ones(2, 4), False)]
    d = ablation.ablation_logprob_drops(model, item.ids, 7, rows, means)
    assert d[0].item() == pytest.approx(full_drop(heads=[(0, 2), (1, 0)]), abs=1e-5) and d[1] == 0
    assert not model.probes


def test_blocks_from_continues_the_trunk():
    model = random_model(2)
    x = torch.randint(0, 61, (2, 9))
    with torch.no_grad(), probes.residuals(model) as res:
        out = model.trunk(x)
        for layer in range(3):
            assert torch.allclose(patching.blocks_from(model, res.resid[layer], layer), out, atol=1e-6)


def test_logit_lens_at_the_last_layer_is_the_output():
    model = random_model(1)
    ids = torch.randint(0, 61, (10,)).tolist()
    rec, _, _ = attention.analyse_item(model, fake_item(ids, target=5))
    with torch.no_grad():
        logp = torch.log_softmax(model(torch.tensor([ids]))[0, -1], -1)
    assert rec["lens_logprob"].shape == (3,)
    assert rec["lens_logprob"][-1] == pytest.approx(logp[5].item(), abs=1e-5)
    assert rec["answer_logprob"] == pytest.approx(logp[5].item(), abs=1e-5)
    assert rec["lens_top1"][-1] == float(logp.argmax() == 5)
    assert abs(rec["lens_logprob"][0] - rec["lens_logprob"][-1]) > 1e-4


def test_bootstrap_matches_metrics_and_skips_nan():
    rng = np.random.default_rng(3)
    v = rng.normal(size=25)
    b = stats.interval(v, n_boot=300, seed=4)
    point, lo, hi = bootstrap_ci(v, n_boot=300, seed=4)
    assert (b["mean"], b["lo"], b["hi"]) == pytest.approx((point, lo, hi), abs=1e-6)
    m = stats.interval(np.stack([v, np.full(25, np.nan)], 1), n_boot=300, seed=4)
    assert m["mean"][0] == pytest.approx(point, abs=1e-6) and m["mean"][1] is None or math.isnan(m["mean"][1])
    a = stats.interval(rng.normal(size=(30, 2, 3)), n_boot=100)
    assert np.shape(a["lo"]) == (2, 3) and (np.array(a["lo"]) <= np.array(a["mean"])).all()


# -----------------------------------------------------------------------------
# items: answer position and labels

class FakeTask(MCTask):
    def __init__(self, name, family):
        super().__init__()
        self.name, self.family = name, family

    def _build(self):
        return {}

    def sources(self):
        return []


STONEY = mc_example("s1", "src1", "Which Stoney Nakoda term means 'cloud'?",
                    ["châmnî", "gamubi", "snasnan", "wîchanâ", "nohâṯẖi"], "E",
                    "'cloud' in Stoney Nakoda is nohâṯẖi E.")
MATH = mc_example("m1", "src2", "Natalia sold 48 clips in April and half as many in May. How many in all?",
                  ["72", "94", "98", "144", "216"], "A", "48/2 = 24 and 48+24 = 72 A.")


@pytest.fixture(scope="module")
def tok():
    texts = [m["content"] for ex in (STONEY, MATH) for m in ex["messages"]] * 30
    return Tokenizer.train(texts, 390)


def gold(ex):
    return ex["messages"][-1]["content"]


def judge(word):
    return "s" if STONEY_LETTERS & set(word) or word in {"gamubi", "snasnan"} else "e"


def joined(item, mask):
    return "".join(t for t, m in zip(item.tokens, mask) if m).replace("↵", "\n")


def test_answer_position_and_regions(tok):
    item = items.prepare_item(tok, FakeTask("fake_mc", "stoney"), STONEY, "train", judge, gold(STONEY))
    assert item.group == "train" and item.ids[0] == tok.bos_id
    assert tok.decode(item.ids).endswith("Answer:") or tok.decode(item.ids).endswith("Answer: ")
    assert tok.decode(item.ids + [item.target]).endswith("Answer: E")
    assert item.ids[:len(tok.render_prompt(STONEY["messages"]))] == tok.render_prompt(STONEY["messages"])
    R = definitions.STRUCT_REGIONS
    assert item.struct[0] == R.index("bos") and item.struct[1] == R.index("template")
    assert joined(item, item.struct == R.index("question")).strip() == "Which Stoney Nakoda term means 'cloud'?"
    assert joined(item, item.option == 4).strip() == "- nohâṯẖi E"
    assert joined(item, item.struct == R.index("rationale")).startswith("<think>'cloud'")
    assert joined(item, item.struct == R.index("answer_cue")).strip() == "Answer:"
    assert item.answer_index == 4
    if item.letter_ids is not None:
        assert item.letter_ids[4] == item.target and len(set(item.letter_ids)) == 5
    L = definitions.LEXICAL_REGIONS
    stoney_text = joined(item, item.lexical == L.index("stoney_term"))
    for w in ("châmnî", "gamubi", "snasnan", "nohâṯẖi"):
        assert w in stoney_text
    assert "cloud" in joined(item, item.lexical == L.index("english"))
    assert "cloud" not in stoney_text


def test_math_labels(tok):
    item = items.prepare_item(tok, FakeTask("fake_math", "math"), MATH, "val", judge, gold(MATH))
    assert item.group == "heldout"
    L = definitions.LEXICAL_REGIONS
    digits = joined(item, item.lexical == L.index("digit"))
    assert "48" in digits and "144" in digits and "Natalia" not in digits
    assert "+" in joined(item, item.lexical == L.index("operator"))
    assert "=" in joined(item, item.lexical == L.index("operator"))
    assert (item.lexical == L.index("stoney_term")).sum() == 0
    assert tok.decode(item.ids + [item.target]).endswith("Answer: A")


def test_context_cuts_the_answer_sentence(tok):
    """The gold rationale of both examples is one answer sentence: nothing of it is left."""
    for ex, letter in ((STONEY, "E"), (MATH, "A")):
        for context in definitions.RATIONALE_CONTEXTS:
            text = contexts.context_text(ex, gold(ex), context)
            assert text == f"<think></think>\nAnswer: {letter}"
            item = items.prepare_item(tok, FakeTask("fake", "stoney"), ex, "val", judge, text)
            read = tok.decode(item.ids + [item.target])
            assert read.endswith(f"<|assistant_start|><think></think>\nAnswer: {letter}")
    # steps before the sentence that states the answer stay; the model's own answer is cut as well
    own = "<think>48/2 = 24.\nThen 24 + 48 = 72, so (A).</think>\nAnswer: A"
    assert contexts.context_text(MATH, own) == "<think>48/2 = 24.</think>\nAnswer: A"
    wrong = "<think>48/2 = 24.\nHalf again is 12.\nSo 48+24+12 = 144.\nThe answer is 144.</think>\nAnswer: D"
    assert contexts.context_text(MATH, wrong) == "<think>48/2 = 24.\nHalf again is 12.</think>\nAnswer: A"
    assert contexts.context_text(MATH, wrong, "gold") == "<think></think>\nAnswer: A"


def test_run_checkpoint_on_a_tiny_model(tok):
    torch.manual_seed(0)
    model = GPT(GPTConfig(sequence_len=256, vocab_size=tok.vocab_size, n_layer=2, n_head=2, n_kv_head=2, n_embd=32))
    model.init_weights()
    examples = {"fake_mc": (FakeTask("fake_mc", "stoney"), {"train": [STONEY], "val": [STONEY]}),
                "fake_math": (FakeTask("fake_math", "math"), {"train": [MATH], "test": [MATH]})}
    out, recs = run.run_checkpoint(model, tok, examples, top_k=2, n_induction=2, n_boot=50, judge=judge,
                                   progress=False)
    assert set(out["families"]) == {"stoney", "math", "all"}
    s = out["families"]["stoney"]["heldout"]
    assert s["n"] == 1 and np.shape(s["ablate_zero"]["mean"]) == (2, 2)
    assert np.shape(s["struct_mass:all"]["mean"]) == (len(definitions.STRUCT_REGIONS),)
    assert sum(s["struct_mass:all"]["mean"]) == pytest.approx(1.0, abs=1e-4)
    assert out["topk"]["k"] == 2 and len(out["topk"]["heads"]["zero"]["math"]) == 2
    assert out["overlap"]["zero"]["families"] == ["stoney", "math"]
    assert {e["id"] for e in out["examples"]} == {"s1", "m1"}
    assert np.shape(out["examples"][0]["answer_rows"])[:2] == (2, 2)
    # init_weights zeroes every output projection: no head can matter yet
    assert np.abs(np.array(s["ablate_zero"]["mean"])).max() == 0.0
    delta = stats.paired_delta({"a": recs, "b": recs}, "a", "b", n_boot=50)
    assert delta["n_paired"] == 2 and delta["families"]["stoney"]["all"]["answer_logprob"]["mean"] == 0.0
    # the model's own greedy answers split the held-out items (a random model gets them wrong)
    assert out["context"] == "own" and s["own_correct"]["mean"] == 0.0
    assert out["families"]["stoney"]["heldout_wrong"]["n"] == 1 and "heldout_right" not in out["families"]["stoney"]
    assert {r["subset"] for r in recs if r["split"] == "train"} == {"select"}
    gold, _ = run.run_checkpoint(model, tok, examples, context="gold", top_k=2, n_induction=2, n_boot=50,
                                 judge=judge, progress=False)
    assert gold["context"] == "gold"
    assert [c["text"] for c in gold["contexts"]] == ["<think></think>\nAnswer:"] * 2  # one answer sentence: all cut


# -----------------------------------------------------------------------------
# subsets and headline tests

def test_selection_and_score_subsets_are_disjoint():
    its = [items.Item(task=t, family="math", split=s, id=f"x{i}", ids=[0], target=0, struct=np.zeros(1),
                       lexical=np.zeros(1)) for t in ("a", "b") for s in ("train", "val", "test") for i in range(200)]
    select = {it.key + it.split for it in its if it.subset == "select"}
    score = {it.key + it.split for it in its if it.subset == "score"}
    assert select.isdisjoint(score) and len(select) + len(score) == len(its)
    assert all(it.subset == "select" for it in its if it.split == "train")  # held-out its are the score ones
    held = [it for it in its if it.group == "heldout"]
    assert 0.4 < sum(it.subset == "score" for it in held) / len(held) < 0.6   # a hash half, not a prefix
    assert {it.subset for it in held if it.id == "x7"} == {held[7].subset}  # by task and id: the same every time


def fake_recs(rng, families=("stoney", "math"), n=40, shift=None, L=3, H=2):
    """Records as run_checkpoint makes them: every statistic drawn from one distribution, except
    `shift` = {family: extra drop of its own top heads}."""
    recs = []
    for fam in families:
        other = [f for f in families if f != fam][0]
        for i in range(n):
            drops = rng.normal(size=4)
            recs.append({"family": fam, "group": "heldout" if i % 4 else "train", "key": f"{fam}/{i}",
                         "subset": "score" if i % 2 else "select",
                         "topk_mean": {"own": drops[0] + (shift or {}).get(fam, 0.0), "random": drops[1],
                                       other: drops[2]},
                         "ablate_mean": rng.normal(size=(L, H)),
                         "lens_first": float(rng.integers(0, L + 1)) if i % 3 else float("nan"),
                         "entropy_answer_norm": rng.random((L, H))})
    return recs


def test_heads_are_chosen_on_the_selection_subset_only():
    recs = fake_recs(np.random.default_rng(0))
    for r in recs:
        r["ablate_zero"] = r["ablate_mean"]
        r["ablate_mean"] = np.zeros((3, 2))
        r["ablate_mean"][(0, 0) if r["subset"] == "select" else (2, 1)] = 5.0
    heads = ablation.choose_heads(recs, ["stoney", "math"], 1)
    assert heads["mean"] == {"stoney": [(0, 0)], "math": [(0, 0)]}
    # and the headline scores them on held-out score items only
    specs = stats.checkpoint_specs("ck", recs, ["stoney", "math"])
    n_score = sum(r["family"] == "stoney" and r["group"] == "heldout" and r["subset"] == "score" for r in recs)
    topk = [s for s in specs if s[0]["kind"] == "topk_vs_random" and s[0]["family"] == "stoney"][0]
    assert len(topk[1]) == n_score and 0 < n_score < len(recs) / 2


def test_held_out_math_items_are_summarised_by_reasoning_depth():
    recs = fake_recs(np.random.default_rng(0))
    for i, r in enumerate(recs):
        r.update(task=f"{r['family']}_mc", outcome=None, depth=1 + i % 4 if r["family"] == "math" else 0,
                 direction=("s2e", "e2s")[i % 2] if r["family"] == "stoney" else None)
    out = stats.group_summaries(recs, ["stoney", "math"], ["stoney_mc", "math_mc"], n_boot=50, seed=0)
    held = [r for r in recs if r["family"] == "math" and r["group"] == "heldout"]
    assert set(out["depths"]) == {"math"}  # stoney items have no depth
    # ... and Stoney's by direction: term -> gloss and gloss -> term are reported apart
    s_held = [r for r in recs if r["family"] == "stoney" and r["group"] == "heldout"]
    assert {d: s["n"] for d, s in out["directions"]["stoney"].items()} == {
        "term → gloss": sum(r["direction"] == "s2e" for r in s_held),
        "gloss → term": sum(r["direction"] == "e2s" for r in s_held)}
    assert set(out["directions"]) == {"stoney"}
    assert {d: s["n"] for d, s in out["depths"]["math"].items()} == {
        str(d): sum(r["depth"] == d for r in held) for d in (1, 2, 3, 4) if any(r["depth"] == d for r in held)}
    assert "lens_first" in out["depths"]["math"][next(iter(out["depths"]["math"]))]


def run_headlines(seed, shift_old=None, shift_new=None):
    rng = np.random.default_rng(seed)
    recs = {"sft": fake_recs(rng, shift=shift_old), "grpo": fake_recs(rng, shift=shift_new)}
    return stats.headlines(recs, [("grpo", "sft")], ["stoney", "math"], n_boot=2000, n_perm=4999, seed=seed)


def test_headline_on_a_planted_null_reports_nothing():
    """Families and checkpoints drawn from one distribution: over ten runs of the whole headline
    (about 20 tests each), at most one run reports anything (the family-wise error is 5%)."""
    runs = [run_headlines(seed) for seed in range(10)]
    assert all(h["m"] >= 15 and h["correction"] == "Holm-Bonferroni" for h in runs)
    assert all(0 < t["p_holm"] <= 1 and t["p_holm"] >= t["p"] for h in runs for t in h["tests"])
    assert sum(any(t["significant"] for t in h["tests"]) for h in runs) <= 1
    raw = sum(any(t["p"] < 0.05 for t in h["tests"]) for h in runs)
    assert raw >= 3  # uncorrected, the same runs 'find' something much more often


def test_headline_reports_a_planted_effect():
    """stoney's own top heads matter more (at grpo only): those tests are reported, and only those."""
    h = run_headlines(0, shift_new={"stoney": 3.0})
    found = {(t["kind"], t["checkpoint"], t.get("family")) for t in h["tests"] if t["significant"]}
    assert found == {("topk_vs_random", "grpo", "stoney"), ("topk_vs_other", "grpo", "stoney"),
                     ("delta_topk_vs_random", "grpo vs sft", "stoney")}
    t = next(t for t in h["tests"] if t["kind"] == "topk_vs_random" and t["checkpoint"] == "grpo"
             and t["family"] == "stoney")
    assert t["lo"] > 0.5 and h["interval_level"] == pytest.approx(1 - 0.05 / h["m"])


def test_decodability_is_one_rule_for_both_families(monkeypatch):
    """A Stoney multiple-choice item and a math item are judged by the same function: top-1 of
    the whole vocabulary, never "the letter wins among five" for one family only."""
    model = random_model(4)
    ids = torch.randint(0, 61, (12,)).tolist()
    mc = items.Item(task="stoney_mc", family="stoney", split="val", id="a", ids=ids, target=5,
                     struct=np.zeros(12, dtype=int), lexical=np.zeros(12, dtype=int), answer_index=0,
                     letter_ids=[5, 6, 7, 8, 9])
    calls = []
    rule = attention.decodable
    monkeypatch.setattr(attention, "decodable", lambda logits, target: calls.append(target) or rule(logits, target))
    recs = [attention.analyse_item(model, it)[0] for it in (mc, fake_item(ids, target=5))]
    assert calls == [5, 5]
    assert np.array_equal(recs[0]["lens_decodable"], recs[0]["lens_top1"])
    assert np.array_equal(recs[0]["lens_decodable"], recs[1]["lens_decodable"])
    # with five letters the letter wins far more often than the token is top-1: the rules differ
    assert "lens_choice" in recs[0] and "lens_choice" not in recs[1]


def test_first_decodable_depth_leaves_out_the_embeddings():
    assert attention.first_decodable([1, 0, 1, 1]) == 2.0
    assert attention.first_decodable([1, 1, 1]) == 1.0  # decodable at the embeddings: a baseline, not depth 0
    assert attention.first_decodable([0, 1, 1]) == 1.0
    assert np.isnan(attention.first_decodable([1, 1, 0]))


def test_random_head_null_has_at_least_100_sets_or_all_of_them():
    every = ablation.random_head_sets(2, 2, 2, ablation.RANDOM_SETS, seed=0)
    heads = [(0, 0), (0, 1), (1, 0), (1, 1)]
    assert sorted(map(sorted, every)) == sorted(sorted(c) for c in itertools.combinations(heads, 2))
    drawn = ablation.random_head_sets(4, 4, 5, ablation.RANDOM_SETS, seed=0)
    assert len(drawn) == 100 and len({tuple(sorted(s)) for s in drawn}) == 100
    assert all(len(set(s)) == 5 for s in drawn)
    assert drawn != ablation.random_head_sets(4, 4, 5, ablation.RANDOM_SETS, seed=1)
    assert ablation.null_complete(2, 2, 2, 6) and ablation.null_complete(4, 4, 5, 100)
    assert not ablation.null_complete(4, 4, 5, 3)


def test_top_heads_vs_random_is_left_out_with_a_small_null():
    """Three random sets are no null: the record's random drop is NaN and the test untestable."""
    model = random_model(5)
    its = [fake_item(torch.randint(0, 61, (10,)).tolist(), target=3) for _ in range(12)]
    for i, it in enumerate(its):
        it.id, it.split = f"x{i}", "test"
    recs = [dict(attention.analyse_item(model, it)[0], family="math", key=it.key, subset="score", group="heldout")
            for it in its]
    topk = {m: {"math": [(0, 0), (1, 1)]} for m in definitions.ABLATION_MODES}
    means = torch.zeros(2, 4, 16)
    for sets, ok in ((ablation.random_head_sets(2, 4, 2, 3, 0), False), (ablation.random_head_sets(2, 4, 2, 100, 0), True)):
        for rec, drops in zip(recs, ablation.ablate_sets(model, its, means, ["math"], topk, sets)):
            rec.update(drops)
        assert np.isnan(recs[0]["topk_mean"]["random"]) != ok
        h = stats.headline_tests(stats.checkpoint_specs("m", recs, ["math"]), n_boot=200, n_perm=199)
        assert (h["m"] == 1) == ok
