"""Multiple-choice letter diagnostics for RL: which letter the policy would answer, and how far its
letter distribution has moved from the reference policy's.

A row's context is its completion up to "Answer: " when a token follows the marker, else the
completion without its stop token plus the marker (the answer forced after its own reasoning).

    letters = letter_tokens(tok.encode)      # None when "Answer: X" is not one token per letter
    sums = letter_sums(model, reference, prompts, completions, mc_rows, task_names, letters, stop_ids, cfg)
    metrics = finish(sums, task_names)       # a collective: every rank calls it
"""
import torch

from nanostoney.answers import LETTERS, MARKER
from nanostoney.dist import all_reduce_sum
from nanostoney.gpt import unwrap
from nanostoney.policy import autocast as autocast_of, completion_logits, pack

STATS = ("n", "kl", "margin", "answer_found", "argmax_correct") + tuple(f"count_{L}" for L in LETTERS)


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
    """(found, context): see the module's docstring."""
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
    """(policy, reference) logits over letter_ids at each sequence's last position, float32 on CPU."""
    model = unwrap(model)
    device = model.get_device()
    ids = torch.tensor(letter_ids, device=device)
    was_training = model.training

    def last_logits(m):
        m.eval()
        out = []
        for i in range(0, len(seqs), micro_batch):
            chunk = seqs[i:i + micro_batch]
            idx, last = pack(chunk, [[0]] * len(chunk), device)[:2]  # the one position predicts after s
            with autocast_of(autocast):
                logits = completion_logits(m, idx, last)[:, 0]
            out.append(logits.float()[:, ids].cpu())
        return torch.cat(out)

    policy = last_logits(model)
    with reference() as ref:
        ref_logits = last_logits(ref)
    model.train(was_training)
    return policy, ref_logits


def letter_summary(policy, ref, gold, n_options=None):
    """Per row of (R, 5) letter logits: kl (over the row's own n_options letters), margin (gold
    logit minus the best other) and pred (policy argmax)."""
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
    """Per task, sums of STATS over this rank's mc_rows [(row, task name, gold letter, options)]."""
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
        sums[f"{name}/answer_found"] += float(found)
        sums[f"{name}/argmax_correct"] += float(pred == gold[j])
        sums[f"{name}/count_{LETTERS[pred]}"] += 1
    return sums


def finish(sums, task_names):
    """The logged letters/* metrics from every rank's letter_sums (sums them over ranks)."""
    keys = sorted(sums)
    vals = dict(zip(keys, all_reduce_sum([sums[k] for k in keys])))
    out = {f"letters/{name}/count_{L}": vals[f"{name}/count_{L}"] for name in task_names for L in LETTERS}
    for name in task_names:
        if cnt := vals[f"{name}/n"]:
            out.update({f"letters/{name}/{k}": vals[f"{name}/{k}"] / cnt for k in STATS[1:5]})
    total = {k: sum(vals[f"{name}/{k}"] for name in task_names) for k in ("n", "kl", "margin")}
    if total["n"]:
        out["letters/kl"] = total["kl"] / total["n"]
        out["letters/margin"] = total["margin"] / total["n"]
    out.update({f"letters/count_{L}": sum(vals[f"{name}/count_{L}"] for name in task_names) for L in LETTERS})
    return out
