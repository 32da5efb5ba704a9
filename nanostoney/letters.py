"""Multiple-choice letter diagnostics for RL: what the policy would answer, A-E (A-D for a
four-option task), and how far that has moved from the reference policy.

For each multiple-choice rollout row the context before the answer letter is: the completion
up to its "Answer: " marker when the marker is followed by a token (the answer was found), else
the completion without its stop token with the marker appended (the answer forced into the gold
format after the model's own reasoning). One no-grad forward of the contexts under the policy
and one under the reference give the five letter logits at the last position. Per task, summed
over rows and ranks, then averaged: the KL(policy || reference) of the letter distributions
renormalised over A-E, the margin (gold logit minus the best other), the share of rows whose
completion had the answer (answer_found), the share whose argmax is the gold (argmax_correct),
and the counts of predicted letters.

    letters = letter_tokens(tok.encode)      # None when "Answer: X" is not one token per letter
    sums = letter_sums(model, reference, prompts, completions, mc_rows, task_names, letters, stop_ids, cfg)
    metrics = finish(sums, task_names)       # a collective: every rank calls it
"""
import torch

from nanostoney.answers import LETTERS, MARKER
from nanostoney.dist import all_reduce_sum
from nanostoney.gpt import unwrap
from nanostoney.policy import autocast as autocast_of, completion_logits

STATS = ("n", "kl", "margin", "found", "correct") + tuple(f"count_{L}" for L in LETTERS)


def letter_tokens(encode):
    """(marker ids, [5 letter ids]) such that encode(f"Answer: {L}") == marker + [letter id L],
    or None when a letter is not one token after the marker (e.g. a tiny tokenizer)."""
    seqs = [encode(f"{MARKER} {L}") for L in LETTERS]
    marker = seqs[0][:-1]
    if not marker or any(s[:-1] != marker for s in seqs):
        return None
    ids = [s[-1] for s in seqs]
    return (marker, ids) if len(set(ids)) == 5 else None


def letter_context(completion, marker, stop_ids=()):
    """(found, context): the completion tokens before its answer letter when it wrote the marker
    followed by a token (found), else the completion without its stop token followed by the
    marker (the answer forced into the gold format)."""
    c, n = list(completion), len(marker)
    for j in range(len(c) - n, -1, -1):
        if c[j:j + n] == list(marker):
            if j + n < len(c):
                return True, c[:j + n]
            break
    while c and c[-1] in stop_ids:
        c = c[:-1]
    return False, c if c[-n:] == list(marker) else c + list(marker)


@torch.no_grad()
def letter_logits(model, reference, seqs, letter_ids, micro_batch=16, autocast=None):
    """(policy, reference) logits over letter_ids at the last position of each sequence, each
    (len(seqs), len(letter_ids)) float32 on CPU."""
    model = unwrap(model)
    device = model.get_device()
    ids = torch.tensor(letter_ids, device=device)
    was_training = model.training

    def last_logits(m):
        m.eval()
        out = []
        for i in range(0, len(seqs), micro_batch):
            chunk = seqs[i:i + micro_batch]
            idx = torch.zeros(len(chunk), max(len(s) for s in chunk), dtype=torch.long)
            for r, s in enumerate(chunk):
                idx[r, :len(s)] = torch.tensor(s, dtype=torch.long)
            last = torch.tensor([len(s) - 1 for s in chunk])
            with autocast_of(autocast):
                logits = completion_logits(m, idx.to(device), last[:, None].to(device))[:, 0]
            out.append(logits.float()[:, ids].cpu())
        return torch.cat(out)

    policy = last_logits(model)
    with reference() as ref:
        ref_logits = last_logits(ref)
    model.train(was_training)
    return policy, ref_logits


def letter_summary(policy, ref, gold, n_options=None):
    """Per row, from policy and reference logits over the 5 letters (R, 5), the gold letter index
    and the row's number of options (default 5): kl = KL(policy || reference) of the letter
    distributions renormalised over the row's own letters (A-D for four options), margin =
    policy logit of the gold letter minus the best other, pred = policy argmax."""
    policy, ref = policy.float().cpu(), ref.float().cpu()
    if n_options is not None:  # letters past the row's options: far below, but finite (0 * finite = 0 in kl)
        beyond = torch.arange(policy.size(1))[None, :] >= torch.as_tensor(n_options)[:, None]
        policy, ref = policy.masked_fill(beyond, -1e9), ref.masked_fill(beyond, -1e9)
    lp, lq = torch.log_softmax(policy, -1), torch.log_softmax(ref, -1)
    kl = (lp.exp() * (lp - lq)).sum(-1)
    g = torch.as_tensor(gold, dtype=torch.long)
    gold_logit = policy.gather(1, g[:, None]).squeeze(1)
    others = policy.scatter(1, g[:, None], float("-inf")).max(1).values
    return {"kl": kl, "margin": gold_logit - others, "pred": policy.argmax(1)}


def letter_sums(model, reference, prompts, completions, mc_rows, task_names, letters, stop_ids, cfg):
    """Per task of task_names, sums of the letter statistics (STATS) over this rank's rows.
    mc_rows: [(row of prompts / completions, task name, gold letter, number of options)] of the
    multiple-choice rows."""
    sums = {f"{name}/{k}": 0.0 for name in task_names for k in STATS}
    if not mc_rows:
        return sums
    marker, letter_ids = letters
    contexts = [letter_context(completions[r], marker, stop_ids) for r, *_ in mc_rows]
    seqs = [prompts[r] + context for (r, *_), (_, context) in zip(mc_rows, contexts)]
    policy, ref = letter_logits(model, reference, seqs, letter_ids, cfg.micro_batch, cfg.autocast)
    gold = [LETTERS.index(g) for _, _, g, _ in mc_rows]
    st = letter_summary(policy, ref, gold, [n for *_, n in mc_rows])
    for j, ((_, name, _, _), (found, _)) in enumerate(zip(mc_rows, contexts)):
        pred = st["pred"][j].item()
        sums[f"{name}/n"] += 1
        sums[f"{name}/kl"] += st["kl"][j].item()
        sums[f"{name}/margin"] += st["margin"][j].item()
        sums[f"{name}/found"] += float(found)
        sums[f"{name}/correct"] += float(pred == gold[j])
        sums[f"{name}/count_{LETTERS[pred]}"] += 1
    return sums


def finish(sums, task_names):
    """The logged letters/* metrics from every rank's letter_sums (sums them over ranks)."""
    keys = sorted(sums)
    vals = dict(zip(keys, all_reduce_sum([sums[k] for k in keys])))
    out, total = {}, {k: 0.0 for k in ("n", "kl", "margin")}
    for name in task_names:
        cnt = vals[f"{name}/n"]
        for L in LETTERS:
            out[f"letters/{name}/count_{L}"] = vals[f"{name}/count_{L}"]
        if cnt == 0:
            continue
        out[f"letters/{name}/kl"] = vals[f"{name}/kl"] / cnt
        out[f"letters/{name}/margin"] = vals[f"{name}/margin"] / cnt
        out[f"letters/{name}/answer_found"] = vals[f"{name}/found"] / cnt
        out[f"letters/{name}/argmax_correct"] = vals[f"{name}/correct"] / cnt
        for k in total:
            total[k] += vals[f"{name}/{k}"]
    if total["n"]:
        out["letters/kl"] = total["kl"] / total["n"]
        out["letters/margin"] = total["margin"] / total["n"]
    for L in LETTERS:
        out[f"letters/count_{L}"] = sum(vals[f"{name}/count_{L}"] for name in task_names)
    return out
