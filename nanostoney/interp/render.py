"""The reasoning report: a self-contained index.html (no scripts, no network: it opens offline) beside
its figures and metrics.json, drawn from the metrics alone (`render(json.load(...), out_dir)` redraws
a saved one); write_report moves each file into place whole."""
import json
import math
import os
import shutil

import numpy as np

from nanostoney.files import write_failed, write_json
from nanostoney.interp import causal
from nanostoney.interp.causal import esc
from nanostoney.interp.definitions import HEADLINE_MODE, HEADLINES, MIN_N, OUTCOME_GROUPS, SPLIT_GROUPS
from nanostoney.interp.figures import fig_ablation, fig_delta, fig_delta_maps, fig_entropy, fig_example, \
    fig_head_maps, fig_lens_curves, fig_logit_lens, fig_regions, fig_roles, fig_topk, families_of

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
                                          "answers part, which needs no letter (a small model is often above chance "
                                          "there).")
    return [f"{last} is not above chance on held-out {' or '.join(low)}: the heads and layers below carry what the "
            f"model does at the answer slot (the answer format, a preferred option), not a reached answer. A claim "
            f"about how the answer is reached needs a model above chance (BENCHMARKS.md, section SFT).{hint}"]


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


def num(x, spec=".3g"):
    """A number for the page; "n/a" where the statistic is undefined (NaN became None in clean_json)."""
    return "n/a" if x is None else format(x, spec)


def scalar(s):
    """Whether a summary holds one number (not an array, not undefined)."""
    return bool(s) and s.get("mean") is not None and not isinstance(s["mean"], list)


def cell(s):
    return f"{num(s['mean'])} <span class=meta>[{num(s.get('lo'))}, {num(s.get('hi'))}]</span>" if scalar(s) else "—"


def cell_text(s):
    return f"{s['mean']:.2f} [{s['lo']:.2f}, {s['hi']:.2f}] (n = {s['n']})" if scalar(s) else "—"


TABLE_COLS = [("own_correct", "own accuracy"), ("accuracy", "slot accuracy"), ("lens_first", "first decodable depth"),
              ("lens_embedding", "decodable at the embeddings (baseline)"), ("answer_logprob", "answer log-prob"),
              ("entropy:all", "entropy"), ("entropy_norm:all", "entropy / max"),
              ("entropy_answer:all", "entropy @answer"), ("sink:all", "sink"), ("previous_token:all", "prev-token"),
              ("option_lookup:all", "option lookup"), ("option_share:all", "option share"),
              ("chance", "chance (baseline)"), ("topk_mean:own", "top-k mean-ablation drop (own)"),
              ("topk_mean:random", "random-k mean-ablation drop")]


def table(metrics, ck):
    res = metrics["checkpoints"][ck]
    head = "".join(f"<th>{esc(t)}</th>" for _, t in TABLE_COLS)
    groups = [(esc(fam), grp, res["families"][fam][grp]) for fam in families_of(metrics) + ["all"]
              for grp in SPLIT_GROUPS + OUTCOME_GROUPS if res["families"].get(fam, {}).get(grp)]
    # arith by reasoning depth, Stoney by direction (term → gloss, gloss → term)
    groups += [(f"{esc(fam)}, {esc(d)}{unit}", "heldout", s) for key, unit in (("depths", "-step"), ("directions", ""))
               for fam, by in res.get(key, {}).items() for d, s in by.items()]
    rows = [f"<tr><td class=l>{label}</td><td class=l>{esc(grp)}</td><td>{s['n']}</td>" +
            "".join(f"<td>{cell(s.get(k))}</td>" for k, _ in TABLE_COLS) + "</tr>" for label, grp, s in groups]
    task_cols = ("accuracy", "answer_logprob", "entropy:all", "sink:all")
    task_rows = [f"<tr><td class=l>{esc(task)}</td><td class=l>{esc(grp)}</td><td>{s['n']}</td>" +
                 "".join(f"<td>{cell(s.get(k))}</td>" for k in task_cols) + "</tr>"
                 for task, by in res["tasks"].items() for grp, s in by.items()]
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
             "<div class=summary>" + "".join(f"<p>{esc(s)}</p>" for s in causal.lead(metrics)) + "</div>",
             causal.table(metrics),
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

    def add(section, name, caption, draw, *args):
        if draw(metrics, *args, os.path.join(fig_dir, name)) is not False:
            figs.setdefault(section, []).append((name, caption))

    add("headline", "head_maps.png", "Which heads carry the answer: per-head ablation map of the last checkpoint "
        "on held-out score items, per family (boxed: the top heads, chosen on the other items)", fig_head_maps)
    add("headline", "lens_curves.png", "Where the answer becomes decodable: logit lens at the answer slot per "
        "family, a line per checkpoint", fig_lens_curves)
    add("overview", "entropy_by_layer.png", "Attention entropy by layer: over all query positions, at the answer "
        "position, and normalised by its maximum (prompt-length free); solid = train split, dashed = held-out",
        fig_entropy)
    add("overview", "logit_lens.png", "Logit lens: answer log-prob, top-1 rate, MC option accuracy by depth",
        fig_logit_lens)
    for i, ck in enumerate(metrics["checkpoints"]):
        add("overview", f"{i}_ablation_zero.png", f"{ck}: zero-ablation drop per head", fig_ablation, ck, "zero")
        add(ck, f"{i}_regions.png", f"{ck}: attention mass per region", fig_regions, ck)
        add(ck, f"{i}_roles.png", f"{ck}: head roles", fig_roles, ck)
        add(ck, f"{i}_ablation_mean.png", f"{ck}: mean-ablation drop per head", fig_ablation, ck, "mean")
        add(ck, f"{i}_topk.png", f"{ck}: top-k heads ablated together", fig_topk, ck)
        for j, ex in enumerate(metrics["checkpoints"][ck].get("examples", [])):
            add(f"{ck}/examples", f"{i}_example_{j}.png", f"{ck}: {ex['task']} {ex['id']}", fig_example, ck, ex)
    for i, (name, d) in enumerate(metrics.get("deltas", {}).items()):
        add(name, f"delta_{i}.png", f"{name}: entropy, logit lens, region mass", fig_delta, name, d)
        add(name, f"delta_{i}_maps.png", f"{name}: per-head changes", fig_delta_maps, name, d)
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
    for name, _ in [f for items in figs.values() for f in items]:
        logger.log_image(f"report/{os.path.splitext(name)[0]}", os.path.join(out_dir, "figures", name))
    cols = ["checkpoint", "family", "split", "n"] + [k for k, _ in TABLE_COLS]
    rows, scalars = [], {}
    for ck, res in metrics["checkpoints"].items():
        for fam, by in res["families"].items():
            for grp, s in by.items():
                vals = {k: s[k]["mean"] if scalar(s.get(k)) else None for k, _ in TABLE_COLS}
                rows.append([ck, fam, grp, s["n"]] + list(vals.values()))
                if grp in SPLIT_GROUPS:
                    scalars.update({f"report/{ck}/{fam}/{grp}/{k}": v for k, v in vals.items() if v is not None})
    logger.log_table("report/summary", cols, rows)
    hcols = ["id", "diff", "lo", "hi", "p", "p_holm", "significant"]
    logger.log_table("report/headline", hcols, [[t[c] for c in hcols] for t in metrics["headline"]["tests"]])
    logger.summary(scalars)
