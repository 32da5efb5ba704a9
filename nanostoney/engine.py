"""KV cache and batched sampling: the rollout engine for chat, evaluation and GRPO.

    out = Engine(model, tokenizer).generate(prompts, max_new_tokens=256, temperature=1.0, seed=0, num_samples=4)
    out.tokens[r]       completion ids of row r (the stop token included if hit); rows are prompt-major
    out.ids, out.mask   the same padded with 0 (R, L), and 1 on real tokens
    out.logprobs        (R, L) log p(token) of the plain model at temperature 1, whatever temperature,
                        top_k or top_p drew the sample: what GRPO's ratio and KL need
    out.prompt_index, out.stopped

Exact batching: prompts are left-padded, and the model gives a row's first real token rotary
position 0 and hides the pad keys, so a row decodes as it would alone. Each prompt is prefilled once.
use_cache=False recomputes every step without cache or padding: the tests' reference.
"""
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from nanostoney.errors import UserError
from nanostoney.gpt import unwrap


class KVCache:
    """Keys and values of every layer for B rows in max_len slots. pos: slots filled (all rows);
    pad: None or (B,) left-padding slots per row. The model inserts per layer and advances pos."""

    def __init__(self, n_layer, batch_size, n_kv_head, head_dim, max_len, pad=None):
        self.shape = (n_layer, 2, batch_size, n_kv_head, max_len, head_dim)
        self.kv = None  # allocated at the first insert, in the dtype the model produces
        self.pos = 0
        self.pad = pad

    def insert(self, layer, k, v):
        if self.kv is None:
            self.kv = torch.zeros(self.shape, dtype=k.dtype, device=k.device)
        t0, t1 = self.pos, self.pos + k.size(2)
        assert t1 <= self.shape[4], f"KV cache full: {t1} > {self.shape[4]} slots"
        self.kv[layer, 0, :, :, t0:t1] = k
        self.kv[layer, 1, :, :, t0:t1] = v
        return self.kv[layer, 0, :, :, :t1], self.kv[layer, 1, :, :, :t1]

    def repeat_rows(self, n):
        """Each row becomes n consecutive rows (prefill once, then sample n times)."""
        if n == 1:
            return self
        out = KVCache(self.shape[0], self.shape[2] * n, self.shape[3], self.shape[5], self.shape[4],
                      pad=None if self.pad is None else self.pad.repeat_interleave(n))
        out.pos = self.pos
        out.kv = None if self.kv is None else self.kv.repeat_interleave(n, dim=2)
        return out


@dataclass
class Generation:
    tokens: list
    ids: torch.Tensor
    mask: torch.Tensor
    logprobs: torch.Tensor
    prompt_index: list
    stopped: list


