"""What a BASE checkpoint knows, and whether it can answer in the MC format: three probes.

    python -m bench.knowledge_probe --checkpoints out/base/step_000500 out/base/step_001000 --items 200

1. Knowledge, five-option accuracy by log-likelihood: each option is written out the way the
   pretraining text states such things, and the option whose continuation the model finds most
   likely (summed token log-probability) is its answer:
   - stoney_mc / stoney_mc_unseen: "`term` means 'OPTION'." (s2e) or "'gloss' in Stoney Nakoda
     is `OPTION`." (e2s); held-out items ask about extraction facts read in pretraining, the
     control items about terms no training text holds.
   - arith_mc: the question, then each option's own chain "<think>...</think>\\nAnswer: v"
     (the gold's correct chain, or the wrong-step chain that argues for a distractor).
2. Letter binding: p(gold letter | the item as pretraining text states it, up to the value its
   gold names: "The answer is 72| C."), teacher forced. The letter can only come from reading the
   options ("- 72 C"): 0.20 means the model cannot map an answer to its letter, and then no MC
   accuracy can rise above chance.
3. Induction: mean loss (nats) on the first copy of a repeated random token sequence minus the
   second; near 0 = no in-context copying at all (letter binding is harder than copying). The
   order gain is that minus the same on a shuffled second copy (copying in order, not raising
   the context's tokens), and per head, the order gain lost when that head's output is zeroed:
   the heads the copying runs through.
4. Reading the question (held-out `arith` val problems, --open-items per depth):
   - operand copy, teacher forced on the gold text: is every token of a step's operand the
     model's top prediction, where the chain line re-reads the step's sentence ("phrase": "Mia
     finds |5") and in its equation ("equation": "7 + |5")? (a side experiment's (docs/LOG.md)
     sub-step: 0.3, guessing, for a model that learned the sums from bare chains);
   - open accuracy by depth: the question, then the model's greedy chain and "Answer: N".
Cheap (forward passes only), so it traces what a base model has against pretraining steps; the
pipeline's own numbers (SFT/GRPO, generated answers, and their cloze accuracy: the question asked
without options, each option's answer scored per character) come from scripts.eval.
"""
import re

import torch

from nanostoney import cli
from nanostoney.answers import LETTERS, picked
from nanostoney.cli import run_main
from nanostoney.cloze import option_logprobs
from nanostoney.errors import UserError
from nanostoney.evaluate import generate_completions
from nanostoney.files import write_json
from nanostoney.interp.attention import induction_gain, order_gain, order_gain_by_head
from nanostoney.tasks import arith, get_task
from nanostoney.tasks.base import question_only_text
from nanostoney.tasks.subset import subset

TASKS = ("stoney_mc", "stoney_mc_unseen", "arith_mc")


def option_texts(task, ex):
    """[(full text, char offset where the scored continuation starts)] for the five options."""
    out = []
    for letter, choice in zip(LETTERS, ex["choices"]):
        if task.family == "stoney":
            a, b = ex["regions"]["question"]
            q = ex["messages"][-2]["content"][a:b]
            if ex["direction"] == "s2e":
                term = q.split("`")[1]
                prefix, cont = f"`{term}` means '", f"{choice}'."
            else:
                gloss = q.split("'", 1)[1].rsplit("'", 1)[0]
                prefix, cont = f"'{gloss}' in Stoney Nakoda is `", f"{choice}`."
        else:
            think = ex["option_rationales"][letter].split("</think>")[0]
            chain = think.rsplit("\n", 1)[0]  # drop "The answer is v L."
            prefix = question_only_text(ex["messages"][-2]["content"]) + "\n\n"
            cont = f"{chain}</think>\nAnswer: {choice}"
        out.append((prefix + cont, len(prefix)))
    return out


