"""Counting the windows of a corpus within a memory budget: raw-key buffers sorted into runs.

Counting appends the stored key of every window to one buffer per order (8 bytes a window and
word). When the buffers are full, each is sorted in place and reduced to its distinct keys and
counts (a sorted run, as much memory again at most), and the runs are written to the spill folder;
the buffers then start over. A corpus whose keys fit the buffers is never written to disk. Batches
are packed on worker threads while the next is read.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable, Iterable
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

import numpy as np

from ..corpus.base import DocBatch
from .growth import GrowthRecorder
from .keys import KeyCounts, PackedBatch, WindowKeys, pack_windows
from .runs import Run, write_run
from .sorting import sort_and_count
from .spill import SpillFolder

# Buffer bytes per window and key word while counting: the raw key, then its sorted run or copy.
BUFFER_BYTES_PER_WORD = 16


class KeyCountStore:
    """Counts the windows of every order: a raw-key buffer per order, sorted into runs when full.

    `capacity` windows fit the buffers of all orders within `memory_budget` bytes (a buffer and
    its sorted run take BUFFER_BYTES_PER_WORD bytes a window and key word). `finish` leaves each
    order as one run in memory when nothing was spilled, else as runs in the spill folder.
    A `growth` recorder sees every batch's keys in corpus order.
    """

    def __init__(
        self,
        window: WindowKeys,
        memory_budget: int,
        folder: SpillFolder,
        pool: ThreadPoolExecutor,
        growth: GrowthRecorder | None = None,
    ) -> None:
        self.window = window
        self.growth = growth
        self.folder = folder
        self.pool = pool
        self.capacity = self.capacity_for(window, memory_budget)
        self.words = {n: window.layout(n).words for n in window.orders}
        self._buffers: dict[int, np.ndarray] = {}
        self._scratch: dict[int, np.ndarray] = {}  # counts (or the sort's copy), reused run after run
        self._fill = 0
        self._pending: deque[tuple[DocBatch, list[Future[None]], slice]] = deque()
        self.runs: dict[int, list[Run]] = {n: [] for n in window.orders}
        self.in_memory: dict[int, Run] = {}

    @staticmethod
    def capacity_for(window: WindowKeys, memory_budget: int) -> int:
        """Windows per order held in memory before spilling, within `memory_budget` bytes."""
        per_window = sum(BUFFER_BYTES_PER_WORD * window.layout(n).words for n in window.orders)
        return max(1, memory_budget // per_window)

    @property
    def spilled(self) -> bool:
        """Whether runs went to the spill folder."""
        return any(self.runs.values())

    def _buffer(self, order: int) -> np.ndarray:
        if order not in self._buffers:
            self._buffers[order] = np.empty((self.capacity, self.words[order]), np.uint64)
        return self._buffers[order]

    def add(self, batch: DocBatch, on_done: Callable[[DocBatch], None] | None = None) -> None:
        """Count the windows of one batch (packed on the pool; the previous batch may still be
        packing while the next is read). `on_done(batch)` once its windows are in the buffers."""
        packed = PackedBatch.of(batch, self.window)
        tokens = packed.tokens
        if tokens and self._fill + tokens <= self.capacity:
            lo = self._fill
            self._fill += tokens
            jobs = [
                self.pool.submit(pack_windows, packed, self.window, n, self._buffer(n)[lo : lo + tokens])
                for n in self.window.orders
            ]
            self._pending.append((batch, jobs, slice(lo, lo + tokens)))
            self._drain(keep=1, on_done=on_done)
            return
        self._drain(keep=0, on_done=on_done)
        if tokens:
            scratch = {n: np.empty((tokens, self.words[n]), np.uint64) for n in self.window.orders}
            for job in [self.pool.submit(pack_windows, packed, self.window, n, scratch[n]) for n in scratch]:
                job.result()
            if self.growth is not None:
                self.growth.observe(scratch)
            done = 0
            while done < tokens:
                take = min(self.capacity - self._fill, tokens - done)
                for n, keys in scratch.items():
                    self._buffer(n)[self._fill : self._fill + take] = keys[done : done + take]
                self._fill += take
                done += take
                if self._fill == self.capacity:
                    self._spill()
        if on_done:
            on_done(batch)

    def _drain(self, keep: int, on_done: Callable[[DocBatch], None] | None) -> None:
        while len(self._pending) > keep:
            batch, jobs, rows = self._pending.popleft()
            for job in jobs:
                job.result()
            if self.growth is not None:
                self.growth.observe({n: self._buffers[n][rows] for n in self.window.orders})
            if on_done:
                on_done(batch)

    def _sorted_runs(self) -> dict[int, KeyCounts]:
        """Sort every buffer into its run (orders in parallel)."""
        fill = self._fill
        for n in self.window.orders:
            if n not in self._scratch:
                self._scratch[n] = np.empty(self.capacity * self.words[n], np.uint64)
        jobs = {
            n: self.pool.submit(sort_and_count, self._buffer(n), fill, self._scratch[n]) for n in self.window.orders
        }
        return {n: job.result() for n, job in jobs.items()}

    def _spill(self) -> None:
        for order, part in self._sorted_runs().items():
            self.runs[order].append(write_run(self.folder, part, f"order{order}"))
        self._fill = 0

    def finish(self, on_done: Callable[[DocBatch], None] | None = None) -> None:
        """Count what the buffers hold: one run in memory per order when nothing was spilled,
        else the last runs spilled too (the buffers are released)."""
        self._drain(keep=0, on_done=on_done)
        if self.growth is not None:
            self.growth.finish()
        if not self.spilled:
            self.in_memory = {n: Run.in_memory(part) for n, part in self._sorted_runs().items()}
        elif self._fill:
            self._spill()
        if self.spilled:
            self._buffers.clear()
            self._scratch.clear()

    @property
    def resident_bytes(self) -> int:
        """Memory the in-memory runs still hold: the part of the buffer that was filled, and
        the counts (one-word keys) or the sort's copy (longer keys)."""
        total = 0
        for n, run in self.in_memory.items():
            words = self.words[n]
            total += self._fill * words * 8 + (run.rows * 8 if words == 1 else self._fill * words * 8)
        return total

    def release(self, order: int) -> None:
        """Drop the in-memory run of an order once its statistics are done."""
        self.in_memory.pop(order, None)
        self._buffers.pop(order, None)
        self._scratch.pop(order, None)

    def spill_in_memory(self) -> None:
        """Write the in-memory runs to the spill folder and release their memory."""
        for order, run in self.in_memory.items():
            assert run.keys is not None and run.counts is not None
            self.runs[order].append(write_run(self.folder, KeyCounts(run.keys, run.counts), f"order{order}"))
        self.in_memory = {}
        self._buffers.clear()
        self._scratch.clear()
        self._fill = 0


