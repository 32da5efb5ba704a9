"""Training loop, batching, optimizer, resume, logging and error behaviour (CPU, tiny sizes).

The end-to-end tests run scripts.base_train as a user would, on a tiny corpus and a tiny
tokenizer made here; tests/test_ddp.py reuses `make_workspace` and `base_cmd` for torchrun.
"""
import importlib
import json
import math
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from nanostoney import batches, evaluate, loader, optim, sources, train
from nanostoney.cli import run_main
from nanostoney.errors import UserError
from nanostoney.gpt import GPT, GPTConfig
from nanostoney.muon import Muon, orthogonalize

ROOT = Path(__file__).resolve().parent.parent

PY = sys.executable

MANIFEST = """schema_version: "1.0"
records:
  - source_id: test_corpus
    path_glob: "*.jsonl"
    data_type: test_text
    origin: generated_in_test
    rights_holder: test
    permission_status: approved_for_training
    license: test-only
    allowed_uses:
      - training
    prohibited_uses: []
    contains_sensitive_content: false
    review_contact: "tests"
    notes: "synthetic sentences written by tests/test_train.py"
"""


# -----------------------------------------------------------------------------
# a tiny corpus + tokenizer + manifest, and the command line that trains on them


def make_workspace(root):
    """corpus.jsonl (synthetic sentences), MANIFEST.yml approving it, tok/ (vocab 300)."""
    from nanostoney.tokenizer import Tokenizer
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    rng = random.Random(0)
    names = ["Ada", "Bo", "Cy", "Dee", "Eli"]
    docs = []
    for _ in range(300):
        a, b = rng.randint(1, 50), rng.randint(1, 50)
        n = rng.choice(names)
        docs.append(f"{n} had {a} stones and found {b} more, so {n} has {a + b} stones now.")
    corpus = root / "corpus.jsonl"
    corpus.write_text("".join(json.dumps({"text": d}) + "\n" for d in docs))
    manifest = root / "MANIFEST.yml"
    manifest.write_text(MANIFEST)
    tok_dir = root / "tok"
    if not (tok_dir / "tokenizer.json").exists():
        Tokenizer.train(docs, 300).save(str(tok_dir))
    return SimpleNamespace(root=root, corpus=corpus, manifest=manifest, tok=tok_dir)


def base_cmd(ws, out, *extra, launcher=(PY,)):
    return [*launcher, "-m", "scripts.base_train",
            "--tokenizer", str(ws.tok), "--data", str(ws.corpus), "--manifest", str(ws.manifest),
            "--depth", "1", "--head-dim", "32", "--sequence-len", "16", "--device-batch-size", "2",
            "--total-batch-size", "64", "--num-iterations", "6", "--eval-every", "3",
            "--eval-tokens", "256", "--sample-tokens", "0", "--save-every", "3", "--entropy-every", "0",
            "--wandb", "disabled", "--device", "cpu", "--out", str(out), *extra]


def env():
    e = dict(os.environ)
    e.pop("WANDB_API_KEY", None)
    e.update(OMP_NUM_THREADS="1", WANDB_SILENT="true", PYTHONUNBUFFERED="1")
    return e


def run(cmd, timeout=900):
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env(), cwd=ROOT)


def final_weights(out):
    from nanostoney.checkpoint import latest_checkpoint
    return torch.load(os.path.join(latest_checkpoint(str(out)), "model.pt"), weights_only=True)


def max_diff(a, b):
    assert a.keys() == b.keys()
    return max((a[k].float() - b[k].float()).abs().max().item() for k in a)


@pytest.fixture(scope="module")
def ws(tmp_path_factory):
    return make_workspace(tmp_path_factory.mktemp("train_ws"))


# -----------------------------------------------------------------------------
# pieces


def test_grad_accum_steps_and_error():
    assert train.grad_accum_steps(2048, 8, 256, 1) == 1
    assert train.grad_accum_steps(4096, 4, 256, 2) == 2
    with pytest.raises(UserError, match="not a positive multiple"):
        train.grad_accum_steps(3000, 8, 256, 1)


