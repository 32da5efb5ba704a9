"""The training loop and its parts, shared by scripts/base_train.py and scripts/sft_train.py.

    optimizer = build_optimizer(model, "adamw")         # or "muon": Muon for matrices + AdamW
    accum = grad_accum_steps(total_batch, device_batch, seq_len, world_size)
    train_loop(info, model, optimizer, args, get_batch, ...)          # the step loop

What lives here and why:
- batch geometry: the global batch is fixed by the user; gradient accumulation fills in what
  world_size x device_batch does not cover, so 1 CPU and 8 GPUs take the same optimiser steps.
- optimizer: nanochat's split (Muon for block matrices, AdamW for embeddings and the head) or
  plain AdamW, one object with state_dict() for checkpoints.
- LR schedule: linear warmup, constant, linear warmdown to a floor; a pure function of the step,
  so a resumed run is at the same point of the schedule without saving anything.
- evaluation in bits per byte: nats summed over target tokens / (ln 2 x their UTF-8 bytes),
  comparable across tokenizers (a loss per token is not).
- throughput: tokens/s and MFU (model FLOPs / peak FLOPs of the device).
- checkpoint glue: model + optimizer + RNG + data position + step, and resume from it.
The data side (which tokens form which batch) is in nanostoney/batches.py.
"""
import contextlib
import math
import os
import time

import torch
import torch.nn as nn

from nanostoney.dist import autocast_ctx, print0
from nanostoney.errors import UserError
from nanostoney.muon import Muon

# -----------------------------------------------------------------------------
# flags shared by the training scripts


def add_loop_args(parser, *, num_iterations, device_batch_size, eval_every, save_every,
                  sample_every=0, entropy_every=0, warmup_steps=0, warmdown_ratio=0.2,
                  final_lr_frac=0.0, grad_clip=1.0, log_every=1):
    """Flags of the step loop (defaults differ between base and SFT, so they are arguments)."""
    g = parser.add_argument_group("loop")
    g.add_argument("--num-iterations", type=int, default=num_iterations, help="optimizer steps")
    g.add_argument("--device-batch-size", type=int, default=device_batch_size,
                   help="rows per forward pass on each process")
    g.add_argument("--warmup-steps", type=int, default=warmup_steps, help="linear LR warmup")
    g.add_argument("--warmdown-ratio", type=float, default=warmdown_ratio,
                   help="fraction of the run at the end with the LR decaying linearly")
    g.add_argument("--final-lr-frac", type=float, default=final_lr_frac,
                   help="LR at the end of warmdown, as a fraction of the initial LR")
    g.add_argument("--grad-clip", type=float, default=grad_clip, help="max grad norm; 0 = no clipping")
    g.add_argument("--eval-every", type=int, default=eval_every, help="steps between evaluations; 0 = only at the end")
    g.add_argument("--sample-every", type=int, default=sample_every, help="steps between samples; 0 = only at the end")
    g.add_argument("--save-every", type=int, default=save_every, help="steps between checkpoints; 0 = only at the end")
    g.add_argument("--entropy-every", type=int, default=entropy_every,
                   help="steps between attention-entropy logs (measured in that step's first forward); 0 = never")
    g.add_argument("--log-every", type=int, default=log_every, help="steps between loss/throughput logs")
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--device", default="auto", help="auto, cpu, cuda, mps")
    g.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16"],
                   help="autocast dtype: auto = bf16 on CUDA, fp32 elsewhere")
    g.add_argument("--compile", action="store_true", help="torch.compile the model for training")
    g.add_argument("--peak-flops", type=float, default=None,
                   help="peak FLOP/s of one device for MFU; default: datasheet bf16 figure on CUDA "
                        "(H100 989e12), nominal fp32 peak on CPU (threads x clock x FLOPs/cycle)")
    g.add_argument("--out", default=None, help="output directory (checkpoints, metrics.jsonl, wandb/)")
    g.add_argument("--resume", nargs="?", const="latest", default=None,
                   help="continue a run: a checkpoint dir, or no value for the latest one in --out")
    return parser


