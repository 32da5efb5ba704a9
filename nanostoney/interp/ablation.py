"""Head ablation: the drop in the answer's log-prob when one head, or a set of k heads, is zeroed or
replaced by its mean output. Ablations run batched, one per batch row, each row starting from the
clean residual stream at the first layer it ablates (blocks before it cannot change)."""
import itertools
import math

import numpy as np
import torch

from nanostoney import probes
from nanostoney.dist import map_over_ranks
from nanostoney.gpt import unwrap
from nanostoney.interp.definitions import ABLATION_MODES, HEADLINE_MODE
from nanostoney.interp.patching import blocks_from

RANDOM_SETS = 100  # the least number of random k-head sets behind "top-k heads beat random heads"


@torch.no_grad()
def ablation_logprob_drops(model, ids, target, rows, mean=None, max_batch_tokens=16384):
    """Drop of log p(target) at the last position of `ids` for each ablation in `rows`, a list of
    (scale [L, H], use_mean) with scale 0 on the ablated heads; each chunk of rows is batched with
    one clean row that gives the baseline under the same arithmetic."""
    gpt = unwrap(model)
    L = gpt.config.n_layer
    with probes.residuals(gpt) as res:
        gpt.trunk(torch.tensor([ids], device=gpt.get_device()))
    first = [int((s < 1).any(1).nonzero()[0]) if bool((s < 1).any()) else L for s, _ in rows]
    drops = torch.zeros(len(rows))
    chunk = max(2, max_batch_tokens // len(ids)) - 1
    for layer in sorted(set(first) - {L}):
        idx = [i for i, f in enumerate(first) if f == layer]
        for part in [idx[j:j + chunk] for j in range(0, len(idx), chunk)]:
            scale = torch.stack([torch.ones(L, gpt.config.n_head)] + [rows[i][0] for i in part])
            use_mean = torch.tensor([0.0] + [float(rows[i][1]) for i in part])
            with probes.attach(gpt, probes.AblateProbe(scale, mean, use_mean)):
                h = blocks_from(gpt, res.resid[layer].expand(len(part) + 1, -1, -1), layer)[:, -1]
            lp = torch.log_softmax(gpt.lm_logits(h), -1)[:, target].cpu()
            drops[part] = lp[0] - lp[1:]
    return drops


def single_head_rows(n_layer, n_head, use_mean):
    return [(probes.head_set_scale(n_layer, n_head, [(l, h)]), use_mean) for l in range(n_layer) for h in range(n_head)]


def ablation_drops(model, item, mean=None):
    """[L, H] drop of the answer's log-prob when each head alone is ablated (zero if mean is None)."""
    c = unwrap(model).config
    rows = single_head_rows(c.n_layer, c.n_head, mean is not None)
    return ablation_logprob_drops(model, item.ids, item.target, rows, mean).view(c.n_layer, c.n_head).numpy()


def top_heads(drops, k):
    """The k heads with the largest mean drop, [(layer, head)], largest first."""
    m = np.asarray(drops)
    return [(int(i // m.shape[1]), int(i % m.shape[1])) for i in np.argsort(-m.ravel(), kind="stable")[:k]]


def drops_of(gpt, rows, means):
    """item -> its answer log-prob drops under each ablation row (numpy)."""
    return lambda it: ablation_logprob_drops(gpt, it.ids, it.target, rows, means).numpy()


def ablate_single(gpt, items, means, info=None, wrap=None):
    """Per item: {"ablate_zero", "ablate_mean"}, the [L, H] drops of every head ablated alone."""
    L, H = gpt.config.n_layer, gpt.config.n_head
    single = single_head_rows(L, H, False) + single_head_rows(L, H, True)
    drops = map_over_ranks(drops_of(gpt, single, means), items, info, wrap=wrap)
    return [dict(zip(("ablate_zero", "ablate_mean"), d.reshape(2, L, H))) for d in drops]


def choose_heads(recs, families, k):
    """{mode: {family: its k heads with the largest mean single-head drop}}, chosen on the family's
    selection subset (all its items when that is empty), so the score subset judges them out of sample."""
    topk = {mode: {} for mode in ABLATION_MODES}
    for mode, fam in itertools.product(ABLATION_MODES, families):
        fr = [r for r in recs if r["family"] == fam]
        chosen = [r for r in fr if r["subset"] == "select"] or fr
        topk[mode][fam] = top_heads(np.mean([r[f"ablate_{mode}"] for r in chosen], 0), k)
    return topk


def random_head_sets(n_layer, n_head, k, n_sets, seed):
    """The null's k-head sets: all C(n, k) when there are at most n_sets, else n_sets distinct
    sets drawn afresh (seeded)."""
    n = n_layer * n_head
    if math.comb(n, k) <= n_sets:
        sets = list(itertools.combinations(range(n), k))
    else:
        rng, sets = np.random.default_rng(seed), []
        while len(sets) < n_sets:
            s = tuple(sorted(int(i) for i in rng.choice(n, k, replace=False)))
            if s not in sets:
                sets.append(s)
    return [[(int(i // n_head), int(i % n_head)) for i in s] for s in sets]


def null_complete(n_layer, n_head, k, n_sets):
    """Whether n_sets random k-head sets make the null: RANDOM_SETS of them, or all C(n, k)."""
    return n_sets >= min(RANDOM_SETS, math.comb(n_layer * n_head, k))


def ablate_sets(gpt, items, means, families, topk, random_sets, info=None, wrap=None):
    """Each family's top-k heads, and (headline mode only) the random k-head sets, ablated together.
    Per item: topk_<mode> = {"own", <other family>, "random" (mean over the random sets; NaN
    without a complete null)}."""
    L, H = gpt.config.n_layer, gpt.config.n_head
    sets = {mode: [topk[mode][f] for f in families] + (random_sets if mode == HEADLINE_MODE else [])
            for mode in ABLATION_MODES}
    rows = [(probes.head_set_scale(L, H, hs), mode == "mean") for mode in ABLATION_MODES for hs in sets[mode]]
    drops = map_over_ranks(drops_of(gpt, rows, means), items, info, wrap=wrap)
    k = len(next(iter(topk[HEADLINE_MODE].values())))
    enough = bool(random_sets) and null_complete(L, H, k, len(random_sets))
    out = []
    for it, drop in zip(items, drops):
        rec, start = {}, 0
        for mode in ABLATION_MODES:
            dm, start = drop[start:start + len(sets[mode])], start + len(sets[mode])
            rec[f"topk_{mode}"] = {("own" if f == it.family else f): float(dm[i]) for i, f in enumerate(families)}
            headline = enough and mode == HEADLINE_MODE
            rec[f"topk_{mode}"]["random"] = float(dm[len(families):].mean()) if headline else float("nan")
        out.append(rec)
    return out
