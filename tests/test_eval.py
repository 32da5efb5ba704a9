"""scripts.eval and nanostoney/evaluate.py on a tiny model.

The model is taught in a few seconds to answer every prompt with "<think>x</think>\nAnswer: L",
L a uniformly random letter: its greedy accuracy is one letter's share, its samples spread
over the letters, so pass@k on real eval output must rise with k (a model that is always
wrong would make "monotone" trivially true).
(chrF++ of a text against itself and MAUVE of same vs different distributions are tested in
tests/test_metrics.py.)
"""
import json
import os
import subprocess
import sys
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from nanostoney import answers, checkpoint, dist, evaluate, lora, metrics
from nanostoney.errors import UserError
from nanostoney.gpt import GPT, GPTConfig
from scripts import eval as eval_script

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = ["-m", "scripts.eval"]  # run from the repo root
FAST = ["--max-examples", "10", "--num-samples", "4", "--max-new-tokens", "20", "--n-boot", "200",
        "--mauve-boot", "4", "--batch-size", "16", "--wandb", "disabled"]


def corpus_texts():
    """A few hundred bundled texts: AQuA questions and rationales, GSM8K problems."""
    texts = []
    with open(os.path.join(REPO, "data", "aqua_rat", "dev.json"), encoding="utf-8") as f:
        for line in list(f)[:150]:
            row = json.loads(line)
            texts += [row["question"] + "\n" + "\n".join(row["options"]), row["rationale"]]
    with open(os.path.join(REPO, "data", "gsm8k", "train.jsonl"), encoding="utf-8") as f:
        for line in list(f)[:150]:
            row = json.loads(line)
            texts.append(row["question"] + "\n" + row["answer"])
    return texts


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def tiny_ckpt(one_thread, tmp_path_factory):
    from nanostoney.batches import collate
    from nanostoney.tasks import get_task
    from nanostoney.tasks.subset import subset
    from nanostoney.tokenizer import Tokenizer
    root = tmp_path_factory.mktemp("eval")
    tok = Tokenizer.train(corpus_texts(), vocab_size=512)
    torch.manual_seed(0)
    model = GPT(GPTConfig(sequence_len=256, vocab_size=tok.vocab_size, n_layer=2, n_head=2, n_kv_head=2, n_embd=64))
    model.init_weights()
    task = get_task("aqua_mc")
    rows = []
    for i, ex in enumerate(subset(task, "train", 40)):
        reply = {"role": "assistant", "content": f"<think>x</think>\nAnswer: {'ABCDE'[i % 5]}"}
        conv = {"messages": task.prompt(ex) + [reply]}
        ids, mask = tok.render_conversation(conv)
        rows.append((ids[-48:], mask[-48:]))  # the reply and the end of the prompt are what it must learn
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    for step in range(60):
        x, y = collate(rows, tok.token_id("<|assistant_end|>"), "cpu")
        loss = model(x, y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()
    path = checkpoint.save_checkpoint(str(root / "base"), model, 60, tokenizer=tok, meta={"stage": "test"})
    return SimpleNamespace(root=root, path=path, loss=loss.item())


def run_eval(args):
    eval_script.main(args)


def test_eval_json_structure_and_pass_at_k_monotone(tiny_ckpt):
    out = tiny_ckpt.root / "r1.json"
    run_eval(["--checkpoints", f"tiny={tiny_ckpt.path}", "--tasks", "aqua_mc,gsm8k", "--out", str(out)] + FAST)
    res = json.loads(out.read_text())
    assert res["format"] == "nanostoney-eval-1" and res["config"]["ks"] == [1, 2, 4]
    assert res["config"]["tasks"] == ["aqua_mc", "gsm8k"]
    entry = res["checkpoints"]["tiny"]
    assert entry["path"] == os.path.abspath(tiny_ckpt.path) and entry["step"] == 60 and entry["lora"] is False
    assert entry["resolved"] == os.path.abspath(tiny_ckpt.path)  # a step dir resolves to itself
    aqua, gsm = entry["tasks"]["aqua_mc"], entry["tasks"]["gsm8k"]
    assert set(aqua["metrics"]) == {"accuracy", "cloze", "answered", "pass@1", "pass@2", "pass@4",
                                    "cloze_other_question", "cloze_no_question"}
    assert len(aqua["per_example"]["cloze"]) == 10 and "cloze" not in gsm["metrics"]  # MC only
    assert {"accuracy", "answered", "pass@1", "pass@4", "chrf++", "mauve"} <= set(gsm["metrics"])
    for task in (aqua, gsm):
        assert task["n"] == 10 and task["n_samples"] == 4 and len(task["per_example"]["correct"]) == 10
        assert len(task["samples"]) == 3 and len(task["samples"][0]["sampled"]) == 4
        for name, m in task["metrics"].items():
            lo, hi = m["ci95"]
            assert lo <= m["value"] <= hi, (name, m)
    assert aqua["metrics"]["answered"]["value"] >= 0.8, "the fixture model did not learn the answer format"
    passes = [aqua["metrics"][f"pass@{k}"]["value"] for k in (1, 2, 4)]
    assert passes == sorted(passes) and passes[2] > passes[0], passes
    assert 0 <= gsm["metrics"]["chrf++"]["value"] <= 100 and 0 < gsm["metrics"]["mauve"]["value"] <= 1
    fam = entry["families"]["math"]
    assert fam["tasks"] == ["aqua_mc", "gsm8k"] and fam["n"] == 20 and "pass@4" in fam["metrics"]
    assert "cloze" not in fam["metrics"]  # pooled only over families of multiple-choice tasks
    records = [json.loads(line) for line in open(tiny_ckpt.root / "r1-logs" / "metrics.jsonl")]  # the W&B-side record
    summary = next(r for r in records if r.get("event") == "summary")
    assert summary["tiny/aqua_mc/pass@4"] == aqua["metrics"]["pass@4"]["value"]
    assert "tiny/math/accuracy_lo" in summary
    assert os.environ["HF_HUB_OFFLINE"] == "1"  # nothing may try to download a featuriser


def test_same_seed_gives_identical_json_and_seed_matters(tiny_ckpt):
    outs = {}
    for name, seed in (("a", "0"), ("b", "0"), ("c", "1")):
        outs[name] = tiny_ckpt.root / f"seed_{name}.json"
        run_eval(["--checkpoints", tiny_ckpt.path, "--tasks", "aqua_mc", "--seed", seed, "--no-mauve",
                  "--out", str(outs[name])] + FAST)
    assert outs["a"].read_bytes() == outs["b"].read_bytes()
    a, c = (json.loads(outs[k].read_text())["checkpoints"]["base@60"]["tasks"]["aqua_mc"] for k in "ac")
    assert [s["greedy"] for s in a["samples"]] == [s["greedy"] for s in c["samples"]]
    assert [s["sampled"] for s in a["samples"]] != [s["sampled"] for s in c["samples"]]


def test_lora_adapter_dir_evaluates(tiny_ckpt):
    model, tok, _ = checkpoint.load_model(tiny_ckpt.path)
    lora.apply_lora(model, rank=4, alpha=8)
    torch.manual_seed(1)
    with torch.no_grad():  # B starts at zero (adapter = identity); make it change the outputs
        for _, m in lora.lora_modules(model):
            m.lora_B.normal_(0, 0.5)
    adapter = lora.save_adapters(model, str(tiny_ckpt.root / "adapter"), base_checkpoint=tiny_ckpt.path)
    out = tiny_ckpt.root / "lora.json"
    run_eval(FAST + ["--checkpoints", f"base={tiny_ckpt.path}", f"lora={adapter}", "--tasks", "aqua_mc,gsm8k",
                     "--num-samples", "0", "--mauve-featurizer", tiny_ckpt.path, "--out", str(out)])
    res = json.loads(out.read_text())
    assert res["config"]["mauve_featurizer"] == os.path.abspath(tiny_ckpt.path)
    res = res["checkpoints"]
    assert res["lora"]["lora"] is True and res["base"]["lora"] is False
    assert set(res["lora"]["tasks"]["aqua_mc"]["metrics"]) == {"accuracy", "cloze", "answered",
                                                                    "cloze_other_question", "cloze_no_question"}  # no samples: no pass@k
    assert {"chrf++", "mauve"} <= set(res["lora"]["tasks"]["gsm8k"]["metrics"])
    greedy = {c: [s["greedy"] for s in res[c]["tasks"]["aqua_mc"]["samples"]] for c in ("base", "lora")}
    assert greedy["base"] != greedy["lora"], "the adapters were not applied"
    # eval samples the adapters merged into the weights (never saved): the same function
    merged = eval_script.load_for_eval(adapter, "cpu")[0]
    assert all(m.merged for _, m in lora.lora_modules(merged))
    x = torch.randint(0, merged.config.vocab_size, (2, 12))
    assert torch.allclose(merged(x), model(x), atol=1e-4)


def test_checkpoint_arguments_are_named_one_way_for_eval_and_the_report(tmp_path):
    """A path is named by its folder (a step dir by run and step), a second folder of that name
    gets -2; NAME=PATH names itself, and a name given twice, NAME= or a missing path is refused."""
    run = tmp_path / "run"
    for d in (run / "step_000060", tmp_path / "a" / "sft", tmp_path / "b" / "sft"):
        d.mkdir(parents=True)
    got = evaluate.named_checkpoints([str(run / "step_000060"), str(tmp_path / "a" / "sft"),
                                      str(tmp_path / "b" / "sft"), f"mine={run}"])
    assert got == {"run@60": str(run / "step_000060"), "sft": str(tmp_path / "a" / "sft"),
                   "sft-2": str(tmp_path / "b" / "sft"), "mine": str(run)}
    for specs, words in ((["x="], "malformed"), ([f"a={run}", f"a={run}"], "given twice"),
                         ([str(tmp_path / "nope")], "does not exist")):
        with pytest.raises(UserError, match=words):
            evaluate.named_checkpoints(specs)


@pytest.mark.parametrize("args, words", [
    (["--checkpoints", "/nonexistent/ckpt", "--tasks", "aqua_mc"], ["/nonexistent/ckpt", "does not exist"]),
    (["--checkpoints", REPO, "--tasks", "aqua_mc,not_a_task"], ["not_a_task", "valid tasks"]),
])
def test_bad_input_is_one_sentence_and_exit_2(args, words):
    r = subprocess.run([sys.executable, *SCRIPT] + args + ["--wandb", "disabled"], capture_output=True, text=True,
                       cwd=REPO, timeout=120)
    assert r.returncode == 2, r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), r.stderr
    assert all(w in lines[0] for w in words) and "Traceback" not in r.stderr


