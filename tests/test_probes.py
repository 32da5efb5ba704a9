"""Probes: exact entropy against a naive softmax, captures against a recomputation from the
weights, ablation and logit lens against facts that must hold, and probes leave logits alone."""
import math

import pytest
import torch

from nanostoney import probes
from nanostoney.gpt import GPT, GPTConfig, apply_rotary, norm


def tiny(n_kv_head=4, seed=0):
    torch.manual_seed(seed)
    cfg = GPTConfig(sequence_len=32, vocab_size=61, n_layer=2, n_head=4, n_kv_head=n_kv_head, n_embd=64)
    model = GPT(cfg)
    model.init_weights()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "c_proj" in name or "lm_head" in name:
                p.normal_(0, 0.1)
        model.transformer.h[0].attn.c_q.weight[16:32] = 0  # layer 0 head 1: uniform attention
    return model.eval()


def naive_entropy(p):
    return -(p * torch.log(p.clamp_min(1e-30))).sum(-1)


def normed(*shape):
    return norm(torch.randn(*shape))


@pytest.mark.parametrize("Tq,Tk,use_mask", [(9, 9, False), (1, 9, False), (4, 9, False), (6, 9, True)])
def test_entropy_function_matches_naive(Tq, Tk, use_mask):
    torch.manual_seed(1)
    q, k = normed(2, 3, Tq, 16) * 2, normed(2, 3, Tk, 16) * 2
    mask = None
    if use_mask:  # left padding: row 1 hides its first 3 keys
        mask = torch.ones(2, 1, Tq, Tk, dtype=torch.bool).tril(Tk - Tq)
        mask[1, :, :, :3] = False
    exact = probes.attention_entropy(q, k, mask)
    ref = naive_entropy(probes.attention_pattern(q, k, mask))
    assert exact.shape == (2, 3, Tq)
    assert (exact - ref).abs().max() <= 1e-4


def test_uniform_attention_has_entropy_log_n():
    q = torch.zeros(1, 2, 7, 8)  # zero queries: every visible key scores 0
    k = normed(1, 2, 7, 8)
    h = probes.attention_entropy(q, k)
    expected = torch.log(torch.arange(1, 8, dtype=torch.float32))
    assert torch.allclose(h[0, 0], expected, atol=1e-5) and torch.allclose(h[0, 1], expected, atol=1e-5)


def test_uniform_attention_in_the_model():
    model = tiny()
    with torch.no_grad():
        model.transformer.h[1].attn.c_q.weight.zero_()
    with probes.attention_entropy_probe(model) as ent:
        model(torch.randint(0, 61, (2, 10)))
    expected = torch.log(torch.arange(1, 11, dtype=torch.float32)).mean()
    assert torch.allclose(ent.per_layer_head[1], expected.expand(4), atol=1e-5)
    assert (ent.per_layer_head[0] - expected).abs().max() > 1e-2  # layer 0 is not uniform


@pytest.mark.parametrize("n_kv_head", [4, 2])
def test_model_entropy_matches_naive_over_several_forwards(n_kv_head):
    model = tiny(n_kv_head)
    xs = [torch.randint(0, 61, (2, 12)), torch.randint(0, 61, (3, 12))]
    with probes.attention_entropy_probe(model) as ent, probes.capture(model) as cap:
        naive = []
        for x in xs:
            model(x)
            naive.append(torch.stack([naive_entropy(p) for p in cap.patterns]))  # (L, B, H, T)
    ref = torch.cat(naive, 1).mean((1, 3))  # mean over all rows and positions -> (L, H)
    assert ent.per_layer_head.shape == (2, 4)
    assert (ent.per_layer_head - ref).abs().max() <= 1e-4
    assert ent.per_layer_head.std() > 0.05  # heads differ (one is uniform): a mix-up would show


