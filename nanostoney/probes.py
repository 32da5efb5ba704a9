"""Probes: measurements and interventions inside the attention module, free when off (each forward
checks the model's `probes` list, empty unless a probe is attached). Each helper is a context manager
that attaches a probe to the GPT inside any DDP or torch.compile wrapper; they nest:
attention_entropy_probe (exact entropy per layer and head), capture (patterns, per-head outputs),
ablate (zero or mean ablation of heads), residuals (the stream entering each block, for the logit lens).
A probe subclasses Probe: on_attn(layer, q, k, v, y, mask) -> y gets q, k, v (B, H, T, head_dim) after
rotary and QK norm (k, v repeated to H heads), the per-head outputs y and the mask (None = causal,
aligned to the last key; else bool, True = visible); on_resid(layer, x). They run eagerly.

Entropy without T x T: with s_j = q.k_j / sqrt(d), H = lse - sum_j p_j s_j, and sum_j p_j s_j is
attention with k in the value slot. For lse a zero "sentinel" key (score 0) goes in front, with values
[1, 0, ...] for real keys and [0, 1, ...] for the sentinel: the output is [sum_j exp(s_j) / Z, 1 / Z, ...],
so lse = log(out[0]) - log(out[1]), a ratio of positive sums (no cancellation; QK norm keeps 1/Z from
underflowing). A zero query in front keeps the fused causal kernel square. Exact to about 1e-6 nats in
float32, to 1e-2 per query in bfloat16.
"""
import math
from contextlib import contextmanager

import torch
import torch.nn.functional as F

from nanostoney.dist import all_reduce_sum
from nanostoney.errors import UserError
from nanostoney.gpt import unwrap

_eager = torch.compiler.disable


def visible(mask, Tq, Tk, device):
    """The bool visibility mask (broadcastable to B, H, Tq, Tk) that the model used."""
    if mask is not None:
        return mask
    return torch.arange(Tk, device=device)[None, :] <= (Tk - Tq) + torch.arange(Tq, device=device)[:, None]


def attention_pattern(q, k, mask=None):
    """Naive float32 softmax(q k^T / sqrt(d)) with the model's mask: (B, H, Tq, Tk)."""
    s = (q.float() @ k.float().transpose(-1, -2)) / math.sqrt(q.size(-1))
    s = s.masked_fill(~visible(mask, q.size(2), k.size(2), q.device), float("-inf"))
    return torch.softmax(s, dim=-1)


@torch.no_grad()
def attention_entropy(q, k, mask=None, dtype=None):
    """Exact entropy (nats) of every query's attention distribution, (B, H, Tq), without
    forming the Tq x Tk matrix: two attention calls. See the module docstring for the maths."""
    B, H, Tq, D = q.shape
    Tk = k.size(2)
    q, k = q.detach().to(dtype or q.dtype), k.detach().to(dtype or q.dtype)
    scale = 1.0 / math.sqrt(D)
    # the model's visibility: None (fused causal kernel) whenever it is plain causal or all-keys
    m = None if mask is None and Tq in (1, Tk) else visible(mask, Tq, Tk, q.device)
    # (1) sum_j p_j k_j: the same attention with k in the value slot
    pk = F.scaled_dot_product_attention(q, k, k, attn_mask=m, is_causal=m is None and Tq > 1)
    # (2) lse: a zero "sentinel" key (score 0) in front; value channel 0 counts real keys,
    # channel 1 the sentinel, so out[0] / out[1] = sum_j exp(s_j)
    v = F.pad(torch.ones_like(k[..., :1]), (0, D - 1))
    sentinel = F.pad(torch.ones_like(k[:, :, :1, :1]), (1, D - 2))
    ks = torch.cat([torch.zeros_like(k[:, :, :1]), k], 2)
    vs = torch.cat([sentinel, v], 2)
    if m is None and Tq == Tk:  # stay square and causal: a zero query in front as well
        qs = torch.cat([torch.zeros_like(q[:, :, :1]), q], 2)
        out = F.scaled_dot_product_attention(qs, ks, vs, is_causal=True)[:, :, 1:]
    else:
        ms = None if m is None else torch.cat([m.new_ones(m.shape[:-1] + (1,)), m], -1)
        out = F.scaled_dot_product_attention(q, ks, vs, attn_mask=ms)
    out = out.float()
    lse = torch.log(out[..., 0]) - torch.log(out[..., 1])
    mean_score = scale * (q.float() * pk.float()).sum(-1)
    return lse - mean_score


class Probe:
    """Base probe: does nothing. Override on_attn() and/or on_resid()."""

    def on_attn(self, layer, q, k, v, y, mask):
        return y

    def on_resid(self, layer, x):
        pass


