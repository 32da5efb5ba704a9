"""A learned reward: the GPT trunk with a scalar head on the last token, trained with Bradley-Terry.

    rm = RewardModel(gpt)                           # gpt: a GPT, with LoRA applied or not
    r = rm(idx, last)                               # (B,) scores, one per right-padded row
    rm.score([[ids...], [ids...]])                  # (B,) for rewards.LearnedReward
    checkpoint.save_checkpoint(out, gpt, step, meta=head_meta(rm)); load_reward_model(out)

A scored sequence is a whole rendered conversation, as rewards.LearnedReward renders it. Pairs:
the gold against a ground-truth wrong answer (build_pairs) or the SFT model's wrong samples.
"""
import os
import random

import torch
import torch.nn as nn
import torch.nn.functional as F

from nanostoney import checkpoint
from nanostoney.errors import UserError
from nanostoney.gpt import norm
from nanostoney.policy import pack, sample_completions
from nanostoney.tasks.base import normalize, stable_hash
from nanostoney.tasks.subset import subset


class RewardModel(nn.Module):
    def __init__(self, gpt, head_std=None):
        super().__init__()
        self.gpt = gpt
        n = gpt.config.n_embd
        self.head = nn.Linear(n, 1, device=gpt.get_device())
        # the input is RMS-normalised (unit scale per channel), so std 0.1/sqrt(n) starts the
        # scores near 0 (std ~0.1) without zeroing the trunk's first gradients
        nn.init.normal_(self.head.weight, std=head_std if head_std is not None else 0.1 / n ** 0.5)
        nn.init.zeros_(self.head.bias)
        # lm_head is outside the reward's graph: none of its parameters may train (its weight, or
        # the LoRA adapters an SFT init put on it), else DDP waits for gradients that never come
        for p in gpt.lm_head.parameters():
            p.requires_grad_(False)
        self.probes = gpt.probes  # probes attached to the reward model measure its trunk

    @property
    def config(self):
        return self.gpt.config

    def estimate_flops(self):
        return self.gpt.estimate_flops()  # per token; the head is negligible

    def forward(self, idx, last):
        """idx (B, T) right-padded token ids, last (B,) index of each row's last real token."""
        h = self.gpt.trunk(idx)
        h = norm(h[torch.arange(idx.size(0), device=idx.device), last])
        return self.head(h).squeeze(-1).float()

    @torch.no_grad()
    def score(self, ids_batch, batch_size=16):
        """Scores (B,) float32 on CPU for a list of token-id lists (any lengths)."""
        if not ids_batch or any(len(s) == 0 for s in ids_batch):
            raise UserError("the reward model needs at least one sequence and no empty sequence.")
        was_training = self.training
        self.eval()
        dev = self.head.weight.device
        out = [self(*pad_right(ids_batch[i:i + batch_size], dev)).cpu() for i in range(0, len(ids_batch), batch_size)]
        self.train(was_training)
        return torch.cat(out)


def pad_right(seqs, device):
    """(idx (B, T), last (B,)) for a list of id lists, padded at the end."""
    idx, pos = pack(seqs, [[0]] * len(seqs), device)[:2]  # the one "completion" position is the last token
    return idx, pos[:, 0]


def bt_loss(r_chosen, r_rejected):
    """Bradley-Terry: -log sigmoid(r_chosen - r_rejected), as softplus for stability."""
    return F.softplus(-(r_chosen - r_rejected)).mean()


def pair_forward(rm, pairs, device):
    """Chosen and rejected scores of a list of (chosen ids, rejected ids) in one forward."""
    s = rm(*pad_right([c for c, _ in pairs] + [r for _, r in pairs], device))
    return s[:len(pairs)], s[len(pairs):]


def pair_loss(rm, pairs, device):
    """(Bradley-Terry loss of a batch of pair dicts, tokens in the forward, {"train/pair_accuracy"})."""
    c, r = pair_forward(rm, [(p["chosen"], p["rejected"]) for p in pairs], device)
    tokens = 2 * len(pairs) * max(len(ids) for p in pairs for ids in (p["chosen"], p["rejected"]))
    return bt_loss(c, r), tokens, {"train/pair_accuracy": (c > r).float().mean()}


@torch.no_grad()
def pairwise_accuracy(rm, pairs, batch_size=16):
    """(share of (chosen, rejected) id pairs ranked right, ties half; mean margin)."""
    if not pairs:
        return float("nan"), float("nan")
    c = rm.score([p[0] for p in pairs], batch_size)
    r = rm.score([p[1] for p in pairs], batch_size)
    wins = (c > r).float() + 0.5 * (c == r).float()
    return wins.mean().item(), (c - r).mean().item()


