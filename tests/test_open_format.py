"""Issue 25, open formats: SFT on the default mixture (open and multiple-choice tasks) teaches a
model to answer an open question with a number or a word, and a letter only where options are
given. A tiny byte-level model, trained briefly through scripts.sft_train itself."""
import json
import os

import pytest
import torch

from nanostoney import checkpoint
from nanostoney.gpt import GPT, GPTConfig
from nanostoney.tasks import get_task
from scripts import sft_train
from test_grpo import byte_tokenizer

OPEN = ("arith", "stoney_lexicon", "stoney_verb")
MC = ("arith_mc", "stoney_mc")


@pytest.fixture(scope="module")
def tiny_base(tmp_path_factory):
    root = tmp_path_factory.mktemp("open_format")
    tok = byte_tokenizer()
    torch.manual_seed(0)
    model = GPT(GPTConfig(sequence_len=512, vocab_size=tok.vocab_size, n_layer=2, n_head=2, n_kv_head=2, n_embd=128))
    model.init_weights()
    return root, checkpoint.save_checkpoint(str(root / "base"), model, 1, tokenizer=tok)


def test_default_mixture_holds_the_open_tasks():
    names = [item.split("=")[0] for item in sft_train.DEFAULT_TASKS.split(",")]
    assert set(OPEN) | set(MC) <= set(names)
    assert all(get_task(n).kind != "mc" for n in OPEN)


@pytest.mark.slow  # about 2 minutes on 2 shared cores
@pytest.mark.xfail(reason="issue 25 open: this tiny model (seed 0 here) answers no open item with a letter, "
                   "but at init and SFT seeds 1 and 2 it answers 1-3 of 4 arith or stoney_lexicon items with "
                   "one (letter-after format, 2026-12-07)", strict=False)
def test_open_questions_are_never_answered_with_a_letter(tiny_base):
    root, base = tiny_base
    out = str(root / "sft")
    torch.set_num_threads(1)
    sft_train.main(["--init", base, "--out", out, "--full", "--lr", "5e-3", "--embedding-lr", "1e-2",
                    "--unembedding-lr", "1e-2", "--max-train-examples", "32", "--num-iterations", "400",
                    "--device-batch-size", "8", "--eval-every", "0", "--final-eval-examples", "4",
                    "--max-new-tokens", "256", "--warmup-steps", "0", "--entropy-every", "0",
                    "--device", "cpu", "--wandb", "disabled"])
    report = json.load(open(os.path.join(out, "sft_eval.json")))["tasks"]
    assert set(report) >= set(OPEN) | set(MC)
    for name in OPEN:
        for split, row in report[name].items():
            assert row["letter_answers"] == 0.0, (name, split, row)
    # the model did learn the answer format, and writes a letter where options are given: a
    # model that answered everything with a letter, or nothing at all, fails here
    assert min(report[n]["train"]["answered"] for n in ("arith", "stoney_lexicon") + MC) >= 0.5, report
    assert min(report[n]["train"]["letter_answers"] for n in MC) >= 0.5, report
