"""The report end to end (tiny random model + tiny tokenizer, our checkpoint and a nanochat-format
export of it), its atomic write, and the script's one-sentence errors."""
import errno
import json
import os
import re
from dataclasses import asdict

import pytest
import torch

from nanostoney.checkpoint import save_checkpoint
from nanostoney.cli import run_main
from nanostoney.errors import RunFailed
from nanostoney.gpt import GPT, GPTConfig
from nanostoney.interp import render
from nanostoney.tokenizer import Tokenizer
from scripts import compare_reasoning

TASKS = ["stoney_mc", "aqua_mc"]


def export_nanochat(model, directory, step=1):
    """Our GPT as nanochat saves it: model_XXXXXX.pt (compiled-model keys, bf16 embedding) and
    meta_XXXXXX.json with model_config."""
    os.makedirs(directory, exist_ok=True)
    sd = {"_orig_mod." + k: v.detach().clone() for k, v in model.state_dict().items()}
    sd["_orig_mod.transformer.wte.weight"] = sd["_orig_mod.transformer.wte.weight"].bfloat16()
    torch.save(sd, os.path.join(directory, f"model_{step:06d}.pt"))
    with open(os.path.join(directory, f"meta_{step:06d}.json"), "w") as f:
        json.dump({"step": step, "model_config": asdict(model.config)}, f)


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    from nanostoney.tasks import get_task
    root = tmp_path_factory.mktemp("ck")
    texts = [m["content"] for name in TASKS for ex in get_task(name).examples("train")[:150] for m in ex["messages"]]
    tok = Tokenizer.train(texts, 700)
    tok.save(str(root / "tok"))
    torch.manual_seed(0)
    # 1024 positions: an untrained model's own completions are byte garbage that re-encodes longer
    model = GPT(GPTConfig(sequence_len=1024, vocab_size=tok.vocab_size, n_layer=2, n_head=2, n_kv_head=2, n_embd=32))
    model.init_weights()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "c_proj" in name:
                p.normal_(0, 0.05)
    save_checkpoint(str(root / "sft"), model, 1, tokenizer=tok)
    export_nanochat(model, str(root / "nanochat"))
    return root


def test_report_end_to_end(checkpoints, tmp_path, capsys):
    out = str(tmp_path / "report")
    os.makedirs(out)
    with open(os.path.join(out, "notes.txt"), "w") as f:  # the user's: never deleted
        f.write("my notes")
    argv = ["--checkpoints", f"sft={checkpoints / 'sft'}", f"grpo={checkpoints / 'nanochat'}",
            "--tokenizer", str(checkpoints / "tok"), "--tasks", *TASKS, "--max-examples", "1",
            "--n-boot", "50", "--induction-seqs", "2", "--top-k", "2", "--out", out, "--no-progress"]
    code, err = exit_message(argv, capsys)  # a directory holding someone else's file is refused
    assert code == 2 and "notes.txt" in err and "--overwrite" in err and len(err.splitlines()) == 1
    assert sorted(os.listdir(out)) == ["notes.txt"]
    ours = [".lock", ".nanostoney", "figures", "index.html", "metrics.json", "notes.txt"]  # (locked: main() runs)
    compare_reasoning.main(argv + ["--overwrite"])  # ... or written beside it
    assert sorted(os.listdir(out)) == ours
    compare_reasoning.main(argv)  # now ours: a rerun replaces its own files only
    assert sorted(os.listdir(out)) == ours
    assert open(os.path.join(out, "notes.txt")).read() == "my notes"
    assert not [p for p in os.listdir(tmp_path) if ".tmp-" in p or ".old" in p]
    assert not [p for p in os.listdir(os.path.join(out, "figures")) if p.endswith(".old")]
    m = json.load(open(os.path.join(out, "metrics.json")))
    assert set(m) >= {"config", "definitions", "summary", "headline", "checkpoints", "deltas", "created"}
    assert m["config"]["context"] == "own" and "differences" not in m
    assert m["summary"][0].startswith("No headline test has 10 held-out items")  # one item per split claims nothing
    assert list(m["checkpoints"]) == ["sft", "grpo"] and list(m["deltas"]) == ["grpo vs sft"]
    assert m["config"]["families"] == ["stoney", "math"] and m["config"]["tasks"] == TASKS
    assert m["config"]["checkpoints"]["grpo"]["source"] == "nanochat"
    ck = m["checkpoints"]["sft"]
    assert set(ck) >= {"model", "families", "tasks", "induction", "roles", "topk", "overlap", "examples"}
    for fam in ("stoney", "math"):
        s = ck["families"][fam]["heldout"]
        assert set(s) >= {"entropy:layer", "lens_logprob", "ablate_zero", "ablate_mean", "struct_mass:all",
                          "lex_mass:all", "option_lookup", "topk_zero:own", "topk_zero:random"}
        assert len(s["entropy:layer"]["mean"]) == 2 and len(s["lens_logprob"]["mean"]) == 3
    assert {e["family"] for e in ck["examples"]} == {"stoney", "math"}
    assert m["deltas"]["grpo vs sft"]["n_paired"] > 0
    page = open(os.path.join(out, "index.html"), encoding="utf-8").read()
    imgs = re.findall(r"<img src='([^']+)'", page)
    assert len(imgs) >= 12 and all(os.path.isfile(os.path.join(out, p)) for p in imgs)
    assert "http://" not in page and "https://" not in page and "<script" not in page
    assert imgs[:2] == ["figures/head_maps.png", "figures/lens_curves.png"]  # the first screen's figures
    for name in ("entropy_by_layer.png", "logit_lens.png", "0_ablation_zero.png", "0_regions.png", "0_roles.png",
                 "0_example_0.png", "delta_0.png"):
        assert f"figures/{name}" in imgs
    # re-rendering from the saved numbers alone works
    render.render(m, str(tmp_path))
    assert os.path.isfile(tmp_path / "index.html")


