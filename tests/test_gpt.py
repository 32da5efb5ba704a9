"""The model: nanochat-compatible names and sizes, loss, cache paths equal to a plain forward."""
import math

import pytest
import torch
import torch.nn.functional as F

from nanostoney.engine import KVCache
from nanostoney.gpt import GPT, GPTConfig, config_for_depth, unwrap


def tiny(n_kv_head=4, seed=0, vocab=61):
    torch.manual_seed(seed)
    cfg = GPTConfig(sequence_len=32, vocab_size=vocab, n_layer=2, n_head=4, n_kv_head=n_kv_head, n_embd=64)
    model = GPT(cfg)
    model.init_weights()
    with torch.no_grad():  # init zeroes the output projections; make every path matter
        for name, p in model.named_parameters():
            if "c_proj" in name or "lm_head" in name:
                p.normal_(0, 0.1)
    return model.eval()


def test_state_dict_names_match_nanochat():
    model = tiny(n_kv_head=2)
    names = set(model.state_dict())
    expected = {"transformer.wte.weight", "lm_head.weight"}
    for i in range(2):
        for n in ("attn.c_q", "attn.c_k", "attn.c_v", "attn.c_proj", "mlp.c_fc", "mlp.c_proj"):
            expected.add(f"transformer.h.{i}.{n}.weight")
    assert names == expected  # rotary tables are non-persistent, as nanochat's
    sd = model.state_dict()
    assert sd["transformer.h.0.attn.c_k.weight"].shape == (2 * 16, 64)
    assert sd["transformer.h.0.mlp.c_fc.weight"].shape == (256, 64)
    assert model.cos.dtype == torch.bfloat16 and model.cos.shape == (1, 320, 1, 8)


