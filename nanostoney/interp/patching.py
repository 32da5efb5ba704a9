"""Causal tracing: activation patching on minimal pairs (pairs.py). `clean` and `corrupt` are one
context with a question token changed from `pos` on; at the last position (the slot) LD =
logit[target] - logit[foil] says which answer a run holds. Patching copies one clean activation
into the corrupted run: the residual stream entering each block at `pos` and at the slot, or a
head's output at the slot; restored = LD(patched) - LD(corrupt). A site passes when its mean
restored is > 0 (sign flips, Holm-corrected over every site): on a model that does not read the
changed token, clean and corrupt are exchangeable and nothing passes. Each patched run starts from
the corrupted residual stream entering the patched layer, one patch per batch row.
"""
from dataclasses import dataclass

import numpy as np
import torch

from nanostoney import probes
from nanostoney.gpt import unwrap
from nanostoney.interp.definitions import ALPHA
from nanostoney.metrics import holm, mean_difference
from nanostoney.tasks.base import stable_hash

MIN_PAIRS = 10  # fewer pairs cannot reach a corrected significance level over many sites


@dataclass
class Pair:
    key: str           # task/id (and the slot, when an item gives several pairs)
    family: str
    clean: list        # token ids; the last one is the slot
    corrupt: list      # the same length; differs from clean at pos (and maybe a few tokens after)
    pos: int           # the first changed token
    target: int        # the clean answer's token at the slot
    foil: int          # the corrupted answer's token at the slot
    slot: str = "answer"      # "answer" or "operand" (math: an operand the chain copies)
    own_correct: bool = None  # the model's own greedy answer to the clean item is right
    direction: str = None     # Stoney: s2e (term -> gloss) or e2s (gloss -> term)


def blocks_from(gpt, x, layer):
    """Run blocks layer.. on the residual stream x [B, T, C] entering block `layer` (no cache):
    the rest of GPT.trunk, so an intervention in layer l can reuse the stream before it."""
    cos_sin, mask = gpt._rotary_and_mask(x.size(0), x.size(1), None)
    for block in gpt.transformer.h[layer:]:
        x = block(x, cos_sin, None, mask)
    return x


class HeadPatch(probes.Probe):
    """Batch row b replaces head heads[b] = (layer, head) of its output at query `pos` with the
    clean run's (clean[layer]: [H, T, D])."""

    def __init__(self, clean, heads, pos=-1):
        self.clean, self.heads, self.pos = clean, heads, pos

    @torch.compiler.disable
    def on_attn(self, layer, q, k, v, y, mask):
        rows = [(b, h) for b, (at, h) in enumerate(self.heads) if at == layer]
        if rows:
            y = y.clone()
        for b, h in rows:
            y[b, h, self.pos] = self.clean[layer][h, self.pos].to(y.dtype)
        return y


def logit_diff(gpt, h, target, foil):
    """[B] LD at the last position of the final residual stream h [B, T, C]."""
    logits = gpt.lm_logits(h[:, -1])
    return (logits[:, target] - logits[:, foil]).float().cpu()


@torch.no_grad()
def trace_pair(model, pair):
    """{"ld_clean", "ld_corrupt", "resid": [2, L + 1] restored at (pos, slot) per layer,
    "heads": [L, H] restored per head patched at the slot} for one minimal pair."""
    gpt = unwrap(model)
    L, H = gpt.config.n_layer, gpt.config.n_head
    ld = lambda h: logit_diff(gpt, h, pair.target, pair.foil)  # noqa: E731
    with probes.capture(gpt, patterns=False, head_outputs=True) as cap, probes.residuals(gpt) as res:
        ld_clean = float(ld(gpt.trunk(torch.tensor([pair.clean], device=gpt.get_device()))))
    clean_heads, clean_resid = [o[0] for o in cap.head_outputs], [r[0] for r in res.resid]
    with probes.residuals(gpt) as res:
        ld_corrupt = float(ld(gpt.trunk(torch.tensor([pair.corrupt], device=gpt.get_device()))))
    corrupt_resid = [r[0] for r in res.resid]
    resid = torch.zeros(2, L + 1)
    for layer in range(L + 1):
        x = corrupt_resid[layer].expand(2, -1, -1).clone()
        for row, p in enumerate((pair.pos, len(pair.clean) - 1)):
            x[row, p] = clean_resid[layer][p]
        resid[:, layer] = ld(blocks_from(gpt, x, layer)) - ld_corrupt
    heads = torch.zeros(L, H)
    for layer in range(L):
        with probes.attach(gpt, HeadPatch(clean_heads, [(layer, h) for h in range(H)])):
            heads[layer] = ld(blocks_from(gpt, corrupt_resid[layer].expand(H, -1, -1), layer)) - ld_corrupt
    return {"ld_clean": ld_clean, "ld_corrupt": ld_corrupt, "resid": resid.numpy(), "heads": heads.numpy()}