def test_disk_full_while_writing_the_report_keeps_the_old_one(tmp_path, monkeypatch):
    """ENOSPC halfway through the figures: the previous report stays byte for byte, the user's
    file too, no temporary directory is left, and the message names the file and the reason."""
    out = tmp_path / "report"
    (out / "figures").mkdir(parents=True)
    for name, text in (("index.html", "old page"), ("metrics.json", "{}"), ("figures/a.png", "old"),
                       ("notes.txt", "mine")):
        (out / name).write_text(text)
    before = {str(p): p.read_bytes() for p in out.rglob("*") if p.is_file()}

    def fail_halfway(metrics, directory):
        path = os.path.join(directory, "figures", "entropy_by_layer.png")
        os.makedirs(os.path.dirname(path))
        with open(path, "wb") as f:
            f.write(b"half a png")
        raise OSError(errno.ENOSPC, "No space left on device", path)
    monkeypatch.setattr(render, "render", fail_halfway)
    with pytest.raises(RunFailed) as e:
        render.write_report(str(out), {"config": {}})
    assert "entropy_by_layer.png" in str(e.value) and "No space left on device" in str(e.value)
    assert {str(p): p.read_bytes() for p in out.rglob("*") if p.is_file()} == before
    assert sorted(os.listdir(tmp_path)) == ["report"]


@pytest.mark.slow
def test_one_head_model_report_shows_undefined_statistics_as_na(checkpoints, tmp_path):
    """One layer of one head: rank correlations over heads are undefined (NaN), and say so."""
    tok = Tokenizer.load(str(checkpoints / "tok"))
    model = GPT(GPTConfig(sequence_len=512, vocab_size=tok.vocab_size, n_layer=1, n_head=1, n_kv_head=1, n_embd=32))
    model.init_weights()
    save_checkpoint(str(tmp_path / "one"), model, 1, tokenizer=tok)
    out = compare_reasoning.main(["--checkpoints", f"one={tmp_path / 'one'}", "--tasks", *TASKS, "--max-examples", "1",
                                  "--n-boot", "20", "--induction-seqs", "2", "--out", str(tmp_path / "r"),
                                  "--no-progress"])
    assert "Spearman n/a" in open(os.path.join(out, "index.html"), encoding="utf-8").read()


