"""The report's figures: PNGs drawn from the metrics alone (every number they show is in
metrics.json), with matplotlib's Agg backend, imported only when drawing."""
import re

import numpy as np

from nanostoney.interp.definitions import ABLATION_MODES, HEADLINE_MODE, LEXICAL_REGIONS, SPLIT_GROUPS, STRUCT_REGIONS

FAMILY_COLORS = {"stoney": "#1b7f5c", "math": "#c0392b", "yoruba": "#2c6fbb", "english": "#d68910", "all": "#555555"}
GROUP_STYLES = {"train": "-", "heldout": "--", "all": ":"}
EXTRA_COLORS = ["#8e44ad", "#17a2b8", "#7f8c8d", "#e84393"]
REGION_COLORS = {"question": "#1f4e9c", "options": "#b8860b", "rationale": "#2e7d32", "answer_cue": "#c0392b"}
REGION_NAMES = {"question": "blue", "options": "gold", "rationale": "green", "answer_cue": "red"}
DEPTH = "depth (0 = embeddings, last = output)"


def _plt():
    # lazy: matplotlib is heavy, and only drawing needs it (metrics.json is written without it)
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    plt.rcParams.update({"font.size": 8, "axes.titlesize": 9, "figure.dpi": 100,
                         "axes.spines.top": False, "axes.spines.right": False})
    return plt


def _row(n, figsize, **kw):
    """A figure with one row of n panels: (fig, axes)."""
    fig, axes = _plt().subplots(1, n, figsize=figsize, squeeze=False, **kw)
    return fig, axes[0]


def color(family, i=0):
    return FAMILY_COLORS.get(family, EXTRA_COLORS[i % len(EXTRA_COLORS)])


def arr(s, key="mean"):
    return np.array(s[key], dtype=float)


def families_of(metrics):
    return list(metrics["config"]["families"])


def _band(ax, s, c, label, style="-", alpha=0.12):
    """A summary's mean as a line over layers (or depths), its interval as a band."""
    x = np.arange(len(arr(s)))
    ax.plot(x, arr(s), style, color=c, marker="o", ms=3, label=label)
    ax.fill_between(x, arr(s, "lo"), arr(s, "hi"), color=c, alpha=alpha, lw=0)


def _bars(ax, by, fams, key, label):
    """Per region, a bar per family and split group holding `key` (mean and interval); returns
    [(x, family, group)] of the bars drawn."""
    bars = [(f, g) for f in fams for g in SPLIT_GROUPS if by[f].get(g, {}).get(key)]
    w, out = 0.8 / max(1, len(bars)), []
    for b, (fam, grp) in enumerate(bars):
        s = by[fam][grp][key]
        m = arr(s)
        x = np.arange(len(m)) + (b - (len(bars) - 1) / 2) * w
        ax.bar(x, m, w, color=color(fam, b), alpha=1.0 if grp == "train" else 0.55, label=label(fam, grp, s))
        ax.errorbar(x, m, [m - arr(s, "lo"), arr(s, "hi") - m], fmt="none", color="k", lw=0.7, capsize=1.5)
        out.append((x, fam, grp))
    return out


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
    handles = {}
    for ax in np.ravel(axes):
        for h, lab in zip(*ax.get_legend_handles_labels()):
            handles.setdefault(re.sub(r", n=\d+\)$", ")", lab), h)  # sample sizes differ per panel
    fig.tight_layout(rect=(0, 0.05, 1, 0.96))
    fig.legend(list(handles.values()), list(handles), loc="lower center", ncol=max(1, len(handles)), fontsize=7,
               frameon=False)


def _layer_lines(ax, by, fams, key, show_n=False):
    """One line per family and split group over layers (train solid, held-out dashed), with its
    95% interval as a band; by: {family: {group: summary}}."""
    for i, fam in enumerate(fams):
        for grp in SPLIT_GROUPS:
            if s := by.get(fam, {}).get(grp, {}).get(key):
                _band(ax, s, color(fam, i), f"{fam} ({grp}, n={s['n']})" if show_n else f"{fam} ({grp})",
                      GROUP_STYLES[grp])


