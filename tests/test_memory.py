"""memory.py: the per-device memory plan's arithmetic, its refusal, a measured CPU peak, and the
GPU sizes of run_stoney_small.sh planned on CPU (items, epochs, memory at depth 12 and 20)."""
import json
import re
import subprocess
import sys
from types import SimpleNamespace

import pytest
import torch

from nanostoney import memory, train
from nanostoney.errors import UserError
from nanostoney.gpt import GPT, config_for_depth
from nanostoney.tasks import get_task
from scripts import sft_train
from test_speedrun_plan import speedrun
from test_train import ROOT, env


def meta_model(depth, vocab=65536, seq=2048, head_dim=128):
    with torch.device("meta"):
        return GPT(config_for_depth(depth, vocab, seq, head_dim))


def test_arithmetic_of_each_part():
    m = meta_model(12)
    P, E, C, L, V = m.num_params(), 65536 * 768, 768, 12, 65536
    matmul = P - E  # everything but the embedding is a matrix the forward multiplies by
    cpu = memory.estimate(m, 4, 2048, "cpu")
    assert cpu.weights == 4 * P and cpu.gradients == 4 * P and cpu.optimizer == 8 * P
    assert cpu.activations == 4 * 2048 * C * (L * 76 + 32) and cpu.logits == 4 * 2048 * V * 24
    assert cpu.total == cpu.weights + cpu.gradients + cpu.optimizer + cpu.activations + cpu.logits
    m.transformer.wte.to(dtype=torch.bfloat16)  # train.place on CUDA
    gpu = memory.estimate(m, 4, 2048, "cuda", compiled=True, optimizer="muon")
    assert gpu.weights == 4 * matmul + 2 * E + 2 * matmul  # fp32 masters, bf16 embedding, autocast copies
    assert gpu.gradients == 4 * matmul + 2 * E
    blocks = matmul - m.lm_head.weight.numel()
    assert gpu.optimizer == 4 * blocks + 8 * m.lm_head.weight.numel() + 4 * E  # Muon: one momentum per block matrix
    assert gpu.activations == 4 * 2048 * C * (L * 34 + 16) and gpu.logits == 4 * 2048 * V * 8
    assert memory.estimate(m, 4, 2048, "cuda", lm_head=False).logits == 0  # the reward model's loss


def test_lora_counts_only_adapters_as_trained():
    from nanostoney import lora
    m = meta_model(4, vocab=4096, seq=256, head_dim=64)
    lora.apply_lora(m, 8, 16)
    plan = memory.estimate(m, 8, 256, "cpu")
    adapters = sum(p.numel() for p in m.parameters() if p.requires_grad)
    assert 0 < adapters < m.num_params() / 10
    assert plan.gradients == 4 * adapters and plan.optimizer == 8 * adapters


def test_a_batch_that_does_not_fit_is_refused_naming_one_that_does(monkeypatch):
    m = meta_model(20)
    m.transformer.wte.to(dtype=torch.bfloat16)
    monkeypatch.setattr(memory, "capacity", lambda device, local=1: 80e9)
    info = SimpleNamespace(device=torch.device("cuda", 0), world_size=8)
    args = SimpleNamespace(compile=None, optimizer="adamw", device_batch_size=64, total_batch_size=None)
    with pytest.raises(UserError) as e:
        train.memory_plan("base", m, args, info, 2048, 1, compile_default=True)
    msg = str(e.value)
    smaller = int(re.search(r"pass --device-batch-size (\d+) --grad-accum-steps (\d+)", msg).group(1))
    accum = int(re.search(r"--grad-accum-steps (\d+)", msg).group(1))
    assert 64 % smaller == 0 and smaller * accum == 64 and msg.count(".") <= 3  # one sentence
    assert memory.estimate(m, smaller, 2048, "cuda", True).total <= memory.RESERVE * 80e9
    assert memory.estimate(m, 2 * smaller, 2048, "cuda", True).total > memory.RESERVE * 80e9  # the largest that fits
    args.device_batch_size = smaller
    assert train.memory_plan("base", m, args, info, 2048, 1, compile_default=True).total < 72e9


PEAK = """
import json, sys, torch
from torch.distributed._tools.mem_tracker import MemTracker
from nanostoney import memory, optim
from nanostoney.gpt import GPT, config_for_depth
torch.manual_seed(0)
rows = int(sys.argv[1])
m = GPT(config_for_depth(4, 2048, 256, 64)); m.init_weights()
opt = optim.build_optimizer(m, "adamw")
def step(b):
    x = torch.randint(0, 2048, (b, 257))
    m(x[:, :-1].contiguous(), x[:, 1:].contiguous()).backward(); opt.step(); opt.zero_grad(set_to_none=True)
step(1)  # the optimizer's state exists before the measured step, as it does in a run
tracker = MemTracker()
tracker.track_external(m, *opt.optimizers)
with tracker:
    step(rows)
print(json.dumps([tracker.get_tracker_snapshot("peak")[torch.device("cpu")]["Total"],
                  memory.estimate(m, rows, 256, "cpu").total]))
"""


