"""Statistics over items: bootstrap intervals per family and item group (exploratory), the declared
headline tests (permutation p-values, Holm-corrected across the whole report, intervals at the
Bonferroni level) and the paired change between two checkpoints."""
import itertools

import numpy as np

from nanostoney.interp.definitions import ABLATION_MODES, ALPHA, DIRECTIONS, HEADLINE_MODE, MIN_N, \
    OUTCOME_GROUPS, SPLIT_GROUPS
from nanostoney.metrics import bootstrap_means, holm, mean_difference
from nanostoney.tasks.base import stable_hash


def interval(values, n_boot=1000, seed=0):
    """{"mean", "lo", "hi", "n"} for values [N, ...]: the mean over examples and its bootstrap 95%
    interval per entry (NaN entries left out), rounded; None when there are no examples."""
    v = np.asarray(values, dtype=np.float64)
    if v.shape[0] == 0:
        return None
    point, lo, hi = bootstrap_means(v, n_boot, seed)
    r = (lambda a: np.round(a, 6).tolist()) if v.ndim > 1 else (lambda a: round(float(a), 6))
    return {"mean": r(point), "lo": r(lo), "hi": r(hi), "n": int(v.shape[0])}


def derived(recs, key):
    """Per-example arrays for a statistic name, including reductions used by the figures."""
    base, _, red = key.partition(":")
    vals = [r.get(base) for r in recs]
    if all(v is None for v in vals):
        return None
    shape = np.shape(next(v for v in vals if v is not None))
    arr = np.stack([np.full(shape, np.nan) if v is None else np.asarray(v, dtype=np.float64) for v in vals])
    # layer: mean over heads, [N, L] (or [N, L, R]); all: over layers and heads, [N] (or [N, R])
    return {"layer": lambda a: a.mean(2), "all": lambda a: a.mean((1, 2))}.get(red, lambda a: a)(arr)


SUMMARY_KEYS = ("answer_logprob", "accuracy", "own_correct", "lens_first", "lens_embedding", "entropy",
                "entropy_answer", "entropy_norm", "entropy_answer_norm", "previous_token", "sink", "struct_mass",
                "lex_mass", "struct_share", "lex_share", "option_lookup", "option_share", "lens_logprob",
                "lens_top1", "lens_log10_rank", "lens_choice", "lens_decodable", "ablate_zero", "ablate_mean",
                "entropy:layer", "entropy:all", "entropy_answer:layer", "entropy_answer:all", "entropy_norm:layer",
                "entropy_norm:all", "entropy_answer_norm:layer", "entropy_answer_norm:all", "previous_token:all",
                "sink:all", "option_lookup:all", "option_share:all", "struct_mass:all", "lex_mass:all",
                "struct_mass:layer", "ablate_zero:all", "ablate_mean:all", "chance")


def intervals(recs, keys, n_boot, seed):
    """{"n", key: interval} for each of `keys` the records hold."""
    return {"n": len(recs)} | {k: interval(a, n_boot, seed) for k in keys if (a := derived(recs, k)) is not None}


def summarize(recs, n_boot=1000, seed=0):
    out = intervals(recs, SUMMARY_KEYS, n_boot, seed)
    for mode in ABLATION_MODES:
        for name in sorted({k for r in recs for k in r.get(f"topk_{mode}", {})}):
            arr = np.array([r.get(f"topk_{mode}", {}).get(name, np.nan) for r in recs], dtype=np.float64)
            out[f"topk_{mode}:{name}"] = interval(arr, n_boot, seed)
    return out


def spearman(a, b):
    ra, rb = (np.argsort(np.argsort(np.ravel(x))).astype(float) for x in (a, b))
    return float("nan") if ra.std() == 0 or rb.std() == 0 else float(np.corrcoef(ra, rb)[0, 1])


TASK_KEYS = ("own_correct", "answer_logprob", "accuracy", "entropy:all", "sink:all", "option_lookup:all")


def in_group(rec, grp):
    return grp in ("all", rec["group"], rec["outcome"])


