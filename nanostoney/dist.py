"""Process setup: one code path for a laptop, one GPU, 8 GPUs, and several nodes.

torchrun tells each process who it is through RANK / LOCAL_RANK / WORLD_SIZE (and
MASTER_ADDR / MASTER_PORT for the rendezvous). When those are absent we are a plain single
process and never touch torch.distributed, so a laptop run needs no network setup at all.

    info = init_dist()
    with autocast_ctx(info):
        loss = model(x, y)
    print0(f"loss {loss.item():.3f}")
    cleanup()
"""
import os
from contextlib import nullcontext
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass
class DistInfo:
    rank: int                  # global rank, 0..world_size-1
    local_rank: int            # rank within this node; picks the GPU
    world_size: int
    device: torch.device
    is_master: bool            # rank 0: the only process that prints, logs and saves
    autocast_dtype: torch.dtype | None  # bf16 on CUDA; None = plain fp32

    @property
    def is_distributed(self):
        return self.world_size > 1

    @property
    def device_type(self):
        return self.device.type


def _env_int(name, default):
    value = os.environ.get(name)
    return int(value) if value not in (None, "") else default


def pick_device(device=None, local_rank=0):
    """"auto"/None: cuda:local_rank if there is a GPU, else mps (single process), else cpu."""
    if device not in (None, "", "auto"):
        device = torch.device(device)
        if device.type == "cuda" and device.index is None:
            device = torch.device("cuda", local_rank)
        return device
    if torch.cuda.is_available():
        return torch.device("cuda", local_rank)
    mps = getattr(torch.backends, "mps", None)
    if mps is not None and mps.is_available() and _env_int("WORLD_SIZE", 1) == 1:
        return torch.device("mps")  # no multi-process backend for mps: single process only
    return torch.device("cpu")


def init_dist(device=None, seed=None):
    """Join the torchrun process group if there is one; pick device and dtype.

    device: None/"auto", or "cpu", "cuda", "mps" to force one. NCCL on CUDA, gloo otherwise.
    seed: optional; seeds torch on every rank with the same value (so weights init alike).
    """
    rank = _env_int("RANK", 0)
    local_rank = _env_int("LOCAL_RANK", 0)
    world_size = _env_int("WORLD_SIZE", 1)
    device = pick_device(device, local_rank)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    if world_size > 1 and not dist.is_initialized():
        if device.type == "cuda":
            # device_id binds this rank to its GPU up front (no guessing inside NCCL).
            dist.init_process_group(backend="nccl", device_id=device)
        else:
            dist.init_process_group(backend="gloo")
    # bf16 autocast on CUDA: matmuls in bf16, master weights and optimizer state stay fp32.
    # On CPU/mps we keep fp32: CPU bf16 is slow on most chips and the point there is testing.
    autocast_dtype = torch.bfloat16 if device.type == "cuda" else None
    if seed is not None:
        torch.manual_seed(seed)
    return DistInfo(rank=rank, local_rank=local_rank, world_size=world_size, device=device,
                    is_master=rank == 0, autocast_dtype=autocast_dtype)


def autocast_ctx(info):
    """The mixed-precision context for forward passes (a no-op in fp32)."""
    if info.autocast_dtype is None:
        return nullcontext()
    return torch.autocast(device_type=info.device.type, dtype=info.autocast_dtype)


def get_rank():
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank()
    return _env_int("RANK", 0)


def is_master():
    return get_rank() == 0


def print0(*args, **kwargs):
    """print on rank 0 only, so an 8-GPU run does not print every line eight times."""
    if is_master():
        print(*args, **kwargs)


# -----------------------------------------------------------------------------
# collectives: every rank calls them the same number of times; in one process they are
# identities, so callers never branch on the world size.

def _grouped():
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def _reduce_device():
    return torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")


def all_reduce_sum(x):
    """Sum over ranks: a tensor (in place, returned) or a list of floats (a new list, summed in
    float64)."""
    if isinstance(x, torch.Tensor):
        if _grouped():
            dist.all_reduce(x)
        return x
    t = torch.tensor(x, dtype=torch.float64)
    if _grouped():
        t = t.to(_reduce_device())
        dist.all_reduce(t)
    return t.tolist()


def all_reduce_mean(x):
    """Mean over ranks: a tensor (in place, returned), a float, or a dict of floats (the same
    keys on every rank; one collective for all of them)."""
    if not _grouped():
        return x
    n = dist.get_world_size()
    if isinstance(x, torch.Tensor):
        dist.all_reduce(x)
        return x.div_(n)
    if isinstance(x, dict):
        keys = sorted(x)
        return dict(zip(keys, (v / n for v in all_reduce_sum([float(x[k]) for k in keys]))))
    return all_reduce_sum([float(x)])[0] / n


def sync_grads(params):
    """Sum gradients over ranks (one flat all-reduce), for models trained without a DDP wrapper
    (GRPO: its forward is trunk + gathered logits, not forward()). A parameter without a
    gradient on this rank counts as zero."""
    if not _grouped():
        return
    grads = []
    for p in params:
        if p.grad is None:
            p.grad = torch.zeros_like(p)
        grads.append(p.grad)
    flat = torch.cat([g.reshape(-1) for g in grads])
    dist.all_reduce(flat)
    i = 0
    for g in grads:
        g.copy_(flat[i:i + g.numel()].view_as(g))
        i += g.numel()


def gather_lists(items):
    """Every rank's list concatenated in rank order, on every rank."""
    if not _grouped():
        return items
    parts = [None] * dist.get_world_size()
    dist.all_gather_object(parts, items)
    return [x for part in parts for x in part]


def barrier():
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def cleanup():
    """Leave the process group (torchrun otherwise warns about a leaked group at exit)."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
