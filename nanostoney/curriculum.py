"""The pretraining curriculum: copying first, then the knowledge and task text.

A depth-4 model pretrained on the bundled corpus alone never learns to copy from its context
(BENCHMARKS.md). So the first copy_steps steps are drills (repeated random token spans, key-value and
option lookups); then each device batch is the corpus plus `arith_rows` fresh train-split arithmetic
problems and `drill_rows` drills. Generated rows are a pure function of (seed, step, micro, rank), so
a resume needs nothing saved; none reads Stoney data.
"""
import random
from dataclasses import dataclass

import numpy as np
import torch

from nanostoney.answers import LETTERS, format_answer, format_number, option_line, picked
from nanostoney.tasks import arith
from nanostoney.tasks.base import split_by_hash

ARITH_DEPTHS = (1, 2, 2, 3, 3, 4)  # depths weighted 1:2:2:1, as copy_wall's corpus
SYLLABLES = ("ka", "mo", "ri", "ta", "ne", "su", "lo", "pi", "zu", "ve", "do", "ha", "mi", "ro", "te", "ba")
FIRST_ORDINARY = 256  # token ids below are byte-level merges' raw bytes; the probe draws from here too
# Half of the span rows draw from this many tokens only: 400 steps of spans from the whole vocabulary
# grew no copying at all; a small alphabet lets the attention pattern form first (docs/science_log.md).
SMALL_ALPHABET = 128


@dataclass
class Curriculum:
    copy_steps: int = 0
    arith_rows: int = 0
    drill_rows: int = 0
    seed: int = 0

    def describe(self, num_iterations, device_batch):
        """The plan's line: each stage's steps and what a device batch holds."""
        stages = []
        if self.copy_steps:
            stages.append(f"copy steps 0-{min(self.copy_steps, num_iterations)}: {device_batch} drill rows "
                          f"(repeated spans, key-value and option lookups)")
        if self.copy_steps < num_iterations:
            stages.append(f"tasks steps {self.copy_steps}-{num_iterations}: "
                          f"{device_batch - self.arith_rows - self.drill_rows} corpus rows + {self.arith_rows} "
                          f"fresh train-split arith rows + {self.drill_rows} drill rows")
        return "curriculum: " + "; ".join(stages)

    def generated(self, step, micro, rank, rows, tok, seq_len):
        """(drill rows, arith rows) generated for this step, as arrays of seq_len + 1 tokens."""
        rng = random.Random(f"curriculum/{self.seed}/{step}/{micro}/{rank}")
        if step < self.copy_steps:
            return [drill_row(rng, tok, seq_len) for _ in range(rows)], []
        return ([drill_row(rng, tok, seq_len) for _ in range(self.drill_rows)],
                [pack(rng, tok, seq_len, arith_text) for _ in range(self.arith_rows)])


def corpus_rows(curriculum, device_batch):
    """Rows of each tasks-stage device batch that come from the corpus loader."""
    rows = device_batch - curriculum.arith_rows - curriculum.drill_rows
    if rows < 1:
        raise ValueError(f"the curriculum's generated rows ({curriculum.arith_rows} + {curriculum.drill_rows}) "
                         f"leave no corpus row of a {device_batch}-row batch")
    return rows


def batches(curriculum, loader, tok, seq_len, device_batch, info):
    """get(step, micro) for the training loop: drills in the copy stage, corpus + generated rows
    after (the loader reads corpus_rows() rows per batch and is only asked in the tasks stage)."""
    def get(step, micro):
        drills, sums = curriculum.generated(step, micro, info.rank, device_batch, tok, seq_len)
        parts = [torch.from_numpy(np.stack(drills + sums)).long()] if drills or sums else []
        if step >= curriculum.copy_steps:
            x, y = loader.get(step - curriculum.copy_steps, micro)
            parts.append(torch.cat([x[:, :1], y], 1).cpu())
        rows = torch.cat(parts).to(info.device)
        return rows[:, :-1].contiguous(), rows[:, 1:].contiguous()
    return get


