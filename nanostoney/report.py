"""The reasoning report: PNG figures, a self-contained index.html beside them, and metrics.json.

    write_report(out_dir, metrics, logger=None)

`metrics` is what scripts/compare_reasoning.py builds from nanostoney.interp: every number the
figures show is in it, so a report can be re-rendered from a saved metrics.json
(`render(json.load(...), out_dir)`). The directory is built under a temporary name and renamed
into place, so a reader never sees half a report. The HTML uses no scripts and no network:
it opens offline from a file:// URL. Figures are drawn with matplotlib's Agg backend, imported
only here.
"""
import html
import json
import math
import os
import re
import shutil

import numpy as np

from nanostoney import report_causal
from nanostoney.files import write_failed, write_json
from nanostoney.interp import ABLATION_MODES, HEADLINE_MODE, HEADLINES, LEXICAL_REGIONS, MIN_N, OUTCOME_GROUPS, \
    SPLIT_GROUPS, STRUCT_REGIONS

FAMILY_COLORS = {"stoney": "#1b7f5c", "math": "#c0392b", "yoruba": "#2c6fbb", "english": "#d68910", "all": "#555555"}
GROUP_STYLES = {"train": "-", "heldout": "--", "all": ":"}
EXTRA_COLORS = ["#8e44ad", "#17a2b8", "#7f8c8d", "#e84393"]
REGION_COLORS = {"question": "#1f4e9c", "options": "#b8860b", "rationale": "#2e7d32", "answer_cue": "#c0392b"}
REGION_NAMES = {"question": "blue", "options": "gold", "rationale": "green", "answer_cue": "red"}


def _plt():
    # lazy: matplotlib is heavy, and only drawing needs it (metrics.json is written without it)
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    plt.rcParams.update({"font.size": 8, "axes.titlesize": 9, "figure.dpi": 100,
                         "axes.spines.top": False, "axes.spines.right": False})
    return plt


def color(family, i=0):
    return FAMILY_COLORS.get(family, EXTRA_COLORS[i % len(EXTRA_COLORS)])


def arr(s, key="mean"):
    return np.array(s[key], dtype=float)


def families_of(metrics):
    return [f for f in metrics["config"]["families"]]


def _save(fig, path, title=None, layout=True):
    """Title the figure (top left), lay it out (unless the caller did), write it and close it."""
    if title:
        fig.suptitle(title, fontsize=10, x=0.01, ha="left")
    if layout:
        fig.tight_layout()
    fig.savefig(path, dpi=100, bbox_inches="tight")
    _plt().close(fig)


# -----------------------------------------------------------------------------
# figures across checkpoints

def _legend_below(fig, axes):
    """One legend for every panel, under them (so no panel's lines are hidden)."""
    handles, labels = {}, []
    for ax in np.ravel(axes):
        for h, lab in zip(*ax.get_legend_handles_labels()):
            key = re.sub(r", n=\d+\)$", ")", lab)  # sample sizes differ per panel; they are in the tables
            if key not in handles:
                handles[key] = h
                labels.append(key)
    fig.tight_layout(rect=(0, 0.05, 1, 0.96))
    fig.legend([handles[k] for k in labels], labels, loc="lower center", ncol=max(1, len(labels)), fontsize=7,
               frameon=False)


def _layer_grid(metrics, rows, title, xlabel, path, show_n=False, decorate=None):
    """A panel per checkpoint (columns) and statistic (rows: (key, y label)), lines over layers."""
    plt = _plt()
    cks = list(metrics["checkpoints"])
    fig, axes = plt.subplots(len(rows), len(cks), figsize=(3.6 * len(cks) + 0.6, 6.6), squeeze=False, sharex="col")
    for c, ck in enumerate(cks):
        for r, (key, label) in enumerate(rows):
            ax = axes[r][c]
            _layer_lines(ax, metrics, ck, key, show_n=show_n)
            if decorate is not None:
                decorate(ax, key)
            if r == 0:
                ax.set_title(ck)
            if c == 0:
                ax.set_ylabel(label)
            if r == len(rows) - 1:
                ax.set_xlabel(xlabel)
            ax.xaxis.get_major_locator().set_params(integer=True)
    _legend_below(fig, axes)
    _save(fig, path, title, layout=False)


def fig_entropy(metrics, path):
    """Rows: entropy over all query positions, entropy of the answer position; a panel per checkpoint."""
    rows = [("entropy:layer", "entropy (nats)\nall query positions"),
            ("entropy_answer:layer", "entropy (nats)\nanswer position"),
            ("entropy_norm:layer", "H / log(keys seen)\nall query positions")]
    _layer_grid(metrics, rows, "Attention entropy by layer (mean over heads)", "layer", path, show_n=True)


def _layer_lines(ax, metrics, ck, key, show_n=False):
    """One line per family and item group over layers (train solid, held-out dashed), with its
    95% interval as a band."""
    for i, fam in enumerate(families_of(metrics)):
        for grp in ("train", "heldout"):
            s = metrics["checkpoints"][ck]["families"].get(fam, {}).get(grp, {}).get(key)
            if not s:
                continue
            m = arr(s)
            x = np.arange(len(m))
            label = f"{fam} ({grp}, n={s['n']})" if show_n else f"{fam} ({grp})"
            ax.plot(x, m, GROUP_STYLES[grp], color=color(fam, i), marker="o", ms=3, label=label)
            ax.fill_between(x, arr(s, "lo"), arr(s, "hi"), color=color(fam, i), alpha=0.12, lw=0)


def fig_logit_lens(metrics, path):
    def decorate(ax, key):
        if key == "lens_choice":
            ax.axhline(0.2, color="#999", lw=0.8, ls=":")  # chance among five letters
        if key != "lens_logprob":
            ax.set_ylim(-0.04, 1.04)
    rows = [("lens_logprob", "answer log-prob"), ("lens_top1", "top-1 rate"), ("lens_choice", "MC option accuracy")]
    _layer_grid(metrics, rows, "Logit lens: where the answer is decided", "depth (0 = embeddings, last = output)",
                path, decorate=decorate)


# -----------------------------------------------------------------------------
# the first screen's figures

