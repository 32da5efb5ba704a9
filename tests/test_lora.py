"""lora.py: the adapters change nothing until trained, disable/merge are exact, save/load round-trips."""
import os

import pytest
import torch
import torch.nn as nn

from nanostoney import lora
from nanostoney.errors import UserError
from nanostoney.gpt import GPT, GPTConfig

TOL = 1e-5


def tiny(seed=0):
    torch.manual_seed(seed)
    cfg = GPTConfig(sequence_len=16, vocab_size=97, n_layer=2, n_head=4, n_kv_head=2, n_embd=32)
    model = GPT(cfg)
    model.init_weights()
    # nanochat's init zeroes every c_proj: give them weights, or "B=0 gives base" would be vacuous there
    with torch.no_grad():
        for block in model.transformer.h:
            block.attn.c_proj.weight.normal_(0, 0.1)
            block.mlp.c_proj.weight.normal_(0, 0.1)
    return model


def batch(seed=1, B=2, T=12):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 97, (B, T), generator=g), torch.randint(0, 97, (B, T), generator=g)


def train_b(model, steps=5):
    """A few AdamW steps on the adapters only; B moves away from zero."""
    opt = torch.optim.AdamW(lora.lora_parameters(model), lr=1e-2)
    x, y = batch(2)
    losses = []
    for _ in range(steps):
        loss = model(x, y)
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    return losses


def maxdiff(a, b):
    return (a - b).abs().max().item()


def test_fresh_adapters_disabled_and_merged_give_base_logits():
    model = tiny()
    x, _ = batch()
    base = model(x).detach()
    names = lora.apply_lora(model, rank=4, alpha=8, targets="attn,mlp")
    assert len(names) == 2 * 6
    assert all(isinstance(model.get_submodule(n), lora.LoRALinear) for n in names)
    # A is random, B is zero: the adapter path contributes exactly nothing
    assert all(m.lora_A.abs().sum() > 0 and m.lora_B.abs().sum() == 0 for _, m in lora.lora_modules(model))
    assert maxdiff(model(x), base) <= TOL
    with lora.disable_adapters(model):
        assert maxdiff(model(x), base) <= TOL
    lora.merge_lora(model)
    assert maxdiff(model(x), base) <= TOL


def test_only_adapters_train_and_base_keys_unchanged():
    model = tiny()
    base_keys = set(model.state_dict())
    lora.apply_lora(model, rank=2, alpha=4)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(n.endswith((".lora_A", ".lora_B")) for n in trainable)
    # default targets: the four attention linears of every layer, A and B each
    assert len(trainable) == 2 * 4 * 2
    assert {id(p) for p in lora.lora_parameters(model)} == {id(p) for p in model.parameters() if p.requires_grad}
    keys = set(model.state_dict())
    assert base_keys <= keys and all(k.endswith((".lora_A", ".lora_B")) for k in keys - base_keys)
    x, y = batch()
    model(x, y).backward()
    assert all(p.grad is None for n, p in model.named_parameters() if not p.requires_grad)
    assert all(m.lora_B.grad is not None and m.lora_B.grad.abs().sum() > 0 for _, m in lora.lora_modules(model))


def test_after_training_merged_equals_unmerged_and_disabled_equals_base():
    model = tiny()
    x, _ = batch()
    base = model(x).detach()
    lora.apply_lora(model, rank=4, alpha=8, dropout=0.0, targets=("attn.c_q", "attn.c_v", "mlp.c_fc"))
    losses = train_b(model)
    assert losses[-1] < losses[0]
    unmerged = model(x).detach()
    assert maxdiff(unmerged, base) > 1e-3  # the adapters really changed the function
    with lora.disable_adapters(model):
        assert maxdiff(model(x), base) <= TOL
    assert maxdiff(model(x), unmerged) <= TOL  # re-enabled on exit
    lora.merge_lora(model)
    assert maxdiff(model(x), unmerged) <= TOL
    with lora.disable_adapters(model):  # works on merged adapters too
        assert maxdiff(model(x), base) <= TOL
    assert all(m.merged for _, m in lora.lora_modules(model))
    lora.unmerge_lora(model)
    assert maxdiff(model(x), unmerged) <= TOL
    with lora.disable_adapters(model):
        assert maxdiff(model(x), base) <= TOL


