"""Multiple choice scored as a cloze (OLMES, Gu et al. 2024): the question WITHOUT the options, each
option's answer written out as the assistant would, the pick the most likely per character, scored
from where the answers differ. A small model can tell the right answer long before it names a letter.
"""
import os
from contextlib import nullcontext

import torch

from nanostoney.answers import LETTERS, format_answer, picked, rationale_part
from nanostoney.dist import autocast_ctx, map_over_ranks
from nanostoney.gpt import unwrap
from nanostoney.metrics import eval_mode
from nanostoney.tasks.base import question_only_text


def question_only(task, example):
    """The prompt messages with the options block cut off the last user turn."""
    messages = task.prompt(example)
    messages[-1] = {**messages[-1], "content": question_only_text(messages[-1]["content"])}
    return messages


def answer_texts(example):
    """Each option's answer as the assistant would write it, with no letter in it."""
    worked = example.get("option_rationales", {})
    return [format_answer(f"The answer is {choice}." if L not in worked
                          else rationale_part(worked[L]).replace(picked(choice, L), choice), choice)
            for L, choice in zip(LETTERS, example["choices"])]


def common_prefix(texts):
    return len(os.path.commonprefix(texts))


def scored_rows(tokenizer, task, example):
    """[(ids, first scored position, characters scored)] per option, scored where the answers differ."""
    prompt = tokenizer.render_prompt({"messages": question_only(task, example)})
    texts = answer_texts(example)
    differ = common_prefix(texts) if len(set(texts)) > 1 else 0
    rows = []
    for text in texts:
        enc = tokenizer.hf.encode(text, add_special_tokens=False)
        first = next(j for j, (_, end) in enumerate(enc.offsets) if end > differ)
        rows.append((prompt + enc.ids, len(prompt) + first, len(text) - enc.offsets[first][0]))
    return rows


def token_batches(rows, max_batch_tokens):
    """Consecutive runs of rows whose padded size (rows x longest) stays within max_batch_tokens."""
    batch, longest = [], 0
    for row in rows:
        if batch and max(longest, len(row[0])) * (len(batch) + 1) > max_batch_tokens:
            yield batch
            batch, longest = [], 0
        batch.append(row)
        longest = max(longest, len(row[0]))
    if batch:
        yield batch


@torch.no_grad()
def option_logprobs(model, rows, max_batch_tokens=16384):
    """Summed log-probability of each row from its first scored position (long rows cut on the left)."""
    context = model.config.sequence_len
    out = []
    for batch in token_batches(rows, max_batch_tokens):
        cut = [max(0, len(ids) - context) for ids, _, _ in batch]
        T = max(len(ids) - c for (ids, _, _), c in zip(batch, cut))
        x = torch.zeros(len(batch), T, dtype=torch.long)
        y = torch.full((len(batch), T), -1, dtype=torch.long)  # -1: not scored
        for r, ((ids, first, _), c) in enumerate(zip(batch, cut)):
            ids, first = ids[c:], max(1, first - c)
            x[r, :len(ids)] = torch.tensor(ids)
            y[r, first - 1:len(ids) - 1] = torch.tensor(ids[first:])
        device = model.get_device()
        nll = model(x.to(device), targets=y.to(device), loss_reduction="none").view(len(batch), T)
        out += (-nll.sum(1)).tolist()
    return out


def cloze_choices(model, tokenizer, task, examples, info=None, batch_items=8):
    """The letter each cloze picks (most likely per character; the first of tied answers), every rank."""
    model = unwrap(model)
    batches = [examples[i:i + batch_items] for i in range(0, len(examples), batch_items)]

    def choose(batch):
        rows = [row for ex in batch for row in scored_rows(tokenizer, task, ex)]
        with autocast_ctx(info) if info is not None else nullcontext():
            logps = option_logprobs(model, rows)
        picks, i = [], 0
        for ex in batch:
            n = len(ex["choices"])
            per_char = [lp / row[2] for lp, row in zip(logps[i:i + n], rows[i:i + n])]
            picks.append(LETTERS[max(range(n), key=per_char.__getitem__)])
            i += n
        return picks

    with eval_mode(model):
        done = map_over_ranks(choose, batches, info)
    return [p for part in done for p in part]


def cloze_correct(model, tokenizer, task, examples, info=None):
    """[1 if the cloze picks the gold option else 0] per example."""
    return [int(p == ex["answer"]) for p, ex in zip(cloze_choices(model, tokenizer, task, examples, info), examples)]
