"""Peak memory of one training step on one device, estimated before any work is done.

    plan = estimate(model, rows=16, seq_len=2048, device=torch.device("cuda"), compiled=True)
    print0(plan.describe())                      # "memory plan: ~41.3 GB per device (weights ...)"
    plan, smaller, cap = check_fits(plan_for, rows, device)   # smaller: a --device-batch-size that fits

The peak of a step is at the start of the backward: every weight, gradient (DDP's buckets with
gradient_as_bucket_view, allocated for the whole run) and optimizer state, plus every activation
the forward saved for the backward, plus the logits and their gradient. Its parts:
- weights: each parameter in its dtype, plus under bf16 autocast the bf16 copy of every matrix that
  autocast makes for the forward and keeps for the backward.
- gradients: one per trainable parameter, in its dtype.
- optimizer: AdamW two moments per trainable parameter; Muon one momentum per matrix.
- activations: ACT_BYTES bytes per token, per layer, per channel of width, and the gradients of one
  layer's MLP while its backward runs.
- logits: LOGIT_BYTES bytes per token per vocabulary entry, at the peak of the loss's backward
  (fp32 eager: the logits, tanh output, log-softmax output and three gradients of that size).

The fp32 eager constants (CPU) were counted from the tensors the forward saves (autograd's
saved-tensor hooks) and are checked against a measured CPU peak in tests/test_memory.py. The bf16
ones cannot be measured without a GPU: eager autocast was counted the same way under CPU autocast
(fp32 norm inputs and rotary outputs, bf16 matmul inputs); compiled assumes the compiler keeps every
matmul input and the residual in bf16 and recomputes the pointwise ops (17 channels a layer), and
fuses the soft-capped cross-entropy so the logits cost their bf16 value, one fp32 temporary and their
bf16 gradient. bench/gpu_check.sh measures the real peak on a GPU.
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
        return self.weights + self.gradients + self.optimizer + self.activations + self.logits

    def describe(self):
        parts = ", ".join(f"{k} {getattr(self, k) / GB:.2f}" for k in
                          ("weights", "gradients", "optimizer", "activations", "logits"))
        return f"memory plan: ~{self.total / GB:.2f} GB per device ({parts} GB)"


def estimate(model, rows, seq_len, device, compiled=False, optimizer="adamw", bf16=None, lm_head=True):
    """A MemoryPlan for a training step of `rows` rows of `seq_len` tokens on one device.
    lm_head=False: the loss reads the trunk, not the vocabulary logits (the reward model).
    bf16: autocast in bf16 (default: on CUDA, as dist.init_dist picks); the model's parameters are
    counted in the dtype they have (a bf16 embedding on CUDA: train.place)."""
    device = torch.device(device)
    bf16 = device.type == "cuda" if bf16 is None else bf16
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
    one = optimizer == "muon"
    states = sum(p.numel() * p.element_size() * (1 if one and id(p) in block else 2) for p in trainable)
    # and, at the backward's peak, the gradients of one layer's MLP (two 4x-wide tensors)
    activations = tokens * c.n_embd * (c.n_layer * ACT_BYTES[key] + 8 * (2 if bf16 else 4))
    logits = tokens * c.vocab_size * LOGIT_BYTES[key] if lm_head else 0
    return MemoryPlan(weights, gradients, states, activations, logits)


def capacity(device, local_world_size=1):
    """Bytes one process may use on `device`: the GPU's total memory; on CPU the machine's
    physical memory shared by the processes of this node."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).total_memory
    try:
        total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return None
    return total / max(1, local_world_size)


def fitting_batch(plan_for, rows, fits):
    """The largest device batch below `rows` that divides it (so accumulation keeps the global
    batch) and whose plan fits; None when not even one row fits. plan_for(rows) -> MemoryPlan."""
    divisors = {d for i in range(1, math.isqrt(rows) + 1) if rows % i == 0 for d in (i, rows // i)} - {rows}
    return next((r for r in sorted(divisors, reverse=True) if fits(plan_for(r))), None)


def check_fits(plan_for, rows, device, local_world_size=1):
    """(plan at `rows` rows, False when it fits else the largest fitting smaller batch or None,
    the capacity in bytes). plan_for(rows) -> MemoryPlan."""
    cap = capacity(device, local_world_size)
    plan = plan_for(rows)
    if cap is None or plan.total <= RESERVE * cap:
        return plan, False, cap
    return plan, fitting_batch(plan_for, rows, lambda p: p.total <= RESERVE * cap), cap
