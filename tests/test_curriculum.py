"""The pretraining curriculum (nanostoney/curriculum.py): copy drills first, then the corpus with
fresh train-split arithmetic; the re-reading chain format; the probe's operand positions."""
import builtins
import json
import random
import subprocess

import numpy as np
import pytest
import torch

from nanostoney import curriculum
from nanostoney.answers import LETTERS
from nanostoney.tasks import arith
from nanostoney.tokenizer import Tokenizer

from test_train import PY, ROOT, base_cmd, make_workspace
from test_bad_input import env


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    return Tokenizer.load(str(make_workspace(tmp_path_factory.mktemp("ws")).tok))


def test_fresh_problems_never_include_a_held_out_combination():
    held = {p["key"] for split in ("val", "test") for p in arith.load_problems()[split]}
    rng = random.Random(0)
    drawn = [curriculum.fresh_problem(rng) for _ in range(3000)]
    keys = {p["key"] for p in drawn}
    assert not keys & held
    assert len(keys) > 2000  # fresh draws, not a short list read again and again
    assert {p["depth"] for p in drawn} == set(arith.DEPTHS)
    # and the held-out keys are reachable by the generator: the filter is what keeps them out
    assert any(arith.make_problem(*d)["key"] in held for d in (arith.sample_problem(rng, 1) for _ in range(3000)) if d)


def test_generated_rows_are_a_function_of_seed_step_and_rank(tok):
    c = curriculum.Curriculum(copy_steps=2, arith_rows=2, drill_rows=1, seed=3)
    for step in (0, 5):  # the copy stage, then the tasks stage
        a, b = c.generated(step, 0, 0, 4, tok, 32), c.generated(step, 0, 0, 4, tok, 32)
        assert [x.tolist() for part in a for x in part] == [x.tolist() for part in b for x in part]
        assert all(len(r) == 33 for part in a for r in part)
    first = np.stack(c.generated(0, 0, 0, 4, tok, 32)[0])
    assert not np.array_equal(first, np.stack(c.generated(1, 0, 0, 4, tok, 32)[0]))
    assert not np.array_equal(first, np.stack(c.generated(0, 0, 1, 4, tok, 32)[0]))
    other = curriculum.Curriculum(copy_steps=2, seed=4)
    assert not np.array_equal(first, np.stack(other.generated(0, 0, 0, 4, tok, 32)[0]))
    drills, sums = c.generated(5, 0, 0, 4, tok, 32)
    assert (len(drills), len(sums)) == (1, 2)


def test_drills_and_fresh_problems_read_no_file(tok, monkeypatch):
    """Generated rows read no data (Stoney text above all): random tokens, pseudo-words, numbers
    and arith's generator, nothing opened."""
    from nanostoney.tasks import stoney_corpus

    def refuse(*a, **k):
        raise AssertionError("the curriculum read a file")
    monkeypatch.setattr(builtins, "open", refuse)
    monkeypatch.setattr(stoney_corpus, "load_corpus", refuse)
    c = curriculum.Curriculum(copy_steps=1, arith_rows=1, drill_rows=1)
    for step in range(4):
        c.generated(step, 0, 0, 3, tok, 64)


def test_drills_hold_what_they_teach():
    rng = random.Random(1)
    text = curriculum.lookup_text(rng)
    table, asked = text.split("\n", 1)
    for line in asked.split("\n"):  # every asked key is answered with its value from the table
        assert line in table
    text = curriculum.option_text(rng)
    value = text.split("?")[0].removeprefix("Which option is ")
    letter = text.rstrip()[-1]
    assert f"\n- {value} {letter}\n" in text + "\n" and text.endswith(f"is {value} {letter}.</think>\nAnswer: {letter}")


def test_chain_lines_reread_the_question():
    for p in arith.load_problems()["val"][:200]:
        lines = p["rationale"].split("\n")
        assert len(lines) == p["depth"]
        a = p["start"]
        for line, (op, n), v in zip(lines, p["steps"], p["values"]):
            said, _, equation = line.rpartition(": ")
            assert said + "." in p["question"] and equation == f"{a} {op} {n} = {v}"
            a = v


def test_probe_finds_each_operand():
    from bench.knowledge_probe import operand_spans
    for p in arith.load_problems()["val"][:100]:
        head = p["question"] + "\n\n<think>"
        text = head + p["rationale"]
        spans = operand_spans(p, len(head))
        assert [text[a:b] for a, b in spans["equation"]] == [str(n) for _, n in p["steps"]]
        assert all(text[a:b].isdigit() for a, b in spans["phrase"])
    assert spans["phrase"]


