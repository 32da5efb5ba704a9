"""GRPO (DeepSeekMath, arXiv 2402.03300, sec. 4.1, with TRL's knobs) on token ids and a reward callable.

One step: sample G completions per prompt (Engine) -> score (reward_fn) -> group advantages
(r - mean) / (std + eps); a group whose rewards are all equal carries no signal and is skipped
-> prepare old and reference log-probs in eval mode with the very micro-batches the update
uses (the first ratio is then exactly 1) -> update: inner_epochs optimizer steps minimising
-min(rho A, clip(rho) A) + beta * k3, normalised per token ("token") or per sequence ("sequence").
cfg.shuffle_rewards (the control run) permutes the rewards across the batch first.

grpo_step is experience() then learn(): rl_step measures the letters in between. Each rank takes
its own prompts; the loss is normalised by all ranks' counts.
"""
import time
from contextlib import nullcontext
from dataclasses import dataclass, field

import torch

from nanostoney import letters, probes, rewards, train
from nanostoney.dist import all_reduce_mean, all_reduce_sum, map_over_ranks, sync_grads
from nanostoney.engine import Engine
from nanostoney.gpt import unwrap
from nanostoney.policy import autocast, pack, token_logprobs


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


def group_advantages(rewards, group_size, std_scaling=True, eps=1e-4):
    """(r - group mean) / (group population std + eps), as TRL; rows are group-major (G per prompt)."""
    r = torch.as_tensor(rewards, dtype=torch.float32)
    if r.numel() % group_size:
        raise ValueError(f"{r.numel()} rewards do not split into groups of {group_size}")
    g = r.view(-1, group_size)
    adv = g - g.mean(1, keepdim=True)
    if std_scaling:
        adv = adv / (g.std(1, unbiased=False, keepdim=True) + eps)
    return adv.reshape(-1)


def kl_k3(logp, ref_logp):
    """Per-token k3 estimate of KL(policy || reference), Schulman's unbiased and >= 0 one; the
    log-ratio is clamped to +-20 so one wild token cannot produce an inf."""
    d = (ref_logp - logp).clamp(-20.0, 20.0)
    return torch.exp(d) - d - 1.0


def policy_loss(logp, old_logp, ref_logp, adv, mask, clip_eps, beta, loss_norm, n_tokens, n_seqs):
    """The clipped surrogate plus beta * k3 of one micro-batch ((B, L) tensors, adv (B,)), scaled by
    the whole batch's n_tokens / n_seqs on all ranks so the micro-batches' losses sum to the batch
    loss. Returns (loss, stats summed over its tokens: pg, kl, clipped, ratio_dev)."""
    mask = mask.float()
    ratio = torch.exp(logp - old_logp)
    a = adv[:, None]
    pg = -torch.min(ratio * a, ratio.clamp(1.0 - clip_eps, 1.0 + clip_eps) * a)
    kl = kl_k3(logp, ref_logp) if ref_logp is not None else torch.zeros_like(logp)
    per_token = pg + beta * kl if beta else pg
    if loss_norm == "token":
        loss = (per_token * mask).sum() / n_tokens
    else:
        assert loss_norm == "sequence", f"loss_norm is 'token' or 'sequence', got {loss_norm!r}"
        loss = ((per_token * mask).sum(1) / mask.sum(1).clamp(min=1)).sum() / n_seqs
    with torch.no_grad():
        # the clip removes the gradient where the clipped term is the smaller one: rho > 1+eps
        # with A > 0, or rho < 1-eps with A < 0
        cut = ((ratio > 1 + clip_eps) & (a > 0)) | ((ratio < 1 - clip_eps) & (a < 0))
        stats = {"pg": (pg * mask).sum().item(), "kl": (kl * mask).sum().item(),
                 "clipped": (cut.float() * mask).sum().item(),
                 "ratio_dev": ((ratio - 1).abs() * mask).max().item() if mask.any() else 0.0}
    return loss, stats


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
    with autocast(cfg.autocast):  # bf16 on CUDA: rollouts are most of a step's time
        gen = Engine(model, stop_ids=cfg.stop_ids).generate(
            prompts, cfg.max_new_tokens, temperature=cfg.temperature, top_k=cfg.top_k, seed=seed,
            num_samples=cfg.group_size)
    model.train(was_training)
    lps = [gen.logprobs[r, :len(t)].tolist() for r, t in enumerate(gen.tokens)]
    return Rollout(prompts=[list(prompts[i]) for i in gen.prompt_index], completions=gen.tokens,
                   prompt_index=list(gen.prompt_index), stopped=list(gen.stopped), engine_logprobs=lps)