def test_clean_json_makes_strict_json():
    import numpy as np
    x = render.clean_json({"a": float("nan"), "b": [np.float32(1.5), np.int64(2)], "c": np.array([np.inf, 0.0])})
    assert x == {"a": None, "b": [1.5, 2], "c": [None, 0.0]}
    json.dumps(x, allow_nan=False)


def exit_message(argv, capsys):
    with pytest.raises(SystemExit) as e:
        run_main(lambda: compare_reasoning.main(argv))
    err = capsys.readouterr().err.strip()
    return e.value.code, err


def test_missing_checkpoint_and_unknown_task_exit_2(tmp_path, capsys, checkpoints):
    code, err = exit_message(["--checkpoints", f"a={tmp_path / 'nope'}", "--out", str(tmp_path / "r")], capsys)
    assert code == 2 and err.startswith("error: checkpoint a = ") and "does not exist" in err
    assert len(err.splitlines()) == 1
    code, err = exit_message(["--checkpoints", f"a={checkpoints / 'sft'}", "--tasks", "nope",
                              "--out", str(tmp_path / "r")], capsys)
    assert code == 2 and "unknown task 'nope'" in err and len(err.splitlines()) == 1
    code, err = exit_message(["--checkpoints", f"a={checkpoints / 'sft'}", "--tasks", "stoney_qa",
                              "--out", str(tmp_path / "r")], capsys)
    assert code == 2 and "no 'Answer:' line" in err
    code, err = exit_message(["--checkpoints", f"a={checkpoints / 'sft'}", f"a={checkpoints / 'sft'}"], capsys)
    assert code == 2 and "given twice" in err
    for flag in ("--top-k", "--max-examples", "--n-boot"):
        code, err = exit_message(["--checkpoints", f"a={checkpoints / 'sft'}", flag, "0"], capsys)
        assert code == 2 and err.startswith(f"error: argument {flag}: must be a positive integer, got '0'")
    code, err = exit_message(["--checkpoints", f"a={checkpoints / 'sft'}", "--induction-len", "1"], capsys)
    assert code == 2 and err == "error: --induction-len 1 is out of range; use 2 or more."
    assert not os.path.exists(tmp_path / "r")


def same_numbers(a, b, tol=1e-5):
    """Equal structure and strings, numbers within tol (one process here runs with more threads
    than each rank there, and a sum over other threads rounds its last bit elsewhere)."""
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(same_numbers(a[k], b[k], tol) for k in a)
    if isinstance(a, list):
        return isinstance(b, list) and len(a) == len(b) and all(same_numbers(x, y, tol) for x, y in zip(a, b))
    if isinstance(a, float) and isinstance(b, (int, float)):
        return a == b or abs(a - b) <= tol
    return a == b


@pytest.mark.slow  # ~2 min a context on the loaded 2-core machine (three processes load the tasks)
@pytest.mark.parametrize("context", ["own", "cloze"])
def test_three_ranks_write_the_numbers_one_process_writes(checkpoints, tmp_path, context):
    """Under torchrun the items are shared out over the ranks and gathered in order: the report's
    numbers are those of one process (to the last digit but one of a 6-digit rounding)."""
    import subprocess
    import sys
    args = ["--checkpoints", f"sft={checkpoints / 'sft'}", f"grpo={checkpoints / 'nanochat'}", "--tokenizer",
            str(checkpoints / "tok"), "--tasks", *TASKS, "--max-examples", "2", "--n-boot", "50",
            "--induction-seqs", "2", "--top-k", "2", "--no-progress", "--device", "cpu", "--context", context]
    compare_reasoning.main(args + ["--out", str(tmp_path / "one")])
    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = dict(os.environ, OMP_NUM_THREADS="1", CUDA_VISIBLE_DEVICES="")
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=3", "-m",
                        "scripts.compare_reasoning", *args, "--out", str(tmp_path / "three")], cwd=repo, env=env,
                       capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-3000:]
    assert "report plan: 3 process(es)" in r.stdout
    one, three = (json.load(open(tmp_path / d / "metrics.json")) for d in ("one", "three"))
    assert three["config"]["world_size"] == 3
    for key in ("checkpoints", "headline", "deltas"):
        assert same_numbers(one[key], three[key]), key
    assert one["summary"] == three["summary"]


