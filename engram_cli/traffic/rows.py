"""Which rows a corpus reads: every lookup's row in corpus order, and each row's lookups counted.

Every token reads one row per layer, order and head: the window of each order ending at the token
(padded at a document's start and at a barrier, exactly as the hasher pads it; see
`collisions.keys`) is mixed with the layer's multipliers and reduced modulo each head's size, and
the head's offset makes it a row of the layer's table. That is what `NgramHasher.rows` returns.

Counts come from the distinct n-grams that collision statistics already counted: a distinct
window that occurred c times adds c lookups to its row in every head of its order, so the per-row
counts are exact without a second look at the corpus. Counters are dense per head; heads whose
counters fit the memory given are counted together, the rest in further passes over the distinct
n-grams (V4.1's 768 M rows never need to be held at once). Per layer what is kept is small: the
histogram of row counts (how many rows were read c times, for every c), which gives the coverage
curve and the static top-k hits exactly, and, for a hotness file, the most read rows so far.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import numba
import numpy as np

from ..collisions.budget import counter_itemsize
from ..collisions.keys import PackedBatch, WindowKeys, mix_keys, pack_windows
from ..collisions.runs import OrderKeys
from ..corpus.base import DocBatch
from ..kernels import buckets
from ..spec import TableSpec
from ..vocab import VocabProjection

# Keys mixed at once before their rows are counted.
BLOCK = 512

# Tokens whose mixes are computed at once for the LRU (memory: 8 bytes a token, order and layer).
SLICE_TOKENS = 1 << 15


@dataclass(frozen=True)
class HeadRows:
    """One head of a layer: its n-gram order, size and row offset in the layer's table."""

    layer: int
    order: int
    size: int
    offset: int


