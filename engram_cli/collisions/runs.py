"""Sorted runs in memory or in the spill folder, merged one key range at a time.

Runs merge by key range: word 0 of a stored key is spread evenly over its 64 bits, so the same
range cuts every run into a piece of about proportional size; a piece of every run is read,
merged in memory, and handed on, one range after the other, so memory is one range's pieces (a
few of them in flight on worker threads), whatever the corpus size. At most `fan_in` runs are
merged at once: beyond that, groups of runs are first merged into longer runs (a merge round).
A sample of word 0 every SAMPLE_ROWS rows, kept in memory, locates a range in a run on disk with
one small read. A file holds a run's key words row after row, then its counts (int64).
"""

from __future__ import annotations

import functools
import math
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import EngramError
from ..progress import Progress
from .keys import KeyCounts, KeyLayout
from .options import FAN_IN
from .sorting import merge_runs
from .spill import SpillFolder

# Rows between two samples of word 0 of a run on disk (one read of this many rows locates a key).
SAMPLE_ROWS = 4096


def _read_into(path: Path, offset: int, out: np.ndarray) -> None:
    """Fill the contiguous array `out` with the bytes of `path` from `offset`."""
    view = out.data.cast("B")
    try:
        with open(path, "rb", buffering=0) as handle:
            handle.seek(offset)
            got = 0
            while got < len(view):
                n = handle.readinto(view[got:])
                if not n:
                    raise EngramError(f"spill file {path} is shorter than expected; was it changed?")
                got += n
    except OSError as exc:
        raise EngramError(f"cannot read spill file {path}: {exc.strerror or exc}") from None


@dataclass
class Run:
    """A sorted run of distinct keys with their counts, in memory or in two files of a spill
    folder (`stem.keys`: rows of key words; `stem.counts`: int64)."""

    rows: int
    words: int
    occurrences: int
    stem: Path | None = None
    keys: np.ndarray | None = None
    counts: np.ndarray | None = None
    sample: np.ndarray = field(default_factory=lambda: np.zeros(0, np.uint64))
    keep: bool = False  # read by others too (a cluster's map outputs): merges leave it in place

    @staticmethod
    def in_memory(part: KeyCounts) -> Run:
        """A run of key counts held in memory."""
        return Run(part.rows, part.keys.shape[1], int(part.counts.sum()), keys=part.keys, counts=part.counts)

    @property
    def nbytes(self) -> int:
        """Bytes of the keys and counts."""
        return self.rows * (self.words + 1) * 8

    @property
    def on_disk(self) -> bool:
        """Whether the run is in the spill folder (else in memory)."""
        return self.stem is not None

    def locate(self, bounds: np.ndarray) -> np.ndarray:
        """The first row whose word 0 is at least each of the sorted uint64 `bounds`."""
        if self.keys is not None:
            return np.searchsorted(self.keys[:, 0], bounds, side="left").astype(np.int64)
        block = np.searchsorted(self.sample, bounds, side="left")
        found = np.empty(bounds.size, np.int64)
        for i, (bound, b) in enumerate(zip(bounds, block.tolist())):
            if b == 0:
                found[i] = 0
                continue
            lo = (b - 1) * SAMPLE_ROWS
            hi = min(b * SAMPLE_ROWS, self.rows)
            first = self.read(lo, hi).keys[:, 0]
            found[i] = lo + int(np.searchsorted(first, bound, side="left"))
        return found

    def read(self, lo: int, hi: int, keys: np.ndarray | None = None, counts: np.ndarray | None = None) -> KeyCounts:
        """Rows [lo, hi) of the run.

        Args:
            lo, hi: the rows.
            keys, counts: contiguous arrays of hi - lo rows to read into (allocated when None).
        """
        n = hi - lo
        if self.keys is not None:
            assert self.counts is not None
            if keys is None or counts is None:
                return KeyCounts(self.keys[lo:hi], self.counts[lo:hi])
            keys[:] = self.keys[lo:hi]
            counts[:] = self.counts[lo:hi]
            return KeyCounts(keys, counts)
        assert self.stem is not None
        keys = np.empty((n, self.words), np.uint64) if keys is None else keys
        counts = np.empty(n, np.int64) if counts is None else counts
        if n:
            _read_into(self.stem.with_suffix(".keys"), lo * self.words * 8, keys)
            _read_into(self.stem.with_suffix(".counts"), lo * 8, counts)
        return KeyCounts(keys, counts)

    def chunks(self, rows: int) -> Iterator[KeyCounts]:
        """The run `rows` at a time."""
        for lo in range(0, self.rows, max(1, rows)):
            yield self.read(lo, min(lo + rows, self.rows))

    def remove(self) -> None:
        """Delete the run's files (unless others read them: `keep`)."""
        if self.stem is not None and not self.keep:
            for suffix in (".keys", ".counts"):
                self.stem.with_suffix(suffix).unlink(missing_ok=True)