def map_order(batch: DocBatch, window: WindowKeys, order: int) -> KeyCounts:
    """Distinct windows of one order in a batch of documents, with their counts (a sorted run).

    Args:
        batch: documents of raw token ids (and the left context of one continued from before).
        window: the spec's `WindowKeys`.
        order: the n-gram order.
    """
    packed = PackedBatch.of(batch, window)
    keys = np.empty((packed.tokens, window.layout(order).words), np.uint64)
    pack_windows(packed, window, order, keys)
    return sort_and_count(keys, packed.tokens)


def count_batches(
    batches: Iterable[DocBatch],
    store: KeyCountStore,
    task: Any,
    total_bytes: Callable[[], int] | None,
    on_batch: Callable[[DocBatch | None], None] | None,
) -> None:
    """Count every batch into `store`, reporting bytes (or tokens) read and the token rate.

    Args:
        batches: the corpus's batches.
        store: where they are counted.
        task: the progress task.
        total_bytes: the bytes read so far (None when the size is not known: tokens then).
        on_batch: called after each batch.
    """
    started = time.perf_counter()
    tokens = 0

    def done(batch: DocBatch) -> None:
        """Progress of one batch counted."""
        nonlocal tokens
        tokens += batch.tokens
        rate = tokens / max(1e-9, time.perf_counter() - started)
        note = f"{tokens / 1e6:,.1f} M tokens, {rate / 1e6:.1f} M tokens/s"
        if total_bytes is not None:
            task.update(total_bytes(), note=note)
        else:
            task.advance(batch.tokens, note=note)
        if on_batch:
            on_batch(batch)

    for batch in batches:
        store.add(batch, done)
    store.finish(done)
