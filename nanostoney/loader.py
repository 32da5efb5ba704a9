"""Streaming pretraining data: parquet row groups -> tokens -> packed rows, resumable exactly.

    corpus = Corpus(files)                                 # footers only: units, sizes, checks
    train_part, val_part = corpus.split_last()             # hold out the last row group
    loader = PretrainLoader(train_part, tok, seq_len, device_batch, accum, info, seed)
    x, y = loader.get(step, micro)                         # in order: step 0 micro 0, 1, ...
    meta["data_position"] = loader.position(step)          # all ranks call it; resume from it

A lane holds one unit (file, row group) at a time, so memory does not grow with the data. The run
reads L = world_size x grad_accum lanes; micro-step m of rank r reads lane k = m x world_size + r:
units k, k + L, ... of seeded permutations of all units, so 2 processes x 1 micro-step read the rows
of 1 x 2. Documents (<|bos|> + tokens) are joined and cut into rows of seq_len + 1 overlapping by one:
every token is a target once, none cropped (nanochat's original packing). A lane's position (unit,
document, token) resumes exactly at any world size with the same number of lanes.
"""
import hashlib
import os
from collections import deque

import numpy as np
import torch

from nanostoney.dist import gather_lists
from nanostoney.errors import UserError
from nanostoney.sources import check_text_column, open_parquet, parquet_error

DOC_BATCH = 128       # documents read and tokenized at a time


# -----------------------------------------------------------------------------
# a corpus: units (file, row group) from the parquet footers

class Corpus:
    """Parquet files read as units (file index, row group). Every file is opened once here, its
    footer read and checked (readable, has the text column), so bad input fails before training."""

    def __init__(self, files, column="text", what="corpus"):
        self.files, self.column, self.what = list(files), column, what
        self.rows, self.nbytes = {}, {}  # per unit: documents, uncompressed text bytes
        for i, path in enumerate(self.files):
            table = open_parquet(path)
            check_text_column(path, table.schema_arrow, column)
            meta, c = table.metadata, table.schema_arrow.names.index(column)
            for rg in range(meta.num_row_groups):
                g = meta.row_group(rg)
                self.rows[(i, rg)] = g.num_rows
                self.nbytes[(i, rg)] = max(0, g.column(c).total_uncompressed_size - 4 * g.num_rows)
        self.units = [u for u in self.rows if self.rows[u] > 0]
        if not self.units:
            raise UserError(f"the {what} ({', '.join(self.files[:3])}) holds no rows; check the files.")

    def part(self, units, what):
        part = Corpus.__new__(Corpus)  # the same files and footers, fewer units
        part.__dict__.update(self.__dict__, what=what, units=list(units))
        return part

    def split_last(self):
        """(everything but the last unit, the last unit): the held-out validation row group."""
        if len(self.units) < 2:
            raise UserError(f"the {self.what} has a single row group, so none can be held out for "
                            f"validation; pass --val-data or write the files with more row groups.")
        return self.part(self.units[:-1], self.what), self.part(self.units[-1:], "validation corpus")

    @property
    def text_bytes(self):
        """Approximate UTF-8 bytes of text: the column's uncompressed size less length prefixes."""
        return sum(self.nbytes[u] for u in self.units)

    def key(self):
        """The units' file names and sizes: what must not change between a run and its resume."""
        h = hashlib.sha256(self.column.encode())
        for i, rg in self.units:
            h.update(f"\0{os.path.basename(self.files[i])}:{rg}:{self.rows[(i, rg)]}".encode())
        return h.hexdigest()[:16]

    def texts(self, unit, start=0):
        """(index of the first, texts) of the unit's documents from `start` on, DOC_BATCH at a time."""
        i, rg = unit
        path, index = self.files[i], 0
        try:
            for batch in open_parquet(path).iter_batches(DOC_BATCH, row_groups=[rg], columns=[self.column]):
                n = batch.num_rows
                if index + n > start:
                    skip = max(0, start - index)
                    yield index + skip, batch.column(0).slice(skip).to_pylist()
                index += n
        except (OSError, ValueError) as e:  # pyarrow's errors derive from these
            raise parquet_error(f"{path} (row group {rg})", e) from None