def test_remove_lora_merged_is_a_plain_model():
    model = tiny()
    x, _ = batch()
    plain_keys = set(model.state_dict())
    lora.apply_lora(model, rank=4, alpha=8)
    train_b(model, 3)
    tuned = model(x).detach()
    lora.remove_lora(model, merge=True)
    assert not lora.lora_modules(model)
    assert all(type(m) is nn.Linear for n, m in model.named_modules() if n.endswith(("c_q", "c_proj")))
    assert set(model.state_dict()) == plain_keys
    assert all(p.requires_grad for p in model.parameters())
    assert maxdiff(model(x), tuned) <= TOL
    fresh = tiny()
    fresh.load_state_dict(model.state_dict())  # loads as an ordinary checkpoint
    assert maxdiff(fresh(x), tuned) <= TOL


def test_save_and_load_adapters_round_trip(tmp_path):
    model = tiny()
    lora.apply_lora(model, rank=3, alpha=6, targets="attn.c_q,attn.c_k,mlp.c_proj")
    train_b(model, 3)
    x, _ = batch()
    tuned = model(x).detach()
    base_dir = tmp_path / "base"
    base_dir.mkdir()
    path = lora.save_adapters(model, str(tmp_path / "adapters"), base_checkpoint=str(base_dir))
    files = sorted(os.listdir(path))
    assert files == [lora.ADAPTER_CONFIG, lora.ADAPTER_FILE]
    cfg = lora.read_adapter_config(path)
    assert (cfg["rank"], cfg["alpha"], cfg["targets"]) == (3, 6.0, ["attn.c_q", "attn.c_k", "mlp.c_proj"])
    assert lora.base_checkpoint_of(path) == os.path.join(str(tmp_path), "base")
    sd = torch.load(os.path.join(path, lora.ADAPTER_FILE), weights_only=True)
    assert all(k.endswith((".lora_A", ".lora_B")) for k in sd) and len(sd) == 2 * 3 * 2
    fresh = tiny()  # same base weights (same seed), no adapters yet
    lora.load_adapters(fresh, path)
    assert maxdiff(fresh(x), tuned) <= TOL
    with lora.disable_adapters(fresh):
        assert maxdiff(fresh(x), tiny()(x)) <= TOL


def test_adapters_of_another_shape_are_refused(tmp_path):
    model = tiny()
    lora.apply_lora(model, rank=2, alpha=4)
    path = lora.save_adapters(model, str(tmp_path / "a"))
    other = GPT(GPTConfig(sequence_len=16, vocab_size=97, n_layer=2, n_head=4, n_kv_head=2, n_embd=64))
    with pytest.raises(UserError, match="shape"):
        lora.load_adapters(other, path)


def test_bad_targets_and_rank_are_user_errors():
    with pytest.raises(UserError, match="no linear layer matches"):
        lora.apply_lora(tiny(), targets="attn.c_nope")
    with pytest.raises(UserError, match="rank"):
        lora.apply_lora(tiny(), rank=0)
    assert lora.parse_targets("q,v") == ("attn.c_q", "attn.c_v")
    assert lora.parse_targets("all") == lora.ATTN_TARGETS + lora.MLP_TARGETS


def test_dropout_only_in_training_mode():
    model = tiny()
    x, _ = batch()
    lora.apply_lora(model, rank=4, alpha=8, dropout=0.5)
    train_b(model, 2)
    model.eval()
    a, b = model(x), model(x)
    assert maxdiff(a, b) == 0.0
    model.train()
    assert maxdiff(model(x), model(x)) > 0