def test_base_train_runs_the_curriculum_and_its_plan_lists_the_stages(tmp_path):
    ws = make_workspace(tmp_path / "ws")
    plain = ws.manifest.read_text()
    full = (ROOT / "data" / "SOURCE_MANIFEST.yml").read_text()
    record = "  - source_id: arith_generated\n" + full.split("  - source_id: arith_generated\n")[1].split("  - source_id:")[0]
    ws.manifest.write_text(plain + record)
    r = subprocess.run(base_cmd(ws, tmp_path / "out", "--copy-steps", "2", "--arith-rows", "1", "--drill-rows", "0",
                                "--sequence-len", "32", "--total-batch-size", "64"),
                       capture_output=True, text=True, timeout=600, env=env(), cwd=ROOT)
    assert r.returncode == 0, r.stderr[-2000:]
    assert ("curriculum: copy steps 0-2: 2 drill rows (repeated spans, key-value and option lookups); "
            "tasks steps 2-6: 1 corpus rows + 1 fresh train-split arith rows + 0 drill rows") in r.stdout
    # the generated arith problems are gated like the tasks' own: without the record, refused
    ws.manifest.write_text(plain)
    r = subprocess.run(base_cmd(ws, tmp_path / "out2", "--arith-rows", "1"), capture_output=True, text=True,
                       timeout=600, env=env(), cwd=ROOT)
    assert r.returncode == 2 and "generated://nanostoney/arith" in r.stderr, r.stderr[-2000:]
    r = subprocess.run(base_cmd(ws, tmp_path / "out3", "--arith-rows", "1", "--drill-rows", "1"),
                       capture_output=True, text=True, timeout=600, env=env(), cwd=ROOT)
    assert r.returncode == 2 and "leave no corpus row" in r.stderr and "Traceback" not in r.stderr


def test_the_cpu_speedrun_plan_runs_the_curriculum(tmp_path):
    from test_speedrun_plan import speedrun
    r = speedrun("--size", "cpu", "--out", str(tmp_path / "o"))
    base = next(line for line in r.stdout.splitlines() if line.startswith("  base:"))
    assert r.returncode == 0 and "--copy-steps 400 --arith-rows 2 --drill-rows 1" in base, r.stdout


def test_local_alphabet_rows_hold_few_tokens_chosen_afresh(tok):
    """bench.induction_drills --local 16: each row's ordinary tokens are at most 16, all of
    them from the row's own draw: two rows do not share their 16."""
    from bench.induction_drills import alphabet_row
    rng = random.Random(0)
    rows = [alphabet_row(rng, tok, 64, 0, local=16) for _ in range(4)]
    pools = [set(r.tolist()) - {tok.bos_id} for r in rows]
    assert all(len(p) <= 16 and min(p) >= curriculum.FIRST_ORDINARY for p in pools)
    assert all(len(r) == 65 for r in rows)
    assert len(pools[0] & pools[1]) < 8


def test_drills_save_a_checkpoint_the_probes_load(tmp_path):
    """bench.induction_drills --out: the last step as a checkpoint; a tied lm_head comes back as its
    own copy of the embedding (the file is an ordinary untied GPT), the probe reads on the loaded
    model what the script printed for its last step, and --init starts from those weights."""
    from nanostoney.interp.attention import order_gain
    from nanostoney.checkpoint import load_model
    ws = make_workspace(tmp_path / "ws")
    r = subprocess.run([PY, "-m", "bench.induction_drills", "--tokenizer", str(ws.tok), "--steps", "2", "--rows", "1",
                        "--sequence-len", "16", "--tie", "--embedding-lr", "0", "--out", str(tmp_path / "d")],
                       cwd=ROOT, env=env(), check=True, capture_output=True, text=True)
    last = json.loads(r.stdout.strip().splitlines()[-1])
    model, tok, meta = load_model(str(tmp_path / "d"))
    assert meta["drills"]["tie"] and meta["step"] == 2
    assert torch.equal(model.lm_head.weight, model.transformer.wte.weight)
    assert model.lm_head.weight.data_ptr() != model.transformer.wte.weight.data_ptr()
    assert last["step"] == 2 and round(order_gain(model, tok), 3) == last["order_gain"]
    r = subprocess.run([PY, "-m", "bench.induction_drills", "--tokenizer", str(ws.tok), "--steps", "1", "--rows", "1",
                        "--sequence-len", "16", "--init", str(tmp_path / "d")],
                       cwd=ROOT, env=env(), check=True, capture_output=True, text=True)
    first = json.loads(r.stdout.strip().splitlines()[0])  # --init continues from the saved weights
    assert first["step"] == 0 and first["order_gain"] == last["order_gain"] and first["gain"] == last["gain"]


def test_option_formats_stop_right_before_the_picked_letter():
    """bench.option_formats: in every format the context ends where the pick's letter comes next,
    and the tasks' own format is the letter_after one."""
    from bench import option_formats
    rng = random.Random(3)
    for name, (line, pick) in option_formats.FORMATS.items():
        for _ in range(20):
            values, k = curriculum.option_values(rng)
            text = curriculum.option_drill(values, k, line, pick)
            context, before = option_formats.letter_slot(values, k, line, pick)
            assert text.startswith(context + before + LETTERS[k]) and "<think>The answer is " + values[k] in context
            assert "\n" + line(LETTERS[k], values[k]) + "\n" in text, name
    values, k = curriculum.option_values(rng)
    tasks_format = option_formats.FORMATS["letter_after"]
    assert curriculum.option_drill(values, k, *tasks_format) == curriculum.option_drill(values, k)
