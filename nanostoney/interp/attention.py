"""Attention and the logit lens at the answer slot: scores of attention patterns (pure functions of
p [..., Tq, Tk], rows summing to 1), the probes that collect them in one forward, and the
answer's log-prob and rank read from every layer's residual stream."""
import numpy as np
import torch

from nanostoney import probes
from nanostoney.gpt import unwrap
from nanostoney.interp.definitions import LEXICAL_REGIONS, ROLE_THRESHOLDS, STRUCT_REGIONS


def pattern_entropy(p, dim=-1):
    """Entropy in nats of attention distributions along `dim` (0 log 0 = 0)."""
    return -(p * torch.log(p.clamp_min(1e-30))).sum(dim)


def previous_token_score(p):
    """[..., T, T] causal pattern -> [...]: mean over queries i >= 1 of p[i, i-1]."""
    return torch.diagonal(p, offset=-1, dim1=-2, dim2=-1).mean(-1)


def normalized_entropy(p):
    """[..., T, T] causal pattern -> [...]: mean over queries i >= 1 of H_i / log(i + 1), the entropy
    as a share of its maximum over the i + 1 visible keys (free of the growth with prompt length)."""
    T = p.size(-1)
    return (pattern_entropy(p[..., 1:, :]) / torch.log(torch.arange(2, T + 1, device=p.device, dtype=p.dtype))).mean(-1)


def sink_score(p):
    """[..., T, T] -> [...]: mean over queries i >= 1 of the mass on key 0."""
    return p[..., 1:, 0].mean(-1)


def induction_score(p, n_rep, start=1):
    """[..., T, T] on a sequence prefix(start) + R + R with len(R) = n_rep -> [...]: mean over the
    second copy's tokens of the mass on the token after the same token's first occurrence."""
    j = torch.arange(n_rep, device=p.device)
    return p[..., start + n_rep + j, start + 1 + j].mean(-1)


def region_mass(rows, labels, n_regions):
    """rows [..., T] attention, labels [T] region ids (-1 = none) -> [..., R] mass per region."""
    labels = torch.as_tensor(labels, device=rows.device)
    return rows @ (torch.nn.functional.one_hot(labels.clamp(min=0), n_regions).to(rows.dtype)
                   * (labels >= 0)[:, None].to(rows.dtype))


def classify_heads(scores):
    """{role: [(layer, head), ...]} for every role score map [L, H] at or above its threshold."""
    return {role: [(int(l), int(h)) for l, h in zip(*np.nonzero(np.asarray(s) >= ROLE_THRESHOLDS[role]))]
            for role, s in scores.items() if role in ROLE_THRESHOLDS and s is not None}


class ItemProbe(probes.Probe):
    """One forward of one prompt: per layer the pattern scores, the answer row of every head's pattern,
    per-head output sums (for mean ablation) and, when asked, the full patterns (for figures)."""

    def __init__(self, n_layer, pos, keep_full=False):
        self.pos, self.keep_full = pos, keep_full
        self.prev, self.sink, self.rows, self.full, self.out_sum, self.norm_ent = ([None] * n_layer for _ in range(6))

    @torch.compiler.disable
    def on_attn(self, layer, q, k, v, y, mask):
        with torch.no_grad():
            p = probes.attention_pattern(q[:1], k[:1], mask)[0]  # [H, T, T]
            self.prev[layer] = previous_token_score(p).cpu()
            self.sink[layer] = sink_score(p).cpu()
            self.norm_ent[layer] = normalized_entropy(p).cpu()
            self.rows[layer] = p[:, self.pos].cpu()
            if self.keep_full:
                self.full[layer] = p.half().cpu()
            self.out_sum[layer] = y[0].float().sum(1).cpu()  # [H, head_dim]
        return y