def add_optim_args(parser, *, optimizer="adamw", matrix_lr=None, embedding_lr=0.2,
                   unembedding_lr=0.004, scalar_lr=0.01, weight_decay=0.0, matrix_flags=("--matrix-lr",)):
    g = parser.add_argument_group("optimizer")
    g.add_argument("--optimizer", default=optimizer, choices=["muon", "adamw"],
                   help="muon: Muon for block matrices + AdamW for embeddings/head; adamw: AdamW for all")
    g.add_argument(*matrix_flags, dest="matrix_lr", type=float, default=matrix_lr,
                   help=f"LR of the block matrices (default: {MATRIX_LR['muon']} with Muon, "
                        f"{MATRIX_LR['adamw']} with AdamW)")
    g.add_argument("--embedding-lr", type=float, default=embedding_lr, help="AdamW LR of the token embedding")
    g.add_argument("--unembedding-lr", type=float, default=unembedding_lr, help="AdamW LR of lm_head")
    g.add_argument("--scalar-lr", type=float, default=scalar_lr, help="AdamW LR of any other (1-D) parameter")
    g.add_argument("--weight-decay", type=float, default=weight_decay, help="AdamW weight decay")
    return parser


def apply_dtype(info, dtype):
    """--dtype: override dist's choice of autocast dtype (auto = bf16 on CUDA, fp32 elsewhere)."""
    if dtype == "float32":
        info.autocast_dtype = None
    elif dtype == "bfloat16":
        info.autocast_dtype = torch.bfloat16
    return info


# -----------------------------------------------------------------------------
# batch geometry


def grad_accum_steps(total_batch, device_batch, rows_len, world_size, unit="tokens"):
    """Micro-steps per optimizer step so that device_batch x rows_len x world_size x accum = total."""
    per_pass = device_batch * rows_len * world_size
    if total_batch <= 0 or total_batch % per_pass != 0:
        what = f"{device_batch} x {rows_len} x {world_size} processes" if unit == "tokens" else \
            f"{device_batch} x {world_size} processes"
        raise UserError(f"--total-batch-size {total_batch} {unit} is not a positive multiple of "
                        f"{per_pass} ({what}); pick a multiple or change --device-batch-size.")
    return total_batch // per_pass


# -----------------------------------------------------------------------------
# optimizer

# Muon's LR is in spectral units (0.02 as nanochat); AdamW's for the same matrices is per element.
# AdamW 3e-3 beat 1e-2 clearly in the CPU comparison (depth 4, 120 steps: 1.103 vs 1.207 bpb).
MATRIX_LR = {"muon": 0.02, "adamw": 3e-3}


class Optimizers:
    """Several torch optimizers stepped, zeroed, scheduled and checkpointed as one."""

    def __init__(self, optimizers):
        self.optimizers = list(optimizers)

    @property
    def param_groups(self):
        return [g for opt in self.optimizers for g in opt.param_groups]

    def step(self):
        for opt in self.optimizers:
            opt.step()

    def zero_grad(self, set_to_none=True):
        for opt in self.optimizers:
            opt.zero_grad(set_to_none=set_to_none)

    def state_dict(self):
        return {"optimizers": [opt.state_dict() for opt in self.optimizers]}

    def load_state_dict(self, state):
        states = state["optimizers"]
        if len(states) != len(self.optimizers):
            raise UserError(f"the checkpoint's optimizer has {len(states)} parts but this run builds "
                            f"{len(self.optimizers)}; resume with the same --optimizer.")
        for opt, s in zip(self.optimizers, states):
            opt.load_state_dict(s)