def _layer_grid(metrics, rows, title, xlabel, path, show_n=False, decorate=None):
    """A panel per checkpoint (columns) and statistic (rows: (key, y label)), lines over layers."""
    cks = list(metrics["checkpoints"])
    fig, axes = _plt().subplots(len(rows), len(cks), figsize=(3.6 * len(cks) + 0.6, 6.6), squeeze=False, sharex="col")
    for c, ck in enumerate(cks):
        for r, (key, label) in enumerate(rows):
            ax = axes[r][c]
            _layer_lines(ax, metrics["checkpoints"][ck]["families"], families_of(metrics), key, show_n)
            if decorate is not None:
                decorate(ax, key)
            ax.set(title=ck if r == 0 else "", ylabel=label if c == 0 else "",
                   xlabel=xlabel if r == len(rows) - 1 else "")
            ax.xaxis.get_major_locator().set_params(integer=True)
    _legend_below(fig, axes)
    _save(fig, path, title, layout=False)


def fig_entropy(metrics, path):
    """Rows: entropy over all query positions, entropy of the answer position; a panel per checkpoint."""
    rows = [("entropy:layer", "entropy (nats)\nall query positions"),
            ("entropy_answer:layer", "entropy (nats)\nanswer position"),
            ("entropy_norm:layer", "H / log(keys seen)\nall query positions")]
    _layer_grid(metrics, rows, "Attention entropy by layer (mean over heads)", "layer", path, show_n=True)


def fig_logit_lens(metrics, path):
    def decorate(ax, key):
        if key == "lens_choice":
            ax.axhline(0.2, color="#999", lw=0.8, ls=":")  # chance among five letters
        if key != "lens_logprob":
            ax.set_ylim(-0.04, 1.04)
    rows = [("lens_logprob", "answer log-prob"), ("lens_top1", "top-1 rate"), ("lens_choice", "MC option accuracy")]
    _layer_grid(metrics, rows, "Logit lens: where the answer is decided", DEPTH, path, decorate=decorate)


# -----------------------------------------------------------------------------
# the first screen's figures

def fig_head_maps(metrics, path):
    """The last checkpoint's heads x layers map per family: drop in the answer's log-prob when one
    head is mean-ablated, on held-out score items; boxed: the family's top-k heads (chosen on the
    selection items, so the map judges them out of sample)."""
    ck = list(metrics["checkpoints"])[-1]
    res = metrics["checkpoints"][ck]
    maps = res.get("head_maps", {})
    fams = [f for f in families_of(metrics) if f in maps]
    if not fams:
        return False
    vmax = max(1e-6, max(np.nanmax(np.abs(arr(maps[f]))) for f in fams))
    fig, axes = _row(len(fams), (3.2 * len(fams) + 0.4, 2.9))
    for ax, fam in zip(axes, fams):
        _heat(ax, arr(maps[fam]), f"{fam} (n={maps[fam]['n']})", "RdBu_r", -vmax, vmax,
              marks=res["topk"]["heads"][HEADLINE_MODE].get(fam, []))
    _save(fig, path, f"{ck}: answer log-prob drop when one head is mean-ablated\n(held-out score items; "
                     f"boxed = top-{res['topk']['k']} heads chosen on selection items)")
    return True


def fig_lens_curves(metrics, path):
    """Per family: the share of held-out items whose answer the logit lens decodes at each depth,
    a line per checkpoint (bands: uncorrected 95%)."""
    fams = families_of(metrics)
    fig, axes = _row(len(fams), (3.2 * len(fams) + 0.4, 2.9), sharey=True)
    for ax, fam in zip(axes, fams):
        for i, ck in enumerate(metrics["checkpoints"]):
            if s := metrics["checkpoints"][ck]["families"].get(fam, {}).get("heldout", {}).get("lens_decodable"):
                _band(ax, s, EXTRA_COLORS[i % len(EXTRA_COLORS)], f"{ck} (n={s['n']})", alpha=0.1)
        ax.axhline(0.2, color="#999", lw=0.8, ls=":")  # chance among five letters
        ax.set(ylim=(-0.03, 1.03), title=fam, xlabel=DEPTH)
        ax.xaxis.get_major_locator().set_params(integer=True)
        ax.legend(fontsize=6.5, frameon=False)
    axes[0].set_ylabel("answer decodable (share of items)")
    _save(fig, path, "Logit lens at the answer slot: where the answer becomes decodable\n(held-out items; "
                     "dotted = chance for five options)")
    return True


