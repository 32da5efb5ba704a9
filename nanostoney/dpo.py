"""DPO (Rafailov et al. 2023, arXiv 2305.18290) on token ids: for a prompt x, chosen y_w, rejected y_l,

    -log sigmoid(beta * [(log pi(y_w|x) - log ref(y_w|x)) - (log pi(y_l|x) - log ref(y_l|x))])

with log pi(y|x) summed over the completion tokens only; beta * (log pi - log ref) is a completion's
implicit reward. The reference is GRPO's (policy.make_reference). A pair is (prompt ids, chosen ids,
rejected ids). Each rank takes its own pairs; the loss is divided by all ranks' pairs (n_pairs).
"""
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from nanostoney.dist import sync_grads
from nanostoney.gpt import unwrap
from nanostoney.policy import reference_logps, sequence_logps


@dataclass
class DPOConfig:
    beta: float = 0.1          # strength of the implicit KL constraint: larger stays nearer the reference
    micro_batch: int = 8       # pairs per forward (2 x rows: chosen and rejected together)
    grad_clip: float = 1.0     # 0 = none
    autocast: object = None    # a context factory for forwards (dist.autocast_ctx), or None


def dpo_loss(pi_w, pi_l, ref_w, ref_l, beta, n_pairs):
    """The DPO loss of (B,) summed completion log-probs, summed over these pairs and divided by the
    step's n_pairs on all ranks; (loss, stats summed over the pairs)."""
    chosen, rejected = beta * (pi_w - ref_w), beta * (pi_l - ref_l)
    per_pair = F.softplus(-(chosen - rejected))  # = -log sigmoid(.), stable for large margins
    loss = per_pair.sum() / n_pairs
    with torch.no_grad():
        margin = chosen - rejected
        stats = {"loss": per_pair.sum().item(), "reward_chosen": chosen.sum().item(),
                 "reward_rejected": rejected.sum().item(), "margin": margin.sum().item(),
                 "accuracy": (margin > 0).float().sum().item()}
    return loss, stats


def pair_forward(model, reference, pairs, cfg, device, attn_entropy=None):
    """(pi_w, pi_l, ref_w, ref_l, kl_sum, tokens) of a micro-batch of pairs, chosen and rejected rows
    in one forward each (the policy's with grad)."""
    prompts = [p for p, _, _ in pairs] * 2
    completions = [w for _, w, _ in pairs] + [l for _, _, l in pairs]
    ref_seq, ref_tok = reference_logps(reference, prompts, completions, device, cfg.autocast)
    pi_seq, pi_tok, mask = sequence_logps(model, prompts, completions, device, cfg.autocast, attn_entropy)
    # KL proxy: mean over completion tokens of log pi - log ref. The completions are not the
    # policy's samples (ground-truth pairs), so this is a drift gauge, not an unbiased KL.
    kl = ((pi_tok.detach() - ref_tok) * mask).sum().item()
    B = len(pairs)
    return pi_seq[:B], pi_seq[B:], ref_seq[:B], ref_seq[B:], kl, mask.sum().item()


def dpo_step(model, optimizer, micro_batches, cfg, reference, n_pairs, params=None, attn_entropy=None):
    """One optimizer step over this rank's micro-batches of pairs (attn_entropy, a probes.EntropyProbe,
    on the first one's forward). Returns statistics summed over this rank's pairs, and grad_norm."""
    model = unwrap(model)
    device = model.get_device()
    params = params if params is not None else [p for p in model.parameters() if p.requires_grad]
    model.train()
    optimizer.zero_grad(set_to_none=True)
    s = {"loss": 0.0, "reward_chosen": 0.0, "reward_rejected": 0.0, "margin": 0.0, "accuracy": 0.0,
         "kl": 0.0, "tokens": 0.0, "pairs": 0.0}
    for i, pairs in enumerate(micro_batches):
        if not pairs:
            continue
        pi_w, pi_l, ref_w, ref_l, kl, tokens = pair_forward(model, reference, pairs, cfg, device,
                                                            attn_entropy if i == 0 else None)
        loss, st = dpo_loss(pi_w, pi_l, ref_w, ref_l, cfg.beta, n_pairs)
        loss.backward()
        for k, v in st.items():
            s[k] += v
        s["kl"] += kl
        s["tokens"] += tokens
        s["pairs"] += len(pairs)
    sync_grads(params)
    clip = cfg.grad_clip if cfg.grad_clip and cfg.grad_clip > 0 else float("inf")
    s["grad_norm"] = torch.nn.utils.clip_grad_norm_(params, clip).item()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return s


def summarize(sums):
    """Logged metrics from statistics summed over all ranks (dpo_step's, all_reduce'd)."""
    n, tok = max(sums["pairs"], 1.0), max(sums["tokens"], 1.0)
    return {"loss": sums["loss"] / n, "rewards/chosen": sums["reward_chosen"] / n,
            "rewards/rejected": sums["reward_rejected"] / n, "rewards/margin": sums["margin"] / n,
            "rewards/accuracy": sums["accuracy"] / n, "kl_proxy": sums["kl"] / tok}


def pairs_from_conversations(rm_pairs):
    """reward_model pair dicts (whole conversations sharing their first prompt_len ids) -> the same
    dicts with the prompt and the chosen / rejected completions."""
    out = []
    for p in rm_pairs:
        w, l, n = p["chosen"], p["rejected"], p["prompt_len"]
        if w[:n] != l[:n]:
            raise ValueError("the two conversations of a pair do not share their prompt")
        out.append({**p, "prompt": list(w[:n]), "chosen": list(w[n:]), "rejected": list(l[n:])})
    return out


def on_policy_pair(samples, correct):
    """(first correct sample, first wrong sample) of one prompt's samples, or None (nothing to prefer)."""
    good = [s for s, c in zip(samples, correct) if c]
    bad = [s for s, c in zip(samples, correct) if not c]
    return (good[0], bad[0]) if good and bad else None


def as_triples(pairs):
    return [(p["prompt"], p["chosen"], p["rejected"]) for p in pairs]