def build_optimizer(model, kind="adamw", matrix_lr=None, embedding_lr=0.2, unembedding_lr=0.004,
                    scalar_lr=0.01, weight_decay=0.0, betas=(0.8, 0.95)):
    """Parameter groups by role, only over parameters that require grad (so LoRA just works).

    Roles: "matrix" = 2-D weights inside transformer.h and every LoRA A/B, "embedding" = wte,
    "unembedding" = lm_head, "scalar" = anything else. AdamW LRs of embedding/head are scaled
    by (n_embd / 768)^-0.5 as nanochat does, so the same flags suit every depth.
    Each group remembers its initial_lr; set_lr multiplies it by the schedule.
    """
    if kind not in MATRIX_LR:
        raise UserError(f"unknown --optimizer {kind!r}; use muon or adamw.")
    matrix_lr = MATRIX_LR[kind] if matrix_lr is None else matrix_lr
    roles = {"matrix": [], "embedding": [], "unembedding": [], "scalar": []}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        if ".lora_" in name:  # adapters are matrices wherever they sit (lm_head's included)
            roles["matrix"].append(p)
        elif name.startswith("transformer.wte"):
            roles["embedding"].append(p)
        elif name.startswith("lm_head"):
            roles["unembedding"].append(p)
        elif p.ndim == 2 and name.startswith("transformer.h"):
            roles["matrix"].append(p)
        else:
            roles["scalar"].append(p)
    if not any(roles.values()):
        raise UserError("the model has no trainable parameters; check --lora-targets or use --full.")
    n_embd = model.config.n_embd
    dmodel_scale = (n_embd / 768) ** -0.5
    adam_groups = []
    for role, lr in (("embedding", embedding_lr * dmodel_scale),
                     ("unembedding", unembedding_lr * dmodel_scale), ("scalar", scalar_lr)):
        if roles[role]:
            adam_groups.append({"params": roles[role], "lr": lr, "role": role})
    optimizers = []
    if kind == "muon":
        if roles["matrix"]:
            optimizers.append(Muon([{"params": roles["matrix"], "lr": matrix_lr, "role": "matrix"}]))
    elif roles["matrix"]:
        adam_groups.append({"params": roles["matrix"], "lr": matrix_lr, "role": "matrix"})
    if adam_groups:
        # fused AdamW on CUDA is one kernel for all params; eps small because grads can be tiny
        fused = next(model.parameters()).is_cuda
        optimizers.append(torch.optim.AdamW(adam_groups, betas=betas, eps=1e-10,
                                            weight_decay=weight_decay, fused=fused))
    opt = Optimizers(optimizers)
    for g in opt.param_groups:
        g["initial_lr"] = g["lr"]
    return opt


def lr_multiplier(step, num_iterations, warmup_steps=0, warmdown_ratio=0.2, final_lr_frac=0.0):
    """Linear warmup to 1, flat, then linear warmdown to final_lr_frac over the last part."""
    if warmup_steps > 0 and step < warmup_steps:
        return (step + 1) / warmup_steps
    warmdown_steps = round(warmdown_ratio * num_iterations)
    if warmdown_steps <= 0 or step < num_iterations - warmdown_steps:
        return 1.0
    progress = (num_iterations - step) / warmdown_steps  # 1 -> 0 over the warmdown
    return progress + (1 - progress) * final_lr_frac


def set_lr(optimizer, mult):
    for g in optimizer.param_groups:
        g["lr"] = g["initial_lr"] * mult


# -----------------------------------------------------------------------------
# throughput

# dense bf16 peak of one device (no sparsity), for MFU
GPU_PEAK_FLOPS = {"H100": 989e12, "H200": 989e12, "H800": 989e12, "A100": 312e12, "A10G": 125e12,
                  "L4": 121e12, "4090": 165e12}


def cpu_peak_flops():
    """Nominal fp32 peak of the cores this process computes on: threads x clock x FLOPs/cycle,
    with 64 FLOPs/cycle for AVX-512 (2 FMA units x 16 lanes x 2), 32 for AVX2+FMA, 8 otherwise.

    A datasheet-style figure, not a measurement: on a shared VM a measured matmul rate swings
    with the neighbours' load (we saw 36-240 GFLOP/s on one 2-core VM within minutes), which
    would make MFU meaningless. The Xeon VM used for the CPU figures: 2 x 2.7 GHz x 64 = 346 GFLOP/s.
    """
    mhz, flags = None, ""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("cpu MHz") and mhz is None:
                    mhz = float(line.split(":")[1])
                elif line.startswith("flags") and not flags:
                    flags = line
    except OSError:
        pass
    per_cycle = 64 if " avx512f" in flags else 32 if " fma" in flags and " avx2" in flags else 8
    return torch.get_num_threads() * (mhz or 2500.0) * 1e6 * per_cycle


