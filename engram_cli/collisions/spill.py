"""Key counts within a memory budget: merged in memory, spilled to disk by partition when too many.

Stored keys (`keys`) come out of an invertible multiply, so their top bits spread them evenly over
partitions (2**8 by default), and equal keys always share one. Chunks of counts are merged in memory first;
only when merged counts still take more than half the budget do they spill, each partition of
each order appended to its own file of rows (the key words, then the count). At the end every
partition merges on its own, with bounded memory and the same exact result. The default budget is
a quarter of the memory available, between 256 MiB and 8 GiB.
"""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np

from ..corpus.base import DocBatch
from ..errors import EngramError
from ..helpers import available_memory
from .keys import PARTITION_BITS, KeyCounts, WindowKeys, map_order, merge_partition, split_partitions


def spill_folder(prefix: str, root: str | Path | None) -> Path:
    """A new folder for spilled counts under `root` (the system's temporary folder when None)."""
    try:
        return Path(tempfile.mkdtemp(prefix=prefix, dir=root))
    except OSError as exc:
        raise EngramError(
            f"cannot create a spill folder in {root or tempfile.gettempdir()}: {exc.strerror or exc}"
        ) from None


def append_file(path: Path, data: np.ndarray) -> None:
    """Append an array's bytes to a spill file; a full disk becomes a one-line error naming the folder."""
    try:
        with open(path, "ab") as handle:
            data.tofile(handle)
    except OSError as exc:
        raise EngramError(
            f"cannot spill n-gram counts to {path.parent}: {exc.strerror or exc}; "
            "free some space or point --spill-dir elsewhere"
        ) from None


def partition_file(order: int, index: int) -> str:
    """The file name of one partition of one order: `order<n>-part<iiii>.u64`."""
    return f"order{order}-part{index:04d}.u64"


def as_rows(part: KeyCounts) -> np.ndarray:
    """Key counts as the rows of a spill file: the key words, then the count."""
    return np.concatenate([part.keys, part.counts.view(np.uint64).reshape(-1, 1)], axis=1)


def read_counts(path: Path, words: int) -> KeyCounts:
    """The key counts of a spill file whose rows are `words` key words and a count."""
    rows = np.fromfile(path, dtype=np.uint64).reshape(-1, words + 1)
    return KeyCounts(np.ascontiguousarray(rows[:, :-1]), rows[:, -1].view(np.int64).copy())


