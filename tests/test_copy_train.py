"""The copy stage (scripts/copy_train.py): what it saves is an ordinary untied GPT that base_train
continues; the embedding (lm_head) stays frozen; a resumed run equals an uninterrupted one; 3 ranks
equal one process that accumulates the same global batch."""
import re
import shutil
import subprocess

import pytest
import torch

from nanostoney import checkpoint
from nanostoney.checkpoint import load_model
from nanostoney.interp.attention import order_gain

from test_train import PY, ROOT, base_cmd, env, make_workspace
from test_world_sizes import launch, max_diff


def copy_args(ws, out, *extra):
    return ["--tokenizer", str(ws.tok), "--depth", "1", "--head-dim", "32", "--sequence-len", "32", "--row-len", "16",
            "--device-batch-size", "2", "--num-iterations", "4", "--eval-every", "2", "--save-every", "2",
            "--wandb", "disabled", "--device", "cpu", "--out", str(out), *extra]


def run_copy(ws, out, *extra):
    r = subprocess.run([PY, "-m", "scripts.copy_train", *copy_args(ws, out, *extra)], capture_output=True, text=True,
                       timeout=600, env=env(), cwd=ROOT)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    return r


def weights(step_dir):
    return load_model(str(step_dir))[0].state_dict()


def test_the_copy_stage_saves_an_untied_model_that_base_train_continues(tmp_path):
    ws = make_workspace(tmp_path / "ws")
    r = run_copy(ws, tmp_path / "copy")
    assert "32 tokens/step (2 x 16 x 1 proc x 1 accum) x 4 steps" in r.stdout
    printed = float(re.findall(r"step 4: induction gain \S+ nats, order gain (\S+)", r.stdout)[0])
    model, tok, meta = load_model(str(tmp_path / "copy"))
    assert meta["stage"] == "copy" and meta["step"] == 4 and model.config.sequence_len == 32
    # lm_head is its own copy of the embedding, which training never moved; the blocks did move
    assert torch.equal(model.lm_head.weight, model.transformer.wte.weight)
    assert model.lm_head.weight.data_ptr() != model.transformer.wte.weight.data_ptr()
    two, four = weights(tmp_path / "copy" / "step_000002"), weights(tmp_path / "copy" / "step_000004")
    assert torch.equal(two["transformer.wte.weight"], four["transformer.wte.weight"])
    assert not torch.equal(two["transformer.h.0.attn.c_q.weight"], four["transformer.h.0.attn.c_q.weight"])
    assert round(order_gain(model, tok), 3) == round(printed, 3)
    # base_train goes on from it, untied: the embedding and lm_head now train apart
    r = subprocess.run(base_cmd(ws, tmp_path / "base", "--init", str(tmp_path / "copy")), capture_output=True,
                       text=True, timeout=600, env=env(), cwd=ROOT)
    assert r.returncode == 0, r.stderr[-2000:]
    base, _, base_meta = load_model(str(tmp_path / "base"))
    assert base_meta["stage"] == "base"  # a base that copies first, not continued pretraining
    assert not torch.equal(base.lm_head.weight, base.transformer.wte.weight)
    assert not torch.equal(base.transformer.wte.weight, model.transformer.wte.weight)


def test_a_resumed_copy_stage_equals_an_uninterrupted_one(tmp_path):
    ws = make_workspace(tmp_path / "ws")
    run_copy(ws, tmp_path / "whole")
    shutil.copytree(tmp_path / "whole" / "step_000002", tmp_path / "half" / "step_000002")
    run_copy(ws, tmp_path / "resumed", "--resume", str(tmp_path / "half" / "step_000002"))
    whole, resumed = weights(tmp_path / "whole" / "step_000004"), weights(tmp_path / "resumed" / "step_000004")
    assert all(torch.equal(whole[k], resumed[k]) for k in whole)


def test_three_ranks_equal_one_process_that_accumulates(tmp_path):
    ws = make_workspace(tmp_path / "ws")
    three = launch(3, "scripts.copy_train", copy_args(ws, tmp_path / "three"))
    assert "copy plan: 3 process(es) on cpu" in three.stdout
    launch(0, "scripts.copy_train", copy_args(ws, tmp_path / "one", "--total-batch-size", str(3 * 2 * 16)))
    final = [checkpoint.latest_checkpoint(str(tmp_path / d)) for d in ("three", "one")]
    assert max_diff(weights(final[0]), weights(final[1])) <= 1e-5


@pytest.mark.slow
def test_eight_ranks_from_defaults_plus_sizes(tmp_path):
    ws = make_workspace(tmp_path / "ws")
    r = launch(8, "scripts.copy_train", copy_args(ws, tmp_path / "eight"))
    assert "copy plan: 8 process(es) on cpu" in r.stdout and "256 tokens/step (2 x 16 x 8 proc x 1 accum)" in r.stdout
    assert checkpoint.latest_checkpoint(str(tmp_path / "eight")).endswith("step_000004")


def test_the_cpu_long_speedrun_copies_first(tmp_path):
    from test_speedrun_plan import speedrun
    r = speedrun("--size", "cpu-long", "--out", str(tmp_path / "o"))
    lines = r.stdout.splitlines()
    copy = next(i for i, line in enumerate(lines) if line.startswith("  copy:"))
    base = next(i for i, line in enumerate(lines) if line.startswith("  base:"))
    assert r.returncode == 0 and copy < base and "--num-iterations 4000" in lines[copy], r.stdout
    assert f"--init {tmp_path / 'o' / 'copy'}" in lines[base] and "--arith-rows 2 --drill-rows 1" in lines[base]
    r = speedrun("--size", "cpu", "--out", str(tmp_path / "o2"))
    assert not any(line.startswith("  copy:") for line in r.stdout.splitlines())