def peak_flops(device, override=None):
    """Peak FLOP/s of one device (one process), for MFU: --peak-flops if given; on CUDA the
    datasheet bf16 dense figure of the card (unknown cards: None, no MFU); on CPU cpu_peak_flops()."""
    if override:
        return override
    device = torch.device(device)
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        return next((v for k, v in GPU_PEAK_FLOPS.items() if k in name), None)
    return cpu_peak_flops() if device.type == "cpu" else None


def sync_device(device):
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


# -----------------------------------------------------------------------------
# bits per byte


def token_byte_lengths(tokenizer, device="cpu"):
    """LongTensor: UTF-8 bytes of text each token id stands for; 0 for special tokens."""
    return torch.tensor(tokenizer.token_byte_lengths(), dtype=torch.long, device=device)


@torch.no_grad()
def evaluate_bpb(model, batches, token_bytes, info):
    """Bits per byte over an iterable of (x, y) batches (this rank's share), summed over ranks.

    bpb = sum of nats over target tokens / (ln 2 x sum of their UTF-8 bytes). Targets that are
    special tokens (0 bytes) or ignored (-1) count in neither sum.
    """
    was_training = model.training
    model.eval()
    nats = torch.zeros((), dtype=torch.float64, device=info.device)
    nbytes = torch.zeros((), dtype=torch.float64, device=info.device)
    for x, y in batches:
        with autocast_ctx(info):
            loss = model(x, y, loss_reduction="none").reshape(-1).double()
        y = y.reshape(-1)
        counted = token_bytes[y.clamp(min=0)] * (y >= 0)
        nats += (loss * (counted > 0)).sum()
        nbytes += counted.sum()
    if info.is_distributed:
        import torch.distributed as dist
        stats = torch.stack([nats, nbytes])
        dist.all_reduce(stats)
        nats, nbytes = stats[0], stats[1]
    model.train(was_training)
    if nbytes.item() == 0:
        return float("nan")
    return nats.item() / (math.log(2) * nbytes.item())


# -----------------------------------------------------------------------------
# attention entropy from the model's probes


def entropy_metrics(probe):
    """{"attn/entropy/layer_i": mean over heads (nats), "attn/entropy_mean"} from probes.entropy."""
    per_layer = probe.per_layer_head.float().mean(1).tolist()
    out = {f"attn/entropy/layer_{i}": v for i, v in enumerate(per_layer)}
    out["attn/entropy_mean"] = sum(per_layer) / max(1, len(per_layer))
    return out


# -----------------------------------------------------------------------------
# greedy generation for periodic samples and accuracy


@torch.no_grad()
def generate_greedy(model, tokenizer, prompts, max_new_tokens, batch_size=16):
    """Greedy completions (token ids, stop token dropped) for a list of prompt-id lists."""
    from nanostoney.engine import Engine
    was_training = model.training
    model.eval()
    engine = Engine(model, tokenizer)
    stop = set(engine.stop_ids)  # <|assistant_end|>, and <|bos|> (a base model ends a document)
    outs = []
    for i in range(0, len(prompts), batch_size):
        res = engine.generate(prompts[i:i + batch_size], max_new_tokens=max_new_tokens, temperature=0.0)
        for toks in res.tokens:
            toks = list(toks)
            if toks and toks[-1] in stop:
                toks = toks[:-1]
            outs.append(toks)
    model.train(was_training)
    return outs


# -----------------------------------------------------------------------------
# chat-task evaluation (SFT, sweeps)


def task_accuracy(model, tokenizer, task, examples, info, max_new_tokens=256, batch_size=16):
    """Greedy completions scored by task.evaluate: a 0/1 list in the order of `examples` (ranks
    split the work and gather). Generation stops at the longest gold answer + 16 tokens (capped
    at max_new_tokens): a model that has learned the format stops earlier anyway."""
    from nanostoney.evaluate import generate_completions, length_budget
    if not examples:
        return []
    prompts = [tokenizer.render_prompt({"messages": task.prompt(ex)}) for ex in examples]
    texts = generate_completions(model, tokenizer, prompts, info, max_new_tokens=length_budget(
        tokenizer, examples, max_new_tokens), batch_size=batch_size, desc=f"eval {task.name}")
    return [int(bool(task.evaluate(ex, t[0]))) for ex, t in zip(examples, texts)]


