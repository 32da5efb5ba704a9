"""The report's figures: PNGs drawn from the metrics alone (every number they show is in
metrics.json), with matplotlib's Agg backend, imported only when drawing."""
import re

import numpy as np

from nanostoney.interp.definitions import ABLATION_MODES, HEADLINE_MODE, LEXICAL_REGIONS, SPLIT_GROUPS, \
    STRUCT_REGIONS

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


def _band(ax, s, c, label, style="-", alpha=0.12):
    """A summary's mean as a line over layers (or depths), its interval as a band."""
    x = np.arange(len(arr(s)))
    ax.plot(x, arr(s), style, color=c, marker="o", ms=3, label=label)
    ax.fill_between(x, arr(s, "lo"), arr(s, "hi"), color=c, alpha=alpha, lw=0)


def _bar_group(ax, s, b, n_bars, w, c, grp, label):
    """Bar b of n_bars per region (a summary's mean with its interval); returns the bars' x."""
    m = arr(s)
    x = np.arange(len(m)) + (b - (n_bars - 1) / 2) * w
    ax.bar(x, m, w, color=c, alpha=1.0 if grp == "train" else 0.55, label=label)
    ax.errorbar(x, m, [m - arr(s, "lo"), arr(s, "hi") - m], fmt="none", color="k", lw=0.7, capsize=1.5)
    return x


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
            label = f"{fam} ({grp}, n={s['n']})" if show_n else f"{fam} ({grp})"
            _band(ax, s, color(fam, i), label, GROUP_STYLES[grp])


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
            _band(ax, s, EXTRA_COLORS[i % len(EXTRA_COLORS)], f"{ck} (n={s['n']})", alpha=0.1)
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
            x = _bar_group(ax, s, b, len(bars), w, color(fam, b), grp, f"{fam} ({grp}, n={s['n']})")
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
    for ax, key, title in [(axes[0], "entropy:layer", "Δ attention entropy by layer (nats)"),
                           (axes[1], "lens_logprob", "Δ logit-lens answer log-prob")]:
        for i, fam in enumerate(fams):
            for grp in SPLIT_GROUPS:
                s = d["families"][fam].get(grp, {}).get(key)
                if not s:
                    continue
                _band(ax, s, color(fam, i), f"{fam} ({grp})", GROUP_STYLES[grp])
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
        _bar_group(ax, s, b, len(bars), w, color(fam, b), grp, f"{fam} ({grp})")
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
