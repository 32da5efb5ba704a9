"""Metrics used by scripts/eval.py: pass@k, bootstrap intervals, chrF++, MAUVE, COMET-or-skip."""
import json
import math
import random
from pathlib import Path

import numpy as np
import pytest
import torch
from sacrebleu.metrics import CHRF

from nanostoney import metrics
from nanostoney.errors import UserError
from nanostoney.gpt import GPT, GPTConfig

DATA = Path(__file__).resolve().parents[1] / "data"


# -----------------------------------------------------------------------------
# pass@k

def test_pass_at_k_hand_case():
    # n=5 samples, c=2 correct, k=2: 1 - C(3,2)/C(5,2) = 1 - 3/10
    assert metrics.pass_at_k(5, 2, 2) == pytest.approx(0.7)
    for n, c, k in [(10, 3, 4), (20, 1, 5), (7, 0, 3), (7, 7, 1), (16, 5, 16)]:
        expect = 1 - math.comb(n - c, k) / math.comb(n, k)
        assert metrics.pass_at_k(n, c, k) == pytest.approx(expect)
    assert metrics.pass_at_k(8, 3, 1) == pytest.approx(3 / 8)  # pass@1 is the sample accuracy


def test_pass_at_k_monotone_in_k():
    for n in (1, 4, 10):
        for c in range(n + 1):
            vals = [metrics.pass_at_k(n, c, k) for k in range(1, n + 1)]
            assert all(a <= b + 1e-12 for a, b in zip(vals, vals[1:]))
            assert vals[-1] == (1.0 if c > 0 else 0.0)


def test_pass_at_k_rejects_bad_counts():
    with pytest.raises(ValueError):
        metrics.pass_at_k(4, 5, 1)
    with pytest.raises(ValueError):
        metrics.pass_at_k(4, 1, 5)


def test_pass_at_k_by_task():
    rows = {"gsm8k_mc": [[True, False, False, False], [False] * 4, [True] * 4],
            "stoney_mc": [[False, True], [True, True]]}
    table = metrics.pass_at_k_by_task(rows, ks=[1, 2, 4], n_boot=200)
    g, s = table["gsm8k_mc"], table["stoney_mc"]
    assert g["n_problems"] == 3 and g["n_samples"] == 4
    assert g["pass@1"][0] == pytest.approx((0.25 + 0 + 1) / 3)
    assert g["pass@4"][0] == pytest.approx(2 / 3)
    assert g["pass@1"][0] <= g["pass@2"][0] <= g["pass@4"][0]
    assert "pass@4" not in s and s["pass@2"][0] == 1.0  # k above the sample count is skipped
    for point, lo, hi in (g["pass@1"], g["pass@2"], s["pass@1"]):
        assert lo <= point <= hi
    with pytest.raises(UserError):
        metrics.pass_at_k_by_task({"aqua_mc": []}, ks=[1])


# -----------------------------------------------------------------------------
# bootstrap

def test_bootstrap_deterministic_and_contains_point():
    values = np.random.default_rng(1).random(50)
    a = metrics.bootstrap_ci(values, seed=3)
    b = metrics.bootstrap_ci(values, seed=3)
    c = metrics.bootstrap_ci(values, seed=4)
    assert a == b and a != c
    point, lo, hi = a
    assert point == pytest.approx(values.mean())
    assert lo < point < hi and hi - lo < 0.4
    # a wider interval for a higher confidence level, and for a general stat (slow path)
    lo99, hi99 = metrics.bootstrap_ci(values, seed=3, alpha=0.01)[1:]
    assert lo99 <= lo and hi99 >= hi
    med = metrics.bootstrap_ci(values, stat=np.median, n_boot=300, seed=0)
    assert med[0] == pytest.approx(np.median(values)) and med[1] <= med[0] <= med[2]
    assert med == metrics.bootstrap_ci(values, stat=np.median, n_boot=300, seed=0)


