"""The training loop shared by pretraining, SFT, the reward model and STaR's SFT rounds: the
loop's flags, batch geometry (accumulation fills in what world_size x device batch does not cover),
memory plan, DDP/compile, throughput and MFU, and the checkpoint glue (save, --resume).
The loss is loss_fn(model, batch) -> (loss, tokens, extra metrics): lm_loss, or e.g.
reward_model.pair_loss. Which tokens form a batch is loader.py / batches.py's business."""
import argparse
import math
import os
import time
from contextlib import nullcontext

import torch
import torch.nn as nn
from torch.nn.parallel import DistributedDataParallel

from nanostoney import checkpoint, memory, probes
from nanostoney.cli import device, finite_float, nonneg_int, out_path, positive_float, positive_int, probability
from nanostoney.dist import autocast_ctx, barrier, check_shared, print0
from nanostoney.errors import RunFailed, UserError
from nanostoney.optim import lr_multiplier, set_lr


def add_loop_args(parser, *, num_iterations, device_batch_size, eval_every, save_every, unit="rows",
                  grad_accum_steps=1, sample_every=0, entropy_every=0, warmup_steps=0, warmdown_ratio=0.2):
    """Flags of the step loop, with each stage's defaults. unit: what --total-batch-size counts."""
    g = parser.add_argument_group("loop")
    g.add_argument("--num-iterations", type=positive_int, default=num_iterations, help="optimizer steps")
    g.add_argument("--device-batch-size", type=positive_int, default=device_batch_size,
                   help="rows per forward pass on each process")
    g.add_argument("--grad-accum-steps", type=positive_int, default=None,
                   help=f"micro-batches per optimizer step on each process (default {grad_accum_steps}); "
                        f"with --total-batch-size, it follows from that")
    g.add_argument("--total-batch-size", type=positive_int, default=None,
                   help=f"{unit} per optimizer step, all processes together (default: device batch"
                        f"{' x --sequence-len' if unit == 'tokens' else ''} x processes x grad-accum "
                        f"steps, so it scales with the world size); must be a multiple of that per-pass size")
    parser.set_defaults(default_grad_accum_steps=grad_accum_steps, batch_unit=unit)
    g.add_argument("--warmup-steps", type=nonneg_int, default=warmup_steps, help="linear LR warmup")
    g.add_argument("--warmdown-ratio", type=probability, default=warmdown_ratio,
                   help="fraction of the run at the end with the LR decaying linearly")
    g.add_argument("--final-lr-frac", type=probability, default=0.0, help="LR after warmdown, share of the initial")
    g.add_argument("--grad-clip", type=finite_float(0), default=1.0, help="max grad norm; 0 = no clipping")
    g.add_argument("--eval-every", type=nonneg_int, default=eval_every, help="steps between evals; 0 = only at the end")
    g.add_argument("--sample-every", type=nonneg_int, default=sample_every, help="steps between samples; 0 = at end")
    g.add_argument("--save-every", type=nonneg_int, default=save_every,
                   help="steps between checkpoints; 0 = only at the end" + (
                       "" if save_every is not None else " (default: about ten in a run, at least 250 steps apart)"))
    g.add_argument("--entropy-every", type=nonneg_int, default=entropy_every,
                   help="steps between attention-entropy logs (measured in that step's first forward); 0 = never")
    g.add_argument("--log-every", type=positive_int, default=1, help="steps between loss/throughput logs")
    g.add_argument("--seed", type=nonneg_int, default=0)
    g.add_argument("--device", type=device, default="auto", help="auto, cpu, cuda, cuda:N, mps")
    g.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16"],
                   help="autocast dtype: auto = bf16 on CUDA, fp32 elsewhere")
    g.add_argument("--compile", action=argparse.BooleanOptionalAction, default=None,
                   help="torch.compile the model for training (default: on for pretraining and SFT on CUDA)")
    g.add_argument("--peak-flops", type=positive_float, default=None,
                   help="peak FLOP/s of one device for MFU; default: datasheet bf16 figure on CUDA "
                        "(H100 989e12), nominal fp32 peak on CPU (threads x clock x FLOPs/cycle)")
    g.add_argument("--out", type=out_path, default=None, help="output directory (checkpoints, metrics.jsonl, wandb/)")
    g.add_argument("--resume", nargs="?", const="latest", default=None,
                   help="continue a run: a checkpoint dir, or no value for the latest one in --out")
    g.add_argument("--overwrite", action="store_true",
                   help="write into an --out that holds other files or an older run (ours are replaced, "
                        "nothing else is deleted)")
    return parser


