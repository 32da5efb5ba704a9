"""Reward functions for GRPO: every reward is `fn(example, completion, task) -> float`.

`completion` is the decoded assistant text, `task` the Task that made `example` (its kind and its
verifier). combine_batch weights the rewards and returns each part for logging. Ranges: length in
[-0.5, 0.5], repetition in [-1, 0], the others in [0, 1]; only the relative weights matter.
"""
import math
import re
from itertools import takewhile

import torch

from nanostoney.answers import (LETTERS, MARKER, THINK_RE, after_think, answer_part, numbers_equal, rationale_part,
                                think_content)
from nanostoney.errors import UserError
from nanostoney.metrics import sentence_chrf
from nanostoney.tasks.base import EQUATION_RE

# a well-formed numeric answer line: the number and nothing else ("$", "," and "%" allowed)
NUMERIC_ANSWER_RE = re.compile(r"[-+]?\$?\s*\d[\d,]*(?:\.\d+)?%?")


def _kind(example, task):
    """The answer kind ("mc", "numeric", "open"): from the task, else from the example."""
    kind = getattr(task, "kind", None) or example.get("kind")
    assert kind in ("mc", "numeric", "open"), f"a reward needs a task kind of mc, numeric or open, got {kind!r}"
    return kind


def _gold_text(example):
    """The gold assistant message (the last assistant turn), or "" when the example has none."""
    return next((m["content"] for m in reversed(example.get("messages", [])) if m["role"] == "assistant"), "")


def _valid_answer(value, kind):
    """Is `value` (the text after "Answer:") in the task's format?"""
    value = value.strip()
    if kind == "mc":
        return len(value) == 1 and value in LETTERS
    if kind == "numeric":
        return NUMERIC_ANSWER_RE.fullmatch(value) is not None
    return len(value) > 0


def accuracy(example, completion, task):
    """1 if the task's verifier accepts the completion, else 0."""
    return 1.0 if task.evaluate(example, completion) else 0.0


def format_reward(example, completion, task):
    """Credit for `<think>…</think>` then an answer in the task's format, 0.5 per half.
    think: 0.5 one non-empty block at the start; 0.25 a non-empty block elsewhere or repeated.
    answer (after the last </think>): open: 0.5 for non-empty text; mc / numeric: 0.5 when the
    last line is "Answer: X" in the format and nothing else, 0.25 when such a line is not last
    or the last Answer line starts with a valid answer and carries extra words."""
    kind = _kind(example, task)
    text = completion.strip()
    think = 0.0
    blocks = THINK_RE.findall(text)
    if blocks and any(b.strip() for b in blocks):
        single = text.count("<think>") == 1 and text.count("</think>") == 1
        think = 0.5 if (single and text.startswith("<think>")) else 0.25
    if kind == "open":
        return think + (0.5 if answer_part(text) else 0.0)
    lines = [ln.strip() for ln in after_think(text).splitlines() if ln.strip()]
    values = [ln[len(MARKER):] for ln in lines if ln.startswith(MARKER)]
    if lines and lines[-1].startswith(MARKER) and _valid_answer(values[-1], kind):
        return think + 0.5
    # an Answer line whose value starts with a valid answer ("Answer: C) 600") is half right
    first = values[-1].split()[:1] if values else []
    if any(_valid_answer(v, kind) for v in values) or (first and _valid_answer(first[0].rstrip(").:,"), kind)):
        return think + 0.25
    return think


def _steps(think):
    """Distinct case-folded lines and sentences of a think block, ignoring bullets and stray numbers."""
    steps = {" ".join(p.split()).lower().rstrip(".!?;") for p in re.split(r"\n+|(?<=[.!?;])\s+", think)}
    return sum(len(p) >= 3 for p in steps)


def chain(example, completion, task):
    """The share of the gold's "a op b = c" lines the completion's reasoning writes in order, up to
    its first differing line; a gold without such lines (Stoney, MC) gets accuracy instead."""
    gold = gold_lines(example)
    if not gold:
        return accuracy(example, completion, task)
    got = EQUATION_RE.findall(rationale_part(completion))
    return sum(1 for _ in takewhile(lambda pair: _same_line(*pair), zip(gold, got))) / len(gold)