# -----------------------------------------------------------------------------
# one lane: a stream of packed rows

class Lane:
    """Rows of seq_len + 1 tokens from units g = lane, lane + lanes, ..., from `position` (j, d, o)
    on. shuffle=False reads the units in their natural order, each epoch alike (validation)."""

    def __init__(self, corpus, tokenizer, seq_len, lane=0, lanes=1, seed=0, shuffle=True, position=None):
        self.corpus, self.tok, self.T = corpus, tokenizer, seq_len
        self.lane, self.lanes, self.seed, self.shuffle = lane, lanes, seed, shuffle
        j, d, o = position or (0, 0, 0)
        self._perms = {}
        self._docs = self._documents(j, d)
        self.buf, self.off, self.buffered = deque(), 0, 0
        self._pull()
        if position is not None and (tuple(self.buf[0][:2]) != (j, d) or o >= len(self.buf[0][2])):
            raise UserError(f"the saved data position {[j, d, o]} does not fit the {corpus.what}; "
                            f"resume with the data the run was started with.")
        self.off = o

    def unit(self, j):
        epoch, i = divmod(self.lane + j * self.lanes, len(self.corpus.units))
        if not self.shuffle:
            return self.corpus.units[i]
        if epoch not in self._perms:
            self._perms = {e: p for e, p in self._perms.items() if e >= epoch - 1}  # keep memory flat
            g = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
            self._perms[epoch] = torch.randperm(len(self.corpus.units), generator=g)
        return self.corpus.units[int(self._perms[epoch][i])]

    def epoch(self):
        """Passes over the corpus finished before the current unit."""
        return (self.lane + self.buf[0][0] * self.lanes) // len(self.corpus.units)

    def _documents(self, j, d):
        """(j, d, tokens) of every non-empty document from unit j, document d on, forever."""
        bos, empty = self.tok.bos_id, 0
        while True:
            for start, texts in self.corpus.texts(self.unit(j), d):
                keep = [(start + k, t) for k, t in enumerate(texts) if t]
                for (index, _), ids in zip(keep, self.tok.encode_batch([t for _, t in keep])):
                    empty = 0
                    yield j, index, np.array([bos] + ids, dtype=np.int32)
            j, d, empty = j + 1, 0, empty + 1
            if empty > 2 * len(self.corpus.units) + self.lanes:
                raise UserError(f"the {self.corpus.what} holds no text; check the files and --text-column.")

    def _pull(self):
        doc = next(self._docs)
        self.buf.append(doc)
        self.buffered += len(doc[2])

    def row(self):
        """The next seq_len + 1 tokens; the lane then advances by seq_len (rows overlap by one)."""
        need = self.T + 1
        while self.buffered - self.off < need:
            self._pull()
        parts, n, off = [], 0, self.off
        for _, _, toks in self.buf:
            parts.append(toks[off:off + need - n])
            n, off = n + len(parts[-1]), 0
            if n == need:
                break
        self.off += self.T
        while self.off >= len(self.buf[0][2]):  # a token stays buffered: the row's last is the next's first
            self.off -= len(self.buf[0][2])
            self.buffered -= len(self.buf.popleft()[2])
        return np.concatenate(parts)

    def position(self):
        j, d, _ = self.buf[0]
        return [int(j), int(d), int(self.off)]


# -----------------------------------------------------------------------------
# the training loader and the validation rows

