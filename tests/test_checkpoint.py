"""checkpoint.py: atomic saves, exact resume, LoRA adapter dirs, and the nanochat import."""
import errno
import json
import math
import os
import random
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch

from nanostoney import checkpoint, lora, published
from nanostoney.errors import RunFailed, UserError
from nanostoney.gpt import GPT, GPTConfig

CFG = dict(sequence_len=16, vocab_size=61, n_layer=2, n_head=4, n_kv_head=2, n_embd=32)
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def tiny(seed=0, **over):
    torch.manual_seed(seed)
    model = GPT(GPTConfig(**{**CFG, **over}))
    model.init_weights()
    with torch.no_grad():  # non-zero output projections, so every weight shows in the logits
        for block in model.transformer.h:
            block.attn.c_proj.weight.normal_(0, 0.1)
            block.mlp.c_proj.weight.normal_(0, 0.1)
    return model


def ids(seed=1, B=2, T=10, V=61):
    return torch.randint(0, V, (B, T), generator=torch.Generator().manual_seed(seed))


def maxdiff(a, b):
    return (a - b).abs().max().item()


# -----------------------------------------------------------------------------
# save / load

def test_save_load_round_trip_and_layout(tmp_path):
    model = tiny()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    meta = {"data_sources": ["data/gsm8k/train.jsonl"], "args": {"lr": 1e-3, "api_key": "sekret123"}}
    path = checkpoint.save_checkpoint(str(tmp_path), model, 7, optimizer=opt, meta=meta)
    assert path == os.path.join(str(tmp_path), "step_000007")
    assert sorted(os.listdir(path)) == ["config.json", "meta.json", "model.pt", "optim.pt", "rng.pt"]
    assert open(tmp_path / "latest").read().strip() == "step_000007"
    assert not [e for e in os.listdir(tmp_path) if ".tmp-" in e]
    m = json.load(open(os.path.join(path, "meta.json")))
    assert m["step"] == 7 and m["data_sources"] == ["data/gsm8k/train.jsonl"]
    assert "git_commit" in m and m["args"]["api_key"] == "<redacted>"
    assert "sekret123" not in open(os.path.join(path, "meta.json")).read()
    for where in (str(tmp_path), path):  # run dir (follows latest) or step dir
        loaded, tok, meta2 = checkpoint.load_model(where)
        assert tok is None and meta2["step"] == 7
        assert loaded.config == model.config and not loaded.training
        assert maxdiff(loaded(ids()), model(ids())) == 0.0


def test_latest_follows_newest_and_keep_last_prunes(tmp_path):
    model = tiny()
    for step in (1, 2, 3):
        checkpoint.save_checkpoint(str(tmp_path), model, step, keep_last=2)
    assert sorted(e for e in os.listdir(tmp_path) if e.startswith("step_")) == ["step_000002", "step_000003"]
    assert checkpoint.latest_checkpoint(str(tmp_path)).endswith("step_000003")
    before = (tmp_path / "step_000003" / "model.pt").read_bytes()
    with pytest.raises(UserError, match="already exists"):  # another run's step is never overwritten
        checkpoint.save_checkpoint(str(tmp_path), tiny(), 3)
    assert (tmp_path / "step_000003" / "model.pt").read_bytes() == before
    checkpoint.save_checkpoint(str(tmp_path), model, 3, replace=True)  # --overwrite: replaced whole
    assert checkpoint.latest_checkpoint(str(tmp_path)).endswith("step_000003")
    assert checkpoint.latest_checkpoint(str(tmp_path / "nothing")) is None