def fig_head_maps(metrics, path):
    """The last checkpoint's heads x layers map per family: drop in the answer's log-prob when one
    head is mean-ablated, on held-out score items; boxed: the family's top-k heads (chosen on the
    selection items, so the map judges them out of sample)."""
    plt = _plt()
    ck = list(metrics["checkpoints"])[-1]
    res = metrics["checkpoints"][ck]
    maps = res.get("head_maps", {})
    fams = [f for f in families_of(metrics) if f in maps]
    if not fams:
        return False
    vmax = max(1e-6, max(np.nanmax(np.abs(arr(maps[f]))) for f in fams))
    fig, axes = plt.subplots(1, len(fams), figsize=(3.2 * len(fams) + 0.4, 2.9), squeeze=False)
    for ax, fam in zip(axes[0], fams):
        m = arr(maps[fam])
        marks = np.zeros(m.shape, dtype=bool)
        for l, h in res["topk"]["heads"][HEADLINE_MODE].get(fam, []):
            marks[l, h] = True
        _heat(ax, m, f"{fam} (n={maps[fam]['n']})", "RdBu_r", -vmax, vmax, marks=marks)
    _save(fig, path, f"{ck}: answer log-prob drop when one head is mean-ablated\n(held-out score items; "
                     f"boxed = top-{res['topk']['k']} heads chosen on selection items)")
    return True


def fig_lens_curves(metrics, path):
    """Per family: the share of held-out items whose answer the logit lens decodes at each depth,
    a line per checkpoint (bands: uncorrected 95%)."""
    plt = _plt()
    fams = families_of(metrics)
    fig, axes = plt.subplots(1, len(fams), figsize=(3.2 * len(fams) + 0.4, 2.9), squeeze=False, sharey=True)
    for ax, fam in zip(axes[0], fams):
        for i, ck in enumerate(metrics["checkpoints"]):
            s = metrics["checkpoints"][ck]["families"].get(fam, {}).get("heldout", {}).get("lens_decodable")
            if not s:
                continue
            m, x = arr(s), np.arange(len(arr(s)))
            ax.plot(x, m, marker="o", ms=3, color=EXTRA_COLORS[i % len(EXTRA_COLORS)], label=f"{ck} (n={s['n']})")
            ax.fill_between(x, arr(s, "lo"), arr(s, "hi"), color=EXTRA_COLORS[i % len(EXTRA_COLORS)], alpha=0.1, lw=0)
        ax.axhline(0.2, color="#999", lw=0.8, ls=":")  # chance among five letters
        ax.set_ylim(-0.03, 1.03)
        ax.set_title(fam)
        ax.set_xlabel("depth (0 = embeddings, last = output)")
        ax.xaxis.get_major_locator().set_params(integer=True)
        ax.legend(fontsize=6.5, frameon=False)
    axes[0][0].set_ylabel("answer decodable (share of items)")
    _save(fig, path, "Logit lens at the answer slot: where the answer becomes decodable\n(held-out items; "
                     "dotted = chance for five options)")
    return True


# -----------------------------------------------------------------------------
# figures for one checkpoint

def _heat(ax, m, title, cmap="viridis", vmin=None, vmax=None, annotate=True, marks=None):
    m = np.asarray(m, dtype=float)
    im = ax.imshow(m, cmap=cmap, vmin=vmin, vmax=vmax, aspect="auto", interpolation="nearest")
    ax.set_title(title)
    ax.set_xlabel("head")
    ax.set_ylabel("layer")
    ax.set_xticks(range(m.shape[1]))
    ax.set_yticks(range(m.shape[0]))
    if annotate and m.size <= 64:
        for (i, j), v in np.ndenumerate(m):
            if np.isfinite(v):
                dark = abs(im.norm(v) - 0.5) > 0.3 if cmap in ("RdBu_r", "PuOr_r") else im.norm(v) < 0.5
                ax.text(j, i, f"{v:.2g}", ha="center", va="center", fontsize=6, color="white" if dark else "black")
    if marks is not None:
        from matplotlib.patches import Rectangle  # lazy, as _plt()
        for i, j in zip(*np.nonzero(marks)):
            ax.add_patch(Rectangle((j - 0.46, i - 0.46), 0.92, 0.92, fill=False, ec="black", lw=1.4))
    ax.figure.colorbar(im, ax=ax, fraction=0.046, pad=0.03)
    return im


def fig_ablation(metrics, ck, mode, path):
    """Rows: split groups; columns: each family's drop map and their difference."""
    plt = _plt()
    res = metrics["checkpoints"][ck]["families"]
    fams = [f for f in families_of(metrics) if f in res][:2]
    groups = [g for g in SPLIT_GROUPS if all(res.get(f, {}).get(g) for f in fams)] or ["all"]
    ncol = len(fams) + (1 if len(fams) == 2 else 0)
    fig, axes = plt.subplots(len(groups), ncol, figsize=(3.3 * ncol, 2.6 * len(groups) + 0.4), squeeze=False)
    key = f"ablate_{mode}"
    for r, grp in enumerate(groups):
        maps = [res[f][grp][key] for f in fams if res.get(f, {}).get(grp, {}).get(key)]
        if not maps:
            continue
        vmax = max(1e-6, max(np.nanmax(np.abs(arr(s))) for s in maps))
        for c, (fam, s) in enumerate(zip(fams, maps)):
            _heat(axes[r][c], arr(s), f"{fam}, {grp} (n={s['n']})", "RdBu_r", -vmax, vmax)
        if len(maps) == 2:
            d = arr(maps[0]) - arr(maps[1])
            lim = max(1e-6, np.nanmax(np.abs(d)))
            _heat(axes[r][2], d, f"{fams[0]} − {fams[1]}", "PuOr_r", -lim, lim)
    _save(fig, path, f"{ck}: drop in answer log-prob when one head is {mode}-ablated (red = the head helps)")


