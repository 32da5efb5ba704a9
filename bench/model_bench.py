"""Model benchmarks: training throughput and MFU, the cost of entropy logging, rollout speed.

    python -m bench.model_bench --threads 1           # CPU: small depths, fp32
    python -m bench.model_bench --depths 12,20 --batch 16 --seq 2048 --compile   # GPU, bf16
    python -m bench.model_bench --mode rollout        # tokens/s with and without the KV cache

train mode, per depth: forward+backward tokens/s (no optimizer step), MFU = achieved FLOPs /
peak, with FLOPs per token from model.estimate_flops() (6N + attention, as nanochat). Peak:
989 TFLOP/s on CUDA (H100 SXM bf16 dense; pass --peak-tflops for another GPU); on CPU the fp32
matmul rate measured on the spot (a 2048^2 matmul loop), so CPU MFU means "fraction of what
this machine's matmul reaches", not a datasheet figure.
Entropy overhead, two ways: "on-off" = median step time with probes.entropy attached vs
without (interleaved, so drift on a shared machine hits both alike); "probe" = the time spent
inside the probe calls themselves (synchronised), over the step time without probes -- the
steadier figure on a busy machine. Amortised = probe / --log-every (logging every N steps).
"""
import argparse
import statistics
import sys
import time

import torch

from nanostoney import cli, probes
from nanostoney.cli import run_main
from nanostoney.engine import Engine
from nanostoney.gpt import GPT, config_for_depth

H100_BF16_DENSE = 989e12


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def timed(fn, times, device):
    """Wrap a probe method so the time spent inside it is recorded (synchronised)."""
    def wrapper(*a):
        sync(device)
        t = time.perf_counter()
        out = fn(*a)
        sync(device)
        times.append(time.perf_counter() - t)
        return out
    return wrapper


def cpu_matmul_peak(n=2048, reps=10):
    a, b = torch.randn(n, n), torch.randn(n, n)
    a @ b
    t = time.perf_counter()
    for _ in range(reps):
        a @ b
    return 2 * n ** 3 * reps / (time.perf_counter() - t)


def make_model(depth, args, device):
    cfg = config_for_depth(depth, args.vocab, args.seq)
    with torch.device(device):
        model = GPT(cfg)
    model.init_weights()
    with torch.no_grad():  # zero projections make attention irrelevant; any nonzero will do
        for block in model.transformer.h:
            block.attn.c_proj.weight.normal_(0, 0.02)
            block.mlp.c_proj.weight.normal_(0, 0.02)
    return model


