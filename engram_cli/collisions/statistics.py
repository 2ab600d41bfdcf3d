"""Per-head collision statistics of the distinct n-grams of a corpus, and size sweeps.

Everything is counted exactly on the distinct n-grams that `keys` and `spill` produce, with the
hasher's own mix computed back from each stored key and reduced by the same modulo (`kernels`).
Per order, every layer at every head size (the spec's and the sweep's) takes two passes over the
distinct n-grams, which stream by a key range at a time: the first counts distinct n-grams per
bucket (it merges the spilled runs and writes the merged distinct n-grams for the later passes);
the second flags those in a bucket with others (unweighted, and weighted by occurrences) against
one bit per bucket. The bucket counters are sized by the table, not the corpus (4 bytes a row of
every head counted at once), and are counted in the memory budget: layers and sizes whose
counters do not fit together take a first pass each, and a budget below the counters of one
layer at one size is refused with the smallest that works (`minimum_memory_budget`).

An n-gram that shares its bucket in every head with one same other n-gram is one whose mix
agrees with it modulo the lcm of the head sizes (Chinese remainder theorem); only n-grams crowded
in every head can be one, so grouping those candidates by that residue, and by the mix itself,
gives `all_heads_colliding` and `mix_colliding` exactly. The mix is the same at every size, so
`mix_colliding` is counted once per layer (its candidates crowded at every size); when the lcm is
at least 2**63 it exceeds every mix and the two counts are the same. Candidates are held in the
budget, else spilled into files by a hash of the residue, so equal residues meet in one file.

The ideal rate is what uniform hashing would give: 1 - (1 - 1/size)**(distinct - 1). A size sweep
scales every head size; a scaled spec keeps seed, layers and vocab, hence the multipliers, so
only the passes are redone.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numba
import numpy as np

from ..corpus.base import DocBatch
from ..corpus.reader import Corpus
from ..dtypes import DTYPE_BYTES
from ..errors import EngramError, ResourceError, UsageError
from ..helpers import available_memory, cpu_count, gibibytes, plural
from ..kernels import buckets
from ..progress import SILENT, Progress
from ..spec import TableSpec
from ..vocab import VocabProjection
from .keys import KEY_MUL_U64, KeyCounts, KeyLayout, WindowKeys, mix_keys, unpack_windows
from .spill import (
    FAN_IN,
    KeyCountStore,
    Run,
    RunWriter,
    SpillFolder,
    default_memory_budget,
    merge_pieces,
    merge_rounds,
    ordered,
    rounds_needed,
)

if TYPE_CHECKING:
    from tokenizers import Tokenizer

# At most this many n-grams of a crowded bucket are listed by --top (in JSON; fewer on screen).
TOP_NGRAMS = 8


TOP_SHOWN = 4


MAX_MIX = 1 << 63


# Memory left to stream keys and to hold collision candidates beyond the bucket counters: the
# least that still makes progress (one key range of a few rows at a time).
MIN_WORKING_BYTES = 4096


# Keys in memory at once while streaming (more only means bigger reads, not faster passes).
STREAMING_BYTES = 256 << 20


# Candidate mixes spill into this many files by a hash of their residue.
CANDIDATE_PART_BITS = 8


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
def _compress_into(values, flags, out, at):
    """values[flags] copied into out from index `at`; returns the index after the last."""
    for i in range(values.size):
        if flags[i]:
            out[at] = values[i]
            at += 1
    return at


@numba.njit(nogil=True, cache=True)
def _crowded_bits(loads, out):
    """One bit per bucket, set where the load is above 1 (little-endian bit order)."""
    out[:] = 0
    for b in range(loads.size):
        if loads[b] > 1:
            out[b >> 3] |= np.uint8(1) << np.uint8(b & 7)


@numba.njit(nogil=True, cache=True)
def _fullest(loads, k):
    """The k fullest buckets holding more than one n-gram, by load then bucket index: all those
    above the k-th largest load, then the first of those at it. Returns (buckets, loads)."""
    hist = np.bincount(loads)
    above = 0  # buckets with a load above v
    v = hist.size - 1
    while v >= 2 and above + hist[v] < k:
        above += hist[v]
        v -= 1
    edge = max(v, 2)  # the load at which only the first buckets are taken
    at_edge = k - above if v >= 2 else hist[2] if hist.size > 2 else 0
    out = np.empty(above + at_edge, np.int64)
    n = 0
    for b in range(loads.size):
        load = loads[b]
        if load > edge or (load == edge and at_edge > 0):
            if load == edge:
                at_edge -= 1
            out[n] = b
            n += 1
    out = out[:n]
    return out, loads[out].astype(np.int64)


@numba.njit(nogil=True, cache=True)
def _count_shared_sorted(values):
    """How many of the sorted `values` equal a neighbour."""
    shared = 0
    i = 0
    n = values.size
    while i < n:
        j = i + 1
        while j < n and values[j] == values[i]:
            j += 1
        if j - i > 1:
            shared += j - i
        i = j
    return shared


@numba.njit(nogil=True, cache=True)
def _group_by_hash(values, residues, shift, bits, out, edges):
    """values into out grouped by bits of a hash of their residue (a counting sort)."""
    groups = 1 << bits
    mask = np.uint64(groups - 1)
    edges[:] = 0
    for i in range(values.size):
        group = np.int64(((np.uint64(residues[i]) * KEY_MUL_U64) >> np.uint64(shift)) & mask)
        edges[group + 1] += 1
    for g in range(groups):
        edges[g + 1] += edges[g]
    fill = edges[:groups].copy()
    for i in range(values.size):
        group = np.int64(((np.uint64(residues[i]) * KEY_MUL_U64) >> np.uint64(shift)) & mask)
        out[fill[group]] = values[i]
        fill[group] += 1


def _slices(n: int, pieces: int) -> list[tuple[int, int]]:
    edges = np.linspace(0, n, max(1, pieces) + 1).astype(np.int64)
    return [(int(a), int(b)) for a, b in zip(edges[:-1], edges[1:]) if b > a]


@dataclass
class HeadStats:
    """Collisions in one head: buckets used, distinct n-grams sharing a bucket, and the load histogram."""

    size: int
    buckets_used: int
    colliding: int
    collision_rate: float
    expected_rate: float
    weighted_rate: float
    max_load: int
    load_histogram: dict[int, int]

    def to_json(self) -> dict[str, Any]:
        """One head's entry under `heads` in `engram inspect --json`."""
        return {
            "size": self.size,
            "buckets_used": self.buckets_used,
            "colliding": self.colliding,
            "collision_rate": self.collision_rate,
            "expected_rate": self.expected_rate,
            "weighted_rate": self.weighted_rate,
            "max_load": self.max_load,
            "load_histogram": {str(k): v for k, v in self.load_histogram.items()},
        }