def score(rollout, reward_fn, cfg, seed=0):
    """Rewards, advantages and the rows kept. reward_fn(prompt_index, completions) returns totals
    or (totals, {name: raw values}); cfg.shuffle_rewards permutes them (drawn from `seed`) first."""
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
    skip = equal_groups(rollout.train_rewards, cfg.group_size)
    rollout.keep = [r for r in range(len(totals)) if not skip[r // cfg.group_size]]
    return rollout


def equal_groups(rewards, group_size):
    """BoolTensor (groups,): the groups (group-major rows) whose rewards are all equal."""
    g = torch.as_tensor(rewards, dtype=torch.float32).view(-1, group_size)
    return (g == g[:, :1]).all(1)


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


def micro_batches(rollout, size, device):
    """The kept rows (all rows when score() has not chosen) in micro-batches of `size`."""
    kept = rollout.keep if rollout.keep is not None else list(range(len(rollout.completions)))
    chunks = [kept[i:i + size] for i in range(0, len(kept), size)]
    return [MicroBatch(*pack([rollout.prompts[r] for r in rows], [rollout.completions[r] for r in rows], device), rows)
            for rows in chunks]


@torch.no_grad()
def prepare(model, rollout, cfg, reference=None, attn_entropy=None):
    """Old and reference log-probs per micro-batch in eval mode, and summed diagnostics: token
    entropy, k3 KL to the reference, the gap to the Engine's log-probs. `attn_entropy`: a
    probes.EntropyProbe attached during the old-policy forwards only."""
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
            with autocast(cfg.autocast):
                logp, token_entropy = token_logprobs(model, mb.idx, mb.pos, mb.targets, with_entropy=True)
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
                with autocast(cfg.autocast):
                    mb.ref_logp = token_logprobs(ref, mb.idx, mb.pos, mb.targets)[0].float()
                s["kl"] += (kl_k3(mb.old_logp, mb.ref_logp) * mb.mask).sum().item()
    model.train(was_training)
    return s


def update(model, optimizer, rollout, cfg, params=None):
    """cfg.inner_epochs optimizer steps over the prepared micro-batches; summed statistics."""
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
    beta = cfg.kl_beta if any(mb.ref_logp is not None for mb in rollout.batches) else 0.0
    model.train()
    for epoch in range(cfg.inner_epochs):
        optimizer.zero_grad(set_to_none=True)
        for mb in rollout.batches:
            with autocast(cfg.autocast):
                logp = token_logprobs(model, mb.idx, mb.pos, mb.targets)[0]
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


def experience(model, prompts, reward_fn, cfg, reference=None, seed=0, attn_entropy=None):
    """sample -> score -> prepare: the Rollout, with prepare's statistics and each phase's time."""
    t0 = time.perf_counter()
    ro = sample(model, prompts, cfg, seed=seed)
    t1 = time.perf_counter()
    score(ro, reward_fn, cfg, seed=seed)
    t2 = time.perf_counter()
    ro.stats = prepare(model, ro, cfg, reference, attn_entropy)
    ro.times.update(sample=t1 - t0, score=t2 - t1, logprobs=time.perf_counter() - t2)
    return ro


def learn(model, optimizer, rollout, cfg, params=None):
    """update() on a prepared rollout; its statistics join .stats."""
    t0 = time.perf_counter()
    upd = update(model, optimizer, rollout, cfg, params)
    rollout.stats.update({f"update/{k}": v for k, v in upd.items()})
    rollout.times["update"] = time.perf_counter() - t0
    return rollout


def grpo_step(model, optimizer, prompts, reward_fn, cfg, reference=None, seed=0, attn_entropy=None, params=None):
    """experience -> learn. Returns (summarize's metrics, rollout)."""
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
           "clip_frac": prep["update/clipped"] / upd_tok, "grad_norm": prep["update/grad_norm"],
           "loss/pg": prep["update/pg"] / upd_tok, "loss/kl_k3": prep["update/kl"] / upd_tok,
           "ratio/max_dev": prep["update/ratio_dev"], "ratio/max_dev_first_epoch": prep["update/ratio_dev_first"],
           "completion/length": lengths.mean().item(), "completion/stopped": sum(ro.stopped) / len(ro.stopped),
           "rollout/engine_logprob_gap": prep["engine_gap"]}
    zero = (ro.rewards.view(-1, cfg.group_size).std(1, unbiased=False) == 0).float()
    skipped = equal_groups(ro.train_rewards, cfg.group_size).float()
    # groups/skipped is this rank's count; shuffle_moved, the control's evidence: rows whose
    # advantage came from another row's reward
    out.update({"adv/zero_groups": zero.mean().item(), "groups/skipped": skipped.sum().item(),
                "groups/skipped_frac": skipped.mean().item(), "update/skipped": prep["update/skipped"],
                "reward/shuffled": float(cfg.shuffle_rewards),
                "reward/shuffle_moved": (ro.train_rewards != ro.rewards).float().mean().item()})
    for name, v in (ro.parts or {}).items():
        out[f"reward/{name}/mean"] = v.mean().item()
        out[f"reward/{name}/std"] = v.std(unbiased=False).item()
    out.update({f"time/{k}_s": v for k, v in ro.times.items()})
    if ro.times:
        out["time/step_s"] = sum(ro.times.values())
    return out


# -----------------------------------------------------------------------------
# a step on task prompts: their rewards, the letter diagnostics, the logged metrics


class RewardFn:
    """reward_fn(prompt_index, completions) over the prompts `items` [(task index, example)]:
    the weighted rewards, scored per task in one batch."""

    def __init__(self, items, tasks, tok, weights, fns, stop_ids):
        self.items, self.tasks, self.tok = items, tasks, tok
        self.weights, self.fns, self.stop_ids = weights, fns, stop_ids

    def __call__(self, prompt_index, completions):
        texts = [self.tok.decode([t for t in c if t not in self.stop_ids]) for c in completions]
        totals, parts = [0.0] * len(texts), {k: [0.0] * len(texts) for k in self.weights}
        by_task = {}
        for r, pi in enumerate(prompt_index):
            by_task.setdefault(self.items[pi][0], []).append(r)
        for ti, rows in by_task.items():
            exs = [self.items[prompt_index[r]][1] for r in rows]
            t_, p_ = rewards.combine_batch(self.weights, exs, [texts[r] for r in rows], self.tasks[ti], self.fns)
            for j, r in enumerate(rows):
                totals[r] = t_[j]
                for k in self.weights:
                    parts[k][r] = p_[k][j]
        return totals, parts


def task_reward_metrics(ro, items, tasks, weights):
    """reward/<task>/mean and reward/<task>/<reward> over all ranks' rows of each task."""
    sums = []
    for ti in range(len(tasks)):
        rows = [r for r, pi in enumerate(ro.prompt_index) if items[pi][0] == ti]
        sums += [float(len(rows)), float(ro.rewards[rows].sum()) if rows else 0.0]
        sums += [float(ro.parts[k][rows].sum()) if rows else 0.0 for k in weights]
    sums = all_reduce_sum(sums)
    out, width = {}, 2 + len(weights)
    for ti, task in enumerate(tasks):
        cnt, total, *parts = sums[ti * width:(ti + 1) * width]
        if cnt > 0:
            out[f"reward/{task.name}/mean"] = total / cnt
            out.update({f"reward/{task.name}/{k}": v / cnt for k, v in zip(weights, parts)})
    return out


def probe_items(schedule, train_sets, n_tasks, k):
    """[(task index, example)]: the first k distinct training prompts per task in schedule order."""
    seen = {t: [] for t in range(n_tasks)}
    for t, i in schedule:
        if len(seen[t]) < k and i not in seen[t]:
            seen[t].append(i)
    return [(t, train_sets[t][i]) for t in range(n_tasks) for i in seen[t]]


@torch.no_grad()
def probe_reward(model, tok, items, tasks, cfg, reward_fn_for, info, seed):
    """{task name: mean total reward} over G samples of each probe prompt, same seed every call
    (chunks of 8 prompts over the ranks, chunk i seeded by i: the same at any world size)."""
    def chunk_rewards(i):
        chunk = items[i:i + 8]
        ro = sample(model, [tok.render_prompt({"messages": tasks[t].prompt(ex)}) for t, ex in chunk],
                    cfg, seed=seed * 7919 + i)
        score(ro, reward_fn_for(chunk), cfg)
        return [(chunk[pi][0], float(ro.rewards[r])) for r, pi in enumerate(ro.prompt_index)]

    got = [x for part in map_over_ranks(chunk_rewards, list(range(0, len(items), 8)), info) for x in part]
    by_task = {}
    for t, r in got:
        by_task.setdefault(tasks[t].name, []).append(r)
    return {name: sum(rs) / len(rs) for name, rs in by_task.items()}


def rl_step(step, run):
    """One GRPO step on this rank's share of the step's prompts; returns the logged metrics."""
    args, info, model, cfg = run.args, run.info, run.model, run.cfg
    done, P = step + 1, args.prompts_per_step
    entries = run.schedule[step * P:(step + 1) * P][info.rank::info.world_size]
    items = [(ti, run.train_sets[ti][i]) for ti, i in entries]
    prompts = [run.tok.render_prompt({"messages": run.tasks[ti].prompt(ex)}) for ti, ex in items]
    seed = (args.seed * 1_000_003 + step) * info.world_size + info.rank
    measure = train.every(args.entropy_every, done)
    ent = probes.EntropyProbe(model.config.n_layer, model.config.n_head) if measure else None
    train.sync_device(info.device)
    ro = experience(model, prompts, run.reward_fn_for(items), cfg, run.reference, seed, ent)
    # the letter diagnostics measure the policy that sampled, before the update moves it
    t0 = time.perf_counter()
    sums = None
    if run.letters and run.mc_names and train.every(args.letter_every, done):
        mc_rows = [(r, run.tasks[items[pi][0]].name, items[pi][1]["answer"], len(items[pi][1]["choices"]))
                   for r, pi in enumerate(ro.prompt_index) if run.tasks[items[pi][0]].kind == "mc"]
        sums = letters.letter_sums(model, run.reference, ro.prompts, ro.completions, mc_rows, run.mc_names,
                                   run.letters, cfg.stop_ids, cfg)
    ro.times["letters"] = time.perf_counter() - t0
    learn(model, run.optimizer, ro, cfg, run.params)
    train.sync_device(info.device)
    metrics = summarize(ro, cfg)
    if measure:
        metrics.update(train.attention_entropy_metrics(ent.all_reduce()))
    metrics = all_reduce_mean(metrics)
    metrics.update(task_reward_metrics(ro, items, run.tasks, run.weights))
    if sums is not None:
        metrics.update(letters.finish(sums, run.mc_names))
    metrics["train/lr_mult"] = run.optimizer.param_groups[0]["lr"] / run.optimizer.param_groups[0]["initial_lr"]
    metrics["rollout/tokens_per_s"] = (sum(len(c) for c in ro.completions) * info.world_size
                                       / max(ro.times["sample"], 1e-9))
    return metrics