def grad_accum_steps(total_batch, device_batch, rows_len, world_size, unit="tokens"):
    """Micro-steps per optimizer step so that device_batch x rows_len x world_size x accum = total."""
    per_pass = device_batch * rows_len * world_size
    if total_batch <= 0 or total_batch % per_pass != 0:
        what = f"{device_batch} x " + (f"{rows_len} x " if unit == "tokens" else "") + f"{world_size} processes"
        raise UserError(f"--total-batch-size {total_batch} {unit} is not a positive multiple of "
                        f"{per_pass} ({what}); pick a multiple, change --device-batch-size, or leave "
                        f"--total-batch-size out to scale it with the world size.")
    return total_batch // per_pass


def batch_geometry(args, info, rows_len=1):
    """(total batch, grad accum steps): per device by default, so it scales with the world size."""
    if args.total_batch_size is None:
        accum = args.grad_accum_steps if args.grad_accum_steps is not None else args.default_grad_accum_steps
        return args.device_batch_size * rows_len * info.world_size * accum, accum
    accum = grad_accum_steps(args.total_batch_size, args.device_batch_size, rows_len, info.world_size,
                             args.batch_unit)
    if args.grad_accum_steps is not None and args.grad_accum_steps != accum:
        raise UserError(f"--total-batch-size {args.total_batch_size} means {accum} grad-accum steps on "
                        f"{info.world_size} process(es), not --grad-accum-steps {args.grad_accum_steps}; "
                        f"give one of them.")
    return args.total_batch_size, accum


def compiles(args, info, compile_default=False):
    return args.compile if args.compile is not None else compile_default and info.device.type == "cuda"


def memory_plan(stage, model, args, info, seq_len, accum, rows_per_item=1, compile_default=False, lm_head=True):
    """The estimated peak memory of one step (memory.py), refused before any work when it does not fit.
    accum: None where the global batch does not depend on the device batch (GRPO)."""
    compiled, opt = compiles(args, info, compile_default), getattr(args, "optimizer", "adamw")
    plan, smaller, cap = memory.check_fits(
        lambda rows: memory.estimate(model, rows * rows_per_item, seq_len, info.device, compiled, opt, lm_head=lm_head),
        args.device_batch_size, info.device, int(os.environ.get("LOCAL_WORLD_SIZE", info.world_size)))
    if smaller is not False:
        rows = args.device_batch_size
        fix = ("not even one row per device fits: use a smaller model or a shorter --sequence-len" if smaller is None
               else f"pass --device-batch-size {smaller}" + ("" if args.total_batch_size or accum is None else
                    f" --grad-accum-steps {accum * rows // smaller}") + " (the global batch stays the same)")
        raise UserError(f"{stage} needs ~{plan.total / memory.GB:.1f} GB per device at --device-batch-size {rows} "
                        f"but {info.device} has {cap / memory.GB:.1f} GB (a plan may use "
                        f"{memory.RESERVE:.0%} of it); {fix}.")
    return plan


def training_module(model, args, info, compile_default=False):
    """DDP (several processes), then compiled: compiling the DDP module lets dynamo split the graph at
    DDP's buckets, so each all-reduce overlaps the backward. `model` stays the plain module."""
    wrapped = model if not info.is_distributed else DistributedDataParallel(
        model, device_ids=[info.device.index] if info.device.type == "cuda" else None, gradient_as_bucket_view=True,
        broadcast_buffers=False)
    return torch.compile(wrapped) if compiles(args, info, compile_default) else wrapped


def place(model, info):
    """On the run's device; a bf16 token embedding under bf16 autocast on CUDA (nanochat: half the activations)."""
    model.to(info.device)
    if info.device.type == "cuda" and info.autocast_dtype == torch.bfloat16:
        model.transformer.wte.to(dtype=torch.bfloat16)
    return model


def print_plan(stage, info, model, steps, per_step, unit, per_step_detail="", tokens_per_step=None, extra=""):
    """What a run is about to do (rank 0): world size, model size, batch, steps and totals."""
    c = model.config
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    tokens = f"; ~{tokens_per_step:,.0f} tokens/step, ~{tokens_per_step * steps:,.0f} tokens in all" \
        if tokens_per_step else ""
    print0(f"{stage} plan: {info.world_size} process(es) on {info.device.type}; depth {c.n_layer} "
           f"(width {c.n_embd}), {total / 1e6:.2f}M params, {trainable:,} trainable; {per_step:,} {unit}/step"
           f"{f' ({per_step_detail})' if per_step_detail else ''} x {steps} steps = {per_step * steps:,} {unit}"
           f"{tokens}{'; ' + extra if extra else ''}")