@dataclass(frozen=True)
class RowMap:
    """Where a spec's windows land: every layer's heads and multipliers."""

    heads: dict[int, list[HeadRows]]
    multipliers: dict[int, np.ndarray]

    @staticmethod
    def of(spec: TableSpec, projection: VocabProjection) -> RowMap:
        """The heads and multipliers of every layer of `spec` (its projection draws the multipliers)."""
        heads: dict[int, list[HeadRows]] = {}
        for layer in spec.layer_ids:
            sizes, offsets = spec.head_sizes(layer), spec.offsets(layer)
            per = spec.n_head_per_ngram
            heads[layer] = [
                HeadRows(layer, 2 + c // per, size, offset) for c, (size, offset) in enumerate(zip(sizes, offsets))
            ]
        multipliers = {layer: spec.multipliers(layer, projection.compressed_size) for layer in spec.layer_ids}
        return RowMap(heads, multipliers)

    def columns(self, layer: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Per head of a layer, in order: the index of its order (from 2), its size, its offset."""
        heads = self.heads[layer]
        return (
            np.array([h.order - 2 for h in heads], np.int64),
            np.array([h.size for h in heads], np.int64),
            np.array([h.offset for h in heads], np.int64),
        )

    def of_order(self, layer: int, order: int) -> list[HeadRows]:
        """The heads of one order of a layer."""
        return [h for h in self.heads[layer] if h.order == order]


@numba.njit(nogil=True, cache=True)
def _add_counts(mix, counts, size, counters):
    block = np.empty(BLOCK, np.int64)
    for lo in range(0, mix.size, BLOCK):
        n = min(BLOCK, mix.size - lo)
        buckets(mix[lo : lo + n], size, block[:n])
        for j in range(n):
            counters[block[j]] += counts[lo + j]


def batch_mixes(
    batch: DocBatch, window: WindowKeys, rows: RowMap, layer: int, tokens: int = SLICE_TOKENS
) -> Iterator[np.ndarray]:
    """The hasher's mix of every window of `batch` in one layer, `tokens` tokens at a time:
    (orders, tokens) int64, orders ascending; `RowMap.columns` turns them into rows."""
    packed = PackedBatch.of(batch, window)
    keys = {}
    for order in window.orders:
        keys[order] = np.empty((packed.tokens, window.layout(order).words), np.uint64)
        pack_windows(packed, window, order, keys[order])
    for lo in range(0, packed.tokens, tokens):
        hi = min(lo + tokens, packed.tokens)
        out = np.empty((len(window.orders), hi - lo), np.int64)
        for o, order in enumerate(window.orders):
            layout = window.layout(order)
            mix_keys(
                keys[order][lo:hi], order, layout.bits, layout.per_word, layout.mask, rows.multipliers[layer], out[o]
            )
        yield out


@dataclass
class LayerRows:
    """What is kept of one layer's row counts: the histogram of counts, and the most read rows
    (all rows read when `keep` is None: 16 bytes a row, what the hotness file holds)."""

    keep: int | None = 0
    lookups: int = 0
    rows_read: int = 0
    histogram: Counter[int] = field(default_factory=Counter)  # lookups c -> rows read c times
    _rows: list[np.ndarray] = field(default_factory=list)
    _lookups: list[np.ndarray] = field(default_factory=list)
    _held: int = 0
    _floor: int = 1  # when `keep` rows are held: the least lookups among them

    def add_head(self, counters: np.ndarray, offset: int) -> None:
        """Fold one head's counters in (row ids: `offset` plus the counter's index)."""
        read = np.flatnonzero(counters)
        self.rows_read += int(read.size)
        values = counters[read]
        self.lookups += int(values.sum())
        if values.size and int(values.max()) <= 4 * values.size:  # a short histogram: counted directly
            tally = np.bincount(values)
            counts = np.flatnonzero(tally)
            rows = tally[counts]
        else:
            counts, rows = np.unique(values, return_counts=True)
        self.histogram.update(dict(zip(counts.tolist(), rows.tolist())))
        if self.keep == 0:
            return
        if self._floor > 1:
            chosen = values >= self._floor
            read, values = read[chosen], values[chosen]
        self._rows.append(read.astype(np.int64) + offset)
        self._lookups.append(values.astype(np.int64))
        self._held += int(read.size)
        if self.keep is not None and self._held > 2 * self.keep:
            self._trim()

    def _trim(self) -> None:
        """Keep the `keep` most read rows held (most looked-up first, ties by row id)."""
        rows, lookups = np.concatenate(self._rows), np.concatenate(self._lookups)
        if self.keep is not None and rows.size > self.keep:  # only rows at least as read as the keep-th
            floor = np.partition(lookups, rows.size - self.keep)[rows.size - self.keep]
            chosen = lookups >= floor
            rows, lookups = rows[chosen], lookups[chosen]
        order = np.lexsort((rows, -lookups))
        if self.keep is not None:
            order = order[: self.keep]
            if order.size == self.keep and self.keep:
                self._floor = int(lookups[order[-1]])
        self._rows, self._lookups = [rows[order]], [lookups[order]]
        self._held = int(order.size)

    def hottest(self) -> tuple[np.ndarray, np.ndarray]:
        """The rows kept, most looked-up first, ties by row id ascending, and their lookups."""
        if not self._rows:
            return np.zeros(0, np.int64), np.zeros(0, np.int64)
        self._trim()
        return self._rows[0], self._lookups[0]


def _plan_groups(heads: list[HeadRows], memory: int, itemsize: int) -> list[list[HeadRows]]:
    """Heads whose counters fit `memory` together, in passes (one head a pass at the least)."""
    groups: list[list[HeadRows]] = [[]]
    used = 0
    for head in heads:
        size = head.size * itemsize
        if groups[-1] and used + size > memory:
            groups.append([])
            used = 0
        groups[-1].append(head)
        used += size
    return groups


def count_order_rows(
    keys: OrderKeys,
    rows: RowMap,
    layers: dict[int, LayerRows],
    memory: int,
    pool: ThreadPoolExecutor,
) -> int:
    """Add the lookups of one order's distinct n-grams to every layer's row counts; returns the
    passes made over them.

    Args:
        keys: the order's distinct n-grams and their counts (merged).
        rows: the spec's heads.
        layers: the counts so far, per layer.
        memory: bytes for counters and the key ranges streamed.
        pool: threads that read key ranges ahead.
    """
    layout = keys.layout
    itemsize = counter_itemsize(keys.occurrences)
    row_bytes = 8 * layout.words + 8 + 8 * len(rows.heads)  # key, count, a mix per layer
    stream_rows = max(1, min(1 << 20, memory // 4 // row_bytes))
    counter_memory = max(1, memory - 3 * stream_rows * row_bytes)
    heads = [h for layer in rows.heads for h in rows.of_order(layer, layout.order)]
    groups = _plan_groups(heads, counter_memory, itemsize)
    dtype = np.int32 if itemsize == 4 else np.int64
    for group in groups:
        counters = {h: np.zeros(h.size, dtype) for h in group}
        group_layers = sorted({h.layer for h in group})
        mixes = {layer: np.empty(stream_rows, np.int64) for layer in group_layers}
        for part in keys.chunks(stream_rows, pool, 2):
            jobs = []
            for layer in group_layers:
                m = mixes[layer][: part.rows]
                mix_keys(part.keys, layout.order, layout.bits, layout.per_word, layout.mask, rows.multipliers[layer], m)
                jobs += [
                    pool.submit(_add_counts, m, part.counts, h.size, counters[h]) for h in group if h.layer == layer
                ]
            for job in jobs:  # heads side by side on the worker threads
                job.result()
        for h in group:
            layers[h.layer].add_head(counters.pop(h), h.offset)
    return len(groups)