def test_generation_is_the_same_on_one_or_two_ranks(tiny_ckpt, monkeypatch):
    """Ranks take fixed batches: their gathered completions equal the one-process ones."""
    model, tok, _ = checkpoint.load_model(tiny_ckpt.path)
    prompts = [[tok.bos_id] + tok.encode(t)[:20] + [tok.token_id("<|assistant_start|>")]
               for t in corpus_texts()[:7]]
    kw = dict(num_samples=2, temperature=1.0, max_new_tokens=6, seed=3, batch_size=4)
    single = evaluate.generate_completions(model, tok, prompts, None, **kw)
    parts = []
    monkeypatch.setattr(dist, "gather_lists", lambda items: parts.extend(items) or items)
    for rank in (0, 1):
        info = SimpleNamespace(rank=rank, world_size=2, autocast_dtype=None, is_distributed=False)
        evaluate.generate_completions(model, tok, prompts, info, **kw)
    assert [c for _, batch in sorted(parts) for c in batch] == single
    assert len(single) == 7 and all(len(c) == 2 for c in single)
    ex = {"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "Answer: 42"}]}
    assert evaluate.length_budget(tok, [ex], 1000) == len(tok.encode("Answer: 42")) + 16
    assert evaluate.length_budget(tok, [ex], 5) == 5


@pytest.mark.slow
def test_torchrun_three_ranks_gives_the_same_json(tiny_ckpt):
    """Under torchrun the ranks share the batches and rank 0 writes a file identical to a
    single process's (3 ranks: the batches do not divide evenly among them)."""
    args = ["--checkpoints", tiny_ckpt.path, "--tasks", "aqua_mc,gsm8k"] + FAST
    env = {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}
    one, three = tiny_ckpt.root / "one.json", tiny_ckpt.root / "three.json"
    subprocess.run([sys.executable, *SCRIPT] + args + ["--out", str(one)], check=True, env=env, cwd=REPO,
                   capture_output=True, timeout=600)
    subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=3", *SCRIPT]
                   + args + ["--out", str(three)], check=True, env=env, cwd=REPO, capture_output=True, timeout=600)
    assert one.read_bytes() == three.read_bytes()


