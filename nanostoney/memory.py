"""Peak memory of one training step on one device (at the start of its backward), estimated up front:

    plan = estimate(model, rows=16, seq_len=2048, device=torch.device("cuda"), compiled=True)
    plan, smaller, cap = check_fits(plan_for, rows, device)   # smaller: a --device-batch-size that fits

The fp32 eager constants were counted with autograd's saved-tensor hooks and are checked against
a measured CPU peak (tests/test_memory.py); eager bf16 likewise under CPU autocast; compiled
assumes bf16 matmul inputs and residual, recomputed pointwise ops and a fused soft-capped
cross-entropy. bench/gpu_check.sh measures the real peak on a GPU.
"""
import math
import os
from dataclasses import dataclass

import torch

GB = 1e9
# (dtype on the device, compiled?) -> bytes per token per layer per channel / per token per vocab entry
ACT_BYTES = {("fp32", False): 76, ("bf16", False): 46, ("bf16", True): 34}
LOGIT_BYTES = {("fp32", False): 24, ("bf16", False): 26, ("bf16", True): 8}
RESERVE = 0.9  # of a device's memory a plan may use: the allocator, CUDA context, NCCL buffers


@dataclass
class MemoryPlan:
    weights: float
    gradients: float
    optimizer: float
    activations: float
    logits: float

    @property
    def total(self):
        return sum(vars(self).values())

    def describe(self):
        parts = ", ".join(f"{k} {v / GB:.2f}" for k, v in vars(self).items())
        return f"memory plan: ~{self.total / GB:.2f} GB per device ({parts} GB)"


def estimate(model, rows, seq_len, device, compiled=False, optimizer="adamw", lm_head=True):
    """A MemoryPlan for a step of `rows` rows of `seq_len` tokens, bf16 autocast on CUDA (as init_dist);
    parameters count in their own dtype. lm_head=False: the loss reads the trunk (the reward model)."""
    bf16 = torch.device(device).type == "cuda"
    key = ("bf16" if bf16 else "fp32", bool(compiled and bf16))
    c, tokens = model.config, rows * seq_len
    named = list(model.named_parameters())
    # every 2-D weight but the embedding is a matmul operand (autocast copies it); Muon keeps one
    # momentum for the block matrices, AdamW two moments for everything else
    matmul = [p for n, p in named if p.ndim == 2 and not n.startswith("transformer.wte")]
    block = {id(p) for n, p in named if p.ndim == 2 and n.startswith("transformer.h")}
    weights = sum(p.numel() * p.element_size() for _, p in named)
    weights += 2 * sum(p.numel() for p in matmul) if bf16 else 0
    trainable = [p for _, p in named if p.requires_grad]
    gradients = sum(p.numel() * p.element_size() for p in trainable)
    states = sum(p.numel() * p.element_size() * (1 if optimizer == "muon" and id(p) in block else 2) for p in trainable)
    # and, at the backward's peak, the gradients of one layer's MLP (two 4x-wide tensors)
    activations = tokens * c.n_embd * (c.n_layer * ACT_BYTES[key] + 8 * (2 if bf16 else 4))
    logits = tokens * c.vocab_size * LOGIT_BYTES[key] if lm_head else 0
    return MemoryPlan(weights, gradients, states, activations, logits)


def capacity(device, local_world_size=1):
    """Bytes one process may use: the GPU's memory; on CPU the machine's, shared by this node's processes."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).total_memory
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / max(1, local_world_size)
    except (ValueError, OSError, AttributeError):
        return None


def check_fits(plan_for, rows, device, local_world_size=1):
    """(plan at `rows` rows, False when it fits else the largest smaller batch that divides `rows`
    (accumulation keeps the global batch) and fits, or None; the capacity). plan_for(rows) -> MemoryPlan."""
    cap, plan = capacity(device, local_world_size), plan_for(rows)
    if cap is None or plan.total <= RESERVE * cap:
        return plan, False, cap
    divisors = {d for i in range(1, math.isqrt(rows) + 1) if rows % i == 0 for d in (i, rows // i)} - {rows}
    return plan, next((r for r in sorted(divisors, reverse=True) if plan_for(r).total <= RESERVE * cap), None), cap