# -----------------------------------------------------------------------------
# figures for one checkpoint

def _heat(ax, m, title, cmap="viridis", vmin=None, vmax=None, marks=()):
    """A layers x heads map, annotated when small; marks: [(layer, head)] to box."""
    m = np.asarray(m, dtype=float)
    im = ax.imshow(m, cmap=cmap, vmin=vmin, vmax=vmax, aspect="auto", interpolation="nearest")
    ax.set(title=title, xlabel="head", ylabel="layer", xticks=range(m.shape[1]), yticks=range(m.shape[0]))
    if m.size <= 64:
        for (i, j), v in np.ndenumerate(m):
            if np.isfinite(v):
                dark = abs(im.norm(v) - 0.5) > 0.3 if cmap in ("RdBu_r", "PuOr_r") else im.norm(v) < 0.5
                ax.text(j, i, f"{v:.2g}", ha="center", va="center", fontsize=6, color="white" if dark else "black")
    if len(marks):
        from matplotlib.patches import Rectangle  # lazy, as _plt()
        for i, j in sorted(set(map(tuple, marks))):
            ax.add_patch(Rectangle((j - 0.46, i - 0.46), 0.92, 0.92, fill=False, ec="black", lw=1.4))
    ax.figure.colorbar(im, ax=ax, fraction=0.046, pad=0.03)


def _sym_heat(ax, m, title, cmap="PuOr_r", lim=None):
    """A map coloured symmetrically around 0 (lim: the colour limit, default its largest |value|)."""
    lim = max(1e-6, float(np.nanmax(np.abs(m)))) if lim is None else lim
    _heat(ax, m, title, cmap, -lim, lim)


def fig_ablation(metrics, ck, mode, path):
    """Rows: split groups; columns: each family's drop map and their difference."""
    res = metrics["checkpoints"][ck]["families"]
    fams = [f for f in families_of(metrics) if f in res][:2]
    groups = [g for g in SPLIT_GROUPS if all(res.get(f, {}).get(g) for f in fams)] or ["all"]
    ncol = len(fams) + (1 if len(fams) == 2 else 0)
    fig, axes = _plt().subplots(len(groups), ncol, figsize=(3.3 * ncol, 2.6 * len(groups) + 0.4), squeeze=False)
    key = f"ablate_{mode}"
    for r, grp in enumerate(groups):
        maps = [res[f][grp][key] for f in fams if res.get(f, {}).get(grp, {}).get(key)]
        if not maps:
            continue
        vmax = max(1e-6, max(np.nanmax(np.abs(arr(s))) for s in maps))
        for c, (fam, s) in enumerate(zip(fams, maps)):
            _sym_heat(axes[r][c], arr(s), f"{fam}, {grp} (n={s['n']})", "RdBu_r", vmax)
        if len(maps) == 2:
            _sym_heat(axes[r][2], arr(maps[0]) - arr(maps[1]), f"{fams[0]} − {fams[1]}")
    _save(fig, path, f"{ck}: drop in answer log-prob when one head is {mode}-ablated (red = the head helps)")


