"""DPO: direct preference optimisation (Rafailov et al. 2023, arXiv 2305.18290), on token ids.

For a prompt x with a preferred completion y_w and a dispreferred one y_l, the loss is

    -log sigmoid(beta * [(log pi(y_w|x) - log ref(y_w|x)) - (log pi(y_l|x) - log ref(y_l|x))])

where log pi(y|x) sums the log-probs of the COMPLETION tokens only (the prompt is given, not
chosen). beta * (log pi - log ref) is the implicit reward of a completion; its margin (chosen
minus rejected) and the share of pairs where it is positive (accuracy) are what DPO moves.
The reference is GRPO's (policy.make_reference): the LoRA model with its adapters off / the
adapters as they were at the start (no second model in memory), or a frozen copy in full fine-tuning.
At the start with fresh adapters the policy IS the reference, every logit is 0 and the loss
is exactly log 2.

    cfg = DPOConfig(beta=0.1, micro_batch=8)
    reference = policy.make_reference(model, "init")
    stats = dpo_step(model, optimizer, [pairs of micro-batch 1, ...], cfg, reference, n_pairs=...)

A pair is (prompt ids, chosen completion ids, rejected completion ids); completions end with
their stop token, as rollouts do. `pairs_from_conversations` turns the reward model's pairs
(whole rendered conversations, reward_model.build_pairs / sampled_pairs) into that shape;
`on_policy_pairs` pairs a correct with a wrong sample of the same prompt (STaR-then-DPO).

Several processes: each rank takes its own pairs, the loss is divided by the pairs of all
ranks (n_pairs) and gradients are summed by dist.sync_grads, so N ranks take the step one
process takes with every pair (tests/test_dpo.py).
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


# -----------------------------------------------------------------------------
# the maths


def dpo_loss(pi_w, pi_l, ref_w, ref_l, beta, n_pairs):
    """Sum over these pairs of -log sigmoid(beta * margin of log-ratios), divided by n_pairs
    (all pairs of the step on all ranks: summing the micro-batches' losses gives the mean).
    Inputs are (B,) summed completion log-probs. Returns (loss, stats summed over the pairs):
    loss, chosen/rejected implicit rewards, margin, accuracy (margin > 0)."""
    chosen = beta * (pi_w - ref_w)
    rejected = beta * (pi_l - ref_l)
    per_pair = F.softplus(-(chosen - rejected))  # = -log sigmoid(.), stable for large margins
    loss = per_pair.sum() / n_pairs
    with torch.no_grad():
        margin = chosen - rejected
        stats = {"loss": per_pair.sum().item(), "reward_chosen": chosen.sum().item(),
                 "reward_rejected": rejected.sum().item(), "margin": margin.sum().item(),
                 "accuracy": (margin > 0).float().sum().item()}
    return loss, stats


def pair_forward(model, reference, pairs, cfg, device, attn_entropy=None):
    """Policy (with grad) and reference log-probs of a micro-batch of pairs: chosen rows first,
    then rejected, in one forward each. Returns (pi_w, pi_l, ref_w, ref_l, kl_sum, tokens)."""
    prompts = [p for p, _, _ in pairs] * 2
    completions = [w for _, w, _ in pairs] + [l for _, _, l in pairs]
    ref_seq, ref_tok = reference_logps(reference, prompts, completions, device, cfg.autocast)
    pi_seq, pi_tok, mask = sequence_logps(model, prompts, completions, device, cfg.autocast, attn_entropy)
    # KL proxy: mean over completion tokens of log pi - log ref. The completions are not the
    # policy's samples (ground-truth pairs), so this is a drift gauge, not an unbiased KL.
    kl = ((pi_tok.detach() - ref_tok) * mask).sum().item()
    B = len(pairs)
    return pi_seq[:B], pi_seq[B:], ref_seq[:B], ref_seq[B:], kl, mask.sum().item()


# -----------------------------------------------------------------------------
# one step


def dpo_step(model, optimizer, micro_batches, cfg, reference, n_pairs, params=None, attn_entropy=None):
    """One optimizer step over this rank's micro-batches of pairs; the loss is the mean over
    n_pairs (all ranks' pairs of the step). attn_entropy: a probes.EntropyProbe attached to the
    first micro-batch's policy forward. Returns the step's statistics, summed over this rank's
    pairs (and tokens, for kl), plus grad_norm; all_reduce them and divide by n_pairs to log."""
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


# -----------------------------------------------------------------------------
# pairs


def split_conversation_pair(chosen_ids, rejected_ids, prompt_len):
    """(prompt, chosen completion, rejected completion) of two whole rendered conversations that
    share their first prompt_len tokens (the rendered prompt up to <|assistant_start|>)."""
    if chosen_ids[:prompt_len] != rejected_ids[:prompt_len]:
        raise ValueError("the two conversations of a pair do not share their prompt")
    return list(chosen_ids[:prompt_len]), list(chosen_ids[prompt_len:]), list(rejected_ids[prompt_len:])


def pairs_from_conversations(rm_pairs):
    """reward_model pair dicts (with prompt_len) -> dicts with prompt / chosen / rejected completions."""
    out = []
    for p in rm_pairs:
        prompt, w, l = split_conversation_pair(p["chosen"], p["rejected"], p["prompt_len"])
        out.append({**p, "prompt": prompt, "chosen": w, "rejected": l})
    return out


def on_policy_pair(samples, correct):
    """(first correct sample, first wrong sample) of one prompt's samples, or None when the
    policy got them all right or all wrong (nothing to prefer)."""
    good = [s for s, c in zip(samples, correct) if c]
    bad = [s for s, c in zip(samples, correct) if not c]
    return (good[0], bad[0]) if good and bad else None


def as_triples(pairs):
    return [(p["prompt"], p["chosen"], p["rejected"]) for p in pairs]