def test_the_summary_says_first_when_a_family_is_not_above_chance():
    """Heads that 'carry the answer' of a model guessing carry the format, not an answer: the
    headline says so whenever a family's held-out lower bound does not clear chance."""
    def res(lo_stoney, lo_math):
        fam = lambda lo: {"heldout": {"own_correct": {"mean": lo + 0.1, "lo": lo, "hi": lo + 0.2, "n": 50},
                                      "chance": {"mean": 0.2, "lo": 0.2, "hi": 0.2, "n": 50}}}
        return {"families": {"stoney": fam(lo_stoney), "math": fam(lo_math)}}
    assert render.at_chance_sentence(res(0.3, 0.25), "grpo", ["stoney", "math"]) == []
    said = render.at_chance_sentence(res(0.3, 0.1), "grpo", ["stoney", "math"])
    assert len(said) == 1 and "not above chance on held-out math (chance 0.20)" in said[0] and "stoney" not in said[0]
    said = render.at_chance_sentence(res(0.2, 0.1), "sft", ["stoney", "math"])
    assert "held-out stoney (chance 0.20) or math" in said[0] and "--context cloze" in said[0]
    assert "--context cloze" not in render.at_chance_sentence(res(0.2, 0.1), "sft", ["stoney", "math"], "cloze")[0]


def fake_traces(n, planted, seed=0, L=2, H=2):
    """Patching traces of n pairs: noise everywhere, and head `planted` (if any) restoring most of
    a 3-nat gap."""
    import numpy as np
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        heads, resid = rng.normal(0, 0.3, (L, H)), rng.normal(0, 0.3, (2, L + 1))
        gap = 3.0 if planted else float(rng.normal(0, 0.3))
        if planted:
            heads[planted] += 2.5
        resid[1, -1] = gap  # the whole stream at the slot after the last block restores the gap exactly
        out.append({"ld_clean": gap, "ld_corrupt": 0.0, "resid": resid, "heads": heads})
    return out


def test_first_screen_says_what_patching_found_and_how_sure():
    from nanostoney.interp import causal, patching
    pairs = ([patching.Pair(f"s{i}", "stoney", [0], [0], 0, 1, 2, "answer", i % 2 == 0, "s2e") for i in range(12)]
             + [patching.Pair(f"m{i}", "math", [0], [0], 0, 1, 2, "operand", True) for i in range(12)])
    traces = fake_traces(12, (1, 0)) + fake_traces(12, None, seed=1)
    summ = patching.summary(pairs, traces, n_boot=200)
    metrics = {"config": {"context": "own"}, "checkpoints": {"grpo": {"patching": summ}}}
    lead = causal.lead(metrics)
    assert 2 <= len(lead) <= 3
    assert "head 1.0 at the slot" in lead[0] and "Stoney" in lead[0]
    assert "math, at each operand" in lead[0] and "no layer or head restores" in lead[0]
    assert "one training run" in lead[-1]
    html = causal.table(metrics)
    assert html.count("<b>yes</b>") >= 1 and "stoney/answer/s2e" in html
    rows = html.split("</table>")[0].split("<tr>")[2:]
    assert all("%" in r for r in rows if "stoney/answer" in r)  # a real gap: its share is shown
    assert all("%" not in r and "—" in r for r in rows if "math/operand" in r)  # no gap: no share of it
    metrics["seeds"] = {"n_seeds": 3, "claims": {"stoney head 1.0": {"every_seed": True},
                                                 "math resid": {"every_seed": False}}}
    assert causal.lead(metrics)[-1] == ("Over 3 training seeds, 1 of 2 claims hold in every seed: "
                                                "stoney head 1.0.")
    metrics["config"]["context"] = "cloze"
    assert "storage probe" in causal.lead(metrics)[0]
