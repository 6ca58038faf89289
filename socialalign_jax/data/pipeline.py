"""Event-grouped, checkpointable, multi-host input pipeline (grain).

L_macro needs several responses of the same event in one global batch, so a batch is not
B random rows but G events x M cases each ("slots" of M rows). Per epoch:

  1. every event's examples are shuffled (seed, epoch) and cut into chunks of M; an
     event's last chunk, when short, is padded with example_mask = 0 rows (nothing is
     dropped, nothing is repeated);
  2. the chunks are shuffled and packed into batches of G chunks from G *distinct* events
     (first-fit in shuffled order);
  3. at the very end of an epoch, when fewer than G events still have chunks, the batch's
     free slots are filled with empty padding slots (event_id -1, example_mask 0).

So every batch has exactly G*M rows, slot g holds rows [g*M, (g+1)*M) of one event, and
every example appears exactly once per epoch. The plan is a pure function of (event ids,
G, M, seed, epoch), so every host computes the same global batch; process i of n reads
only rows [i*B/n, (i+1)*B/n) of it. The iterator state is (epoch, next batch): restoring
it rebuilds the same plan and yields exactly the batches the uninterrupted run would.

Padding rows (example_mask 0) hold a single pad token with attention_mask 1 at position 0
and prompt_len 1, so no row is fully masked (no NaN softmax) and the head reads a defined
position; loss_mask, label (-1) and target_dist (0) make them contribute nothing.
"""

from __future__ import annotations

import collections
import dataclasses
from typing import Any, Iterator, Mapping, Sequence

import grain
import numpy as np

from socialalign_jax.core.buckets import bucket

# Keys and dtypes of a batch: docs/DESIGN.md "Batch".
BATCH_DTYPES = {
    "input_ids": np.int32, "attention_mask": np.int32, "loss_mask": np.int32,
    "user_end": np.int32, "news_end": np.int32, "prompt_len": np.int32,
    "label": np.int32, "event_id": np.int32, "example_mask": np.float32,
    "target_dist": np.float32,
}


@dataclasses.dataclass(frozen=True)
class BatchConfig:
    events_per_batch: int  # G
    cases_per_event: int  # M
    seq_len: int  # S: padded length (the dataset's max_length, or the largest bucket)
    pad_id: int
    num_classes: int = 3
    seed: int = 0
    num_epochs: int | None = None  # None: repeat forever
    buckets: tuple[int, ...] = ()  # if set, S = smallest bucket >= longest row of the global batch
    read_threads: int = 4
    prefetch: int = 2

    @property
    def global_batch_size(self) -> int:
        return self.events_per_batch * self.cases_per_event

    def __post_init__(self):
        if self.events_per_batch < 1 or self.cases_per_event < 1:
            raise ValueError("events_per_batch and cases_per_event must be >= 1")
        if self.buckets and max(self.buckets) > self.seq_len:
            raise ValueError(f"bucket {max(self.buckets)} exceeds seq_len {self.seq_len}")


# ----------------------------------------------------------------------------- planning

def _rng(seed: int, epoch: int, stream: int) -> np.random.Generator:
    return np.random.default_rng([int(seed) & 0xFFFFFFFF, int(epoch), int(stream)])


def epoch_plan(event_ids: np.ndarray, G: int, M: int, seed: int, epoch: int) -> np.ndarray:
    """[num_batches, G*M] example indices of one epoch, -1 for padding rows.

    Depends only on its arguments (not on the number of hosts), so every process agrees.
    """
    event_ids = np.asarray(event_ids, np.int64)
    if event_ids.size == 0:
        return np.zeros((0, G * M), np.int64)
    rng = _rng(seed, epoch, 0)
    chunks: list[tuple[int, np.ndarray]] = []
    for e in np.unique(event_ids):  # sorted, so the order is reproducible
        idx = np.flatnonzero(event_ids == e)
        idx = idx[rng.permutation(idx.size)]
        for s in range(0, idx.size, M):
            c = np.full(M, -1, np.int64)
            part = idx[s:s + M]
            c[:part.size] = part
            chunks.append((int(e), c))
    order = _rng(seed, epoch, 1).permutation(len(chunks))
    pending = collections.deque(chunks[i] for i in order)
    batches = []
    while pending:
        taken, seen, skipped = [], set(), []
        while pending and len(taken) < G:
            e, c = pending.popleft()
            if e in seen:
                skipped.append((e, c))
            else:
                seen.add(e)
                taken.append(c)
        pending.extendleft(reversed(skipped))  # keep their shuffled order for the next batch
        taken += [np.full(M, -1, np.int64)] * (G - len(taken))
        batches.append(np.concatenate(taken))
    return np.stack(batches)


