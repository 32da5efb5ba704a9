"""The GPT: nanochat's October-2025 architecture, written out so every line can be read.

Token embedding, parameter-free RMSNorm, blocks x + attn(norm(x)), x + mlp(norm(x)); attention
bias-free with rotary embeddings, QK norm, GQA and causal SDPA; MLP 4x ReLU^2; final norm, untied
lm_head, logits soft-capped to 15*tanh(z/15) in float32. Module names match nanochat's, so its
state dicts load; rotary tables in bfloat16 as nanochat's (GPTConfig.norm_eps and rope_dtype give
transformers' NanoChat arithmetic, set by published.py). The caller chooses the precision.

KV cache (engine.KVCache): forward reads `cache.pos` and `cache.pad` (left padding per row, whose
first real token gets rotary position 0), calls `cache.insert(layer, k, v)` and advances pos.
Probes (probes.py) hang on `model.probes`, a list shared by every attention module; while it is
empty a forward only checks `if self.probes:` and torch.compile sees no probe code.
"""
import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

SOFTCAP = 15.0


@dataclass
class GPTConfig:
    sequence_len: int = 1024
    vocab_size: int = 50304
    n_layer: int = 12
    n_head: int = 6      # query heads
    n_kv_head: int = 6   # key/value heads (GQA when fewer than n_head)
    n_embd: int = 768
    norm_eps: float | None = None  # None: torch's default, the dtype's machine epsilon (nanochat)
    rope_dtype: str = "bfloat16"   # "bfloat16" (nanochat) or "float32" (transformers)


NUMERICS = ("norm_eps", "rope_dtype")  # optional in a saved config: older checkpoints lack them


def config_for_depth(depth, vocab_size, sequence_len, head_dim=128):
    """nanochat's sizing rule: width = 64 * depth, ceil(width / head_dim) heads, or the next count
    that splits the width into even-sized heads where nanochat would fail (depth 5: 320 / 3)."""
    n_embd = depth * 64
    n_head = max(1, math.ceil(n_embd / head_dim))
    while n_embd % n_head or (n_embd // n_head) % 2:
        n_head += 1
    return GPTConfig(sequence_len=sequence_len, vocab_size=vocab_size, n_layer=depth,
                     n_head=n_head, n_kv_head=n_head, n_embd=n_embd)


def norm(x, eps=None):
    # RMSNorm without learnable weights
    return F.rms_norm(x, (x.size(-1),), eps=eps)


def apply_rotary(x, cos, sin):
    # x: (B, T, H, D); cos/sin broadcast to (B, T, 1, D/2). Rotate pairs (i, i + D/2).
    d = x.shape[-1] // 2
    x1, x2 = x[..., :d], x[..., d:]
    y1 = x1 * cos + x2 * sin
    y2 = x1 * (-sin) + x2 * cos
    return torch.cat([y1, y2], -1).to(x.dtype)


def repeat_kv(x, n_rep):
    # (B, Hkv, T, D) -> (B, Hkv * n_rep, T, D), each kv head serving n_rep consecutive q heads
    if n_rep == 1:
        return x
    B, H, T, D = x.shape
    return x[:, :, None].expand(B, H, n_rep, T, D).reshape(B, H * n_rep, T, D)


def softcap(logits):
    return SOFTCAP * torch.tanh(logits / SOFTCAP)


class CausalSelfAttention(nn.Module):
    def __init__(self, config, layer_idx, probes):
        super().__init__()
        assert config.n_embd % config.n_head == 0
        assert config.n_kv_head <= config.n_head and config.n_head % config.n_kv_head == 0
        self.layer_idx = layer_idx
        self.n_head = config.n_head
        self.n_kv_head = config.n_kv_head
        self.head_dim = config.n_embd // config.n_head
        self.c_q = nn.Linear(config.n_embd, self.n_head * self.head_dim, bias=False)
        self.c_k = nn.Linear(config.n_embd, self.n_kv_head * self.head_dim, bias=False)
        self.c_v = nn.Linear(config.n_embd, self.n_kv_head * self.head_dim, bias=False)
        self.c_proj = nn.Linear(config.n_embd, config.n_embd, bias=False)
        self.eps = config.norm_eps
        self.probes = probes  # the model's shared list; empty = probes off

    def forward(self, x, cos_sin, kv_cache=None, mask=None):
        B, T, C = x.shape
        q = self.c_q(x).view(B, T, self.n_head, self.head_dim)
        k = self.c_k(x).view(B, T, self.n_kv_head, self.head_dim)
        v = self.c_v(x).view(B, T, self.n_kv_head, self.head_dim)
        cos, sin = cos_sin
        q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        q, k = norm(q, self.eps), norm(k, self.eps)
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)  # (B, H, T, D)
        if kv_cache is not None:
            k, v = kv_cache.insert(self.layer_idx, k, v)
        n_rep = self.n_head // self.n_kv_head
        k, v = repeat_kv(k, n_rep), repeat_kv(v, n_rep)
        # mask None: causal aligned to the end (plain causal when Tq == Tk, everything for one decoded
        # token); chunks after a cache and left padding get an explicit bool mask.
        if mask is not None:
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        else:
            y = F.scaled_dot_product_attention(q, k, v, is_causal=q.size(2) > 1)
        if self.probes:  # per-head outputs y: (B, H, Tq, D), before the heads are mixed
            for p in self.probes:
                y = p.on_attn(self.layer_idx, q, k, v, y, mask)
        y = y.transpose(1, 2).contiguous().view(B, T, -1)
        return self.c_proj(y)