def test_lr_schedule_warmup_flat_warmdown():
    m = [optim.lr_multiplier(s, 100, warmup_steps=10, warmdown_ratio=0.2, final_lr_frac=0.1) for s in range(100)]
    assert m[0] == pytest.approx(0.1) and m[9] == pytest.approx(1.0)
    assert all(v == 1.0 for v in m[10:80])
    assert m[80] == pytest.approx(1.0) and m[99] == pytest.approx(0.1 + 0.9 * 1 / 20)
    assert all(a >= b for a, b in zip(m[80:], m[81:]))  # decays monotonically


def test_orthogonalize_flattens_singular_values():
    torch.manual_seed(0)
    G = torch.randn(64, 16) @ torch.diag(torch.logspace(-1, 1, 16))  # singular values 0.7 .. 89
    s = torch.linalg.svdvals(orthogonalize(G))
    assert s.min() > 0.6 and s.max() < 1.25  # all directions move by about the same amount
    assert torch.allclose(orthogonalize(G.T), orthogonalize(G).T, atol=1e-5)  # wide = tall transposed
    with pytest.raises(ValueError):
        Muon([torch.nn.Parameter(torch.zeros(3))])


def test_build_optimizer_roles():
    model = GPT(GPTConfig(sequence_len=16, vocab_size=64, n_layer=2, n_head=2, n_kv_head=2, n_embd=32))
    opt = optim.build_optimizer(model, "muon")
    roles = {g["role"] for g in opt.param_groups}
    assert roles == {"matrix", "embedding", "unembedding"}
    assert isinstance(opt.optimizers[0], Muon)
    n = sum(p.numel() for g in opt.param_groups for p in g["params"])
    assert n == model.num_params()  # every parameter in exactly one group
    adam = optim.build_optimizer(model, "adamw")
    assert all(isinstance(o, torch.optim.AdamW) for o in adam.optimizers)
    optim.set_lr(adam, 0.5)
    assert all(g["lr"] == 0.5 * g["initial_lr"] for g in adam.param_groups)


def test_lora_on_the_head_learns_at_the_matrix_lr():
    """SFT's default targets adapt lm_head too, and those adapters are matrices for the optimizer
    (the unembedding LR is ~7x smaller, too small to teach the stop token in a short run)."""
    from nanostoney import lora
    model = GPT(GPTConfig(sequence_len=16, vocab_size=64, n_layer=2, n_head=2, n_kv_head=2, n_embd=32))
    wrapped = lora.apply_lora(model, rank=4, alpha=4, targets="all,head")
    assert "lm_head" in wrapped and len(wrapped) == 2 * 6 + 1
    opt = optim.build_optimizer(model, "adamw", matrix_lr=5e-3)
    (group,) = opt.param_groups
    assert group["role"] == "matrix" and any(p is model.lm_head.lora_B for p in group["params"])


def test_mixture_schedule_weights_and_determinism():
    s = batches.mixture_schedule([5, 50], [1.0, 3.0], 4000, seed=1)
    assert s == batches.mixture_schedule([5, 50], [1.0, 3.0], 4000, seed=1)
    frac = sum(t == 1 for t, _ in s) / len(s)
    assert abs(frac - 0.75) < 0.03
    first_pass = [i for t, i in s if t == 0][:5]
    assert sorted(first_pass) == list(range(5))  # every example once before any repeats
    assert batches.parse_mixture("a=1, b=2,c") == {"a": 1.0, "b": 2.0, "c": 1.0}
    with pytest.raises(UserError):
        batches.parse_mixture("a=x")