def test_config_for_depth():
    c = config_for_depth(20, vocab_size=65536, sequence_len=2048)
    assert (c.n_embd, c.n_head, c.n_kv_head, c.n_layer) == (1280, 10, 10, 20)
    assert config_for_depth(4, 100, 64).n_head == 2
    for d in range(1, 40):
        c = config_for_depth(d, 100, 64)
        assert c.n_embd == 64 * d and c.n_embd % c.n_head == 0 and (c.n_embd // c.n_head) % 2 == 0


def test_init_weights():
    torch.manual_seed(0)
    model = GPT(GPTConfig(sequence_len=16, vocab_size=50, n_layer=2, n_head=2, n_kv_head=2, n_embd=32))
    model.init_weights()
    for block in model.transformer.h:
        assert block.attn.c_proj.weight.abs().sum() == 0 and block.mlp.c_proj.weight.abs().sum() == 0
    assert 0 < model.lm_head.weight.std() < 0.01
    assert abs(model.transformer.wte.weight.std().item() - 1.0) < 0.1
    assert abs(model.transformer.h[0].attn.c_q.weight.std().item() - 1 / math.sqrt(32)) < 0.02


def test_logits_and_loss():
    model = tiny()
    idx = torch.randint(0, 61, (3, 10))
    logits = model(idx)
    assert logits.dtype == torch.float32 and logits.shape == (3, 10, 61)
    assert logits.abs().max() <= 15.0
    targets = torch.randint(0, 61, (3, 10))
    targets[0, :4] = -1
    loss = model(idx, targets)
    keep = targets != -1
    ref = F.cross_entropy(logits[keep], targets[keep])
    assert torch.allclose(loss, ref, atol=1e-6)
    per_tok = model(idx, targets, loss_reduction="none")
    assert per_tok.shape == (30,) and per_tok.view(3, 10)[0, :4].abs().sum() == 0


def test_loss_backward_reaches_every_parameter():
    model = tiny(n_kv_head=2).train()
    idx = torch.randint(0, 61, (2, 12))
    model(idx, idx).backward()
    for name, p in model.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name


@pytest.mark.parametrize("n_kv_head", [4, 2, 1])
def test_chunked_cache_equals_full_forward(n_kv_head):
    model = tiny(n_kv_head)
    idx = torch.randint(0, 61, (2, 12))
    full = model(idx)
    cache = KVCache(2, 2, n_kv_head, 16, 12)
    with torch.no_grad():
        parts = [model(idx[:, :5], kv_cache=cache),      # prefill
                 model(idx[:, 5:9], kv_cache=cache),     # a chunk after cached tokens
                 model(idx[:, 9:10], kv_cache=cache),    # one decoded token
                 model(idx[:, 10:], kv_cache=cache)]
    assert cache.pos == 12
    assert torch.allclose(torch.cat(parts, 1), full, atol=1e-5)


def test_left_padded_cache_equals_each_row_alone():
    model = tiny(n_kv_head=2)
    rows = [torch.randint(0, 61, (n,)) for n in (3, 7, 5)]
    T = 7
    pad = torch.tensor([T - len(r) for r in rows])
    batch = torch.stack([torch.cat([torch.zeros(T - len(r), dtype=torch.long), r]) for r in rows])
    nxt = torch.randint(0, 61, (3, 1))
    cache = KVCache(2, 3, 2, 16, T + 1, pad=pad)
    with torch.no_grad():
        prefill = model(batch, kv_cache=cache)
        step = model(nxt, kv_cache=cache)
    for b, r in enumerate(rows):
        alone = model(torch.cat([r, nxt[b]])[None])
        assert torch.allclose(prefill[b, -1], alone[0, len(r) - 1], atol=1e-5)
        assert torch.allclose(step[b, 0], alone[0, -1], atol=1e-5)


def test_estimate_flops():
    model = tiny()
    n = model.num_params() - 61 * 64
    assert model.estimate_flops() == 6 * n + 12 * 2 * 4 * 16 * 32


def test_bf16_autocast_runs():
    model = tiny()
    idx = torch.randint(0, 61, (2, 8))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logits = model(idx)
        loss = model(idx, idx)
    assert logits.dtype == torch.float32 and torch.isfinite(logits).all() and torch.isfinite(loss)
    assert torch.allclose(logits, model(idx), atol=0.3)


def test_unwrap():
    model = tiny()

    class Wrapper(torch.nn.Module):
        def __init__(self, m):
            super().__init__()
            self.module = m

    assert unwrap(Wrapper(Wrapper(model))) is model
    assert unwrap(model) is model


@pytest.mark.slow
def test_torch_compile_matches_eager():
    from nanostoney import probes
    model = tiny()
    compiled = torch.compile(model)
    idx = torch.randint(0, 61, (2, 8))
    assert torch.allclose(compiled(idx), model(idx), atol=1e-5)
    with probes.attention_entropy_probe(compiled) as ent:
        out = compiled(idx)
    assert torch.allclose(out, model(idx), atol=1e-5)
    assert torch.isfinite(ent.per_layer_head).all()


def test_rotary_convention_and_relative_positions():
    from nanostoney.gpt import apply_rotary
    model = GPT(GPTConfig(sequence_len=16, vocab_size=10, n_layer=1, n_head=1, n_kv_head=1, n_embd=8))
    cos, sin = model.cos, model.sin  # (1, T, 1, 4); channel 0 turns 1 radian per position
    x = torch.zeros(1, 1, 1, 8)
    x[..., 0] = 1.0  # first half, channel 0
    y = apply_rotary(x, cos[:, 1:2], sin[:, 1:2])[0, 0, 0]
    assert torch.allclose(y[0], torch.tensor(math.cos(1.0)), atol=1e-2)   # x1 cos + x2 sin
    assert torch.allclose(y[4], torch.tensor(-math.sin(1.0)), atol=1e-2)  # -x1 sin + x2 cos
    torch.manual_seed(0)
    q, k = torch.randn(1, 1, 1, 8), torch.randn(1, 1, 1, 8)

    def score(m, n):
        return (apply_rotary(q, cos[:, m:m + 1], sin[:, m:m + 1]) * apply_rotary(k, cos[:, n:n + 1], sin[:, n:n + 1])).sum()

    assert torch.allclose(score(3, 1), score(10, 8), atol=3e-2)  # depends on m - n only
    assert not torch.allclose(score(3, 1), score(3, 2), atol=3e-2)