def sites(traces):
    """{site name: [restored per pair]}: resid/pos/l, resid/slot/l and head/l.h."""
    out = {}
    for t in traces:
        for row, where in enumerate(("pos", "slot")):
            for layer, v in enumerate(t["resid"][row]):
                out.setdefault(f"resid/{where}/{layer}", []).append(float(v))
        for (layer, h), v in np.ndenumerate(t["heads"]):
            out.setdefault(f"head/{layer}.{h}", []).append(float(v))
    return out


def correct(rows, alpha):
    """Holm-correct the sites' p-values together; a site passes when p_holm < alpha and lo > 0."""
    for r, p in zip(rows, holm([r["p"] for r in rows]) if rows else []):
        r["p_holm"] = float(p)
        r["passes"] = bool(p < alpha and r["lo"] > 0)


def site_tests(traces, alpha=ALPHA, n_boot=2000, n_perm=9999, seed=0, m=None):
    """Every site's mean restored LD with a sign-flip p, Holm-corrected over all sites:
    {"sites": [...] (largest mean first), "n", "gap" (mean LD(clean) - LD(corrupt)), "m"}; intervals
    at the Bonferroni level alpha / m (m: the number of sites, or more when several groups are
    corrected together). Fewer than MIN_PAIRS pairs: no site is tested."""
    if len(traces) < MIN_PAIRS:
        return {"sites": [], "n": len(traces), "gap": None, "m": 0, "alpha": alpha}
    gap = float(np.mean([t["ld_clean"] - t["ld_corrupt"] for t in traces]))
    by_site = sites(traces)
    m = m or len(by_site)
    rows = []
    for name, vals in by_site.items():
        r = mean_difference(vals, n_boot=n_boot, n_perm=n_perm, seed=seed + stable_hash(name) % 2 ** 31,
                            alpha=alpha / m)
        rows.append({"site": name, "mean": r["diff"], "lo": r["lo"], "hi": r["hi"], "p": r["p"],
                     "fraction": r["diff"] / gap if gap else float("nan"), "n": r["n"]})
    correct(rows, alpha)
    rows.sort(key=lambda r: -r["mean"])
    return {"sites": rows, "n": len(traces), "gap": gap, "m": m, "alpha": alpha}


def group_names(pair):
    """The groups a pair is summarised in: its family and slot (declared), then by direction
    (Stoney) and by whether the model's own answer is right (exploratory)."""
    base = f"{pair.family}/{pair.slot}"
    out = [base] + ([f"{base}/{pair.direction}"] if pair.direction else [])
    return out + ([f"{base}/{'right' if pair.own_correct else 'wrong'}"] if pair.own_correct is not None else [])


def summary(pairs, traces, n_boot=2000, seed=0, alpha=ALPHA):
    """{"groups": {name: site_tests}, "declared", "m", "per_pair"}: the declared groups (each family at
    its slot) Holm-corrected together; the exploratory ones each over its own sites."""
    by = {}
    for p, t in zip(pairs, traces):
        for g in group_names(p):
            by.setdefault(g, []).append(t)
    declared = sorted(g for g in by if g.count("/") == 1 and len(by[g]) >= MIN_PAIRS)
    m = sum(len(sites(by[g])) for g in declared)
    out = {g: site_tests(ts, alpha, n_boot, seed=seed, m=m if g in declared else None) for g, ts in by.items()}
    correct([r for g in declared for r in out[g]["sites"]], alpha)
    per_pair = [{"key": p.key, "family": p.family, "slot": p.slot, "direction": p.direction,
                 "own_correct": p.own_correct, "gap": round(t["ld_clean"] - t["ld_corrupt"], 5)}
                for p, t in zip(pairs, traces)]
    return {"groups": out, "declared": declared, "m": m, "alpha": alpha, "n_pairs": len(pairs), "per_pair": per_pair}