def sample_next(logits, temperature=1.0, top_k=None, top_p=None, generator=None):
    """logits (R, V) float32 -> next ids (R,). temperature 0 = argmax. top_k keeps the k most
    likely tokens; top_p keeps the smallest set whose probability reaches p (at least one)."""
    if temperature == 0:
        return logits.argmax(-1)
    logits = logits / temperature
    if top_k is not None and top_k < logits.size(-1):
        kth = torch.topk(logits, top_k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None and top_p < 1.0:
        sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
        probs = F.softmax(sorted_logits, dim=-1)
        # drop a token when the tokens ranked above it already reach top_p
        drop = probs.cumsum(-1) - probs >= top_p
        drop[:, 0] = False
        sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
        logits = torch.full_like(logits, float("-inf")).scatter(-1, order, sorted_logits)
    probs = F.softmax(logits, dim=-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


class Engine:
    def __init__(self, model, tokenizer=None, stop_ids=None):
        self.model = unwrap(model)
        if stop_ids is None and tokenizer is not None:
            stop_ids = [tokenizer.token_id("<|assistant_end|>"), tokenizer.token_id("<|bos|>")]
        self.stop_ids = list(stop_ids or [])

    @torch.inference_mode()
    def generate(self, prompts, max_new_tokens, temperature=1.0, top_k=None, top_p=None,
                 seed=0, num_samples=1, stop_ids=None, use_cache=True):
        if not prompts or any(len(p) == 0 for p in prompts):
            raise UserError("generate() needs at least one prompt and no empty prompt; "
                            "start each prompt with <|bos|>.")
        model, device = self.model, self.model.get_device()
        longest = max(len(p) for p in prompts) + max_new_tokens
        if longest > model.cos.size(1):
            raise UserError(f"prompt plus max_new_tokens is {longest} tokens, more than the "
                            f"model's {model.cos.size(1)} rotary positions; shorten the prompt "
                            f"or lower max_new_tokens.")
        stop = torch.tensor(self.stop_ids if stop_ids is None else list(stop_ids),
                            dtype=torch.long, device=device)
        gen = torch.Generator(device=device).manual_seed(seed)
        R = len(prompts) * num_samples
        ids = torch.zeros(R, max_new_tokens, dtype=torch.long, device=device)
        logp = torch.zeros(R, max_new_tokens, dtype=torch.float32, device=device)
        alive = torch.ones(R, dtype=torch.bool, device=device)
        mask = torch.zeros(R, max_new_tokens, dtype=torch.long, device=device)
        steps = (self._cached_steps if use_cache else self._uncached_steps)(prompts, num_samples, max_new_tokens)
        logits = next(steps)
        n = 0
        for t in range(max_new_tokens):
            nxt = sample_next(logits, temperature, top_k, top_p, gen)
            ids[:, t] = nxt
            logp[:, t] = torch.log_softmax(logits, -1).gather(-1, nxt[:, None]).squeeze(-1)
            mask[:, t] = alive.long()
            alive &= ~torch.isin(nxt, stop)
            n = t + 1
            if not alive.any() or t == max_new_tokens - 1:
                break
            logits = steps.send(nxt)
        steps.close()
        ids, mask, logp = ids[:, :n], mask[:, :n], logp[:, :n]
        lengths = mask.sum(1).tolist()
        tokens = [ids[r, :lengths[r]].tolist() for r in range(R)]
        L = max(lengths)
        return Generation(tokens=tokens, ids=(ids * mask)[:, :L], mask=mask[:, :L],
                          logprobs=(logp * mask)[:, :L],
                          prompt_index=[r // num_samples for r in range(R)],
                          stopped=(~alive).tolist())

    def _cached_steps(self, prompts, num_samples, max_new_tokens):
        """Coroutine: yields last-position logits (R, V); receives the next ids (R,)."""
        model, device, c = self.model, self.model.get_device(), self.model.config
        T = max(len(p) for p in prompts)
        pad = torch.tensor([T - len(p) for p in prompts], dtype=torch.long, device=device)
        batch = torch.tensor([[0] * (T - len(p)) + list(p) for p in prompts], device=device)
        cache = KVCache(c.n_layer, len(prompts), c.n_kv_head, c.n_embd // c.n_head,
                        T + max_new_tokens, pad=pad if pad.any() else None)
        x = model.trunk(batch, cache)
        logits = model.lm_logits(x[:, -1]).repeat_interleave(num_samples, 0)
        cache = cache.repeat_rows(num_samples)
        while True:
            nxt = yield logits
            logits = model.lm_logits(model.trunk(nxt[:, None], cache)[:, -1])

    def _uncached_steps(self, prompts, num_samples, max_new_tokens):
        model, device = self.model, self.model.get_device()
        seqs = [torch.tensor(p, device=device) for p in prompts for _ in range(num_samples)]
        groups = {}  # rows of equal length advance together, so they can share a batch
        for r, s in enumerate(seqs):
            groups.setdefault(len(s), []).append(r)
        while True:
            logits = torch.empty(len(seqs), model.config.vocab_size, device=device)
            for members in groups.values():
                batch = torch.stack([seqs[r] for r in members])
                logits[members] = model.lm_logits(model.trunk(batch)[:, -1])
            nxt = yield logits
            seqs = [torch.cat([s, nxt[r:r + 1]]) for r, s in enumerate(seqs)]