def recompute_pattern(model, resid, layer):
    """q, k from the residual stream and the weights, by hand."""
    attn = model.transformer.h[layer].attn
    x = norm(resid)
    B, T, _ = x.shape
    q = attn.c_q(x).view(B, T, attn.n_head, attn.head_dim)
    k = attn.c_k(x).view(B, T, attn.n_kv_head, attn.head_dim)
    cos, sin = model.cos[:, :T], model.sin[:, :T]
    q, k = norm(apply_rotary(q, cos, sin)), norm(apply_rotary(k, cos, sin))
    k = k.repeat_interleave(attn.n_head // attn.n_kv_head, dim=2)
    s = torch.einsum("bihd,bjhd->bhij", q, k) / math.sqrt(attn.head_dim)
    s = s.masked_fill(~torch.ones(T, T, dtype=torch.bool).tril(), float("-inf"))
    return s.softmax(-1)


def test_capture_patterns_sum_to_one_and_match_recomputation():
    model = tiny(n_kv_head=2)
    x = torch.randint(0, 61, (2, 9))
    with torch.no_grad(), probes.capture(model, head_outputs=True) as cap, probes.residuals(model) as res:
        model(x)
    for layer in range(2):
        p = cap.patterns[layer]
        assert p.shape == (2, 4, 9, 9)
        assert torch.allclose(p.sum(-1), torch.ones(2, 4, 9), atol=1e-5)
        assert p.triu(1).abs().max() == 0  # causal
        ref = recompute_pattern(model, res.resid[layer], layer)
        assert torch.allclose(p, ref, atol=1e-5)
        attn = model.transformer.h[layer].attn
        v = attn.c_v(norm(res.resid[layer])).view(2, 9, 2, 16).transpose(1, 2).repeat_interleave(2, 1)
        assert torch.allclose(cap.head_outputs[layer], p @ v, atol=1e-5)


def test_ablating_a_dead_head_changes_nothing_and_a_live_head_does():
    model = tiny()
    with torch.no_grad():
        model.transformer.h[1].attn.c_proj.weight[:, 2 * 16:3 * 16] = 0  # head 2's columns
    x = torch.randint(0, 61, (2, 10))
    base = model(x)
    with probes.ablate(model, heads=[(1, 2)]):
        assert torch.equal(model(x), base)
    with probes.ablate(model, heads=[(1, 1)]):
        assert (model(x) - base).abs().max() > 1e-3
    assert not model.probes


def test_mean_ablation():
    model = tiny()
    x = torch.randint(0, 61, (1, 6))
    with probes.capture(model, patterns=False, head_outputs=True) as cap:
        base = model(x)
    # mean = the head's own output at the only position that exists (T = 1) gives the base
    mean = torch.zeros(2, 4, 16)
    with probes.ablate(model, heads=[(0, 1)]):
        zeroed = model(x)
    with probes.ablate(model, heads=[(0, 1)], mean=mean):
        assert torch.equal(model(x), zeroed)  # mean 0 is zero ablation
    mean[0, 1] = cap.head_outputs[0][0, 1].mean(0)
    with probes.ablate(model, heads=[(0, 1)], mean=mean):
        mean_abl = model(x)
    assert (mean_abl - zeroed).abs().max() > 1e-4 and (mean_abl - base).abs().max() > 1e-5
    x1 = x[:, :1]
    with probes.capture(model, patterns=False, head_outputs=True) as cap1:
        b1 = model(x1)
    mean[0, 1] = cap1.head_outputs[0][0, 1, 0]
    with probes.ablate(model, heads=[(0, 1)], mean=mean):
        assert torch.allclose(model(x1), b1, atol=1e-6)


def test_logit_lens_last_layer_is_the_output():
    model = tiny()
    x = torch.randint(0, 61, (2, 7))
    with probes.residuals(model) as res:
        out = model(x)
    assert len(res.resid) == 3
    assert torch.equal(model.lm_logits(res.resid[-1]), out)
    assert (model.lm_logits(res.resid[1]) - out).abs().max() > 1e-3


def test_probes_do_not_change_logits_or_gradients():
    model = tiny(n_kv_head=2).train()
    x = torch.randint(0, 61, (2, 11))
    loss_off = model(x, x)
    loss_off.backward()
    grads_off = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    with probes.attention_entropy_probe(model), probes.capture(model, head_outputs=True), probes.residuals(model):
        assert len(model.probes) == 3
        loss_on = model(x, x)
        loss_on.backward()
    assert not model.probes
    assert torch.equal(loss_on, loss_off)
    for g, p in zip(grads_off, model.parameters()):
        assert torch.equal(g, p.grad)


def test_probes_attach_through_wrappers():
    model = tiny()

    class Wrapper(torch.nn.Module):  # stands for DDP: the model sits in .module
        def __init__(self, m):
            super().__init__()
            self.module = m

        def forward(self, *a, **kw):
            return self.module(*a, **kw)

    wrapped = Wrapper(model)
    with probes.attention_entropy_probe(wrapped) as ent:
        wrapped(torch.randint(0, 61, (1, 5)))
    assert torch.isfinite(ent.per_layer_head).all() and ent.count == 5


def test_ddp_single_process(tmp_path):
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel as DDP
    dist.init_process_group("gloo", init_method=f"file://{tmp_path}/store", rank=0, world_size=1)
    try:
        model = tiny()
        ddp = DDP(model)
        x = torch.randint(0, 61, (2, 8))
        with probes.attention_entropy_probe(ddp) as ent, probes.capture(model) as cap:
            ddp(x, x).backward()
        ent.all_reduce()
        ref = torch.stack([naive_entropy(p) for p in cap.patterns]).mean((1, 3))
        assert (ent.per_layer_head - ref).abs().max() <= 1e-4
    finally:
        dist.destroy_process_group()


def test_bad_ablation_scale():
    from nanostoney.errors import UserError
    model = tiny()
    with pytest.raises(UserError, match="n_layer, n_head"):
        probes.ablate(model, scale=torch.ones(3, 3))