def fig_topk(metrics, ck, path):
    """Groups: the family evaluated and split; bars: whose top-k heads were ablated (or random k)."""
    plt = _plt()
    res = metrics["checkpoints"][ck]
    fams = [f for f in families_of(metrics) if f in res["families"]]
    sources = fams + ["random"]
    fig, axes = plt.subplots(1, len(ABLATION_MODES), figsize=(9, 2.9), squeeze=False)
    for ax, mode in zip(axes[0], ABLATION_MODES):
        groups = [(f, g) for f in fams for g in SPLIT_GROUPS if res["families"][f].get(g)]
        w = 0.8 / len(sources)
        for j, src in enumerate(sources):
            xs, ms, err = [], [], [[], []]
            for gi, (fam, grp) in enumerate(groups):
                v = res["families"][fam][grp].get(f"topk_{mode}:{'own' if src == fam else src}")
                if not v or v["mean"] is None:
                    continue
                xs.append(gi + (j - (len(sources) - 1) / 2) * w)
                ms.append(v["mean"])
                err[0].append(v["mean"] - v["lo"])
                err[1].append(v["hi"] - v["mean"])
            ax.bar(xs, ms, w, color=color(src, j) if src != "random" else "#aaaaaa",
                   label=f"{src}'s top-{res['topk']['k']} heads" if src != "random" else "random heads (mean)")
            ax.errorbar(xs, ms, err, fmt="none", color="k", lw=0.8, capsize=2)
        ax.set_xticks(range(len(groups)))
        ax.set_xticklabels([f"{f} items\n{g}" for f, g in groups])
        ax.axhline(0, color="#666", lw=0.6)
        ax.set_title(f"{mode} ablation of k heads together")
        ax.set_ylabel("drop in answer log-prob")
    axes[0][-1].legend(fontsize=6.5, frameon=False)
    _save(fig, path, f"{ck}: do the families rely on the same heads? (heads chosen on selection items)")


def fig_regions(metrics, ck, path):
    plt = _plt()
    res = metrics["checkpoints"][ck]["families"]
    fams = families_of(metrics)
    fig, axes = plt.subplots(1, 2, figsize=(10, 2.9), gridspec_kw={"width_ratios": [len(STRUCT_REGIONS),
                                                                                     len(LEXICAL_REGIONS) + 1]})
    for ax, (key, share_key, names, title) in zip(axes, [
            ("struct_mass:all", "struct_share", STRUCT_REGIONS, "structure"),
            ("lex_mass:all", "lex_share", LEXICAL_REGIONS, "lexical classes")]):
        bars = [(f, g) for f in fams for g in SPLIT_GROUPS if res.get(f, {}).get(g, {}).get(key)]
        w = 0.8 / max(1, len(bars))
        for b, (fam, grp) in enumerate(bars):
            s, sh = res[fam][grp][key], res[fam][grp].get(share_key)
            x = np.arange(len(names)) + (b - (len(bars) - 1) / 2) * w
            m = arr(s)
            ax.bar(x, m, w, color=color(fam, b), alpha=1.0 if grp == "train" else 0.55,
                   label=f"{fam} ({grp}, n={s['n']})")
            ax.errorbar(x, m, [m - arr(s, "lo"), arr(s, "hi") - m], fmt="none", color="k", lw=0.7, capsize=1.5)
            if sh:
                ax.scatter(x, arr(sh), marker="_", s=60, color="k", zorder=3)
        ax.set_xticks(range(len(names)))
        ax.set_xticklabels(names, rotation=30, ha="right")
        ax.set_title(f"mass from the answer position: {title} (— = token share)")
        ax.set_ylabel("mass (mean over layers and heads)")
    axes[1].legend(fontsize=6.5, frameon=False)
    _save(fig, path)


def fig_roles(metrics, ck, path):
    plt = _plt()
    res = metrics["checkpoints"][ck]
    every = res["families"]["all"]["all"]
    th = metrics["definitions"].get("role_thresholds", {})
    panels = [("previous-token (task prompts)", every["previous_token"], "previous_token"),
              ("induction (random repeats)", res["induction"]["induction"], "induction"),
              ("attention sink (mass on bos)", every["sink"], "sink"),
              ("attention entropy (nats)", every["entropy"], None)]
    for fam in families_of(metrics):
        s = res["families"].get(fam, {}).get("all", {}).get("option_lookup")
        if s:
            panels.append((f"option lookup ({fam})", s, "option_lookup"))
    fig, axes = plt.subplots(1, len(panels), figsize=(3.0 * len(panels), 2.7), squeeze=False)
    for ax, (title, s, role) in zip(axes[0], panels):
        # a role's colour scale tops out at its threshold or above: bright means "has the role"
        top = max(float(np.nanmax(arr(s))), th.get(role, 0.0)) if role else float(np.nanmax(arr(s)))
        _heat(ax, arr(s), title, "magma", 0, max(1e-6, top))
    roles = "; ".join(f"{r} {h}" for r, h in res["roles"].items() if h) or "no head reaches a role threshold"
    fig.suptitle(f"{ck}: head-role scores, mean over examples (colour scale reaches at least the role threshold); "
                 f"roles: {roles}", fontsize=9, x=0.01, ha="left")
    _save(fig, path)


