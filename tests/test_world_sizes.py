"""Every stage under torchrun at any world size, on CPU ranks (gloo), with its default flags plus
sizes: batch sizes are per device, so the defaults that work in one process work on 3 or 8.

Equivalence where the maths allows it: SFT and the reward model at 3 ranks end with the weights
of one process that takes the same global batch (--total-batch-size) by accumulation; SFT and
GRPO on 2 loopback "nodes" end with the weights of one node running 2 processes. GRPO's
rollouts are seeded per rank, so one process and 3 ranks train on different samples, but the
measurements before training (val pass@k, reward on the probe prompts) are world-size-free and
must match exactly. The multi-node check: a node that cannot see rank 0's --init stops with one
sentence instead of hanging in a collective.
"""
import json
import os
import socket
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from nanostoney import checkpoint, lora
from nanostoney.gpt import GPT, GPTConfig
from test_grpo import byte_tokenizer

ROOT = Path(__file__).resolve().parent.parent
TORCHRUN = (sys.executable, "-m", "torch.distributed.run")


def env():
    e = dict(os.environ)
    e.pop("WANDB_API_KEY", None)
    e.update(OMP_NUM_THREADS="1", WANDB_SILENT="true", PYTHONUNBUFFERED="1", CUDA_VISIBLE_DEVICES="",
             PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    return e


def launch(nproc, module, args, timeout=1200):
    """python -m module (nproc 0) or torchrun with nproc CPU processes; asserts it succeeded."""
    launcher = (*TORCHRUN, "--standalone", f"--nproc_per_node={nproc}") if nproc else (sys.executable,)
    r = subprocess.run([*launcher, "-m", module, *args], capture_output=True, text=True, timeout=timeout,
                       env=env(), cwd=ROOT)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    return r


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def two_nodes(module, args, cwds=(ROOT, ROOT), timeout=1200):
    """Two torchrun "nodes" of one process each on 127.0.0.1; returns [(returncode, stdout, stderr)]."""
    port = free_port()
    procs = []
    for node, cwd in enumerate(cwds):
        launcher = (*TORCHRUN, "--nnodes=2", f"--node_rank={node}", "--nproc_per_node=1",
                    "--master_addr=127.0.0.1", f"--master_port={port}")
        procs.append(subprocess.Popen([*launcher, "-m", module, *args], env=env(), cwd=cwd,
                                      stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    outs = []
    try:
        for p in procs:
            so, se = p.communicate(timeout=timeout)
            outs.append((p.returncode, so, se))
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    return outs


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory):
    """A base checkpoint and LoRA "SFT" adapters on every linear layer and lm_head (the default
    targets, which made the reward model crash under DDP), random weights."""
    root = tmp_path_factory.mktemp("world")
    tok = byte_tokenizer()
    torch.manual_seed(0)
    model = GPT(GPTConfig(sequence_len=1024, vocab_size=tok.vocab_size, n_layer=1, n_head=2, n_kv_head=2,
                          n_embd=32))
    model.init_weights()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "c_proj" in name:
                p.normal_(0, 0.05)
    base = checkpoint.save_checkpoint(str(root / "base"), model, 1, tokenizer=tok)
    lora.apply_lora(model, rank=2, alpha=4, targets="all,head")
    with torch.no_grad():
        for p in lora.lora_parameters(model):
            p.add_(0.01 * torch.randn_like(p))
    sft = checkpoint.save_checkpoint(str(root / "sft"), model, 1, base_checkpoint=base)
    return SimpleNamespace(root=root, base=base, sft=sft)


def final_tensors(out, name="adapters.pt"):
    return torch.load(os.path.join(checkpoint.latest_checkpoint(str(out)), name), weights_only=True)


def final_meta(out):
    with open(os.path.join(checkpoint.latest_checkpoint(str(out)), "meta.json")) as f:
        return json.load(f)


def max_diff(a, b):
    assert a.keys() == b.keys()
    return max((a[k].float() - b[k].float()).abs().max().item() for k in a)


def sft_args(ckpts, out, *extra):
    return ["--init", ckpts.base, "--tasks", "aqua_mc", "--max-train-examples", "4", "--num-iterations", "2",
            "--eval-every", "0", "--eval-examples", "0", "--final-eval-examples", "0", "--eval-loss-examples", "2",
            "--entropy-every", "0", "--lora-rank", "2", "--device-batch-size", "2", "--wandb", "disabled",
            "--out", str(out), *extra]


def rm_args(ckpts, out, *extra):
    return ["--init", ckpts.sft, "--tasks", "arith_mc", "--max-train-examples", "8", "--eval-pairs", "4",
            "--eval-sampled", "3", "--samples-per-prompt", "2", "--sample-max-new-tokens", "8",
            "--num-iterations", "3", "--device-batch-size", "2", "--wandb", "disabled", "--out", str(out), *extra]


def dpo_args(ckpts, out, *extra):
    return ["--init", ckpts.sft, "--tasks", "arith_mc", "--eval-tasks", "arith_mc", "--max-train-examples", "8",
            "--eval-pairs", "4", "--final-eval-examples", "0", "--num-iterations", "2", "--device-batch-size", "1",
            "--wandb", "disabled", "--out", str(out), *extra]


def grpo_args(ckpts, out, *extra):
    return ["--init", ckpts.sft, "--tasks", "aqua_mc", "--eval-tasks", "aqua_mc", "--max-train-examples", "6",
            "--num-iterations", "2", "--prompts-per-rank", "1", "--group-size", "2", "--max-new-tokens", "6",
            "--final-eval-examples", "3", "--pass-k", "2", "--probe-prompts", "2", "--wandb", "disabled",
            "--out", str(out), *extra]


# -----------------------------------------------------------------------------
# the defaults: per-device batches that work at any world size


@pytest.mark.parametrize("world", [1, 3, 8])
@pytest.mark.parametrize("script, rows_len", [("base_train", 256), ("sft_train", 1), ("rm_train", 1),
                                              ("star_train", 1), ("dpo_train", 1)])
def test_default_batches_scale_with_the_world_size(script, rows_len, world):
    import importlib
    from nanostoney import train
    args = importlib.import_module(f"scripts.{script}").parse_args([])
    info = SimpleNamespace(world_size=world)
    total, accum = train.batch_geometry(args, info, rows_len)
    assert total == args.device_batch_size * rows_len * world * accum and accum == args.default_grad_accum_steps
    # an explicit global batch still works (the N-ranks-vs-one-process tests use it) when it divides
    args.total_batch_size = total * 2
    assert train.batch_geometry(args, info, rows_len) == (total * 2, accum * 2)


def test_grpo_prompts_are_per_rank_by_default():
    from scripts import grpo_train
    args = grpo_train.parse_args([])
    assert args.prompts_per_step is None and args.prompts_per_rank == 8


def test_explicit_batch_flags_that_disagree_are_refused():
    from nanostoney import train
    from nanostoney.errors import UserError
    from scripts import sft_train
    args = sft_train.parse_args(["--total-batch-size", "16", "--grad-accum-steps", "1"])
    with pytest.raises(UserError, match="means 2 grad-accum steps on 1 process"):
        train.batch_geometry(args, SimpleNamespace(world_size=1))
    args = sft_train.parse_args(["--total-batch-size", "12"])
    with pytest.raises(UserError, match="not a positive multiple of 24"):
        train.batch_geometry(args, SimpleNamespace(world_size=3))


def test_compile_is_on_by_default_for_base_and_sft_on_cuda_only():
    from nanostoney import train
    from scripts import base_train
    model = GPT(GPTConfig(sequence_len=8, vocab_size=16, n_layer=1, n_head=2, n_kv_head=2, n_embd=32))
    args = base_train.parse_args([])
    cpu, cuda = (SimpleNamespace(device=torch.device(d), is_distributed=False) for d in ("cpu", "cuda"))
    assert train.training_module(model, args, cpu, compile_default=True) is model
    assert train.training_module(model, args, cuda, compile_default=False) is model   # RM, STaR
    assert isinstance(train.training_module(model, args, cuda, compile_default=True), torch._dynamo.OptimizedModule)
    args = base_train.parse_args(["--no-compile"])
    assert train.training_module(model, args, cuda, compile_default=True) is model
    args = base_train.parse_args(["--compile"])
    assert isinstance(train.training_module(model, args, cpu), torch._dynamo.OptimizedModule)


# -----------------------------------------------------------------------------
# 3 ranks: SFT, reward model, GRPO


def test_sft_on_three_ranks_from_per_device_defaults_equals_one_process(ckpts, tmp_path):
    three = launch(3, "scripts.sft_train", sft_args(ckpts, tmp_path / "three"))
    assert "SFT plan: 3 process(es) on cpu" in three.stdout
    assert "6 conversations/step (2 x 3 proc x 1 accum) x 2 steps = 12 conversations" in three.stdout
    launch(0, "scripts.sft_train", sft_args(ckpts, tmp_path / "one", "--total-batch-size", "6"))
    assert max_diff(final_tensors(tmp_path / "three"), final_tensors(tmp_path / "one")) <= 1e-5


def test_reward_model_on_three_ranks_with_sft_head_adapters_equals_one_process(ckpts, tmp_path):
    """The SFT init carries adapters on lm_head, which the reward's loss never reaches: under DDP
    they used to stop the second step ("Expected to have finished reduction")."""
    three = launch(3, "scripts.rm_train", rm_args(ckpts, tmp_path / "three"))
    assert "12 pairs/step (2 x 3 proc x 2 accum) x 3 steps" in three.stdout
    launch(0, "scripts.rm_train", rm_args(ckpts, tmp_path / "one", "--total-batch-size", "12"))
    a, b = final_tensors(tmp_path / "three"), final_tensors(tmp_path / "one")
    assert max_diff(a, b) <= 1e-5
    assert any("lm_head" in k for k in a)  # the init's head adapters are kept (frozen), not dropped
    heads = [torch.tensor(final_meta(tmp_path / o)["reward_head"]["weight"]) for o in ("three", "one")]
    assert (heads[0] - heads[1]).abs().max() <= 1e-5
    # the policy's own wrong answers on held-out prompts: the same pairs whatever the world size
    before = [json.load(open(tmp_path / o / "rm_eval.json"))["before"]["arith_mc/policy"] for o in ("three", "one")]
    assert before[0]["n"] == before[1]["n"] > 0
    assert before[0]["accuracy"] == pytest.approx(before[1]["accuracy"], abs=1e-5)


def test_dpo_on_three_ranks_equals_one_process(ckpts, tmp_path):
    """Ground-truth pairs need no sampling: 3 ranks and one process accumulating the same global
    batch end with the same adapters and measure the same held-out pairs."""
    three = launch(3, "scripts.dpo_train", dpo_args(ckpts, tmp_path / "three"))
    assert "DPO plan: 3 process(es) on cpu" in three.stdout and "3 pairs/step (1 x 3 proc x 1 accum)" in three.stdout
    launch(0, "scripts.dpo_train", dpo_args(ckpts, tmp_path / "one", "--total-batch-size", "3"))
    assert max_diff(final_tensors(tmp_path / "three"), final_tensors(tmp_path / "one")) <= 1e-5
    reports = [json.load(open(tmp_path / o / "dpo_eval.json")) for o in ("three", "one")]
    assert reports[0]["start"] == reports[1]["start"] and reports[0]["final"]["pairs"]["arith_mc"]["n"] == 4


@pytest.mark.slow  # ~1 min on the loaded 2-core machine
def test_grpo_on_three_ranks_measures_what_one_process_measures(ckpts, tmp_path):
    three = launch(3, "scripts.grpo_train", grpo_args(ckpts, tmp_path / "three"))
    assert "GRPO plan: 3 process(es) on cpu" in three.stdout
    assert "6 completions/step (3 prompts x G=2; 1 prompts per process) x 2 steps" in three.stdout
    launch(0, "scripts.grpo_train", grpo_args(ckpts, tmp_path / "one", "--prompts-per-step", "3"))
    reports = [json.load(open(tmp_path / o / "grpo_eval.json")) for o in ("three", "one")]
    for key in ("start", "train_reward_start"):
        assert reports[0][key] == reports[1][key], key
    assert reports[0]["start"]["aqua_mc"]["n"] == 3 and "final" in reports[0]
    rows = [json.loads(line) for line in open(tmp_path / "three" / "metrics.jsonl")]
    assert [r["step"] for r in rows if "reward/mean" in r] == [1, 2]


STAR_WORKER = """
import sys
from nanostoney import star
from scripts import star_train
real = star.collect

def collect(model, tok, task, examples, args, info, seed, hint=False):
    real(model, tok, task, examples, args, info, seed, hint)   # sampling runs for real, on every rank
    # a random tiny model never answers right: pretend prompt 0 was solved, so the SFT round runs
    return [] if hint else [(0, "<think>x</think>\\nAnswer: " + examples[0]["answer"])]

star.collect = collect
sys.argv = ["star_train"] + sys.argv[1:]
star_train.cli.run_main(star_train.main)
"""


@pytest.mark.slow  # ~1 min on the loaded 2-core machine
def test_star_on_three_ranks(ckpts, tmp_path):
    worker = tmp_path / "star_worker.py"
    worker.write_text(STAR_WORKER)
    out = tmp_path / "star"
    args = ["--init", ckpts.sft, "--tasks", "aqua_mc", "--eval-tasks", "aqua_mc", "--rounds", "1",
            "--prompts-per-round", "3", "--samples-per-prompt", "2", "--max-new-tokens", "4",
            "--num-iterations", "1", "--eval-examples", "2", "--device-batch-size", "1", "--wandb", "disabled",
            "--out", str(out)]
    r = subprocess.run([*TORCHRUN, "--standalone", "--nproc_per_node=3", str(worker), *args], capture_output=True,
                       text=True, timeout=1200, env=env(), cwd=ROOT)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert "STaR plan: 3 process(es)" in r.stdout and "3 conversations/step" in r.stdout
    report = json.load(open(out / "star_eval.json"))
    assert report["rounds"][0]["kept_total"]["aqua_mc"] == 1


# -----------------------------------------------------------------------------
# several nodes (loopback)


def test_sft_on_two_nodes_equals_one_process(ckpts, tmp_path):
    outs = two_nodes("scripts.sft_train", sft_args(ckpts, tmp_path / "nodes"))
    for code, so, se in outs:
        assert code == 0, se[-3000:]
    assert "SFT plan: 2 process(es)" in outs[0][1]  # node 0 hosts rank 0, which prints
    launch(0, "scripts.sft_train", sft_args(ckpts, tmp_path / "one", "--total-batch-size", "4"))
    assert max_diff(final_tensors(tmp_path / "nodes"), final_tensors(tmp_path / "one")) <= 1e-5


@pytest.mark.slow  # ~1 min on the loaded 2-core machine
def test_grpo_on_two_nodes_equals_two_processes_on_one_node(ckpts, tmp_path):
    extra = ("--final-eval-examples", "0", "--probe-prompts", "0")
    outs = two_nodes("scripts.grpo_train", grpo_args(ckpts, tmp_path / "nodes", *extra))
    for code, so, se in outs:
        assert code == 0, se[-3000:]
    launch(2, "scripts.grpo_train", grpo_args(ckpts, tmp_path / "node", *extra))
    assert max_diff(final_tensors(tmp_path / "nodes"), final_tensors(tmp_path / "node")) <= 1e-5


def test_a_node_that_cannot_see_the_init_says_so(ckpts, tmp_path):
    """Node 1 starts in a directory without the checkpoint (a filesystem it does not share):
    every rank stops with the same one sentence instead of waiting on the others."""
    elsewhere = tmp_path / "node1"
    elsewhere.mkdir()
    args = sft_args(ckpts, "out")
    args[1] = "base"  # relative: present under node 0's directory only
    outs = two_nodes("scripts.sft_train", args, cwds=(ckpts.root, elsewhere), timeout=600)
    for code, _, se in outs:
        assert code != 0
        lines = [ln for ln in se.splitlines() if ln.startswith("error: ")]
        assert lines and "rank 1 on" in lines[0] and "cannot see --init base, which rank 0 sees" in lines[0], se
        assert "shared by every node" in lines[0]
        for ours in ("nanostoney", "scripts"):  # no traceback through our code (torchrun prints its own)
            assert f'File "{ROOT / ours}' not in se, se


# -----------------------------------------------------------------------------
# the done-when matrix: SFT, RM, GRPO at 8 ranks; base at 2; eval and report at 4


@pytest.mark.slow
@pytest.mark.parametrize("stage", ["sft", "rm", "grpo", "dpo"])
def test_eight_ranks_from_defaults_plus_sizes(ckpts, tmp_path, stage):
    module, args = {"sft": ("scripts.sft_train", sft_args), "rm": ("scripts.rm_train", rm_args),
                    "grpo": ("scripts.grpo_train", grpo_args), "dpo": ("scripts.dpo_train", dpo_args)}[stage]
    r = launch(8, module, args(ckpts, tmp_path / stage))
    assert "plan: 8 process(es) on cpu" in r.stdout
    assert checkpoint.latest_checkpoint(str(tmp_path / stage)) is not None


@pytest.mark.slow
def test_base_on_two_ranks_from_defaults_plus_sizes(tmp_path):
    from test_train import make_workspace
    ws = make_workspace(tmp_path / "ws")
    r = launch(2, "scripts.base_train", ["--tokenizer", str(ws.tok), "--data", str(ws.corpus), "--manifest",
                                         str(ws.manifest), "--depth", "1", "--head-dim", "32", "--sequence-len",
                                         "16", "--num-iterations", "3", "--eval-tokens", "256", "--sample-tokens",
                                         "4", "--wandb", "disabled", "--out", str(tmp_path / "base")])
    assert "base plan: 2 process(es) on cpu" in r.stdout
    assert "256 tokens/step (8 x 16 x 2 proc x 1 accum) x 3 steps = 768 tokens" in r.stdout and "epochs" in r.stdout


@pytest.mark.slow
def test_eval_and_report_on_four_ranks(ckpts, tmp_path):
    ck = ["--checkpoints", f"base={ckpts.base}", f"sft={ckpts.sft}"]
    r = launch(4, "scripts.eval", ck + ["--tasks", "aqua_mc", "--max-examples", "6", "--num-samples", "2",
                                       "--max-new-tokens", "6", "--n-boot", "50", "--no-mauve", "--wandb", "disabled",
                                       "--out", str(tmp_path / "eval.json")])
    assert "eval plan: 4 process(es) on cpu" in r.stdout
    assert set(json.load(open(tmp_path / "eval.json"))["checkpoints"]) == {"base", "sft"}
    r = launch(4, "scripts.compare_reasoning", ck + ["--tasks", "stoney_mc", "aqua_mc", "--max-examples", "2",
                                                    "--n-boot", "50", "--induction-seqs", "2", "--random-sets", "1",
                                                    "--out", str(tmp_path / "report")])
    assert "report plan: 4 process(es) on cpu" in r.stdout
    assert (tmp_path / "report" / "index.html").is_file()



def test_the_mid_stage_flags_of_the_web_speedrun_train(ckpts, tmp_path):
    """--pretrain web's mid stage (sft_train --full on eight tasks' chat format) runs with the flags
    the speedrun gives it, shrunk by later flags (argparse: the last one wins)."""
    plan = subprocess.run(["bash", str(ROOT / "run_stoney_small.sh"), "--plan", "--pretrain", "web",
                           "--out", str(tmp_path / "plan")], capture_output=True, text=True, timeout=600, env=env(),
                          cwd=ROOT)
    mid = next(line for line in plan.stdout.splitlines() if line.startswith("  mid:")).split()
    flags = mid[mid.index("scripts.sft_train") + 1:]
    flags = flags[:flags.index("--init")] + flags[flags.index("--init") + 2:]  # (its init is the web base)
    flags = [f for f in flags if f not in ("--wandb", "auto")]
    r = launch(0, "scripts.sft_train", [*flags, "--init", ckpts.base, "--out", str(tmp_path / "mid"),
                                        "--max-train-examples", "4", "--num-iterations", "2", "--device-batch-size",
                                        "2", "--total-batch-size", "4", "--eval-loss-examples", "2",
                                        "--final-eval-examples", "0", "--wandb", "disabled"])
    assert "SFT plan: 1 process(es)" in r.stdout and "full" in r.stdout.lower()
    assert checkpoint.latest_checkpoint(str(tmp_path / "mid")) is not None