def bench_train(args, device, autocast, peak):
    rows = []
    for depth in args.depths:
        model = make_model(depth, args, device)
        run = torch.compile(model) if args.compile else model
        x = torch.randint(0, args.vocab, (args.batch, args.seq), device=device)

        probe_time = []

        def step(log_entropy, time_probe=False):
            sync(device)
            t = time.perf_counter()
            with autocast:
                if log_entropy:
                    with probes.attention_entropy_probe(run) as ent:
                        if time_probe:
                            ent.on_attn = timed(ent.on_attn, probe_time, device)
                        loss = run(x, x)
                else:
                    loss = run(x, x)
            loss.backward()
            if log_entropy:
                ent.per_layer_head.cpu()  # what logging does: bring the numbers to the host
            model.zero_grad(set_to_none=True)
            sync(device)
            return time.perf_counter() - t

        for _ in range(args.warmup):
            step(False)
            step(True)
        off, on = [], []
        for i in range(args.steps):  # interleave, alternating which goes first
            if i % 2:
                off.append(step(False)); on.append(step(True))
            else:
                on.append(step(True)); off.append(step(False))
        n_probe = max(2, args.steps // 2)
        for _ in range(n_probe):  # separate steps: the synchronising timer would slow on/off
            step(True, time_probe=True)
        t_off, t_on = statistics.median(off), statistics.median(on)
        t_probe = sum(probe_time) / n_probe
        tok = args.batch * args.seq
        flops = model.estimate_flops() * tok / t_off
        rows.append(dict(depth=depth, params=model.num_params(), n_embd=model.config.n_embd,
                         n_head=model.config.n_head, step_ms=t_off * 1e3, tok_s=tok / t_off,
                         tflops=flops / 1e12, mfu=flops / peak, ent_step=(t_on - t_off) / t_off,
                         ent_probe=t_probe / t_off, ent_amort=t_probe / t_off / args.log_every))
        del model, run
    print(f"{'depth':>5} {'params':>9} {'width':>5} {'heads':>5} {'step ms':>9} {'tok/s':>9} "
          f"{'TFLOP/s':>8} {'MFU':>6} {'ent on-off':>10} {'ent probe':>10} {'amortised 1/' + str(args.log_every):>16}")
    for r in rows:
        print(f"{r['depth']:>5} {r['params'] / 1e6:>8.1f}M {r['n_embd']:>5} {r['n_head']:>5} "
              f"{r['step_ms']:>9.1f} {r['tok_s']:>9.0f} {r['tflops']:>8.3f} {r['mfu']:>6.1%} "
              f"{r['ent_step']:>+10.1%} {r['ent_probe']:>+10.1%} {r['ent_amort']:>+16.2%}")


def bench_rollout(args, device, autocast):
    depth = args.depths[0]
    model = make_model(depth, args, device).eval()
    engine = Engine(model, stop_ids=[])  # no stop: every row runs max_new_tokens
    g = torch.Generator().manual_seed(0)
    prompts = [torch.randint(0, args.vocab, (args.prompt_len,), generator=g).tolist()
               for _ in range(args.prompts)]
    print(f"{'cache':>6} {'rows':>5} {'new tok':>8} {'seconds':>8} {'tok/s':>9}")
    for use_cache in (True, False):
        with autocast:
            engine.generate(prompts[:1], 4, use_cache=use_cache)  # warm-up
            sync(device)
            t = time.perf_counter()
            out = engine.generate(prompts, args.new_tokens, temperature=1.0, seed=0,
                                  num_samples=args.samples, use_cache=use_cache)
            sync(device)
        dt = time.perf_counter() - t
        n = int(out.mask.sum())
        print(f"{str(use_cache):>6} {len(out.tokens):>5} {n:>8} {dt:>8.2f} {n / dt:>9.1f}")


def main():
    cuda = torch.cuda.is_available()
    p = cli.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--mode", choices=["train", "rollout"], default="train")
    p.add_argument("--depths", default="12,20,26" if cuda else "2,4,6")
    p.add_argument("--batch", type=cli.positive_int, default=16 if cuda else 4)
    p.add_argument("--seq", type=cli.positive_int, default=2048 if cuda else 256)
    p.add_argument("--vocab", type=cli.positive_int, default=65536 if cuda else 8192)
    p.add_argument("--steps", type=cli.positive_int, default=10 if cuda else 6)
    p.add_argument("--warmup", type=cli.nonneg_int, default=3 if cuda else 1)
    p.add_argument("--log-every", type=cli.positive_int, default=20, help="entropy logged every N steps")
    p.add_argument("--compile", action="store_true")
    p.add_argument("--threads", type=cli.positive_int, default=None, help="CPU threads (1 = steadier on a busy machine)")
    p.add_argument("--peak-tflops", type=cli.positive_float, default=None)
    p.add_argument("--prompts", type=cli.positive_int, default=8 if cuda else 4)
    p.add_argument("--samples", type=cli.positive_int, default=8 if cuda else 4)
    p.add_argument("--prompt-len", type=cli.positive_int, default=256 if cuda else 64)
    p.add_argument("--new-tokens", type=cli.positive_int, default=256 if cuda else 64)
    args = p.parse_args()
    args.depths = [int(d) for d in args.depths.split(",")]
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device("cuda" if cuda else "cpu")
    if cuda:
        torch.backends.cuda.matmul.allow_tf32 = True
        autocast = torch.autocast("cuda", dtype=torch.bfloat16)
        peak = (args.peak_tflops or H100_BF16_DENSE / 1e12) * 1e12
        peak_note = f"peak {peak / 1e12:.0f} TFLOP/s ({'given' if args.peak_tflops else 'H100 bf16 dense'})"
        dev = torch.cuda.get_device_name()
    else:
        autocast = torch.autocast("cpu", enabled=False)
        peak = args.peak_tflops * 1e12 if args.peak_tflops else cpu_matmul_peak()
        peak_note = f"peak {peak / 1e9:.1f} GFLOP/s (fp32 matmul measured now, {torch.get_num_threads()} threads)"
        dev = "cpu"
    print("command: python " + " ".join(sys.argv))
    print(f"device: {dev}, torch {torch.__version__}, {'bf16 autocast' if cuda else 'fp32'}, "
          f"compile={args.compile}, {peak_note}")
    if args.mode == "train":
        print(f"batch {args.batch} x seq {args.seq}, vocab {args.vocab}, median of {args.steps} steps")
        bench_train(args, device, autocast, peak)
    else:
        print(f"depth {args.depths[0]}, {args.prompts} prompts x {args.samples} samples, "
              f"prompt {args.prompt_len} tokens, {args.new_tokens} new tokens")
        bench_rollout(args, device, autocast)


if __name__ == "__main__":
    run_main(main)