def fig_topk(metrics, ck, path):
    """Groups: the family evaluated and split; bars: whose top-k heads were ablated (or random k)."""
    res = metrics["checkpoints"][ck]
    fams = [f for f in families_of(metrics) if f in res["families"]]
    sources = fams + ["random"]
    fig, axes = _plt().subplots(1, len(ABLATION_MODES), figsize=(9, 2.9), squeeze=False)
    groups = [(f, g) for f in fams for g in SPLIT_GROUPS if res["families"][f].get(g)]
    w = 0.8 / len(sources)
    for ax, mode in zip(axes[0], ABLATION_MODES):
        for j, src in enumerate(sources):
            got = [(gi, v) for gi, (fam, grp) in enumerate(groups)
                   if (v := res["families"][fam][grp].get(f"topk_{mode}:{'own' if src == fam else src}"))
                   and v["mean"] is not None]
            xs = [gi + (j - (len(sources) - 1) / 2) * w for gi, _ in got]
            ms = [v["mean"] for _, v in got]
            ax.bar(xs, ms, w, color=color(src, j) if src != "random" else "#aaaaaa",
                   label=f"{src}'s top-{res['topk']['k']} heads" if src != "random" else "random heads (mean)")
            ax.errorbar(xs, ms, [[v["mean"] - v["lo"] for _, v in got], [v["hi"] - v["mean"] for _, v in got]],
                        fmt="none", color="k", lw=0.8, capsize=2)
        ax.set_xticks(range(len(groups)), [f"{f} items\n{g}" for f, g in groups])
        ax.axhline(0, color="#666", lw=0.6)
        ax.set(title=f"{mode} ablation of k heads together", ylabel="drop in answer log-prob")
    axes[0][-1].legend(fontsize=6.5, frameon=False)
    _save(fig, path, f"{ck}: do the families rely on the same heads? (heads chosen on selection items)")


def fig_regions(metrics, ck, path):
    res = metrics["checkpoints"][ck]["families"]
    fams = [f for f in families_of(metrics) if f in res]
    fig, axes = _plt().subplots(1, 2, figsize=(10, 2.9), gridspec_kw={"width_ratios": [len(STRUCT_REGIONS),
                                                                                          len(LEXICAL_REGIONS) + 1]})
    for ax, (key, share_key, names, title) in zip(axes, [
            ("struct_mass:all", "struct_share", STRUCT_REGIONS, "structure"),
            ("lex_mass:all", "lex_share", LEXICAL_REGIONS, "lexical classes")]):
        for x, fam, grp in _bars(ax, res, fams, key, lambda f, g, s: f"{f} ({g}, n={s['n']})"):
            if sh := res[fam][grp].get(share_key):
                ax.scatter(x, arr(sh), marker="_", s=60, color="k", zorder=3)
        ax.set_xticks(range(len(names)), names, rotation=30, ha="right")
        ax.set(title=f"mass from the answer position: {title} (— = token share)",
               ylabel="mass (mean over layers and heads)")
    axes[1].legend(fontsize=6.5, frameon=False)
    _save(fig, path)


def fig_roles(metrics, ck, path):
    res = metrics["checkpoints"][ck]
    every = res["families"]["all"]["all"]
    th = metrics["definitions"].get("role_thresholds", {})
    panels = [("previous-token (task prompts)", every["previous_token"], "previous_token"),
              ("induction (random repeats)", res["induction"]["induction"], "induction"),
              ("attention sink (mass on bos)", every["sink"], "sink"),
              ("attention entropy (nats)", every["entropy"], None)]
    panels += [(f"option lookup ({fam})", s, "option_lookup") for fam in families_of(metrics)
               if (s := res["families"].get(fam, {}).get("all", {}).get("option_lookup"))]
    fig, axes = _row(len(panels), (3.0 * len(panels), 2.7))
    for ax, (title, s, role) in zip(axes, panels):
        # a role's colour scale tops out at its threshold or above: bright means "has the role"
        top = max(float(np.nanmax(arr(s))), th.get(role, 0.0)) if role else float(np.nanmax(arr(s)))
        _heat(ax, arr(s), title, "magma", 0, max(1e-6, top))
    roles = "; ".join(f"{r} {h}" for r, h in res["roles"].items() if h) or "no head reaches a role threshold"
    fig.suptitle(f"{ck}: head-role scores, mean over examples (colour scale reaches at least the role threshold); "
                 f"roles: {roles}", fontsize=9, x=0.01, ha="left")
    _save(fig, path)


def _token_labels(ax, ex, T, step, fontsize, axes="x"):
    """Every step-th token as a tick label on the given axes, coloured by its structural region."""
    for a in axes:
        getattr(ax, f"set_{a}ticks")(range(0, T, step), ex["tokens"][::step], fontsize=fontsize,
                                     **({"rotation": 90} if a == "x" else {}))
        for lab, r in zip(getattr(ax, f"get_{a}ticklabels")(), ex["struct"][::step]):
            lab.set_color(REGION_COLORS.get(STRUCT_REGIONS[r], "black"))