def gold_lines(example):
    """The (a, op, b, c) lines of the gold's reasoning."""
    return EQUATION_RE.findall(rationale_part(_gold_text(example)))


CHAIN_ERRORS = ("operand", "operator", "fact", "steps")


def chain_error(example, completion):
    """Where a completion's chain first leaves the gold's, the first differing line: "operand" (a
    number read wrong: the start, a step's number, the previous result, or a step skipped),
    "operator" (the right numbers, another operation), "fact" (the right numbers and operation, a
    wrong result); "steps" when every line written is the gold's but lines are missing or added.
    None when the lines are the gold's, or the gold has no "a op b = c" lines."""
    gold, got = gold_lines(example), EQUATION_RE.findall(rationale_part(completion))
    if not gold:
        return None
    for g, c in zip(gold, got):
        if not all(numbers_equal(float(x), float(y)) for x, y in ((g[0], c[0]), (g[2], c[2]))):
            return "operand"
        if g[1] != c[1]:
            return "operator"
        if not numbers_equal(float(g[3]), float(c[3])):
            return "fact"
    return "steps" if len(got) != len(gold) else None


def _same_line(a, b):
    """Two (a, op, b, c) lines are the same equation (numbers compared as numbers)."""
    return a[1] == b[1] and all(numbers_equal(float(x), float(y)) for x, y in zip(a[::2] + a[3:], b[::2] + b[3:]))


def reasoning_steps(example, completion, task, target=3):
    """min(distinct lines/sentences inside <think>, target) / target: saturating, so padding and
    repeating a step earn nothing; 0 without a closed think block."""
    think = think_content(completion)
    return 0.0 if think is None else min(_steps(think), target) / target


def length(example, completion, task, target=None, max_len=None):
    """Kimi k1.5's length penalty (arXiv 2501.12599, 2.3.3), the group's min/max lengths replaced by
    target and max_len characters (defaults: the gold's length, at least 64, and 4x that, at least 256)."""
    gold = len(_gold_text(example))
    target = target if target is not None else max(64, gold)
    max_len = max_len if max_len is not None else max(256, 4 * target)
    if max_len <= target:
        raise UserError(f"length reward needs max_len > target, got {max_len} <= {target}.")
    t = min(max((len(completion) - target) / (max_len - target), 0.0), 1.0)
    lam = 0.5 - t
    return lam if task.evaluate(example, completion) else min(0.0, lam)


def repetition(example, completion, task, n=3):
    """-(fraction of word n-grams that repeat an earlier one): 0 without repeats, near -1 for a loop."""
    words = completion.split()
    grams = [tuple(words[i:i + n]) for i in range(len(words) - n + 1)]
    return -(1.0 - len(set(grams)) / len(grams)) if grams else 0.0


def chrf_reference(example, completion, task):
    """(hypothesis, reference) for chrF, or None: open tasks compare the answer part with the gold
    answer; numeric / mc with a gold rationale compare the think blocks (the reasoning itself)."""
    if _kind(example, task) == "open":
        ref = example.get("answer") or answer_part(_gold_text(example))
        return answer_part(completion), ref
    ref = think_content(_gold_text(example))
    if not ref or not ref.strip():
        return None
    return think_content(completion) or "", ref


def chrf(example, completion, task):
    """chrF++ (word_order=2) against chrf_reference, scaled to [0, 1]; 0 without a reference."""
    pair = chrf_reference(example, completion, task)
    if pair is None or not pair[1].strip():
        return 0.0
    return sentence_chrf(*pair, word_order=2) / 100.0


