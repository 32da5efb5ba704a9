"""Each reward function ranks hand-written good completions above bad ones, for every task kind;
weights parse from the command-line string and combine into a logged total."""
import re

import pytest
import torch

from nanostoney import rewards
from nanostoney.errors import UserError
from nanostoney.rewards import (LearnedReward, build_rewards, combine_batch,
                                parse_weights)
from nanostoney.tasks import get_task


TASKS = ["aqua_mc", "gsm8k_mc", "stoney_mc", "gsm8k", "stoney_lexicon", "stoney_qa"]
STEPS = "<think>First I read the question.\nThen I work it out.\nFinally I check it.</think>\n"


@pytest.fixture(scope="module", params=TASKS)
def case(request):
    """(example, task): the first validation example of each real task (every kind: mc,
    numeric, open). Tasks are cached per process, so this costs one build per task."""
    task = get_task(request.param)
    return task.examples("val")[0], task


def final_line(ex, task, answer):
    return answer if task.kind == "open" else f"Answer: {answer}"


def good(ex, task):
    """A well-formed, correct completion with three reasoning steps."""
    return STEPS + final_line(ex, task, ex["answer"])


def wrong(ex, task):
    """A well-formed completion with the wrong answer."""
    if task.kind == "mc":
        bad = "B" if ex["answer"] != "B" else "D"
    elif task.kind == "numeric":
        bad = str(float(ex["answer"]) + 1)
    else:
        bad = "It means a river."
    return STEPS + final_line(ex, task, bad)


def gold(ex):
    return ex["messages"][-1]["content"]


def test_accuracy(case):
    ex, task = case
    assert rewards.accuracy(ex, good(ex, task), task) == 1.0
    assert rewards.accuracy(ex, wrong(ex, task), task) == 0.0


def test_format_partial_credit_order(case):
    ex, task = case
    full = good(ex, task)
    no_think = full.split("</think>\n")[1]
    assert rewards.format_reward(ex, full, task) == 1.0
    assert rewards.format_reward(ex, no_think, task) == 0.5
    assert rewards.format_reward(ex, "Preamble. " + full, task) == 0.75  # think block not at start
    assert rewards.format_reward(ex, full.replace("</think>", ""), task) < 1.0  # unclosed
    assert rewards.format_reward(ex, "I do not know.", task) == (0.5 if task.kind == "open" else 0.0)
    assert rewards.format_reward(ex, "<think></think>\nAnswer:", task) == 0.0


def test_format_answer_in_task_format():
    mc, num = get_task("aqua_mc"), get_task("gsm8k")
    a, g = mc.examples("val")[0], num.examples("val")[0]
    t = "<think>step one.</think>\n"
    assert rewards.format_reward(a, t + "Answer: B", mc) == 1.0
    assert rewards.format_reward(a, t + "Answer: C) 600", mc) == 0.75     # extra words
    assert rewards.format_reward(a, t + "Answer: B\nbecause reasons", mc) == 0.75  # trailing text
    assert rewards.format_reward(a, t + "Answer: 600", mc) == 0.5         # not a letter
    assert rewards.format_reward(a, t + "Answer: F", mc) == 0.5
    assert rewards.format_reward(g, t + "Answer: $1,250.50", num) == 1.0
    assert rewards.format_reward(g, t + "Answer: 18 dollars", num) == 0.75
    assert rewards.format_reward(g, t + "Answer: eighteen", num) == 0.5


def test_reasoning_steps(case):
    ex, task = case
    end = "</think>\n" + final_line(ex, task, ex["answer"])
    three = rewards.reasoning_steps(ex, good(ex, task), task)
    one = rewards.reasoning_steps(ex, "<think>I just know." + end, task)
    parrot = rewards.reasoning_steps(ex, "<think>I know. I know. I know.\nI know." + end, task)
    many = rewards.reasoning_steps(ex, "<think>" + " ".join(f"Step {i} done." for i in range(9)) + end, task)
    none = rewards.reasoning_steps(ex, "Step one. Step two. Step three. " + final_line(ex, task, ex["answer"]), task)
    assert three == 1.0 and many == 1.0  # saturates
    assert one == pytest.approx(1 / 3) and parrot == pytest.approx(1 / 3)  # repeats count once
    assert none == 0.0