def score(model, tok, texts, batch=32):
    """Summed log-probability of each text's tokens from its offset on (tokens that overlap it)."""
    rows = []
    for text, start in texts:
        enc = tok.hf.encode(text, add_special_tokens=False)
        first = next(j for j, (s, e) in enumerate(enc.offsets) if e > start)
        rows.append(([tok.bos_id] + enc.ids, first + 1, len(text) - start))
    return [lp for i in range(0, len(rows), batch) for lp in option_logprobs(model, rows[i:i + batch])]


def probe(model, tok, task, exs):
    """[1 if the gold option scores highest else 0] per example."""
    texts = [t for ex in exs for t in option_texts(task, ex)]
    s = score(model, tok, texts)
    return [int(max(range(5), key=lambda k: s[5 * i + k]) == LETTERS.index(ex["answer"]))
            for i, ex in enumerate(exs)]


def letter_context(ex):
    """(the item as the pretraining text states it, up to the value its gold picks; that text + " L")."""
    text = ex["messages"][-2]["content"] + "\n\n" + ex["messages"][-1]["content"]
    choice = ex["choices"][LETTERS.index(ex["answer"])]
    cut = text.rindex(picked(choice, ex["answer"])) + len(choice)
    return text[:cut], text[:cut + 2]


@torch.no_grad()
def letter_binding(model, tok, exs):
    """p(gold letter) after the picked value in each item's plain-text form."""
    probs = []
    for ex in exs:
        context, with_letter = letter_context(ex)
        ids = [tok.bos_id] + tok.encode(context)
        gold = tok.encode(with_letter)[len(ids) - 1]  # " C"
        logits = model(torch.tensor([ids], device=model.get_device()))[0, -1].float()
        probs.append(torch.softmax(logits, -1)[gold].item())
    return probs


def arith_problems(split, per_depth):
    """The first per_depth held-out problems of each depth (the generator's order)."""
    probs = arith.load_problems()[split]
    return [p for d in arith.DEPTHS for p in [q for q in probs if q["depth"] == d][:per_depth]]


def operand_spans(p, offset):
    """{"phrase": [(start, end)], "equation": [...]}: character spans of each step's operand in
    the gold chain (which starts at `offset` of the text); a phrase span only where the line
    re-reads a sentence that states the operand (not "doubles", "half")."""
    spans, pos = {"phrase": [], "equation": []}, offset
    a = p["start"]
    for line, (op, n), v in zip(p["rationale"].split("\n"), p["steps"], p["values"]):
        phrase, _, _ = line.rpartition(": ")
        m = re.search(rf"(?<!\d){n}(?!\d)", phrase)
        if m:
            spans["phrase"].append((pos + m.start(), pos + m.end()))
        eq = line.rindex(f"{a} {op} {n} = ") + len(f"{a} {op} ")
        spans["equation"].append((pos + eq, pos + eq + len(str(n))))
        pos, a = pos + len(line) + 1, v
    return spans


@torch.no_grad()
def operand_copy(model, tok, problems):
    """{"phrase": [hit], "equation": [hit]}: teacher forced on each problem's gold text, is every
    token of the operand the top prediction?"""
    hits = {"phrase": [], "equation": []}
    for p in problems:
        head = p["question"] + "\n\n<think>"
        text = head + p["rationale"] + f"</think>\nAnswer: {p['final']}"
        enc = tok.hf.encode(text, add_special_tokens=False)
        ids = [tok.bos_id] + enc.ids
        top = model(torch.tensor([ids], device=model.get_device()))[0].argmax(-1).tolist()
        for kind, spans in operand_spans(p, len(head)).items():
            for a, b in spans:
                toks = [j for j, (s, e) in enumerate(enc.offsets) if s < b and e > a]
                hits[kind].append(int(all(top[j] == ids[j + 1] for j in toks)))
    return hits


def open_accuracy(model, tok, problems):
    """[1 if the greedy "Answer: N" after the question is the final value] per problem."""
    prompts = [[tok.bos_id] + tok.encode(p["question"] + "\n\n") for p in problems]
    outs = generate_completions(model, tok, prompts, max_new_tokens=112)
    answers = [re.search(r"Answer:\s*(-?\d+)", o[0]) for o in outs]
    return [int(bool(m) and int(m.group(1)) == p["final"]) for m, p in zip(answers, problems)]