class PretrainLoader:
    """get(step, micro) -> (x, y) of this rank on its device, read from lane micro x world + rank.
    Batches must be taken in order (the training loop does); position() is the resume state."""

    def __init__(self, corpus, tokenizer, seq_len, device_batch, grad_accum, info, seed=0, position=None):
        self.B, self.info, self.lanes = device_batch, info, grad_accum * info.world_size
        if position is not None and (not isinstance(position, dict) or position.get("lanes") != self.lanes):
            had = position.get("lanes") if isinstance(position, dict) else "a different loader"
            raise UserError(f"the checkpoint read {had} data lanes but this run reads {self.lanes} "
                            f"(processes x accumulation); resume with the original --device-batch-size.")
        states = [None] * self.lanes if position is None else position["states"]
        self.mine = {m: Lane(corpus, tokenizer, seq_len, m * info.world_size + info.rank, self.lanes, seed,
                             position=states[m * info.world_size + info.rank]) for m in range(grad_accum)}
        self.next = (None, 0)
        self.before = {}  # micro -> (step, the lane's position before that step's rows were read)

    def get(self, step, micro):
        if self.next[0] is not None and (step, micro) != self.next:
            raise RuntimeError(f"the streaming loader was asked for {(step, micro)} after {self.next}; "
                               f"batches must be read in order")
        self.next = (step, micro + 1) if micro + 1 < len(self.mine) else (step + 1, 0)
        self.before[micro] = (step, self.mine[micro].position())
        rows = torch.from_numpy(np.stack([self.mine[micro].row() for _ in range(self.B)])).long()
        if self.info.device.type == "cuda":
            rows = rows.pin_memory()
        rows = rows.to(self.info.device, non_blocking=True)
        return rows[:, :-1].contiguous(), rows[:, 1:].contiguous()

    def position(self, step=None):
        """{"lanes": L, "states": [[j, d, o] of lane 0, 1, ...]}; a collective. step: as of the start
        of that step, though the training loop has read one micro-batch ahead; default: now."""
        def at(m, lane):
            read, before = self.before.get(m, (None, None))
            return before if step is not None and read is not None and read >= step else lane.position()
        states = sorted(gather_lists([[m * self.info.world_size + self.info.rank, at(m, lane)]
                                      for m, lane in self.mine.items()]))
        return {"lanes": self.lanes, "states": [s for _, s in states]}


def validation_rows(corpus, tokenizer, seq_len, max_rows):
    """The first max_rows rows of seq_len + 1 tokens of a corpus read in order, once (fewer if it
    is shorter): the same rows at any world size."""
    lane = Lane(corpus, tokenizer, seq_len, shuffle=False)
    rows = []
    while len(rows) < max_rows and lane.epoch() == 0:
        rows.append(lane.row())
    if lane.epoch() > 0 and rows:
        rows.pop()  # that row wrapped around into the corpus again
    if not rows:
        raise UserError(f"the {corpus.what} has fewer than {seq_len + 1} tokens, not one sequence; "
                        f"add data or lower --sequence-len.")
    return torch.from_numpy(np.stack(rows)).long()


def eval_batches(rows, device_batch, info):
    """This rank's share of validation rows (rows rank, rank + world, ...), device_batch at a time."""
    mine = rows[info.rank::info.world_size]
    for i in range(0, len(mine), device_batch):
        w = mine[i:i + device_batch].to(info.device)
        yield w[:, :-1].contiguous(), w[:, 1:].contiguous()


def estimate_tokens(corpus, tokenizer, sample_bytes=1 << 20):
    """(tokens in the corpus, exact?): counted up to about sample_bytes of text, else extrapolated
    to the footers' text bytes from the tokens per byte of the first documents."""
    tokens = nbytes = 0
    for unit in corpus.units:
        for _, texts in corpus.texts(unit):
            texts = [t for t in texts if t]
            nbytes += sum(len(t.encode()) for t in texts)
            tokens += sum(len(ids) + 1 for ids in tokenizer.encode_batch(texts))
            if nbytes >= sample_bytes:
                return int(corpus.text_bytes * tokens / nbytes), False
    return tokens, True