class LearnedReward:
    """The reward model (`rm.score(ids_batch) -> (B,)`) on whole rendered conversations; "sigmoid" maps a
    score to its Bradley-Terry chance of beating a score-0 answer, so it cannot drown bounded rewards."""

    def __init__(self, rm, tokenizer, squash="sigmoid"):
        assert squash in ("sigmoid", None), f"squash is 'sigmoid' or None, got {squash!r}"
        self.rm, self.tokenizer, self.squash = rm, tokenizer, squash

    def _ids(self, example, completion, task):
        if task is not None and hasattr(task, "prompt"):
            prompt = task.prompt(example)
        else:  # the example's messages minus its gold assistant turn
            msgs = example["messages"]
            prompt = msgs[:-1] if msgs and msgs[-1]["role"] == "assistant" else msgs
        conv = {"messages": list(prompt) + [{"role": "assistant", "content": completion}]}
        return self.tokenizer.render_conversation(conv)[0]

    def batch(self, examples, completions, task):
        """Scores of many completions in one rm.score call; task: one Task or one per example."""
        tasks = task if isinstance(task, (list, tuple)) else [task] * len(examples)
        ids = [self._ids(e, c, t) for e, c, t in zip(examples, completions, tasks)]
        with torch.no_grad():
            s = self.rm.score(ids).detach().float().reshape(-1).cpu()
        return (torch.sigmoid(s) if self.squash == "sigmoid" else s).tolist()

    def __call__(self, example, completion, task):
        return self.batch([example], [completion], task)[0]


def _reward_model_missing(example, completion, task):
    raise UserError("reward 'reward_model' needs a trained reward model: build the rewards with its "
                    "checkpoint loaded (reward_model.load_reward_model), so a LearnedReward can score.")


# "reward_model" is replaced by LearnedReward(rm, tok) in build_rewards
REWARDS = {"accuracy": accuracy, "format": format_reward, "chain": chain, "reasoning_steps": reasoning_steps,
           "length": length, "repetition": repetition, "chrf": chrf, "reward_model": _reward_model_missing}


def parse_weights(spec):
    """"accuracy=1,format=0.2" -> {"accuracy": 1.0, "format": 0.2}; a bare name means weight 1."""
    weights = {}
    for item in filter(None, (s.strip() for s in spec.split(","))):
        name, _, value = item.partition("=")
        name = name.strip()
        if name not in REWARDS:
            raise UserError(f"unknown reward {name!r} in {spec!r}; valid rewards: "
                            f"{', '.join(REWARDS)}.")
        if name in weights:
            raise UserError(f"reward {name!r} is given twice in {spec!r}; give each reward once.")
        try:
            weights[name] = float(value) if value.strip() else 1.0
        except ValueError:
            weights[name] = float("nan")
        if not math.isfinite(weights[name]):
            raise UserError(f"reward weight for {name!r} must be a finite number, got {value!r} "
                            f"(write e.g. {name}=0.5).") from None
    if not weights:
        raise UserError(f"no rewards in {spec!r}; write e.g. 'accuracy=1,format=0.2' using "
                        f"{', '.join(REWARDS)}.")
    return weights


def build_rewards(weights, reward_model=None, tokenizer=None):
    """name -> reward callable for `weights`; fails before any sampling if reward_model is weighted but absent."""
    fns = {name: REWARDS[name] for name in weights}
    if "reward_model" in weights:
        if reward_model is None or tokenizer is None:
            _reward_model_missing(None, None, None)
        fns["reward_model"] = LearnedReward(reward_model, tokenizer)
    return fns


def combine_batch(weights, examples, completions, task, fns=None):
    """(totals, {name: raw values}) of many completions, total = sum of weight * value. task: one
    Task, or one per example; a reward with .batch (the learned one) scores them in one call."""
    tasks = list(task) if isinstance(task, (list, tuple)) else [task] * len(examples)
    if not len(examples) == len(completions) == len(tasks):
        raise ValueError(f"{len(examples)} examples, {len(completions)} completions and {len(tasks)} tasks")
    fns = fns or build_rewards(weights)
    parts = {}
    for name in weights:
        fn = fns[name]
        if hasattr(fn, "batch"):
            parts[name] = [float(v) for v in fn.batch(examples, completions, tasks)]
        else:
            parts[name] = [float(fn(e, c, t)) for e, c, t in zip(examples, completions, tasks)]
    totals = [sum(weights[name] * parts[name][i] for name in weights) for i in range(len(completions))]
    return totals, parts