def fig_example(metrics, ck, ex, path):
    """Attention of every head from the answer position over the example's tokens, and the full
    pattern of the family's most important head."""
    plt = _plt()
    rows = np.array(ex["answer_rows"], dtype=float)  # [L, H, T]
    L, H, T = rows.shape
    toks = ex["tokens"]
    width = min(22, max(9, 0.09 * T + 2))
    fig = plt.figure(figsize=(width, 3.0 + 0.14 * L * H + min(7.5, 0.07 * T + 2)))
    gs = fig.add_gridspec(2, 1, height_ratios=[0.14 * L * H + 0.8, min(7.5, 0.07 * T + 2)])
    ax = fig.add_subplot(gs[0])
    im = ax.imshow(rows.reshape(L * H, T), aspect="auto", cmap="Blues", vmin=0, vmax=max(1e-6, rows.max()),
                   interpolation="nearest")
    ax.set_yticks(range(L * H))
    ax.set_yticklabels([f"L{l}.H{h}" for l in range(L) for h in range(H)], fontsize=5)
    step = max(1, T // 160)
    ax.set_xticks(range(0, T, step))
    ax.set_xticklabels(toks[::step], rotation=90, fontsize=5)
    for lab, r in zip(ax.get_xticklabels(), ex["struct"][::step]):
        lab.set_color(REGION_COLORS.get(STRUCT_REGIONS[r], "black"))
    ax.set_title(f"{ck} — {ex['task']} ({ex['split']}) {ex['id']}: attention from the answer position "
                 f"(last token) for every head; token colours: " +
                 " ".join(f"{r}={c}" for r, c in REGION_NAMES.items()))
    fig.colorbar(im, ax=ax, fraction=0.02, pad=0.01)
    ax2 = fig.add_subplot(gs[1])
    p = np.array(ex["pattern"], dtype=float)
    im2 = ax2.imshow(p, cmap="Blues", vmin=0, vmax=1, interpolation="nearest", aspect="auto")
    step = max(1, T // 90)
    ax2.set_xticks(range(0, T, step))
    ax2.set_xticklabels(toks[::step], rotation=90, fontsize=4.5)
    ax2.set_yticks(range(0, T, step))
    ax2.set_yticklabels(toks[::step], fontsize=4.5)
    for labels in (ax2.get_xticklabels(), ax2.get_yticklabels()):
        for lab, r in zip(labels, ex["struct"][::step]):
            lab.set_color(REGION_COLORS.get(STRUCT_REGIONS[r], "black"))
    ax2.set_title(f"full pattern of L{ex['head'][0]}.H{ex['head'][1]} (largest mean zero-ablation drop for "
                  f"{ex['family']}); rows = queries, columns = keys")
    fig.colorbar(im2, ax=ax2, fraction=0.02, pad=0.01)
    _save(fig, path)


# -----------------------------------------------------------------------------
# how one checkpoint moved relative to another (e.g. GRPO vs SFT), paired by example

def fig_delta(metrics, name, d, path):
    plt = _plt()
    fams = [f for f in families_of(metrics) if f in d["families"]]
    fig, axes = plt.subplots(1, 3, figsize=(12, 2.9))
    for ax, key, title, x0 in [(axes[0], "entropy:layer", "Δ attention entropy by layer (nats)", 0),
                               (axes[1], "lens_logprob", "Δ logit-lens answer log-prob", 0)]:
        for i, fam in enumerate(fams):
            for grp in SPLIT_GROUPS:
                s = d["families"][fam].get(grp, {}).get(key)
                if not s:
                    continue
                m = arr(s)
                x = np.arange(len(m)) + x0
                ax.plot(x, m, GROUP_STYLES[grp], color=color(fam, i), marker="o", ms=3, label=f"{fam} ({grp})")
                ax.fill_between(x, arr(s, "lo"), arr(s, "hi"), color=color(fam, i), alpha=0.12, lw=0)
        ax.axhline(0, color="#666", lw=0.6)
        ax.set_title(title)
        ax.set_xlabel("layer" if key == "entropy:layer" else "depth")
        ax.xaxis.get_major_locator().set_params(integer=True)
    axes[0].legend(fontsize=6.5, frameon=False)
    ax = axes[2]
    bars = [(f, g) for f in fams for g in SPLIT_GROUPS if d["families"][f].get(g, {}).get("struct_mass:all")]
    w = 0.8 / max(1, len(bars))
    for b, (fam, grp) in enumerate(bars):
        s = d["families"][fam][grp]["struct_mass:all"]
        x = np.arange(len(STRUCT_REGIONS)) + (b - (len(bars) - 1) / 2) * w
        m = arr(s)
        ax.bar(x, m, w, color=color(fam, b), alpha=1.0 if grp == "train" else 0.55, label=f"{fam} ({grp})")
        ax.errorbar(x, m, [m - arr(s, "lo"), arr(s, "hi") - m], fmt="none", color="k", lw=0.7, capsize=1.5)
    ax.axhline(0, color="#666", lw=0.6)
    ax.set_xticks(range(len(STRUCT_REGIONS)))
    ax.set_xticklabels(STRUCT_REGIONS, rotation=30, ha="right")
    ax.set_title("Δ attention mass from the answer position")
    _save(fig, path, f"{name}: change per example, paired (n={d['n_paired']}); bands = 95% bootstrap")


def fig_delta_maps(metrics, name, d, path):
    plt = _plt()
    fams = [f for f in families_of(metrics) if f in d["families"]]
    panels = []
    for fam in fams:
        s = d["families"][fam].get("all", {})
        for key, title in (("ablate_zero", "Δ zero-ablation drop"), ("option_lookup", "Δ option lookup")):
            if s.get(key) and isinstance(s[key]["mean"], list):
                panels.append((f"{title} ({fam})", s[key]))
    s = d["families"].get("all", {}).get("all", {})
    for key, title in (("previous_token", "Δ previous-token"), ("sink", "Δ sink")):
        if s.get(key) and isinstance(s[key]["mean"], list):
            panels.append((title, s[key]))
    if not panels:
        return False
    fig, axes = plt.subplots(1, len(panels), figsize=(3.0 * len(panels), 2.7), squeeze=False)
    for ax, (title, s) in zip(axes[0], panels):
        m = arr(s)
        lim = max(1e-6, float(np.nanmax(np.abs(m))))
        _heat(ax, m, title, "PuOr_r", -lim, lim)
    _save(fig, path, f"{name}: per-head change, mean over paired items (exploratory)")
    return True


# -----------------------------------------------------------------------------
# the headline: plain sentences from the corrected tests

CONTEXT_NAMES = {"own": "each model's own greedy rationale with its answer sentence removed, then 'Answer:'",
                 "gold": "the gold rationale with its answer sentence removed (teacher forced), then 'Answer:'",
                 "cloze": "the question without its options, then the beginning all options' answers share (the "
                          "slot is the first token where they part); right = the model's cloze pick"}
ANSWER_NAMES = {"own": "its own greedy answers", "gold": "its own greedy answers",
                "cloze": "its cloze picks (each option's answer scored, no options in the context)"}


def heads_text(heads):
    return ", ".join(f"L{l}.H{h}" for l, h in heads)


def p_text(t):
    return f"p_Holm = {t['p_holm']:.2g}, " + ("significant" if t["significant"] else "not significant")


def ci_text(t):
    return f"{t['diff']:+.3g} [{t['lo']:+.3g}, {t['hi']:+.3g}]"


def n_text(n):
    return f"n = {n}" if not isinstance(n, list) else f"n = {n[0]} and {n[1]}"


def where(t):
    return t["checkpoint"] + (f", {t['family']}" if t.get("family") else "") + \
        (f", layer {t['layer']}" if t.get("layer") is not None else "")


BODIES = {  # a headline test in words; {ci}: its corrected interval, {stats}: n and the Holm p-value
    "topk_vs_random": "ablating its top-{k} heads lowers the answer's log-prob by {mean_a:.2f} nats vs {mean_b:.2f} "
                      "for random heads: {ci} ({stats})",
    "topk_vs_other": "its own top-{k} heads lower it {ci} nats more than {b}'s top heads ({mean_a:.2f} vs "
                     "{mean_b:.2f}; {stats})",
    "lens_first": "the logit lens first decodes the answer at depth {mean_a:.1f} for {a} and {mean_b:.1f} for {b}: "
                  "{ci} ({stats})",
    "entropy_answer": "answer-slot attention entropy (share of its maximum) is {mean_a:.2f} for {a} and {mean_b:.2f} "
                      "for {b}: {ci} ({stats})",
    "delta_topk_vs_random": "the top heads' effect beyond random heads went from {mean_b:.2f} to {mean_a:.2f} nats: "
                            "{ci} (paired, {stats})",
    "delta_lens_first": "the first decodable depth went from {mean_b:.2f} to {mean_a:.2f}: {ci} (paired, {stats})",
    "delta_entropy_answer": "answer-slot entropy went from {mean_b:.2f} to {mean_a:.2f}: {ci} (paired, {stats})",
}


def test_body(t, k):
    return BODIES[t["kind"]].format(k=k, ci=ci_text(t), stats=f"{n_text(t['n'])}, {p_text(t)}", **t)


def test_sentence(t, k):
    return f"{where(t)}: {test_body(t, k)}."


def test_phrase(t):
    """A significant test in a few words, for the line that lists them per checkpoint."""
    what = {"topk_vs_random": f"{t.get('family')} top heads beyond random heads",
            "topk_vs_other": f"{t.get('family')} top heads beyond {t['b']}'s",
            "lens_first": f"first decodable depth {t['a']} − {t['b']}",
            "entropy_answer": f"layer {t.get('layer')} slot entropy {t['a']} − {t['b']}",
            "delta_topk_vs_random": f"{t.get('family')} top heads' effect beyond random",
            "delta_lens_first": f"{t.get('family')} first decodable depth",
            "delta_entropy_answer": f"{t.get('family')} layer {t.get('layer')} slot entropy"}[t["kind"]]
    return f"{what} {ci_text(t)}"


def undecided_sentence(res, last, families):
    """Why there is no lens_first test: how many held-out items the lens decodes at the output."""
    n = {f: round(res["families"][f]["heldout"]["accuracy"]["mean"] * res["families"][f]["heldout"]["n"])
         for f in families if res["families"].get(f, {}).get("heldout", {}).get("accuracy")}
    return (f"{last}: the output decodes the answer on too few held-out items to compare where it becomes "
            f"decodable ({', '.join(f'{f} {v}' for f, v in n.items())}; {MIN_N} a side needed).")


def at_chance_sentence(res, last, families, context="own"):
    """[a sentence] when a family's held-out accuracy is not above chance: then its heads carry
    what the model does at the answer slot, not the answer, and the report must say so first."""
    low = []
    for fam in families:
        held = res["families"].get(fam, {}).get("heldout", {})
        acc, chance = held.get("own_correct"), held.get("chance")
        if acc and chance and acc.get("lo") is not None and acc["lo"] <= chance["mean"]:
            low.append(f"{fam} (chance {chance['mean']:.2f})")
    if not low:
        return []
    hint = "" if context == "cloze" else (" For multiple choice, --context cloze probes the slot where the options' "
                                          "answers part, which needs no letter (a small model is often above chance there).")
    return [f"{last} is not above chance on held-out {' or '.join(low)}: the heads and layers below carry what the "
            f"model does at the answer slot (the answer format, a preferred option), not a reached answer. A claim "
            f"about how the answer is reached needs a model above chance (BENCHMARKS.md, issue 16).{hint}"]


def summary(metrics):
    """The report's answer in plain sentences: how it was measured; for the last checkpoint which
    heads carry the answer in each family, where it becomes decodable and how the families differ;
    then every other headline test that survives the correction."""
    h, cfg = metrics["headline"], metrics["config"]
    last = list(metrics["checkpoints"])[-1]
    res = metrics["checkpoints"][last]
    k, tests = res["topk"]["k"], h["tests"]
    if h["m"]:
        lines = [f"{h['m']} declared headline tests on held-out items, Holm-Bonferroni corrected together "
                 f"(family-wise error {h['alpha']}); intervals are simultaneous {100 * h['interval_level']:.2f}% "
                 f"(Bonferroni) bootstrap intervals. Context: {CONTEXT_NAMES[cfg['context']]}."]
    else:
        lines = [f"No headline test has {MIN_N} held-out items a side at this size, so this report claims nothing; "
                 f"raise --max-examples. Context: {CONTEXT_NAMES[cfg['context']]}."]
    acc = [f"{fam} {cell_text(res['families'][fam]['heldout'].get('own_correct'))}"
           for fam in families_of(metrics) if res["families"].get(fam, {}).get("heldout")]
    lines.append(f"{last}: held-out accuracy of {ANSWER_NAMES[cfg['context']]} (uncorrected 95%): {'; '.join(acc)}.")
    lines += at_chance_sentence(res, last, families_of(metrics), cfg["context"])
    mine = [t for t in tests if t["checkpoint"] == last]
    for fam in families_of(metrics):
        ts = [t for t in mine if t.get("family") == fam and t["kind"] in ("topk_vs_random", "topk_vs_other")]
        heads = heads_text(res["topk"]["heads"][HEADLINE_MODE].get(fam, []))
        tested = "; ".join(test_body(t, k) for t in ts) or "too few held-out score items to test them"
        lines.append(f"{last}, {fam}: top-{k} heads {heads} (chosen on selection items); {tested}.")
    lens = [test_sentence(t, k) for t in mine if t["kind"] == "lens_first"]
    lines += lens or ([undecided_sentence(res, last, families_of(metrics))] if len(families_of(metrics)) > 1 else [])
    entropy = [t for t in mine if t["kind"] == "entropy_answer"]
    lines += [test_sentence(t, k) for t in entropy if t["significant"]]
    if entropy and not any(t["significant"] for t in entropy):
        lines.append(f"{last}: answer-slot attention entropy differs between the families in no layer after "
                     f"correction.")
    rest = [t for t in tests if t["checkpoint"] != last]
    for ck in dict.fromkeys(t["checkpoint"] for t in rest if t["significant"]):
        lines.append(f"{ck}, significant: " + "; ".join(test_phrase(t) for t in rest
                                                        if t["checkpoint"] == ck and t["significant"]) + ".")
    if rest:
        n_sig = sum(t["significant"] for t in rest)
        lines.append(f"{n_sig} of the {len(rest)} headline tests of other checkpoints and checkpoint pairs survive "
                     f"the correction{' (above)' if n_sig else ''}; every test is in the headline table. "
                     f"Everything below the table is exploratory.")
    return lines


# -----------------------------------------------------------------------------
# html

CSS = """
body{font-family:-apple-system,Segoe UI,Helvetica,Arial,sans-serif;margin:14px 18px;color:#222;font-size:13px}
h1{font-size:19px;margin:0 0 4px} h2{font-size:16px;margin:18px 0 6px;border-bottom:1px solid #ddd}
h3{font-size:14px;margin:12px 0 4px} .meta{color:#666;font-size:12px}
.summary{background:#f6f8f7;border-left:4px solid #1b7f5c;padding:6px 12px;margin:8px 0}
.summary li{margin:2px 0} .grid{display:grid;grid-template-columns:repeat(auto-fit,minmax(560px,1fr));gap:10px}
.grid img,.wide img{max-width:100%;border:1px solid #eee} figure{margin:0} figcaption{font-size:11px;color:#555}
table{border-collapse:collapse;font-size:11.5px;margin:6px 0}
td,th{border:1px solid #ddd;padding:2px 6px;text-align:right} th{background:#f3f3f3} td.l{text-align:left}
details{margin:6px 0} pre{font-size:11px;background:#fafafa;padding:6px;overflow:auto}
"""


def esc(x):
    return html.escape(str(x))


def num(x, spec=".3g"):
    """A number for the page; "n/a" where the statistic is undefined (NaN became None in clean_json)."""
    return "n/a" if x is None else format(x, spec)


def cell(s):
    if not s or s.get("mean") is None or isinstance(s["mean"], list):
        return "—"
    return f"{num(s['mean'])} <span class=meta>[{num(s.get('lo'))}, {num(s.get('hi'))}]</span>"


def cell_text(s):
    if not s or s.get("mean") is None or isinstance(s["mean"], list):
        return "—"
    return f"{s['mean']:.2f} [{s['lo']:.2f}, {s['hi']:.2f}] (n = {s['n']})"


TABLE_COLS = [("own_correct", "own accuracy"), ("accuracy", "slot accuracy"),
              ("lens_first", "first decodable depth"), ("lens_embedding", "decodable at the embeddings (baseline)"), ("answer_logprob", "answer log-prob"), ("entropy:all", "entropy"),
              ("entropy_norm:all", "entropy / max"), ("entropy_answer:all", "entropy @answer"), ("sink:all", "sink"),
              ("previous_token:all", "prev-token"),
              ("option_lookup:all", "option lookup"), ("option_share:all", "option share"),
              ("chance", "chance (baseline)"), ("topk_mean:own", "top-k mean-ablation drop (own)"),
              ("topk_mean:random", "random-k mean-ablation drop")]


def table(metrics, ck):
    res = metrics["checkpoints"][ck]
    head = "".join(f"<th>{esc(t)}</th>" for _, t in TABLE_COLS)
    rows = []
    for fam in families_of(metrics) + ["all"]:
        for grp in SPLIT_GROUPS + OUTCOME_GROUPS:
            s = res["families"].get(fam, {}).get(grp)
            if s:
                rows.append(f"<tr><td class=l>{esc(fam)}</td><td class=l>{esc(grp)}</td><td>{s['n']}</td>" +
                            "".join(f"<td>{cell(s.get(k))}</td>" for k, _ in TABLE_COLS) + "</tr>")
    strata = [(fam, f"{d}-step", s) for fam, by in res.get("depths", {}).items() for d, s in by.items()]
    strata += [(fam, d, s) for fam, by in res.get("directions", {}).items() for d, s in by.items()]
    for fam, d, s in strata:  # arith by reasoning depth, Stoney by direction (term → gloss, gloss → term)
        rows.append(f"<tr><td class=l>{esc(fam)}, {esc(d)}</td><td class=l>heldout</td><td>{s['n']}</td>" +
                    "".join(f"<td>{cell(s.get(k))}</td>" for k, _ in TABLE_COLS) + "</tr>")
    task_rows = []
    for task, by in res["tasks"].items():
        for grp, s in by.items():
            task_rows.append(f"<tr><td class=l>{esc(task)}</td><td class=l>{esc(grp)}</td><td>{s['n']}</td>"
                             f"<td>{cell(s.get('accuracy'))}</td><td>{cell(s.get('answer_logprob'))}</td>"
                             f"<td>{cell(s.get('entropy:all'))}</td><td>{cell(s.get('sink:all'))}</td></tr>")
    ov = "; ".join(f"{m}: Jaccard {num(o['jaccard'], '.2f')} (shared {o['shared']}), "
                   f"Spearman {num(o['spearman'], '.2f')}"
                   for m, o in res.get("overlap", {}).items())
    tk = "; ".join(f"{m} {f}: {h}" for m, v in res["topk"]["heads"].items() for f, h in v.items())
    return (f"<table><tr><th>family</th><th>split</th><th>n</th>{head}</tr>{''.join(rows)}</table>"
            f"<details><summary>per task</summary><table><tr><th>task</th><th>split</th><th>n</th><th>accuracy</th>"
            f"<th>answer log-prob</th><th>entropy</th><th>sink</th></tr>{''.join(task_rows)}</table></details>"
            f"<p class=meta>top-{res['topk']['k']} heads [layer, head] ({esc(res['topk']['chosen_on'])}): {esc(tk)}."
            f"<br>overlap of the families' heads — {esc(ov) or 'one family only'}.<br>roles: "
            f"{esc(res['roles'])}. Induction on {res['induction']['n_rep']}-token random repeats. "
            f"Skipped (longer than --max-len, or with no cloze slot): {esc(res['skipped'] or 'none')}.</p>")


def fig_html(figs, cls="grid"):
    return f"<div class={cls}>" + "".join(
        f"<figure><img src='figures/{esc(f)}' alt='{esc(cap)}'><figcaption>{esc(cap)}</figcaption></figure>"
        for f, cap in figs) + "</div>"


def headline_table(metrics):
    h = metrics["headline"]
    k = list(metrics["checkpoints"].values())[-1]["topk"]["k"]
    rows = "".join(
        f"<tr><td class=l>{esc(t['kind'])}</td><td class=l>{esc(where(t))}</td><td>{esc(t['n'])}</td>"
        f"<td>{t['mean_a']:.3g}</td><td>{t['mean_b']:.3g}</td><td>{t['diff']:+.3g} <span class=meta>"
        f"[{t['lo']:+.3g}, {t['hi']:+.3g}]</span></td><td>{t['p']:.2g}</td><td>{t['p_holm']:.2g}</td>"
        f"<td class=l>{'<b>yes</b>' if t['significant'] else 'no'}</td></tr>" for t in h["tests"])
    untestable = ", ".join(h["untestable"]) or "none"
    return (f"<details><summary>headline table: all {h['m']} tests (a − b; interval at the "
            f"{100 * (h['interval_level'] or 0):.2f}% Bonferroni level; p two-sided permutation, {h['n_perm']} "
            f"permutations; p_Holm across all {h['m']})</summary>"
            f"<table><tr><th>test</th><th>where</th><th>n</th><th>mean a</th><th>mean b</th><th>a − b</th>"
            f"<th>p</th><th>p_Holm</th><th>significant</th></tr>{rows}</table>"
            f"<p class=meta>k = {k}. Definitions: " + "; ".join(f"<b>{esc(n)}</b>: {esc(d)}" for n, d in
                                                                 HEADLINES.items()) +
            f". Not testable (fewer than two items a side): {esc(untestable)}.</p></details>")


def contexts_html(metrics):
    """The first probed contexts of each task at the last checkpoint, as the model read them."""
    ck = list(metrics["checkpoints"])[-1]
    rows = "".join(f"<tr><td class=l>{esc(c['task'])} {esc(c['id'])}</td><td class=l>"
                   f"{'right' if c['own_correct'] else 'wrong'}</td><td class=l><code>{esc(c['text'])}</code></td></tr>"
                   for c in metrics["checkpoints"][ck].get("contexts", []))
    return (f"<details><summary>{esc(ck)}: what the model read after the prompt (first held-out items of each "
            f"task)</summary><table><tr><th>item</th><th>own answer</th><th>context after the prompt, up to the "
            f"answer slot</th></tr>{rows}</table></details>")


def render_html(metrics, figs):
    cfg = metrics["config"]
    ck_desc = ", ".join(f"{n} = {c['path']}" for n, c in cfg["checkpoints"].items())
    parts = [f"<!doctype html><html><head><meta charset='utf-8'><title>nanostoney reasoning report</title>"
             f"<style>{CSS}</style></head><body>",
             "<h1>How the model reaches its answer: Stoney Nakoda vs math</h1>",
             "<div class=summary>" + "".join(f"<p>{esc(s)}</p>" for s in report_causal.lead(metrics)) + "</div>",
             report_causal.table(metrics),
             f"<div class=meta>{esc(ck_desc)} · tasks {esc(', '.join(cfg['tasks']))} · up to {cfg['max_examples']} "
             f"examples per task and split (held-out = val + test) · context: {esc(cfg['context'])}"
             f"{' (a storage probe, not reasoning)' if cfg['context'] == 'cloze' else ''} · "
             f"{esc(metrics['created'])}</div>",
             "<h2>Ablation, logit lens and attention: declared tests</h2>",
             "<div class=summary><ul>" + "".join(f"<li>{esc(s)}</li>" for s in metrics["summary"]) + "</ul></div>",
             fig_html(figs.get("headline", [])), headline_table(metrics), contexts_html(metrics),
             "<h2>Exploratory (uncorrected 95% intervals; not claims)</h2>",
             # with three or more checkpoints the overview figures are wide: one per row
             fig_html(figs["overview"], "wide" if len(metrics["checkpoints"]) >= 3 else "grid")]
    for ck in metrics["checkpoints"]:
        parts.append(f"<h2>{esc(ck)} (exploratory)</h2>" + table(metrics, ck) + fig_html(figs.get(ck, [])))
        if figs.get(f"{ck}/examples"):
            parts.append(f"<h3>{esc(ck)}: example prompts</h3>" + fig_html(figs[f"{ck}/examples"], "wide"))
    for name in metrics.get("deltas", {}):
        parts.append(f"<h2>{esc(name)} (exploratory)</h2>" + fig_html(figs.get(name, [])))
    parts.append("<h2>Definitions</h2><ul>" + "".join(
        f"<li><b>{esc(k)}</b>: {esc(v)}</li>" for k, v in metrics["definitions"].items()) + "</ul>")
    parts.append(f"<h2>Configuration</h2><pre>{esc(json.dumps(cfg, indent=1))}</pre>"
                 f"<p class=meta>Every number is in metrics.json next to this file.</p></body></html>")
    return "\n".join(parts)


# -----------------------------------------------------------------------------
# writing

def render(metrics, out_dir):
    """Figures and index.html into out_dir (which exists); returns {section: [(file, caption)]}."""
    fig_dir = os.path.join(out_dir, "figures")
    os.makedirs(fig_dir, exist_ok=True)
    figs = {"headline": [], "overview": []}

    def add(section, name, caption, draw):
        path = os.path.join(fig_dir, name)
        if draw(path) is not False:
            figs.setdefault(section, []).append((name, caption))

    add("headline", "head_maps.png", "Which heads carry the answer: per-head ablation map of the last checkpoint "
        "on held-out score items, per family (boxed: the top heads, chosen on the other items)",
        lambda p: fig_head_maps(metrics, p))
    add("headline", "lens_curves.png", "Where the answer becomes decodable: logit lens at the answer slot per "
        "family, a line per checkpoint", lambda p: fig_lens_curves(metrics, p))
    add("overview", "entropy_by_layer.png", "Attention entropy by layer: over all query positions, at the answer "
        "position, and normalised by its maximum (prompt-length free); solid = train split, dashed = held-out",
        lambda p: fig_entropy(metrics, p))
    add("overview", "logit_lens.png", "Logit lens: answer log-prob, top-1 rate, MC option accuracy by depth",
        lambda p: fig_logit_lens(metrics, p))
    for i, ck in enumerate(metrics["checkpoints"]):
        add("overview", f"{i}_ablation_zero.png", f"{ck}: zero-ablation drop per head",
            lambda p, ck=ck: fig_ablation(metrics, ck, "zero", p))
        add(ck, f"{i}_regions.png", f"{ck}: attention mass per region", lambda p, ck=ck: fig_regions(metrics, ck, p))
        add(ck, f"{i}_roles.png", f"{ck}: head roles", lambda p, ck=ck: fig_roles(metrics, ck, p))
        add(ck, f"{i}_ablation_mean.png", f"{ck}: mean-ablation drop per head",
            lambda p, ck=ck: fig_ablation(metrics, ck, "mean", p))
        add(ck, f"{i}_topk.png", f"{ck}: top-k heads ablated together",
            lambda p, ck=ck: fig_topk(metrics, ck, p))
        for j, ex in enumerate(metrics["checkpoints"][ck].get("examples", [])):
            add(f"{ck}/examples", f"{i}_example_{j}.png", f"{ck}: {ex['task']} {ex['id']}",
                lambda p, ck=ck, ex=ex: fig_example(metrics, ck, ex, p))
    for i, (name, d) in enumerate(metrics.get("deltas", {}).items()):
        add(name, f"delta_{i}.png", f"{name}: entropy, logit lens, region mass", lambda p, d=d, n=name:
            fig_delta(metrics, n, d, p))
        add(name, f"delta_{i}_maps.png", f"{name}: per-head changes", lambda p, d=d, n=name:
            fig_delta_maps(metrics, n, d, p))
    with open(os.path.join(out_dir, "index.html"), "w", encoding="utf-8") as f:
        f.write(render_html(metrics, figs))
    return figs


def clean_json(x):
    """NaN/inf -> None, numpy -> python, so metrics.json is strict JSON."""
    if isinstance(x, dict):
        return {str(k): clean_json(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [clean_json(v) for v in x]
    if isinstance(x, np.ndarray):
        return clean_json(x.tolist())
    if isinstance(x, (np.floating, float)):
        return None if not math.isfinite(float(x)) else float(x)
    if isinstance(x, np.integer):
        return int(x)
    return x


REPORT_FILES = ("figures", "metrics.json", "index.html")  # what write_report puts into out_dir, in order


def write_report(out_dir, metrics, logger=None):
    """Build the report in a temporary directory inside out_dir, then move its files into
    out_dir one by one (index.html last), each replacing our own previous one whole. Nothing else
    in out_dir is touched; a failure leaves out_dir as it was and names the file and the reason."""
    metrics = clean_json(metrics)
    out_dir = os.path.abspath(out_dir)
    tmp = os.path.join(out_dir, f".tmp-{os.getpid()}")  # inside: nothing is written outside --out
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        os.makedirs(tmp)
        figs = render(metrics, tmp)
        write_json(os.path.join(tmp, "metrics.json"), metrics, indent=1)
        os.makedirs(out_dir, exist_ok=True)
        for name in REPORT_FILES:
            old = os.path.join(out_dir, name)
            if os.path.isdir(old):  # the previous figures/ moves into tmp, deleted with it below
                os.replace(old, os.path.join(tmp, f"{name}.old"))
            os.replace(os.path.join(tmp, name), old)
    except OSError as e:
        for name in REPORT_FILES:  # a figures/ moved aside but not replaced goes back
            old, final = os.path.join(tmp, f"{name}.old"), os.path.join(out_dir, name)
            if os.path.exists(old) and not os.path.exists(final):
                os.replace(old, final)
        raise write_failed(tmp, e, kept=f"the report in {out_dir} was not replaced") from None
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    if logger is not None:
        log_to(logger, metrics, figs, out_dir)
    return out_dir


def log_to(logger, metrics, figs, out_dir):
    """The report's figures and tables in W&B (and the run's jsonl)."""
    for section, items in figs.items():
        for name, _ in items:
            logger.log_image(f"report/{os.path.splitext(name)[0]}", os.path.join(out_dir, "figures", name))
    cols = ["checkpoint", "family", "split", "n"] + [k for k, _ in TABLE_COLS]
    rows, scalars = [], {}
    for ck, res in metrics["checkpoints"].items():
        for fam, by in res["families"].items():
            for grp, s in by.items():
                vals = []
                for k, _ in TABLE_COLS:
                    v = s.get(k)
                    ok = v and not isinstance(v.get("mean"), list) and v.get("mean") is not None
                    vals.append(v["mean"] if ok else None)
                    if ok and grp in SPLIT_GROUPS:
                        scalars[f"report/{ck}/{fam}/{grp}/{k}"] = v["mean"]
                rows.append([ck, fam, grp, s["n"]] + vals)
    logger.log_table("report/summary", cols, rows)
    hcols = ["id", "diff", "lo", "hi", "p", "p_holm", "significant"]
    logger.log_table("report/headline", hcols, [[t[c] for c in hcols] for t in metrics["headline"]["tests"]])
    logger.summary(scalars)