def test_bootstrap_interval_shrinks_with_more_data():
    rng = np.random.default_rng(0)
    small = metrics.bootstrap_ci(rng.random(20))
    large = metrics.bootstrap_ci(rng.random(2000))
    assert (large[2] - large[1]) < (small[2] - small[1]) / 3


def test_bootstrap_empty_is_user_error():
    with pytest.raises(UserError):
        metrics.bootstrap_ci([])


# -----------------------------------------------------------------------------
# chrF++

def test_chrf_pp_ci_matches_corpus_score():
    refs = [f"sentence number {i} about `wîchasta` and eggs" for i in range(30)]
    hyps = [r if i % 3 else r.replace("e", "a") for i, r in enumerate(refs)]
    corpus = CHRF(word_order=2).corpus_score(hyps, [refs]).score
    point, lo, hi = metrics.chrf_pp_ci(hyps, refs, n_boot=200, seed=0)
    assert point == pytest.approx(corpus)
    assert lo < point < hi <= 100.0
    assert metrics.chrf_pp_ci(hyps, refs, n_boot=200, seed=0) == (point, lo, hi)


# -----------------------------------------------------------------------------
# MAUVE with features from a tiny nanostoney GPT

class ByteTokenizer:
    """Bytes as tokens, 256 = <|bos|>: enough to featurise text with a tiny model."""
    bos_id = 256

    def encode(self, text):
        return list(text.encode("utf-8"))


@pytest.fixture(scope="module")
def tiny_model():
    torch.manual_seed(0)
    model = GPT(GPTConfig(sequence_len=64, vocab_size=257, n_layer=2, n_head=2, n_kv_head=2, n_embd=32))
    model.init_weights()
    with torch.no_grad():  # init zeroes the residual projections; give the blocks something to do
        for block in model.transformer.h:
            block.attn.c_proj.weight.normal_(0, 0.1)
            block.mlp.c_proj.weight.normal_(0, 0.1)
    return model


def _stoney_texts():
    rows = [json.loads(line) for line in open(DATA / "stoney" / "stoney_valid.jsonl")][:240]
    return [r["messages"][-1]["content"] for r in rows]


def _gsm8k_texts():
    rows = [json.loads(line) for line in open(DATA / "gsm8k" / "test.jsonl")][:120]
    return [r["answer"] for r in rows]


def test_model_features_batched_equals_one_by_one(tiny_model):
    texts = ["short", "a somewhat longer text that is padded less", "x", "Answer: C"]
    tok = ByteTokenizer()
    batched = metrics.model_features(tiny_model, tok, texts, pool="mean", batch_size=4)
    single = np.concatenate([metrics.model_features(tiny_model, tok, [t], batch_size=1) for t in texts])
    assert batched.shape == (4, 32) and batched.dtype == np.float32
    np.testing.assert_allclose(batched, single, atol=1e-5)
    last = metrics.model_features(tiny_model, tok, texts, pool="last", batch_size=4)
    last1 = metrics.model_features(tiny_model, tok, texts[1:2], pool="last")
    np.testing.assert_allclose(last[1], last1[0], atol=1e-5)
    assert not np.allclose(last, batched)
    with pytest.raises(UserError):
        metrics.model_features(tiny_model, tok, texts, pool="max")


def test_mauve_same_distribution_above_different(tiny_model):
    tok = ByteTokenizer()
    stoney = _stoney_texts()
    random.Random(0).shuffle(stoney)
    kw = dict(pool="mean", batch_size=40)  # max_tokens: the model's sequence_len, 64
    p = metrics.model_features(tiny_model, tok, stoney[:120], **kw)
    q_same = metrics.model_features(tiny_model, tok, stoney[120:240], **kw)
    q_diff = metrics.model_features(tiny_model, tok, _gsm8k_texts(), **kw)
    fast = dict(num_buckets=6, kmeans_num_redo=1, kmeans_max_iter=50, seed=0)
    same = metrics.mauve_score(p, q_same, **fast)
    diff = metrics.mauve_score(p, q_diff, **fast)
    assert same > 0.9 and diff < 0.7 and same - diff > 0.3, (same, diff)
    assert metrics.mauve_score(p, q_same, **fast) == same  # seeded: the same number every run