@dataclass
class OrderStats:
    """Collisions of one order of one layer: every head, and the n-grams that collide in all of them."""

    order: int
    occurrences: int
    distinct: int
    mix_colliding: int
    all_heads_colliding: int
    heads: list[HeadStats]
    top_buckets: list[dict[str, Any]] | None = None

    def mean(self, name: str) -> float:
        """The mean of one `HeadStats` field over the heads."""
        return float(np.mean([getattr(h, name) for h in self.heads]))

    def to_json(self) -> dict[str, Any]:
        """One order's entry under `orders` in `engram inspect --json`."""
        data = {
            "occurrences": self.occurrences,
            "distinct": self.distinct,
            "mix_colliding": self.mix_colliding,
            "all_heads_colliding": self.all_heads_colliding,
            "all_heads_rate": self.all_heads_colliding / self.distinct if self.distinct else 0.0,
            "collision_rate": self.mean("collision_rate"),
            "expected_rate": self.mean("expected_rate"),
            "weighted_rate": self.mean("weighted_rate"),
            "heads": [h.to_json() for h in self.heads],
        }
        if self.top_buckets is not None:
            data["top_buckets"] = self.top_buckets
        return data


LayerStats = dict[int, dict[int, OrderStats]]  # layer id -> order -> statistics


def expected_rate(size: int, distinct: int) -> float:
    """Chance that an n-gram shares its bucket when `distinct` n-grams hash uniformly into `size`."""
    if distinct <= 1:
        return 0.0
    return float(-math.expm1((distinct - 1) * math.log1p(-1.0 / size))) if size > 1 else 1.0


