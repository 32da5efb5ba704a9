"""GRPO: group-relative policy optimisation, on token ids and a reward callable.

One step, as DeepSeekMath (arXiv 2402.03300, sec. 4.1) with TRL's knobs:

  1. sample   for each prompt, G completions with the Engine (KV cache, batched)
  2. score    reward_fn(prompt_index, completions) -> total per row (+ each function's part)
  3. advantage  A_i = (r_i - mean(group)) / (std(group) + eps)    (--no-std-scaling: no division);
              a group whose rewards are all equal says nothing about which completion was better:
              it is skipped (no log-probs, no loss, not in the normalisers; counted in the metrics,
              and a step where every group is equal takes no optimizer step at all). With
              cfg.shuffle_rewards (the control run) the rewards are first permuted across the
              batch, so the update follows rewards that no longer belong to their completions.
  4. prepare  old log-probs and reference log-probs, one no-grad forward each, in eval mode and
              with the very micro-batches the update uses: the first update's ratio is then
              exactly 1 (the engine's own log-probs come from a KV-cached, left-padded forward
              and differ in the last bits; we keep them only to report the gap)
  5. update   mu inner epochs over the same rollouts, one optimizer step each, minimising
                 -min(rho A, clip(rho, 1-eps, 1+eps) A) + beta * k3,   rho = exp(logp - logp_old)
                 k3 = exp(ref - logp) - (ref - logp) - 1   (Schulman's unbiased, >= 0 KL estimate)
              normalised per token over the whole batch (--loss-norm token) or per sequence
              then over sequences (--loss-norm sequence, the paper's 1/G sum 1/|o| sum).

Nothing here knows about text: prompts and completions are token-id lists and the reward is a
callable, so a test can train "emit token 3" on a tiny model without a tokenizer.

    cfg = GRPOConfig(group_size=8, max_new_tokens=128, clip_eps=0.2, kl_beta=0.04)
    reference = make_reference(model, "init")          # adapters off / snapshot / frozen copy
    stats = grpo_step(model, optimizer, prompts, reward_fn, cfg, reference, seed=step)

grpo_step is experience() (sample, score, prepare) then learn() (update); a caller that
measures something of the policy that sampled, before it moves (scripts/grpo_train.py: the
multiple-choice letter diagnostics of nanostoney/letters.py), calls the two halves itself.

Several processes: each rank takes its own prompts (a group never spans ranks), the loss is
normalised by the token / sequence count of all ranks, and gradients are summed over ranks
by `dist.sync_grads` (no DDP wrapper: the forward here is trunk + gathered logits, not forward()).
"""
import copy
import time
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field

import torch

from nanostoney import lora, probes
from nanostoney.dist import all_reduce_sum, sync_grads
from nanostoney.engine import Engine
from nanostoney.errors import UserError
from nanostoney.gpt import unwrap

LOSS_NORMS = ("token", "sequence")
REFERENCES = ("init", "base")


@dataclass
class GRPOConfig:
    group_size: int = 8            # G completions per prompt
    max_new_tokens: int = 128
    temperature: float = 1.0       # sampling only; log-probs are always those of the model (T=1)
    top_k: int | None = None
    clip_eps: float = 0.2
    kl_beta: float = 0.04
    inner_epochs: int = 1          # mu: optimizer steps over the same rollouts
    std_scaling: bool = True       # divide advantages by the group's std
    adv_eps: float = 1e-4
    loss_norm: str = "token"
    micro_batch: int = 16          # rows per forward/backward
    grad_clip: float = 1.0         # 0 = none
    stop_ids: list = field(default_factory=list)
    autocast: object = None        # a context factory for forwards (dist.autocast_ctx), or None
    shuffle_rewards: bool = False  # the control run: rewards permuted across the batch before the advantages

    def check(self):
        if self.group_size < 2:
            raise UserError(f"--group-size must be at least 2 (advantages compare within a group), got {self.group_size}.")
        if self.loss_norm not in LOSS_NORMS:
            raise UserError(f"--loss-norm must be one of {', '.join(LOSS_NORMS)}, got {self.loss_norm!r}.")
        if self.inner_epochs < 1:
            raise UserError(f"--inner-epochs must be at least 1, got {self.inner_epochs}.")
        if not 0 < self.clip_eps < 1:
            raise UserError(f"--clip-eps must be in (0, 1), got {self.clip_eps}.")
        if self.kl_beta < 0:
            raise UserError(f"--kl-beta must be >= 0, got {self.kl_beta}.")
        return self


