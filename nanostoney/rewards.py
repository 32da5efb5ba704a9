"""Reward functions for GRPO, one signature for all, combined by weights from the command line.

Every reward is a callable `fn(example, completion, task) -> float`:
- `example` is a task example dict (see nanostoney/tasks: "answer", "messages", "choices"...),
- `completion` is the decoded assistant text (no special tokens),
- `task` is the Task that made the example (its `kind` is "mc", "numeric" or "open" and its
  `evaluate(example, completion) -> bool` is the verifier).
One signature means GRPO never special-cases a reward: it calls `combine(...)` (or
`combine_batch(...)` for a group) and logs the total and each part under its name.

    weights = parse_weights("accuracy=1,format=0.2,repetition=0.1")   # the run's weights
    fns = build_rewards(weights, reward_model=rm, tokenizer=tok)      # once; rm only if weighted
    totals, parts = combine_batch(weights, [ex] * G, completions, task, fns)  # one GRPO group
    # parts = {"accuracy": [1.0, 0.0, ...], "format": [...], ...}: log the mean of each

The learned reward model is the one reward with state: build_rewards wraps it as
`LearnedReward(rm, tokenizer)`, which scores a whole group in one batched call.

Ranges: accuracy, chain, format, reasoning_steps, chrf, reward_model in [0, 1]; length in [-0.5, 0.5];
repetition in [-1, 0]. GRPO standardises the weighted total within each group, so only the
relative weights matter, not the offsets.
"""
import math
import re

import torch

from nanostoney.answers import (LETTERS, MARKER, THINK_RE, after_think, answer_part, numbers_equal, rationale_part,
                                think_content)
from nanostoney.errors import UserError
from nanostoney.metrics import sentence_chrf
from nanostoney.tasks.base import EQUATION_RE

# a well-formed numeric answer line: the number and nothing else ("$", "," and "%" allowed)
NUMERIC_ANSWER_RE = re.compile(r"[-+]?\$?\s*\d[\d,]*(?:\.\d+)?%?")


# -----------------------------------------------------------------------------
# small helpers shared by the rewards

def _kind(example, task):
    """The answer kind ("mc", "numeric", "open"): from the task, else from the example."""
    kind = getattr(task, "kind", None) or example.get("kind")
    if kind not in ("mc", "numeric", "open"):
        raise UserError(f"reward functions need a task kind of mc, numeric or open, got {kind!r}; "
                        "pass the Task object that made the example.")
    return kind


def _gold_text(example):
    """The gold assistant message (the last assistant turn), or "" when the example has none."""
    for m in reversed(example.get("messages", [])):
        if m["role"] == "assistant":
            return m["content"]
    return ""


def _valid_answer(value, kind):
    """Is `value` (the text after "Answer:") in the task's format?"""
    value = value.strip()
    if kind == "mc":
        return len(value) == 1 and value in LETTERS
    if kind == "numeric":
        return NUMERIC_ANSWER_RE.fullmatch(value) is not None
    return len(value) > 0


# -----------------------------------------------------------------------------
# the reward functions

def accuracy(example, completion, task):
    """1 if the task's verifier accepts the completion, else 0."""
    return 1.0 if task.evaluate(example, completion) else 0.0


def format_reward(example, completion, task):
    """Credit for the shape `<think>…</think>` then an answer in the task's format.

    Two halves of 0.5 each, so a model is paid for each half it has learned:
    think half:  0.5  the completion starts with <think>, has exactly one <think>…</think> pair,
                      and the block is not empty;
                 0.25 a closed, non-empty <think>…</think> exists but is not at the start or
                      is repeated;  0 otherwise (missing or unclosed).
    answer half (on the text after the last </think>):
      mc / numeric: 0.5  the last non-empty line is "Answer: X" with X a letter A–E (mc) or a
                         number (numeric, "$", "," and "%" allowed) and nothing else;
                    0.25 some line is "Answer: ..." in the right format but it is not the last
                         line (trailing text), or the last "Answer:" line carries extra words;
                    0 no "Answer:" line.
      open:         0.5  non-empty text after the think block ("Answer:" optional, but if the
                         text is just "Answer:" with nothing after it, it is empty); 0 otherwise.
    """
    kind = _kind(example, task)
    text = completion.strip()
    # think half
    think = 0.0
    blocks = THINK_RE.findall(text)
    if blocks and any(b.strip() for b in blocks):
        single = text.count("<think>") == 1 and text.count("</think>") == 1
        think = 0.5 if (single and text.startswith("<think>")) else 0.25
    # answer half
    tail = after_think(text)
    lines = [ln.strip() for ln in tail.splitlines() if ln.strip()]
    if kind == "open":
        return think + (0.5 if answer_part(text) else 0.0)
    n = len(MARKER)
    ans_lines = [ln for ln in lines if ln.startswith(MARKER)]
    answer = 0.0
    if lines and lines[-1].startswith(MARKER) and _valid_answer(lines[-1][n:], kind):
        answer = 0.5
    elif any(_valid_answer(ln[n:], kind) for ln in ans_lines):
        answer = 0.25
    elif ans_lines:
        # an Answer line whose value starts with a valid answer ("Answer: C) 600") is half right
        first = ans_lines[-1][n:].strip().split()
        if first and _valid_answer(first[0].rstrip(").:,"), kind):
            answer = 0.25
    return think + answer