@dataclass
class SizeItem:
    """One layer at one set of head sizes (the spec's or a sweep point's) of one order: its
    bucket counters while counted, then its figures."""

    layer: int
    factor: float
    sizes: list[int]
    multipliers: np.ndarray
    loads: np.ndarray | None = None
    heads: list[dict[str, Any]] = field(default_factory=list)
    bitmap: np.ndarray | None = None
    byte_offsets: np.ndarray | None = None
    colliding: np.ndarray | None = None
    weighted: np.ndarray | None = None
    residues: CandidateSet | None = None
    all_heads: int = 0
    top: TopMembers | None = None

    @property
    def rows(self) -> int:
        """Buckets of all heads of the item."""
        return int(sum(self.sizes))

    @property
    def modulus(self) -> int:
        """The lcm of the head sizes: n-grams in one bucket in every head share their mix modulo it."""
        return math.lcm(*self.sizes)

    def counter_bytes(self, itemsize: int) -> int:
        """Bytes of the item's bucket counters of `itemsize` bytes each."""
        return self.rows * itemsize

    @property
    def bitmap_bytes(self) -> int:
        """Bytes of one bit per bucket (which buckets are crowded)."""
        return sum(-(-s // 8) for s in self.sizes)


def counter_itemsize(distinct_bound: int) -> int:
    """Bytes of a bucket counter: int32 unless a bucket could hold 2**31 n-grams."""
    return 4 if distinct_bound < 2**31 else 8


@dataclass
class MemoryPlan:
    """How one order's statistics share the memory budget: bucket counters of a group of layers
    and sizes at a time, key ranges streamed, collision candidates held."""

    groups: list[list[SizeItem]]
    counters: int  # bytes of the largest group's counters
    streaming: int  # bytes of key ranges in memory while counting loads
    candidates: int  # bytes of candidates held before spilling

    @staticmethod
    def of(items: list[SizeItem], available: int, itemsize: int) -> MemoryPlan | None:
        """Groups of items whose counters fit, or None when one item's counters alone leave less
        than MIN_WORKING_BYTES of `available`.

        Args:
            items: every layer and size of one order.
            available: bytes of the budget not held by counts still in memory.
            itemsize: bytes of one bucket counter.
        """
        bitmaps = sum(item.bitmap_bytes for item in items)
        room = available - bitmaps
        largest = max(item.counter_bytes(itemsize) for item in items)
        if largest + MIN_WORKING_BYTES > room:
            return None
        cap = max(largest, room // 2)
        groups: list[list[SizeItem]] = [[]]
        used = 0
        for item in items:
            size = item.counter_bytes(itemsize)
            if groups[-1] and used + size > cap:
                groups.append([])
                used = 0
            groups[-1].append(item)
            used += size
        counters = max(sum(i.counter_bytes(itemsize) for i in g) for g in groups)
        rest = room - counters
        streaming = min(rest // 2, STREAMING_BYTES)
        return MemoryPlan(groups, counters, streaming, rest - streaming)


def order_items(spec: TableSpec, projection: VocabProjection, order: int, factors: list[float]) -> list[SizeItem]:
    """The items of one order: every layer at the spec's sizes, then at every other sweep size.

    Args:
        spec: the tables.
        projection: the spec's projection (its compressed size draws the multipliers).
        order: the n-gram order.
        factors: the sweep factors.
    """
    span = slice((order - 2) * spec.n_head_per_ngram, (order - 1) * spec.n_head_per_ngram)
    items = []
    for factor in [1.0, *[f for f in factors if f != 1]]:
        scaled = spec if factor == 1 else spec.scaled(factor)
        for layer in spec.layer_ids:
            items.append(
                SizeItem(
                    layer,
                    factor,
                    scaled.head_sizes(layer)[span],
                    spec.multipliers(layer, projection.compressed_size),
                )
            )
    return items


def _order_needs(spec: TableSpec, factors: list[float]) -> list[tuple[int, SizeItem, int]]:
    """Per order: the item with the most bucket counters and the bytes of every item's bitmaps."""
    needs = []
    for order in spec.orders:
        items = order_items(spec, _NO_PROJECTION, order, factors)
        largest = max(items, key=lambda item: item.rows)
        needs.append((order, largest, sum(item.bitmap_bytes for item in items)))
    return needs


def _largest_need(spec: TableSpec, factors: list[float] | None) -> tuple[int, SizeItem, int]:
    """The order whose counters and bitmaps take the most: what sets the smallest budget."""
    return max(_order_needs(spec, factors or []), key=lambda need: need[1].counter_bytes(4) + need[2])


def minimum_memory_budget(spec: TableSpec, factors: list[float] | None = None) -> int:
    """The smallest memory budget `collision_statistics` works in: the bucket counters of the
    largest layer and head sizes of an order (4 bytes a row), one bit per row of every head of
    that order, and MIN_WORKING_BYTES to stream keys through (any less and no key range fits)."""
    _, largest, bitmaps = _largest_need(spec, factors)
    return largest.counter_bytes(4) + bitmaps + MIN_WORKING_BYTES


class _NoProjection:
    """Sizes only: `order_items` without multipliers (for budget planning before a projection)."""

    compressed_size = 2


_NO_PROJECTION: Any = _NoProjection()


def check_counter_memory(spec: TableSpec, factors: list[float] | None, memory_budget: int | None = None) -> int:
    """The memory budget statistics of `spec` (and the sweep) run in, checked before any work.

    A budget given is refused below `minimum_memory_budget` (with the smallest that works); the
    default, a quarter of the memory available, is raised to that minimum, refused only when the
    minimum exceeds what the machine has available.

    Args:
        spec: the tables whose head sizes are measured.
        factors: the sweep factors.
        memory_budget: bytes, or None for the default.
    """
    smallest = minimum_memory_budget(spec, factors)
    if memory_budget is not None:
        if memory_budget < smallest:
            raise too_small(memory_budget, spec, factors)
        return memory_budget
    available = available_memory()
    if smallest > available:
        raise ResourceError(
            f"collision statistics of {spec.name} need {_what_takes_it(spec, factors)}: at least "
            f"{gibibytes(smallest)}, with {gibibytes(available)} of memory available: use smaller head sizes "
            "or sweep factors"
        )
    return max(default_memory_budget(), smallest)


def _what_takes_it(spec: TableSpec, factors: list[float] | None) -> str:
    """The counters and bitmaps that set the smallest budget, in words (sizes rounded up to MiB)."""
    order, largest, bitmaps = _largest_need(spec, factors)
    at = "the spec's head sizes" if largest.factor == 1 else f"sweep factor {largest.factor:g}"
    return (
        f"{gibibytes(largest.counter_bytes(4))} of bucket counters at {at} for the {order}-grams of layer "
        f"{largest.layer} ({plural(len(largest.sizes), 'head')} of {min(largest.sizes):,} to {max(largest.sizes):,} "
        f"rows, 4 bytes a row) and {gibibytes(bitmaps)} for one bit a row of every head of the order"
    )


def too_small(budget: int, spec: TableSpec, factors: list[float] | None) -> ResourceError:
    """The one-line error of a budget below `minimum_memory_budget`, naming what takes it.

    Args:
        budget: the bytes given.
        spec: the tables.
        factors: the sweep factors.
    """
    smallest = minimum_memory_budget(spec, factors)
    return ResourceError(
        f"a memory budget of {budget / 2**20:.1f} MiB is too small for {spec.name}: it needs "
        f"{_what_takes_it(spec, factors)}; the smallest budget that works is {-(-smallest // 2**20)} MiB"
    )


class CandidateSet:
    """Mixes of n-grams crowded in every head, counted for equal values (and equal residues
    modulo `modulus`). Held in one buffer of `limit` bytes, sorted in place at the end; past
    it, spilled into files by a hash of the residue, so equal residues (and equal mixes) always
    meet in one file, and each file is counted alone (split again if it outgrows the limit)."""

    def __init__(self, name: str, modulus: int | None, limit: int, folder: SpillFolder) -> None:
        self.name = name
        self.modulus = modulus if modulus is not None and modulus < MAX_MIX else None
        # a residue copy is sorted beside the values when there is a modulus
        self.capacity = max(1, limit // (8 if self.modulus is None else 16))
        self.folder = folder
        self._buffer: np.ndarray | None = None
        self._fill = 0
        self._files: list[Path] = []

    def residue(self, mix: np.ndarray) -> np.ndarray:
        """What equal candidates share: the mix modulo the lcm (or the mix itself)."""
        return mix if self.modulus is None else mix % np.int64(self.modulus)

    def add(self, mix: np.ndarray, flags: np.ndarray) -> None:
        """Add the mixes whose flag is set."""
        n = int(np.count_nonzero(flags))
        if not n:
            return
        if self._fill + n > self.capacity:
            self._spill_buffer()
        if n > self.capacity:
            self._spill(mix[flags], 0, self._files_at(0, ""))
            return
        if self._buffer is None:
            self._buffer = np.empty(self.capacity, np.int64)
        self._fill = int(_compress_into(mix, flags, self._buffer, self._fill))

    def _spill_buffer(self) -> None:
        if self._buffer is not None and self._fill:
            step = 1 << 20
            files = self._files_at(0, "")
            for lo in range(0, self._fill, step):
                self._spill(self._buffer[lo : min(lo + step, self._fill)], 0, files)
        self._fill = 0

    def _files_at(self, level: int, prefix: str) -> list[Path]:
        if level == 0:
            if not self._files:
                self._files = [self.folder.path / f"{self.name}-{g:04d}" for g in range(1 << CANDIDATE_PART_BITS)]
            return self._files
        return [Path(f"{prefix}.{g:04d}") for g in range(1 << CANDIDATE_PART_BITS)]

    def _spill(self, values: np.ndarray, level: int, files: list[Path]) -> None:
        shift = 64 - CANDIDATE_PART_BITS * (level + 1)
        out = np.empty_like(values)
        edges = np.zeros((1 << CANDIDATE_PART_BITS) + 1, np.int64)
        _group_by_hash(values, self.residue(values), shift, CANDIDATE_PART_BITS, out, edges)
        bounds = edges.tolist()
        for g, (a, b) in enumerate(zip(bounds[:-1], bounds[1:])):
            if b > a:
                self.folder.append(files[g], out[a:b])

    def counts(self) -> tuple[int, int]:
        """(n-grams sharing their mix, n-grams sharing their residue) among the candidates."""
        if not self._files:
            values = np.zeros(0, np.int64) if self._buffer is None else self._buffer[: self._fill]
            result = self._shared(values)
        else:
            self._spill_buffer()
            self._buffer = None
            result = self._count_files(self._files, 0)
        self._buffer, self._fill = None, 0
        return result

    def _count_files(self, files: list[Path], level: int) -> tuple[int, int]:
        by_mix = by_residue = 0
        for path in files:
            if not path.exists():
                continue
            if path.stat().st_size // 8 > self.capacity and CANDIDATE_PART_BITS * (level + 2) <= 64:
                sub = self._files_at(level + 1, str(path))
                with open(path, "rb") as handle:
                    while True:
                        values = np.fromfile(handle, dtype=np.int64, count=min(self.capacity, 1 << 20))
                        if not values.size:
                            break
                        self._spill(values, level + 1, sub)
                path.unlink()
                m, r = self._count_files(sub, level + 1)
            else:
                m, r = self._shared(np.fromfile(path, dtype=np.int64))
                path.unlink()
            by_mix += m
            by_residue += r
        return by_mix, by_residue

    def _shared(self, values: np.ndarray) -> tuple[int, int]:
        """Sorts `values` in place."""
        by_residue = 0
        if self.modulus is not None:
            residues = values % np.int64(self.modulus)
            residues.sort()
            by_residue = int(_count_shared_sorted(residues))
            del residues
        values.sort()
        by_mix = int(_count_shared_sorted(values))
        return by_mix, by_mix if self.modulus is None else by_residue


class TopMembers:
    """The most frequent n-grams of the fullest buckets of one layer's heads, kept as the
    distinct n-grams stream past in key order: at most TOP_NGRAMS per bucket, by count then key."""

    def __init__(self, chosen: list[tuple[int, int, int]], sizes: list[int], words: int) -> None:
        self.chosen = chosen  # (load, head, bucket)
        self.sizes = sizes
        self.members: dict[tuple[int, int], KeyCounts] = {(h, b): KeyCounts.empty(words) for _, h, b in chosen}
        self._wanted = {
            h: np.array(sorted(b for _, hh, b in chosen if hh == h), np.int64) for h in {h for _, h, _ in chosen}
        }

    def add(self, part: KeyCounts, mix: np.ndarray) -> None:
        """Keep the n-grams of `part` (with their mixes) that fall in a chosen bucket."""
        for h, wanted in self._wanted.items():
            buckets = mix % np.int64(self.sizes[h])
            hit = np.flatnonzero(np.isin(buckets, wanted))
            if not hit.size:
                continue
            for b in np.unique(buckets[hit]).tolist():
                rows = hit[buckets[hit] == b]
                old = self.members[(h, b)]
                keys = np.concatenate([old.keys, part.keys[rows]])
                counts = np.concatenate([old.counts, part.counts[rows]])
                keep = np.argsort(-counts, kind="stable")[:TOP_NGRAMS]
                self.members[(h, b)] = KeyCounts(keys[keep], counts[keep])

    def buckets(self, layout: KeyLayout, decoder: NgramDecoder) -> list[dict[str, Any]]:
        """The chosen buckets as `top_buckets` lists them, n-grams decoded."""
        result = []
        for load, h, b in self.chosen:
            found = self.members[(h, b)]
            windows = np.empty((found.rows, layout.order), np.int64)
            unpack_windows(
                np.ascontiguousarray(found.keys), layout.order, layout.bits, layout.per_word, layout.mask, windows
            )
            result.append(
                {
                    "head": h,
                    "size": self.sizes[h],
                    "bucket": b,
                    "load": load,
                    "ngrams": [decoder.ngram(w[::-1], int(c)) for w, c in zip(windows, found.counts)],
                }
            )
        return result


def choose_top(loads: np.ndarray, sizes: list[int], offsets: list[int], top: int) -> list[tuple[int, int, int]]:
    """The `top` fullest buckets over all heads of an item: (load, head, bucket), by load, head, bucket.

    Args:
        loads: the item's bucket counters, head after head.
        sizes: the head sizes.
        offsets: where each head starts in `loads`.
        top: how many buckets.
    """
    chosen: list[tuple[int, int, int]] = []
    for h, (size, off) in enumerate(zip(sizes, offsets)):
        buckets, head_loads = _fullest(loads[off : off + size], top)
        chosen += [(int(load), h, int(b)) for b, load in zip(buckets.tolist(), head_loads.tolist())]
    return sorted(chosen, key=lambda t: (-t[0], t[1], t[2]))[:top]


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


@contextmanager
def worker_pool(threads: int) -> Iterator[ThreadPoolExecutor]:
    """A thread pool that, on the way out (an error or Ctrl-C too), drops what has not started
    and waits for what runs, so nothing writes to the spill folder once it is removed."""
    pool = ThreadPoolExecutor(max_workers=threads, thread_name_prefix="engram-count")
    try:
        yield pool
    finally:
        pool.shutdown(wait=True, cancel_futures=True)


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


class NgramDecoder:
    """Canonical ids back to text, through the first tokenizer id of each canonical id."""

    def __init__(self, projection: VocabProjection) -> None:
        lookup = projection.lookup
        self._first = np.full(projection.compressed_size, -1, np.int64)
        canonical, first = np.unique(lookup, return_index=True)  # the first raw id of each canonical id
        self._first[canonical] = first
        self._tokenizer: Tokenizer | None
        try:
            self._tokenizer = projection.tokenizer()
        except EngramError:
            self._tokenizer = None
        self._cache: dict[int, str] = {}

    def token(self, canonical: int) -> str:
        """The text of one canonical id (`#<id>` when the projection carries no tokenizer)."""
        if canonical not in self._cache:
            raw = int(self._first[canonical])
            self._cache[canonical] = (
                f"#{canonical}" if self._tokenizer is None else self._tokenizer.decode([raw], skip_special_tokens=False)
            )
        return self._cache[canonical]

    def ngram(self, window: np.ndarray, count: int) -> dict[str, Any]:
        """An n-gram's ids, tokens, text and occurrence count, as `--top` lists them."""
        tokens = [self.token(int(c)) for c in window]
        return {"ids": [int(c) for c in window], "tokens": tokens, "text": "".join(tokens), "count": count}


@dataclass
class SweepPoint:
    """The statistics of every layer at one sweep factor, and the scaled spec."""

    factor: float
    spec: TableSpec
    layers: LayerStats

    def to_json(self) -> dict[str, Any]:
        """One entry of `sweep` in `engram inspect --json`."""
        return {
            "factor": self.factor,
            "rows": self.spec.total_rows,
            "parameters": self.spec.parameters,
            "bytes": self.spec.parameters * DTYPE_BYTES[self.spec.dtype],
            "layers": layers_json(self.layers),
        }


def layers_json(layers: LayerStats) -> dict[str, Any]:
    """Statistics per layer and order as `engram inspect --json` writes them."""
    return {
        str(layer): {"orders": {str(n): s.to_json() for n, s in orders.items()}} for layer, orders in layers.items()
    }


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


def collision_statistics(
    spec: TableSpec,
    projection: VocabProjection,
    corpus: Corpus | Iterable[DocBatch],
    *,
    factors: list[float] | None = None,
    top: int = 0,
    memory_budget: int | None = None,
    spill_dir: str | Path | None = None,
    on_batch: Callable[[DocBatch | None], None] | None = None,
    on_statistic: Callable[[], None] | None = None,
    client: Any = None,
    part_ids: int | None = None,
    barrier_ids: Iterable[int] | None = None,
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
        memory_budget: bytes of memory for n-gram counts, bucket counters and collision
            candidates; the rest goes to a folder in `spill_dir`, removed at the end (default: a
            quarter of what is available, at least `minimum_memory_budget`; less is refused).
        spill_dir: where that folder goes; on a cluster, a folder every worker sees.
        on_batch: called after each batch (or cluster map task, with None), for progress.
        on_statistic: called after each (layer, order, size) is done.
        client: a Dask client (with a `Corpus`): counting is then mapped over corpus parts and
            merged by key range on the cluster, each task within `memory_budget`, to the same numbers.
        part_ids: on a cluster, the smallest range of a pre-tokenized file one task reads.
        barrier_ids: tokens no n-gram spans, counted as the hasher hashes them (see `NgramHasher`).
        progress: gets a task per pass (counting, merge rounds, ranges merged, loads, collisions).
        fan_in: the most runs merged at once (more take merge rounds first).
    """
    from .cluster import count_on_cluster

    sweep_factors = list(factors or [])
    budget = check_counter_memory(spec, sweep_factors, memory_budget)
    if client is not None and not isinstance(corpus, Corpus):
        raise UsageError("a cluster counts a Corpus of files, not an iterable of batches")
    window = WindowKeys.of(spec, projection, barrier_ids)
    decoder = NgramDecoder(projection) if top else None
    layers: LayerStats = {layer: {} for layer in spec.layer_ids}
    points: dict[float, LayerStats] = {f: {layer: {} for layer in spec.layer_ids} for f in sweep_factors}
    with SpillFolder(spill_dir) as folder, worker_pool(cpu_count()) as pool:
        store: KeyCountStore | None = None
        if client is not None:
            assert isinstance(corpus, Corpus)
            orders = count_on_cluster(
                client, corpus, projection, window, budget, folder, progress, on_batch, part_ids, fan_in
            )
        else:
            store = KeyCountStore(window, budget, folder, pool)
            reading = progress.task(
                "counting n-grams", max(1, corpus.total_bytes) if isinstance(corpus, Corpus) else None
            )
            batches = corpus.batches() if isinstance(corpus, Corpus) else corpus
            size = (lambda: corpus.bytes_done) if isinstance(corpus, Corpus) else None
            count_batches(batches, store, reading, size, on_batch)
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
                if on_statistic:
                    on_statistic()
            orders[n].remove()
            if store is not None:
                store.release(n)
            del orders[n], stats
        spilled = folder.written
    sweep = [SweepPoint(f, spec if f == 1 else spec.scaled(f), points[f]) for f in sweep_factors] if factors else None
    return layers, sweep, spilled