def group_summaries(recs, families, task_names, n_boot, seed):
    """{"n_items", "families": {family or all: {group: summary}}, "tasks": {task: {group: scalars}},
    "depths"/"directions": {family: {value: summary of its held-out items}}}."""
    out = {"n_items": {}, "families": {}, "tasks": {}, "depths": {}, "directions": {}}
    for fam in families + ["all"]:
        out["families"][fam] = {grp: summarize(sel, n_boot, seed) for grp in SPLIT_GROUPS + OUTCOME_GROUPS + ("all",)
                                if (sel := [r for r in recs if fam in (r["family"], "all") and in_group(r, grp)])}
    by_names = (("depth", str), ("direction", lambda d: DIRECTIONS.get(d, d)))  # arith steps; Stoney directions
    for fam, (by, name) in itertools.product(families, by_names):
        held = [r for r in heldout(recs, fam) if r.get(by)]
        for d in sorted({r[by] for r in held}):
            out[by + "s"].setdefault(fam, {})[name(d)] = summarize([r for r in held if r[by] == d], n_boot, seed)
    for name in task_names:
        out["tasks"][name] = {}
        for grp in SPLIT_GROUPS + OUTCOME_GROUPS:
            sel = [r for r in recs if r["task"] == name and in_group(r, grp)]
            out["n_items"][f"{name}/{grp}"] = len(sel)
            if sel:
                out["tasks"][name][grp] = intervals(sel, TASK_KEYS, n_boot, seed)
    return out


def head_maps(recs, families, mode=HEADLINE_MODE):
    """{family: {"mean": [L, H] mean single-head drop, "n"}} over the family's held-out score
    items: the out-of-sample map the report's first figure shows."""
    out = {}
    for fam in families:
        if sel := [r[f"ablate_{mode}"] for r in heldout(recs, fam, score_only=True)]:
            out[fam] = {"mean": np.mean(sel, 0).round(6).tolist(), "n": len(sel), "mode": mode}
    return out


def topk_drop(rec, heads):
    return rec.get(f"topk_{HEADLINE_MODE}", {}).get(heads, float("nan"))


def slot_entropy(rec):
    """[L] normalised entropy at the answer slot, mean over heads."""
    return np.asarray(rec["entropy_answer_norm"], dtype=np.float64).mean(1)


def heldout(recs, fam, score_only=False):
    return [r for r in recs if r["family"] == fam and r["group"] == "heldout"
            and (r["subset"] == "score" or not score_only)]


def checkpoint_specs(ck, recs, families):
    """The headline tests within one checkpoint: (description, x, y, paired) per test."""
    specs = []
    for fam in families:
        score = heldout(recs, fam, score_only=True)
        for other in ["random"] + [f for f in families if f != fam][:1]:
            kind = "topk_vs_random" if other == "random" else "topk_vs_other"
            specs.append(({"kind": kind, "checkpoint": ck, "family": fam, "a": fam, "b": other},
                          [topk_drop(r, "own") for r in score], [topk_drop(r, other) for r in score], True))
    if len(families) >= 2:
        a, b = families[:2]
        ha, hb = heldout(recs, a), heldout(recs, b)
        specs.append(({"kind": "lens_first", "checkpoint": ck, "a": a, "b": b},
                      [r["lens_first"] for r in ha], [r["lens_first"] for r in hb], False))
        for layer in range(len(slot_entropy(ha[0])) if ha else 0):
            specs.append(({"kind": "entropy_answer", "checkpoint": ck, "layer": layer, "a": a, "b": b},
                          [slot_entropy(r)[layer] for r in ha], [slot_entropy(r)[layer] for r in hb], False))
    return specs


def delta_specs(new, old, recs_new, recs_old, families):
    """The headline tests of one checkpoint pair, paired by item: new minus old per family."""
    ro = {r["key"]: r for r in recs_old}
    specs = []
    for fam in families:
        pairs = [(r, ro[r["key"]]) for r in heldout(recs_new, fam) if r["key"] in ro]
        score = [(n, o) for n, o in pairs if n["subset"] == "score"]
        head = {"checkpoint": f"{new} vs {old}", "family": fam, "a": new, "b": old}
        specs.append(({"kind": "delta_topk_vs_random", **head},
                      [topk_drop(n, "own") - topk_drop(n, "random") for n, _ in score],
                      [topk_drop(o, "own") - topk_drop(o, "random") for _, o in score], True))
        specs.append(({"kind": "delta_lens_first", **head},
                      [n["lens_first"] for n, _ in pairs], [o["lens_first"] for _, o in pairs], True))
        same_depth = bool(pairs) and len(slot_entropy(pairs[0][0])) == len(slot_entropy(pairs[0][1]))
        for layer in range(len(slot_entropy(pairs[0][0])) if same_depth else 0):
            specs.append(({"kind": "delta_entropy_answer", "layer": layer, **head},
                          [slot_entropy(n)[layer] for n, _ in pairs], [slot_entropy(o)[layer] for _, o in pairs], True))
    return specs


