"""Process setup: one code path for a laptop, one GPU, 8 GPUs, and several nodes. Without
torchrun's RANK / LOCAL_RANK / WORLD_SIZE we are a plain single process and never touch
torch.distributed; the collectives below are then identities, so callers never branch on it.

    info = init_dist()
    with autocast_ctx(info):
        loss = model(x, y)
"""
import hashlib
import json
import os
import socket
import subprocess
import time
from contextlib import nullcontext
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist

from nanostoney.errors import UserError

# Rank 0 alone may work for many minutes while the others wait in a collective (eval's MAUVE
# bootstraps, the report, writing a large checkpoint): NCCL's default 10 minutes would kill the run.
GROUP_TIMEOUT = timedelta(hours=1)


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


def _env_int(name, default):
    return int(os.environ.get(name) or default)


def _nvidia_smi(*args):
    """nvidia-smi's output, or None when it is missing or fails."""
    try:
        r = subprocess.run(["nvidia-smi", *args], capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.SubprocessError):
        return None
    return r.stdout if r.returncode == 0 else None


def check_gpus_usable():
    """Stop (UserError) when GPUs are visible but torch cannot use them (usually a driver older than
    torch's CUDA): a CPU fallback would run 8 slow CPU ranks on an 8-GPU node without a word."""
    if torch.cuda.is_available():
        return
    ids = os.environ.get("CUDA_VISIBLE_DEVICES")  # set empty, it hides every GPU
    if ids is None:
        gpus = [line for line in (_nvidia_smi("-L") or "").splitlines() if line.startswith("GPU")]
    else:
        gpus = [] if ids.strip() in ("", "-1", "none", "NoDevFiles") else ids.strip().split(",")
    if not gpus:
        return
    driver = (_nvidia_smi("--query-gpu=driver_version", "--format=csv,noheader") or "").split()
    driver = f"NVIDIA driver {driver[0]}" if driver else "an NVIDIA driver nvidia-smi could not report"
    built = f"CUDA {torch.version.cuda}" if torch.version.cuda else "no CUDA (a CPU-only build)"
    raise UserError(f"{len(gpus)} GPU(s) are visible but torch {torch.__version__}, built for {built}, cannot "
                    f"use them with {driver}; install a driver for {built} (docs/RUNNING.md, GPUs), or run on CPU "
                    f"on purpose with --device cpu or CUDA_VISIBLE_DEVICES=.")


def pick_device(device=None, local_rank=0):
    """"auto"/None: cuda:local_rank if there is a usable GPU, else mps (single process), else cpu."""
    if device not in (None, "", "auto"):
        device = torch.device(device)
        if device.type == "cuda" and device.index is None:
            device = torch.device("cuda", local_rank)
        return device
    if torch.cuda.is_available():
        return torch.device("cuda", local_rank)
    check_gpus_usable()
    mps = getattr(torch.backends, "mps", None)
    if mps is not None and mps.is_available() and _env_int("WORLD_SIZE", 1) == 1:
        return torch.device("mps")  # no multi-process backend for mps: single process only
    return torch.device("cpu")


def init_dist(device=None, seed=None):
    """Join the torchrun process group if there is one (NCCL on CUDA, gloo otherwise); pick device
    (pick_device) and dtype. seed: seeds torch alike on every rank (so weights init alike)."""
    rank = _env_int("RANK", 0)
    local_rank = _env_int("LOCAL_RANK", 0)
    world_size = _env_int("WORLD_SIZE", 1)
    # before the first CUDA allocation: segments that grow instead of fragmenting (as nanochat and the memory plan)
    os.environ.setdefault("PYTORCH_CUDA_ALLOC_CONF", "expandable_segments:True")
    device = pick_device(device, local_rank)
    if device.type == "cuda":
        torch.cuda.set_device(device)
        torch.backends.cuda.matmul.allow_tf32 = True  # fp32 matmuls (outside autocast) on tensor cores
        torch.backends.cudnn.allow_tf32 = True
    if world_size > 1 and not dist.is_initialized():
        if device.type == "cuda":  # device_id binds this rank to its GPU up front
            dist.init_process_group(backend="nccl", device_id=device, timeout=GROUP_TIMEOUT)
        else:
            dist.init_process_group(backend="gloo", timeout=GROUP_TIMEOUT)
    if seed is not None:
        torch.manual_seed(seed)
    # bf16 autocast on CUDA (master weights and optimizer state stay fp32); fp32 elsewhere: CPU bf16
    # is slow on most chips and the point there is testing
    return DistInfo(rank=rank, local_rank=local_rank, world_size=world_size, device=device, is_master=rank == 0,
                    autocast_dtype=torch.bfloat16 if device.type == "cuda" else None)