def test_bpb_of_a_uniform_model_is_log2_vocab_per_byte(ws):
    """Zero logits = uniform: every target costs ln V nats, so bpb = log2(V) x tokens / bytes."""
    from nanostoney.tokenizer import Tokenizer
    tok = Tokenizer.load(str(ws.tok))
    V = tok.vocab_size
    model = GPT(GPTConfig(sequence_len=16, vocab_size=V, n_layer=1, n_head=2, n_kv_head=2, n_embd=32))
    model.init_weights()
    torch.nn.init.zeros_(model.lm_head.weight)
    docs = ["Ada has 12 stones.", "Bo found 7 more.", "Îyâhe Nakoda ṯ ẖ û — multi-byte text"] * 3
    path = sources.texts_shard("bpb-test", docs)
    rows = loader.validation_rows(loader.Corpus([path]), tok, 16, max_rows=100)
    assert len(rows) >= 3
    info = SimpleNamespace(world_size=1, rank=0, device=torch.device("cpu"), is_distributed=False,
                           autocast_dtype=None)
    tb = evaluate.token_byte_lengths(tok)
    bpb = evaluate.evaluate_bpb(model, loader.eval_batches(rows, 4, info), tb, info)
    ys = torch.cat([y.reshape(-1) for _, y in loader.eval_batches(rows, 4, info)])
    text_targets = ys[tb[ys] > 0]
    expected = math.log2(V) * len(text_targets) / tb[text_targets].sum().item()
    assert bpb == pytest.approx(expected, rel=1e-6)


def test_sft_loss_mask_covers_only_assistant_tokens(ws):
    from nanostoney.tokenizer import Tokenizer
    tok = Tokenizer.load(str(ws.tok))
    conv = {"messages": [{"role": "system", "content": "Be brief."},
                         {"role": "user", "content": "Ada had 3 stones and found 4 more?"},
                         {"role": "assistant", "content": "<think>3+4</think>\nAnswer: 7"},
                         {"role": "user", "content": "And Bo?"},
                         {"role": "assistant", "content": "Answer: 9"}]}
    rows, kept = batches.render_examples(tok, [conv], max_tokens=200)
    x, y = batches.collate(rows + [(rows[0][0][:5], rows[0][1][:5])], pad_id=0, device="cpu")
    trained = y[0][y[0] >= 0].tolist()
    end = tok.token_id("<|assistant_end|>")
    # exactly the two assistant contents, each followed by <|assistant_end|>
    assert trained == (tok.encode("<think>3+4</think>\nAnswer: 7") + [end] + tok.encode("Answer: 9") + [end])
    assert (y[1] == -1).all()  # a row cut before the answer trains nothing (padding never does)
    # the truncated conversation with no assistant token left is dropped by render_examples
    assert batches.render_examples(tok, [conv], max_tokens=5) == ([], [])


# -----------------------------------------------------------------------------
# end to end: bad input, resume after SIGKILL, offline W&B record