@torch.no_grad()
def analyse_item(model, item, keep_full=False):
    """Every per-example statistic of one item (numpy arrays), plus head-output sums."""
    gpt = unwrap(model)
    probe = ItemProbe(gpt.config.n_layer, item.pos, keep_full)
    with probes.attention_entropy_probe(gpt, dtype=torch.float32) as ent, probes.attach(gpt, probe), \
            probes.residuals(gpt) as res:
        gpt(torch.tensor([item.ids], device=gpt.get_device()))
    rows = torch.stack(probe.rows).float()  # [L, H, T]
    rec = {"entropy": ent.per_layer_head.cpu().numpy(), "entropy_answer": pattern_entropy(rows).numpy(),
           "entropy_norm": torch.stack(probe.norm_ent).numpy(),
           "entropy_answer_norm": (pattern_entropy(rows) / np.log(len(item.ids))).numpy(),
           "previous_token": torch.stack(probe.prev).numpy(), "sink": torch.stack(probe.sink).numpy(),
           "struct_mass": region_mass(rows, item.struct, len(STRUCT_REGIONS)).numpy(),
           "lex_mass": region_mass(rows, item.lexical, len(LEXICAL_REGIONS)).numpy(),
           "struct_share": np.bincount(item.struct, minlength=len(STRUCT_REGIONS)) / len(item.ids),
           "lex_share": np.bincount(item.lexical, minlength=len(LEXICAL_REGIONS)) / len(item.ids)}
    if item.answer_index is not None and item.option is not None:
        on_opt = region_mass(rows, torch.as_tensor(item.option), 5).numpy()  # [L, H, 5]
        rec["option_lookup"] = on_opt[..., item.answer_index]
        rec["option_share"] = on_opt[..., item.answer_index] / np.maximum(on_opt.sum(-1), 1e-9)
    # logit lens: every depth's residual at the answer position through the final norm + lm_head
    logits = gpt.lm_logits(torch.stack([r[0, item.pos] for r in res.resid]))  # [L+1, V]
    rank = (logits > logits[:, item.target][:, None]).sum(-1) + 1
    rec["lens_logprob"] = torch.log_softmax(logits, -1)[:, item.target].cpu().numpy()
    rec["lens_top1"] = (rank == 1).float().cpu().numpy()
    rec["lens_log10_rank"] = torch.log10(rank.float()).cpu().numpy()
    if item.letter_ids is not None:
        rec["lens_choice"] = (logits[:, item.letter_ids].argmax(-1) == item.answer_index).float().cpu().numpy()
    rec["lens_decodable"] = decodable(logits, item.target)  # one rule, every family
    rec["lens_embedding"] = float(rec["lens_decodable"][0])  # a baseline: word frequency, not reading
    rec["lens_first"] = first_decodable(rec["lens_decodable"])
    rec["accuracy"] = float(rec.get("lens_choice", rec["lens_top1"])[-1])
    rec["answer_logprob"] = float(rec["lens_logprob"][-1])
    return rec, torch.stack(probe.out_sum), torch.stack(probe.full).numpy() if keep_full else None


def decodable(logits, target):
    """[depths] 1.0 where the answer token is top-1 of the whole vocabulary in the lens logits [depths, V]:
    the report's one decodability rule (a margin among candidates would differ for letters and numbers)."""
    rank = (logits > logits[:, target][:, None]).sum(-1) + 1
    return (rank == 1).float().cpu().numpy()


def first_decodable(decodable):
    """The first block depth (1..n_layer) from which the answer stays decodable through the output (NaN
    when the output does not decode it); depth 0 "decodes" a frequent answer word without reading."""
    d = np.asarray(decodable)[1:] > 0.5
    if not d[-1]:
        return float("nan")
    wrong = np.nonzero(~d)[0]
    return float(wrong[-1] + 2) if wrong.size else 1.0


@torch.no_grad()
def induction_scores(model, vocab_size, n_seqs=16, n_rep=32, seed=0, bos_id=None):
    """Per random sequence [N, L, H] induction and previous-token scores on <|bos|> + R + R."""
    gpt = unwrap(model)
    n_rep = max(2, min(n_rep, (gpt.config.sequence_len - 1) // 2))
    r = torch.randint(0, vocab_size, (n_seqs, n_rep), generator=torch.Generator().manual_seed(seed))
    x = torch.cat([torch.full((n_seqs, 1), bos_id if bos_id is not None else 0), r, r], 1).to(gpt.get_device())
    with probes.capture(gpt) as cap:
        gpt(x)
    scores = [torch.stack([induction_score(p, n_rep), previous_token_score(p)]).cpu() for p in cap.patterns]
    s = torch.stack(scores, 2).numpy()  # [2, N, L, H]
    return {"induction": s[0], "previous_token_random": s[1], "n_rep": n_rep}


# copying, read off the loss

@torch.no_grad()
def induction_gain(model, tok, n=16, length=24, seed=0, high=None, shuffled=False):
    """Loss on the first copy of n random token sequences minus the loss on the second copy
    (tokens from the ordinary range, or from 256 up to `high`). shuffled=True permutes each second
    copy: the control for a model that only raises the tokens it has seen anywhere in the context,
    which gains as much there, while a model that copies the next token gains less."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(256, high or tok.vocab_size - len(tok.special_tokens), (n, length),  # ordinary tokens
                      generator=g)
    second = torch.stack([row[torch.randperm(length, generator=g)] for row in x]) if shuffled else x
    seq = torch.cat([torch.full((n, 1), tok.bos_id), x, second], 1).to(model.get_device())
    logp = torch.log_softmax(model(seq).float(), -1)
    loss = -logp[:, :-1].gather(-1, seq[:, 1:, None]).squeeze(-1).cpu()
    return (loss[:, :length].mean() - loss[:, length + 1:].mean()).item()


def order_gain(model, tok, **kw):
    """What copying in order adds: the loss on a shuffled second copy minus the loss on the exact
    one (induction gain minus its shuffled control). Near 0 for a model that only raises the
    tokens of its context, whatever its induction gain."""
    return induction_gain(model, tok, **kw) - induction_gain(model, tok, shuffled=True, **kw)


def order_gain_by_head(model, tok, **kw):
    """[n_layer, n_head]: the order gain lost when that one head's output is zeroed. The heads the
    copying runs through lose most of it; a model whose copying is spread over many heads loses
    little to any one (then zero sets of heads with probes.ablate)."""
    c = unwrap(model).config
    full = order_gain(model, tok, **kw)
    lost = np.zeros((c.n_layer, c.n_head))
    for layer in range(c.n_layer):
        for head in range(c.n_head):
            with probes.ablate(model, [(layer, head)]):
                lost[layer, head] = full - order_gain(model, tok, **kw)
    return lost
