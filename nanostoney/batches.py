"""Which rows form which SFT batch: a precomputed schedule of (task, example) draws by mixture weight.

Every batch is a pure function of (step, micro-step, rank) (first_row), so the data state is just
the step: a resume continues with exactly the rows an uninterrupted run would have seen, and 2
processes x 1 micro-step see the rows of 1 process x 2. Rows are padded to the longest in the
micro-batch, targets -1 outside assistant tokens.
"""
import math

import torch

from nanostoney.errors import UserError
from nanostoney.governance import check_sources
from nanostoney.tasks import get_task, sources_for_tasks
from nanostoney.tasks.subset import subset


def first_row(step, micro, grad_accum, world_size, rank, device_batch):
    """Index of the first sequence that (step, micro, rank) takes."""
    return ((step * grad_accum + micro) * world_size + rank) * device_batch


def parse_mixture(spec):
    """"stoney_mc=2,gsm8k_mc=1" -> {"stoney_mc": 2.0, "gsm8k_mc": 1.0} (a bare name weighs 1)."""
    weights = {}
    for part in filter(None, map(str.strip, spec.split(","))):
        name, _, w = part.partition("=")
        try:
            weight = float(w) if w else 1.0
        except ValueError:
            weight = float("nan")
        if not math.isfinite(weight):
            raise UserError(f"weight {w!r} of {name!r} is not a finite number; write name=weight.")
        if weight < 0:
            raise UserError(f"weight of {name!r} is negative; weights must be >= 0.")
        weights[name.strip()] = weight
    if not weights or sum(weights.values()) <= 0:
        raise UserError("no task with a positive weight; e.g. stoney_mc=1,gsm8k_mc=1.")
    return weights


def mixture_tasks(spec):
    """({name: weight}, [Task]) of a "name=weight,..." mixture of known tasks, none a control."""
    weights = parse_mixture(spec)
    tasks = [get_task(n) for n in weights]  # unknown names: one-sentence UserError
    for t in tasks:
        if t.control:
            raise UserError(f"{t.name} is a control (no training text may hold its items); "
                            f"train on {t.name.replace('_unseen', '')} instead.")
    return weights, tasks


def training_tasks(spec, manifest=None):
    """({name: weight}, [Task], sources) of a mixture, once the gate has approved every source for training."""
    weights, tasks = mixture_tasks(spec)
    sources = sources_for_tasks(list(weights))
    check_sources(sources, use="training", manifest=manifest)
    return weights, tasks, sources


def mixture_schedule(sizes, weights, n, seed=0):
    """n draws of (task index, example index): task by weight, then each task's examples in a
    seeded shuffled order, reshuffled after every pass."""
    g = torch.Generator().manual_seed(seed)
    probs = torch.tensor(weights, dtype=torch.float64)
    tasks = torch.multinomial(probs / probs.sum(), n, replacement=True, generator=g).tolist()
    orders = [[] for _ in sizes]
    schedule = []
    for t in tasks:
        if not orders[t]:
            orders[t] = torch.randperm(sizes[t], generator=g).tolist()[::-1]  # pop() from the end
        schedule.append((t, orders[t].pop()))
    return schedule