def autocast_ctx(info):
    """The mixed-precision context for forward passes (a no-op in fp32)."""
    return nullcontext() if info.autocast_dtype is None else torch.autocast(info.device.type, info.autocast_dtype)


def get_rank():
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else _env_int("RANK", 0)


def print0(*args, **kwargs):
    """print on rank 0 only, so an 8-GPU run does not print every line eight times."""
    if get_rank() == 0:
        print(*args, **kwargs)


# collectives: every rank calls them the same number of times
def _grouped():
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def all_reduce_sum(x):
    """Sum over ranks: a tensor (in place, returned) or a list of floats (a new list, in float64)."""
    if isinstance(x, torch.Tensor):
        if _grouped():
            dist.all_reduce(x)
        return x
    t = torch.tensor(x, dtype=torch.float64)
    if _grouped():
        t = t.to(torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else "cpu")
        dist.all_reduce(t)
    return t.tolist()


def all_reduce_mean(x):
    """Mean over ranks: a tensor (in place, returned), a float, or a dict of floats (one collective)."""
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
    """Sum gradients over ranks (one flat all-reduce) for models trained without a DDP wrapper (GRPO's
    forward is trunk + gathered logits); a parameter without a gradient on this rank counts as zero."""
    if not _grouped():
        return
    grads = []
    for p in params:
        if p.grad is None:
            p.grad = torch.zeros_like(p)
        grads.append(p.grad)
    flat = torch.cat([g.reshape(-1) for g in grads])
    dist.all_reduce(flat)
    for g, summed in zip(grads, flat.split([g.numel() for g in grads])):
        g.copy_(summed.view_as(g))


def gather_lists(items):
    """Every rank's list concatenated in rank order, on every rank."""
    if not _grouped():
        return items
    parts = [None] * dist.get_world_size()
    dist.all_gather_object(parts, items)
    return [x for part in parts for x in part]


def map_over_ranks(fn, items, info=None, wrap=None):
    """[fn(x) for x in items] on every rank, rank r computing items r, r + world, ... (the same at any
    world size when fn(x) depends only on x); wrap: e.g. a progress bar around this rank's indices."""
    rank, world = (info.rank, info.world_size) if info else (get_rank(), dist.get_world_size() if _grouped() else 1)
    idx = range(rank, len(items), world)
    mine = [(i, fn(items[i])) for i in (wrap(idx) if wrap is not None else idx)]
    if world > 1:  # (world 1 inside a group: one rank working alone, e.g. rank 0's samples)
        mine = sorted(gather_lists(mine), key=lambda pair: pair[0])
    return [r for _, r in mine]


def check_shared(paths):
    """Every rank raises the same one-sentence UserError when a rank misses a path ({flag: path}) that
    rank 0 sees: checkpoints, tokenizers and outputs must sit on a filesystem every node mounts."""
    if not _grouped():
        return
    paths = {k: v for k, v in paths.items() if v}
    seen = [os.path.exists(v) for v in paths.values()]
    everyone = gather_lists([(get_rank(), socket.gethostname(), seen)])
    for rank, host, mine in everyone:
        for (flag, path), on_rank0, here in zip(paths.items(), everyone[0][2], mine):
            if on_rank0 and not here:
                raise UserError(f"rank {rank} on {host} cannot see {flag} {path}, which rank 0 sees; put "
                                f"checkpoints and outputs on a filesystem shared by every node, at the same "
                                f"path (docs/RUNNING.md, several nodes).")


