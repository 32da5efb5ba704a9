"""One checkpoint, every statistic: its greedy answers (or cloze picks), an Item per example, one
forward per item (attention, lens), the head ablations, patching on minimal pairs and the summaries.
Under torchrun the per-item passes are shared out over the ranks and gathered in order (the same
numbers at any world size)."""
import numpy as np
import torch
from tqdm import tqdm

from nanostoney import cloze
from nanostoney.dist import get_rank, map_over_ranks
from nanostoney.evaluate import complete_task
from nanostoney.gpt import unwrap
from nanostoney.interp import patching
from nanostoney.interp.ablation import RANDOM_SETS, ablate_sets, ablate_single, choose_heads, random_head_sets
from nanostoney.interp.attention import analyse_item, classify_heads, induction_scores
from nanostoney.interp.contexts import context_text
from nanostoney.interp.definitions import ABLATION_MODES
from nanostoney.interp.items import build_items, fitting_examples
from nanostoney.interp.pairs import build_pairs
from nanostoney.interp.stats import group_summaries, head_maps, interval, spearman

SLOT_ROOM = 16  # tokens kept free after a model's own rationale for the answer slot ("Answer: X")


def own_completions(model, tokenizer, examples, chosen, max_len, info=None, chunk=16):
    """{(task, id): the model's greedy completion of the example's prompt}, within max_len, generated
    in chunks of `chunk` examples shared out over the ranks (the chunks do not depend on the world size)."""
    out = {}
    for name, pairs in chosen.items():
        if not pairs:
            continue
        task, exs = examples[name][0], [ex for _, ex in pairs]
        longest = max(len(tokenizer.render_prompt(task.prompt(ex))) for ex in exs)
        budget = max(1, max_len - longest - SLOT_ROOM)  # the answer slot follows the context
        done = map_over_ranks(lambda part: complete_task(model, tokenizer, task, part, max_new_tokens=budget)[0],
                              [exs[i:i + chunk] for i in range(0, len(exs), chunk)], info)
        out.update({(name, ex["id"]): g for ex, g in zip(exs, [g for part in done for g in part])})
    return out


def cloze_verdicts(model, tokenizer, examples, chosen, info=None):
    """{(task, id): whether the model's cloze pick of the example is the gold option} (MC tasks)."""
    out = {}
    for name, pairs in chosen.items():
        exs = [ex for _, ex in pairs]
        right = cloze.cloze_correct(model, tokenizer, examples[name][0], exs, info)
        out.update({(name, ex["id"]): bool(r) for ex, r in zip(exs, right)})
    return out


def figure_item_keys(items, families, n):
    """The items drawn as example figures: each family's first n held-out items (any if none)."""
    keys = set()
    for fam in families:
        held = [it for it in items if it.family == fam and it.group == "heldout"] or \
            [it for it in items if it.family == fam]
        keys |= {it.key for it in held[:n]}
    return keys


def item_records(gpt, items, figure_keys=(), info=None, wrap=None):
    """One forward per item: (records, every head's output summed over all positions [L, H, head_dim]
    in item order, the number of positions, {key: full patterns} of the figure items)."""
    done = map_over_ranks(lambda it: analyse_item(gpt, it, keep_full=it.key in figure_keys), items, info, wrap)
    recs, figures = [], {}
    for it, (rec, _, full) in zip(items, done):
        rec.update(task=it.task, family=it.family, split=it.split, group=it.group, id=it.id, key=it.key,
                   outcome=it.outcome, subset=it.subset, own_correct=float(it.own_correct), depth=it.depth,
                   direction=it.direction,
                   chance=1 / len(it.letter_ids) if it.letter_ids else None)  # a guess among the options
        recs.append(rec)
        if full is not None:
            figures[it.key] = {"id": it.id, "task": it.task, "family": it.family, "split": it.split,
                               "tokens": it.tokens, "struct": it.struct.tolist(), "full": full}
    return recs, torch.stack([s for _, s, _ in done]).sum(0), sum(len(it.ids) for it in items), figures


def head_roles(out, k, topk, random_sets, families):
    """{"roles", "topk", "overlap"}: head roles from the all-items scores, the top-k heads and
    how much the first two families' heads overlap."""
    every = out["families"]["all"]["all"]
    scores = {"previous_token": every["previous_token"]["mean"], "sink": every["sink"]["mean"],
              "induction": out["induction"]["induction"]["mean"],
              "option_lookup": every["option_lookup"]["mean"] if "option_lookup" in every else None}
    overlap = {}
    if len(families) >= 2:
        a, b = families[:2]
        for mode in ABLATION_MODES:
            sa, sb = set(topk[mode][a]), set(topk[mode][b])
            maps = [out["families"][f]["all"][f"ablate_{mode}"]["mean"] for f in (a, b)]
            overlap[mode] = {"families": [a, b], "jaccard": len(sa & sb) / len(sa | sb),
                             "shared": sorted([list(h) for h in sa & sb]), "spearman": spearman(*maps)}
    return {"roles": {r: [list(h) for h in hs] for r, hs in classify_heads(scores).items()},
            "topk": {"k": k, "heads": {m: {f: [list(h) for h in hs] for f, hs in v.items()} for m, v in topk.items()},
                     "random_sets": [[list(h) for h in s] for s in random_sets],
                     "chosen_on": "each family's selection subset (train items and a hash half of the "
                                  "held-out items)"},
            "overlap": overlap}


def example_figures(figures, topk):
    """Example attention figures: the answer row of every head and the full pattern of the
    family's most important head (largest mean zero-ablation drop)."""
    for f in figures.values():
        (layer, head), full = topk["zero"][f["family"]][0], f.pop("full")
        f.update(answer_rows=np.round(full[:, :, -1].astype(np.float32), 4).tolist(), head=[layer, head],
                 pattern=np.round(full[layer, head].astype(np.float32), 4).tolist())
    return list(figures.values())