# -----------------------------------------------------------------------------
# the maths: advantages, k3, the clipped objective


def group_advantages(rewards, group_size, std_scaling=True, eps=1e-4):
    """(r - mean of its group) / (std of its group + eps); rows are group-major (G consecutive
    rows per prompt, as Engine.generate(num_samples=G) returns them). A group whose rewards are
    all equal gets advantage 0: it carries no signal about which completion was better.
    std is the population std (divide by G), as TRL."""
    r = torch.as_tensor(rewards, dtype=torch.float32)
    if r.numel() % group_size:
        raise ValueError(f"{r.numel()} rewards do not split into groups of {group_size}")
    g = r.view(-1, group_size)
    adv = g - g.mean(1, keepdim=True)
    if std_scaling:
        adv = adv / (g.std(1, unbiased=False, keepdim=True) + eps)
    return adv.reshape(-1)


def kl_k3(logp, ref_logp):
    """Per-token k3 estimate of KL(policy || reference) on samples from the policy:
    exp(ref - logp) - (ref - logp) - 1 >= 0, exactly 0 where the two agree. The log-ratio is
    clamped to +-20 so one wild token cannot produce an inf."""
    d = (ref_logp - logp).clamp(-20.0, 20.0)
    return torch.exp(d) - d - 1.0


def policy_loss(logp, old_logp, ref_logp, adv, mask, clip_eps, beta, loss_norm, n_tokens, n_seqs):
    """The clipped surrogate plus beta * k3 for one micro-batch, scaled so that summing it over
    all micro-batches (and ranks) gives the batch loss: `n_tokens` / `n_seqs` are the totals of
    the whole batch on all ranks. logp etc. are (B, L) over completion tokens; adv is (B,).

    Returns (loss, stats) with stats summed over this micro-batch's tokens (for logging):
    pg, kl, clipped (tokens whose gradient the clip removed), ratio deviation."""
    mask = mask.float()
    ratio = torch.exp(logp - old_logp)
    a = adv[:, None]
    unclipped = ratio * a
    clipped = ratio.clamp(1.0 - clip_eps, 1.0 + clip_eps) * a
    pg = -torch.min(unclipped, clipped)
    kl = kl_k3(logp, ref_logp) if ref_logp is not None else torch.zeros_like(logp)
    per_token = pg + beta * kl if beta else pg
    if loss_norm == "token":
        loss = (per_token * mask).sum() / n_tokens
    elif loss_norm == "sequence":
        loss = ((per_token * mask).sum(1) / mask.sum(1).clamp(min=1)).sum() / n_seqs
    else:
        raise UserError(f"--loss-norm must be one of {', '.join(LOSS_NORMS)}, got {loss_norm!r}.")
    with torch.no_grad():
        # the clip removes the gradient where the clipped term is the smaller one: rho > 1+eps
        # with A > 0, or rho < 1-eps with A < 0
        cut = ((ratio > 1 + clip_eps) & (a > 0)) | ((ratio < 1 - clip_eps) & (a < 0))
        stats = {"pg": (pg * mask).sum().item(), "kl": (kl * mask).sum().item(),
                 "clipped": (cut.float() * mask).sum().item(),
                 "ratio_dev": ((ratio - 1).abs() * mask).max().item() if mask.any() else 0.0}
    return loss, stats


# -----------------------------------------------------------------------------
# rollouts and their log-probs


