"""Activation patching on minimal pairs, checked on a model with a planted operand-copying head
(patching, ablation and the logit lens must all point at it) and on random models (nothing may
pass the correction)."""
import random

import numpy as np
import pytest
import torch

from nanostoney import probes
from nanostoney.gpt import GPT, GPTConfig
from nanostoney.interp import ablation, attention, items, patching
from test_interp import random_model

BOS, EQ = 0, 30
OPERANDS = range(10, 30)    # tokens an item asks the model to copy
FILLERS = range(31, 48)
PLANT = (1, 2)              # layer 1, head 2 copies the operand to the slot
HD = 32


def copy_model(seed=0):
    """2 layers x 4 heads, width 128. Every block does something (random output projections,
    std 0.02), and head (1, 2) is an operand-copying head: its query is constant and its key is
    +u on operand tokens and -u elsewhere (the slowest rotary pair, so position does not matter),
    so the slot attends to the one operand; its values carry the operand's identity channels
    into channels the unembedding reads as that operand."""
    torch.manual_seed(seed)
    cfg = GPTConfig(sequence_len=64, vocab_size=48, n_layer=2, n_head=4, n_kv_head=4, n_embd=128)
    model = GPT(cfg)
    model.init_weights()
    layer, head = PLANT
    rows = slice(head * HD, (head + 1) * HD)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "c_proj" in name:
                p.normal_(0, 0.02)
        wte = model.transformer.wte.weight
        wte.zero_()
        wte[:, 0] = -1.0
        wte[:, 1] = 1.0
        for t in OPERANDS:
            wte[t, 0] = 1.0
            wte[t, 8 + t - 10] = 1.0          # identity channels 8..27
        for t in list(FILLERS) + [EQ, BOS]:
            wte[t, 28 + t % 20] = 1.0
        attn = model.transformer.h[layer].attn
        attn.c_q.weight[rows] = 0
        attn.c_k.weight[rows] = 0
        attn.c_v.weight[rows] = 0
        attn.c_proj.weight[:, rows] = 0
        attn.c_q.weight[head * HD + HD // 2 - 1, 1] = 1.0   # constant query, slowest rotary pair
        attn.c_k.weight[head * HD + HD // 2 - 1, 0] = 1.0   # +u on operands, -u elsewhere
        for i in range(len(OPERANDS)):
            attn.c_v.weight[head * HD + i, 8 + i] = 1.0
            attn.c_proj.weight[100 + i, head * HD + i] = 1.0
            model.lm_head.weight[10 + i, 100 + i] = 1.0
    return model.eval()


def operand_pairs(n, seed=0, vocab_ops=OPERANDS, fillers=FILLERS, T=16):
    """n minimal pairs: bos, fillers with one operand at a random place, then '='; the corrupted
    context has another operand there. The answer is the operand."""
    rng = random.Random(seed)
    out = []
    for i in range(n):
        a, b = rng.sample(list(vocab_ops), 2)
        ids = [BOS] + [rng.choice(list(fillers)) for _ in range(T - 2)] + [EQ]
        pos = rng.randrange(1, T - 1)
        clean, corrupt = list(ids), list(ids)
        clean[pos], corrupt[pos] = a, b
        out.append(patching.Pair(key=f"p{i}", family="math", clean=clean, corrupt=corrupt, pos=pos,
                                 target=a, foil=b, slot="operand"))
    return out


def test_the_planted_model_copies_the_operand():
    model = copy_model()
    for p in operand_pairs(5):
        with torch.no_grad():
            assert model(torch.tensor([p.clean]))[0, -1].argmax().item() == p.target


def test_patching_finds_the_planted_head_and_ablation_and_the_lens_agree():
    model = copy_model()
    pairs = operand_pairs(16)
    traces = [patching.trace_pair(model, p) for p in pairs]
    tests = patching.site_tests(traces, n_perm=4999)
    best = next(r["site"] for r in tests["sites"] if r["site"].startswith("head/"))  # largest mean first
    assert best == "head/{}.{}".format(*PLANT)
    best = next(r for r in tests["sites"] if r["site"] == "head/1.2")
    assert best["passes"] and best["fraction"] > 0.8
    # the residual stream: at the changed token up to the planted layer, at the slot after it
    by = {r["site"]: r for r in tests["sites"]}
    assert by["resid/pos/0"]["passes"] and by["resid/pos/1"]["passes"] and by["resid/slot/2"]["passes"]
    assert not by["resid/slot/1"]["passes"] and not by["resid/pos/2"]["passes"]
    # ablation and the lens name the same head and layer
    for p in pairs[:4]:
        item = items.Item(task="t", family="math", split="val", id=p.key, ids=p.clean, target=p.target,
                           struct=np.zeros(len(p.clean), dtype=int), lexical=np.zeros(len(p.clean), dtype=int))
        drops = ablation.ablation_drops(model, item)
        assert np.unravel_index(drops.argmax(), drops.shape) == PLANT
        rec, _, _ = attention.analyse_item(model, item)
        assert rec["lens_first"] == PLANT[0] + 1


def test_patching_a_head_equals_a_full_forward_with_that_head_replaced():
    model = copy_model(1)
    p = operand_pairs(1, seed=3)[0]
    t = patching.trace_pair(model, p)
    with torch.no_grad(), probes.capture(model, patterns=False, head_outputs=True) as cap:
        model(torch.tensor([p.clean]))
    clean = [o[0] for o in cap.head_outputs]
    with torch.no_grad():
        base = model(torch.tensor([p.corrupt]))[0, -1]
        with probes.attach(model, patching.HeadPatch(clean, [(0, 3)])):
            patched = model(torch.tensor([p.corrupt]))[0, -1]
    ld = lambda z: (z[p.target] - z[p.foil]).item()  # noqa: E731
    assert t["heads"][0, 3] == pytest.approx(ld(patched) - ld(base), abs=1e-4)
    assert t["ld_corrupt"] == pytest.approx(ld(base), abs=1e-4)
    # patching the whole stream at the slot after the last block restores all of it
    assert t["resid"][1, -1] == pytest.approx(t["ld_clean"] - t["ld_corrupt"], abs=1e-4)
    assert not model.probes


@pytest.mark.parametrize("seed", [0, 1])
def test_on_random_models_nothing_passes(seed):
    model = random_model(seed)
    pairs = operand_pairs(30, seed=seed, vocab_ops=range(1, 40), fillers=range(40, 61))
    tests = patching.site_tests([patching.trace_pair(model, p) for p in pairs], n_perm=4999)
    assert tests["m"] == 2 * 3 + 2 * 4 and tests["n"] == 30
    assert not any(r["passes"] for r in tests["sites"])


def test_too_few_pairs_test_nothing():
    model = copy_model()
    traces = [patching.trace_pair(model, p) for p in operand_pairs(patching.MIN_PAIRS - 1)]
    assert patching.site_tests(traces)["sites"] == []