def every(k, step):
    return k > 0 and step % k == 0


# dense bf16 peak of one device (no sparsity), for MFU
GPU_PEAK_FLOPS = {"H100": 989e12, "H200": 989e12, "H800": 989e12, "A100": 312e12, "A10G": 125e12,
                  "L4": 121e12, "4090": 165e12}


def cpu_peak_flops():
    """Nominal fp32 peak: threads x clock x FLOPs/cycle (64 for AVX-512, 32 for AVX2+FMA, else 8).
    Not a measurement: on a shared VM a measured matmul rate swings with the neighbours' load."""
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
    """Peak FLOP/s of one device for MFU (None for an unknown GPU)."""
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


def lm_loss(model, batch):
    """Next-token cross-entropy of (x, y), targets -1 ignored: (loss, tokens, extra metrics)."""
    x, y = batch
    return model(x, y), x.numel(), {}


def attention_entropy_metrics(probe):
    """{"attn/entropy/layer_i": mean over heads (nats), "attn/entropy_mean"} from an EntropyProbe."""
    per_layer = probe.per_layer_head.float().mean(1).tolist()
    return {**{f"attn/entropy/layer_{i}": v for i, v in enumerate(per_layer)},
            "attn/entropy_mean": sum(per_layer) / max(1, len(per_layer))}


def train_step(info, model, train_model, optimizer, params, batch, feed, loss_fn, grad_accum, grad_clip,
               measure_entropy=False):
    """(statistics, next batch) of one step over `batch` and the next micro-batches from `feed`, each
    read right after a backward is queued, so reading overlaps the device's work (nanochat's prefetch)."""
    sync_device(info.device)
    t0 = time.perf_counter()
    loss_sum, tokens, extra, probe = torch.zeros((), device=info.device), 0, {}, None
    for micro in range(grad_accum):
        # DDP all-reduces grads on every backward unless told not to: only on the last micro
        sync = train_model.no_sync() if hasattr(train_model, "no_sync") and micro < grad_accum - 1 else nullcontext()
        watch = micro == 0 and measure_entropy
        with sync, (probes.attention_entropy_probe(model) if watch else nullcontext()) as p:
            with autocast_ctx(info):
                loss, n, more = loss_fn(train_model, batch)
            (loss / grad_accum).backward()
        batch = next(feed, None)  # the device is still busy with this backward
        probe = p if watch else probe
        loss_sum += loss.detach()
        tokens += n
        for k, v in more.items():
            extra[k] = extra.get(k, 0.0) + v.detach() / grad_accum
    grad_norm = nn.utils.clip_grad_norm_(params, grad_clip if grad_clip > 0 else float("inf"))
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    sync_device(info.device)
    stats = {"loss": loss_sum.item() / grad_accum, "grad_norm": grad_norm.item(), "tokens": tokens,
             "seconds": time.perf_counter() - t0, "extra": extra, "entropy": probe}
    return stats, batch


