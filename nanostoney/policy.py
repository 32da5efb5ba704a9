"""The policy's log-probs of completions, and the reference policy it is held near: what GRPO,
DPO and the letter diagnostics share.

A row is (prompt ids, completion ids). `pack` right-pads rows for one training forward;
`token_logprobs` gives log p(completion token) at each completion position, reading lm_head
only there; `make_reference` returns the policy at the start of RL (or the base weights) as a
context manager, without a second model in memory where LoRA allows it.

    reference = make_reference(model, "init")
    idx, pos, targets, mask, valid = pack(prompts, completions, device)
    logp, _ = token_logprobs(model, idx, pos, targets)
    with reference() as ref:
        ref_logp, _ = token_logprobs(ref, idx, pos, targets)
"""
import copy
from contextlib import contextmanager, nullcontext

import torch

from nanostoney import lora, probes
from nanostoney.dist import map_over_ranks
from nanostoney.engine import Engine
from nanostoney.gpt import unwrap

REFERENCES = ("init", "base")


def autocast(factory):
    """The context of a forward: factory() (dist.autocast_ctx bound to the run), or nothing."""
    return factory() if factory is not None else nullcontext()


def pack(prompts, completions, device):
    """Right-padded inputs for the training forward. Right padding needs no attention mask: a
    causal model never lets a real token see the pads after it, and positions start at 0.
    Returns (idx (B, T), pos (B, L), targets (B, L), mask (B, L), valid (B, T))."""
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


def token_logprobs(model, idx, pos, targets, with_entropy=False):
    """(logp, token_entropy): log p(completion token) (B, L) under `model`, and the entropy of
    the policy's next-token distribution at each of those positions (B, L) if asked, else None."""
    logp_all = torch.log_softmax(completion_logits(model, idx, pos), -1)
    logp = logp_all.gather(-1, targets[..., None]).squeeze(-1)
    token_entropy = -(logp_all.exp() * logp_all).sum(-1) if with_entropy else None
    return logp, token_entropy


def sequence_logps(model, prompts, completions, device, autocast_factory=None, attn_entropy=None):
    """(summed completion log-probs (B,), per-token log-probs (B, L), mask (B, L)) of each
    (prompt, completion) row under `model`, in one right-padded forward."""
    idx, pos, targets, mask, valid = pack(prompts, completions, device)
    if attn_entropy is not None:
        attn_entropy.valid = valid
    with probes.attach(model, attn_entropy) if attn_entropy is not None else nullcontext():
        with autocast(autocast_factory):
            logp = token_logprobs(model, idx, pos, targets)[0].float()
    m = mask.float()
    return (logp * m).sum(1), logp, m


@torch.no_grad()
def reference_logps(reference, prompts, completions, device, autocast_factory=None):
    """(summed, per-token) completion log-probs under the reference policy, in eval mode."""
    with reference() as ref:
        was_training = ref.training
        ref.eval()
        out = sequence_logps(ref, prompts, completions, device, autocast_factory)[:2]
        ref.train(was_training)
    return out


@torch.no_grad()
def sample_completions(model, tok, conversations, samples, max_new_tokens, temperature, seed, info=None,
                       autocast_factory=None):
    """[[(completion ids, text, stopped)] * samples] per conversation's prompt (a message list),
    sampled in fixed chunks of 8 prompts shared out over the ranks, the chunk at i seeded by
    seed + i: the same samples at any world size. text leaves out the closing <|assistant_end|>."""
    engine, stop = Engine(model, tok), tok.token_id("<|assistant_end|>")

    def chunk(i):
        prompts = [tok.render_prompt({"messages": m}) for m in conversations[i:i + 8]]
        with autocast(autocast_factory):
            gen = engine.generate(prompts, max_new_tokens, temperature=temperature, seed=seed + i,
                                  num_samples=samples)
        out = [[] for _ in prompts]
        for r, toks in enumerate(gen.tokens):
            out[gen.prompt_index[r]].append((toks, tok.decode(toks[:-1] if toks and toks[-1] == stop else toks),
                                             gen.stopped[r]))
        return out

    return [rows for part in map_over_ranks(chunk, list(range(0, len(conversations), 8)), info) for rows in part]


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
    Model without adapters (full fine-tuning): a frozen copy made now; "base" has no meaning.
    """
    if kind not in REFERENCES:
        raise ValueError(f"the reference must be one of {', '.join(REFERENCES)}, got {kind!r}")
    model = unwrap(model)
    if lora.lora_modules(model):
        fresh = all(bool((m.lora_B == 0).all()) for _, m in lora.lora_modules(model))
        if kind == "base" or fresh:
            return lambda: lora.disable_adapters(model)
        snapshot = {k: v.detach().clone() for k, v in lora.lora_state_dict(model).items()}
        return lambda: swapped_adapters(model, snapshot)
    if kind == "base":
        raise ValueError("a base reference needs LoRA adapters (the base is the model with them off)")
    frozen = copy.deepcopy(model).eval()
    for p in frozen.parameters():
        p.requires_grad_(False)
    return lambda: nullcontext(frozen)