def accuracy_table(model, tokenizer, item_sets, info, max_new_tokens=256, seed=0):
    """{(task name, split): {"n", "accuracy", "ci95": [lo, hi], "correct": [0/1...]}} for
    item_sets = {(task, split): examples}; 95% percentile-bootstrap interval over items."""
    from nanostoney.metrics import bootstrap_ci
    table = {}
    for (task, split), exs in item_sets.items():
        correct = task_accuracy(model, tokenizer, task, exs, info, max_new_tokens)
        point, lo, hi = bootstrap_ci([float(c) for c in correct], seed=seed) if correct else (float("nan"),) * 3
        table[(task.name, split)] = {"n": len(correct), "accuracy": point, "ci95": [lo, hi], "correct": correct}
    return table


@torch.no_grad()
def masked_loss(model, rows, pad_id, info, batch_size=16):
    """Mean loss (nats/token) over the 1-mask (assistant) tokens of rendered (ids, mask) rows,
    all ranks together."""
    from nanostoney.batches import collate
    was_training = model.training
    model.eval()
    total = torch.zeros(2, dtype=torch.float64, device=info.device)
    mine = rows[info.rank::info.world_size]
    for i in range(0, len(mine), batch_size):
        x, y = collate(mine[i:i + batch_size], pad_id, info.device)
        with autocast_ctx(info):
            loss = model(x, y, loss_reduction="sum")
        total += torch.stack([loss.double(), (y >= 0).sum().double()])
    if info.is_distributed:
        import torch.distributed as dist
        dist.all_reduce(total)
    model.train(was_training)
    return (total[0] / total[1].clamp(min=1)).item()


# -----------------------------------------------------------------------------
# the step loop


def wrap_ddp(model, info):
    """DDP around the model when there are several processes (gloo on CPU, NCCL on CUDA)."""
    if not info.is_distributed:
        return model
    from torch.nn.parallel import DistributedDataParallel as DDP
    device_ids = [info.device.index] if info.device.type == "cuda" else None
    return DDP(model, device_ids=device_ids)


def train_loop(*, info, model, optimizer, args, get_batch, grad_accum, start_step, logger,
               evaluate=None, sample=None, save=None, train_model=None):
    """Run optimizer steps start_step .. args.num_iterations - 1; returns the last eval metrics.

    get_batch(step, micro) -> (x, y) on the device: must be a pure function of its arguments
    (and the rank), which is what makes --resume exact and DDP equal to accumulation.
    evaluate(step) -> dict of metrics, sample(step) -> None, save(step) -> None are called at
    their --*-every intervals (step = optimizer steps done) and once at the end; they run on
    every rank (evaluate and save may hold collectives).
    Every --entropy-every steps the first micro-batch's forward runs with the entropy probe
    attached (exact per-layer attention entropy, no extra forward pass).
    train_model: the (DDP-wrapped / compiled) module to train through; default `model`.
    """
    from tqdm import tqdm
    from nanostoney import probes
    train_model = model if train_model is None else train_model
    params = [p for p in model.parameters() if p.requires_grad]
    flops_per_token = model.estimate_flops()
    peak = peak_flops(info.device, getattr(args, "peak_flops", None))
    n = args.num_iterations
    last_metrics = {}

    def every(k, step):
        return k > 0 and step % k == 0

    def run_eval(step):
        metrics = evaluate(step)
        last_metrics.update(metrics)
        logger.log(metrics, step=step)

    if start_step == 0 and evaluate is not None and args.eval_every > 0:
        run_eval(0)
    pbar = tqdm(range(start_step, n), initial=start_step, total=n, disable=not info.is_master,
                dynamic_ncols=True)
    for step in pbar:
        done = step + 1
        mult = lr_multiplier(step, n, args.warmup_steps, args.warmdown_ratio, args.final_lr_frac)
        set_lr(optimizer, mult)
        sync_device(info.device)
        t0 = time.perf_counter()
        loss_sum = torch.zeros((), device=info.device)
        tokens = 0
        probe = None
        for micro in range(grad_accum):
            x, y = get_batch(step, micro)
            # DDP all-reduces grads on every backward unless told not to: only on the last micro
            last = micro == grad_accum - 1
            ddp = hasattr(train_model, "no_sync")
            sync = train_model.no_sync() if ddp and not last else contextlib.nullcontext()
            measure = micro == 0 and every(args.entropy_every, done)
            with sync, (probes.entropy(model) if measure else contextlib.nullcontext()) as p:
                with autocast_ctx(info):
                    loss = train_model(x, y)
                (loss / grad_accum).backward()
            probe = p if measure else probe
            loss_sum += loss.detach()
            tokens += x.numel()
        clip = args.grad_clip if args.grad_clip > 0 else float("inf")
        grad_norm = nn.utils.clip_grad_norm_(params, clip)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        sync_device(info.device)
        dt = time.perf_counter() - t0

        if every(args.log_every, done) or done == n:
            loss_val = loss_sum.item() / grad_accum
            tok_per_s = tokens / dt  # this process; the whole run does world_size times that
            metrics = {"train/loss": loss_val, "train/lr_mult": mult, "train/grad_norm": grad_norm.item(),
                       "train/tokens_per_s": tok_per_s * info.world_size, "train/step_time_s": dt}
            for g in optimizer.param_groups:
                metrics[f"lr/{g.get('role', 'group')}"] = g["lr"]
            if peak:
                metrics["train/mfu"] = flops_per_token * tok_per_s / peak
            logger.log(metrics, step=done)
            pbar.set_postfix(loss=f"{loss_val:.3f}", tok_s=f"{tok_per_s * info.world_size:.0f}")
        if probe is not None:
            logger.log(entropy_metrics(probe.all_reduce()), step=done)
        if evaluate is not None and every(args.eval_every, done) and done < n:
            run_eval(done)
        if sample is not None and every(args.sample_every, done) and done < n:
            sample(done)
        if save is not None and every(args.save_every, done) and done < n:
            save(done)
    pbar.close()
    if evaluate is not None:
        run_eval(n)
    if sample is not None:
        sample(n)
    if save is not None:
        save(n)
    return last_metrics