class RunWriter:
    """Writes a sorted run to the spill folder piece by piece (pieces in key order)."""

    def __init__(self, folder: SpillFolder, words: int, stem: str = "run") -> None:
        self.folder = folder
        self.run = Run(0, words, 0, stem=folder.new_path(stem))
        self._samples: list[np.ndarray] = []

    def add(self, part: KeyCounts) -> None:
        """Append a piece of the run (pieces in key order)."""
        if not part.rows:
            return
        run = self.run
        assert run.stem is not None
        first = (-run.rows) % SAMPLE_ROWS
        self._samples.append(part.keys[first::SAMPLE_ROWS, 0].copy())
        self.folder.append(run.stem.with_suffix(".keys"), np.ascontiguousarray(part.keys))
        self.folder.append(run.stem.with_suffix(".counts"), np.ascontiguousarray(part.counts))
        run.rows += part.rows
        run.occurrences += int(part.counts.sum())

    def close(self) -> Run:
        """The run written."""
        self.run.sample = np.concatenate(self._samples) if self._samples else np.zeros(0, np.uint64)
        return self.run


def write_run(folder: SpillFolder, part: KeyCounts, stem: str = "run") -> Run:
    """A sorted run of key counts written to the spill folder whole.

    Args:
        folder: the spill folder.
        part: the run.
        stem: the start of its file names.
    """
    writer = RunWriter(folder, part.keys.shape[1], stem)
    writer.add(part)
    return writer.close()


# A range of word 0 of the stored keys: [low, high), high at most 2**64.
KeyRange = tuple[int, int]


WHOLE: KeyRange = (0, 1 << 64)