@dataclass
class Rollout:
    prompts: list            # per row: prompt ids (each prompt repeated G times, group-major)
    completions: list        # per row: completion ids (stop token included if hit)
    prompt_index: list       # row -> index into the step's prompt list
    stopped: list            # row -> ended on a stop token
    engine_logprobs: list    # row -> the Engine's log-probs of the completion tokens
    rewards: torch.Tensor = None      # the verifiers' rewards (what is logged)
    parts: dict = None
    train_rewards: torch.Tensor = None  # what the advantages come from: rewards, or them permuted
    advantages: torch.Tensor = None
    keep: list = None        # rows of the groups whose train rewards differ (the rest are skipped)
    batches: list = None     # micro-batches (prepare fills these)
    stats: dict = field(default_factory=dict)   # summed statistics of prepare() and update()
    times: dict = field(default_factory=dict)   # seconds per phase


def sample(model, prompts, cfg, seed=0):
    """G completions per prompt through the Engine (no grad, eval mode)."""
    model = unwrap(model)
    was_training = model.training
    model.eval()
    with _autocast(cfg):  # bf16 on CUDA: rollouts are most of a step's time
        gen = Engine(model, stop_ids=cfg.stop_ids).generate(
            prompts, cfg.max_new_tokens, temperature=cfg.temperature, top_k=cfg.top_k, seed=seed,
            num_samples=cfg.group_size)
    model.train(was_training)
    R = len(gen.tokens)
    lps = [gen.logprobs[r, :len(gen.tokens[r])].tolist() for r in range(R)]
    return Rollout(prompts=[list(prompts[i]) for i in gen.prompt_index], completions=gen.tokens,
                   prompt_index=list(gen.prompt_index), stopped=list(gen.stopped), engine_logprobs=lps)


def score(rollout, reward_fn, cfg, seed=0):
    """Rewards, advantages and the rows kept. reward_fn(prompt_index, completions) returns a list
    of totals or (totals, {name: list}) with each reward function's raw values. With
    cfg.shuffle_rewards the advantages come from the rewards permuted across the batch (a
    permutation drawn from `seed`), the control run."""
    out = reward_fn(rollout.prompt_index, rollout.completions)
    totals, parts = out if isinstance(out, tuple) else (out, {})
    if len(totals) != len(rollout.completions):
        raise ValueError(f"reward_fn returned {len(totals)} rewards for {len(rollout.completions)} completions")
    rollout.rewards = torch.tensor([float(t) for t in totals], dtype=torch.float32)
    rollout.parts = {k: torch.tensor([float(x) for x in v]) for k, v in parts.items()}
    rollout.train_rewards = rollout.rewards
    if cfg.shuffle_rewards:
        perm = torch.randperm(len(totals), generator=torch.Generator().manual_seed(seed))
        rollout.train_rewards = rollout.rewards[perm]
    rollout.advantages = group_advantages(rollout.train_rewards, cfg.group_size, cfg.std_scaling, cfg.adv_eps)
    rollout.keep = informative_rows(rollout.train_rewards, cfg.group_size)
    return rollout


def equal_groups(rewards, group_size):
    """BoolTensor (groups,): the groups (group-major rows) whose rewards are all equal."""
    g = torch.as_tensor(rewards, dtype=torch.float32).view(-1, group_size)
    return (g == g[:, :1]).all(1)