@pytest.mark.parametrize("rows", [16, 32])
def test_estimate_matches_a_measured_cpu_peak(rows):
    """The plan is never below the step's measured peak and at most 30% above it. The peak is
    the high-water mark of live tensor storage (torch's MemTracker: weights, gradients, optimizer
    state, activations, temporaries), not the process RSS, which moves with malloc's history
    (545 MB and 20 MB of growth in two runs of the same step)."""
    r = subprocess.run([sys.executable, "-c", PEAK, str(rows)], capture_output=True, text=True, timeout=600,
                       env=env(), cwd=ROOT)
    assert r.returncode == 0, r.stderr
    measured, estimated = json.loads(r.stdout.strip().splitlines()[-1])
    assert estimated > 2e8 and measured <= estimated <= 1.3 * measured, (measured, estimated)


def stage_plans(stdout):
    return {m.group(1): m.group(2) for m in re.finditer(r"^(base|knowledge|mid|sft|rm|grpo) plan: (.*)$", stdout, re.M)}


@pytest.mark.parametrize("mode", [["--size", "gpu"], ["--pretrain", "web"]])
def test_gpu_sizes_use_every_item_and_fit_80gb_at_depth_12_and_20(tmp_path, mode):
    r = speedrun(*mode, "--out", str(tmp_path / "o"))
    assert r.returncode == 0, r.stderr
    plans = stage_plans(r.stdout)
    want = ["base", "sft", "rm", "grpo"] + (["knowledge", "mid"] if "web" in mode else [])
    assert sorted(plans) == sorted(want), r.stdout
    for name, words in plans.items():
        assert re.search(r"depth 12 ~[\d.]+ GB, depth 20 ~[\d.]+ GB \(80 GB GPU: fits\)", words), (name, words)
        assert re.search(r"[\d,]+ steps x", words) and "tokens" in words, (name, words)
        epochs = float(re.search(r"([\d.]+) epochs", words).group(1))
        assert epochs <= 3 or "more than 3: " in words, (name, words)  # repeats only where it says why
    for name in ("sft", "rm"):  # every train item, not the CPU size's first few
        assert "first " not in plans[name] and "(first" not in plans[name]
    every = sum(len(get_task(t.split("=")[0]).examples("train")) for t in sft_train.DEFAULT_TASKS.split(","))
    assert f"of {every:,} train items" in plans["sft"], plans["sft"]
    if "web" in mode:
        assert "1.00 epochs" in plans["base"]
        base = next(line for line in r.stdout.splitlines() if line.startswith("  base:"))
        assert "--head-dim 128" in base and "--eval-tokens 10485760" in base


def test_a_bf16_embedding_starts_a_bf16_residual_under_autocast_and_still_runs_without():
    """train.place casts the embedding to bf16 on CUDA (nanochat's memory saving); evaluation and
    sampling may then run a plain fp32 forward, which must still work and match."""
    torch.manual_seed(0)
    m = GPT(config_for_depth(2, 256, 32, 64))
    m.init_weights()
    idx = torch.randint(0, 256, (2, 16))
    m.transformer.wte.to(dtype=torch.bfloat16)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert m.trunk(idx).dtype == torch.bfloat16  # the residual stream is bf16: half the activations
    ref = GPT(config_for_depth(2, 256, 32, 64))
    ref.load_state_dict(m.state_dict())  # fp32 copy of the same (bf16-rounded) embedding
    assert torch.equal(m(idx), ref(idx))  # fp32 forward of the bf16 embedding: the fp32 model's logits


def test_base_train_refuses_a_batch_this_machine_cannot_hold_in_one_sentence(tmp_path):
    from test_train import base_cmd, make_workspace, run
    ws = make_workspace(tmp_path / "ws")
    rows = 2 ** 22  # 4M rows of 16 tokens: terabytes of logits
    r = run(base_cmd(ws, tmp_path / "out", "--device-batch-size", str(rows), "--total-batch-size", str(rows * 16)))
    lines = r.stderr.strip().splitlines()
    assert r.returncode == 2 and len(lines) == 1 and lines[0].startswith("error: base needs ~"), r.stderr[-2000:]
    smaller = int(re.search(r"pass --device-batch-size (\d+) \(the global batch", lines[0]).group(1))
    assert rows % smaller == 0 and smaller < rows
    assert not list((tmp_path / "out").glob("step_*"))  # nothing trained, nothing saved