def range_bounds(pieces: int, key_range: KeyRange = WHOLE) -> np.ndarray:
    """The pieces - 1 inner bounds that cut a range of word 0 into `pieces` equal ranges."""
    low, high = key_range
    return np.array([low + (i * (high - low)) // pieces for i in range(1, pieces)], np.uint64)


def cut_rows(run: Run, bounds: np.ndarray, key_range: KeyRange) -> np.ndarray:
    """The rows of `run` at the ends of `key_range` and at each inner bound.

    Args:
        run: a sorted run.
        bounds: sorted values of word 0 inside the range.
        key_range: the range.
    """
    low, high = key_range
    first = 0 if low == 0 else int(run.locate(np.array([low], np.uint64))[0])
    last = run.rows if high >= 1 << 64 else int(run.locate(np.array([high], np.uint64))[0])
    inner = run.locate(bounds) if bounds.size else np.zeros(0, np.int64)
    return np.concatenate([[first], np.clip(inner, first, last), [last]]).astype(np.int64)


def ordered(pool: ThreadPoolExecutor, jobs: Iterable[Callable[[], Any]], ahead: int) -> Iterator[Any]:
    """Results of `jobs` run on `pool`, in order, at most `ahead` running or done but not taken
    (so memory holds that many results, however many jobs there are).

    Args:
        pool: the worker threads.
        jobs: functions of no arguments.
        ahead: results in flight.
    """
    pending: deque[Future[Any]] = deque()
    try:
        for job in jobs:
            pending.append(pool.submit(job))
            if len(pending) >= ahead:
                yield pending.popleft().result()
        while pending:
            yield pending.popleft().result()
    finally:
        for future in pending:
            future.cancel()


def merge_pieces(
    runs: list[Run],
    piece_rows: int,
    pool: ThreadPoolExecutor,
    ahead: int,
    key_range: KeyRange = WHOLE,
    on_plan: Callable[[int], None] | None = None,
) -> Iterator[KeyCounts]:
    """The merged key counts of `runs` in `key_range`, one smaller range at a time, in key order.

    Args:
        runs: sorted runs of one order.
        piece_rows: rows of all runs together in one smaller range (its pieces and their merge
            take twice their bytes in memory).
        pool: the worker threads that read and merge.
        ahead: ranges in memory at most.
        key_range: the range of word 0 to merge.
        on_plan: told how many smaller ranges there are; empty ones yield empty counts.
    """
    if not runs:
        if on_plan:
            on_plan(0)
        return
    ends = [cut_rows(run, np.zeros(0, np.uint64), key_range) for run in runs]
    total = sum(int(e[-1] - e[0]) for e in ends)
    pieces = max(1, math.ceil(total / max(1, piece_rows)))
    if on_plan:
        on_plan(pieces)
    bounds = range_bounds(pieces, key_range)
    cuts = [cut_rows(run, bounds, key_range) for run in runs]
    words = runs[0].words

    def merge(p: int) -> KeyCounts:
        """Read and merge the pieces of range `p`."""
        spans = [(run, int(c[p]), int(c[p + 1])) for run, c in zip(runs, cuts) if c[p + 1] > c[p]]
        rows = sum(hi - lo for _, lo, hi in spans)
        keys = np.empty((rows, words), np.uint64)
        counts = np.empty(rows, np.int64)
        offsets = [0]
        for run, lo, hi in spans:
            at = offsets[-1]
            run.read(lo, hi, keys[at : at + hi - lo], counts[at : at + hi - lo])
            offsets.append(at + hi - lo)
        return merge_runs(keys, counts, np.array(offsets, np.int64))

    yield from ordered(pool, (functools.partial(merge, p) for p in range(pieces)), ahead)


def rounds_needed(runs: int, fan_in: int = FAN_IN) -> int:
    """Merge rounds that bring `runs` runs down to at most `fan_in`."""
    rounds = 0
    while runs > max(2, fan_in):
        runs = -(-runs // max(2, fan_in))
        rounds += 1
    return rounds


def merge_rounds(
    runs: list[Run],
    folder: SpillFolder,
    piece_rows: int,
    pool: ThreadPoolExecutor,
    ahead: int,
    fan_in: int = FAN_IN,
    on_round: Callable[[int, int], None] | None = None,
    key_range: KeyRange = WHOLE,
) -> list[Run]:
    """Merge groups of `fan_in` runs (their keys in `key_range`) into longer runs until at most
    `fan_in` are left; inputs not marked `keep` are removed once merged.

    Args:
        runs: sorted runs of one order.
        folder: where the longer runs go.
        piece_rows, pool, ahead: as for `merge_pieces`.
        fan_in: the most runs merged at once (at least 2).
        on_round: told (runs before, runs after) after each round.
        key_range: the range of word 0 to merge.
    """
    fan_in = max(2, fan_in)
    while len(runs) > fan_in:
        merged = []
        for g in range(0, len(runs), fan_in):
            group = runs[g : g + fan_in]
            if len(group) == 1:
                merged.append(group[0])
                continue
            writer = RunWriter(folder, group[0].words, "round")
            for part in merge_pieces(group, piece_rows, pool, ahead, key_range):
                writer.add(part)
            merged.append(writer.close())
            for run in group:
                run.remove()
        if on_round:
            on_round(len(runs), len(merged))
        runs = merged
    return runs


class OrderKeys:
    """The distinct n-grams of one order, pass after pass: one sorted run in memory, or runs in
    the spill folder that the first pass merges (writing the merged run the later passes read),
    or runs already merged by key range (a cluster's reduce tasks)."""

    def __init__(self, layout: KeyLayout, runs: list[Run], merged: bool) -> None:
        self.layout = layout
        self.runs = runs
        self.merged = merged
        self.distinct = sum(r.rows for r in runs) if merged else None
        self.occurrences = sum(r.occurrences for r in runs)

    @property
    def rows_bound(self) -> int:
        """At least the distinct n-grams: the rows of all runs."""
        return sum(r.rows for r in self.runs)

    def first_pass(
        self, folder: SpillFolder, rows: int, pool: ThreadPoolExecutor, ahead: int, fan_in: int, progress: Progress
    ) -> Iterator[KeyCounts]:
        """Merge the runs (in rounds first when there are more than `fan_in`), a key range at a
        time, writing the merged run the later passes read.

        Args:
            folder: the spill folder.
            rows: rows of all runs together in one key range.
            pool: the worker threads.
            ahead: key ranges merged ahead of the one handed out.
            fan_in: the most runs merged at once.
            progress: gets the merge rounds and the key ranges merged.
        """
        order = self.layout.order
        rounds = rounds_needed(len(self.runs), fan_in)
        if rounds:
            task = progress.task(f"order {order}: merge rounds", rounds)
            notes = lambda before, after: task.advance(note=f"{before:,} runs -> {after:,}")
            runs = merge_rounds(self.runs, folder, rows, pool, ahead, fan_in, notes)
        else:
            runs = self.runs
        merging: list[Any] = []
        plan = lambda ranges: merging.append(
            progress.task(f"order {order}: merging {len(runs):,} runs, bucket loads (key ranges)", ranges)
        )
        writer = RunWriter(folder, self.layout.words, f"order{order}-distinct")
        for part in merge_pieces(runs, rows, pool, ahead, on_plan=plan):
            writer.add(part)
            yield part
            merging[0].advance()
        for run in runs:
            run.remove()
        self.runs, self.merged = [writer.close()], True
        self.distinct = self.runs[0].rows

    def chunks(self, rows: int, pool: ThreadPoolExecutor, ahead: int) -> Iterator[KeyCounts]:
        """Every distinct n-gram once, in key order.

        Args:
            rows: rows handed out at a time.
            pool: the worker threads that read ahead.
            ahead: chunks read ahead.
        """
        jobs = (
            (lambda run=run, lo=lo: run.read(lo, min(lo + rows, run.rows)))
            for run in self.runs
            for lo in range(0, run.rows, max(1, rows))
        )
        if all(not run.on_disk for run in self.runs):
            yield from (job() for job in jobs)
            return
        yield from ordered(pool, jobs, ahead)

    def remove(self) -> None:
        """Delete the order's runs from the spill folder."""
        for run in self.runs:
            run.remove()
