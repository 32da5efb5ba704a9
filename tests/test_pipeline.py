"""run_stoney_small.sh end to end: every stage under torchrun with 2 CPU processes (gloo), at the
script's tiny sizes (the same stage list as the real run, a few steps each)."""
import json
import os
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
STAGES = ["tokenizer", "base", "sft", "rm", "grpo", "eval", "report"]


def run_script(*args, timeout=3600):
    env = dict(os.environ, WANDB_MODE="disabled", CUDA_VISIBLE_DEVICES="", OMP_NUM_THREADS="1")
    env.pop("WANDB_API_KEY", None)
    return subprocess.run(["bash", str(ROOT / "run_stoney_small.sh"), *args], capture_output=True, text=True,
                          timeout=timeout, env=env, cwd=ROOT)


@pytest.mark.parametrize("args, words", [(["--nproc", "0"], "--nproc 0 is not a positive whole number"),
                                         (["--nproc", "two"], "--nproc two is not a positive whole number"),
                                         (["--size", "huge"], "--size huge is not one of tiny, cpu, cpu-long, gpu")])
def test_bad_options_stop_before_any_work(args, words, tmp_path):
    r = run_script(*args, "--out", str(tmp_path / "out"), timeout=60)
    lines = r.stderr.strip().splitlines()
    assert r.returncode == 2 and len(lines) == 1 and lines[0].startswith(f"error: {words}"), r.stderr
    assert not (tmp_path / "out").exists()


@pytest.mark.slow  # ~7 min on the loaded 2-core machine, ~2-3 min idle
def test_tiny_pipeline_on_two_cpu_processes(tmp_path):
    out = tmp_path / "out"
    r = run_script("--nproc", "2", "--size", "tiny", "--out", str(out))
    assert r.returncode == 0, r.stdout[-4000:] + r.stderr[-4000:]
    assert "nanostoney plan: 0 GPU(s), 2 process(es), tiny sizes, depth 2 on the bundled corpus" in r.stdout
    times = dict(line.split("\t") for line in (out / "stage_times.tsv").read_text().splitlines())
    assert list(times) == STAGES
    for stage in STAGES[1:]:  # every stage after the tokenizer states its plan for 2 processes
        log = (out / "logs" / f"{stage}.log").read_text()
        assert "plan: 2 process(es) on cpu" in log, stage
    results = json.loads((out / "eval" / "results.json").read_text())
    assert list(results["checkpoints"]) == ["base", "sft", "grpo"]
    assert (out / "report" / "index.html").is_file() and (out / "grpo" / "grpo_eval.json").is_file()
    again = run_script("--nproc", "2", "--size", "tiny", "--out", str(out), timeout=600)
    assert again.returncode == 0 and again.stdout.count("already done (skipped") == len(STAGES)