class KeyCountStore:
    """Key counts per order: in memory while they fit the budget, then spilled by partition.

    Chunks are merged in memory first; only when merged counts still take more than half
    the budget do they spill, each partition to its own file of rows (key words, count).
    """

    def __init__(
        self,
        window: WindowKeys,
        memory_budget: int,
        spill_dir: str | Path | None = None,
        partition_bits: int = PARTITION_BITS,
    ) -> None:
        self.window = window
        self.budget = memory_budget
        self.partition_bits = partition_bits
        self._spill_root = spill_dir
        self._dir: Path | None = None
        self._chunks: dict[int, list[KeyCounts]] = {n: [] for n in window.orders}
        self._merged: dict[int, KeyCounts] = {}
        self._buffered = 0
        self.spilled_bytes = 0
        self.cleanup: Path | None = None  # a folder to remove with the counts (cluster runs)
        self.distinct: dict[int, int] = {}
        self.occurrences: dict[int, int] = {}

    @property
    def spilled(self) -> bool:
        """Whether the counts went to disk (then `parts` streams them partition by partition)."""
        return self._dir is not None

    def add(self, order: int, part: KeyCounts) -> None:
        """Take the counts of one batch of one order, compacting or spilling when over the budget."""
        self._chunks[order].append(part)
        self._buffered += part.nbytes
        if self._buffered > self.budget:
            self._compact()
            if self._buffered > self.budget // 2:
                self._spill()

    def _compact(self) -> None:
        for order, chunks in self._chunks.items():
            if len(chunks) > 1:
                self._chunks[order] = [merge_partition(chunks)]
        self._buffered = sum(c.nbytes for chunks in self._chunks.values() for c in chunks)

    def _file(self, order: int, index: int) -> Path:
        assert self._dir is not None
        return self._dir / partition_file(order, index)

    def _spill(self) -> None:
        if self._dir is None:
            self._dir = spill_folder("engram-counts-", self._spill_root)
        for order, chunks in self._chunks.items():
            for chunk in chunks:
                for index, part in enumerate(split_partitions(chunk, self.partition_bits)):
                    if part.rows:
                        self._append(self._file(order, index), as_rows(part))
            self._chunks[order] = []
        self._buffered = 0

    def _append(self, path: Path, rows: np.ndarray) -> None:
        append_file(path, rows)
        self.spilled_bytes += rows.nbytes

    def _read(self, order: int, index: int) -> KeyCounts:
        return read_counts(self._file(order, index), self.window.layout(order).words)

    def save_partitions(self, directory: Path) -> None:
        """After `finish`: every partition of every order in a file of its own in `directory`
        (the output of one cluster map task, merged per partition by `merge_partition_task`)."""
        directory.mkdir(parents=True, exist_ok=True)
        for order in self._chunks:
            for part in self.parts(order):
                for index, piece in enumerate(split_partitions(part, self.partition_bits)):
                    if piece.rows:
                        append_file(directory / partition_file(order, index), as_rows(piece))

    @classmethod
    def merged_in(
        cls,
        window: WindowKeys,
        budget: int,
        directory: Path,
        partition_bits: int,
        distinct: dict[int, int],
        occurrences: dict[int, int],
    ) -> KeyCountStore:
        """The finished counts that cluster tasks merged into `directory`, one file a partition:
        read into memory when they fit the budget (as a local run keeps them), else streamed.

        Args:
            window: the spec's `WindowKeys`.
            budget: bytes of counts to hold in memory.
            directory: the merged partition files.
            partition_bits: how many top key bits made the partitions.
            distinct, occurrences: per order, what the merge tasks counted.
        """
        store = cls(window, budget, partition_bits=partition_bits)
        store._dir = directory
        store.distinct, store.occurrences = dict(distinct), dict(occurrences)
        if sum(p.stat().st_size for p in directory.iterdir()) <= budget:
            for order in window.orders:
                parts = list(store.parts(order)) or [KeyCounts.empty(window.layout(order).words)]
                store._merged[order] = KeyCounts(
                    np.concatenate([p.keys for p in parts]), np.concatenate([p.counts for p in parts])
                )
            store._dir = None  # partitions are key ranges in order: concatenated, still sorted
        return store

    def finish(self, pool: ThreadPoolExecutor | None = None) -> None:
        """Merge every partition (on `pool` when given); then `parts(order)` yields exact counts."""
        run = pool.map if pool is not None else map
        if not self.spilled:
            orders = list(self._chunks)
            for order, merged in zip(orders, run(self._merge_chunks, orders)):
                self._merged[order] = merged
                self.distinct[order] = merged.rows
                self.occurrences[order] = int(merged.counts.sum())
            return
        self._spill()
        jobs = [
            (order, index)
            for order in self._chunks
            for index in range(1 << self.partition_bits)
            if self._file(order, index).exists()
        ]
        for order in self._chunks:
            self.distinct[order] = self.occurrences[order] = 0
        for (order, _), (rows, total) in zip(jobs, run(self._merge_file, jobs)):
            self.distinct[order] += rows
            self.occurrences[order] += total

    def _merge_chunks(self, order: int) -> KeyCounts:
        chunks, self._chunks[order] = self._chunks[order], []
        return merge_partition(chunks) if chunks else KeyCounts.empty(self.window.layout(order).words)

    def _merge_file(self, job: tuple[int, int]) -> tuple[int, int]:
        """Merge one spilled partition file in place: (distinct keys, occurrences)."""
        path = self._file(*job)
        merged = merge_partition([self._read(*job)])
        tmp = path.with_suffix(".merged")
        append_file(tmp, as_rows(merged))
        tmp.replace(path)
        return merged.rows, int(merged.counts.sum())

    def parts(self, order: int) -> Iterator[KeyCounts]:
        """The exact counts of one order after `finish`: one part in memory, or one per spilled partition."""
        if not self.spilled:
            yield self._merged[order]
            return
        for index in range(1 << self.partition_bits):
            if self._file(order, index).exists():
                yield self._read(order, index)

    def single(self, order: int) -> KeyCounts | None:
        """The one in-memory partition of an order, or None when the counts were spilled."""
        return None if self.spilled else self._merged[order]

    def close(self) -> None:
        """Delete the spill folder (and a cluster run's shared folder)."""
        for folder in (self._dir, self.cleanup):
            if folder is not None:
                shutil.rmtree(folder, ignore_errors=True)

    def __enter__(self) -> KeyCountStore:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


def count_corpus(
    batches: Iterable[DocBatch],
    window: WindowKeys,
    store: KeyCountStore,
    pool: ThreadPoolExecutor,
    on_batch: Callable[[DocBatch], None] | None = None,
) -> None:
    """Map every batch (orders in parallel, one batch in flight while the next is read) into `store`.

    Args:
        batches: documents of raw token ids.
        window: the spec's `WindowKeys`.
        store: receives the counts, and merges them at the end (`finish`).
        pool: threads that map the orders of a batch and merge partitions.
        on_batch: called after each batch is counted, for progress.
    """
    pending: list[tuple[DocBatch, dict[int, Any]]] = []

    def drain(keep: int) -> None:
        while len(pending) > keep:
            batch, futures = pending.pop(0)
            for order, future in futures.items():
                store.add(order, future.result())
            if on_batch:
                on_batch(batch)

    for batch in batches:
        pending.append((batch, {n: pool.submit(map_order, batch, window, n) for n in window.orders}))
        drain(1)
    drain(0)
    store.finish(pool)


def default_memory_budget() -> int:
    """A quarter of the memory available now, between 256 MiB and 8 GiB."""
    return int(min(8 << 30, max(256 << 20, available_memory() // 4)))
