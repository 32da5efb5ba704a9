"""Which rows form which batch, for pretraining and SFT: deterministic and resumable.

Every batch is a pure function of (step, micro-step, rank): sequence number
    g = ((step * grad_accum + micro) * world_size + rank) * device_batch
is the first row a process takes. The data "state" is therefore just the step, so
- --resume continues with exactly the rows an uninterrupted run would have seen, and
- 2 processes x 1 micro-step see the same rows as 1 process x 2 micro-steps (the DDP test).

Pretraining: documents are tokenized once, joined into one stream with <|bos|> before each
document, and cut into windows of seq_len + 1 tokens (inputs and shifted targets). Each pass
over the windows visits them in a fresh seeded permutation.
SFT: a precomputed schedule of (task, example) draws by mixture weight; rows are padded to
the longest in the micro-batch, with targets -1 outside assistant tokens.
"""
import math

import torch

from nanostoney.data import check_sources
from nanostoney.errors import UserError
from nanostoney.tasks import get_task, sources_for_tasks

# -----------------------------------------------------------------------------
# pretraining windows


def tokenize_documents(tokenizer, docs):
    """One LongTensor stream: <|bos|> doc0 <|bos|> doc1 ... (bos marks every document start)."""
    bos = tokenizer.bos_id
    stream = []
    for ids in tokenizer.encode_batch(list(docs)):
        stream.append(bos)
        stream.extend(ids)
    return torch.tensor(stream, dtype=torch.long)


class TokenWindows:
    """Non-overlapping windows of seq_len + 1 tokens over a stream, read in a seeded order.

    window(g) for g = 0, 1, 2, ... walks permutation 0 of all windows, then permutation 1, ...
    (shuffle=False: the natural order, for evaluation).
    """

    def __init__(self, tokens, seq_len, seed=0, shuffle=True, what="corpus"):
        self.tokens, self.seq_len, self.seed, self.shuffle = tokens, seq_len, seed, shuffle
        self.n = (len(tokens) - 1) // seq_len
        if self.n < 1:
            raise UserError(f"the {what} has {len(tokens)} tokens, fewer than one sequence of "
                            f"{seq_len + 1}; add data or lower --sequence-len.")
        self._perms = {}

    def _perm(self, epoch):
        if epoch not in self._perms:
            self._perms = {k: v for k, v in self._perms.items() if k >= epoch - 1}  # keep memory flat
            g = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
            self._perms[epoch] = torch.randperm(self.n, generator=g)
        return self._perms[epoch]

    def window(self, g):
        epoch, i = divmod(g, self.n)
        j = int(self._perm(epoch)[i]) if self.shuffle else i
        start = j * self.seq_len
        return self.tokens[start:start + self.seq_len + 1]

    def rows(self, start, count):
        w = torch.stack([self.window(g) for g in range(start, start + count)])
        return w[:, :-1].contiguous(), w[:, 1:].contiguous()


def first_row(step, micro, grad_accum, world_size, rank, device_batch):
    """Index of the first sequence that (step, micro, rank) takes; see the module docstring."""
    return ((step * grad_accum + micro) * world_size + rank) * device_batch


class PretrainBatches:
    """get(step, micro) -> (x, y) of this rank, on the device."""

    def __init__(self, windows, device_batch, grad_accum, info):
        self.windows, self.B, self.accum, self.info = windows, device_batch, grad_accum, info

    def get(self, step, micro):
        g = first_row(step, micro, self.accum, self.info.world_size, self.info.rank, self.B)
        x, y = self.windows.rows(g, self.B)
        dev = self.info.device
        return x.to(dev, non_blocking=True), y.to(dev, non_blocking=True)

    def position(self, step):
        """Sequences consumed before `step` (the loader's whole state)."""
        return first_row(step, 0, self.accum, self.info.world_size, 0, self.B)


def eval_batches(windows, device_batch, info, max_rows=None):
    """This rank's share of the evaluation windows (natural order, every rank a stride)."""
    n = windows.n if max_rows is None else min(windows.n, max_rows)
    mine = list(range(info.rank, n, info.world_size))
    for i in range(0, len(mine), device_batch):
        idx = mine[i:i + device_batch]
        w = torch.stack([windows.window(g) for g in idx]).to(info.device)
        yield w[:, :-1].contiguous(), w[:, 1:].contiguous()