def test_malformed_shard_gives_one_sentence_and_exit_2(ws, tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "fine line"}\n{"text": broken\n')
    manifest = tmp_path / "MANIFEST.yml"
    manifest.write_text(MANIFEST)
    cmd = base_cmd(ws, tmp_path / "out")
    i = cmd.index("--data")
    cmd[i + 1] = str(bad)
    cmd[cmd.index("--manifest") + 1] = str(manifest)
    r = run(cmd)
    assert r.returncode == 2, r.stderr[-2000:]
    lines = [ln for ln in r.stderr.strip().splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: ") and f"{bad}:2" in lines[0]
    assert "Traceback" not in r.stderr


def cli_error(script, argv, capsys):
    """Run a script's main() in this process the way its __main__ does; (exit code, stderr)."""
    module = importlib.import_module(f"scripts.{script}")
    from nanostoney.cli import run_main
    with pytest.raises(SystemExit) as e:
        run_main(lambda: module.main(argv))
    return e.value.code, capsys.readouterr().err


def test_wrong_flag_and_bad_batch_exit_2(ws, tmp_path, capsys):
    code, err = cli_error("base_train", base_cmd(ws, tmp_path / "o1", "--depht", "3")[3:], capsys)
    assert code == 2 and "unrecognized arguments: --depht" in err
    code, err = cli_error("base_train", base_cmd(ws, tmp_path / "o2", "--total-batch-size", "100")[3:], capsys)
    assert code == 2 and err.strip().splitlines() == [
        "error: --total-batch-size 100 tokens is not a positive multiple of 32 (2 x 16 x 1 processes); "
        "pick a multiple, change --device-batch-size, or leave --total-batch-size out to scale it with the "
        "world size."]


def test_unapproved_data_is_refused(ws, tmp_path, capsys):
    other = tmp_path / "other.txt"
    other.write_text("some text " * 100)
    argv = base_cmd(ws, tmp_path / "o")[3:]
    argv[argv.index("--data") + 1] = str(other)
    code, err = cli_error("base_train", argv, capsys)
    assert code == 2 and len(err.strip().splitlines()) == 1
    assert str(other) in err and "may not be used for training" in err


def test_sft_without_base_checkpoint_exit_2(tmp_path, capsys):
    code, err = cli_error("sft_train", ["--init", str(tmp_path / "nope"), "--tasks", "aqua_mc=1",
                                        "--wandb", "disabled", "--out", str(tmp_path / "sft")], capsys)
    assert code == 2 and err.strip().splitlines()[-1].startswith(f"error: --init {tmp_path / 'nope'}")


def test_sigkill_mid_training_then_resume_matches_uninterrupted(ws, tmp_path):
    extra = ["--num-iterations", "10", "--save-every", "2", "--eval-every", "5", "--keep-last", "0"]
    ref, killed = tmp_path / "ref", tmp_path / "killed"
    r = run(base_cmd(ws, ref, *extra))
    assert r.returncode == 0, r.stderr[-3000:]

    proc = subprocess.Popen(base_cmd(ws, killed, *extra), env=env(), cwd=ROOT,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 600
    while not (killed / "latest").exists():
        assert proc.poll() is None, "the run ended before it saved a checkpoint"
        assert time.time() < deadline
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL
    assert not (killed / "step_000010").exists(), "the kill came after the run finished"
    r = run(base_cmd(ws, killed, *extra, "--resume"))
    assert r.returncode == 0, r.stderr[-3000:]
    assert "resumed from" in r.stdout
    assert max_diff(final_weights(ref), final_weights(killed)) == 0.0  # bitwise

    def losses(out):  # the last record of each step (a resumed run appends)
        d = {}
        for line in open(out / "metrics.jsonl"):
            rec = json.loads(line)
            if "train/loss" in rec:
                d[rec["step"]] = rec["train/loss"]
        return d
    a, b = losses(ref), losses(killed)
    assert set(a) == set(b) == set(range(1, 11))
    assert a == b


def test_offline_wandb_run_has_entropy_keys(ws, tmp_path):
    out = tmp_path / "wb"
    r = run(base_cmd(ws, out, "--wandb", "offline", "--entropy-every", "2", "--num-iterations", "4",
                     "--sample-tokens", "4"))
    assert r.returncode == 0, r.stderr[-3000:]
    runs = list((out / "wandb").glob("offline-run-*/run-*.wandb"))
    assert len(runs) == 1
    blob = runs[0].read_bytes()
    for key in ("attn/entropy/layer_0", "attn/entropy_mean", "train/loss", "train/mfu", "val/bpb"):
        assert key.encode() in blob, key
    # the same numbers are in the plain record, and they are entropies (0 < H <= ln T)
    recs = [json.loads(line) for line in open(out / "metrics.jsonl")]
    ent = [rec["attn/entropy_mean"] for rec in recs if "attn/entropy_mean" in rec]
    assert len(ent) == 2 and all(0 < h <= math.log(16) for h in ent)


@pytest.mark.slow  # ~1 min on a quiet 2-core machine (loads the Stoney tasks, generates)
def test_sft_lora_end_to_end_trains_only_adapters(ws, tmp_path):
    from nanostoney.checkpoint import latest_checkpoint, load_model
    base, out = tmp_path / "base", tmp_path / "sft"
    r = run(base_cmd(ws, base, "--sequence-len", "64", "--total-batch-size", "128", "--num-iterations", "2",
                     "--eval-every", "0"))
    assert r.returncode == 0, r.stderr[-3000:]
    r = run([PY, "-m", "scripts.sft_train", "--init", str(base), "--tasks", "stoney_mc=1",
             "--max-train-examples", "4", "--sequence-len", "400", "--num-iterations", "3",
             "--device-batch-size", "2", "--total-batch-size", "4", "--eval-every", "0",
             "--final-eval-examples", "2", "--max-new-tokens", "4", "--entropy-every", "1",
             "--wandb", "disabled", "--device", "cpu", "--out", str(out)])
    assert r.returncode == 0, r.stderr[-3000:]
    report = json.loads((out / "sft_eval.json").read_text())
    assert set(report["tasks"]["stoney_mc"]) == {"train", "val"}
    ckpt = Path(latest_checkpoint(str(out)))
    assert (ckpt / "adapters.pt").exists() and not (ckpt / "model.pt").exists()  # small: adapters only
    assert (ckpt / "tokenizer" / "tokenizer.json").exists()  # loads without the base's tokenizer
    tuned, _, _ = load_model(str(out))
    plain, _, _ = load_model(str(base))
    sd_t, sd_p = tuned.state_dict(), plain.state_dict()
    assert all(torch.equal(sd_t[k], sd_p[k]) for k in sd_p)  # the base weights are untouched
    assert any(sd_t[k].abs().sum() > 0 for k in sd_t if k.endswith("lora_B"))  # B moved off zero
    recs = [json.loads(line) for line in open(out / "metrics.jsonl")]
    assert sum("attn/entropy_mean" in rec for rec in recs) == 3


def test_base_train_init_continues_a_checkpoint(ws, tmp_path):
    """--init (the speedrun's knowledge stage on a web base or a published model): the run starts
    from the checkpoint's weights (its first val bpb is the base's last), keeps its architecture
    and tokenizer, and refuses rows longer than its positions in one sentence."""
    from nanostoney.checkpoint import latest_checkpoint, load_model
    base, more = tmp_path / "base", tmp_path / "more"
    r = run(base_cmd(ws, base, "--num-iterations", "3"))
    assert r.returncode == 0, r.stderr[-3000:]
    # no --tokenizer, another --depth: both come from the checkpoint
    cmd = [a for a in base_cmd(ws, more, "--init", str(base), "--depth", "3") if a not in ("--tokenizer", str(ws.tok))]
    r = run(cmd)
    assert r.returncode == 0, r.stderr[-3000:]
    bpb = [[json.loads(line)["val/bpb"] for line in open(d / "metrics.jsonl") if "val/bpb" in line] for d in (base, more)]
    assert bpb[1][0] == pytest.approx(bpb[0][-1], abs=1e-6)  # step 0 of the new run = the end of the old
    model, tok, meta = load_model(str(more))
    plain, _, _ = load_model(str(base))
    assert model.config == plain.config and tok is not None and meta["init"] == latest_checkpoint(str(base))
    assert max_diff(model.state_dict(), plain.state_dict()) > 0  # and it trained on
    r = run([*cmd, "--out", str(tmp_path / "long"), "--sequence-len", "1000", "--total-batch-size", "2000"])
    assert r.returncode == 2 and r.stderr.startswith("error: --sequence-len 1000 is longer"), r.stderr[-2000:]
    r = run([*cmd, "--out", str(tmp_path / "none"), "--init", str(tmp_path / "nowhere")])
    assert r.returncode == 2 and r.stderr.startswith("error: --init ") and "does not exist" in r.stderr, r.stderr
    assert len(r.stderr.splitlines()) == 1 and not (tmp_path / "none").exists()  # refused before claiming --out


def test_sweep_yaml_grid_is_what_sft_train_accepts():
    from scripts import sft_train, sweep
    cfg = sweep.load_sweep(str(ROOT / "sweep.yaml"))
    points, axes = sweep.grid_points(cfg["parameters"])
    assert axes == ["lr", "lora-rank"] and len(points) == 9
    assert "${args}" in cfg["command"] and (ROOT / cfg["program"]).exists()
    assert cfg["command"][2:4] == ["-m", "scripts.sft_train"]  # the program, run as a module from the repo root
    for point in points:  # the flags a W&B agent (and sweep.py) pass parse, with their values
        args = sft_train.parse_args([f"--{k}={v}" for k, v in point.items()])
        assert args.matrix_lr == float(point["lr"]) and args.lora_rank == int(point["lora-rank"])
    assert len({sweep.point_name(p, axes) for p in points}) == 9  # one directory per point
