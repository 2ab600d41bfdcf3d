"""How the distinct n-grams of each order grow with the tokens read: a distinct sample per order.

Counting hands every batch's stored keys here in corpus order. Each order keeps the distinct
keys whose word 0 lies below 2**64 / 2**level (word 0 is a multiply-spread of the whole window,
see `keys`, so this keeps each distinct n-gram with probability 2**-level, independently of how
often it occurs), and raises `level` whenever more than `capacity` keys are kept. The count
of distinct n-grams after the first N tokens is then the kept keys times 2**level: exact while
level is 0 (fewer than `capacity` distinct n-grams seen), else an unbiased estimate from at
least capacity / 2 sampled n-grams, a relative standard error of about (2 / capacity)**0.5
(0.3 % at the default 2**18). The level at any point is the largest at which the distinct
n-grams seen so far keep at most `capacity` keys, a function of that set alone, so the curve is
the same whatever the memory budget or batch sizes. Points are taken at checkpoints that grow
by sqrt(2) from FIRST_CHECKPOINT tokens, and at the end; the end point is then replaced by the
exact distinct count that the statistics measure.

Cost: one comparison per window and order, and a sort of the kept keys every `capacity` kept
windows (few once the level has risen), so a small share of the counting's sort.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np

# Distinct keys kept per order before the sampling level rises.
CAPACITY = 1 << 18

# Tokens at the first checkpoint; the next ones grow by sqrt(2).
FIRST_CHECKPOINT = 4096


def checkpoint(k: int) -> int:
    """The token count of the k-th checkpoint (from 0)."""
    return round(FIRST_CHECKPOINT * 2 ** (k / 2))


@dataclass(frozen=True)
class GrowthPoint:
    """Distinct n-grams of one order among the first `tokens` tokens."""

    tokens: int
    distinct: int

    def to_json(self) -> dict[str, int]:
        """One point of `growth` in `engram inspect --json`."""
        return {"tokens": self.tokens, "distinct": self.distinct}


@dataclass
class _OrderSample:
    """The kept distinct keys of one order and the keys waiting to be merged into them."""

    words: int
    capacity: int
    level: int = 0
    kept: np.ndarray = field(init=False)
    pending: list[np.ndarray] = field(default_factory=list)
    pending_rows: int = 0

    def __post_init__(self) -> None:
        self.kept = np.zeros((0, self.words), np.uint64)

    def add(self, keys: np.ndarray) -> None:
        """Take the keys of some windows (rows of stored key words)."""
        if self.level:
            keys = keys[keys[:, 0] < np.uint64(1 << (64 - self.level))]
        else:
            keys = keys.copy()  # the counting buffer is reused after a spill
        if keys.shape[0]:
            self.pending.append(keys)
            self.pending_rows += keys.shape[0]
            if self.pending_rows > self.capacity:
                self.merge()

    def merge(self) -> None:
        """Fold the pending keys into the kept distinct keys, raising the level while too many."""
        if not self.pending:
            return
        both = np.concatenate([self.kept, *self.pending])
        self.pending, self.pending_rows = [], 0
        from .sorting import sort_and_count  # numba: loaded when counting, not on every CLI start

        kept = sort_and_count(both, both.shape[0]).keys
        while kept.shape[0] > self.capacity:
            self.level += 1
            kept = kept[kept[:, 0] < np.uint64(1 << (64 - self.level))]
        self.kept = kept.copy()

    @property
    def estimate(self) -> int:
        """The distinct n-grams seen so far (exact at level 0)."""
        self.merge()
        return self.kept.shape[0] << self.level


class GrowthRecorder:
    """Records, per order, the distinct n-grams among the first N tokens at each checkpoint.

    `observe` takes the keys of every order for the next windows in corpus order; `finish` adds
    the end point; `points` are the curve, `exact(order, distinct)` puts the measured count at
    the end.
    """

    def __init__(self, capacity: int = CAPACITY) -> None:
        self.tokens = 0
        self.capacity = capacity
        self._samples: dict[int, _OrderSample] = {}
        self._next = checkpoint(0)
        self._k = 0
        self.points: dict[int, list[GrowthPoint]] = {}

    def observe(self, keys: dict[int, np.ndarray]) -> None:
        """The keys (rows of stored key words) of every order for the next windows, in corpus order."""
        if not self._samples:
            self._samples = {n: _OrderSample(k.shape[1], self.capacity) for n, k in keys.items()}
            self.points = {n: [] for n in keys}
        rows = next(iter(keys.values())).shape[0]
        done = 0
        while done < rows:
            take = min(rows - done, self._next - self.tokens)
            for n, sample in self._samples.items():
                sample.add(keys[n][done : done + take])
            done += take
            self.tokens += take
            if self.tokens == self._next:
                self._record()
                self._k += 1
                self._next = checkpoint(self._k)

    def _record(self) -> None:
        for n, sample in self._samples.items():
            self.points[n].append(GrowthPoint(self.tokens, sample.estimate))

    def finish(self) -> None:
        """Add the end point (unless the corpus ended on a checkpoint) and free the samples."""
        first = next(iter(self.points.values()), [])
        if self.tokens and (not first or first[-1].tokens != self.tokens):
            self._record()
        for sample in self._samples.values():
            sample.kept = np.zeros((0, sample.words), np.uint64)
            sample.pending = []

    def exact(self, order: int, distinct: int) -> None:
        """Put the exact distinct count of the whole corpus at the end point."""
        points = self.points.get(order)
        if points:
            points[-1] = GrowthPoint(points[-1].tokens, distinct)

    @staticmethod
    def relative_error(capacity: int = CAPACITY) -> float:
        """The relative standard error of a sampled point (at least capacity / 2 keys kept)."""
        return math.sqrt(2 / capacity)