def tree_bytes(root):
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_disk_full_during_checkpoint_leaves_the_last_one_intact(tmp_path, monkeypatch):
    """ENOSPC halfway through the optimizer file: one sentence naming the file and the reason,
    the previous checkpoint and `latest` byte for byte as they were, no temporary left."""
    model = tiny()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    checkpoint.save_checkpoint(str(tmp_path), model, 1, optimizer=opt)
    before = tree_bytes(tmp_path)
    real_save = torch.save

    def failing_save(obj, f, *a, **k):
        if getattr(f, "name", str(f)).endswith("optim.pt"):  # weights already written, optimizer not yet
            f.write(b"partial")
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_save(obj, f, *a, **k)

    monkeypatch.setattr(torch, "save", failing_save)
    with pytest.raises(RunFailed) as e:
        checkpoint.save_checkpoint(str(tmp_path), model, 2, optimizer=opt)
    msg = str(e.value)
    assert "optim.pt" in msg and "No space left on device" in msg and "\n" not in msg
    assert tree_bytes(tmp_path) == before  # no partial step, no tmp, latest unchanged
    assert checkpoint.latest_checkpoint(str(tmp_path)).endswith("step_000001")


def test_process_killed_during_save_never_publishes(tmp_path):
    """A real crash (os._exit, no cleanup) between writing and publishing."""
    model = tiny()
    checkpoint.save_checkpoint(str(tmp_path), model, 1)
    script = textwrap.dedent(f"""
        import os, sys
        sys.path.insert(0, {REPO!r})
        from nanostoney import checkpoint
        from nanostoney.gpt import GPT, GPTConfig
        def crash(root):
            os._exit(3)
        checkpoint._fsync_tree = crash
        checkpoint.save_checkpoint({str(tmp_path)!r}, GPT(GPTConfig(**{CFG!r})), 2)
    """)
    r = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert r.returncode == 3, r.stderr[-2000:]
    leftovers = [e for e in os.listdir(tmp_path) if ".tmp-" in e]
    assert leftovers and leftovers[0].startswith("step_000002")  # it died after writing files
    assert checkpoint.latest_checkpoint(str(tmp_path)).endswith("step_000001")
    model2, _, meta = checkpoint.load_model(str(tmp_path))
    assert meta["step"] == 1
    checkpoint.save_checkpoint(str(tmp_path), model, 2)  # the next save clears the debris
    assert not [e for e in os.listdir(tmp_path) if ".tmp-" in e]


def test_missing_paths_are_user_errors(tmp_path):
    with pytest.raises(UserError, match="does not exist"):
        checkpoint.load_model(str(tmp_path / "nope"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match="not a checkpoint"):
        checkpoint.load_model(str(tmp_path / "empty"))
    with pytest.raises(UserError, match="does not exist"):
        checkpoint.load_checkpoint(str(tmp_path / "nope"), tiny())
    with pytest.raises(UserError, match="does not exist"):
        published.load_nanochat(str(tmp_path / "nope"))
    with pytest.raises(UserError, match="no nanochat model_XXXXXX.pt"):
        published.load_nanochat(str(tmp_path / "empty"))


def test_shape_mismatch_names_both_shapes(tmp_path):
    path = checkpoint.save_checkpoint(str(tmp_path), tiny(), 1)
    # loading into a model built with another config
    with pytest.raises(UserError) as e:
        checkpoint.load_checkpoint(path, tiny(n_embd=64, n_head=4, n_kv_head=4))
    assert "n_embd=32" in str(e.value) and "n_embd=64" in str(e.value)
    # a config.json that does not describe the weights next to it
    cfg = json.load(open(os.path.join(path, "config.json")))
    cfg["n_layer"] = 3
    json.dump(cfg, open(os.path.join(path, "config.json"), "w"))
    with pytest.raises(UserError) as e:
        checkpoint.load_model(path)
    msg = str(e.value)
    assert "n_layer=2" in msg and "n_layer=3" in msg and msg.count("\n") == 0


# -----------------------------------------------------------------------------
# exact resume

def _data_batch(V=61, B=2, T=8):
    # draws from all three RNGs, so each of them has to be restored for an identical run
    offset = random.randrange(V)
    noise = int(np.random.randint(0, V))
    x = (torch.randint(0, V, (B, T + 1)) + offset + noise) % V
    return x[:, :-1].contiguous(), x[:, 1:].contiguous()


def _steps(model, opt, n):
    losses = []
    for _ in range(n):
        x, y = _data_batch()
        loss = model(x, y)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(loss.item())
    return losses


def _seed_all(s):
    random.seed(s)
    np.random.seed(s)
    torch.manual_seed(s)


def test_resume_continues_the_uninterrupted_run(tmp_path):
    _seed_all(123)
    model = tiny()
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.1)
    _seed_all(5)
    full = _steps(model, opt, 6)

    model = tiny()
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.1)
    _seed_all(5)
    first = _steps(model, opt, 3)
    checkpoint.save_checkpoint(str(tmp_path), model, 3, optimizer=opt)
    _seed_all(999)  # the restarted process: different RNG, fresh objects
    model2 = tiny(seed=77)
    opt2 = torch.optim.AdamW(model2.parameters(), lr=3e-3, weight_decay=0.1)
    meta = checkpoint.load_checkpoint(str(tmp_path), model2, opt2)
    assert meta["step"] == 3
    rest = _steps(model2, opt2, 3)
    assert first == full[:3]
    assert rest == full[3:], (rest, full[3:])  # bit-identical on CPU