def test_chrf_interval_and_text_parts():
    hyps = ["the cat sat on the mat", "a dog barked", "îchiyach ne", ""]
    refs = ["the cat sat on a mat", "the dog barked loudly", "îchiyach", "something"]
    from sacrebleu.metrics import CHRF
    point, lo, hi = metrics.chrf_pp_ci(hyps, refs, n_boot=300, seed=0)
    assert point == pytest.approx(CHRF(word_order=2).corpus_score(hyps, [refs]).score)
    assert lo <= point <= hi and lo < hi
    assert evaluate.rationale_part("<think>6 * 7 = 42</think>\nAnswer: 42") == "6 * 7 = 42"
    assert evaluate.rationale_part("6 * 7 = 42\nAnswer: 42") == "6 * 7 = 42"
    assert answers.answer_part("<think>r</think>\nAnswer: mildewed") == "mildewed"
    assert evaluate.powers_of_two(4) == [1, 2, 4] and evaluate.powers_of_two(6) == [1, 2, 4, 6] and evaluate.powers_of_two(0) == []


def test_mauve_interval_separates_distributions():
    """The bootstrap keeps the ordering: same-distribution MAUVE's interval lies above a
    shifted distribution's."""
    rng = np.random.default_rng(0)
    p, q_same, q_far = rng.normal(size=(40, 8)), rng.normal(size=(40, 8)), rng.normal(size=(40, 8)) + 3.0
    same = evaluate.mauve_with_ci(p, q_same, n_boot=8, seed=0)
    far = evaluate.mauve_with_ci(p, q_far, n_boot=8, seed=0)
    assert same[1] <= same[0] <= same[2] and far[2] < same[1], (same, far)


def test_open_lexicon_accuracy_is_reported_by_direction():
    """Both directions of stoney_lexicon, each with its own interval (the gloss -> term one is the hard one)."""
    from nanostoney.evaluate import by_field
    from nanostoney.tasks import get_task
    from nanostoney.tasks.subset import subset
    exs = subset(get_task("stoney_lexicon"), "val", 20)
    correct = [int(ex["direction"] == "s2e" or i % 4 == 0) for i, ex in enumerate(exs)]
    got = by_field(exs, correct, "direction", n_boot=50)
    assert set(got) == {"s2e", "e2s"} and sum(v["n"] for v in got.values()) == 20
    for d, v in got.items():
        mine = [c for ex, c in zip(exs, correct) if ex["direction"] == d]
        assert v["accuracy"]["value"] == sum(mine) / len(mine)
    assert got["s2e"]["accuracy"]["value"] == 1.0 > got["e2s"]["accuracy"]["value"]
    assert by_field(exs, correct, "depth") == {}