class MLP(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.c_fc = nn.Linear(config.n_embd, 4 * config.n_embd, bias=False)
        self.c_proj = nn.Linear(4 * config.n_embd, config.n_embd, bias=False)

    def forward(self, x):
        return self.c_proj(F.relu(self.c_fc(x)).square())


class Block(nn.Module):
    def __init__(self, config, layer_idx, probes):
        super().__init__()
        self.attn = CausalSelfAttention(config, layer_idx, probes)
        self.mlp = MLP(config)
        self.eps = config.norm_eps

    def forward(self, x, cos_sin, kv_cache=None, mask=None):
        x = x + self.attn(norm(x, self.eps), cos_sin, kv_cache, mask)
        x = x + self.mlp(norm(x, self.eps))
        return x


class GPT(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.config = config
        self.probes = []  # see probes.py; shared with every attention module
        self.transformer = nn.ModuleDict(dict(
            wte=nn.Embedding(config.vocab_size, config.n_embd),
            h=nn.ModuleList([Block(config, i, self.probes) for i in range(config.n_layer)]),
        ))
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        # Rotary tables for 10x the training length (cheap), so generation can run past it.
        self.rotary_seq_len = config.sequence_len * 10
        cos, sin = self._rotary_tables(self.rotary_seq_len, config.n_embd // config.n_head)
        self.register_buffer("cos", cos, persistent=False)
        self.register_buffer("sin", sin, persistent=False)

    @torch.no_grad()
    def init_weights(self):
        """nanochat's init: residual output projections zero (blocks start as the identity), lm_head tiny."""
        for m in self.modules():
            if isinstance(m, nn.Linear):
                fan_out, fan_in = m.weight.shape
                std = 1.0 / math.sqrt(fan_in) * min(1.0, math.sqrt(fan_out / fan_in))
                nn.init.normal_(m.weight, mean=0.0, std=std)
            elif isinstance(m, nn.Embedding):
                nn.init.normal_(m.weight, mean=0.0, std=1.0)
        nn.init.normal_(self.lm_head.weight, mean=0.0, std=0.001)
        for block in self.transformer.h:
            nn.init.zeros_(block.attn.c_proj.weight)
            nn.init.zeros_(block.mlp.c_proj.weight)
        cos, sin = self._rotary_tables(self.rotary_seq_len, self.config.n_embd // self.config.n_head)
        self.cos, self.sin = cos.to(self.cos.device), sin.to(self.sin.device)

    def _rotary_tables(self, seq_len, head_dim, base=10000):
        device = self.transformer.wte.weight.device
        channel = torch.arange(0, head_dim, 2, dtype=torch.float32, device=device)
        inv_freq = 1.0 / (base ** (channel / head_dim))
        t = torch.arange(seq_len, dtype=torch.float32, device=device)
        freqs = torch.outer(t, inv_freq)
        # bfloat16, as nanochat: an imported model reproduces its logits only with these values
        dtype = getattr(torch, self.config.rope_dtype)
        cos, sin = freqs.cos().to(dtype), freqs.sin().to(dtype)
        return cos[None, :, None, :], sin[None, :, None, :]  # (1, T, 1, D/2)

    def get_device(self):
        return self.transformer.wte.weight.device

    def num_params(self):
        return sum(p.numel() for p in self.parameters())

    def estimate_flops(self):
        """Training FLOPs per token as nanochat / PaLM appendix B (attention over the full T x T)."""
        c = self.config
        n = self.num_params() - self.transformer.wte.weight.numel()
        return 6 * n + 12 * c.n_layer * c.n_head * (c.n_embd // c.n_head) * c.sequence_len

    def _rotary_and_mask(self, B, T, kv_cache):
        if kv_cache is None:
            assert T <= self.cos.size(1), f"sequence of {T} tokens is longer than the rotary tables"
            return (self.cos[:, :T], self.sin[:, :T]), None
        t0, pad = kv_cache.pos, kv_cache.pad
        assert t0 + T <= self.cos.size(1), f"sequence of {t0 + T} tokens is longer than the rotary tables"
        slots = torch.arange(t0, t0 + T, device=self.cos.device)
        if pad is None:
            cos_sin = self.cos[:, t0:t0 + T], self.sin[:, t0:t0 + T]
            mask = None
            if T > 1 and t0 > 0:  # a chunk after cached tokens: all of the prefix + causal
                keys = torch.arange(t0 + T, device=slots.device)
                mask = keys[None, :] <= slots[:, None]  # (T, Tk)
            return cos_sin, mask
        # left padding: row b's slot s holds position s - pad[b]; pad keys are hidden, except
        # that a pad query sees itself so its softmax row is never empty (its output is unused)
        pos = (slots[None, :] - pad[:, None]).clamp(min=0)  # (B, T)
        cos_sin = self.cos[0, pos], self.sin[0, pos]                      # (B, T, 1, D/2)
        keys = torch.arange(t0 + T, device=slots.device)
        causal = keys[None, :] <= slots[:, None]                           # (T, Tk)
        real = keys[None, :] >= pad[:, None]                               # (B, Tk)
        diag = keys[None, :] == slots[:, None]                             # (T, Tk)
        mask = causal[None] & (real[:, None, :] | diag[None])              # (B, T, Tk)
        return cos_sin, mask[:, None]                                      # (B, 1, T, Tk)

    def trunk(self, idx, kv_cache=None):
        """Token ids (B, T) -> residual stream after the last block (before the final norm)."""
        B, T = idx.shape
        cos_sin, mask = self._rotary_and_mask(B, T, kv_cache)
        x = self.transformer.wte(idx)
        if not torch.is_autocast_enabled(x.device.type):
            # a bf16 embedding (train.place on CUDA) read by an fp32 forward (sampling, evaluation)
            x = x.to(self.lm_head.weight.dtype)
        x = norm(x, self.config.norm_eps)
        if self.probes:
            for p in self.probes:
                p.on_resid(0, x)
        for i, block in enumerate(self.transformer.h):
            x = block(x, cos_sin, kv_cache, mask)
            if self.probes:
                for p in self.probes:
                    p.on_resid(i + 1, x)
        if kv_cache is not None:
            kv_cache.pos += T
        return x

    def lm_logits(self, x):
        """Residual stream -> soft-capped float32 logits (on an earlier layer's: the logit lens)."""
        return softcap(self.lm_head(norm(x, self.config.norm_eps)).float())

    def forward(self, idx, targets=None, kv_cache=None, loss_reduction="mean"):
        logits = self.lm_logits(self.trunk(idx, kv_cache))
        if targets is None:
            return logits
        return F.cross_entropy(logits.view(-1, logits.size(-1)), targets.view(-1),
                               ignore_index=-1, reduction=loss_reduction)


def unwrap(model):
    """The GPT inside DDP (.module) and torch.compile (._orig_mod) wrappers, in any nesting."""
    while True:
        if hasattr(model, "_orig_mod"):
            model = model._orig_mod
        elif isinstance(getattr(model, "module", None), nn.Module):
            model = model.module
        else:
            return model