def test_resume_without_optimizer_state_diverges(tmp_path):
    """The same check fails when the optimizer is not restored (so the test above can fail)."""
    _seed_all(5)
    model = tiny()
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    full = _steps(model, opt, 4)
    _seed_all(5)
    model = tiny()
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    _steps(model, opt, 2)
    checkpoint.save_checkpoint(str(tmp_path), model, 2, optimizer=opt)
    model2 = tiny()
    opt2 = torch.optim.AdamW(model2.parameters(), lr=3e-3)
    checkpoint.load_checkpoint(str(tmp_path), model2)  # weights + RNG, but a fresh AdamW
    assert _steps(model2, opt2, 2) != full[2:]


# -----------------------------------------------------------------------------
# LoRA checkpoints

def test_lora_adapter_checkpoint_loads_onto_its_base(tmp_path):
    base = tiny()
    base_path = checkpoint.save_checkpoint(str(tmp_path / "base"), base, 10)
    model, _, _ = checkpoint.load_model(base_path)
    lora.apply_lora(model, rank=2, alpha=4, targets="attn,mlp")
    model.train()
    opt = torch.optim.AdamW(lora.lora_parameters(model), lr=1e-2)
    for _ in range(3):
        model(ids(), ids(2)).backward()
        opt.step()
        opt.zero_grad()
    tuned = model(ids()).detach()
    sft = checkpoint.save_checkpoint(str(tmp_path / "sft"), model, 3, optimizer=opt,
                                     base_checkpoint=base_path)
    assert "model.pt" not in os.listdir(sft) and "adapters.pt" in os.listdir(sft)
    assert os.path.getsize(os.path.join(sft, "adapters.pt")) < os.path.getsize(os.path.join(base_path, "model.pt"))
    loaded, _, meta = checkpoint.load_model(str(tmp_path / "sft"))
    assert meta["step"] == 3 and meta["base"]["step"] == 10
    assert maxdiff(loaded(ids()), tuned) <= 1e-5
    with lora.disable_adapters(loaded):
        assert maxdiff(loaded(ids()), base(ids())) <= 1e-5
    # save_adapters' small directory loads the same way
    lora.save_adapters(model, str(tmp_path / "adapters_only"), base_checkpoint=base_path)
    loaded2, _, _ = checkpoint.load_model(str(tmp_path / "adapters_only"))
    assert maxdiff(loaded2(ids()), tuned) <= 1e-5
    # resume of the adapter checkpoint into a base + LoRA model
    model3, _, _ = checkpoint.load_model(base_path)
    lora.apply_lora(model3, rank=2, alpha=4, targets="attn,mlp")
    opt3 = torch.optim.AdamW(lora.lora_parameters(model3), lr=1e-2)
    checkpoint.load_checkpoint(sft, model3, opt3)
    assert maxdiff(model3(ids()), tuned) <= 1e-5


