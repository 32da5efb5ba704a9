"""The policy's log-probs of completions and the reference policy it is held near: what GRPO, DPO
and the letter diagnostics share. A row is (prompt ids, completion ids).

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
    """Right-padded (idx (B, T), pos (B, L), targets (B, L), mask (B, L), valid (B, T)); right padding
    needs no attention mask, as no real token of a causal model sees the pads after it."""
    B = len(prompts)
    seqs = [list(p) + list(c)[:-1] for p, c in zip(prompts, completions)]
    T = max(len(s) for s in seqs)
    L = max(1, max(len(c) for c in completions))
    idx = torch.zeros(B, T, dtype=torch.long)
    pos, targets, mask = (torch.zeros(B, L, dtype=torch.long) for _ in range(3))
    for r, (p, c, s) in enumerate(zip(prompts, completions, seqs)):
        idx[r, :len(s)] = torch.tensor(s, dtype=torch.long)
        if c:
            targets[r, :len(c)] = torch.tensor(c, dtype=torch.long)
            mask[r, :len(c)] = 1
        # token j of the completion is predicted at position len(p) - 1 + j; pads point at a
        # valid position and are masked out
        pos[r] = (len(p) - 1 + torch.arange(L)).clamp(max=T - 1)
    valid = torch.arange(T)[None, :] < torch.tensor([len(s) for s in seqs])[:, None]
    return idx.to(device), pos.to(device), targets.to(device), mask.to(device), valid.to(device)


def completion_logits(model, idx, pos):
    """Logits (B, L, V) at the positions `pos` only: the prompt never goes through lm_head."""
    h = model.trunk(idx)
    h = h.gather(1, pos[..., None].expand(-1, -1, h.size(-1)))
    return model.lm_logits(h)


def token_logprobs(model, idx, pos, targets, with_entropy=False):
    """(log p(completion token) (B, L), the next-token entropy there (B, L) if asked else None)."""
    logp_all = torch.log_softmax(completion_logits(model, idx, pos), -1)
    logp = logp_all.gather(-1, targets[..., None]).squeeze(-1)
    token_entropy = -(logp_all.exp() * logp_all).sum(-1) if with_entropy else None
    return logp, token_entropy


def sequence_logps(model, prompts, completions, device, autocast_factory=None, attn_entropy=None):
    """(summed completion log-probs (B,), per-token log-probs (B, L), mask (B, L)) in one forward."""
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
    """[[(completion ids, text without <|assistant_end|>, stopped)] * samples] per conversation's
    prompt, in chunks of 8 over the ranks, chunk i seeded by seed + i: the same at any world size."""
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
    saved = {k: v.detach().clone() for k, v in lora.lora_state_dict(model).items()}
    lora.load_adapter_state(model, snapshot)
    try:
        yield model
    finally:
        lora.load_adapter_state(model, saved)


def make_reference(model, kind="init"):
    """A callable giving a context yielding the reference: with LoRA the adapters off ("base", or fresh) or
    a snapshot of today's swapped in ("init"); without, a frozen copy made now."""
    assert kind in REFERENCES, f"the reference is one of {', '.join(REFERENCES)}, got {kind!r}"
    model = unwrap(model)
    if lora.lora_modules(model):
        fresh = all(bool((m.lora_B == 0).all()) for _, m in lora.lora_modules(model))
        if kind == "base" or fresh:
            return lambda: lora.disable_adapters(model)
        snapshot = {k: v.detach().clone() for k, v in lora.lora_state_dict(model).items()}
        return lambda: swapped_adapters(model, snapshot)
    assert kind == "init", "a base reference needs LoRA adapters (the base is the model with them off)"
    frozen = copy.deepcopy(model).eval()
    for p in frozen.parameters():
        p.requires_grad_(False)
    return lambda: nullcontext(frozen)
