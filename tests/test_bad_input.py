"""Issue 14, "nothing lost, ever": every bad input through the real entry points.

The table: each case runs one entry point (`python -m scripts.X ...`, or run_stoney_small.sh) and
checks the exit code, exactly one line on stderr that names the flag or the path, no traceback,
and that every file that existed before (the shared checkpoints, the case's own files: a user's
notes, an earlier run) is byte for byte the same afterwards; a refused case (exit 2) writes
nothing at all. Python entry points run through tests/entry_server.py: `python -m`'s own code
path (runpy, "__main__") in a forked process, so the imports are paid once, not per case.

Then the behaviours that need a live process: the lock (a second run on the same --out), Ctrl-C,
a closed stdout, a disk that fills up during a checkpoint and during the eval write, W&B that
cannot be reached, and (slow) a speedrun stage killed midway that resumes.
"""
import hashlib
import json
import os
import re
import resource
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import torch

from nanostoney import checkpoint, cli, lora
from nanostoney.errors import RunFailed, UserError
from test_train import make_workspace

ROOT = Path(__file__).resolve().parent.parent
PY = sys.executable


def env(**extra):
    e = {k: v for k, v in os.environ.items() if not k.startswith("WANDB")}
    e.update(OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1", WANDB_SILENT="true", PYTHONPATH=str(ROOT), **extra)
    return e


def tiny_base(ws, out, *extra):
    """Arguments of a tiny base_train run on the workspace (depth 1, 16-token rows)."""
    return ["--tokenizer", f"{ws}/tok", "--data", f"{ws}/corpus.jsonl", "--manifest", f"{ws}/MANIFEST.yml",
            "--depth", "1", "--head-dim", "32", "--sequence-len", "16", "--device-batch-size", "2",
            "--total-batch-size", "64", "--num-iterations", "8", "--eval-every", "4", "--eval-tokens", "256",
            "--sample-tokens", "0", "--save-every", "4", "--entropy-every", "0", "--keep-last", "0",
            "--wandb", "disabled", "--device", "cpu", "--out", str(out), *extra]


def snapshot(*roots):
    """{path: sha256 (or "dir")} of everything under the roots (the lock a live run holds aside)."""
    out = {}
    for root in roots:
        for p in sorted(Path(root).rglob("*")):
            if p.is_dir():
                out[str(p)] = "dir"
            elif not p.name.endswith(".lock"):
                out[str(p)] = hashlib.sha256(p.read_bytes()).hexdigest()
    return out


PROGRESS = re.compile(r"\d+%\|.*\| *\d+/\d+")  # a tqdm bar: progress, not a message


def error_lines(stderr):
    """The lines of stderr, without the progress bars of a run that did some work."""
    return [ln for ln in stderr.replace("\r", "\n").splitlines() if ln.strip() and not PROGRESS.search(ln)]


# -----------------------------------------------------------------------------
# shared workspace: corpus, tokenizer, a base run at steps 4 and 8, LoRA adapters on it


@pytest.fixture(scope="module")
def ws(tmp_path_factory):
    root = tmp_path_factory.mktemp("bad_input")
    make_workspace(root)
    r = subprocess.run([PY, "-m", "scripts.base_train", *tiny_base(root, root / "R")], capture_output=True,
                       text=True, env=env(), cwd=ROOT, timeout=900)
    assert r.returncode == 0, r.stderr[-3000:]
    model, tok, ckpt, base = checkpoint.load_for_training(str(root / "R"), rank=2, alpha=4.0, targets="attn")
    checkpoint.save_checkpoint(str(root / "sft"), model, 1, base_checkpoint=base, tokenizer=tok)
    return root


class EntryServer:
    def __init__(self):
        self.proc = subprocess.Popen([PY, str(ROOT / "tests" / "entry_server.py")], stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, text=True, env=env(), cwd=ROOT)
        self.lock = threading.Lock()

    def run(self, module, argv, cwd, env, tmp):
        req = {"module": module, "argv": argv, "cwd": str(cwd), "env": env,
               "stdout": str(tmp / "stdout"), "stderr": str(tmp / "stderr")}
        with self.lock:
            self.proc.stdin.write(json.dumps(req) + "\n")
            self.proc.stdin.flush()
            code = json.loads(self.proc.stdout.readline())["code"]
        return code, (tmp / "stdout").read_text(), (tmp / "stderr").read_text()

    def close(self):
        self.proc.stdin.close()
        self.proc.wait(timeout=60)


@pytest.fixture(scope="module")
def server():
    s = EntryServer()
    yield s
    s.close()


# -----------------------------------------------------------------------------
# the table


@dataclass
class Case:
    name: str
    argv: list            # entry point (scripts.X, bench.X or run_stoney_small.sh) and its arguments
    code: int             # expected exit code
    names: str            # the one stderr line must contain this (the flag or the path)
    setup: object = None  # setup(case_dir, ws): files the case starts from
    says: list = field(default_factory=list)  # more text the line must contain
    check: object = None  # check(case_dir, stderr line): what a failed run must have kept


def notes_dir(d, ws):
    (d / "notes").mkdir()
    (d / "notes" / "notes.txt").write_text("my own notes\n")


def a_file(d, ws):
    (d / "file").write_text("not a directory\n")


def live_lock(d, ws):
    (d / "locked").mkdir()
    (d / "locked" / ".lock").write_text(json.dumps({"pid": os.getpid(), "host": os.uname().nodename,
                                                    "command": "python -m scripts.base_train (the other run)",
                                                    "started": "2025-01-01 00:00:00"}))


def their_json(d, ws):
    (d / "theirs.json").write_text('{"mine": true}\n')


def step_dir(d, ws, meta):
    shutil.copytree(ws / "R" / "step_000008", d / "ck")
    (d / "ck" / "meta.json").write_text(json.dumps(meta))


def truncated_adapters(d, ws):
    shutil.copytree(ws / "sft", d / "sft")
    f = d / "sft" / "step_000001" / lora.ADAPTER_FILE
    f.write_bytes(f.read_bytes()[:100])


def manifest_not_utf8(d, ws):
    (d / "MANIFEST.yml").write_bytes((ws / "MANIFEST.yml").read_bytes().replace(b"test_corpus", b"caf\xe9"))


def sweep_yaml(text):
    def setup(d, ws):
        (d / "sweep.yaml").write_bytes(text)
    return setup


def malformed(d, ws):
    shutil.copy(ws / "MANIFEST.yml", d / "MANIFEST.yml")
    (d / "bad.jsonl").write_text('{"text": "fine"}\n{"text": broken\n')


def approved_missing(d, ws):
    shutil.copy(ws / "MANIFEST.yml", d / "MANIFEST.yml")


def their_report(d, ws):
    """A user's own site: an index.html, a metrics.json and figures/ of theirs."""
    (d / "site" / "figures").mkdir(parents=True)
    (d / "site" / "index.html").write_text("<p>my site</p>\n")
    (d / "site" / "metrics.json").write_text('{"mine": true}\n')
    (d / "site" / "figures" / "my_plot.png").write_bytes(b"\x89PNG mine")


def their_tokenizer(d, ws):
    (d / "hf").mkdir()
    (d / "hf" / "tokenizer.json").write_text('{"mine": true}\n')


def their_results(d, ws):
    (d / "mine").mkdir()
    (d / "mine" / "results.json").write_text('{"mine": true}\n')
    (d / "mine" / "results.md").write_text("my table\n")


def their_metrics(d, ws):
    (d / "mine").mkdir()
    (d / "mine" / "metrics.jsonl").write_text('{"mine": true}\n')


def our_tokenizer(d, ws):
    """A tokenizer folder an earlier tok_train made (our marker in it)."""
    shutil.copytree(ws / "tok", d / "tok")
    (d / "tok" / cli.MARKER).write_text("{}\n")


def other_tokenizer(d, ws):
    """The base run R, and a tokenizer of the same vocabulary size trained on other text."""
    from nanostoney.tokenizer import Tokenizer
    shutil.copytree(ws / "R", d / "R")
    import random
    rng = random.Random(1)
    words = ["".join(rng.choice("qxzjvkwy") for _ in range(rng.randint(2, 7))) for _ in range(400)]
    tok = Tokenizer.train([" ".join(rng.choice(words) for _ in range(30)) for _ in range(300)], 300)
    assert tok.vocab_size == 300  # the same size as the run's: only the merges differ
    tok.save(str(d / "tok2"))


def look_alike_stoney(d, ws):
    """A private file named like the approved Stoney set, with other content."""
    (d / "stoney").mkdir()
    (d / "stoney" / "stoney_valid.jsonl").write_text('{"text": "private words, never reviewed"}\n' * 50)


def pooled_manifests(d, ws):
    """Two manifests: one approves every *.jsonl beside it, the other marks x.jsonl unknown."""
    (d / "x.jsonl").write_text('{"text": "under review"}\n' * 50)
    (d / "broad.yml").write_text((ws / "MANIFEST.yml").read_text())
    (d / "narrow").mkdir()
    (d / "narrow" / "M.yml").write_text((ws / "MANIFEST.yml").read_text().replace("test_corpus", "under_review")
                                        .replace('"*.jsonl"', '"x.jsonl"').replace("approved_for_training", "unknown"))


def int_column(d, ws):
    import pyarrow as pa
    import pyarrow.parquet as pq
    pq.write_table(pa.table({"text": list(range(100))}), d / "ints.parquet")
    (d / "M.yml").write_text((ws / "MANIFEST.yml").read_text().replace('"*.jsonl"', '"*.parquet"'))


def old_lock_dir(d, ws):
    """A `.lock` nobody can read or remove as a file (a directory), left long ago."""
    (d / "o" / ".lock").mkdir(parents=True)
    os.utime(d / "o" / ".lock", (time.time() - 3600, time.time() - 3600))


BASE = "scripts.base_train"
EVAL_QUICK = ["--tasks", "stoney_mc", "--max-examples", "1", "--num-samples", "0", "--no-mauve", "--no-comet",
              "--wandb", "disabled", "--device", "cpu"]
SPEEDRUN = "run_stoney_small.sh"

CASES = [
    # flags refused where they are parsed
    Case("depth_0", [BASE, "--depth", "0"], 2, "--depth"),
    *([] if torch.cuda.is_available() else [Case("device_cuda_without_a_gpu", [BASE, "--device", "cuda"], 2,
                                                 "--device", None, ["no usable CUDA GPU"])]),
    Case("depth_negative", [BASE, "--depth", "-2"], 2, "--depth"),
    Case("depth_without_value", [BASE, "--depth"], 2, "--depth"),
    Case("sequence_len_0", [BASE, "--sequence-len", "0"], 2, "--sequence-len"),
    Case("device_batch_size_0", [BASE, "--device-batch-size", "0"], 2, "--device-batch-size"),
    Case("num_iterations_negative", [BASE, "--num-iterations", "-1"], 2, "--num-iterations"),
    Case("matrix_lr_nan", [BASE, "--matrix-lr", "nan"], 2, "--matrix-lr"),
    Case("warmdown_ratio_1_5", [BASE, "--warmdown-ratio", "1.5"], 2, "--warmdown-ratio"),
    Case("misspelt_flag", [BASE, "--depht", "3"], 2, "--depht"),
    Case("sft_lr_nan", ["scripts.sft_train", "--lr", "nan"], 2, "--lr"),
    Case("rm_lr_negative", ["scripts.rm_train", "--lr", "-1"], 2, "--lr"),
    Case("grpo_prompts_per_step_0", ["scripts.grpo_train", "--prompts-per-step", "0"], 2, "--prompts-per-step"),
    Case("grpo_temperature_nan", ["scripts.grpo_train", "--temperature", "nan"], 2, "--temperature"),
    Case("grpo_clip_eps_0", ["scripts.grpo_train", "--clip-eps", "0"], 2, "--clip-eps"),
    Case("star_samples_per_prompt_0", ["scripts.star_train", "--samples-per-prompt", "0"], 2, "--samples-per-prompt"),
    Case("star_rounds_0", ["scripts.star_train", "--rounds", "0"], 2, "--rounds"),
    Case("dpo_beta_0", ["scripts.dpo_train", "--beta", "0"], 2, "--beta"),
    Case("dpo_pairs_unknown", ["scripts.dpo_train", "--pairs", "mined"], 2, "--pairs"),
    Case("eval_num_samples_negative", ["scripts.eval", "--checkpoints", "x", "--num-samples", "-1"], 2,
         "--num-samples"),
    Case("eval_temperature_inf", ["scripts.eval", "--checkpoints", "x", "--temperature", "inf"], 2, "--temperature"),
    Case("report_max_examples_0", ["scripts.compare_reasoning", "--checkpoints", "x", "--max-examples", "0"], 2,
         "--max-examples"),
    Case("tok_vocab_size_0", ["scripts.tok_train", "--vocab-size", "0"], 2, "--vocab-size"),
    Case("bench_batch_0", ["bench.model_bench", "--batch", "0"], 2, "--batch"),
    Case("drills_grow_not_pairs", ["bench.induction_drills", "--grow", "64:x"], 2, "--grow"),
    Case("drills_rows_0", ["bench.induction_drills", "--rows", "0"], 2, "--rows"),
    Case("drills_local_above_alphabet", ["bench.induction_drills", "--tokenizer", "{ws}/tok", "--alphabet", "16",
                                         "--local", "17"], 2, "--local"),
    Case("copy_row_longer_than_model", ["scripts.copy_train", "--tokenizer", "{ws}/tok", "--sequence-len", "32",
                                        "--row-len", "64"], 2, "--row-len"),
    Case("copy_tokenizer_missing", ["scripts.copy_train", "--tokenizer", "{d}/no_tok", "--out", "{d}/o"], 2,
         "{d}/no_tok"),
    Case("augment_out_of_range", [BASE, "--augment", "999"], 2, "--augment"),
    Case("corpus_task_unknown", [BASE, "--corpus-tasks", "gsm9k"], 2, "gsm9k"),
    Case("corpus_task_is_a_control", ["scripts.tok_train", "--corpus-tasks", "stoney_qa_unseen"], 2,
         "stoney_qa_unseen", None, ["control"]),
    Case("sft_max_train_examples_negative", ["scripts.sft_train", "--max-train-examples", "-3"], 2,
         "--max-train-examples"),
    Case("grpo_final_eval_examples_negative", ["scripts.grpo_train", "--final-eval-examples", "-3"], 2,
         "--final-eval-examples"),
    Case("rm_eval_sampled_negative", ["scripts.rm_train", "--eval-sampled", "-3"], 2, "--eval-sampled"),
    # combinations refused at the start, before any work
    Case("tasks_weight_nan", ["scripts.sft_train", "--tasks", "stoney_mc=nan", "--out", "{d}/o"], 2, "--tasks"),
    Case("sft_trains_on_a_control", ["scripts.sft_train", "--tasks", "stoney_mc_unseen=1", "--out", "{d}/o"], 2,
         "stoney_mc_unseen", None, ["control"]),
    Case("rm_trains_on_a_control", ["scripts.rm_train", "--tasks", "stoney_mc_unseen", "--out", "{d}/o"], 2,
         "stoney_mc_unseen", None, ["control"]),
    Case("grpo_temperature_0", ["scripts.grpo_train", "--temperature", "0", "--out", "{d}/o"], 2, "--temperature"),
    Case("grpo_rewards_all_0", ["scripts.grpo_train", "--rewards", "accuracy=0,format=0", "--out", "{d}/o"], 2,
         "--rewards"),
    Case("grpo_reward_weight_nan", ["scripts.grpo_train", "--rewards", "accuracy=nan", "--out", "{d}/o"], 2,
         "accuracy"),
    Case("grpo_reward_model_missing", ["scripts.grpo_train", "--rewards", "accuracy=1,reward_model=1",
                                       "--out", "{d}/o"], 2, "--reward-model"),
    Case("head_dim_1", [BASE, *tiny_base("{ws}", "{d}/o", "--head-dim", "1")], 2, "--head-dim"),
    Case("batch_not_a_multiple", [BASE, *tiny_base("{ws}", "{d}/o", "--total-batch-size", "100")], 2,
         "--total-batch-size"),
    Case("dpo_compile", ["scripts.dpo_train", "--compile", "--out", "{d}/o"], 2, "--compile"),
    Case("dpo_init_missing", ["scripts.dpo_train", "--init", "{d}/no_sft", "--out", "{d}/o"], 2, "--init"),
    Case("rm_resume", ["scripts.rm_train", "--resume", "--out", "{d}/o"], 2, "--resume", None, ["--overwrite"]),
    Case("speedrun_depth_without_value", [SPEEDRUN, "--depth"], 2, "--depth"),
    Case("speedrun_depth_not_a_number", [SPEEDRUN, "--depth", "big"], 2, "--depth"),
    Case("speedrun_unknown_option", [SPEEDRUN, "--fast"], 2, "--fast"),
    # output paths: never destroyed, checked before any work
    Case("out_is_a_file", [BASE, *tiny_base("{ws}", "{d}/file")], 2, "{d}/file", a_file),
    Case("out_under_a_file", [BASE, *tiny_base("{ws}", "{d}/file/run")], 2, "{d}/file/run", a_file),
    Case("out_not_writable", [BASE, *tiny_base("{ws}", "/sys/nanostoney_out")], 2, "/sys/nanostoney_out"),
    Case("eval_out_not_writable", ["scripts.eval", "--checkpoints", "{ws}/R", "--out", "/sys/nanostoney/r.json",
                                   *EVAL_QUICK], 2, "/sys/nanostoney/r.json"),
    Case("out_holds_their_files", [BASE, *tiny_base("{ws}", "{d}/notes")], 2, "{d}/notes", notes_dir,
         ["notes.txt", "--overwrite"]),
    Case("out_holds_a_run", [BASE, *tiny_base("{ws}", "{ws}/R")], 2, "{ws}/R", None, ["--resume"]),
    Case("resume_below_saved_step", [BASE, *tiny_base("{ws}", "{ws}/R", "--resume", "--num-iterations", "4")], 2,
         "--num-iterations", None, ["step 8"]),
    Case("resume_at_saved_step", [BASE, *tiny_base("{ws}", "{ws}/R", "--resume", "--num-iterations", "8")], 2,
         "--num-iterations"),
    Case("resume_under_a_later_step", [BASE, *tiny_base("{ws}", "{ws}/R", "--resume", "{ws}/R/step_000004",
                                                         "--num-iterations", "12")], 2, "step_000008"),
    Case("out_locked_by_a_live_run", [BASE, *tiny_base("{ws}", "{d}/locked")], 2, f"pid {os.getpid()}", live_lock,
         ["in use"]),
    Case("eval_out_is_a_directory", ["scripts.eval", "--checkpoints", "{ws}/R", "--out", "{d}", *EVAL_QUICK], 2,
         "is a directory"),
    Case("eval_out_is_their_file", ["scripts.eval", "--checkpoints", "{ws}/R", "--out", "{d}/theirs.json",
                                    *EVAL_QUICK], 2, "{d}/theirs.json", their_json, ["--overwrite"]),
    Case("report_out_holds_their_files", ["scripts.compare_reasoning", "--checkpoints", "b={ws}/R",
                                          "--out", "{d}/notes"], 2, "{d}/notes", notes_dir, ["--overwrite"]),
    Case("report_cloze_open_task", ["scripts.compare_reasoning", "--checkpoints", "b={ws}/R", "--tasks", "stoney_mc",
                                    "arith", "--context", "cloze", "--out", "{d}/rep"], 2, "--context cloze"),
    Case("tokenizer_out_holds_their_files", ["scripts.tok_train", "--out", "{d}/notes"], 2, "{d}/notes", notes_dir),
    Case("sweep_out_holds_their_files", ["scripts.sweep", "--out", "{d}/notes"], 2, "{d}/notes", notes_dir),
    # damaged inputs
    Case("meta_without_step", ["scripts.eval", "--checkpoints", "{d}/ck", "--out", "{d}/r.json", *EVAL_QUICK], 2,
         "{d}/ck/meta.json", lambda d, ws: step_dir(d, ws, {"format": "nanostoney-checkpoint-1"})),
    Case("meta_is_a_list", ["scripts.eval", "--checkpoints", "{d}/ck", "--out", "{d}/r.json", *EVAL_QUICK], 2,
         "{d}/ck/meta.json", lambda d, ws: step_dir(d, ws, [1, 2])),
    Case("truncated_adapters", ["scripts.eval", "--checkpoints", "{d}/sft", "--out", "{d}/r.json", *EVAL_QUICK], 2,
         "adapters.pt", truncated_adapters),
    Case("manifest_not_utf8", ["scripts.check_data", "--manifest", "{d}/MANIFEST.yml", "{ws}/corpus.jsonl"], 2,
         "{d}/MANIFEST.yml", manifest_not_utf8),
    Case("sweep_yaml_not_utf8", ["scripts.sweep", "--config", "{d}/sweep.yaml", "--out", "{d}/o"], 2,
         "{d}/sweep.yaml", sweep_yaml(b"program: scripts/sft_train.py\nparameters:\n  lr: {values: [1]}\n# caf\xe9\n")),
    Case("sweep_without_points", ["scripts.sweep", "--config", "{d}/sweep.yaml", "--out", "{d}/o"], 2, "lr",
         sweep_yaml(b"program: scripts/sft_train.py\nparameters:\n  lr: {values: []}\n")),
    Case("check_data_missing_file", ["scripts.check_data", "--manifest", "{d}/MANIFEST.yml", "{d}/gone.jsonl"], 2,
         "{d}/gone.jsonl", approved_missing),
    Case("check_data_malformed_file", ["scripts.check_data", "--manifest", "{d}/MANIFEST.yml", "{d}/bad.jsonl"], 2,
         "{d}/bad.jsonl:2", malformed),
    Case("tok_train_malformed_file", ["scripts.tok_train", "--data", "{d}/bad.jsonl", "--manifest", "{d}/MANIFEST.yml",
                                      "--out", "{d}/tok"], 2, "{d}/bad.jsonl:2", malformed),
    # issue 29: a folder is ours only by its marker; an output is never an input; approval binds to content
    Case("report_out_is_their_site", ["scripts.compare_reasoning", "--checkpoints", "b={ws}/R", "--out", "{d}/site"],
         2, "{d}/site", their_report, ["index.html", "--overwrite"]),
    Case("report_overwrite_their_site", ["scripts.compare_reasoning", "--checkpoints", "b={ws}/R", "--out",
                                         "{d}/site", "--overwrite"], 2, "{d}/site", their_report, ["figures"]),
    Case("tokenizer_overwrite_their_tokenizer", ["scripts.tok_train", "--out", "{d}/hf", "--overwrite"], 2, "{d}/hf",
         their_tokenizer, ["tokenizer.json"]),
    Case("sweep_overwrite_their_results", ["scripts.sweep", "--out", "{d}/mine", "--overwrite"], 2, "{d}/mine",
         their_results, ["results.json"]),
    Case("base_overwrite_their_metrics", [BASE, *tiny_base("{ws}", "{d}/mine", "--overwrite")], 2, "{d}/mine",
         their_metrics, ["metrics.jsonl"]),
    Case("eval_out_and_completions_the_same", ["scripts.eval", "--checkpoints", "{ws}/R", "--out", "{d}/r.json",
                                               "--completions", "{d}/r.json", *EVAL_QUICK], 2, "--completions",
         None, ["same path"]),
    Case("eval_out_inside_a_checkpoint", ["scripts.eval", "--checkpoints", "{ws}/R", "--out", "{ws}/R/r.json",
                                          *EVAL_QUICK], 2, "{ws}/R/r.json", None, ["inside"]),
    Case("sft_out_is_its_init", ["scripts.sft_train", "--init", "{ws}/R", "--out", "{ws}/R", "--overwrite"], 2,
         "--init {ws}/R", None, ["--out {ws}/R"]),
    Case("sft_out_is_its_init_without_overwrite", ["scripts.sft_train", "--init", "{ws}/R", "--out", "{ws}/R"], 2,
         "--init {ws}/R"),
    Case("grpo_out_is_its_init", ["scripts.grpo_train", "--init", "{ws}/sft", "--out", "{ws}/sft", "--overwrite"], 2,
         "--init {ws}/sft"),
    Case("sft_out_inside_its_init", ["scripts.sft_train", "--init", "{ws}/R", "--out", "{ws}/R/step_000008/sft"], 2,
         "--init {ws}/R", None, ["inside"]),
    Case("base_out_holds_its_tokenizer", [BASE, *tiny_base("{ws}", "{ws}")], 2, "--tokenizer {ws}/tok", None,
         ["holds"]),
    Case("look_alike_stoney_file", [BASE, *tiny_base("{ws}", "{d}/o")[:2], "--data", "{d}/stoney/stoney_valid.jsonl",
                                    *tiny_base("{ws}", "{d}/o")[6:]], 2, "{d}/stoney/stoney_valid.jsonl",
         look_alike_stoney, ["stoney_valid_jsonl", "content"]),
    Case("pooled_record_does_not_override_unknown", ["scripts.check_data", "--manifest", "{d}/broad.yml",
                                                     "--manifest", "{d}/narrow/M.yml", "{d}/x.jsonl"], 2,
         "{d}/x.jsonl", pooled_manifests, ["under_review", "most restrictive"]),
    Case("resume_with_another_tokenizer", [BASE, *tiny_base("{ws}", "{d}/R", "--tokenizer", "{d}/tok2", "--resume",
                                                            "--num-iterations", "12")], 2, "tokenizer", other_tokenizer),
    Case("tok_train_over_our_tokenizer", ["scripts.tok_train", "--out", "{d}/tok"], 2, "{d}/tok", our_tokenizer,
         ["tokenizer", "--overwrite"]),
    Case("device_bogus", [BASE, "--device", "bogus"], 2, "--device"),
    Case("depth_100000", [BASE, *tiny_base("{ws}", "{d}/o", "--depth", "100000")], 2, "--depth 100000"),
    Case("out_empty", [BASE, *tiny_base("{ws}", "")], 2, "--out"),
    Case("lora_rank_above_the_width", ["scripts.sft_train", "--init", "{ws}/R", "--lora-rank", "100000", "--out",
                                       "{d}/o"], 2, "rank 100000", None, ["at most 64"]),
    Case("download_tokens_nan", ["scripts.download_corpus", "--tokens", "nan", "--out", "{d}/o"], 2, "--tokens"),
    Case("download_tokens_inf", ["scripts.download_corpus", "--tokens", "inf", "--out", "{d}/o"], 2, "--tokens"),
    Case("download_out_is_a_file", ["scripts.download_corpus", "--num-shards", "1", "--out", "{d}/file"], 2,
         "{d}/file", a_file),
    Case("download_out_holds_their_files", ["scripts.download_corpus", "--num-shards", "1", "--out", "{d}/notes"], 2,
         "{d}/notes", notes_dir),
    Case("sweep_values_not_a_list", ["scripts.sweep", "--config", "{d}/sweep.yaml", "--out", "{d}/o"], 2, "lr",
         sweep_yaml(b"program: scripts/sft_train.py\nparameters:\n  lr: {values: 5}\n")),
    Case("sweep_program_not_a_script", ["scripts.sweep", "--config", "{d}/sweep.yaml", "--out", "{d}/o"], 2,
         "/etc/passwd", sweep_yaml(b"program: /etc/passwd\nparameters:\n  lr: {values: [1]}\n")),
    Case("parquet_text_column_of_integers", [BASE, *tiny_base("{ws}", "{d}/o")[:2], "--data", "{d}/ints.parquet",
                                             "--manifest", "{d}/M.yml", *tiny_base("{ws}", "{d}/o")[6:]], 2,
         "{d}/ints.parquet", int_column, ["int64", "--text-column"]),
    Case("speedrun_out_holds_their_files", [SPEEDRUN, "--out", "{d}/notes"], 2, "{d}/notes", notes_dir),
    Case("lock_that_cannot_be_removed", [BASE, *tiny_base("{ws}", "{d}/o")], 2, "{d}/o/.lock", old_lock_dir),
    # runs that fail: one sentence, exit 1, what was finished stays
    Case("loss_becomes_nan", [BASE, *tiny_base("{ws}", "{d}/nan", "--matrix-lr", "1e30", "--embedding-lr", "1e30",
                                               "--save-every", "1", "--eval-every", "0")], 1, "training stopped at step",
         None, ["nothing of this step was saved"], lambda d, line: kept_last_good(d / "nan", line)),
    Case("sweep_every_point_fails", ["scripts.sweep", "--config", "{d}/sweep.yaml", "--out", "{d}/o", "--",
                                     "--init", "{d}/no_such_checkpoint"], 1, "every point",
         sweep_yaml(b"program: scripts/sft_train.py\nparameters:\n  lr: {values: [0.001, 0.002]}\n")),
]


def kept_last_good(out, line):
    """The run stopped at step N on a NaN: latest is step N-1, whole and finite; N was not saved."""
    step = int(line.split("training stopped at step ")[1].split(":")[0])
    assert (out / "latest").read_text().strip() == checkpoint.step_dir_name(step - 1)
    assert not (out / checkpoint.step_dir_name(step)).exists()
    model, _, meta = checkpoint.load_model(str(out))
    assert meta["step"] == step - 1 and all(torch.isfinite(p).all() for p in model.parameters())


def fill(arg, d, ws):
    return arg.replace("{d}", str(d)).replace("{ws}", str(ws))


def run_case(case, d, ws, server):
    argv = [fill(a, d, ws) for a in case.argv]
    if argv[0] == SPEEDRUN:  # a shell script: a real process
        r = subprocess.run(["bash", str(ROOT / SPEEDRUN), *argv[1:]], capture_output=True, text=True, env=env(),
                           cwd=d, timeout=120)
        return r.returncode, r.stdout, r.stderr
    io = d.parent / f"{d.name}.io"
    io.mkdir()
    return server.run(argv[0], argv[1:], d, env(), io)


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_bad_input(case, ws, server, tmp_path):
    d = tmp_path / "case"
    d.mkdir()
    if case.setup:
        case.setup(d, ws)
    shared = [ws / "R", ws / "sft", ws / "tok"]
    before = snapshot(d, *shared)
    code, out, err = run_case(case, d, ws, server)
    lines = error_lines(err)
    assert code == case.code, f"exit {code}, stderr:\n{err[-3000:]}"
    assert "Traceback" not in err and "Traceback" not in out
    assert len(lines) == 1, f"expected one line on stderr, got:\n{err[-3000:]}"
    assert lines[0].startswith("error: "), lines[0]
    for text in [case.names] + case.says:
        assert fill(text, d, ws) in lines[0], lines[0]
    after = snapshot(d, *shared)
    assert {p: h for p, h in after.items() if p in before} == before, "a file that existed was changed or deleted"
    if case.code == 2:
        assert after == before, f"a refused run wrote {sorted(set(after) - set(before))}"
    if case.check:
        case.check(d, lines[0])


# -----------------------------------------------------------------------------
# the runner: one sentence for the unexpected, the traceback in a log, --debug prints it


def test_unexpected_error_is_one_sentence_naming_the_stage_and_the_log(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))  # where a log goes when there is no --out
    out = tmp_path / "run"
    monkeypatch.setattr(sys, "argv", ["scripts.base_train", "--out", str(out)])

    def main():
        cli.claim_out(str(out))
        {}["missing"]
    with pytest.raises(SystemExit) as e:
        cli.run_main(main)
    err = capsys.readouterr().err
    assert e.value.code == 1 and len(error_lines(err)) == 1 and "Traceback" not in err
    log = out / "logs" / f"{cli.stage_name()}-error.log"
    assert f"the traceback is in {log}" in err and "KeyError" in err and "--debug" in err
    assert "Traceback" in log.read_text() and not (out / ".lock").exists()
    monkeypatch.setattr(sys, "argv", ["scripts.base_train", "--debug"])
    with pytest.raises(SystemExit):
        cli.run_main(lambda: {}["missing"])
    err = capsys.readouterr().err
    assert "Traceback" in err and f"the traceback is in {tmp_path}" in err