def test_full_checkpoint_with_unmerged_lora_keeps_adapters(tmp_path):
    model = tiny()
    lora.apply_lora(model, rank=2, alpha=4)
    with torch.no_grad():
        for _, m in lora.lora_modules(model):
            m.lora_B.normal_(0, 0.1)
    tuned = model(ids()).detach()
    path = checkpoint.save_checkpoint(str(tmp_path), model, 1)
    loaded, _, _ = checkpoint.load_model(path)
    assert lora.lora_modules(loaded)
    assert maxdiff(loaded(ids()), tuned) <= 1e-6
    lora.remove_lora(model, merge=True)  # merged and removed: saves as a plain checkpoint
    plain = checkpoint.save_checkpoint(str(tmp_path / "merged"), model, 1)
    assert not os.path.exists(os.path.join(plain, "adapter_config.json"))
    loaded, _, _ = checkpoint.load_model(plain)
    assert not lora.lora_modules(loaded) and maxdiff(loaded(ids()), tuned) <= 1e-5


def test_tokenizer_is_copied_into_the_checkpoint(tmp_path):
    tokmod = pytest.importorskip("nanostoney.tokenizer")
    texts = ["hello world", "Stoney Nakoda and math", "2 + 2 = 4"] * 20
    tok = tokmod.Tokenizer.train(texts, vocab_size=280)
    tdir = tmp_path / "tok"
    tok.save(str(tdir))
    model = tiny(vocab_size=max(61, tok.vocab_size))
    path = checkpoint.save_checkpoint(str(tmp_path / "run"), model, 1, tokenizer_dir=str(tdir))
    assert os.path.isdir(os.path.join(path, "tokenizer"))
    _, tok2, _ = checkpoint.load_model(path)
    assert tok2.encode("hello world") == tok.encode("hello world")


# -----------------------------------------------------------------------------
# nanochat import, against an independent reference forward