def check_same_inputs(files=(), tokenizer=None):
    """Every rank raises the same one-sentence UserError unless all read the same corpus files (by
    folder, name and size; what is not a file is skipped) and tokenizer (by a hash of its vocabulary,
    merges and specials): nodes holding other data would skip or repeat data without a word."""
    if not _grouped():
        return
    # a file goes by its folder and name: nodes may keep a clone or a cache under different roots
    listing = sorted((os.path.join(*os.path.normpath(f).split(os.sep)[-2:]), os.path.getsize(f))
                     for f in set(files) if os.path.isfile(f))
    mine = {"corpus": _digest(listing), "size": f"{len(listing)} files of {sum(n for _, n in listing):,} bytes",
            "tokenizer": tokenizer and _digest(_tokenizer_spec(tokenizer)), "vocab": tokenizer and tokenizer.vocab_size}
    everyone = gather_lists([(get_rank(), socket.gethostname(), mine)])
    ref, host0 = everyone[0][2], everyone[0][1]
    odd = [(r, host, fp) for r, host, fp in everyone if fp != ref]
    if not odd:
        return
    corpus_odd = [r for r, _, fp in odd if fp["corpus"] != ref["corpus"]]
    what = []
    if corpus_odd:  # (every rank sees the same odd list, so every rank gathers)
        r, listings = corpus_odd[0], gather_lists([listing])
        what.append(f"a different corpus ({_first_difference(listings[0], listings[r], r)}; rank {r} reads "
                    f"{everyone[r][2]['size']}, rank 0 {ref['size']})")
    tok_odd = [(r, fp) for r, _, fp in odd if fp["tokenizer"] != ref["tokenizer"]]
    if tok_odd:
        r, fp = tok_odd[0]
        what.append(f"a different tokenizer (on rank {r} its vocabulary, merges and specials hash to "
                    f"{fp['tokenizer']}, {fp['vocab']} tokens; on rank 0 to {ref['tokenizer']}, {ref['vocab']} tokens)")
    ranks = ", ".join(f"{r} on {host}" for r, host, _ in odd)
    cleanup()  # every rank is here: leave the group together (a rank exiting inside it can abort gloo)
    if _env_int("LOCAL_RANK", 0) != 0:  # each node's local rank 0 says it (cli._say) before torchrun, seeing
        time.sleep(5)                    # the first rank exit, stops the node's other ranks
    raise UserError(f"rank{'s' if len(odd) > 1 else ''} {ranks} read{'' if len(odd) > 1 else 's'} "
                    f"{' and '.join(what)} from rank 0 on {host0}; give every node the same corpus files "
                    f"(the same download_corpus flags, the same data/) and the same tokenizer.")


def _digest(x):
    return hashlib.sha256(json.dumps(x, sort_keys=True).encode()).hexdigest()[:12]


def _tokenizer_spec(tokenizer):
    """What makes a tokenizer's ids (not its JSON layout, which a `tokenizers` release may change)."""
    spec = json.loads(tokenizer.hf.to_str())
    return [spec["model"].get("vocab"), spec["model"].get("merges"),
            sorted((t["id"], t["content"]) for t in spec.get("added_tokens", []))]


def _first_difference(ref, other, rank):
    """The first file, by name, where rank `rank`'s (name, bytes) list differs from rank 0's."""
    a, b = dict(ref), dict(other)
    for name in sorted(set(a) | set(b)):
        if name not in b:
            return f"rank {rank} lacks {name}"
        if name not in a:
            return f"rank {rank} has {name}, which rank 0 lacks"
        if a[name] != b[name]:
            return f"rank {rank}'s {name} is {b[name]:,} bytes, rank 0's {a[name]:,}"
    return f"rank {rank} has files of the same names and sizes, some twice"


def barrier():
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def local_rank_0_first(fn, info):
    """fn() on each node's local rank 0 (filling the cache), then on the other ranks (finding it)."""
    if info.local_rank == 0:
        out = fn()
    barrier()
    return out if info.local_rank == 0 else fn()


def cleanup():
    """Leave the process group (torchrun warns about a leaked one) once every rank is here, then
    give the GIL away a moment: gloo's worker thread needs it to free the last collectives' tensors,
    while DDP's reducer, freed later on the main thread holding it, joins that thread (a deadlock)."""
    if dist.is_available() and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()
        time.sleep(0.2)
