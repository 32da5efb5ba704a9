"""run_stoney_small.sh's modes, through --plan (prints every stage's command, runs none)."""
import subprocess

from test_train import ROOT, env


def speedrun(*args):
    return subprocess.run(["bash", str(ROOT / "run_stoney_small.sh"), "--plan", *args], capture_output=True,
                          text=True, timeout=600, env=env(), cwd=ROOT)


def stages(stdout):
    return [line.split(":")[0].strip() for line in stdout.splitlines() if line.startswith("  ")]


def test_from_nanochat_skips_tokenizer_and_pretraining(tmp_path):
    r = speedrun("--from-nanochat", "hf:owner/model", "--out", str(tmp_path / "o"))
    assert r.returncode == 0, r.stderr
    assert stages(r.stdout) == ["knowledge", "sft", "rm", "grpo", "eval", "report"]
    # the published model reads the bundled corpus first (the facts held-out Stoney questions ask about)
    assert "base_train --init hf:owner/model " in r.stdout and "--checkpoints base=hf:owner/model " in r.stdout
    assert "sft_train --init " + str(tmp_path / "o" / "knowledge") + " " in r.stdout
    assert not (tmp_path / "o" / ".mode").exists()  # a plan changes nothing


def test_bundled_plan_and_bad_modes(tmp_path):
    r = speedrun("--out", str(tmp_path / "o"))
    assert r.returncode == 0 and stages(r.stdout) == ["tokenizer", "base", "sft", "rm", "grpo", "eval", "report"]
    for args, says in ((["--pretrain", "books"], "is not a corpus"),
                       (["--pretrain", "web", "--from-nanochat", "x"], "pass one of them")):
        r = speedrun(*args, "--out", str(tmp_path / "o"))
        assert r.returncode == 2 and r.stderr.startswith("error: ") and says in r.stderr, r.stderr
    done = tmp_path / "done"
    done.mkdir()
    (done / ".done_tokenizer").touch()  # a bundled run's stage: not to be reused by another mode
    r = speedrun("--from-nanochat", "hf:owner/model", "--out", str(done))
    assert r.returncode == 2 and "holds stages of another run (bundled)" in r.stderr


def test_web_plan_on_cpu_shows_the_gpu_run_and_running_it_is_refused(tmp_path):
    r = speedrun("--pretrain", "web", "--out", str(tmp_path / "o"))
    assert r.returncode == 0, r.stderr
    assert stages(r.stdout) == ["corpus_head", "tokenizer", "corpus", "base", "knowledge", "mid", "sft", "rm", "grpo",
                                "eval", "report"]
    base = next(line for line in r.stdout.splitlines() if line.startswith("  base:"))
    assert "--depth 12" in base and "fineweb-edu-100b-shuffle" in base and "--total-batch-size 524288" in base
    assert "--num-iterations" not in base  # the steps come from 20 tokens per parameter
    assert "base_train --init " + str(tmp_path / "o" / "base") in r.stdout  # knowledge: the web base reads the facts
    assert "sft_train --init " + str(tmp_path / "o" / "knowledge") in r.stdout  # then the mid stage
    assert "sft_train --init " + str(tmp_path / "o" / "mid") in r.stdout  # SFT starts from the mid stage
    run = subprocess.run(["bash", str(ROOT / "run_stoney_small.sh"), "--pretrain", "web", "--out", str(tmp_path / "o")],
                         capture_output=True, text=True, timeout=600, env=env(), cwd=ROOT)
    assert run.returncode == 2 and run.stderr.startswith("error: ") and "needs GPUs" in run.stderr
    assert not (tmp_path / "o" / ".mode").exists() and not (tmp_path / "o" / ".lock").exists()  # nothing ran
