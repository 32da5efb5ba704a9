"""The reward model: Bradley-Terry training separates held-out toy pairs; scores do not depend
on batch padding; save/load round-trips; ground-truth negatives are wrong exactly where they
should be."""
import pytest
import torch

from nanostoney import checkpoint, lora, reward_model
from nanostoney.answers import answer_after
from nanostoney.errors import UserError
from nanostoney.gpt import GPT, GPTConfig
from test_grpo import byte_tokenizer

V = 16


pytestmark = pytest.mark.usefixtures("one_thread")


def tiny(seed=0, vocab=V):
    torch.manual_seed(seed)
    model = GPT(GPTConfig(sequence_len=32, vocab_size=vocab, n_layer=1, n_head=2, n_kv_head=2, n_embd=32))
    model.init_weights()
    with torch.no_grad():
        for block in model.transformer.h:
            block.attn.c_proj.weight.normal_(0, 0.1)
            block.mlp.c_proj.weight.normal_(0, 0.1)
    return model


def copy_pairs(n, seed):
    """Toy preference: the answer (last token) should repeat the prompt's first token. Solving
    it needs attention from the last position back to the first: not a per-token bias."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        p = torch.randint(1, V, (4,), generator=g).tolist()
        bad = p[0]
        while bad == p[0]:
            bad = int(torch.randint(1, V, (1,), generator=g))
        out.append(([0] + p + [p[0]], [0] + p + [bad]))
    return out


def test_bradley_terry_training_separates_held_out_pairs():
    train, held_out = copy_pairs(256, 0), copy_pairs(64, 1)
    assert not {tuple(c) for c, _ in held_out} & {tuple(c) for c, _ in train}
    model = tiny()
    lora.apply_lora(model, rank=4, alpha=8, targets="all")
    rm = reward_model.RewardModel(model)
    opt = torch.optim.AdamW([p for p in rm.parameters() if p.requires_grad], lr=1e-2)
    before, _ = reward_model.pairwise_accuracy(rm, held_out)
    for step in range(100):
        batch = [train[(step * 32 + i) % len(train)] for i in range(32)]
        c, r = reward_model.pair_forward(rm, batch, "cpu")
        loss = reward_model.bt_loss(c, r)
        opt.zero_grad()
        loss.backward()
        opt.step()
    after, margin = reward_model.pairwise_accuracy(rm, held_out)
    assert before < 0.75
    assert after > 0.85 and margin > 0


def test_every_trainable_parameter_is_in_the_loss_even_with_head_adapters():
    """An SFT init adapts lm_head too, which the reward never uses: those adapters must not train
    (DDP would wait for their gradients forever), while every other trainable parameter gets one."""
    model = tiny()
    lora.apply_lora(model, rank=2, alpha=4, targets="all,head")
    rm = reward_model.RewardModel(model)
    trainable = {n for n, p in rm.named_parameters() if p.requires_grad}
    assert not [n for n in trainable if "lm_head" in n] and "head.weight" in trainable
    c, r = reward_model.pair_forward(rm, copy_pairs(4, 0), "cpu")
    reward_model.bt_loss(c, r).backward()
    assert {n for n, p in rm.named_parameters() if p.grad is not None} == trainable


def test_bt_loss_is_minus_log_sigmoid_of_the_margin():
    c, r = torch.tensor([2.0, -1.0]), torch.tensor([0.5, 1.0])
    want = -torch.log(torch.sigmoid(c - r)).mean()
    assert reward_model.bt_loss(c, r).item() == pytest.approx(want.item(), rel=1e-6)


def test_score_reads_the_last_token_and_ignores_padding():
    rm = reward_model.RewardModel(tiny())
    seqs = [[0, 3, 4, 5, 6, 7], [0, 3], [0, 9, 9, 9]]
    together = rm.score(seqs)
    alone = torch.cat([rm.score([s]) for s in seqs])
    assert torch.allclose(together, alone, atol=1e-5)
    # changing a token before the last changes the score (the head sees the whole sequence)
    assert rm.score([[0, 3, 4, 5, 6, 7]]).item() != rm.score([[0, 3, 4, 1, 6, 7]]).item()
    with pytest.raises(UserError):
        rm.score([[]])


def test_save_and_load_round_trip_and_learned_reward(tmp_path):
    from nanostoney.rewards import LearnedReward
    tok = byte_tokenizer()
    gpt = tiny(vocab=tok.vocab_size)
    base = checkpoint.save_checkpoint(str(tmp_path / "base"), gpt, 1, tokenizer=tok)
    lora.apply_lora(gpt, rank=4, alpha=8)
    rm = reward_model.RewardModel(gpt)
    with torch.no_grad():
        for p in lora.lora_parameters(gpt):
            p.add_(0.05 * torch.randn_like(p))
        rm.head.bias.fill_(0.25)
    seqs = [[tok.bos_id, 65, 66, 67], [tok.bos_id, 70]]
    want = rm.score(seqs)
    checkpoint.save_checkpoint(str(tmp_path / "rm"), gpt, 3, meta=reward_model.head_meta(rm), base_checkpoint=base)
    loaded, loaded_tok, meta = reward_model.load_reward_model(str(tmp_path / "rm"))
    assert torch.equal(loaded.score(seqs), want)
    assert loaded_tok is not None and meta["stage"] == "reward_model"
    # the learned reward wraps it: a probability per completion
    ex = {"id": "x", "messages": [{"role": "user", "content": "2+2?"}, {"role": "assistant", "content": "4"}]}
    vals = LearnedReward(loaded, loaded_tok).batch([ex, ex], ["Answer: 4", "Answer: 5"], None)
    assert len(vals) == 2 and all(0 < v < 1 for v in vals) and vals[0] != vals[1]
    # a plain checkpoint is not a reward model
    with pytest.raises(UserError):
        reward_model.load_reward_model(str(tmp_path / "base"))


class FakeTask:
    def __init__(self, kind, exs, name="fake", family="math"):
        self.kind, self.rows, self.name, self.family = kind, exs, name, family

    def examples(self, split):
        return self.rows[split]

    def prompt(self, ex):
        return ex["messages"][:-1]

    def evaluate(self, ex, completion):
        got = completion.rpartition("Answer:")[2].strip()
        return got == ex["answer"]


def conv(user, assistant):
    return [{"role": "user", "content": user}, {"role": "assistant", "content": assistant}]


def argued(lines, value, letter):
    return f"<think>{lines}\nThe answer is {value} {letter}.</think>\nAnswer: {letter}"


CHAINS = {"A": ("48/2 = 24.\n48-24 = 24.", 24), "B": ("48/2 = 24.\n48+24 = 71.", 71),
          "C": ("48/2 = 24.\n48+24 = 72.", 72), "D": ("48*2 = 96.\n96+24 = 120.", 120), "E": ("48+24 = 72.", 144)}
MC = {"id": "mc1", "answer": "C", "choices": ["24", "71", "72", "120", "144"],
      "messages": conv("How many clips?\n\n- 24 A\n- 71 B\n- 72 C\n- 120 D\n- 144 E", argued(*CHAINS["C"], "C")),
      "option_rationales": {L: argued(lines, v, L) for L, (lines, v) in CHAINS.items()}}
NUM = {"id": "n1", "answer": "72", "messages": conv("How many clips?", "<think>48+24 = 72.</think>\nAnswer: 72"),
       "wrong_answers": ["<think>48-24 = 24.</think>\nAnswer: 24", "<think>48+24 = 73.</think>\nAnswer: 73"]}
LEX = [{"id": f"l{i}", "answer": a, "aliases": [a], "direction": "s2e",
        "messages": conv(f"What does `{t}` mean?", f"<think>`{t}` means '{a}'.</think>\nAnswer: {a}")}
       for i, (t, a) in enumerate([("îyâ", "to speak"), ("mînî", "water"), ("wîchasta", "man")])]


def test_ground_truth_negatives_argue_for_their_wrong_answer():
    """A negative is a wrong option with the rationale that leads to it, never the gold's
    rationale with the answer swapped (which a model could reject by checking consistency)."""
    task = FakeTask("mc", {"train": [MC]})
    bad = reward_model.rejected_text(task, MC)
    letter = answer_after(bad)
    assert letter in "ABDE" and bad == MC["option_rationales"][letter] and not task.evaluate(MC, bad)
    lines, value = CHAINS[letter]
    assert bad.startswith(f"<think>{lines}\n") and f"The answer is {value}" in bad   # its own chain
    assert reward_model.rejected_text(task, MC) == bad                               # deterministic
    assert reward_model.rejected_text(task, dict(MC, option_rationales=None)) is None  # none to argue: no pair

    num = FakeTask("numeric", {"train": [NUM]})
    bad = reward_model.rejected_text(num, NUM)
    assert bad in NUM["wrong_answers"] and not num.evaluate(NUM, bad)
    assert reward_model.rejected_text(num, dict(NUM, wrong_answers=[])) is None

    lex = FakeTask("open", {"train": LEX}, family="stoney")
    bad = reward_model.rejected_text(lex, LEX[0], LEX)
    other = answer_after(bad)
    assert other in ("water", "man") and f"means '{other}'" in bad


def test_build_pairs_renders_whole_conversations_and_respects_max_len():
    tok = byte_tokenizer()
    task = FakeTask("mc", {"train": [MC], "val": [MC]})
    pairs = reward_model.build_pairs(task, tok, "train")
    assert len(pairs) == 1
    p = pairs[0]
    assert p["chosen"] != p["rejected"] and p["family"] == "math" and p["kind"] == "ground_truth"
    assert p["chosen"][0] == tok.bos_id and p["chosen"][-1] == tok.token_id("<|assistant_end|>")
    assert reward_model.build_pairs(task, tok, "train", max_len=20) == []


def test_sampled_negatives_are_the_models_wrong_answers():
    tok = byte_tokenizer()
    gpt = tiny(vocab=tok.vocab_size)
    task = FakeTask("numeric", {"train": [NUM]})
    pairs = reward_model.sampled_pairs(gpt, tok, task, [NUM], samples=3, max_new_tokens=5, seed=0)
    assert 1 <= len(pairs) <= 3 and all(p["kind"] == "sampled" for p in pairs)
    gold_ids = tok.render_conversation({"messages": NUM["messages"]})[0]
    assert all(p["chosen"] == gold_ids and p["rejected"] != gold_ids for p in pairs)
    # a model that is always right yields no pair
    task.evaluate = lambda ex, c: True
    assert reward_model.sampled_pairs(gpt, tok, task, [NUM], samples=3, max_new_tokens=5) == []


@pytest.mark.slow
def test_real_task_pairs_chosen_pass_and_rejected_fail_the_verifier():
    from nanostoney.tasks import get_task
    from nanostoney.tasks.subset import subset
    for name in ("arith_mc", "arith", "stoney_lexicon", "stoney_mc"):
        task = get_task(name)
        exs = subset(task, "train", 40)
        made = 0
        for ex in exs:
            bad = reward_model.rejected_text(task, ex, exs)
            if bad is None:
                continue
            made += 1
            assert task.evaluate(ex, ex["messages"][-1]["content"])
            assert not task.evaluate(ex, bad), (name, bad)
        assert made >= 30, name


def test_rm_train_script_reports_held_out_accuracy_and_saves(tmp_path):
    import json
    import os
    from scripts import rm_train
    tok = byte_tokenizer()
    gpt = GPT(GPTConfig(sequence_len=1024, vocab_size=tok.vocab_size, n_layer=1, n_head=2, n_kv_head=2, n_embd=32))
    gpt.init_weights()
    base = checkpoint.save_checkpoint(str(tmp_path / "base"), gpt, 1, tokenizer=tok)
    out = str(tmp_path / "rm")
    rm_train.main(["--init", base, "--out", out, "--tasks", "arith_mc", "--max-train-examples", "4",
                   "--eval-pairs", "4", "--eval-sampled", "2", "--samples-per-prompt", "2",
                   "--sample-max-new-tokens", "8", "--num-iterations", "2", "--total-batch-size", "2",
                   "--device-batch-size", "2", "--device", "cpu", "--wandb", "disabled"])
    report = json.load(open(os.path.join(out, "rm_eval.json")))
    # ground-truth pairs and the init policy's own wrong answers, each scored on held-out items
    assert {"arith_mc", "arith_mc/policy", "family/math", "family/math/policy"} <= set(report["after"])
    assert report["after"]["arith_mc/policy"]["n"] == 4  # 2 items x 2 samples, all wrong
    with pytest.raises(UserError, match="GSM8K and AQuA have none"):
        rm_train.main(["--init", base, "--out", out + "_aqua", "--tasks", "aqua_mc", "--max-train-examples", "4",
                       "--device", "cpu", "--wandb", "disabled"])
    rm, _, meta = reward_model.load_reward_model(out)
    assert meta["stage"] == "reward_model" and rm.score([[1, 2, 3]]).shape == (1,)