def depth_curriculum(schedule, train_sets, per_step, n_steps):
    """The prompt schedule with every entry of a task whose train items have several depths
    (arith, arith_mc) redrawn among its items no deeper than the step's stage: with D depths,
    stage k (depth <= k-th smallest) covers steps [(k-1) n / D, k n / D). Other tasks as they were."""
    depths = [sorted({ex["depth"] for ex in s if ex.get("depth")}) for s in train_sets]
    out = []
    for j, (t, i) in enumerate(schedule):
        ds = depths[t]
        if len(ds) >= 2:
            limit = ds[min(len(ds) - 1, (j // per_step) * len(ds) // n_steps)]
            pool = [k for k, ex in enumerate(train_sets[t]) if ex.get("depth", 0) <= limit]
            i = pool[i % len(pool)]
        out.append((t, i))
    return out


def curriculum_stages(schedule, train_sets, per_step):
    """"steps a-b: depth <= d" per stage of the schedule, for the plan (first deep task)."""
    deep = next((t for t, s in enumerate(train_sets) if len({ex.get("depth") for ex in s}) > 1), None)
    if deep is None:
        return "no task with several depths"
    stages = {}
    for j, (t, i) in enumerate(schedule):
        if t == deep:
            stages.setdefault(train_sets[t][i]["depth"], [j // per_step, 0])[1] = j // per_step
    return "; ".join(f"steps {lo + 1}-{hi + 1}: depth <= {d}" for d, (lo, hi) in sorted(stages.items()))


def collate(rows, pad_id, device):
    """rows of (ids, mask) -> x (B, L), y (B, L) with y = next token where mask is 1, else -1."""
    L = max(len(ids) for ids, _ in rows) - 1
    x = torch.full((len(rows), L), pad_id, dtype=torch.long)
    y = torch.full((len(rows), L), -1, dtype=torch.long)
    for r, (ids, mask) in enumerate(rows):
        ids_t = torch.tensor(ids, dtype=torch.long)
        x[r, :len(ids) - 1] = ids_t[:-1]
        y[r, :len(ids) - 1] = ids_t[1:].masked_fill(~torch.tensor(mask[1:], dtype=torch.bool), -1)
    return x.to(device), y.to(device)


class SFTBatches:
    """get(step, micro) -> (x, y) of this rank; rendered: per task, (ids, mask) rows of at most seq_len + 1."""

    def __init__(self, rendered, weights, num_iterations, device_batch, grad_accum, info, pad_id, seed=0):
        self.rendered, self.B, self.accum, self.info, self.pad_id = rendered, device_batch, grad_accum, info, pad_id
        n = num_iterations * grad_accum * info.world_size * device_batch
        self.schedule = mixture_schedule([len(r) for r in rendered], weights, n, seed)

    def first_drawn(self, task, k):
        """The first k distinct examples of `task` in the order the run draws them (its trained items)."""
        return list(dict.fromkeys(i for t, i in self.schedule if t == task))[:k]

    def get(self, step, micro):
        g = first_row(step, micro, self.accum, self.info.world_size, self.info.rank, self.B)
        return collate([self.rendered[t][i] for t, i in self.schedule[g:g + self.B]], self.pad_id, self.info.device)


def render_examples(tokenizer, examples, max_tokens, drop_truncated=True):
    """(rows, kept indices): (ids, mask) of task examples, at most max_tokens each. drop_truncated leaves
    out longer conversations (the answer comes last, so a cut one teaches rambling without answering);
    otherwise they are cut, and dropped only when no assistant token is left."""
    rows, kept = [], []
    for i, ex in enumerate(examples):
        ids, mask = tokenizer.render_conversation({"messages": ex["messages"]})
        if len(ids) > max_tokens:
            if drop_truncated:
                continue
            ids, mask = ids[:max_tokens], mask[:max_tokens]
        if len(ids) >= 2 and any(mask[1:]):
            rows.append((list(ids), list(mask)))
            kept.append(i)
    return rows, kept


def render_train_sets(tokenizer, tasks, max_tokens, limit=0, drop_truncated=True):
    """Per task: `limit` train examples that fit (0 = all) in tasks.subset's order, and their rows;
    rendered in chunks so a small limit does not tokenize a whole task."""
    examples, rendered = [], []
    for task in tasks:
        exs = subset(task, "train")
        limit_t = limit if limit > 0 else len(exs)
        rows, kept = [], []
        for start in range(0, len(exs), 256):
            r, k = render_examples(tokenizer, exs[start:start + 256], max_tokens, drop_truncated)
            rows, kept = rows + r, kept + [start + i for i in k]
            if len(rows) >= limit_t:
                break
        if not rows:
            raise UserError(f"task {task.name}: no train conversation fits in {max_tokens} tokens; "
                            f"raise --sequence-len or pass --keep-truncated.")
        examples.append([exs[i] for i in kept[:limit_t]])
        rendered.append(rows[:limit_t])
    return examples, rendered
