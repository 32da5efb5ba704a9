"""run_stoney_small.sh's GPU sizes (--size gpu, --pretrain web) run on CPU: every training stage at
2 gloo ranks with exactly the flags the speedrun's plan gives it, then these overrides only: depth 2
(the tiny test tokenizer and its workspace), 2 steps (the last --num-iterations wins), the bundled
corpus for the web shards (there is no network), and the end-of-stage evaluations shrunk (they do
not change what the stage trains on). It asserts what each stage plans: SFT and RM read every train
item, each stage prints its memory plan, and the batch is the size's."""
import re
import subprocess
import sys

import pytest

from nanostoney import checkpoint
from test_train import ROOT, base_cmd, final_weights, make_workspace, run
from test_world_sizes import env, launch

SHRINK = {"base": [], "knowledge": [],
          "mid": ["--eval-loss-examples", "2", "--final-eval-examples", "0", "--eval-examples", "0"],
          "sft": ["--eval-loss-examples", "2", "--final-eval-examples", "0", "--eval-examples", "0"],
          "rm": ["--eval-pairs", "4", "--eval-sampled", "0"],
          "grpo": ["--max-new-tokens", "8", "--final-eval-examples", "0", "--probe-prompts", "1", "--pass-k", "2",
                   "--eval-tasks", "stoney_mc"]}


def plan_flags(mode, out):
    """{stage: its flags} from `run_stoney_small.sh --plan` (paths, --depth and --wandb removed)."""
    r = subprocess.run(["bash", str(ROOT / "run_stoney_small.sh"), "--plan", *mode, "--out", str(out)],
                       capture_output=True, text=True, timeout=600, env=env(), cwd=ROOT)
    assert r.returncode == 0, r.stderr
    flags = {}
    for line in r.stdout.splitlines():
        m = re.match(r"  (base|knowledge|mid|sft|rm|grpo): .* -m scripts\.\w+ (.*)$", line)
        if m:
            words = m.group(2).split()
            for flag in ("--init", "--out", "--tokenizer", "--depth", "--wandb", "--run-name", "--data",
                         "--reward-model"):
                while flag in words:
                    i = words.index(flag)
                    del words[i:i + 2]
            flags[m.group(1)] = words
    return flags


def run_stage(module, flags, stage, *extra):
    return launch(2, module, [*flags, *extra, "--num-iterations", "2", "--wandb", "disabled", *SHRINK[stage]],
                  timeout=1800)


@pytest.mark.slow
def test_every_stage_of_the_gpu_sizes_runs_at_two_ranks_with_their_flags(tmp_path):
    ws = make_workspace(tmp_path / "ws")
    web, gpu = plan_flags(["--pretrain", "web"], tmp_path / "p1"), plan_flags(["--size", "gpu"], tmp_path / "p2")
    assert all(web[s] == gpu[s] for s in ("sft", "rm", "grpo"))  # one run of them covers both sizes
    o = tmp_path
    r = run_stage("scripts.base_train", gpu["base"], "base", "--tokenizer", str(ws.tok), "--depth", "2",
                  "--out", str(o / "gpu_base"))
    assert "65,536 tokens/step (8 x 1024 x 2 proc x 4 accum)" in r.stdout and "base memory plan: ~" in r.stdout
    r = run_stage("scripts.base_train", web["base"], "base", "--tokenizer", str(ws.tok), "--depth", "2",
                  "--out", str(o / "base"))
    assert "524,288 tokens/step (16 x 2048 x 2 proc x 8 accum)" in r.stdout and "1 heads" in r.stdout  # head dim 128
    assert "base memory plan: ~" in r.stdout
    r = run_stage("scripts.base_train", web["knowledge"], "knowledge", "--init", str(o / "base"),
                  "--out", str(o / "knowledge"))
    assert "65,536 tokens/step" in r.stdout and "epochs" in r.stdout
    r = run_stage("scripts.sft_train", web["mid"], "mid", "--init", str(o / "knowledge"), "--out", str(o / "mid"))
    assert "64 conversations/step" in r.stdout and "SFT memory plan: ~" in r.stdout
    r = run_stage("scripts.sft_train", web["sft"], "sft", "--init", str(o / "mid"), "--out", str(o / "sft"))
    counts = dict((k, int(v)) for k, v in re.findall(r"(stoney_mc|arith_mc)=(\d+)", r.stdout))
    assert counts["stoney_mc"] > 1000 and counts["arith_mc"] > 1000, r.stdout  # every fitting item, not 16
    r = run_stage("scripts.rm_train", web["rm"], "rm", "--init", str(o / "sft"), "--out", str(o / "rm"))
    pairs = [int(n) for n in re.findall(r"=(\d+)\+\d+", r.stdout)]
    assert len(pairs) == 4 and all(n > 1000 for n in pairs), r.stdout  # every train item of the four tasks
    assert "128 pairs/step" in r.stdout and "reward model memory plan: ~" in r.stdout
    r = run_stage("scripts.grpo_train", web["grpo"], "grpo", "--init", str(o / "sft"), "--reward-model",
                  str(o / "rm"), "--out", str(o / "grpo"))
    assert "GRPO plan: 2 process(es)" in r.stdout
    for stage in ("gpu_base", "base", "knowledge", "mid", "sft", "grpo"):
        assert checkpoint.latest_checkpoint(str(o / stage)) is not None, stage


@pytest.mark.slow
def test_compiled_ddp_with_accumulation_trains_as_plain_ddp(tmp_path):
    """torch.compile(DDP(model)), as the GPU path trains (compile is on by default on CUDA), at 2
    gloo ranks with 2 micro-steps (DDP's no_sync on the first): the same weights as plain DDP, up to
    the compiler's reordering of float sums. That reordering is measured against what training moves:
    AdamW turns a float-noise gradient into a full step, so the embedding can differ by 1e-4 where its
    last two steps moved it by 40 (in norm); a rank that misses the other's gradients or a micro-step
    differs by a sizeable fraction of a step."""
    ws = make_workspace(tmp_path / "ws")
    torchrun = (sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2")
    outs = {}
    for name, steps, extra in (("plain", 3, ["--no-compile"]), ("compiled", 3, ["--compile"]),
                               ("plain_step1", 1, ["--no-compile"])):
        outs[name] = final_weights_after(ws, tmp_path / name, steps, extra, torchrun)
    plain, compiled, step1 = outs["plain"], outs["compiled"], outs["plain_step1"]
    for k in plain:
        moved = (plain[k] - step1[k]).norm()
        assert moved > 0, k
        assert (plain[k] - compiled[k]).norm() < 1e-2 * moved, k


def final_weights_after(ws, out, steps, extra, launcher):
    r = run(base_cmd(ws, out, "--total-batch-size", "128", "--num-iterations", str(steps), "--save-every", "0",
                     "--eval-every", "0", *extra, launcher=launcher), timeout=1800)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "(2 x 16 x 2 proc x 2 accum)" in r.stdout
    return {k: v.float() for k, v in final_weights(out).items()}
