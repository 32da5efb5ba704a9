"""Probes: measurements and interventions inside the attention module.

Off by default and free when off: the model keeps a list `model.probes` (shared by every
attention module), empty unless a probe is attached; each forward pays one `if` on it.
Every helper below is a context manager that attaches a probe to the GPT inside any DDP or
torch.compile wrapper and detaches it on exit; they nest (e.g. ablate + capture together).

    from nanostoney import probes

    with probes.attention_entropy_probe(model) as ent:   # (a) exact attention entropy, no T x T
        loss = model(x, y)                          #     any number of forwards (grad accum)
    ent.per_layer_head                              # FloatTensor [n_layer, n_head] in nats,
                                                    # mean over batch, query positions, forwards
    ent.all_reduce()                                # optional, under DDP: mean over all ranks
    ent.valid = real                                # before a forward of right-padded rows:
                                                    # (B, T) bool, only real queries count

    with probes.capture(model, head_outputs=True) as cap:   # (b) short prompts only
        model(x)
    cap.patterns[l]        # [B, H, Tq, Tk] float32 attention probabilities of layer l
    cap.head_outputs[l]    # [B, H, Tq, head_dim] per-head outputs before c_proj (means for
                           # mean ablation: cap.head_outputs[l].mean((0, 2)) -> [H, head_dim])

    with probes.region_mass(model, regions, query_pos=None) as rm:   # (c)
        model(x)           # regions: LongTensor [B, T] (or [T]) of region ids, -1 = unlabelled
    rm.mass                # [n_layer, B, H, Tq, R] mass from each query onto each region, or
                           # [n_layer, B, H, R] when query_pos (int or LongTensor [B]) is given.
                           # A row sums to 1 when every key it sees is labelled.

    with probes.ablate(model, heads=[(layer, head), ...]):           # zero ablation
    with probes.ablate(model, heads=[...], mean=means):              # mean ablation,
        model(x)           # means: [n_layer, n_head, head_dim]; or pass scale=[n_layer, n_head]
                           # directly: head output y <- s * y + (1 - s) * mean  (mean 0 if None)

    with probes.residuals(model) as res:          # residual stream, for the logit lens
        model(x)
    res.resid[0]           # [B, T, C] embeddings after the first norm
    res.resid[l + 1]       # [B, T, C] after block l;  model.lm_logits(res.resid[l + 1]) is the
                           # logit lens at layer l, and at the last layer the model's own logits

Write your own probe by subclassing Probe (on_attn(layer, q, k, v, y, mask) -> y and/or
on_resid(layer, x)) and `with probes.attach(model, my_probe):`. In on_attn(), q, k, v are
(B, H, T, head_dim) after rotary and QK norm, k and v already repeated to H heads for GQA;
y (B, H, Tq, head_dim) are the per-head outputs; mask is None (causal aligned to the last key:
query i of Tq sees keys <= Tk - Tq + i) or a bool mask broadcastable to (B, H, Tq, Tk),
True = visible.
Probe methods run eagerly (torch.compiler.disable): a compiled model called with a probe
attached recompiles once for that state, with graph breaks at the probe calls.

The entropy maths (a). For query i, scores s_j = c * q.k_j (c = 1/sqrt(head_dim)) over the
keys it sees, p_j = softmax(s)_j. Its entropy is

    H_i = -sum_j p_j log p_j = lse_i - sum_j p_j s_j,    lse_i = log sum_j exp(s_j)
    sum_j p_j s_j = c * q . (sum_j p_j k_j)               (attention with k in the value slot)

Two attention calls give both terms, each a fused kernel that never forms T x T:
(1) the model's attention with k in the value slot gives sum_j p_j k_j; (2) for lse, put a
"sentinel" key equal to the zero vector in front (its score is 0 whatever the query), with
values [1, 0, 0, ...] for real keys and [0, 1, 0, ...] for the sentinel. With
Z = 1 + sum_j exp(s_j) query i's output is [sum_j exp(s_j) / Z, 1 / Z, 0, ...], so

    lse_i = log(out[0]) - log(out[1])

Both are sums of positive terms, so the log of their ratio is accurate (no 1 - w
cancellation), and QK norm bounds |s| by sqrt(head_dim), so 1/Z cannot underflow. To keep the
fused causal kernel, a zero query goes in front as well: the sequence stays square and
causal, and real query i sees the sentinel and keys 0..i. Values keep the head dim (a wider
one drops CPU kernels to the slow path that forms T x T). Cost per logged step: two forward
attention calls under no_grad, no backward. The result is exact up to rounding: about 1e-6
nats in float32; in bfloat16 (CUDA autocast) up to about 1e-2 nats per query and well under
1e-3 once averaged over positions -- pass dtype=torch.float32 for more, at a higher cost.
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
    i = torch.arange(Tq, device=device)[:, None]
    j = torch.arange(Tk, device=device)[None, :]
    return j <= (Tk - Tq) + i


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
        self.dtype = dtype
        self.sum = torch.zeros(n_layer, n_head)
        self.count = torch.zeros(())
        self.valid = None

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
        self.patterns = [None] * n_layer
        self.head_outputs = [None] * n_layer

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


class RegionMassProbe(Probe):
    def __init__(self, n_layer, regions, n_regions=None, query_pos=None):
        regions = torch.as_tensor(regions, dtype=torch.long)
        self.regions = regions[None] if regions.dim() == 1 else regions  # (B or 1, Tk)
        self.n_regions = int(n_regions if n_regions is not None else self.regions.max() + 1)
        self.query_pos = query_pos
        self.per_layer = [None] * n_layer

    @_eager
    def on_attn(self, layer, q, k, v, y, mask):
        with torch.no_grad():
            if self.regions.size(-1) != k.size(2):
                raise UserError(f"region labels cover {self.regions.size(-1)} tokens but the "
                                f"forward saw {k.size(2)} keys; label every prompt token.")
            p = attention_pattern(q, k, mask)  # (B, H, Tq, Tk)
            labels = self.regions.to(p.device)
            onehot = F.one_hot(labels.clamp(min=0), self.n_regions).float()
            onehot = onehot * (labels >= 0)[..., None]                     # (B|1, Tk, R)
            mass = p @ onehot[:, None]                                       # (B, H, Tq, R)
            if self.query_pos is not None:
                qp = torch.as_tensor(self.query_pos, device=p.device).expand(p.size(0))
                mass = mass[torch.arange(p.size(0), device=p.device), :, qp]  # (B, H, R)
            self.per_layer[layer] = mass
        return y

    @property
    def mass(self):
        return torch.stack(self.per_layer)


def region_mass(model, regions, n_regions=None, query_pos=None):
    return attach(model, RegionMassProbe(unwrap(model).config.n_layer, regions, n_regions, query_pos))


class AblateProbe(Probe):
    def __init__(self, scale, mean=None):
        self.scale, self.mean = scale, mean

    @_eager
    def on_attn(self, layer, q, k, v, y, mask):
        s = self.scale[layer].to(y.device, y.dtype)
        if bool((s == 1).all()):
            return y
        y = y * s[None, :, None, None]
        if self.mean is not None:
            m = self.mean[layer].to(y.device, y.dtype)
            y = y + (1 - s)[None, :, None, None] * m[None, :, None, :]
        return y


def ablate(model, heads=None, scale=None, mean=None):
    """Zero (mean=None) or mean ablation of heads: list of (layer, head), or scale [L, H]."""
    c = unwrap(model).config
    if scale is None:
        scale = torch.ones(c.n_layer, c.n_head)
        for layer, head in heads or []:
            scale[layer, head] = 0.0
    scale = torch.as_tensor(scale, dtype=torch.float32)
    if tuple(scale.shape) != (c.n_layer, c.n_head):
        raise UserError(f"ablation scale has shape {tuple(scale.shape)}, expected "
                        f"({c.n_layer}, {c.n_head}) = (n_layer, n_head).")
    return attach(model, AblateProbe(scale, mean))


class ResidualProbe(Probe):
    def __init__(self, n_layer):
        self.resid = [None] * (n_layer + 1)

    @_eager
    def on_resid(self, layer, x):
        self.resid[layer] = x.detach()


def residuals(model):
    return attach(model, ResidualProbe(unwrap(model).config.n_layer))