def resolve_resume(resume, out_dir):
    """The checkpoint dir to resume from (--resume DIR, or the latest step under --out)."""
    if resume is None:
        return None
    if resume != "latest":
        if not os.path.isdir(resume):
            raise UserError(f"--resume {resume}: no such checkpoint directory.")
        return resume
    if out_dir is None:
        raise UserError("--resume without a directory needs --out (the run to continue).")
    from nanostoney import checkpoint
    path = checkpoint.latest_checkpoint(out_dir)
    if path is None:
        raise UserError(f"--resume: no checkpoint under {out_dir}; start without --resume.")
    return path


def save_run(out_dir, model, step, optimizer, info, meta, tokenizer_dir=None, base_checkpoint=None,
             keep_last=None, tokenizer=None):
    """A checkpoint from rank 0 with every rank's RNG state (call on all ranks). Pass the
    tokenizer (tokenizer_dir or the object) so the checkpoint loads on its own."""
    from nanostoney import checkpoint
    from nanostoney.dist import barrier
    states = checkpoint.gather_rng_states()
    path = None
    if info.is_master:
        path = checkpoint.save_checkpoint(out_dir, model, step, optimizer=optimizer, meta=meta,
                                          tokenizer_dir=tokenizer_dir, tokenizer=tokenizer, rng_states=states,
                                          base_checkpoint=base_checkpoint, keep_last=keep_last)
    barrier()  # nobody runs ahead (and e.g. exits) before the checkpoint is complete
    return path


def resume_run(path, model, optimizer, info, expect=None):
    """Weights, optimizer and this rank's RNG from a checkpoint; returns its meta.

    expect: {key: value} of run settings that must match the checkpoint's meta (batch
    geometry, seed...), else the data order would silently differ from the original run.
    """
    from nanostoney import checkpoint
    meta = checkpoint.load_checkpoint(path, model, optimizer, rank=info.rank)
    for key, value in (expect or {}).items():
        if key in meta and meta[key] != value:
            raise UserError(f"--resume {path}: the run used {key}={meta[key]!r} but this one has "
                            f"{value!r}; resume with the original settings.")
    print0(f"resumed from {path} at step {meta['step']}")
    return meta
