"""Per-head collision statistics of the distinct n-grams of a corpus, and size sweeps.

Everything is counted exactly on the distinct n-grams that `counting` and `runs` produce, with
the hasher's own mix computed back from each stored key and reduced by the same modulo
(`kernels`). Per order, every layer at every head size (the spec's and the sweep's) takes two
passes over the distinct n-grams, which stream by a key range at a time: the first counts
distinct n-grams per bucket (it merges the spilled runs and writes the merged distinct n-grams for
the later passes); the second flags those in a bucket with others (unweighted, and weighted by
occurrences) against one bit per bucket, and hands the n-grams crowded in every head to
`candidates`. Memory is planned by `budget`. The mix is the same at every size, so `mix_colliding`
is counted once per layer; a scaled spec keeps seed, layers and vocab, hence the multipliers, so
a sweep point only redoes the passes.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numba
import numpy as np

from ..corpus.base import DocBatch
from ..corpus.reader import Corpus
from ..errors import EngramError, UsageError
from ..helpers import cpu_count, plural
from ..kernels import buckets
from ..progress import SILENT, Progress, byte_task
from ..spec import TableSpec
from ..vocab import VocabProjection
from .budget import MemoryPlan, SizeItem, check_counter_memory, counter_itemsize, order_items, too_small
from .candidates import MAX_MIX, CandidateSet, TopMembers, choose_top
from .counting import KeyCountStore, count_batches
from .decoder import NgramDecoder
from .keys import KeyCounts, WindowKeys, mix_keys
from .options import FAN_IN, CountOptions, count_options
from .reports import HeadStats, LayerStats, OrderStats, SweepPoint, expected_rate
from .runs import OrderKeys
from .spill import SpillFolder, worker_pool

# Keys whose buckets are computed at once (vectorized) before their counters are touched.
BLOCK = 512


@numba.njit(nogil=True, cache=True)
def _add_loads(mix, size, loads):
    block = np.empty(BLOCK, np.int64)
    for lo in range(0, mix.size, BLOCK):
        n = min(BLOCK, mix.size - lo)
        buckets(mix[lo : lo + n], size, block[:n])
        for j in range(n):
            loads[block[j]] += 1


@numba.njit(nogil=True, cache=True)
def _flag_collisions(mix, counts, sizes, crowded, byte_offsets, flags, first, colliding, weighted):
    """Per head, distinct n-grams in a crowded bucket and their occurrences; flags: crowded in
    every head (set when `first`, else and-ed in, so several head sizes narrow one set of flags).

    `crowded` holds one bit per bucket (load > 1), so every head's buckets stay in cache.
    """
    block = np.empty(BLOCK, np.int64)
    every = np.empty(BLOCK, np.uint8)
    for lo in range(0, mix.size, BLOCK):
        n = min(BLOCK, mix.size - lo)
        every[:n] = 1
        for h in range(sizes.size):
            buckets(mix[lo : lo + n], sizes[h], block[:n])
            offset = byte_offsets[h]
            hits = 0
            weight = 0
            for j in range(n):
                b = block[j]
                hit = (crowded[offset + (b >> 3)] >> (b & 7)) & 1
                hits += hit
                weight += counts[lo + j] * hit
                every[j] &= hit
            colliding[h] += hits
            weighted[h] += weight
        for j in range(n):
            flags[lo + j] = every[j] == 1 if first else flags[lo + j] and every[j] == 1


@numba.njit(nogil=True, cache=True)
def _crowded_bits(loads, out):
    """One bit per bucket, set where the load is above 1 (little-endian bit order)."""
    out[:] = 0
    for b in range(loads.size):
        if loads[b] > 1:
            out[b >> 3] |= np.uint8(1) << np.uint8(b & 7)


def _slices(n: int, pieces: int) -> list[tuple[int, int]]:
    edges = np.linspace(0, n, max(1, pieces) + 1).astype(np.int64)
    return [(int(a), int(b)) for a, b in zip(edges[:-1], edges[1:]) if b > a]


class _Statistics:
    """One order's passes over its distinct n-grams, for every layer and head size."""

    def __init__(
        self,
        keys: OrderKeys,
        items: list[SizeItem],
        plan: MemoryPlan,
        folder: SpillFolder,
        pool: ThreadPoolExecutor,
        fan_in: int,
        top: int,
        progress: Progress,
    ) -> None:
        self.keys = keys
        self.items = items
        self.plan = plan
        self.folder = folder
        self.pool = pool
        self.fan_in = fan_in
        self.top = top
        self.progress = progress
        self.threads = cpu_count()
        self.ahead = self.threads + 1
        self.itemsize = counter_itemsize(keys.rows_bound)
        self.layers = sorted({item.layer for item in items})
        self.multipliers = {item.layer: item.multipliers for item in items}
        self.mix_colliding: dict[int, int] = {}
        self._buffers: dict[Any, np.ndarray] = {}

    def _row_bytes(self, merging: bool) -> int:
        words = self.keys.layout.words
        key_bytes = 8 * words + 8
        return (2 * key_bytes if merging else key_bytes) + 8 * len(self.layers) + len(self.items) + len(self.layers)

    def _rows(self, share: int, merging: bool) -> int:
        return max(1, share // ((self.ahead + 1) * self._row_bytes(merging)))

    def _buffer(self, name: Any, rows: int, dtype: Any) -> np.ndarray:
        """A scratch array of `rows` (mixes, flags), reused chunk after chunk."""
        held = self._buffers.get(name)
        if held is None or held.size < rows:
            held = self._buffers[name] = np.empty(max(rows, 1), dtype)
        return held[:rows]

    def _mixes(self, part: KeyCounts, layers: Iterable[int]) -> dict[int, np.ndarray]:
        layout = self.keys.layout
        out = {layer: self._buffer(("mix", layer), part.rows, np.int64) for layer in layers}
        jobs = [
            self.pool.submit(
                mix_keys,
                part.keys[a:b],
                layout.order,
                layout.bits,
                layout.per_word,
                layout.mask,
                self.multipliers[layer],
                out[layer][a:b],
            )
            for layer in out
            for a, b in _slices(part.rows, self.threads)
        ]
        for job in jobs:
            job.result()
        return out

    def run(self, decoder: NgramDecoder | None) -> None:
        """Every pass: bucket loads per group, then collisions (and the top buckets' n-grams)."""
        order = self.keys.layout.order
        for g, group in enumerate(self.plan.groups):
            label = f"order {order}: bucket loads" + (
                f" ({g + 1}/{len(self.plan.groups)})" if len(self.plan.groups) > 1 else ""
            )
            self._loads(group, label)
        self._collisions(decoder)

    def _loads(self, group: list[SizeItem], label: str) -> None:
        for item in group:
            item.loads = np.zeros(item.rows, np.int32 if self.itemsize == 4 else np.int64)
        layers = sorted({item.layer for item in group})
        rows = self._rows(self.plan.streaming, merging=not self.keys.merged)
        task = None
        if self.keys.merged:
            task = self.progress.task(label, self.keys.distinct)
            parts = self.keys.chunks(rows, self.pool, self.ahead)
        else:
            parts = self.keys.first_pass(self.folder, rows, self.pool, self.ahead, self.fan_in, self.progress)
        for part in parts:
            mixes = self._mixes(part, layers)
            jobs = []
            for item in group:
                assert item.loads is not None
                off = 0
                for size in item.sizes:
                    jobs.append(self.pool.submit(_add_loads, mixes[item.layer], size, item.loads[off : off + size]))
                    off += size
            for job in jobs:
                job.result()
            if task is not None:
                task.advance(part.rows)
        for item in group:
            self._finish_loads(item)

    def _finish_loads(self, item: SizeItem) -> None:
        assert item.loads is not None
        offsets = np.concatenate([[0], np.cumsum(item.sizes)[:-1]]).astype(np.int64)
        bitmaps = []
        for size, off in zip(item.sizes, offsets.tolist()):
            loads = item.loads[off : off + size]
            histogram = np.bincount(loads)
            item.heads.append(
                {
                    "size": size,
                    "buckets_used": int(size - histogram[0]),
                    "max_load": int(histogram.size - 1),
                    "load_histogram": {int(k): int(v) for k, v in enumerate(histogram) if v},
                }
            )
            bits = np.empty(-(-size // 8), np.uint8)
            _crowded_bits(loads, bits)
            bitmaps.append(bits)
        item.bitmap = np.concatenate(bitmaps)
        item.byte_offsets = np.concatenate([[0], np.cumsum([b.size for b in bitmaps])[:-1]]).astype(np.int64)
        if self.top and item.factor == 1:
            chosen = choose_top(item.loads, item.sizes, offsets.tolist(), self.top)
            item.top = TopMembers(chosen, item.sizes, self.keys.layout.words)
        item.loads = None

    def _collisions(self, decoder: NgramDecoder | None) -> None:
        order = self.keys.layout.order
        available = self.plan.streaming + self.plan.candidates + self.plan.counters
        sets = len(self.layers) + sum(item.modulus < MAX_MIX for item in self.items)
        limit = max(1, (available - self.plan.streaming) // sets)
        mix_sets = {
            layer: CandidateSet(f"order{order}-layer{layer}-mix", None, limit, self.folder) for layer in self.layers
        }
        for item in self.items:
            item.colliding = np.zeros(len(item.sizes), np.int64)
            item.weighted = np.zeros(len(item.sizes), np.int64)
            if item.modulus < MAX_MIX:
                item.residues = CandidateSet(
                    f"order{order}-layer{item.layer}-x{item.factor:g}", item.modulus, limit, self.folder
                )
        task = self.progress.task(f"order {order}: collisions", self.keys.distinct)
        rows = self._rows(self.plan.streaming, merging=False)
        for part in self.keys.chunks(rows, self.pool, self.ahead):
            mixes = self._mixes(part, self.layers)
            every = {layer: self._buffer(("every", layer), part.rows, np.bool_) for layer in self.layers}
            started: set[int] = set()
            for item in self.items:
                mix = mixes[item.layer]
                if item.residues is not None:
                    flags = self._buffer("flags", part.rows, np.bool_)
                    self._flag(item, part, mix, flags, True)
                    item.residues.add(mix, flags)
                    if item.layer in started:
                        np.logical_and(every[item.layer], flags, out=every[item.layer])
                    else:
                        np.copyto(every[item.layer], flags)
                else:
                    self._flag(item, part, mix, every[item.layer], item.layer not in started)
                started.add(item.layer)
                if item.top is not None:
                    item.top.add(part, mix)
            for layer in self.layers:
                mix_sets[layer].add(mixes[layer], every[layer])
            task.advance(part.rows)
        self._buffers.clear()
        counting = self.progress.task(f"order {order}: shared mixes", sets)
        # the sets count side by side: each within its own share of the budget
        by_layer = {layer: self.pool.submit(candidates.counts) for layer, candidates in mix_sets.items()}
        by_item = [(item, self.pool.submit(item.residues.counts)) for item in self.items if item.residues is not None]
        for layer, job in by_layer.items():
            self.mix_colliding[layer] = job.result()[0]
            counting.advance()
        for item, job in by_item:
            item.all_heads = job.result()[1]
            counting.advance()
        for item in self.items:
            if item.residues is None:
                item.all_heads = self.mix_colliding[item.layer]

    def _flag(self, item: SizeItem, part: KeyCounts, mix: np.ndarray, flags: np.ndarray, first: bool) -> None:
        """Count the item's colliding n-grams of `part`; set (`first`) or narrow `flags` to
        those crowded in every head."""
        assert item.bitmap is not None and item.byte_offsets is not None
        assert item.colliding is not None and item.weighted is not None
        sizes = np.array(item.sizes, np.int64)
        results = []
        for a, b in _slices(part.rows, self.threads):
            c, w = np.zeros(len(item.sizes), np.int64), np.zeros(len(item.sizes), np.int64)
            job = self.pool.submit(
                _flag_collisions,
                mix[a:b],
                part.counts[a:b],
                sizes,
                item.bitmap,
                item.byte_offsets,
                flags[a:b],
                first,
                c,
                w,
            )
            results.append((job, c, w))
        for job, c, w in results:
            job.result()
            item.colliding += c
            item.weighted += w

    def stats(self, item: SizeItem, decoder: NgramDecoder | None) -> OrderStats:
        """The figures of one item once every pass is done."""
        distinct, occurrences = self.keys.distinct or 0, self.keys.occurrences
        assert item.colliding is not None and item.weighted is not None
        heads = [
            HeadStats(
                size=head["size"],
                buckets_used=head["buckets_used"],
                colliding=int(item.colliding[h]),
                collision_rate=float(item.colliding[h] / distinct) if distinct else 0.0,
                expected_rate=expected_rate(head["size"], distinct),
                weighted_rate=float(item.weighted[h] / occurrences) if occurrences else 0.0,
                max_load=head["max_load"],
                load_histogram=head["load_histogram"],
            )
            for h, head in enumerate(item.heads)
        ]
        stats = OrderStats(
            self.keys.layout.order, occurrences, distinct, self.mix_colliding[item.layer], item.all_heads, heads
        )
        if item.top is not None and decoder is not None:
            stats.top_buckets = item.top.buckets(self.keys.layout, decoder)
        return stats


def collision_statistics(
    spec: TableSpec,
    projection: VocabProjection,
    corpus: Corpus | Iterable[DocBatch],
    *,
    factors: list[float] | None = None,
    top: int = 0,
    barrier_ids: Iterable[int] | None = None,
    counting: CountOptions | None = None,
    memory_budget: int | None = None,
    spill_dir: str | Path | None = None,
    on_batch: Callable[[DocBatch | None], None] | None = None,
    on_statistic: Callable[[], None] | None = None,
    client: Any = None,
    part_ids: int | None = None,
    progress: Progress = SILENT,
    fan_in: int = FAN_IN,
) -> tuple[LayerStats, list[SweepPoint] | None, int]:
    """Statistics at the spec's sizes and at every sweep factor, and the bytes spilled to disk.

    Args:
        spec: the tables whose head sizes are measured.
        projection: the spec's vocab projection.
        corpus: a `Corpus` or any iterable of `DocBatch` (documents of raw token ids).
        factors: the sweep: also every head size scaled by each factor.
        top: list the `top` most crowded buckets per order, with their n-grams.
        barrier_ids: tokens no n-gram spans, counted as the hasher hashes them (see `NgramHasher`).
        counting: how the corpus is counted (memory budget, spill folder, cluster, progress; see
            `CountOptions`); or give its fields as the keywords that follow, not both.
    """
    counting = count_options(
        counting,
        memory_budget=memory_budget,
        spill_dir=spill_dir,
        on_batch=on_batch,
        on_statistic=on_statistic,
        client=client,
        part_ids=part_ids,
        progress=progress,
        fan_in=fan_in,
    )
    from .cluster import count_on_cluster

    sweep_factors = list(factors or [])
    client, progress, fan_in = counting.client, counting.progress, counting.fan_in
    budget = check_counter_memory(spec, sweep_factors, counting.memory_budget, local=client is None)
    if client is not None and not isinstance(corpus, Corpus):
        raise UsageError("a cluster counts a Corpus of files, not an iterable of batches")
    window = WindowKeys.of(spec, projection, barrier_ids)
    decoder = NgramDecoder(projection) if top else None
    layers: LayerStats = {layer: {} for layer in spec.layer_ids}
    points: dict[float, LayerStats] = {f: {layer: {} for layer in spec.layer_ids} for f in sweep_factors}
    with SpillFolder(counting.spill_dir) as folder, worker_pool(cpu_count()) as pool:
        store: KeyCountStore | None = None
        if client is not None:
            assert isinstance(corpus, Corpus)
            orders = count_on_cluster(corpus, projection, window, budget, folder, counting)
        else:
            store = KeyCountStore(window, budget, folder, pool, counting.growth)
            if isinstance(corpus, Corpus):
                reading = byte_task(progress, "counting n-grams", max(1, corpus.total_bytes))
                count_batches(corpus.batches(), store, reading, lambda: corpus.bytes_done, counting.on_batch)
                reading.update(max(1, corpus.total_bytes))  # the pass is over (--max-tokens may stop it early)
            else:
                count_batches(corpus, store, progress.task("counting n-grams"), None, counting.on_batch)
            orders = {
                n: OrderKeys(window.layout(n), [store.in_memory[n]], True)
                if n in store.in_memory
                else OrderKeys(window.layout(n), store.runs[n], False)
                for n in window.orders
            }
        if not orders[2].occurrences:
            detail = ""
            if isinstance(corpus, Corpus):
                read = corpus.summary
                detail = (
                    f" ({plural(read.files, 'file')} read"
                    + (f", {plural(read.skipped_binary, 'binary file')} skipped" if read.skipped_binary else "")
                    + ")"
                )
            raise EngramError(f"the corpus holds no tokens{detail}")
        for n in spec.orders:
            items = order_items(spec, projection, n, sweep_factors)
            itemsize = counter_itemsize(orders[n].rows_bound)
            resident = store.resident_bytes if store is not None else 0
            plan = MemoryPlan.of(items, budget - resident, itemsize)
            if plan is None and resident:
                assert store is not None
                store.spill_in_memory()
                orders = {m: OrderKeys(window.layout(m), store.runs[m], False) for m in orders if m >= n}
                plan = MemoryPlan.of(items, budget, itemsize)
            if plan is None:
                raise too_small(budget, spec, sweep_factors)
            stats = _Statistics(orders[n], items, plan, folder, pool, fan_in, top, progress)
            stats.run(decoder)
            for item in items:
                result = stats.stats(item, decoder)
                if item.factor == 1:
                    layers[item.layer][n] = result
                    if counting.growth is not None:
                        counting.growth.exact(n, result.distinct)
                    if 1.0 in points:
                        points[1.0][item.layer][n] = OrderStats(
                            result.order,
                            result.occurrences,
                            result.distinct,
                            result.mix_colliding,
                            result.all_heads_colliding,
                            result.heads,
                        )
                else:
                    points[item.factor][item.layer][n] = result
                if counting.on_statistic:
                    counting.on_statistic()
            if counting.on_keys:
                counting.on_keys(orders[n], budget - (store.resident_bytes if store is not None else 0), pool)
            orders[n].remove()
            if store is not None:
                store.release(n)
            del orders[n], stats
        spilled = folder.written
    sweep = [SweepPoint(f, spec if f == 1 else spec.scaled(f), points[f]) for f in sweep_factors] if factors else None
    return layers, sweep, spilled