def _steps(think):
    """Distinct reasoning steps: lines and sentences inside the think block, case-folded and
    deduplicated, ignoring fragments shorter than 3 characters (bullets, stray numbers)."""
    parts = re.split(r"\n+|(?<=[.!?;])\s+", think)
    seen = set()
    for p in parts:
        p = " ".join(p.split()).lower().rstrip(".!?;")
        if len(p) >= 3:
            seen.add(p)
    return len(seen)


def chain(example, completion, task):
    """Partial credit for a worked chain, checked against the gold's: the share of the gold's
    "a op b = c" lines (arith) that the completion's reasoning writes, in order, up to its first
    line that differs (a misread number, a wrong sum, a missing step all end the credit). 1.0
    only with every line right; a gold without such lines (Stoney, MC letters): the verifier's
    accuracy, so one weight serves a mixed batch."""
    gold = EQUATION_RE.findall(rationale_part(_gold_text(example)))
    if not gold:
        return accuracy(example, completion, task)
    got = EQUATION_RE.findall(rationale_part(completion))
    right = 0
    for g, c in zip(gold, got):
        if _same_line(g, c):
            right += 1
        else:
            break
    return right / len(gold)


def _same_line(a, b):
    """Two (a, op, b, c) lines are the same equation (numbers compared as numbers)."""
    return a[1] == b[1] and all(numbers_equal(float(x), float(y)) for x, y in zip(a[::2] + a[3:], b[::2] + b[3:]))


def reasoning_steps(example, completion, task, target=3):
    """min(steps, target) / target, where steps are the distinct lines/sentences inside <think>.
    Saturating, so the model is not paid for padding; 0 when there is no closed think block.
    Repeating one sentence counts once, which makes copying a step worthless."""
    think = think_content(completion)
    if think is None:
        return 0.0
    return min(_steps(think), target) / target


def length(example, completion, task, target=None, max_len=None):
    """Length penalty relative to correctness, after Kimi k1.5 (arXiv 2501.12599, sec. 2.3.3).

    Kimi scores a group: lam = 0.5 - (len - min_len) / (max_len - min_len); a correct answer
    gets lam, a wrong one min(0, lam). A single completion has no group, so the group's
    min/max are replaced by a target length and a max length (in characters):
        t   = clip((len - target) / (max_len - target), 0, 1)
        lam = 0.5 - t                                   (0.5 at or below target, -0.5 at max_len)
        reward = lam if correct else min(0, lam)
    so short correct answers earn up to +0.5, long correct ones down to -0.5, short wrong ones
    0 and long wrong ones down to -0.5. By default target is the length of the gold assistant
    message (the reference is as long as an answer needs to be) and max_len is 4x that,
    with floors of 64 and 256 characters so a terse gold does not punish every completion.
    """
    gold = len(_gold_text(example))
    target = target if target is not None else max(64, gold)
    max_len = max_len if max_len is not None else max(256, 4 * target)
    if max_len <= target:
        raise UserError(f"length reward needs max_len > target, got {max_len} <= {target}.")
    t = min(max((len(completion) - target) / (max_len - target), 0.0), 1.0)
    lam = 0.5 - t
    return lam if task.evaluate(example, completion) else min(0.0, lam)


def repetition(example, completion, task, n=3):
    """-(fraction of word n-grams that repeat an earlier one); 0 for a text with no repeats or
    fewer than n words, approaching -1 for a text that loops one phrase."""
    words = completion.split()
    grams = [tuple(words[i:i + n]) for i in range(len(words) - n + 1)]
    if not grams:
        return 0.0
    return -(1.0 - len(set(grams)) / len(grams))


def chrf_reference(example, completion, task):
    """(hypothesis, reference) pair that chrF compares for this example, or None.

    open answers (stoney_qa, stoney_lexicon): the completion's answer part against the gold
    answer (example["answer"], else the gold message's answer part);
    numeric / mc with a written rationale (gsm8k, aqua): the completion's think block against
    the gold think block, so the reasoning text itself is scored.
    """
    if _kind(example, task) == "open":
        ref = example.get("answer") or answer_part(_gold_text(example))
        return answer_part(completion), ref
    ref = think_content(_gold_text(example))
    if not ref or not ref.strip():
        return None
    return think_content(completion) or "", ref