def test_mauve_rejects_bad_features():
    with pytest.raises(UserError):
        metrics.mauve_score(np.zeros((1, 4)), np.zeros((5, 4)))
    with pytest.raises(UserError):
        metrics.mauve_score(np.zeros((5, 4)), np.zeros((5, 3)))


# -----------------------------------------------------------------------------
# COMET: optional, skipped with one sentence when absent

def test_comet_skips_with_reason_when_unavailable(tmp_path):
    score, reason = metrics.comet_score(["src"], ["hyp"], ["ref"], model_path=str(tmp_path / "none"))
    if score is None:
        assert reason.startswith("COMET skipped:") and reason.endswith(".") and reason.count(". ") == 0
    else:  # a machine with unbabel-comet and that checkpoint: then it must be a number
        assert isinstance(score, float)


# -----------------------------------------------------------------------------
# tests of differences, and the correction for many of them

def test_holm_hand_case():
    # sorted 0.01, 0.03, 0.04, 0.5 -> 0.04, 0.09, 0.08 -> 0.09 (monotone), 0.5
    assert metrics.holm([0.01, 0.04, 0.03, 0.5]) == pytest.approx([0.04, 0.09, 0.09, 0.5])
    assert metrics.holm([0.9, 0.8]) == pytest.approx([1.0, 1.0])


def test_mean_difference_paired_and_two_sample():
    rng = np.random.default_rng(0)
    a = rng.normal(size=30)
    same = metrics.mean_difference(a, a.copy(), paired=True, n_perm=999)
    assert same["diff"] == 0 and same["p"] == 1.0 and same["lo"] == same["hi"] == 0
    shifted = metrics.mean_difference(a + 2.0, a, paired=True, n_perm=999)
    assert shifted["diff"] == pytest.approx(2.0) and shifted["p"] == pytest.approx(1 / 1000)
    b = rng.normal(size=25) + 1.5
    r = metrics.mean_difference(a, b, n_perm=999, alpha=0.01)
    assert r["n"] == [30, 25] and r["lo"] < r["diff"] < r["hi"] < 0 and r["p"] < 0.01
    # NaN values are left out; pairs with a NaN side as a whole
    r = metrics.mean_difference([1.0, np.nan, 3.0, 5.0], [0.0, 0.0, np.nan, 1.0], paired=True, n_perm=99)
    assert r["n"] == 2 and r["diff"] == pytest.approx(2.5)
    assert metrics.mean_difference([np.nan], None) is None


def planted(rng, n_tests, effect=0.0, n=20):
    """p-values of n_tests comparisons of identical distributions, the first shifted by `effect`."""
    ps = []
    for j in range(n_tests):
        x, y = rng.normal(size=n), rng.normal(size=n)
        shift = effect if j == 0 else 0.0
        r = metrics.mean_difference(x + shift, y, paired=bool(j % 2), n_boot=100, n_perm=1999,
                                    seed=int(rng.integers(1 << 30)))
        ps.append(r["p"])
    return np.array(ps)


def test_correction_on_a_planted_null_reports_nothing():
    """40 tests on identical distributions, 30 times: uncorrected, most runs 'find' something;
    Holm-corrected, at most a few do (the family-wise error is 5%)."""
    rng = np.random.default_rng(1)
    raw = holm_hits = 0
    for _ in range(30):
        p = planted(rng, 40)
        raw += bool((p < 0.05).any())
        holm_hits += bool((metrics.holm(p) < 0.05).any())
    assert raw >= 20 and holm_hits <= 3


def test_correction_keeps_a_planted_effect():
    p = planted(np.random.default_rng(2), 40, effect=1.5, n=40)
    adjusted = metrics.holm(p)
    assert adjusted[0] < 0.05 and (adjusted[1:] >= 0.05).all()