def train_loop(*, info, model, optimizer, args, get_batch, grad_accum, start_step, logger, loss_fn=lm_loss,
               evaluate=None, sample=None, save=None, train_model=None):
    """Optimizer steps start_step .. args.num_iterations - 1; returns the last eval metrics.
    get_batch(step, micro) must be a pure function of its arguments and the rank (exact --resume,
    DDP equal to accumulation); it is called one micro-batch ahead, so when step s's callbacks
    run, batch (s, 0) has been read. evaluate(step) -> metrics, sample(step), save(step) run on
    every rank at their --*-every intervals and once at the end."""
    from tqdm import tqdm  # lazy: the core path imports with torch, numpy and tokenizers only
    train_model = model if train_model is None else train_model
    params = [p for p in model.parameters() if p.requires_grad]
    flops_per_token, peak = model.estimate_flops(), peak_flops(info.device, getattr(args, "peak_flops", None))
    n = args.num_iterations
    last_metrics = {}

    def run_eval(step):
        metrics = evaluate(step)
        last_metrics.update(metrics)
        logger.log(metrics, step=step)

    callbacks = [(c, k) for c, k in [(evaluate and run_eval, args.eval_every), (sample, args.sample_every),
                                     (save, args.save_every)] if c is not None]
    if start_step == 0 and evaluate is not None and args.eval_every > 0:
        run_eval(0)
    pbar = tqdm(range(start_step, n), initial=start_step, total=n, disable=not info.is_master, dynamic_ncols=True)
    feed = (get_batch(s, m) for s in range(start_step, n) for m in range(grad_accum))
    batch = next(feed, None)
    for step in pbar:
        done = step + 1
        mult = lr_multiplier(step, n, args.warmup_steps, args.warmdown_ratio, args.final_lr_frac)
        set_lr(optimizer, mult)
        stats, batch = train_step(info, model, train_model, optimizer, params, batch, feed, loss_fn, grad_accum,
                                  args.grad_clip, every(args.entropy_every, done))
        check_finite(done, loss=stats["loss"], grad_norm=stats["grad_norm"])
        if every(args.log_every, done) or done == n:
            tok_per_s = stats["tokens"] / stats["seconds"]  # of this process; x world_size for the run
            metrics = {"train/loss": stats["loss"], "train/lr_mult": mult, "train/grad_norm": stats["grad_norm"],
                       "train/tokens_per_s": tok_per_s * info.world_size, "train/step_time_s": stats["seconds"],
                       **stats["extra"], **{f"lr/{g.get('role', 'group')}": g["lr"] for g in optimizer.param_groups}}
            if peak:
                metrics["train/mfu"] = flops_per_token * tok_per_s / peak
            logger.log(metrics, step=done)
            pbar.set_postfix(loss=f"{stats['loss']:.3f}", tok_s=f"{tok_per_s * info.world_size:.0f}")
        if stats["entropy"] is not None:
            logger.log(attention_entropy_metrics(stats["entropy"].all_reduce()), step=done)
        for callback, k in callbacks:
            if every(k, done) and done < n:
                callback(done)
    pbar.close()
    for callback, _ in callbacks:  # and once at the end
        callback(n)
    return last_metrics


def check_finite(step, **values):
    """RunFailed at the first NaN/inf: nothing of that step is saved, the last checkpoint stays good."""
    bad = [f"the {k.replace('_', ' ')} is {v}" for k, v in values.items() if not math.isfinite(v)]
    if bad:
        raise RunFailed(f"training stopped at step {step}: {' and '.join(bad)}; nothing of this step was saved "
                        f"and the last checkpoint is intact; lower the learning rate (or check the data) and "
                        f"start again, or --resume from that checkpoint.")


def save_run(out_dir, model, step, optimizer, info, meta, base_checkpoint=None, keep_last=None, tokenizer=None,
             replace=False):
    """A checkpoint from rank 0 with every rank's RNG state (every rank calls it)."""
    states = checkpoint.gather_rng_states()
    if info.is_master:
        checkpoint.save_checkpoint(out_dir, model, step, optimizer=optimizer, meta=meta, tokenizer=tokenizer,
                                   rng_states=states, base_checkpoint=base_checkpoint, keep_last=keep_last,
                                   replace=replace)
    barrier()  # nobody runs ahead (and e.g. exits) before the checkpoint is complete


def resume(args, out_dir, model, optimizer, info, expect=None):
    """The meta of the --resume checkpoint ({"step": 0} without), after restoring it. expect: settings that
    must match (else the data order would silently differ); no later step of the run is ever replaced."""
    if args.resume is None:
        return {"step": 0}
    named = args.resume != "latest"
    check_shared({"--resume": args.resume if named else out_dir})
    if named and not os.path.isdir(args.resume):
        raise UserError(f"--resume {args.resume}: no such checkpoint directory.")
    path = checkpoint.latest_checkpoint(args.resume if named else out_dir)
    if path is None:
        raise UserError(f"--resume {args.resume} holds no complete checkpoint (no meta.json, no `latest`)." if named
                        else f"--resume: no checkpoint under {out_dir}; start without --resume.")
    saved = checkpoint.read_meta(path)["step"]
    if args.num_iterations <= saved:
        raise UserError(f"--resume {path} is at step {saved} and --num-iterations {args.num_iterations} does not "
                        f"go past it; pass a larger --num-iterations to continue that run (nothing was written).")
    later = [name for step, name in checkpoint.saved_steps(out_dir) if step > saved] if os.path.isdir(out_dir) else []
    if later and not args.overwrite:
        raise UserError(f"--resume from step {saved}: {out_dir} already holds the later {later[0]}, which going on "
                        f"from here would replace; resume from the latest checkpoint, or pass --overwrite.")
    meta = checkpoint.load_checkpoint(path, model, optimizer, rank=info.rank)
    for key, value in (expect or {}).items():
        if key in meta and meta[key] != value:
            raise UserError(f"--resume {path}: the run used {key}={meta[key]!r} but this one has "
                            f"{value!r}; resume with the original settings.")
    print0(f"resumed from {path} at step {meta['step']}")
    return meta