def test_user_error_and_run_failed_exit_codes(capsys):
    for exc, code in ((UserError("bad flag; fix it."), 2), (RunFailed("the disk is full."), 1)):
        def main():
            raise exc
        with pytest.raises(SystemExit) as e:
            cli.run_main(main)
        assert e.value.code == code and capsys.readouterr().err == f"error: {exc}\n"


# -----------------------------------------------------------------------------
# live processes: the lock, Ctrl-C, a closed stdout


def start_base(ws, out, *extra):
    return subprocess.Popen([PY, "-m", "scripts.base_train", *tiny_base(ws, out, *extra)], env=env(), cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def wait_for(path, proc, timeout=600):
    deadline = time.time() + timeout
    while not Path(path).exists():
        assert proc.poll() is None, proc.communicate()[1][-3000:]
        assert time.time() < deadline
        time.sleep(0.05)


def test_second_run_on_the_same_out_is_refused_and_names_the_first(ws, tmp_path):
    out = tmp_path / "run"
    first = start_base(ws, out, "--num-iterations", "100000", "--save-every", "2", "--eval-every", "0")
    wait_for(out / "latest", first)  # running, with a checkpoint: the second run still hears who holds it
    second = subprocess.run([PY, "-m", "scripts.base_train", *tiny_base(ws, out, "--resume")], capture_output=True,
                            text=True, env=env(), cwd=ROOT, timeout=600)
    assert second.returncode == 2 and len(error_lines(second.stderr)) == 1, second.stderr
    assert f"in use by pid {first.pid}" in second.stderr and "scripts.base_train" in second.stderr
    assert first.poll() is None, "the first run stopped"
    first.send_signal(signal.SIGTERM)  # a kill that can be caught: the lock goes, the checkpoints stay
    _, err = first.communicate(timeout=900)
    assert first.returncode == 128 + signal.SIGTERM and error_lines(err) == [
        "stopped: base_train received SIGTERM; checkpoints and outputs already written are intact."]
    configs = [ln for ln in open(out / "metrics.jsonl") if '"event": "config"' in ln]
    assert len(configs) == 1, "the refused run wrote into the first run's metrics"
    assert not (out / ".lock").exists() and checkpoint.latest_checkpoint(str(out))


def test_stale_lock_of_a_dead_process_is_taken_over(ws, tmp_path):
    dead = subprocess.Popen([PY, "-c", "pass"])
    dead.wait()
    out = tmp_path / "run"
    out.mkdir()
    (out / ".lock").write_text(json.dumps({"pid": dead.pid, "host": os.uname().nodename, "command": "old",
                                           "started": "2025-01-01 00:00:00"}))
    r = subprocess.run([PY, "-m", "scripts.base_train", *tiny_base(ws, out, "--num-iterations", "2",
                                                                    "--eval-every", "0", "--save-every", "0")],
                       capture_output=True, text=True, env=env(), cwd=ROOT, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    assert f"taking over the stale lock {out / '.lock'} (pid {dead.pid}" in r.stderr
    assert not (out / ".lock").exists() and (out / "latest").exists()


def test_ctrl_c_exits_130_with_one_line_and_keeps_the_checkpoint(ws, tmp_path):
    out = tmp_path / "run"
    proc = start_base(ws, out, "--num-iterations", "2000", "--save-every", "2", "--eval-every", "0")
    wait_for(out / "latest", proc)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=600)
    assert proc.returncode == 130, err[-3000:]
    assert "Traceback" not in err and error_lines(err) == [
        "interrupted: base_train stopped by Ctrl-C; checkpoints and outputs already written are intact."]
    assert not (out / ".lock").exists() and not [p for p in os.listdir(out) if ".tmp-" in p]
    assert checkpoint.load_model(str(out))[2]["step"] >= 2


def test_ctrl_c_while_importing_exits_130_in_one_line(ws, tmp_path):
    """Ctrl-C in the first second, while torch and the package are still being imported: no
    KeyboardInterrupt traceback from inside an import, exit 130, nothing written."""
    out = tmp_path / "run"
    proc = start_base(ws, out)
    # a signal between fork and exec is lost with the forked image: wait for the exec first
    deadline = time.time() + 60
    while b"scripts.base_train" not in Path(f"/proc/{proc.pid}/cmdline").read_bytes() and time.time() < deadline:
        time.sleep(0.01)
    time.sleep(0.3)  # the imports alone take seconds
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=600)
    assert proc.returncode == 130 and "Traceback" not in err, err[-3000:]
    assert len(error_lines(err)) == 1 and "stopped by Ctrl-C" in err, err
    assert not out.exists()