def process_rows(global_batch_size: int, process_index: int, process_count: int) -> slice:
    """Rows [i*B/n, (i+1)*B/n) of the global batch that process i reads."""
    if global_batch_size % process_count:
        raise ValueError(f"global batch size {global_batch_size} is not divisible by "
                         f"process count {process_count}")
    per = global_batch_size // process_count
    return slice(process_index * per, (process_index + 1) * per)


# ----------------------------------------------------------------------------- assembly

def _text(x) -> str:
    return x.decode("utf-8") if isinstance(x, bytes) else str(x)


def pad_rows(examples: Sequence[Mapping[str, Any] | None], seq_len: int, pad_id: int,
             num_classes: int, indices: Sequence[int] | None = None) -> dict[str, np.ndarray]:
    """Stack examples (None = padding row) into a batch dict of fixed shapes [B, S]."""
    B = len(examples)
    out = {k: np.zeros((B, seq_len) if k in ("input_ids", "attention_mask", "loss_mask")
                       else (B, num_classes) if k == "target_dist" else (B,), dt)
           for k, dt in BATCH_DTYPES.items()}
    out["input_ids"][:] = pad_id
    for r, ex in enumerate(examples):
        if ex is None:
            out["attention_mask"][r, 0] = 1
            out["prompt_len"][r] = 1
            out["label"][r] = -1
            out["event_id"][r] = -1
            continue
        ids = np.asarray(ex["input_ids"])
        n = ids.shape[0]
        if n > seq_len:
            where = indices[r] if indices is not None else r
            raise ValueError(f"example {where} (event {_text(ex.get('event', '?'))!r}, "
                             f"user {_text(ex.get('user', '?'))!r}) has {n} tokens > seq_len {seq_len}; "
                             "rebuild the dataset with a smaller max_length or raise seq_len")
        out["input_ids"][r, :n] = ids
        out["attention_mask"][r, :n] = 1
        out["loss_mask"][r, :n] = np.asarray(ex["loss_mask"])
        for k in ("user_end", "news_end", "prompt_len", "label", "event_id"):
            out[k][r] = int(ex[k])
        out["example_mask"][r] = 1.0
        out["target_dist"][r] = np.asarray(ex["target_dist"], np.float32)
    return out


def _bucket(lengths: np.ndarray, cfg: BatchConfig) -> int:
    """The padded length S of a batch: the smallest configured bucket that fits its longest row.

    seq_len is always the last bucket, and a row longer than seq_len is given seq_len too, so
    that pad_rows rejects it with an error naming the example rather than a bare length.
    """
    if not cfg.buckets:
        return cfg.seq_len
    longest = int(lengths.max()) if lengths.size else 1
    return bucket(min(longest, cfg.seq_len), sizes=(*cfg.buckets, cfg.seq_len))


def scan_index(source) -> dict[str, np.ndarray]:
    """event_id and length of every example, read from the source (when no index is stored)."""
    ev = np.zeros(len(source), np.int64)
    ln = np.zeros(len(source), np.int64)
    for i in range(len(source)):
        ex = source[i]
        ev[i] = int(ex["event_id"])
        ln[i] = len(ex["input_ids"])
    return {"event_id": ev, "length": ln}


class _Assemble:
    """Plan row -> this process's batch slice (a picklable callable for grain)."""

    def __init__(self, source, cfg: BatchConfig, lengths: np.ndarray, rows: slice):
        self.source, self.cfg, self.lengths, self.rows = source, cfg, lengths, rows

    def __call__(self, plan_row: np.ndarray) -> dict[str, np.ndarray]:
        real = plan_row[plan_row >= 0]
        seq_len = _bucket(self.lengths[real], self.cfg)  # from the GLOBAL row: same on all hosts
        mine = plan_row[self.rows]
        want = [int(i) for i in mine if i >= 0]
        got = dict(zip(want, _get_many(self.source, want)))
        exs = [got[int(i)] if i >= 0 else None for i in mine]
        return pad_rows(exs, seq_len, self.cfg.pad_id, self.cfg.num_classes, indices=[int(i) for i in mine])


def _get_many(source, idx: list[int]) -> list:
    if hasattr(source, "__getitems__") and idx:
        return list(source.__getitems__(idx))
    return [source[i] for i in idx]