def ref_nanochat_forward(sd, cfg, idx):
    """nanochat's Oct-2025 GPT forward written out from scratch on a raw state dict (fp32
    compute, rotary tables rounded to bf16 as nanochat keeps them). Shares no code with gpt.py."""
    E, H, Hkv = cfg["n_embd"], cfg["n_head"], cfg["n_kv_head"]
    D = E // H
    B, T = idx.shape
    W = {k: v.float() for k, v in sd.items()}

    def rms(x):
        return x / torch.sqrt((x * x).mean(-1, keepdim=True) + torch.finfo(x.dtype).eps)

    inv = 1.0 / (10000.0 ** (torch.arange(0, D, 2).float() / D))
    ang = torch.arange(T * 10).float()[:, None] * inv[None, :]
    cos = ang.cos().to(torch.bfloat16)[:T].float()[None, :, None, :]
    sin = ang.sin().to(torch.bfloat16)[:T].float()[None, :, None, :]

    def rope(x):
        a, b = x[..., :D // 2], x[..., D // 2:]
        return torch.cat([a * cos + b * sin, -a * sin + b * cos], -1)

    x = rms(W["transformer.wte.weight"][idx])
    causal = torch.ones(T, T, dtype=torch.bool).tril()
    for i in range(cfg["n_layer"]):
        p = f"transformer.h.{i}."
        h = rms(x)
        q = (h @ W[p + "attn.c_q.weight"].T).view(B, T, H, D)
        k = (h @ W[p + "attn.c_k.weight"].T).view(B, T, Hkv, D)
        v = (h @ W[p + "attn.c_v.weight"].T).view(B, T, Hkv, D)
        q, k = rms(rope(q)), rms(rope(k))
        k = k.repeat_interleave(H // Hkv, dim=2)
        v = v.repeat_interleave(H // Hkv, dim=2)
        att = torch.einsum("bthd,bshd->bhts", q, k) / math.sqrt(D)
        att = att.masked_fill(~causal, float("-inf")).softmax(-1)
        y = torch.einsum("bhts,bshd->bthd", att, v).reshape(B, T, E)
        x = x + y @ W[p + "attn.c_proj.weight"].T
        h = rms(x)
        x = x + (torch.relu(h @ W[p + "mlp.c_fc.weight"].T) ** 2) @ W[p + "mlp.c_proj.weight"].T
    logits = rms(x) @ W["lm_head.weight"].T
    return 15.0 * torch.tanh(logits / 15.0)


def write_nanochat_checkpoint(directory, cfg, step, seed):
    """What nanochat's save_checkpoint leaves: model_XXXXXX.pt (a torch.compile'd model's state
    dict, embedding in bf16 as on GPU) and meta_XXXXXX.json with model_config."""
    g = torch.Generator().manual_seed(seed)
    E, V, H, Hkv = cfg["n_embd"], cfg["vocab_size"], cfg["n_head"], cfg["n_kv_head"]
    D = E // H

    def mat(o, i):
        return torch.randn(o, i, generator=g) / math.sqrt(i)

    sd = {"transformer.wte.weight": torch.randn(V, E, generator=g).to(torch.bfloat16),
          "lm_head.weight": mat(V, E) * 3}
    for i in range(cfg["n_layer"]):
        p = f"transformer.h.{i}."
        sd.update({p + "attn.c_q.weight": mat(H * D, E), p + "attn.c_k.weight": mat(Hkv * D, E),
                   p + "attn.c_v.weight": mat(Hkv * D, E), p + "attn.c_proj.weight": mat(E, E),
                   p + "mlp.c_fc.weight": mat(4 * E, E), p + "mlp.c_proj.weight": mat(E, 4 * E)})
    os.makedirs(directory, exist_ok=True)
    torch.save({"_orig_mod." + k: v for k, v in sd.items()}, os.path.join(directory, f"model_{step:06d}.pt"))
    with open(os.path.join(directory, f"meta_{step:06d}.json"), "w") as f:
        json.dump({"step": step, "val_bpb": 0.9, "model_config": cfg,
                   "user_config": {"depth": cfg["n_layer"]}, "device_batch_size": 32}, f)
    return sd


NANO_CFG = {"sequence_len": 64, "vocab_size": 71, "n_layer": 2, "n_head": 4, "n_kv_head": 2, "n_embd": 64}


def test_nanochat_checkpoint_imports_with_matching_logits(tmp_path):
    d = str(tmp_path / "base_checkpoints" / "d2")
    write_nanochat_checkpoint(d, NANO_CFG, 50, seed=1)
    sd = write_nanochat_checkpoint(d, NANO_CFG, 200, seed=2)  # the highest step must win
    idx = ids(3, B=2, T=24, V=NANO_CFG["vocab_size"])
    ref = ref_nanochat_forward(sd, NANO_CFG, idx)
    model, tok, meta = published.load_nanochat(d)
    assert tok is None and meta["step"] == 200 and meta["source"] == "nanochat"
    assert maxdiff(model(idx), ref) <= 1e-4
    # load_model detects the format by its files, also from nanochat's base_checkpoints/ (deepest d<N>)
    write_nanochat_checkpoint(str(tmp_path / "base_checkpoints" / "d1"), {**NANO_CFG, "n_layer": 1}, 9, seed=3)
    for where in (d, str(tmp_path / "base_checkpoints")):
        model2, _, meta2 = checkpoint.load_model(where)
        assert meta2["step"] == 200 and maxdiff(model2(idx), ref) <= 1e-4
    # the rotary precision matters at this tolerance: fp32 tables would not match
    model.cos, model.sin = model.cos.float(), model.sin.float()
    inv = 1.0 / (10000 ** (torch.arange(0, 16, 2).float() / 16))
    ang = torch.arange(model.cos.size(1)).float()[:, None] * inv[None]
    model.cos, model.sin = ang.cos()[None, :, None], ang.sin()[None, :, None]
    assert maxdiff(model(idx), ref) > 1e-4


def test_nanochat_checkpoint_of_another_shape_is_refused(tmp_path):
    d = str(tmp_path / "d2")
    write_nanochat_checkpoint(d, NANO_CFG, 10, seed=1)
    meta_path = os.path.join(d, "meta_000010.json")
    meta = json.load(open(meta_path))
    meta["model_config"]["n_embd"] = 128
    json.dump(meta, open(meta_path, "w"))
    with pytest.raises(UserError) as e:
        published.load_nanochat(d)
    assert "n_embd=64" in str(e.value) and "n_embd=128" in str(e.value)
    meta["model_config"] = {**NANO_CFG, "window_pattern": "SSSL"}
    json.dump(meta, open(meta_path, "w"))
    with pytest.raises(UserError, match="window_pattern"):
        published.load_nanochat(d)
    os.remove(meta_path)
    with pytest.raises(UserError, match="meta_000010.json"):
        published.load_nanochat(d)


def test_nanochat_tokenizer_pkl_is_found_next_to_the_checkpoints(tmp_path, monkeypatch):
    """nanochat's layout: <base>/tokenizer/tokenizer.pkl beside <base>/base_checkpoints/d2.
    The pickle is made the way tiktoken pickles an Encoding (tiktoken itself is not needed)."""
    pytest.importorskip("nanostoney.tokenizer")
    import pickle
    import types
    specials = ["<|bos|>", "<|user_start|>", "<|user_end|>", "<|assistant_start|>", "<|assistant_end|>",
                "<|python_start|>", "<|python_end|>", "<|output_start|>", "<|output_end|>"]

    class Encoding:  # stands in for tiktoken.core.Encoding: its pickled state is its constructor args
        def __getstate__(self):
            return {"name": "rustbpe", "pat_str": r"\s+|\S+",
                    "mergeable_ranks": {bytes([i]): i for i in range(256)},
                    "special_tokens": {s: 256 + i for i, s in enumerate(specials)}}

    fake = types.ModuleType("tiktoken.core")
    Encoding.__module__, Encoding.__qualname__ = "tiktoken.core", "Encoding"
    fake.Encoding = Encoding
    pkg = types.ModuleType("tiktoken")
    pkg.core = fake
    monkeypatch.setitem(sys.modules, "tiktoken", pkg)
    monkeypatch.setitem(sys.modules, "tiktoken.core", fake)
    (tmp_path / "tokenizer").mkdir()
    with open(tmp_path / "tokenizer" / "tokenizer.pkl", "wb") as f:
        pickle.dump(Encoding(), f)
    monkeypatch.delitem(sys.modules, "tiktoken.core")
    monkeypatch.delitem(sys.modules, "tiktoken")
    cfg = {**NANO_CFG, "vocab_size": 256 + len(specials)}
    write_nanochat_checkpoint(str(tmp_path / "base_checkpoints" / "d2"), cfg, 5, seed=4)
    model, tok, _ = published.load_nanochat(str(tmp_path / "base_checkpoints" / "d2"))
    assert tok is not None and tok.vocab_size == cfg["vocab_size"]
    assert tok.encode("hi") == [104, 105] and tok.token_id("<|assistant_end|>") == 260
    # a tokenizer bigger than the model's vocabulary is refused
    small = {**NANO_CFG, "vocab_size": 200}
    write_nanochat_checkpoint(str(tmp_path / "base_checkpoints" / "d3"), small, 5, seed=4)
    with pytest.raises(UserError, match="vocab_size=200"):
        published.load_nanochat(str(tmp_path / "base_checkpoints" / "d3"))