def test_eval_writes_its_side_files_into_a_folder_of_its_own(ws, tmp_path):
    """eval --out mine/r.json: the results file, and metrics.jsonl / wandb/ in mine/r-logs/ (ours by
    its marker), never beside the user's own files."""
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "metrics.jsonl").write_text('{"mine": true}\n')
    before = snapshot(mine)
    r = subprocess.run([PY, "-m", "scripts.eval", "--checkpoints", str(ws / "R"), "--out", str(mine / "r.json"),
                        *EVAL_QUICK], capture_output=True, text=True, env=env(), cwd=ROOT, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    assert {p: h for p, h in snapshot(mine).items() if p in before} == before
    assert sorted(os.listdir(mine)) == ["metrics.jsonl", "r-logs", "r.json"]
    assert (mine / "r-logs" / "metrics.jsonl").exists() and cli.is_ours(mine / "r-logs")


def test_full_disk_while_writing_the_lock_leaves_no_lock(ws, tmp_path):
    """A lock that cannot be written (disk full) is one sentence, exit 2, and no empty .lock is
    left to refuse the next run as "in use"."""
    out = tmp_path / "run"
    args = [PY, "-m", "scripts.base_train", *tiny_base(ws, out, "--num-iterations", "2", "--eval-every", "0",
                                                       "--save-every", "0")]
    r = subprocess.run(args, capture_output=True, text=True, env=env(), cwd=ROOT, timeout=600,
                       preexec_fn=file_size_limit(8))
    lines = error_lines(r.stderr)
    assert r.returncode == 2 and "Traceback" not in r.stderr and len(lines) == 1, r.stderr[-3000:]
    assert lines[0].startswith(f"error: cannot write the lock {out / '.lock'} (File too large)")
    assert not out.exists(), "the refused run left its output folder"
    r = subprocess.run(args, capture_output=True, text=True, env=env(), cwd=ROOT, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]


def test_a_folder_is_ours_by_markers_not_by_names(tmp_path):
    """Names we write prove nothing (a user's own metrics.jsonl, step_1/); a folder holding only
    folders with our marker (out/ of stages run one by one) holds nothing of the user's."""
    out = tmp_path / "out"
    (out / "tokenizer").mkdir(parents=True)
    (out / "tokenizer" / cli.MARKER).write_text("{}\n")
    try:
        cli.claim_out(str(out), training=False)
        assert cli.is_ours(out)
    finally:
        cli.release_locks()
    for theirs in ("metrics.jsonl", "step_000001"):
        mine = tmp_path / f"mine_{theirs}"
        shutil.copytree(out / "tokenizer", mine / "tokenizer")
        (mine / theirs).write_text("mine\n")
        for overwrite in (False, True):
            with pytest.raises(UserError) as e:
                cli.claim_out(str(mine), overwrite=overwrite)
            assert theirs in str(e.value) and "tokenizer" not in str(e.value)
        assert not cli.is_ours(mine) and not (mine / cli.LOCK).exists()


def test_empty_lock_left_long_ago_is_taken_over(tmp_path, capsys):
    out = tmp_path / "run"
    out.mkdir()
    (out / ".lock").write_text("")
    os.utime(out / ".lock", (time.time() - 3600, time.time() - 3600))
    try:
        cli.claim_out(str(out), training=False)
        assert json.loads((out / ".lock").read_text())["pid"] == os.getpid()
    finally:
        cli.release_locks()
    assert "taking over the stale lock" in capsys.readouterr().err and not (out / ".lock").exists()


def test_closed_stdout_is_not_a_traceback(ws):
    proc = subprocess.Popen([PY, "-m", "scripts.tok_eval", "--tokenizer", str(ws / "tok")], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, env=env(), cwd=ROOT)
    proc.stdout.close()  # as `| head -0` does: the reader is gone before the first line
    err = proc.stderr.read().decode()
    proc.wait(timeout=600)
    assert "Traceback" not in err and "Exception ignored" not in err and "BrokenPipe" not in err, err
    assert proc.returncode == 141


# -----------------------------------------------------------------------------
# a disk that fills up: real writes through the entry points, under a file size limit


def file_size_limit(nbytes):
    def limit():
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # then a write past the limit fails with EFBIG
        resource.setrlimit(resource.RLIMIT_FSIZE, (nbytes, nbytes))
    return limit


def test_full_disk_during_a_checkpoint_keeps_the_last_one(ws, tmp_path):
    out = tmp_path / "run"
    shutil.copytree(ws / "R", out)
    (out / "step_000008").rename(out / "gone")  # a run at step 4, to be resumed
    shutil.rmtree(out / "gone")
    (out / "latest").write_text("step_000004\n")
    before = snapshot(out)
    size = (out / "step_000004" / "model.pt").stat().st_size
    r = subprocess.run([PY, "-m", "scripts.base_train", *tiny_base(ws, out, "--resume")], capture_output=True,
                       text=True, env=env(), cwd=ROOT, timeout=600, preexec_fn=file_size_limit(size // 2))
    lines = error_lines(r.stderr)
    assert r.returncode == 1 and "Traceback" not in r.stderr, r.stderr[-3000:]
    assert lines[-1].startswith("error: could not write ") and "File too large" in lines[-1]
    assert "step_000008" in lines[-1] and "latest" in lines[-1]
    after = snapshot(out)
    grew = str(out / "metrics.jsonl")  # the resumed run's log goes on
    assert {p: h for p, h in after.items() if p in before and p != grew} == {p: h for p, h in before.items()
                                                                            if p != grew}
    assert (out / "latest").read_text().strip() == "step_000004"
    assert not [p for p in os.listdir(out) if ".tmp-" in p or ".old-" in p]


def test_full_disk_while_writing_eval_results_keeps_the_old_ones(ws, tmp_path):
    out = tmp_path / "results.json"
    args = [PY, "-m", "scripts.eval", "--checkpoints", str(ws / "R"), "--out", str(out), *EVAL_QUICK]
    r = subprocess.run(args, capture_output=True, text=True, env=env(), cwd=ROOT, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    before = out.read_bytes()
    r = subprocess.run(args + ["--seed", "1"], capture_output=True, text=True, env=env(), cwd=ROOT, timeout=600,
                       preexec_fn=file_size_limit(len(before) // 2))
    lines = error_lines(r.stderr)
    assert r.returncode == 1 and "Traceback" not in r.stderr, r.stderr[-3000:]
    assert lines == [f"error: could not write {out} (File too large); the previous version, if any, is unchanged."]
    assert out.read_bytes() == before
    assert not [p for p in os.listdir(tmp_path) if ".tmp-" in p or p.endswith(".lock")]


# -----------------------------------------------------------------------------
# W&B that cannot be reached: one line, then offline, in seconds


def test_unreachable_wandb_goes_offline_in_one_line(ws, tmp_path):
    pytest.importorskip("wandb")
    out = tmp_path / "run"
    args = tiny_base(ws, out, "--num-iterations", "2", "--eval-every", "0", "--save-every", "0")
    args[args.index("--wandb") + 1] = "online"
    r = subprocess.run([PY, "-m", "scripts.base_train", *args], capture_output=True, text=True, timeout=600, cwd=ROOT,
                       env=env(WANDB_BASE_URL="http://127.0.0.1:9", WANDB_API_KEY="x" * 40))
    assert r.returncode == 0, r.stderr[-3000:]
    notes = [ln for ln in r.stdout.splitlines() if "W&B" in ln]
    assert notes == [f"note: W&B (127.0.0.1) cannot be reached, so this run is recorded offline in {out / 'wandb'} "
                     f"(`wandb sync` it later)."]
    assert list((out / "wandb").glob("offline-run-*"))


# -----------------------------------------------------------------------------
# the speedrun: a stage killed midway resumes from its last checkpoint (slow: a real pipeline)


@pytest.mark.slow
def test_killed_speedrun_stage_resumes_from_its_checkpoint(tmp_path):
    out = tmp_path / "out"
    tiny = dict(TOK_ARGS="--vocab-size 300", WANDB_MODE="disabled", DEPTH="1",
                BASE_ARGS="--num-iterations 12 --save-every 2 --eval-every 0 --sample-tokens 0 --head-dim 32 "
                          "--sequence-len 32 --device-batch-size 4 --total-batch-size 128 --entropy-every 0 "
                          "--keep-last 0 --device cpu")
    cmd = ["bash", str(ROOT / SPEEDRUN), "--out", str(out), "--until", "base"]
    e = env(PATH=f"{Path.home() / '.local' / 'bin'}:{os.environ['PATH']}", **tiny)
    proc = subprocess.Popen(cmd, env=e, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)
    wait_for(out / "base" / "step_000004" / "meta.json", proc, timeout=1800)
    second = subprocess.run(cmd, env=e, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert second.returncode == 2 and "in use by pid" in second.stderr  # the speedrun holds its own lock
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not (out / "base" / "step_000012").exists(), "the kill came after the stage finished"
    killed_at = checkpoint.read_meta(checkpoint.latest_checkpoint(str(out / "base")))["step"]
    r = subprocess.run(cmd, env=e, cwd=ROOT, capture_output=True, text=True, timeout=1800)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert "== tokenizer: already done" in r.stdout and "== base (resuming from its last checkpoint)" in r.stdout
    assert f"resumed from {out / 'base'}" in r.stdout and f"at step {killed_at}" in r.stdout
    assert checkpoint.read_meta(checkpoint.latest_checkpoint(str(out / "base")))["step"] == 12
    assert not (out / ".lock").exists()
    # ... to the same weights as the same stage run without the kill
    ref = tmp_path / "ref"
    args = ["--tokenizer", str(out / "tokenizer"), "--depth", "1", "--out", str(ref), "--wandb", "disabled",
            *tiny["BASE_ARGS"].split()]
    r = subprocess.run([PY, "-m", "scripts.base_train", *args], capture_output=True, text=True, env=env(), cwd=ROOT,
                       timeout=1800)
    assert r.returncode == 0, r.stderr[-3000:]
    a = torch.load(out / "base" / "step_000012" / "model.pt", weights_only=True)
    b = torch.load(ref / "step_000012" / "model.pt", weights_only=True)
    assert all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.slow
def test_tok_train_memory_does_not_grow_with_a_long_line(ws, tmp_path):
    """A one-line 8 MB JSONL once cost tok_train ~1.5 GB more than a tiny file (it encoded the
    whole line at once); streamed in pieces it costs about the line itself."""
    import random
    rng = random.Random(0)
    words = ["".join(rng.choice("abcdefghijklmnopqrstuvwxyzîṯẖ") for _ in range(rng.randint(2, 9)))
             for _ in range(5000)]
    (tmp_path / "long.jsonl").write_text(json.dumps({"text": " ".join(rng.choice(words) for _ in range(1_400_000))},
                                                    ensure_ascii=False) + "\n")
    (tmp_path / "short.jsonl").write_text(json.dumps({"text": " ".join(words[:300])}) + "\n")
    shutil.copy(ws / "MANIFEST.yml", tmp_path / "MANIFEST.yml")

    def peak_mb(name):
        proc = subprocess.Popen([PY, "-m", "scripts.tok_train", "--data", str(tmp_path / name), "--manifest",
                                 str(tmp_path / "MANIFEST.yml"), "--vocab-size", "300", "--out", str(tmp_path / name[:-6])],
                                env=env(), cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        _, status, usage = os.wait4(proc.pid, 0)
        assert os.waitstatus_to_exitcode(status) == 0, proc.stderr.read().decode()[-3000:]
        return usage.ru_maxrss / 1024
    assert (tmp_path / "long.jsonl").stat().st_size > 8e6
    assert peak_mb("long.jsonl") - peak_mb("short.jsonl") < 400