def informative_rows(rewards, group_size):
    """The rows of the groups whose rewards are not all equal, in order."""
    skip = equal_groups(rewards, group_size)
    return [r for r in range(len(rewards)) if not skip[r // group_size]]


@dataclass
class MicroBatch:
    idx: torch.Tensor        # (B, T) prompt + completion minus its last token, right-padded
    pos: torch.Tensor        # (B, L) position whose logits predict completion token j
    targets: torch.Tensor    # (B, L) completion ids (0 on padding)
    mask: torch.Tensor       # (B, L) 1 on real completion tokens
    valid: torch.Tensor      # (B, T) True on real input tokens (not right padding)
    rows: list               # rollout rows in this micro-batch
    old_logp: torch.Tensor = None
    ref_logp: torch.Tensor = None


def pack(prompts, completions, device):
    """Right-padded inputs for the training forward. Right padding needs no attention mask: a
    causal model never lets a real token see the pads after it, and positions start at 0."""
    B = len(prompts)
    seqs = [list(p) + list(c)[:-1] for p, c in zip(prompts, completions)]
    T = max(len(s) for s in seqs)
    L = max(1, max(len(c) for c in completions))
    idx = torch.zeros(B, T, dtype=torch.long)
    pos = torch.zeros(B, L, dtype=torch.long)
    targets = torch.zeros(B, L, dtype=torch.long)
    mask = torch.zeros(B, L, dtype=torch.long)
    for r, (p, c, s) in enumerate(zip(prompts, completions, seqs)):
        idx[r, :len(s)] = torch.tensor(s, dtype=torch.long)
        n = len(c)
        if n:
            targets[r, :n] = torch.tensor(c, dtype=torch.long)
            mask[r, :n] = 1
        # token j of the completion is predicted at position len(p) - 1 + j; pads point at a
        # valid position and are masked out
        pos[r] = (len(p) - 1 + torch.arange(L)).clamp(max=T - 1)
    valid = torch.arange(T)[None, :] < torch.tensor([len(s) for s in seqs])[:, None]
    return idx.to(device), pos.to(device), targets.to(device), mask.to(device), valid.to(device)


def completion_logits(model, idx, pos):
    """Logits (B, L, V) at the positions that predict the completion tokens only: the prompt's
    positions go through the trunk but never through lm_head (saves B x P x V floats)."""
    h = model.trunk(idx)
    h = h.gather(1, pos[..., None].expand(-1, -1, h.size(-1)))
    return model.lm_logits(h)


def token_logprobs(model, mb, with_entropy=False):
    """(logp, token_entropy): log p(completion token) (B, L) under `model`, and the entropy of
    the policy's next-token distribution at each of those positions (B, L) if asked, else None."""
    logits = completion_logits(model, mb.idx, mb.pos)
    logp_all = torch.log_softmax(logits, -1)
    logp = logp_all.gather(-1, mb.targets[..., None]).squeeze(-1)
    token_entropy = -(logp_all.exp() * logp_all).sum(-1) if with_entropy else None
    return logp, token_entropy


def micro_batches(rollout, size, device):
    """The kept rows (all rows when score() has not chosen) in micro-batches of `size`."""
    out = []
    kept = rollout.keep if rollout.keep is not None else list(range(len(rollout.completions)))
    for i in range(0, len(kept), size):
        rows = kept[i:i + size]
        tensors = pack([rollout.prompts[r] for r in rows], [rollout.completions[r] for r in rows], device)
        out.append(MicroBatch(*tensors, rows))
    return out


def _autocast(cfg):
    return cfg.autocast() if cfg.autocast is not None else nullcontext()


@torch.no_grad()
def prepare(model, rollout, cfg, reference=None, attn_entropy=None):
    """Old and reference log-probs per micro-batch, in eval mode, plus the diagnostics that come
    free with the old-policy forward: token entropy, KL(policy || reference) by k3, the gap to the
    Engine's log-probs. `attn_entropy`: a probes.EntropyProbe, attached during the old-policy
    forwards only and told each micro-batch's real tokens (the caller keeps it and reads it after).
    Returns a dict of summed statistics."""
    model = unwrap(model)
    device = model.get_device()
    was_training = model.training
    model.eval()
    rollout.batches = micro_batches(rollout, cfg.micro_batch, device)
    s = {"tokens": 0.0, "token_entropy": 0.0, "kl": 0.0, "engine_gap": 0.0}
    with probes.attach(model, attn_entropy) if attn_entropy is not None else nullcontext():
        for mb in rollout.batches:
            if attn_entropy is not None:
                attn_entropy.valid = mb.valid
            with _autocast(cfg):
                logp, token_entropy = token_logprobs(model, mb, with_entropy=True)
            mb.old_logp = logp.float()
            m = mb.mask.float()
            s["tokens"] += m.sum().item()
            s["token_entropy"] += (token_entropy.float() * m).sum().item()
            for j, r in enumerate(mb.rows):
                n = len(rollout.completions[r])
                if n:
                    eng = torch.tensor(rollout.engine_logprobs[r], device=device)
                    s["engine_gap"] = max(s["engine_gap"], (eng - mb.old_logp[j, :n]).abs().max().item())
    if reference is not None:
        with reference() as ref:
            ref.eval()
            for mb in rollout.batches:
                with _autocast(cfg):
                    mb.ref_logp = token_logprobs(ref, mb)[0].float()
                s["kl"] += (kl_k3(mb.old_logp, mb.ref_logp) * mb.mask).sum().item()
    model.train(was_training)
    return s


def update(model, optimizer, rollout, cfg, params=None):
    """cfg.inner_epochs optimizer steps over the prepared micro-batches, the loss normalised by
    the completion tokens / rows of all ranks. Returns summed statistics of every epoch."""
    model = unwrap(model)
    params = params if params is not None else [p for p in model.parameters() if p.requires_grad]
    n_tokens, n_seqs = all_reduce_sum([sum(mb.mask.sum().item() for mb in rollout.batches),
                                       float(sum(len(mb.rows) for mb in rollout.batches))])
    s = {"pg": 0.0, "kl": 0.0, "clipped": 0.0, "ratio_dev": 0.0, "tokens": 0.0, "grad_norm": 0.0,
         "ratio_dev_first": 0.0, "skipped": 0.0}
    if n_seqs == 0:  # every group of every rank was equal: no signal, so no step (not even decay)
        s["skipped"] = 1.0
        return s
    adv = rollout.advantages.to(model.get_device())
    has_ref = any(mb.ref_logp is not None for mb in rollout.batches)
    beta = cfg.kl_beta if has_ref else 0.0
    model.train()
    for epoch in range(cfg.inner_epochs):
        optimizer.zero_grad(set_to_none=True)
        for mb in rollout.batches:
            with _autocast(cfg):
                logp = token_logprobs(model, mb)[0]
            loss, st = policy_loss(logp.float(), mb.old_logp, mb.ref_logp, adv[mb.rows], mb.mask,
                                   cfg.clip_eps, beta, cfg.loss_norm, n_tokens, n_seqs)
            loss.backward()
            for k in ("pg", "kl", "clipped"):
                s[k] += st[k]
            s["ratio_dev"] = max(s["ratio_dev"], st["ratio_dev"])
            if epoch == 0:
                s["ratio_dev_first"] = max(s["ratio_dev_first"], st["ratio_dev"])
            s["tokens"] += mb.mask.sum().item()
        sync_grads(params)
        clip = cfg.grad_clip if cfg.grad_clip and cfg.grad_clip > 0 else float("inf")
        s["grad_norm"] += torch.nn.utils.clip_grad_norm_(params, clip).item() / cfg.inner_epochs
        optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return s


# -----------------------------------------------------------------------------
# the reference policy


@contextmanager
def swapped_adapters(model, snapshot):
    """Inside the block the LoRA adapters hold `snapshot` (a lora_state_dict); restored after."""
    own = lora.lora_state_dict(model)
    saved = {k: v.detach().clone() for k, v in own.items()}
    with torch.no_grad():
        for k, v in snapshot.items():
            own[k].copy_(v)
    try:
        yield model
    finally:
        with torch.no_grad():
            for k, v in saved.items():
                own[k].copy_(v)


def make_reference(model, kind="init"):
    """A callable returning a context manager that yields the reference policy.

    LoRA model, kind "base": the frozen weights with the adapters disabled (no copy).
    LoRA model, kind "init": the policy as it is now, i.e. at the start of RL. When every
      lora_B is zero (fresh adapters) this is the same function as "base" and costs nothing;
      otherwise (RL continues the SFT adapters) a snapshot of the adapter tensors (r x (in+out)
      per layer, small) is swapped in for the reference forwards.
    Model without adapters (full fine-tuning): a frozen copy made now.
    """
    if kind not in REFERENCES:
        raise UserError(f"--reference must be one of {', '.join(REFERENCES)}, got {kind!r}.")
    model = unwrap(model)
    if lora.lora_modules(model):
        fresh = all(bool((m.lora_B == 0).all()) for _, m in lora.lora_modules(model))
        if kind == "base" or fresh:
            return lambda: lora.disable_adapters(model)
        snapshot = {k: v.detach().clone() for k, v in lora.lora_state_dict(model).items()}
        return lambda: swapped_adapters(model, snapshot)
    if kind == "base":
        raise UserError("--reference base needs LoRA adapters (the base is the model with them off); "
                        "with --full the reference is the initial model (--reference init).")
    frozen = copy.deepcopy(model).eval()
    for p in frozen.parameters():
        p.requires_grad_(False)
    return lambda: nullcontext(frozen)


# -----------------------------------------------------------------------------
# one whole step


def experience(model, prompts, reward_fn, cfg, reference=None, seed=0, attn_entropy=None):
    """The first half of a step: sample -> score -> prepare. Returns the Rollout, with
    prepare()'s statistics in .stats and the time of each phase in .times."""
    cfg.check()
    t0 = time.perf_counter()
    ro = sample(model, prompts, cfg, seed=seed)
    t1 = time.perf_counter()
    score(ro, reward_fn, cfg, seed=seed)
    t2 = time.perf_counter()
    ro.stats = prepare(model, ro, cfg, reference, attn_entropy)
    ro.times.update(sample=t1 - t0, score=t2 - t1, logprobs=time.perf_counter() - t2)
    return ro


def learn(model, optimizer, rollout, cfg, params=None):
    """The second half of a step: update() on a prepared rollout; its statistics join .stats."""
    t0 = time.perf_counter()
    upd = update(model, optimizer, rollout, cfg, params)
    rollout.stats.update({f"update/{k}": v for k, v in upd.items()})
    rollout.times["update"] = time.perf_counter() - t0
    return rollout


def grpo_step(model, optimizer, prompts, reward_fn, cfg, reference=None, seed=0, attn_entropy=None, params=None):
    """sample -> score -> prepare -> update. Returns (stats, rollout); stats are means:
    reward_mean/std, kl (policy that sampled vs reference, before this step's update),
    clip_frac, token entropy, length, and the time of each phase."""
    ro = learn(model, optimizer, experience(model, prompts, reward_fn, cfg, reference, seed, attn_entropy),
               cfg, params)
    return summarize(ro, cfg), ro


def summarize(ro, cfg):
    """Flat metrics of one step from a rollout's statistics and times."""
    prep = ro.stats
    tok, upd_tok = max(prep["tokens"], 1.0), max(prep["update/tokens"], 1.0)
    lengths = torch.tensor([float(len(c)) for c in ro.completions])
    out = {"reward/mean": ro.rewards.mean().item(), "reward/std": ro.rewards.std(unbiased=False).item(),
           "kl/mean": prep["kl"] / tok, "policy/entropy": prep["token_entropy"] / tok,
           "clip_frac": prep["update/clipped"] / upd_tok,
           "loss/pg": prep["update/pg"] / upd_tok, "loss/kl_k3": prep["update/kl"] / upd_tok,
           "ratio/max_dev": prep["update/ratio_dev"], "ratio/max_dev_first_epoch": prep["update/ratio_dev_first"],
           "grad_norm": prep["update/grad_norm"],
           "completion/length": lengths.mean().item(), "completion/stopped": sum(ro.stopped) / len(ro.stopped),
           "rollout/engine_logprob_gap": prep["engine_gap"]}
    g = ro.rewards.view(-1, cfg.group_size)
    out["adv/zero_groups"] = (g.std(1, unbiased=False) == 0).float().mean().item()
    skipped = equal_groups(ro.train_rewards, cfg.group_size)
    out["groups/skipped"] = skipped.float().sum().item()  # this rank's count (a caller's mean over ranks: per rank)
    out["groups/skipped_frac"] = skipped.float().mean().item()
    out["update/skipped"] = prep["update/skipped"]
    out["reward/shuffled"] = float(cfg.shuffle_rewards)
    # the control's evidence: the share of rows whose advantage came from another row's reward
    out["reward/shuffle_moved"] = (ro.train_rewards != ro.rewards).float().mean().item()
    for name, v in (ro.parts or {}).items():
        out[f"reward/{name}/mean"] = v.mean().item()
        out[f"reward/{name}/std"] = v.std(unbiased=False).item()
    for k, v in ro.times.items():
        out[f"time/{k}_s"] = v
    if ro.times:
        out["time/step_s"] = sum(ro.times.values())
    return out