# -----------------------------------------------------------------------------
# generated documents and rows

def pack(rng, tok, seq_len, make_text):
    """seq_len + 1 tokens: <|bos|> + a generated document, again and again, cut to length."""
    ids = []
    while len(ids) < seq_len + 1:
        ids += [tok.bos_id] + tok.encode(make_text(rng))
    return np.array(ids[:seq_len + 1], dtype=np.int64)


def fresh_problem(rng):
    """An arith problem whose (template, numbers) combination is in the train split, never a held-out one."""
    while True:
        drawn = arith.sample_problem(rng, rng.choice(ARITH_DEPTHS))
        if drawn is None:
            continue
        p = arith.make_problem(*drawn)
        if split_by_hash(p["key"]) == "train":
            return p


def arith_text(rng):
    """A fresh problem as the open `arith` task states it."""
    p = fresh_problem(rng)
    return p["question"] + "\n\n" + arith.answer_text(p["final"], p["rationale"])


def word(rng):
    return "".join(rng.choice(SYLLABLES) for _ in range(rng.randint(2, 3)))


def lookup_text(rng):
    """Key-value pairs, then some keys asked again: the value is the token after the copied key."""
    keys = list({word(rng): None for _ in range(rng.randint(3, 8))})
    table = {k: rng.choice([str(rng.randint(1, 99)), word(rng)]) for k in keys}
    asked = rng.sample(keys, rng.randint(1, len(keys)))
    return (". ".join(f"{k} = {v}" for k, v in table.items()) + ".\n"
            + "\n".join(f"{k} = {table[k]}" for k in asked))


def option_values(rng):
    """Five distinct option texts (numbers or made-up words) and the index of the one asked for."""
    values = rng.sample(range(1, 100), 5) if rng.random() < 0.5 else list({word(rng): 0 for _ in range(8)})[:5]
    while len(values) < 5:
        values.append(word(rng) + "s")
    return [format_number(v) if isinstance(v, int) else v for v in values], rng.randrange(5)


def option_drill(values, k, line=option_line, pick=picked):
    """The question for values[k], the options, and the pick; line and pick: the option format
    (the MC tasks' own, or another one bench.option_formats compares)."""
    options = "\n".join(line(L, v) for L, v in zip(LETTERS, values))
    return (f"Which option is {values[k]}?\n\n{options}\n\n"
            + format_answer(f"The answer is {pick(values[k], LETTERS[k])}.", LETTERS[k]))


def option_text(rng):
    """Five options and a pick stated as the MC tasks state it: the letter is read off the options."""
    return option_drill(*option_values(rng))


def span_row(rng, tok, seq_len):
    """Spans of random ordinary tokens, each repeated 2-3 times with random tokens between."""
    top = tok.vocab_size - len(tok.special_tokens)
    hi = min(top, FIRST_ORDINARY + SMALL_ALPHABET) if rng.random() < 0.5 else top
    ids = []
    while len(ids) < seq_len + 1:
        span = [rng.randrange(FIRST_ORDINARY, hi) for _ in range(rng.randint(8, 40))]
        ids.append(tok.bos_id)
        for r in range(rng.randint(2, 3)):
            ids += span + [rng.randrange(FIRST_ORDINARY, hi) for _ in range(rng.randint(0, 6))]
    return np.array(ids[:seq_len + 1], dtype=np.int64)


def drill_row(rng, tok, seq_len):
    """One row of drills: half repeated token spans, a quarter each lookups and options."""
    u = rng.random()
    if u < 0.5:
        return span_row(rng, tok, seq_len)
    return pack(rng, tok, seq_len, lookup_text if u < 0.75 else option_text)


def tie_embedding(model, std):
    """lm_head becomes the token embedding, scaled to `std` so the first logits are small: the
    copy stage's model (scripts/copy_train.py), whose frozen embedding lets copying form."""
    with torch.no_grad():
        model.transformer.wte.weight.mul_(std)
    model.lm_head.weight = model.transformer.wte.weight