@contextmanager
def attach(model, probe):
    gpt = unwrap(model)
    gpt.probes.append(probe)
    try:
        yield probe
    finally:
        gpt.probes.remove(probe)


class EntropyProbe(Probe):
    """Attention entropy per layer and head, summed over queries and forwards. `valid`: None
    (every query position counts) or a (B, T) bool mask of the real tokens of the next forward's
    rows, so that right padding adds no made-up queries (GRPO's packed rollouts)."""

    def __init__(self, n_layer, n_head, dtype=None):
        self.dtype, self.valid = dtype, None
        self.sum, self.count = torch.zeros(n_layer, n_head), torch.zeros(())

    @_eager
    def on_attn(self, layer, q, k, v, y, mask):
        h = attention_entropy(q, k, mask, self.dtype)  # (B, H, Tq)
        if self.sum.device != h.device:
            self.sum, self.count = self.sum.to(h.device), self.count.to(h.device)
        if self.valid is None:
            self.sum[layer] += h.sum((0, 2))
            n = h.size(0) * h.size(2)
        else:
            w = self.valid[:, None, -h.size(2):].to(h.device, h.dtype)  # (B, 1, Tq)
            self.sum[layer] += (h * w).sum((0, 2))
            n = w.sum()
        if layer == 0:
            self.count += n
        return y

    @property
    def per_layer_head(self):
        return self.sum / self.count.clamp(min=1)

    def all_reduce(self):
        all_reduce_sum(self.sum)
        all_reduce_sum(self.count)
        return self


def attention_entropy_probe(model, dtype=None):
    c = unwrap(model).config
    return attach(model, EntropyProbe(c.n_layer, c.n_head, dtype))


class CaptureProbe(Probe):
    def __init__(self, n_layer, patterns=True, head_outputs=False):
        self.want_patterns, self.want_outputs = patterns, head_outputs
        self.patterns, self.head_outputs = [None] * n_layer, [None] * n_layer

    @_eager
    def on_attn(self, layer, q, k, v, y, mask):
        with torch.no_grad():
            if self.want_patterns:
                self.patterns[layer] = attention_pattern(q, k, mask)
            if self.want_outputs:
                self.head_outputs[layer] = y.detach().float()
        return y


def capture(model, patterns=True, head_outputs=False):
    """Record (for the last forward) full attention patterns and/or per-head outputs."""
    return attach(model, CaptureProbe(unwrap(model).config.n_layer, patterns, head_outputs))


class AblateProbe(Probe):
    """Ablation per batch row: scale [B or 1, L, H], use_mean [B or 1] (1 = mean, 0 = zero ablation);
    head output y <- s * y + (1 - s) * use_mean * mean, mean [L, H, head_dim]."""

    def __init__(self, scale, mean=None, use_mean=None):
        self.scale, self.mean, self.use_mean = scale, mean, use_mean

    @_eager
    def on_attn(self, layer, q, k, v, y, mask):
        s = self.scale[:, layer].to(y.device, y.dtype)[:, :, None, None]  # [B, H, 1, 1]
        y = y * s
        if self.mean is not None:
            w = (1 - s) * self.use_mean.to(y.device, y.dtype)[:, None, None, None]
            y = y + w * self.mean[layer].to(y.device, y.dtype)[None, :, None, :]
        return y


def head_set_scale(n_layer, n_head, heads):
    """The [n_layer, n_head] scale that ablates `heads`, a list of (layer, head)."""
    s = torch.ones(n_layer, n_head)
    for layer, head in heads:
        s[layer, head] = 0
    return s


def ablate(model, heads=None, scale=None, mean=None):
    """Zero (mean=None) or mean ablation of heads: list of (layer, head), or scale [L, H]."""
    c = unwrap(model).config
    scale = torch.as_tensor(head_set_scale(c.n_layer, c.n_head, heads or []) if scale is None else scale,
                            dtype=torch.float32)
    if tuple(scale.shape) != (c.n_layer, c.n_head):
        raise UserError(f"ablation scale has shape {tuple(scale.shape)}, expected ({c.n_layer}, {c.n_head}) = "
                        f"(n_layer, n_head).")
    return attach(model, AblateProbe(scale[None], mean, torch.ones(1)))


class ResidualProbe(Probe):
    def __init__(self, n_layer):
        self.resid = [None] * (n_layer + 1)

    @_eager
    def on_resid(self, layer, x):
        self.resid[layer] = x.detach()


def residuals(model):
    return attach(model, ResidualProbe(unwrap(model).config.n_layer))
