"""One training step as base_train takes it, timed and measured: MFU and peak memory beside the plan.

    python -m bench.gpu_check --depths 12,20                  # GPU: the --pretrain web shapes
    python -m bench.gpu_check --dry                           # CPU: depth 2, tiny shapes (checks the code)

Per depth: a GPT with the web shapes (vocab 65,536, 2048-token rows, heads of 128 channels,
--device-batch-size rows), placed (bf16 embedding on CUDA) and compiled as base_train does, AdamW,
random tokens (throughput and memory do not depend on the text); --warmup steps, then --steps timed
ones through train.train_step. Prints one JSON line per depth: tokens/s, MFU (model FLOPs over the
device's bf16 dense peak), torch.cuda.max_memory_allocated, and memory.py's estimate of that peak.
"""
import argparse
import json

import torch

from nanostoney import memory, optim, train
from nanostoney.dist import init_dist
from nanostoney.gpt import GPT, config_for_depth


def check_depth(info, depth, rows, seq, vocab, steps, warmup, compile_):
    torch.manual_seed(0)
    model = GPT(config_for_depth(depth, vocab, seq, 128))
    model.init_weights()
    train.place(model, info)
    plan = memory.estimate(model, rows, seq, info.device, compiled=compile_)
    opt = optim.build_optimizer(model, "adamw")
    run = torch.compile(model) if compile_ else model
    params = [p for p in model.parameters() if p.requires_grad]

    def feed():
        while True:
            x = torch.randint(0, vocab, (rows, seq + 1), device=info.device)
            yield x[:, :-1].contiguous(), x[:, 1:].contiguous()
    batches = feed()
    if info.device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(info.device)
    seconds, batch = [], next(batches)
    for i in range(warmup + steps):
        stats, batch = train.train_step(info, model, run, opt, params, batch, batches, train.lm_loss, 1, 1.0)
        if i >= warmup:
            seconds.append(stats["seconds"])
    tok_s = rows * seq * len(seconds) / sum(seconds)
    peak = train.peak_flops(info.device)
    measured = torch.cuda.max_memory_allocated(info.device) if info.device.type == "cuda" else None
    return {"depth": depth, "rows": rows, "seq": seq, "params_M": round(model.num_params() / 1e6, 1),
            "tokens_per_s": round(tok_s), "mfu": round(model.estimate_flops() * tok_s / peak, 4) if peak else None,
            "peak_memory_GB": round(measured / memory.GB, 2) if measured else None,
            "planned_GB": round(plan.total / memory.GB, 2), "plan": plan.describe()}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--depths", default="12,20")
    p.add_argument("--device-batch-size", type=int, default=16)
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--dry", action="store_true", help="CPU, depth 2, 4 rows of 64 tokens, vocab 512, 2 steps")
    args = p.parse_args(argv)
    info = init_dist("cpu" if args.dry else None)
    if args.dry:
        shapes = dict(rows=4, seq=64, vocab=512, steps=2, warmup=0, compile_=False)
        depths = [2]
    else:
        shapes = dict(rows=args.device_batch_size, seq=2048, vocab=65536, steps=args.steps, warmup=args.warmup,
                      compile_=info.device.type == "cuda")
        depths = [int(d) for d in args.depths.split(",")]
    for d in depths:
        print(json.dumps(check_depth(info, d, **shapes)), flush=True)
        if info.device.type == "cuda":
            torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