def sides(x, y, paired):
    """x and y as float arrays (paired: without the pairs that hold a NaN)."""
    x, y = np.asarray(x, dtype=np.float64), np.asarray(y, dtype=np.float64)
    ok = ~np.isnan(x - y) if paired else slice(None)
    return x[ok], y[ok]


def testable(x, y, paired):
    """MIN_N values on each side (MIN_N complete pairs when paired): fewer could not reach a
    corrected significance level, and would only dilute the correction of the others."""
    return min(int((~np.isnan(v)).sum()) for v in sides(x, y, paired)) >= MIN_N


def headline_tests(specs, n_boot=10000, n_perm=9999, seed=0, alpha=ALPHA):
    """Run the testable declared tests and correct them together: each gets the difference of means
    with a bootstrap interval at the Bonferroni level 1 - alpha/m, a two-sided permutation p and its
    Holm-adjusted p_holm. significant: p_holm < alpha and the interval excludes 0 (with few items a
    bootstrap interval can be narrower than the exact test allows)."""
    ok = [s for s in specs if testable(*s[1:])]
    m = len(ok)
    tests = []
    for desc, x, y, paired in ok:
        tid = "/".join(f"{k}={v}" for k, v in desc.items())
        r = mean_difference(x, y, paired, n_boot, n_perm, seed + stable_hash(tid) % 2 ** 31, alpha / m)
        mean_a, mean_b = (float(np.nanmean(v)) for v in sides(x, y, paired))
        tests.append({"id": tid, **desc, **r, "paired": paired, "mean_a": mean_a, "mean_b": mean_b})
    for t, p in zip(tests, holm([t["p"] for t in tests]) if tests else []):
        t["p_holm"] = float(p)
        t["significant"] = bool(p < alpha and (t["lo"] > 0 or t["hi"] < 0))
    return {"tests": tests, "m": m, "alpha": alpha, "correction": "Holm-Bonferroni", "n_perm": n_perm,
            "interval_level": 1 - alpha / m if m else None,
            "untestable": ["/".join(f"{k}={v}" for k, v in s[0].items()) for s in specs if not testable(*s[1:])]}


def headlines(recs, deltas, families, n_boot=10000, n_perm=9999, seed=0):
    """Every headline test of a report (each checkpoint, each NEW:OLD pair), corrected together.
    recs: {checkpoint: its per-item records (run_checkpoint's second value)}."""
    specs = [s for ck, rs in recs.items() for s in checkpoint_specs(ck, rs, families)]
    specs += [s for new, old in deltas for s in delta_specs(new, old, recs[new], recs[old], families)]
    return headline_tests(specs, n_boot, n_perm, seed)


DELTA_KEYS = ("answer_logprob", "accuracy", "entropy:layer", "entropy_answer:layer", "entropy_norm:layer",
              "lens_logprob", "lens_top1", "struct_mass:all", "lex_mass:all", "previous_token", "sink",
              "option_lookup", "ablate_zero", "ablate_mean", "entropy:all", "sink:all", "option_lookup:all")


def paired_delta(recs, new, old, n_boot=1000, seed=0):
    """How `new` moved each statistic relative to `old`, paired by example id: per family and
    split group, the bootstrap mean of (new - old) per example. Array statistics are compared
    only when their shapes agree (same architecture)."""
    rn, ro = ({r["key"]: r for r in recs[ck]} for ck in (new, old))
    ids = [i for i in rn if i in ro]
    out = {"new": new, "old": old, "n_paired": len(ids), "families": {}}
    fams = sorted({rn[i]["family"] for i in ids}, key=lambda f: (f != "stoney", f))
    for fam in fams + ["all"]:
        out["families"][fam] = {}
        for grp in SPLIT_GROUPS + ("all",):
            sel = [i for i in ids if fam in (rn[i]["family"], "all") and grp in (rn[i]["group"], "all")]
            if not sel:
                continue
            d = {"n": len(sel)}
            for key in DELTA_KEYS:
                a, b = derived([rn[i] for i in sel], key), derived([ro[i] for i in sel], key)
                if a is not None and b is not None and a.shape == b.shape:
                    d[key] = interval(a - b, n_boot, seed)
            out["families"][fam][grp] = d
    return out