class TrainIterator:
    """Infinite (or num_epochs) iterator of event-grouped batches with JSON-able state."""

    def __init__(self, source, cfg: BatchConfig, *, index: Mapping[str, Sequence[int]] | None = None,
                 process_index: int | None = None, process_count: int | None = None):
        if process_index is None or process_count is None:
            import jax
            process_index, process_count = jax.process_index(), jax.process_count()
        self.source, self.cfg = source, cfg
        index = scan_index(source) if index is None else index
        self.event_ids = np.asarray(index["event_id"], np.int64)
        self.lengths = np.asarray(index["length"], np.int64)
        if self.event_ids.shape[0] != len(source):
            raise ValueError(f"index has {self.event_ids.shape[0]} rows but the source has {len(source)}")
        if self.lengths.size and self.lengths.max() > cfg.seq_len:
            i = int(self.lengths.argmax())
            raise ValueError(f"example {i} has {self.lengths[i]} tokens > seq_len {cfg.seq_len}")
        self.rows = process_rows(cfg.global_batch_size, process_index, process_count)
        self.process_index, self.process_count = process_index, process_count
        self._epoch, self._batch = 0, 0
        self._it: Iterator | None = None
        self._plan_len: int | None = None

    # -- state ----------------------------------------------------------------------
    def _fingerprint(self) -> dict:
        return {"events_per_batch": self.cfg.events_per_batch, "cases_per_event": self.cfg.cases_per_event,
                "seed": self.cfg.seed, "num_examples": int(self.event_ids.size)}

    def get_state(self) -> dict:
        return {"epoch": self._epoch, "batch": self._batch, **self._fingerprint()}

    def set_state(self, state: Mapping[str, Any]) -> None:
        mine = self._fingerprint()
        diff = {k: (state.get(k), v) for k, v in mine.items() if state.get(k) != v}
        if diff:
            raise ValueError(f"iterator state does not match this pipeline (saved, current): {diff}")
        self._epoch, self._batch = int(state["epoch"]), int(state["batch"])
        self._it = None

    # -- iteration ------------------------------------------------------------------
    def plan(self, epoch: int) -> np.ndarray:
        return epoch_plan(self.event_ids, self.cfg.events_per_batch, self.cfg.cases_per_event,
                          self.cfg.seed, epoch)

    def _open(self) -> None:
        plan = self.plan(self._epoch)
        self._plan_len = len(plan)
        ds = grain.MapDataset.source(list(plan))[self._batch:]
        ds = ds.map(_Assemble(self.source, self.cfg, self.lengths, self.rows))
        opts = grain.ReadOptions(num_threads=self.cfg.read_threads, prefetch_buffer_size=self.cfg.prefetch)
        self._it = iter(ds.to_iter_dataset(opts))

    def __iter__(self):
        return self

    def __next__(self) -> dict[str, np.ndarray]:
        while True:
            if self.cfg.num_epochs is not None and self._epoch >= self.cfg.num_epochs:
                raise StopIteration
            if self._it is None:
                self._open()
            try:
                batch = next(self._it)
            except StopIteration:
                if self._plan_len == 0:
                    raise ValueError("the split has no examples") from None
                self._epoch, self._batch, self._it = self._epoch + 1, 0, None
                continue
            self._batch += 1
            return batch


def eval_batches(source, batch_size: int, seq_len: int, pad_id: int, num_classes: int = 3, *,
                 process_index: int = 0, process_count: int = 1) -> Iterator[dict[str, np.ndarray]]:
    """Every example of a split, in stored order, in global batches of batch_size.

    Global batch k holds examples [k*B, (k+1)*B); the last one is padded with example_mask
    0 rows. Each process gets its row slice, as in training.
    """
    rows = process_rows(batch_size, process_index, process_count)
    n = len(source)
    for start in range(0, n, batch_size):
        glob = np.arange(start, start + batch_size)
        mine = glob[rows]
        want = [int(i) for i in mine if i < n]
        got = dict(zip(want, _get_many(source, want)))
        yield pad_rows([got.get(int(i)) for i in mine], seq_len, pad_id, num_classes,
                       indices=[int(i) for i in mine])


class Subset:
    """Evenly spaced examples of a split (every event keeps its share): a cheap, fixed evaluation
    set for CPU budgets. Deterministic, so step-0 and final evaluations, and generation with
    --max_examples, see the same examples."""

    def __init__(self, source, max_examples: int):
        n = len(source)
        self.source = source
        self.idx = (np.unique(np.linspace(0, n - 1, max_examples).round().astype(int))
                    if 0 < max_examples < n else np.arange(n))

    def __len__(self):
        return len(self.idx)

    def __getitem__(self, i):
        return self.source[int(self.idx[i])]
