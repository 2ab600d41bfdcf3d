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


@dataclass(frozen=True)
class HeadRows:
    """One head of a layer: its n-gram order, size and row offset in the layer's table."""

    layer: int
    order: int
    column: int  # the head's index among the layer's heads (order-major, as `NgramHasher.rows`)
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
                HeadRows(layer, 2 + c // per, c, size, offset)
                for c, (size, offset) in enumerate(zip(sizes, offsets))
            ]
        multipliers = {layer: spec.multipliers(layer, projection.compressed_size) for layer in spec.layer_ids}
        return RowMap(heads, multipliers)

    def of_order(self, layer: int, order: int) -> list[HeadRows]:
        """The heads of one order of a layer."""
        return [h for h in self.heads[layer] if h.order == order]


@numba.njit(nogil=True, cache=True)
def _fill_rows(mix, sizes, offsets, columns, out):
    block = np.empty(BLOCK, np.int64)
    for lo in range(0, mix.size, BLOCK):
        n = min(BLOCK, mix.size - lo)
        for h in range(sizes.size):
            buckets(mix[lo : lo + n], sizes[h], block[:n])
            for j in range(n):
                out[lo + j, columns[h]] = offsets[h] + block[j]


@numba.njit(nogil=True, cache=True)
def _add_counts(mix, counts, size, counters):
    block = np.empty(BLOCK, np.int64)
    for lo in range(0, mix.size, BLOCK):
        n = min(BLOCK, mix.size - lo)
        buckets(mix[lo : lo + n], size, block[:n])
        for j in range(n):
            counters[block[j]] += counts[lo + j]


def batch_rows(batch: DocBatch, window: WindowKeys, rows: RowMap) -> dict[int, np.ndarray]:
    """The row every token of `batch` reads in every layer: {layer: (tokens, heads) int64}, heads
    order-major (as `NgramHasher.rows`), so a layer's array read row-major is its lookups in order."""
    packed = PackedBatch.of(batch, window)
    out = {layer: np.empty((packed.tokens, len(heads)), np.int64) for layer, heads in rows.heads.items()}
    for order in window.orders:
        layout = window.layout(order)
        keys = np.empty((packed.tokens, layout.words), np.uint64)
        pack_windows(packed, window, order, keys)
        mix = np.empty(packed.tokens, np.int64)
        for layer in rows.heads:
            mix_keys(keys, order, layout.bits, layout.per_word, layout.mask, rows.multipliers[layer], mix)
            heads = rows.of_order(layer, order)
            _fill_rows(
                mix,
                np.array([h.size for h in heads], np.int64),
                np.array([h.offset for h in heads], np.int64),
                np.array([h.column for h in heads], np.int64),
                out[layer],
            )
    return out


@dataclass
class LayerRows:
    """What is kept of one layer's row counts: the histogram of counts, and the hottest rows."""

    lookups: int = 0
    rows_read: int = 0
    histogram: Counter[int] = field(default_factory=Counter)  # lookups c -> rows read c times
    hot_rows: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))
    hot_lookups: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))

    def add_head(self, counters: np.ndarray, offset: int, keep: int | None) -> None:
        """Fold one head's counters in; keep the `keep` most read rows (None: every row read)."""
        read = np.flatnonzero(counters)
        self.rows_read += int(read.size)
        values = counters[read]
        self.lookups += int(values.sum())
        counts, rows = np.unique(values, return_counts=True)
        self.histogram.update(dict(zip(counts.tolist(), rows.tolist())))
        if keep == 0:
            return
        if keep is not None and self.hot_rows.size >= keep:
            floor = int(self.hot_lookups[keep - 1])
            chosen = values >= floor
            read, values = read[chosen], values[chosen]
        rows_all = np.concatenate([self.hot_rows, read.astype(np.int64) + offset])
        lookups_all = np.concatenate([self.hot_lookups, values.astype(np.int64)])
        order = np.lexsort((rows_all, -lookups_all))  # most looked-up first, ties by row id
        if keep is not None:
            order = order[:keep]
        self.hot_rows, self.hot_lookups = rows_all[order], lookups_all[order]


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
    keep: int | None,
    memory: int,
    pool: ThreadPoolExecutor,
) -> int:
    """Add the lookups of one order's distinct n-grams to every layer's row counts; returns the
    passes made over them.

    Args:
        keys: the order's distinct n-grams and their counts (merged).
        rows: the spec's heads.
        layers: the counts so far, per layer.
        keep: hot rows kept per layer (None: every row read).
        memory: bytes for counters and the key ranges streamed.
        pool: threads that read key ranges ahead.
    """
    layout = keys.layout
    itemsize = counter_itemsize(keys.occurrences)
    stream_rows = max(1, min(1 << 20, memory // 4 // (8 * layout.words + 16)))
    counter_memory = max(1, memory - 3 * stream_rows * (8 * layout.words + 16))
    heads = [h for layer in rows.heads for h in rows.of_order(layer, layout.order)]
    groups = _plan_groups(heads, counter_memory, itemsize)
    dtype = np.int32 if itemsize == 4 else np.int64
    for group in groups:
        counters = {h: np.zeros(h.size, dtype) for h in group}
        group_layers = sorted({h.layer for h in group})
        mix = np.empty(stream_rows, np.int64)
        for part in keys.chunks(stream_rows, pool, 2):
            for layer in group_layers:
                m = mix[: part.rows]
                mix_keys(part.keys, layout.order, layout.bits, layout.per_word, layout.mask, rows.multipliers[layer], m)
                for h in group:
                    if h.layer == layer:
                        _add_counts(m, part.counts, h.size, counters[h])
        for h in group:
            layers[h.layer].add_head(counters.pop(h), h.offset, keep)
    return len(groups)