def fig_example(metrics, ck, ex, path):
    """Attention of every head from the answer position over the example's tokens, and the full
    pattern of the family's most important head."""
    rows = np.array(ex["answer_rows"], dtype=float)  # [L, H, T]
    L, H, T = rows.shape
    lower = min(7.5, 0.07 * T + 2)
    fig = _plt().figure(figsize=(min(22, max(9, 0.09 * T + 2)), 3.0 + 0.14 * L * H + lower))
    gs = fig.add_gridspec(2, 1, height_ratios=[0.14 * L * H + 0.8, lower])
    ax = fig.add_subplot(gs[0])
    im = ax.imshow(rows.reshape(L * H, T), aspect="auto", cmap="Blues", vmin=0, vmax=max(1e-6, rows.max()),
                   interpolation="nearest")
    ax.set_yticks(range(L * H), [f"L{l}.H{h}" for l in range(L) for h in range(H)], fontsize=5)
    _token_labels(ax, ex, T, max(1, T // 160), 5)
    ax.set_title(f"{ck} — {ex['task']} ({ex['split']}) {ex['id']}: attention from the answer position "
                 f"(last token) for every head; token colours: " +
                 " ".join(f"{r}={c}" for r, c in REGION_NAMES.items()))
    fig.colorbar(im, ax=ax, fraction=0.02, pad=0.01)
    ax2 = fig.add_subplot(gs[1])
    im2 = ax2.imshow(np.array(ex["pattern"], dtype=float), cmap="Blues", vmin=0, vmax=1, interpolation="nearest",
                     aspect="auto")
    _token_labels(ax2, ex, T, max(1, T // 90), 4.5, "xy")
    ax2.set_title(f"full pattern of L{ex['head'][0]}.H{ex['head'][1]} (largest mean zero-ablation drop for "
                  f"{ex['family']}); rows = queries, columns = keys")
    fig.colorbar(im2, ax=ax2, fraction=0.02, pad=0.01)
    _save(fig, path)


# -----------------------------------------------------------------------------
# how one checkpoint moved relative to another (e.g. GRPO vs SFT), paired by example

def fig_delta(metrics, name, d, path):
    fams = [f for f in families_of(metrics) if f in d["families"]]
    fig, axes = _plt().subplots(1, 3, figsize=(12, 2.9))
    for ax, key, title, xlabel in [(axes[0], "entropy:layer", "Δ attention entropy by layer (nats)", "layer"),
                                   (axes[1], "lens_logprob", "Δ logit-lens answer log-prob", "depth")]:
        _layer_lines(ax, d["families"], fams, key)
        ax.axhline(0, color="#666", lw=0.6)
        ax.set(title=title, xlabel=xlabel)
        ax.xaxis.get_major_locator().set_params(integer=True)
    axes[0].legend(fontsize=6.5, frameon=False)
    _bars(axes[2], d["families"], fams, "struct_mass:all", lambda f, g, s: f"{f} ({g})")
    axes[2].axhline(0, color="#666", lw=0.6)
    axes[2].set_xticks(range(len(STRUCT_REGIONS)), STRUCT_REGIONS, rotation=30, ha="right")
    axes[2].set_title("Δ attention mass from the answer position")
    _save(fig, path, f"{name}: change per example, paired (n={d['n_paired']}); bands = 95% bootstrap")


def fig_delta_maps(metrics, name, d, path):
    by = [(f"{title} ({fam})", d["families"][fam].get("all", {}), key) for fam in families_of(metrics)
          if fam in d["families"]
          for key, title in (("ablate_zero", "Δ zero-ablation drop"), ("option_lookup", "Δ option lookup"))]
    every = d["families"].get("all", {}).get("all", {})
    by += [(title, every, key) for key, title in (("previous_token", "Δ previous-token"), ("sink", "Δ sink"))]
    panels = [(title, s[key]) for title, s, key in by if s.get(key) and isinstance(s[key]["mean"], list)]
    if not panels:
        return False
    fig, axes = _row(len(panels), (3.0 * len(panels), 2.7))
    for ax, (title, s) in zip(axes, panels):
        _sym_heat(ax, arr(s), title)
    _save(fig, path, f"{name}: per-head change, mean over paired items (exploratory)")
    return True