def context_samples(tokenizer, items, n=2):
    """The first n probed contexts of each task, as the model read them after the prompt (the
    report shows them, so a reader can check that no answer is in them)."""
    out, seen = [], {}
    for it in items:
        if seen.get(it.task, 0) < n and it.group == "heldout":
            seen[it.task] = seen.get(it.task, 0) + 1
            k = it.ids.index(tokenizer.token_id("<|assistant_start|>")) + 1
            out.append({"task": it.task, "id": it.id, "own_correct": it.own_correct,
                        "text": tokenizer.decode(it.ids[k:])})
    return out


def trace_pairs(gpt, tokenizer, examples, chosen, completions, context, max_len, info=None, wrap=None):
    """(pairs, traces): activation patching on the minimal pairs of the held-out items, read on
    the model's own reasoning (minimal_pairs); none for the cloze context, which has no reasoning."""
    if context == "cloze":
        return [], []
    keys = [(name, ex) for name, rows in chosen.items() for _, ex in rows]
    contexts = {(n, ex["id"]): context_text(ex, completions[(n, ex["id"])], context) for n, ex in keys}
    verdicts = {(n, ex["id"]): bool(examples[n][0].evaluate(ex, completions[(n, ex["id"])])) for n, ex in keys}
    pairs = build_pairs(tokenizer, examples, chosen, completions, contexts, verdicts, max_len)
    pairs = [p for p in pairs if max(p.clean + p.corrupt + [p.target, p.foil]) < gpt.config.vocab_size]
    traces = map_over_ranks(lambda p: patching.trace_pair(gpt, p), pairs, info, wrap)
    return pairs, traces


def run_checkpoint(model, tokenizer, examples, *, judge, limit=None, context="own", top_k=5,
                   n_random_sets=RANDOM_SETS, n_induction=16, induction_len=32, seed=0, n_boot=1000, max_len=None,
                   figure_examples=1, progress=True, info=None):
    """(summary, records) of one model. examples: {task: (Task, {split: [example]})}; of each list the
    first `limit` examples that fit in max_len tokens are read after their `context`. judge(word) ->
    "s" | "e" tells Stoney words from English ones. summary is JSON-able; records are the per-item
    arrays the headline tests and paired deltas read. Ranks other than 0 return (None, None)."""
    gpt = unwrap(model).eval()
    c = gpt.config
    max_len = max_len or c.sequence_len
    chosen, skipped = fitting_examples(tokenizer, examples, limit, max_len)
    completions = cloze_verdicts(gpt, tokenizer, examples, chosen, info) if context == "cloze" else \
        own_completions(gpt, tokenizer, examples, chosen, max_len, info)
    items, too_long = build_items(tokenizer, examples, chosen, completions, judge, context, max_len, c.vocab_size)
    for name, n in too_long.items():
        skipped[name] = skipped.get(name, 0) + n
    families = sorted({it.family for it in items}, key=lambda f: (f != "stoney", f))
    rank = info.rank if info is not None else get_rank()
    # a progress bar around this rank's share of the items (rank 0 only)
    bar = lambda desc: lambda idx: tqdm(idx, desc=desc, disable=not progress or rank != 0, leave=False)  # noqa: E731
    recs, out_sum, n_pos, figures = item_records(gpt, items, figure_item_keys(items, families, figure_examples),
                                                 info, bar("analyse"))
    means = out_sum / n_pos
    for rec, drops in zip(recs, ablate_single(gpt, items, means, info, bar("ablate heads"))):
        rec.update(drops)
    k = max(1, min(top_k, c.n_layer * c.n_head - 1))
    topk = choose_heads(recs, families, k)
    random_sets = random_head_sets(c.n_layer, c.n_head, k, n_random_sets, seed)
    sets = ablate_sets(gpt, items, means, families, topk, random_sets, info, bar("ablate top-k"))
    for rec, drops in zip(recs, sets):
        rec.update(drops)
    pairs, traces = trace_pairs(gpt, tokenizer, examples, chosen, completions, context, max_len, info, bar("patch"))
    if rank != 0:
        return None, None
    out = {"model": {"n_layer": c.n_layer, "n_head": c.n_head, "n_kv_head": c.n_kv_head, "n_embd": c.n_embd,
                     "vocab_size": c.vocab_size, "sequence_len": c.sequence_len}, "context": context}
    groups = group_summaries(recs, families, list(examples), n_boot, seed)
    out.update(n_items=groups["n_items"], skipped=skipped, families=groups["families"], tasks=groups["tasks"],
               depths=groups["depths"], directions=groups["directions"])
    vocab = min(c.vocab_size, tokenizer.vocab_size - len(getattr(tokenizer, "special_tokens", [])))
    ind = induction_scores(gpt, vocab, n_induction, induction_len, seed, tokenizer.bos_id)
    out["induction"] = {"n_rep": ind["n_rep"], "induction": interval(ind["induction"], n_boot, seed),
                        "previous_token_random": interval(ind["previous_token_random"], n_boot, seed)}
    out.update(head_roles(out, k, topk, random_sets, families))
    out["head_maps"] = head_maps(recs, families)
    out["examples"] = example_figures(figures, topk)
    out["contexts"] = context_samples(tokenizer, items)
    out["per_example"] = [{"key": r["key"], "split": r["split"], "subset": r["subset"],
                           "own_correct": r["own_correct"], "answer_logprob": round(r["answer_logprob"], 5),
                           "accuracy": r["accuracy"], "lens_first": r["lens_first"]} for r in recs]
    out["patching"] = patching.summary(pairs, traces, n_boot, seed)
    return out, recs
