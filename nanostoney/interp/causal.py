"""The report's first screen: what activation patching found, in two or three sentences, and the
corrected table they are read from. Every number comes from this run's metrics; the seeds line only
from a replication summary (bench/report_seeds.py) written for this run."""
import html

SLOT_NAMES = {"stoney/answer": "Stoney, at the answer the model writes after its own rationale",
              "math/operand": "math, at each operand the model's own chain copies from the question"}
TOP_SITES = 4  # rows per declared group on the first screen (every site is in metrics.json)


def esc(x):
    return html.escape(str(x))


def last_patching(metrics):
    """(checkpoint name, its patching summary) of the last checkpoint, or (name, None)."""
    last = list(metrics["checkpoints"])[-1]
    return last, metrics["checkpoints"][last].get("patching")


def site_words(r):
    where, _, rest = r["site"].partition("/")
    if where == "head":
        layer, head = rest.split(".")
        return f"head {layer}.{head} at the slot"
    pos, layer = rest.split("/")
    return f"the residual stream entering block {layer} at the {'changed token' if pos == 'pos' else 'slot'}"


def group_sentence(name, g):
    """One sentence for a declared group: the strongest passing site, or that none passes."""
    label = SLOT_NAMES.get(name, name)
    passing = [r for r in g["sites"] if r["passes"]]
    if not g["sites"]:
        return f"{label}: {g['n']} minimal pairs, too few to test."
    if not passing:
        return (f"{label} ({g['n']} pairs): no layer or head restores the clean answer after correction "
                f"(mean logit gap {g['gap']:.2f} nats).")
    heads = [r for r in passing if r["site"].startswith("head/")]
    best = heads[0] if heads else passing[0]
    share = f" ({100 * best['fraction']:.0f}%)" if gap_is_real(g) else ""
    return (f"{label} ({g['n']} pairs): patching {site_words(best)} from the clean run restores "
            f"{best['mean']:.2f} nats of the {g['gap']:.2f}-nat logit gap{share}, "
            f"corrected interval [{best['lo']:.2f}, {best['hi']:.2f}], p_Holm {best['p_holm']:.2g}; "
            f"{len(passing)} of {len(g['sites'])} sites pass.")


def seeds_sentence(metrics):
    seeds = metrics.get("seeds")
    if not seeds:
        return ("How sure: one training run; intervals resample items of that run, so they say nothing about what "
                "another training seed would give (bench/report_seeds.py replicates over seeds).")
    held = [c for c, v in seeds["claims"].items() if v["every_seed"]]
    return (f"Over {seeds['n_seeds']} training seeds, {len(held)} of {len(seeds['claims'])} claims hold in every "
            f"seed{': ' + '; '.join(held) if held else ''}.")


def lead(metrics):
    """The first screen's sentences: what patching found per family, then how sure."""
    cfg = metrics["config"]
    last, pat = last_patching(metrics)
    if cfg.get("context") == "cloze":
        first = (f"{last}: this report reads a cloze slot, a storage probe (does the model hold the fact?), not the "
                 f"model's reasoning; patching needs the model's own reasoning (--context own, the default).")
        return [first, seeds_sentence(metrics)]
    if not pat or not pat["declared"]:
        n = pat["n_pairs"] if pat else 0
        return [f"{last}: {n} minimal pairs on the model's own reasoning, too few to test any family "
                f"(10 a family needed); raise --max-examples.", seeds_sentence(metrics)]
    main = sorted((g for g in pat["groups"] if g.count("/") == 1), key=lambda g: g not in pat["declared"])
    found = " ".join(group_sentence(g, pat["groups"][g]) for g in main)
    none = [f for f in cfg.get("families", []) if not any(g.startswith(f + "/") for g in main)]
    found += "".join(f" {f}: no minimal pairs (its own reasoning copies no operand from the question, or no item "
                     f"has a partner of the same length)." for f in none)
    return [f"{last}: {found}", f"Holm-Bonferroni over all {pat['m']} patched sites of the "
            f"{'two families' if len(pat['declared']) > 1 else 'family'} tested; intervals at the Bonferroni level; "
            f"a share of the gap only where the two runs differ at all.", seeds_sentence(metrics)]


def gap_is_real(g):
    """Whether the clean and corrupted runs differ at all: patching the whole stream at the slot
    after the last block (which restores exactly the gap) passes. Without that, a share of the gap
    is a ratio of noise and is not shown."""
    last = [r for r in g["sites"] if r["site"].startswith("resid/slot/")]
    return bool(last) and max(last, key=lambda r: int(r["site"].rsplit("/", 1)[1]))["passes"]


def site_rows(name, g, top=TOP_SITES):
    real = gap_is_real(g)
    return [f"<tr><td class=l>{esc(name)}</td><td class=l>{esc(site_words(r))}</td><td>{g['n']}</td>"
            f"<td>{r['mean']:+.3g} <span class=meta>[{r['lo']:+.3g}, {r['hi']:+.3g}]</span></td>"
            f"<td>{format(100 * r['fraction'], '.0f') + '%' if real else '—'}</td><td>{r['p_holm']:.2g}</td>"
            f"<td class=l>{'<b>yes</b>' if r['passes'] else 'no'}</td></tr>" for r in g["sites"][:top]]


def table(metrics):
    """The corrected patching table of the last checkpoint (declared groups, their top sites),
    then the exploratory splits (direction, right / wrong) in a fold."""
    last, pat = last_patching(metrics)
    if not pat or not pat["groups"]:
        return ""
    head = ("<tr><th>group</th><th>patched site</th><th>pairs</th><th>restored nats [interval]</th>"
            "<th>share of the gap</th><th>p_Holm</th><th>passes</th></tr>")
    declared = [row for g in pat["declared"] for row in site_rows(g, pat["groups"][g])]
    other = [row for g, v in pat["groups"].items() if g not in pat["declared"] for row in site_rows(g, v, 2)]
    return (f"<table>{head}{''.join(declared)}</table>"
            f"<details><summary>{esc(last)}: by direction and by right / wrong own answer (exploratory, each "
            f"corrected over its own sites)</summary><table>{head}{''.join(other)}</table></details>")