def test_length_relative_to_correctness(case):
    ex, task = case
    padding = "\nLet me double check this once more." * (5 * len(gold(ex)) // 36 + 60)
    short_right, long_right = STEPS + final_line(ex, task, ex["answer"]), None
    long_right = good(ex, task).replace("</think>", padding + "</think>")
    short_wrong, long_wrong = wrong(ex, task), wrong(ex, task).replace("</think>", padding + "</think>")
    r = {name: rewards.length(ex, c, task) for name, c in
         [("sr", short_right), ("lr", long_right), ("sw", short_wrong), ("lw", long_wrong)]}
    assert r["sr"] > 0.25 and r["sw"] == 0.0  # about the gold's length or shorter: near the top
    assert r["lr"] < r["sr"] and r["lw"] < r["sw"]
    assert r["lw"] == -0.5 and r["lr"] == -0.5  # beyond max_len: the floor
    # linear between target and max_len
    base = good(ex, task)
    mid = base.replace("</think>", " " * (150 - len(base)) + "</think>") if len(base) < 150 else None
    if mid is not None:
        assert rewards.length(ex, mid, task, target=100, max_len=200) == pytest.approx(0.0)
    with pytest.raises(UserError):
        rewards.length(ex, base, task, target=100, max_len=100)


def test_repetition(case):
    ex, task = case
    loop = "<think>" + "the answer is the answer is " * 20 + "</think>\n" + final_line(ex, task, ex["answer"])
    assert rewards.repetition(ex, good(ex, task), task) == 0.0
    assert rewards.repetition(ex, loop, task) < -0.5
    assert rewards.repetition(ex, "too short", task) == 0.0


def perturb(text):
    """Every third letter replaced: still close to the original, clearly not equal."""
    return "".join("x" if c.isalpha() and i % 3 == 0 else c for i, c in enumerate(text))


def test_chrf_ranks_close_reference_above_unrelated(case):
    ex, task = case
    far_text = "Bananas are yellow and grow in bunches near the sea."
    if task.kind == "open":  # the answer is compared with the gold answer
        near = "<think>x</think>\n" + perturb(ex["answer"])
        far = "<think>x</think>\n" + far_text
    else:  # the reasoning is compared with the gold rationale
        reasoning = rewards.think_content(gold(ex))
        near = f"<think>{perturb(reasoning)}</think>\nAnswer: {ex['answer']}"
        far = f"<think>{far_text}</think>\nAnswer: {ex['answer']}"
    r_gold, r_near, r_far = (rewards.chrf(ex, c, task) for c in (gold(ex), near, far))
    assert r_gold == pytest.approx(1.0)
    assert r_gold > r_near > r_far >= 0.0


def test_chrf_zero_without_reference_text():
    task = get_task("aqua_mc")
    ex = task.examples("val")[0]
    ex = dict(ex, messages=ex["messages"][:-1] + [{"role": "assistant", "content": "Answer: A"}])
    assert rewards.chrf(ex, good(ex, task), task) == 0.0  # no gold rationale to compare with


class TildeScorer:
    """Fake reward model: the score is the number of "~" bytes; minus 10 per rendered message
    beyond two, so the test sees whether the gold turn leaked into the scored sequence."""

    def score(self, ids_batch):
        return torch.tensor([float(ids.count(ord("~")) - 10 * (ids.count(257) - 2)) for ids in ids_batch])


class ByteTok:
    """render_conversation with bytes as tokens; 256 = <|bos|>, 257 = end of a message."""

    def render_conversation(self, conv):
        ids = [256]
        for m in conv["messages"]:
            ids += list(m["content"].encode()) + [257]
        return ids, [0] * len(ids)


def test_learned_reward_wraps_scorer():
    task = get_task("aqua_mc")  # its prompt is a single user turn
    ex = task.examples("val")[0]
    good_c, bad_c = "<think>ok ~~</think>\nAnswer: A", "<think>ok</think>\nAnswer: A"
    lr = LearnedReward(TildeScorer(), ByteTok())
    assert lr(ex, good_c, task) > lr(ex, bad_c, task)
    assert lr(ex, bad_c, task) == pytest.approx(0.5)  # sigmoid(0)
    raw = LearnedReward(TildeScorer(), ByteTok(), squash=None)
    assert raw.batch([ex, ex], [good_c, bad_c], task) == [2.0, 0.0]  # order kept, gold turn dropped
    # in combine the learned reward is batched and logged like any other
    w = parse_weights("format=1,reward_model=0.5")
    totals, parts = combine_batch(w, [ex, ex], [good_c, bad_c], task,
                                  fns=build_rewards(w, TildeScorer(), ByteTok()))
    assert totals[0] > totals[1] and set(parts) == {"format", "reward_model"}
    assert parts["format"] == [1.0, 1.0]


def test_reward_model_weight_without_model_is_user_error():
    with pytest.raises(UserError, match="reward model"):
        build_rewards(parse_weights("accuracy=1,reward_model=1"))


def test_parse_weights():
    assert parse_weights("accuracy=1,format=0.2,repetition=0.1") == \
        {"accuracy": 1.0, "format": 0.2, "repetition": 0.1}
    assert parse_weights(" accuracy , chrf=0.5 ") == {"accuracy": 1.0, "chrf": 0.5}
    with pytest.raises(UserError, match="must be a finite number"):
        parse_weights("accuracy=lots")
    with pytest.raises(UserError, match="must be a finite number"):
        parse_weights("accuracy=nan")
    with pytest.raises(UserError, match="twice"):
        parse_weights("accuracy=1,accuracy=2")
    with pytest.raises(UserError):
        parse_weights(" , ")


def test_unknown_reward_lists_valid_names():
    with pytest.raises(UserError) as e:
        parse_weights("accuracy=1,bleu=0.3")
    msg = str(e.value)
    assert "'bleu'" in msg
    for name in rewards.REWARDS:
        assert name in msg


def test_combine_total_is_weighted_sum(case):
    ex, task = case
    w = parse_weights("accuracy=1,format=0.2,reasoning_steps=0.3,length=0.1,repetition=0.1,chrf=0.4")
    (total,), parts = combine_batch(w, [ex], [good(ex, task)], task)
    parts = {k: v[0] for k, v in parts.items()}
    assert set(parts) == set(w)
    assert total == pytest.approx(sum(w[k] * parts[k] for k in w))
    (bad_total,), _ = combine_batch(w, [ex], ["I do not know I do not know I do not know"], task)
    assert total > bad_total


def test_combine_batch_mixes_tasks():
    mc, num = get_task("aqua_mc"), get_task("gsm8k")
    a, g = mc.examples("val")[0], num.examples("val")[0]
    w = parse_weights("accuracy=1,format=0.5")
    totals, parts = combine_batch(w, [a, g, g], [good(a, mc), good(g, num), wrong(g, num)], [mc, num, num])
    assert parts["accuracy"] == [1.0, 1.0, 0.0] and parts["format"] == [1.0, 1.0, 1.0]
    assert totals == [1.5, 1.5, 0.5]
    with pytest.raises(ValueError):
        combine_batch(w, [a, g], [good(a, mc), good(g, num)], [mc])


def test_learned_reward_with_the_real_reward_model():
    """The protocol holds for nanostoney.reward_model.RewardModel: one score per completion,
    the same whether scored alone or in a batch (right padding does not leak)."""
    from nanostoney.gpt import GPT, GPTConfig
    from nanostoney.reward_model import RewardModel
    torch.manual_seed(0)
    gpt = GPT(GPTConfig(sequence_len=512, vocab_size=258, n_layer=1, n_head=2, n_kv_head=2, n_embd=32))
    gpt.init_weights()
    with torch.no_grad():  # init makes every block the identity; the last token must see the text
        for block in gpt.transformer.h:
            block.attn.c_proj.weight.normal_(0, 0.1)
    rm = RewardModel(gpt, head_std=1.0)
    task = get_task("aqua_mc")
    ex = task.examples("val")[0]
    comps = ["<think>ok</think>\nAnswer: A", "<think>a much longer line of thought here</think>\nAnswer: C"]
    lr = LearnedReward(rm, ByteTok(), squash=None)
    both = lr.batch([ex, ex], comps, task)
    alone = [lr(ex, c, task) for c in comps]
    assert both == pytest.approx(alone, abs=1e-5) and both[0] != both[1]


def test_chain_credits_the_gold_lines_up_to_the_first_wrong_one():
    """Partial credit for arith: each gold "a op b = c" line written right, in order, until the
    first that differs; a distractor's chain (the question misread) earns only the lines before
    its misreading; a task without equation lines falls back to the verifier."""
    task = get_task("arith")
    ex = next(e for e in task.examples("val") if e["depth"] == 3)
    lines = gold(ex).split("</think>")[0][len("<think>"):].split("\n")
    assert rewards.chain(ex, gold(ex), task) == 1.0
    assert rewards.chain(ex, "<think>" + lines[0] + "</think>\nAnswer: 1", task) == pytest.approx(1 / 3)
    a, op, b, c = re.search(r"(\d+) ([-+*/]) (\d+) = (\d+)", lines[1]).groups()  # after the re-read sentence
    broken = [lines[0], f"{a} {op} {b} = {int(c) + 1}", lines[2]]
    assert rewards.chain(ex, "<think>" + "\n".join(broken) + "</think>\nAnswer: 0", task) == pytest.approx(1 / 3)
    assert rewards.chain(ex, "Answer: " + ex["answer"], task) == 0.0
    for w in ex["wrong_answers"]:
        assert rewards.chain(ex, w, task) < 1.0
    lex = get_task("stoney_lexicon")
    item = lex.examples("val")[0]
    assert rewards.chain(item, gold(item), lex) == 1.0 and rewards.chain(item, "Answer: zzz", lex) == 0.0


def test_chain_error_names_the_first_line_that_leaves_the_gold():
    """A wrong result is a fact error, other numbers an operand error (a misreading), the same
    numbers under another operation an operator error; lines the gold's but too few are steps.
    Each distractor chain (the question misread) is one of them; the gold and a task without
    equation lines are none. score_task reports the shares for the open arith task only."""
    from nanostoney import evaluate
    task = get_task("arith")
    ex = next(e for e in task.examples("val") if e["depth"] == 3)
    lines = gold(ex).split("</think>")[0][len("<think>"):].split("\n")
    head, eq = lines[1].rsplit(": ", 1)
    a, op, b, c = re.fullmatch(r"(\d+) ([-+*/]) (\d+) = (\d+)", eq).groups()
    other_op = "+" if op != "+" else "-"
    def with_line2(line):
        return "<think>" + "\n".join([lines[0], f"{head}: {line}", lines[2]]) + "</think>\nAnswer: 0"
    assert rewards.chain_error(ex, gold(ex)) is None
    assert rewards.chain_error(ex, with_line2(f"{a} {op} {b} = {int(c) + 1}")) == "fact"
    assert rewards.chain_error(ex, with_line2(f"{a} {op} {int(b) + 1} = {c}")) == "operand"
    assert rewards.chain_error(ex, with_line2(f"{int(a) + 1} {op} {b} = {c}")) == "operand"
    assert rewards.chain_error(ex, with_line2(f"{a} {other_op} {b} = {c}")) == "operator"
    assert rewards.chain_error(ex, "<think>" + lines[0] + "</think>\nAnswer: 1") == "steps"
    assert rewards.chain_error(ex, "Answer: " + ex["answer"]) == "steps"
    assert all(rewards.chain_error(ex, w) is not None for w in ex["wrong_answers"])
    lex = get_task("stoney_lexicon")
    assert rewards.chain_error(lex.examples("val")[0], "Answer: zzz") is None

    exs = [ex] * 4
    greedy = [gold(ex), with_line2(f"{a} {op} {b} = {int(c) + 1}"), gold(ex), "Answer: 7"]
    m = evaluate.score_task(task, exs, greedy, [[] for _ in exs], comet=False)[0]["metrics"]
    assert m["first error: fact"]["value"] == pytest.approx(0.25) and m["first error: steps"]["value"] == 0.25
    assert m["first error: operand"]["value"] == 0.0 and m["first error: operator"]["value"] == 0.0
    mc = get_task("arith_mc")
    mc_exs = mc.examples("val")[:2]
    assert not any(k.startswith("first error") for k in
                   evaluate.score_task(mc, mc_exs, [gold(e) for e in mc_exs], [[], []], comet=False)[0]["metrics"])