def reading_probe(model, tok, split, per_depth):
    """Operand copy and open accuracy by depth on held-out arith problems (probe 4)."""
    from nanostoney.metrics import bootstrap_ci
    problems = arith_problems(split, per_depth)
    row = {f"operand_copy/{k}": {"n": len(h), "accuracy": bootstrap_ci([float(x) for x in h])}
           for k, h in operand_copy(model, tok, problems).items() if h}
    hits = open_accuracy(model, tok, problems)
    for d in arith.DEPTHS:
        h = [float(x) for x, p in zip(hits, problems) if p["depth"] == d]
        row[f"arith_open/depth{d}"] = {"n": len(h), "accuracy": bootstrap_ci(h)}
    return row


def probe_checkpoint(model, tok, names, split, items, open_items=0):
    from nanostoney.metrics import bootstrap_ci
    row = {"induction_gain_nats": induction_gain(model, tok), "order_gain_nats": order_gain(model, tok),
           "order_gain_lost_by_head": order_gain_by_head(model, tok).round(3).tolist()}
    if open_items:
        row.update(reading_probe(model, tok, split, open_items))
    for n in names:
        task = get_task(n)
        exs = subset(task, split, items)
        hits = probe(model, tok, task, exs)
        row[n] = {"n": len(hits), "accuracy": bootstrap_ci([float(h) for h in hits]),
                  "p_gold_letter": bootstrap_ci(letter_binding(model, tok, exs))}
        for d in sorted({ex.get("depth") for ex in exs if ex.get("depth")}):
            h = [x for x, ex in zip(hits, exs) if ex["depth"] == d]
            row[f"{n}/depth{d}"] = {"n": len(h), "accuracy": bootstrap_ci([float(x) for x in h])}
    return row


def main():
    p = cli.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--checkpoints", nargs="+", required=True, help="base checkpoint dirs (run or step dirs)")
    p.add_argument("--tasks", default=",".join(TASKS))
    p.add_argument("--split", default="val", choices=["val", "test"])
    p.add_argument("--items", type=cli.nonneg_int, default=200, help="balanced, hash-chosen items per task (0 = all)")
    p.add_argument("--open-items", type=cli.nonneg_int, default=25,
                   help="held-out arith problems per depth for operand copy and open accuracy (0 = skip)")
    p.add_argument("--out", default=None, help="also write the table as JSON here")
    args = p.parse_args()
    from nanostoney.checkpoint import load_model
    names = [n for n in args.tasks.split(",") if n]
    for n in names:
        if n not in TASKS:
            raise UserError(f"--tasks: {n!r} has no probe; use some of {', '.join(TASKS)}.")
    rows = {}
    for ckpt in args.checkpoints:
        model, tok, _ = load_model(ckpt)
        if tok is None:
            raise UserError(f"{ckpt} has no tokenizer; pass a checkpoint saved with one.")
        rows[ckpt] = r = probe_checkpoint(model, tok, names, args.split, args.items, args.open_items)
        lost = torch.tensor(r["order_gain_lost_by_head"])
        layer, head = divmod(int(lost.argmax()), lost.shape[1])
        print(f"{ckpt}: induction gain {r['induction_gain_nats']:+.2f} nats (in order {r['order_gain_nats']:+.2f}; "
              f"zeroing head {layer}.{head} loses the most of it, {lost.max():.2f}); " + ", ".join(
            f"{k} {v['accuracy'][0]:.3f} [{v['accuracy'][1]:.3f}, {v['accuracy'][2]:.3f}]"
            + (f" (p(gold letter) {v['p_gold_letter'][0]:.3f})" if "p_gold_letter" in v else "")
            for k, v in r.items() if isinstance(v, dict)), flush=True)
    if args.out:
        write_json(args.out, rows)


if __name__ == "__main__":
    run_main(main)