# -----------------------------------------------------------------------------
# SFT mixtures


def parse_mixture(spec):
    """"stoney_mc=2,gsm8k_mc=1" -> {"stoney_mc": 2.0, "gsm8k_mc": 1.0} (a bare name weighs 1)."""
    weights = {}
    for part in spec.split(","):
        part = part.strip()
        if not part:
            continue
        name, _, w = part.partition("=")
        try:
            weight = float(w) if w else 1.0
        except ValueError:
            weight = float("nan")
        if not math.isfinite(weight):
            raise UserError(f"--tasks: weight {w!r} of {name!r} is not a finite number; write name=weight.")
        if weight < 0:
            raise UserError(f"--tasks: weight of {name!r} is negative; weights must be >= 0.")
        weights[name.strip()] = weight
    if not weights or sum(weights.values()) <= 0:
        raise UserError("--tasks names no task with a positive weight; e.g. --tasks stoney_mc=1,gsm8k_mc=1.")
    return weights


def training_tasks(spec, manifest=None):
    """({name: weight}, [Task], sources) for a "name=weight,..." mixture, after the governance
    gate has approved every source for training (else a one-sentence UserError)."""
    weights = parse_mixture(spec)
    tasks = [get_task(n) for n in weights]  # unknown names: one-sentence UserError
    sources = sources_for_tasks(list(weights))
    check_sources(sources, use="training", manifest=manifest)
    return weights, tasks, sources


def mixture_schedule(sizes, weights, n, seed=0):
    """n draws of (task index, example index): task by weight, then each task's examples in a
    seeded shuffled order, reshuffled after every pass. Deterministic in (sizes, weights, n, seed)."""
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


def collate(rows, pad_id, device):
    """rows of (ids, mask) -> x (B, L), y (B, L) with y = next token where mask is 1, else -1."""
    L = max(len(ids) for ids, _ in rows) - 1
    x = torch.full((len(rows), L), pad_id, dtype=torch.long)
    y = torch.full((len(rows), L), -1, dtype=torch.long)
    for r, (ids, mask) in enumerate(rows):
        ids_t = torch.tensor(ids, dtype=torch.long)
        m = torch.tensor(mask[1:], dtype=torch.bool)
        n = len(ids) - 1
        x[r, :n] = ids_t[:-1]
        y[r, :n] = torch.where(m, ids_t[1:], torch.full_like(ids_t[1:], -1))
    return x.to(device), y.to(device)


class SFTBatches:
    """get(step, micro) -> (x, y) of this rank from a precomputed mixture schedule.

    rendered: per task, a list of (ids, mask) already rendered and truncated to seq_len + 1.
    """

    def __init__(self, rendered, weights, num_iterations, device_batch, grad_accum, info, pad_id, seed=0):
        self.rendered, self.B, self.accum, self.info, self.pad_id = rendered, device_batch, grad_accum, info, pad_id
        n = num_iterations * grad_accum * info.world_size * device_batch
        self.schedule = mixture_schedule([len(r) for r in rendered], weights, n, seed)

    def rows(self, step, micro):
        g = first_row(step, micro, self.accum, self.info.world_size, self.info.rank, self.B)
        return [self.rendered[t][i] for t, i in self.schedule[g:g + self.B]]

    def first_drawn(self, task, k):
        """Indices of the first k distinct examples of `task` in the order the run draws them
        (the "trained items" an accuracy check should use)."""
        seen = []
        for t, i in self.schedule:
            if t == task and i not in seen:
                seen.append(i)
                if len(seen) == k:
                    break
        return seen

    def get(self, step, micro):
        return collate(self.rows(step, micro), self.pad_id, self.info.device)


def render_examples(tokenizer, examples, max_tokens, drop_truncated=True):
    """(ids, mask) rows of task examples, at most max_tokens each. Returns (rows, kept indices).

    drop_truncated: leave out conversations longer than max_tokens. Our answers come last
    ("... Answer: C"), so a cut conversation would teach the model to ramble without
    answering. Otherwise they are cut, and only those with no assistant token left dropped.
    """
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
    """Per task: (its first `limit` train examples that fit, their rendered rows); 0 = all.
    Renders in chunks so a small limit does not tokenize a whole 7k-example task."""
    examples, rendered = [], []
    for task in tasks:
        exs = task.examples("train")
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