def chrf(example, completion, task):
    """chrF++ (sacrebleu CHRF with word_order=2) of the completion against the reference text,
    scaled to [0, 1]; 0 when the example has no reference text to compare with."""
    pair = chrf_reference(example, completion, task)
    if pair is None or not pair[1].strip():
        return 0.0
    return sentence_chrf(*pair, word_order=2) / 100.0


class LearnedReward:
    """The learned reward model as a reward function.

    `rm` is anything with `score(ids_batch: list[list[int]]) -> torch.Tensor` of shape (B,):
    one scalar per token sequence, higher = better (nanostoney/reward_model.py provides it).
    `tokenizer` needs `render_conversation(conv) -> (ids, mask)`. The scored sequence is the
    whole rendered conversation (prompt + completion + <|assistant_end|>), the same rendering
    the reward model is trained on, so train and use see the same inputs.
    With squash="sigmoid" (default) the score is mapped to (0, 1): under Bradley–Terry
    sigmoid(r) is the chance of beating a reference answer of score 0, and it keeps one
    unbounded reward from drowning the bounded ones; squash=None returns raw scores.
    """

    def __init__(self, rm, tokenizer, squash="sigmoid"):
        if squash not in ("sigmoid", None):
            raise UserError(f"LearnedReward squash must be 'sigmoid' or None, got {squash!r}.")
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
        if self.squash == "sigmoid":
            s = torch.sigmoid(s)
        return s.tolist()

    def __call__(self, example, completion, task):
        return self.batch([example], [completion], task)[0]


def _reward_model_missing(example, completion, task):
    raise UserError("reward 'reward_model' needs a trained reward model: build the rewards with its "
                    "checkpoint loaded (reward_model.load_reward_model), so a LearnedReward can score.")


REWARDS = {
    "accuracy": accuracy,
    "format": format_reward,
    "chain": chain,
    "reasoning_steps": reasoning_steps,
    "length": length,
    "repetition": repetition,
    "chrf": chrf,
    "reward_model": _reward_model_missing,  # replaced by LearnedReward(rm, tok) via build_rewards
}


# -----------------------------------------------------------------------------
# weights and combination

def parse_weights(spec):
    """"accuracy=1,format=0.2" -> {"accuracy": 1.0, "format": 0.2}. A bare name means weight 1.
    Unknown names, bad numbers and duplicates raise UserError listing the valid names."""
    weights = {}
    for item in (s.strip() for s in spec.split(",")):
        if not item:
            continue
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
    """name -> reward callable for the names in `weights`, with the learned reward model
    wrapped when given. Fails early (before any sampling) if reward_model is weighted but absent."""
    fns = {name: REWARDS[name] for name in weights}
    if "reward_model" in weights:
        if reward_model is None or tokenizer is None:
            _reward_model_missing(None, None, None)
        fns["reward_model"] = LearnedReward(reward_model, tokenizer)
    return fns


def combine(weights, example, completion, task, fns=None):
    """(total, parts): parts[name] is each weighted reward's raw value (logged one by one),
    total = sum(weights[name] * parts[name])."""
    totals, parts = combine_batch(weights, [example], [completion], task, fns)
    return totals[0], {k: v[0] for k, v in parts.items()}


def combine_batch(weights, examples, completions, task, fns=None):
    """Like combine for many completions (e.g. a GRPO step; examples repeat within a group).
    task: one Task for all, or a list with one Task per example (a step mixing tasks).
    Rewards with a .batch method (the learned reward model) are scored in one call.
    Returns (totals: list[float], parts: {name: list[float]})."""
    if len(examples) != len(completions):
        raise ValueError(f"{len(examples)} examples but {len(completions)} completions")
    tasks = list(task) if isinstance(task, (list, tuple)) else [task] * len(examples)
    if len(tasks) != len(examples):
        raise ValueError(f"{len(examples)} examples but {len(tasks)} tasks")
    fns = fns or build_rewards(weights)
    parts = {}
    for name in weights:
        fn = fns.get(name, REWARDS.get(name))
        if fn is None:
            raise UserError(f"unknown reward {name!r}; valid rewards: {', '.join(REWARDS)}.")
        if hasattr(fn, "batch"):
            parts[name] = [float(v) for v in fn.batch(examples, completions, tasks)]
        else:
            parts[name] = [float(fn(e, c, t)) for e, c, t in zip(examples, completions, tasks)]
    totals = [sum(weights[name] * parts[name][i] for name in weights) for i in range(len(completions))]
    return totals, parts