def rejected_text(task, example, others=None):
    """A wrong answer with a rationale arguing for it (hash-chosen), or None: mc, a wrong option's own
    rationale; numeric, one of wrong_answers; open, another example's answer in place of the gold's.
    GSM8K and AQuA have none (the gold rationale with the number changed fails on consistency alone)."""
    gold = example["messages"][-1]["content"]
    rng = random.Random(stable_hash("rm/" + example["id"]))
    if task.kind == "mc":
        options = example.get("option_rationales")
        if not options:
            return None
        return options[rng.choice(sorted(L for L in options if L != example["answer"]))]
    if task.kind == "numeric":
        wrong = example.get("wrong_answers")
        return rng.choice(wrong) if wrong else None
    pool = [o for o in (others or []) if o["id"] != example["id"]
            and o.get("direction") == example.get("direction")]
    if not pool:
        return None
    accepted = {normalize(a) for a in example.get("aliases", [])} | {normalize(example["answer"])}
    for _ in range(8):
        other = rng.choice(pool)
        if normalize(other["answer"]) not in accepted:
            break
    else:
        return None
    ans = example["answer"]
    if ans and ans in gold:
        return gold.replace(ans, other["answer"])
    return other["messages"][-1]["content"]


def build_pairs(task, tokenizer, split, max_examples=0, max_len=None):
    """Ground-truth pair dicts (make_pair) of max_examples hash-chosen examples of a split (0 = all),
    skipping those without a usable negative or longer than max_len tokens."""
    exs = subset(task, split, max_examples)
    pairs = [make_pair(task, tokenizer, ex, bad, "ground_truth", max_len)
             for ex in exs for bad in [rejected_text(task, ex, exs)]
             if bad is not None and bad != ex["messages"][-1]["content"]]
    return [p for p in pairs if p]


def make_pair(task, tokenizer, example, rejected, kind, max_len=None):
    """The pair dict of the example's gold answer (chosen) and `rejected`, or None past max_len tokens."""
    prompt = task.prompt(example)
    ids = [tokenizer.render_conversation({"messages": prompt + [{"role": "assistant", "content": t}]})[0]
           for t in (example["messages"][-1]["content"], rejected)]
    if max_len and max(len(i) for i in ids) > max_len:
        return None
    # prompt_len: where the answers start (DPO scores the completion tokens only)
    return {"task": task.name, "family": task.family, "id": example["id"], "kind": kind, "answer": example["answer"],
            "options": len(example.get("choices") or []), "chosen": ids[0], "rejected": ids[1],
            "prompt_len": len(tokenizer.render_prompt({"messages": prompt}))}


def sampled_pairs(model, tokenizer, task, examples, samples, max_new_tokens, seed=0,
                  max_len=None, temperature=1.0, info=None, autocast_factory=None):
    """Pairs of the gold against every sample of `model` (e.g. the SFT policy) the verifier rejects."""
    exs = list(examples)
    got = sample_completions(model, tokenizer, [task.prompt(ex) for ex in exs], samples, max_new_tokens,
                             temperature, seed, info, autocast_factory)
    pairs = [make_pair(task, tokenizer, ex, text, "sampled", max_len)
             for ex, rows in zip(exs, got) for _, text, _ in rows if text.strip() and not task.evaluate(ex, text)]
    return [p for p in pairs if p]


def head_meta(rm):
    """The scalar head as checkpoint meta (n_embd + 1 numbers; JSON floats round-trip float32)."""
    head = {"weight": rm.head.weight.detach().float().cpu().reshape(-1).tolist(),
            "bias": float(rm.head.bias.detach().float().cpu().item())}
    return {"stage": "reward_model", "reward_head": head}


def load_reward_model(path, device="cpu"):
    """(RewardModel in eval mode, tokenizer or None, meta) of a checkpoint whose meta has head_meta."""
    ckpt = checkpoint.latest_checkpoint(path) if os.path.isdir(path) else None
    if ckpt is None:
        raise UserError(f"reward model {path}: no checkpoint there; train one with python -m scripts.rm_train.")
    gpt, tok, meta = checkpoint.load_model(ckpt, device=device)
    head = meta.get("reward_head")
    if not head:
        raise UserError(f"{ckpt} is not a reward model checkpoint (meta.json has no reward_head); "
                        f"pass the output directory of python -m scripts.rm_train.")
    rm = RewardModel(gpt)
    w = torch.tensor(head["weight"], dtype=torch.float32)
    if w.numel() != gpt.config.n_embd:
        raise UserError(f"{ckpt}: reward head has {w.numel()} weights but the trunk is {gpt.config.n_embd} "
                        f"wide; the checkpoint is damaged.")
    with torch.no_grad():
        rm.head.weight.copy_(w.view(1, -1))
        rm.head.bias.fill_(float(head["bias"]))
    for p in rm.parameters():
        p.requires_grad_(False)
    return rm.to(device).eval(), tok, meta
