"""Collision statistics of Engram tables on a corpus, size sweeps, and table health.

Everything is counted exactly on the distinct n-grams of the corpus. A window (the
projected ids x[t-n+1] .. x[t], the projected pad before a document's start, exactly
what the hasher hashes) is packed into a key of one or more uint64 words; a batch of
documents maps to the distinct keys of each order with their occurrence counts, and
these partial counts merge by key. Keys are stored through an invertible multiply,
so their top bits spread them evenly over partitions: when the counts outgrow the
memory budget they spill to disk one file per partition, and each partition merges
on its own, with bounded memory and the same exact result.

Per layer, order and head size, two passes over the distinct n-grams follow: the
first counts distinct n-grams per bucket, the second flags those in a bucket with
others. An n-gram that shares its bucket in every head with one same other n-gram is
one whose mix agrees with it modulo the lcm of the head sizes (Chinese remainder
theorem); only n-grams crowded in every head can be one, so grouping those candidates
by that residue, and by the mix itself, gives `all_heads_colliding` and `mix_colliding`
exactly.
"""

from __future__ import annotations

import contextlib
import math
import shutil
import tempfile
import time
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numba
import numpy as np
from rich.console import Console
from rich.table import Table

from .corpus import Corpus, CorpusOptions, CorpusPart, CorpusSummary, DocBatch, cpu_count
from .errors import EngramError
from .hashing import FLOAT_REDUCTION_MIN_PRIME
from .spec import DTYPE_BYTES, TableSpec, human_bytes, load_spec
from .vocab import VocabProjection, resolve_projection

# Invertible multiply that turns a packed window into a stored key (Fibonacci hashing).
KEY_MUL = 0x9E3779B97F4A7C15
KEY_INV = pow(KEY_MUL, -1, 1 << 64)
# Folds the extra words of a long window into the first one, so partitions stay balanced.
FOLD_MUL = 0xC2B2AE3D27D4EB4F
# Partitions of spilled key counts: the top bits of a stored key.
PARTITION_BITS = 8
# At most this many n-grams of a crowded bucket are listed by --top (in JSON; fewer on screen).
TOP_NGRAMS = 8
TOP_SHOWN = 4
MAX_MIX = 1 << 63

_KEY_MUL = np.uint64(KEY_MUL)
_KEY_INV = np.uint64(KEY_INV)
_FOLD_MUL = np.uint64(FOLD_MUL)


# ---- numba kernels (nogil: the callers run them on a thread pool) ---------------------------

@numba.njit(nogil=True, cache=True)
def _fold(keys: np.ndarray, i: int) -> np.uint64:
    h = np.uint64(0)
    for w in range(1, keys.shape[1]):
        h = (h ^ keys[i, w]) * _FOLD_MUL
        h ^= h >> np.uint64(29)
    return h


@numba.njit(nogil=True, cache=True)
def _slots(order, bits, per_word):
    """Word and bit shift of the id k tokens back, for every k (no division in the hot loops)."""
    word = np.empty(order, np.int64)
    shift = np.empty(order, np.uint64)
    for k in range(order):
        word[k] = k // per_word
        shift[k] = np.uint64((k - word[k] * per_word) * bits)
    return word, shift


@numba.njit(nogil=True, cache=True)
def _pack_one_word(ids, lookup, is_start, context, pad, order, bits, out):
    """`_pack_windows` for windows that fit one word: shift the previous window in."""
    step = np.uint64(bits)
    mask = np.uint64(0xFFFFFFFFFFFFFFFF) >> np.uint64(64 - order * bits)
    padded = np.uint64(0)
    key = np.uint64(0)
    for k in range(order - 1):
        padded |= np.uint64(pad) << np.uint64(k * bits)
        key |= np.uint64(context[context.size - 1 - k]) << np.uint64(k * bits)
    for i in range(ids.size):
        if is_start[i]:
            key = padded
        key = ((key << step) | np.uint64(lookup[ids[i]])) & mask
        out[i, 0] = key * _KEY_MUL


@numba.njit(nogil=True, cache=True)
def _pack_windows(ids, lookup, is_start, context, pad, order, bits, per_word, out):
    """Stored key of the order-`order` window ending at every token."""
    if out.shape[1] == 1:
        _pack_one_word(ids, lookup, is_start, context, pad, order, bits, out)
        return
    word, shift = _slots(order, bits, per_word)
    hist = np.empty(order, np.int64)  # hist[k] = projected id k tokens back
    for k in range(1, order):
        hist[k] = context[context.size - k]
    for i in range(ids.size):
        if is_start[i]:
            for k in range(1, order):
                hist[k] = pad
        hist[0] = lookup[ids[i]]
        for w in range(out.shape[1]):
            out[i, w] = 0
        for k in range(order):
            out[i, word[k]] |= np.uint64(hist[k]) << shift[k]
        out[i, 0] = (out[i, 0] ^ _fold(out, i)) * _KEY_MUL
        for k in range(order - 1, 0, -1):
            hist[k] = hist[k - 1]


@numba.njit(nogil=True, cache=True)
def _unpack_windows(keys, order, bits, per_word, mask, out):
    """Projected ids of stored keys, out[i, k] = the id k tokens back."""
    word, shift = _slots(order, bits, per_word)
    for i in range(keys.shape[0]):
        first = (keys[i, 0] * _KEY_INV) ^ _fold(keys, i)
        for k in range(order):
            value = first if word[k] == 0 else keys[i, word[k]]
            out[i, k] = np.int64((value >> shift[k]) & mask)


@numba.njit(nogil=True, cache=True)
def _mix_keys(keys, order, bits, per_word, mask, multipliers, out):
    """The hasher's pre-modulo mix x[t]*m[0] ^ x[t-1]*m[1] ^ ... of stored keys."""
    word, shift = _slots(order, bits, per_word)
    for i in range(keys.shape[0]):
        first = (keys[i, 0] * _KEY_INV) ^ _fold(keys, i)
        mix = np.int64(0)
        for k in range(order):
            value = first if word[k] == 0 else keys[i, word[k]]
            mix ^= np.int64((value >> shift[k]) & mask) * multipliers[k]
        out[i] = mix


@numba.njit(nogil=True, cache=True)
def _bucket(mix, fmix, size, inverse):
    """mix mod size (floor-mod, as numpy and the hasher take it).

    From 2**13 up the float quotient trunc(mix * (1/size)) is within 2 of the true one, so
    a few branch-free corrections replace a 64-bit division; below, the exact `%`.
    """
    if size < FLOAT_REDUCTION_MIN_PRIME:
        return mix % size
    r = mix - np.int64(fmix * inverse) * size
    r += size & (r >> 63)
    r += size & (r >> 63)
    r -= size & ~((r - size) >> 63)
    return r


@numba.njit(nogil=True, cache=True)
def _add_loads(mix, size, loads):
    inverse = 1.0 / size
    for i in range(mix.size):
        loads[_bucket(mix[i], np.float64(mix[i]), size, inverse)] += 1


@numba.njit(nogil=True, cache=True)
def _flag_collisions(mix, counts, sizes, crowded, byte_offsets, flags, colliding, weighted):
    """Per head, distinct n-grams in a crowded bucket and their occurrences; flags: crowded in all.

    `crowded` holds one bit per bucket (load > 1), so every head's buckets stay in cache.
    """
    inverses = 1.0 / sizes.astype(np.float64)
    for i in range(mix.size):
        every = True
        fmix = np.float64(mix[i])
        for h in range(sizes.size):
            b = _bucket(mix[i], fmix, sizes[h], inverses[h])
            if (crowded[byte_offsets[h] + (b >> 3)] >> (b & 7)) & 1:
                colliding[h] += 1
                weighted[h] += counts[i]
            else:
                every = False
        flags[i] = every


@numba.njit(nogil=True, cache=True)
def _merge_sorted(k1, c1, k2, c2):
    """Two sorted one-word key runs into one, summing the counts of equal keys."""
    keys = np.empty(k1.size + k2.size, np.uint64)
    counts = np.empty(k1.size + k2.size, np.int64)
    i = j = n = 0
    while i < k1.size and j < k2.size:
        if k1[i] < k2[j]:
            keys[n], counts[n] = k1[i], c1[i]
            i += 1
        elif k2[j] < k1[i]:
            keys[n], counts[n] = k2[j], c2[j]
            j += 1
        else:
            keys[n], counts[n] = k1[i], c1[i] + c2[j]
            i += 1
            j += 1
        n += 1
    while i < k1.size:
        keys[n], counts[n] = k1[i], c1[i]
        i += 1
        n += 1
    while j < k2.size:
        keys[n], counts[n] = k2[j], c2[j]
        j += 1
        n += 1
    return keys[:n], counts[:n]


@numba.njit(nogil=True, cache=True)
def _aggregate_rows(keys, counts):
    """Distinct multi-word keys and summed counts, by open addressing (first-seen order)."""
    rows, words = keys.shape
    shift = 63
    capacity = 2
    while capacity < 2 * rows:
        capacity <<= 1
        shift -= 1
    slots = np.full(capacity, -1, np.int64)
    out_keys = np.empty((rows, words), np.uint64)
    out_counts = np.empty(rows, np.int64)
    n = 0
    for i in range(rows):
        s = np.int64((keys[i, 0] * _FOLD_MUL) >> np.uint64(shift))
        while True:
            j = slots[s]
            if j < 0:
                slots[s] = n
                for w in range(words):
                    out_keys[n, w] = keys[i, w]
                out_counts[n] = counts[i]
                n += 1
                break
            same = True
            for w in range(words):
                if out_keys[j, w] != keys[i, w]:
                    same = False
                    break
            if same:
                out_counts[j] += counts[i]
                break
            s = (s + 1) & (capacity - 1)
    return out_keys[:n], out_counts[:n]


@numba.njit(nogil=True, cache=True)
def _value_moments(values, out):
    """Accumulate sum, sum of squares, max |x| of finite values, and the non-finite count."""
    total, squares, peak, bad = out[0], out[1], out[2], out[3]
    for x in values:
        v = np.float64(x)
        if math.isfinite(v):
            total += v
            squares += v * v
            if abs(v) > peak:
                peak = abs(v)
        else:
            bad += 1
    out[0], out[1], out[2], out[3] = total, squares, peak, bad


# ---- keys and key counts ----------------------------------------------------------------------

@dataclass(frozen=True)
class KeyLayout:
    """How an order-n window packs into words: `per_word` ids of `bits` bits in each."""

    order: int
    bits: int

    @property
    def per_word(self) -> int:
        return 64 // self.bits

    @property
    def words(self) -> int:
        return -(-self.order // self.per_word)

    @property
    def mask(self) -> np.uint64:
        return np.uint64((1 << self.bits) - 1)


@dataclass
class KeyCounts:
    """Distinct stored keys of one order and how often each occurred.

    One-word keys are kept sorted (runs merge in linear time); longer keys are not.
    """

    keys: np.ndarray  # (rows, words) uint64
    counts: np.ndarray  # (rows,) int64

    @property
    def rows(self) -> int:
        return int(self.counts.size)

    @property
    def nbytes(self) -> int:
        return int(self.keys.nbytes + self.counts.nbytes)

    @staticmethod
    def empty(words: int) -> KeyCounts:
        return KeyCounts(np.zeros((0, words), np.uint64), np.zeros(0, np.int64))


@dataclass(frozen=True)
class WindowKeys:
    """What turns token ids into stored keys: the projection, the projected pad, the orders."""

    lookup: np.ndarray
    pad: int
    max_order: int
    bits: int

    @staticmethod
    def of(spec: TableSpec, projection: VocabProjection) -> WindowKeys:
        if spec.pad_id >= projection.vocab_size:
            raise EngramError(f"spec pad_id {spec.pad_id} is not below the projection's vocab size "
                              f"{projection.vocab_size}")
        bits = max(1, (projection.compressed_size - 1).bit_length())
        return WindowKeys(projection.lookup, int(projection.lookup[spec.pad_id]), spec.max_ngram_size, bits)

    def layout(self, order: int) -> KeyLayout:
        return KeyLayout(order, self.bits)

    @property
    def orders(self) -> range:
        return range(2, self.max_order + 1)


def count_keys(keys: np.ndarray) -> KeyCounts:
    """Distinct rows of `keys` and how often each occurs."""
    if keys.shape[1] == 1:
        unique, found = np.unique(keys[:, 0], return_counts=True)
        return KeyCounts(unique.reshape(-1, 1), found.astype(np.int64))
    return _aggregate(keys, np.ones(keys.shape[0], np.int64))


def _aggregate(keys: np.ndarray, counts: np.ndarray) -> KeyCounts:
    out_keys, out_counts = _aggregate_rows(np.ascontiguousarray(keys), np.ascontiguousarray(counts))
    return KeyCounts(out_keys.copy(), out_counts.copy())


def map_order(batch: DocBatch, window: WindowKeys, order: int) -> KeyCounts:
    """Distinct windows of one order in a batch of documents, with their counts."""
    layout = window.layout(order)
    ids = batch.ids.astype(np.int64, copy=False)
    is_start = np.zeros(ids.size, np.bool_)
    is_start[batch.starts] = True
    context = np.full(window.max_order - 1, window.pad, np.int64)
    if batch.context.size:
        tail = window.lookup[batch.context[-(window.max_order - 1):]]
        context[context.size - tail.size:] = tail
    out = np.empty((ids.size, layout.words), np.uint64)
    _pack_windows(ids, window.lookup, is_start, context, window.pad, order, layout.bits,
                  layout.per_word, out)
    return count_keys(out)


def split_partitions(part: KeyCounts, bits: int = PARTITION_BITS) -> list[KeyCounts]:
    """A key count split by the top `bits` bits of its keys (contiguous for sorted one-word keys)."""
    first = part.keys[:, 0]
    shift = np.uint64(64 - bits)
    if part.keys.shape[1] == 1:
        bounds = np.searchsorted(first, np.arange(1, 1 << bits, dtype=np.uint64) << shift)
        edges = [0, *bounds.tolist(), part.rows]
        return [KeyCounts(part.keys[a:b], part.counts[a:b]) for a, b in zip(edges[:-1], edges[1:])]
    pid = (first >> shift).astype(np.uint16)
    order = np.argsort(pid, kind="stable")
    edges = np.concatenate([[0], np.cumsum(np.bincount(pid, minlength=1 << bits))])
    keys, counts = part.keys[order], part.counts[order]
    return [KeyCounts(keys[a:b], counts[a:b]) for a, b in zip(edges[:-1], edges[1:])]


def map_part(batch: DocBatch, window: WindowKeys, bits: int = PARTITION_BITS) -> dict[int, list[KeyCounts]]:
    """One part of a corpus to its key counts per order, split into 2**bits partitions."""
    return {n: split_partitions(map_order(batch, window, n), bits) for n in window.orders}


def merge_partition(chunks: list[KeyCounts]) -> KeyCounts:
    """Key counts of one partition from many parts: one row per distinct key, counts summed."""
    words = chunks[0].keys.shape[1] if chunks else 1
    chunks = [c for c in chunks if c.rows]
    if not chunks:
        return KeyCounts.empty(words)
    if words > 1:
        return _aggregate(np.concatenate([c.keys for c in chunks]), np.concatenate([c.counts for c in chunks]))
    runs = []
    for chunk in chunks:
        keys = chunk.keys[:, 0]
        if np.all(keys[1:] > keys[:-1]):
            runs.append((keys, chunk.counts))
        else:  # several runs appended to one spill file
            runs += _sorted_runs(keys, chunk.counts)
    while len(runs) > 1:
        merged = [_merge_sorted(*runs[i], *runs[i + 1]) for i in range(0, len(runs) - 1, 2)]
        runs = merged + runs[len(runs) - len(runs) % 2:]
    keys, counts = runs[0]
    return KeyCounts(keys.reshape(-1, 1).copy(), counts.copy())


def _sorted_runs(keys: np.ndarray, counts: np.ndarray) -> list[tuple[np.ndarray, np.ndarray]]:
    """Split one-word keys into maximal non-decreasing runs, each with equal keys summed."""
    breaks = np.flatnonzero(keys[1:] < keys[:-1]) + 1
    runs = []
    for a, b in zip([0, *breaks.tolist()], [*breaks.tolist(), keys.size]):
        k, c = keys[a:b], counts[a:b]
        starts = np.flatnonzero(np.concatenate([[True], k[1:] != k[:-1]]))
        runs.append((k[starts], np.add.reduceat(c, starts)))
    return runs


def _spill_folder(prefix: str, root: str | Path | None) -> Path:
    try:
        return Path(tempfile.mkdtemp(prefix=prefix, dir=root))
    except OSError as exc:
        raise EngramError(f"cannot create a spill folder in {root or tempfile.gettempdir()}: "
                          f"{exc.strerror or exc}") from None


def _append_file(path: Path, data: np.ndarray) -> None:
    try:
        with open(path, "ab") as handle:
            data.tofile(handle)
    except OSError as exc:
        raise EngramError(f"cannot spill n-gram counts to {path.parent}: {exc.strerror or exc}; "
                          "free some space or point --spill-dir elsewhere") from None


def partition_file(order: int, index: int) -> str:
    return f"order{order}-part{index:04d}.u64"


def _as_rows(part: KeyCounts) -> np.ndarray:
    """Key counts as the rows of a spill file: the key words, then the count."""
    return np.concatenate([part.keys, part.counts.view(np.uint64).reshape(-1, 1)], axis=1)


def read_counts(path: Path, words: int) -> KeyCounts:
    rows = np.fromfile(path, dtype=np.uint64).reshape(-1, words + 1)
    return KeyCounts(np.ascontiguousarray(rows[:, :-1]), rows[:, -1].view(np.int64).copy())


class KeyCountStore:
    """Key counts per order: in memory while they fit the budget, then spilled by partition.

    Chunks are merged in memory first; only when merged counts still take more than half
    the budget do they spill, each partition to its own file of rows (key words, count).
    """

    def __init__(self, window: WindowKeys, memory_budget: int, spill_dir: str | Path | None = None,
                 partition_bits: int = PARTITION_BITS) -> None:
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
        return self._dir is not None

    def add(self, order: int, part: KeyCounts) -> None:
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
            self._dir = _spill_folder("engram-counts-", self._spill_root)
        for order, chunks in self._chunks.items():
            for chunk in chunks:
                for index, part in enumerate(split_partitions(chunk, self.partition_bits)):
                    if part.rows:
                        self._append(self._file(order, index), _as_rows(part))
            self._chunks[order] = []
        self._buffered = 0

    def _append(self, path: Path, rows: np.ndarray) -> None:
        _append_file(path, rows)
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
                        _append_file(directory / partition_file(order, index), _as_rows(piece))

    @classmethod
    def merged_in(cls, window: WindowKeys, budget: int, directory: Path, partition_bits: int,
                  distinct: dict[int, int], occurrences: dict[int, int]) -> KeyCountStore:
        """The finished counts that cluster tasks merged into `directory`, one file a partition:
        read into memory when they fit the budget (as a local run keeps them), else streamed."""
        store = cls(window, budget, partition_bits=partition_bits)
        store._dir = directory
        store.distinct, store.occurrences = dict(distinct), dict(occurrences)
        if sum(p.stat().st_size for p in directory.iterdir()) <= budget:
            for order in window.orders:
                parts = list(store.parts(order)) or [KeyCounts.empty(window.layout(order).words)]
                store._merged[order] = KeyCounts(np.concatenate([p.keys for p in parts]),
                                                 np.concatenate([p.counts for p in parts]))
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
        jobs = [(order, index) for order in self._chunks for index in range(1 << self.partition_bits)
                if self._file(order, index).exists()]
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
        _append_file(tmp, _as_rows(merged))
        tmp.replace(path)
        return merged.rows, int(merged.counts.sum())

    def parts(self, order: int) -> Iterator[KeyCounts]:
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
        for folder in (self._dir, self.cleanup):
            if folder is not None:
                shutil.rmtree(folder, ignore_errors=True)

    def __enter__(self) -> KeyCountStore:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


def count_corpus(batches: Iterable[DocBatch], window: WindowKeys, store: KeyCountStore,
                 pool: ThreadPoolExecutor, on_batch: Callable[[DocBatch], None] | None = None) -> None:
    """Map every batch (orders in parallel, one batch in flight while the next is read) into `store`."""
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


# ---- counting on a Dask cluster --------------------------------------------------------------

def count_part_task(part: CorpusPart, spec: TableSpec, projection: VocabProjection,
                    options: CorpusOptions, budget: int, root: str, name: str, bits: int) -> CorpusSummary:
    """Map: one corpus part to its key counts, saved one file per (order, partition) under
    `root/name`; what was read comes back. A retried task starts its folder afresh."""
    window = WindowKeys.of(spec, projection)
    corpus = Corpus([part.sources[0].path], projection, options, context=spec.max_ngram_size - 1, part=part)
    final, scratch = Path(root) / name, Path(root) / f"{name}.partial"
    shutil.rmtree(scratch, ignore_errors=True)
    with ThreadPoolExecutor(max_workers=cpu_count()) as pool, \
            KeyCountStore(window, budget, root, partition_bits=bits) as store:
        count_corpus(corpus.batches(), window, store, pool)
        store.save_partitions(scratch)
    shutil.rmtree(final, ignore_errors=True)
    scratch.rename(final)
    return corpus.summary


def merge_partition_task(root: str, maps: list[str], order: int, indices: list[int],
                         words: int) -> tuple[int, int]:
    """Reduce: merge partitions `indices` of one order over every map output into
    `root/merged`; returns (distinct keys, occurrences). Only these partitions are in memory."""
    distinct = occurrences = 0
    target = Path(root) / "merged"
    for index in indices:
        name = partition_file(order, index)
        chunks = [read_counts(Path(root) / m / name, words) for m in maps if (Path(root) / m / name).exists()]
        if not chunks:
            continue
        merged = merge_partition(chunks)
        tmp = target / f"{name}.partial"
        tmp.unlink(missing_ok=True)
        _append_file(tmp, _as_rows(merged))
        tmp.replace(target / name)
        distinct += merged.rows
        occurrences += int(merged.counts.sum())
    return distinct, occurrences


def count_on_cluster(client: Any, corpus: Corpus, spec: TableSpec, projection: VocabProjection,
                     window: WindowKeys, budget: int, spill_dir: str | Path | None,
                     on_part: Callable[[], None] | None = None, part_ids: int | None = None) -> KeyCountStore:
    """Map the corpus parts and merge the partitions as Dask tasks; the key counts move only
    between workers through `spill_dir` (a folder every worker sees), never through the client."""
    from .cluster import run_tasks
    from .corpus import ID_BATCH_TOKENS, split_corpus

    workers = max(1, sum(client.nthreads().values()))
    parts = split_corpus(corpus, parts=4 * workers, min_ids=part_ids or ID_BATCH_TOKENS)
    root = _spill_folder("engram-cluster-counts-", spill_dir)
    (root / "merged").mkdir()
    names = [f"map-{i:05d}" for i in range(len(parts))]
    per_worker = max(64 << 20, budget // workers)
    # Enough partitions to keep every worker busy merging, and for one to fit a worker's budget
    # (keys take about 8 bytes per token and order; tokens are about a quarter of the input bytes).
    key_bytes = 2 * corpus.total_bytes * len(window.orders)
    bits = min(PARTITION_BITS, max(1, math.ceil(math.log2(max(4 * workers, key_bytes / per_worker)))))
    group = max(1, (1 << bits) // workers)
    [spec_f, projection_f] = client.scatter([spec, projection], broadcast=True)

    def mapped(_: str, summary: CorpusSummary) -> None:
        corpus.add_summary(summary)
        corpus.bytes_done = min(corpus.total_bytes, corpus.bytes_done + corpus.total_bytes // len(parts))
        if on_part:
            on_part()

    run_tasks(client, count_part_task,
              [(f"count-{p.name}", (p, spec_f, projection_f, corpus.options, per_worker, str(root), n, bits))
               for p, n in zip(parts, names)], on_done=mapped)
    groups = [list(range(a, min(a + group, 1 << bits))) for a in range(0, 1 << bits, group)]
    jobs = [(order, g) for order in window.orders for g in groups]
    results = run_tasks(client, merge_partition_task,
                        [(f"merge-order{order}-parts{g[0]}-{g[-1]}",
                          (str(root), names, order, g, window.layout(order).words)) for order, g in jobs])
    distinct = {n: 0 for n in window.orders}
    occurrences = {n: 0 for n in window.orders}
    for (order, _), (rows, total) in zip(jobs, results):
        distinct[order] += rows
        occurrences[order] += total
    for name in names:
        shutil.rmtree(root / name, ignore_errors=True)
    store = KeyCountStore.merged_in(window, budget, root / "merged", bits, distinct, occurrences)
    store.cleanup = root
    return store


# ---- collision statistics -------------------------------------------------------------------

@dataclass
class HeadStats:
    size: int
    buckets_used: int
    colliding: int
    collision_rate: float
    expected_rate: float
    weighted_rate: float
    max_load: int
    load_histogram: dict[int, int]

    def to_json(self) -> dict[str, Any]:
        return {
            "size": self.size, "buckets_used": self.buckets_used, "colliding": self.colliding,
            "collision_rate": self.collision_rate, "expected_rate": self.expected_rate,
            "weighted_rate": self.weighted_rate, "max_load": self.max_load,
            "load_histogram": {str(k): v for k, v in self.load_histogram.items()},
        }


@dataclass
class OrderStats:
    order: int
    occurrences: int
    distinct: int
    mix_colliding: int
    all_heads_colliding: int
    heads: list[HeadStats]
    top_buckets: list[dict[str, Any]] | None = None

    def mean(self, name: str) -> float:
        return float(np.mean([getattr(h, name) for h in self.heads]))

    def to_json(self) -> dict[str, Any]:
        data = {
            "occurrences": self.occurrences, "distinct": self.distinct,
            "mix_colliding": self.mix_colliding, "all_heads_colliding": self.all_heads_colliding,
            "all_heads_rate": self.all_heads_colliding / self.distinct if self.distinct else 0.0,
            "collision_rate": self.mean("collision_rate"), "expected_rate": self.mean("expected_rate"),
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


def _slices(n: int, pieces: int) -> list[tuple[int, int]]:
    edges = np.linspace(0, n, max(1, pieces) + 1).astype(np.int64)
    return [(int(a), int(b)) for a, b in zip(edges[:-1], edges[1:]) if b > a]


class _CandidateGroups:
    """N-grams crowded in every head, grouped by their mix modulo the lcm of the head sizes.

    Kept in memory while they fit the budget, then spilled by that residue, so that equal
    residues (and equal mixes) always meet in one partition.
    """

    def __init__(self, modulus: int, budget: int, spill_root: str | Path | None, bits: int) -> None:
        self.modulus = modulus
        self.budget = budget
        self.bits = bits
        self._root = spill_root
        self._dir: Path | None = None
        self._held: list[np.ndarray] = []
        self._bytes = 0

    def residue(self, mix: np.ndarray) -> np.ndarray:
        return mix if self.modulus >= MAX_MIX else mix % np.int64(self.modulus)

    def add(self, mix: np.ndarray) -> None:
        if not mix.size:
            return
        self._held.append(mix)
        self._bytes += mix.nbytes
        if self._bytes > self.budget:
            self._spill()

    def _spill(self) -> None:
        if self._dir is None:
            self._dir = _spill_folder("engram-candidates-", self._root)
        mix = np.concatenate(self._held)
        pid = ((self.residue(mix).view(np.uint64) * _KEY_MUL) >> np.uint64(64 - self.bits)).astype(np.uint16)
        order = np.argsort(pid, kind="stable")
        edges = np.concatenate([[0], np.cumsum(np.bincount(pid, minlength=1 << self.bits))])
        for index in np.flatnonzero(np.diff(edges)):
            _append_file(self._dir / f"{int(index):04d}.i64", mix[order[edges[index]:edges[index + 1]]])
        self._held, self._bytes = [], 0

    def _groups(self) -> Iterator[np.ndarray]:
        if self._dir is None:
            if self._held:
                yield np.concatenate(self._held)
            return
        if self._held:
            self._spill()
        for path in sorted(self._dir.iterdir()):
            yield np.fromfile(path, dtype=np.int64)

    def close(self) -> None:
        if self._dir is not None:
            shutil.rmtree(self._dir, ignore_errors=True)

    def __enter__(self) -> _CandidateGroups:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def counts(self) -> tuple[int, int]:
        """(mix_colliding, all_heads_colliding): the same when the lcm exceeds every mix."""
        mix_colliding = all_heads = 0
        for mix in self._groups():
            by_mix = _shared(mix)
            mix_colliding += by_mix
            all_heads += _shared(self.residue(mix)) if self.modulus < MAX_MIX else by_mix
        return mix_colliding, all_heads


def _shared(values: np.ndarray) -> int:
    """How many of `values` equal another one."""
    if values.size < 2:
        return 0
    ordered = np.sort(values)
    same = ordered[1:] == ordered[:-1]
    shared = np.zeros(values.size, np.bool_)
    shared[1:] |= same
    shared[:-1] |= same
    return int(np.count_nonzero(shared))


@dataclass
class OrderInput:
    """The distinct n-grams of one order, with their mix for one layer, pass after pass."""

    store: KeyCountStore
    layout: KeyLayout
    multipliers: np.ndarray
    pool: ThreadPoolExecutor
    _cached: tuple[KeyCounts, np.ndarray] | None = field(default=None, init=False, repr=False)

    def mixes(self, part: KeyCounts) -> np.ndarray:
        out = np.empty(part.rows, np.int64)
        keys = part.keys
        jobs = [self.pool.submit(_mix_keys, keys[a:b], self.layout.order, self.layout.bits,
                                 self.layout.per_word, self.layout.mask, self.multipliers, out[a:b])
                for a, b in _slices(part.rows, cpu_count())]
        for job in jobs:
            job.result()
        return out

    def parts(self) -> Iterator[tuple[KeyCounts, np.ndarray]]:
        single = self.store.single(self.layout.order)
        if single is not None:
            if self._cached is None:
                self._cached = (single, self.mixes(single))
            yield self._cached
            return
        for part in self.store.parts(self.layout.order):
            yield part, self.mixes(part)


def order_statistics(data: OrderInput, sizes: list[int], budget: int, spill_dir: str | Path | None,
                     top: int = 0, decoder: NgramDecoder | None = None) -> OrderStats:
    """Every statistic of one order of one layer at the given head sizes."""
    order = data.layout.order
    distinct, occurrences = data.store.distinct[order], data.store.occurrences[order]
    pool = data.pool
    sizes_arr = np.array(sizes, np.int64)
    offsets = np.concatenate([[0], np.cumsum(sizes_arr)[:-1]]).astype(np.int64)
    loads = np.zeros(int(sizes_arr.sum()), np.int32 if distinct < 2**31 else np.int64)
    for _, mix in data.parts():
        jobs = [pool.submit(_add_loads, mix, int(size), loads[off:off + size])
                for size, off in zip(sizes, offsets.tolist())]
        for job in jobs:
            job.result()

    crowded = [np.packbits(loads[off:off + size] > 1, bitorder="little")
               for size, off in zip(sizes, offsets.tolist())]
    byte_offsets = np.concatenate([[0], np.cumsum([c.size for c in crowded])[:-1]]).astype(np.int64)
    bitmap = np.concatenate(crowded)
    colliding = np.zeros(len(sizes), np.int64)
    weighted = np.zeros(len(sizes), np.int64)
    with _CandidateGroups(math.lcm(*sizes), budget, spill_dir, PARTITION_BITS) as groups:
        for part, mix in data.parts():
            flags = np.empty(mix.size, np.bool_)
            results = []
            for a, b in _slices(mix.size, cpu_count()):
                c, w = np.zeros(len(sizes), np.int64), np.zeros(len(sizes), np.int64)
                results.append((pool.submit(_flag_collisions, mix[a:b], part.counts[a:b], sizes_arr, bitmap,
                                            byte_offsets, flags[a:b], c, w), c, w))
            for job, c, w in results:
                job.result()
                colliding += c
                weighted += w
            groups.add(mix[flags])
        mix_colliding, all_heads = groups.counts()

    heads = []
    for h, (size, off) in enumerate(zip(sizes, offsets.tolist())):
        histogram = np.bincount(loads[off:off + size])
        heads.append(HeadStats(
            size=size, buckets_used=int(size - histogram[0]), colliding=int(colliding[h]),
            collision_rate=float(colliding[h] / distinct) if distinct else 0.0,
            expected_rate=expected_rate(size, distinct),
            weighted_rate=float(weighted[h] / occurrences) if occurrences else 0.0,
            max_load=int(histogram.size - 1),
            load_histogram={int(k): int(v) for k, v in enumerate(histogram) if v},
        ))
    stats = OrderStats(order, occurrences, distinct, mix_colliding, all_heads, heads)
    if top and decoder is not None:
        stats.top_buckets = _top_buckets(data, sizes, offsets, loads, top, decoder)
    return stats


def _top_buckets(data: OrderInput, sizes: list[int], offsets: np.ndarray, loads: np.ndarray,
                 top: int, decoder: NgramDecoder) -> list[dict[str, Any]]:
    """The `top` most crowded buckets over all heads of an order, with their n-grams decoded."""
    chosen: list[tuple[int, int, int]] = []  # (load, head, bucket)
    for h, (size, off) in enumerate(zip(sizes, offsets.tolist())):
        head_loads = loads[off:off + size]
        k = min(top, size)
        idx = np.argpartition(head_loads, size - k)[size - k:]
        chosen += [(int(head_loads[b]), h, int(b)) for b in idx if head_loads[b] > 1]
    chosen = sorted(chosen, key=lambda t: (-t[0], t[1], t[2]))[:top]
    members: dict[tuple[int, int], list[tuple[np.ndarray, np.ndarray]]] = {(h, b): [] for _, h, b in chosen}
    heads = sorted({h for _, h, _ in chosen})
    for part, mix in data.parts():
        for h in heads:
            wanted = np.array([b for _, hh, b in chosen if hh == h], np.int64)
            buckets = mix % np.int64(sizes[h])
            hit = np.flatnonzero(np.isin(buckets, wanted))
            for i in hit:
                members[(h, int(buckets[i]))].append((part.keys[i:i + 1], part.counts[i:i + 1]))
    result = []
    layout = data.layout
    for load, h, b in chosen:
        found = members[(h, b)]
        keys = np.concatenate([k for k, _ in found])
        counts = np.concatenate([c for _, c in found])
        order = np.argsort(-counts, kind="stable")[:TOP_NGRAMS]
        windows = np.empty((order.size, layout.order), np.int64)
        _unpack_windows(np.ascontiguousarray(keys[order]), layout.order, layout.bits, layout.per_word,
                        layout.mask, windows)
        result.append({
            "head": h, "size": sizes[h], "bucket": b, "load": load,
            "ngrams": [decoder.ngram(w[::-1], int(c)) for w, c in zip(windows, counts[order])],
        })
    return result


class NgramDecoder:
    """Canonical ids back to text, through the first tokenizer id of each canonical id."""

    def __init__(self, projection: VocabProjection) -> None:
        lookup = projection.lookup
        self._first = np.full(projection.compressed_size, -1, np.int64)
        self._first[lookup[::-1]] = np.arange(lookup.size - 1, -1, -1)
        try:
            self._tokenizer = projection.tokenizer()
        except EngramError:
            self._tokenizer = None
        self._cache: dict[int, str] = {}

    def token(self, canonical: int) -> str:
        if canonical not in self._cache:
            raw = int(self._first[canonical])
            self._cache[canonical] = (f"#{canonical}" if self._tokenizer is None else
                                      self._tokenizer.decode([raw], skip_special_tokens=False))
        return self._cache[canonical]

    def ngram(self, window: np.ndarray, count: int) -> dict[str, Any]:
        tokens = [self.token(int(c)) for c in window]
        return {"ids": [int(c) for c in window], "tokens": tokens, "text": "".join(tokens), "count": count}


# ---- table health ---------------------------------------------------------------------------

@dataclass
class TableHealth:
    """Value statistics of every head of a store, with its layout and bytes on disk."""

    store: str
    dtype: str
    complete: bool
    layers: dict[int, dict[str, Any]]
    verify: dict[str, Any] | None = None

    def to_json(self) -> dict[str, Any]:
        return {"store": self.store, "dtype": self.dtype, "complete": self.complete,
                "layers": {str(k): v for k, v in self.layers.items()}, "verify": self.verify}


def _head_values(store: Any, layer_id: int, missing: set[tuple[int, int]],
                 on_rows: Callable[[int], None] | None) -> list[dict[str, Any]]:
    """Mean, std, max |x| and non-finite count of every head, reading the layer shard by shard."""
    sizes = store.head_sizes(layer_id)
    offsets = store.offsets(layer_id)
    per_order = store.spec.n_head_per_ngram
    moments = np.zeros((len(sizes), 4), np.float64)
    unread = np.zeros(len(sizes), np.int64)
    for index, (start, stop) in enumerate(store.shard_ranges(layer_id)):
        rows = None if (layer_id, index) in missing else store.read_rows(layer_id, start, stop)
        for h, (size, off) in enumerate(zip(sizes, offsets)):
            a, b = max(start, off), min(stop, off + size)
            if a >= b:
                continue
            if rows is None:
                unread[h] += b - a
                continue
            block = rows[a - start:b - start]
            if block.dtype != np.float32:
                block = block.astype(np.float32)
            _value_moments(block.reshape(-1), moments[h])
        if on_rows:
            on_rows(stop - start)
    dim = store.spec.dim
    heads = []
    for h, (size, off) in enumerate(zip(sizes, offsets)):
        total, squares, peak, bad = moments[h]
        finite = (size - unread[h]) * dim - bad
        mean = total / finite if finite else None
        std = math.sqrt(max(0.0, squares / finite - mean * mean)) if finite else None
        heads.append({
            "order": 2 + h // per_order, "head": h % per_order, "offset": off, "size": size,
            "mean": mean, "std": std, "max_abs": float(peak), "nonfinite": int(bad),
            "unread_rows": int(unread[h]),
        })
    return heads


def table_health(store: Any, verify: bool = False, on_rows: Callable[[int], None] | None = None) -> TableHealth:
    checked = None
    if verify:
        checked = store.verify().to_json()
    layers = {}
    missing = store.missing_shards()
    absent = set(missing)
    for layer_id in store.layer_ids:
        table = store.table(layer_id)
        layers[layer_id] = {
            "rows": store.layout(layer_id).rows, "dim": store.spec.dim,
            "bytes_on_disk": int(table.nbytes_stored()),
            "shard_plan": store.layout(layer_id).to_json(),
            "missing_shards": [index for layer, index in missing if layer == layer_id],
            "heads": _head_values(store, layer_id, absent, on_rows),
        }
    return TableHealth(store.path, store.dtype, store.is_complete and not missing, layers, checked)


# ---- the inspect job --------------------------------------------------------------------------

@dataclass
class SweepPoint:
    factor: float
    spec: TableSpec
    layers: LayerStats

    def to_json(self) -> dict[str, Any]:
        return {
            "factor": self.factor, "rows": self.spec.total_rows, "parameters": self.spec.parameters,
            "bytes": self.spec.parameters * DTYPE_BYTES[self.spec.dtype],
            "layers": _layers_json(self.layers),
        }


def _layers_json(layers: LayerStats) -> dict[str, Any]:
    return {str(layer): {"orders": {str(n): s.to_json() for n, s in orders.items()}}
            for layer, orders in layers.items()}


@dataclass
class InspectReport:
    """What `engram inspect` found: collision statistics, the size sweep, table health."""

    source: str
    spec: TableSpec
    projection: VocabProjection
    corpus: CorpusSummary | None = None
    layers: LayerStats | None = None
    sweep: list[SweepPoint] | None = None
    tables: TableHealth | None = None
    spilled_bytes: int = 0
    seconds: float = 0.0
    plot: str | None = None

    def to_json(self) -> dict[str, Any]:
        corpus = None
        if self.corpus is not None:
            corpus = {**self.corpus.to_json(), "spilled_bytes": self.spilled_bytes,
                      "seconds": self.seconds, "warnings": self.corpus.warnings()}
        return {
            "source": self.source,
            "spec": self.spec.to_dict(),
            "projection": {"fingerprint": self.projection.fingerprint(),
                           "vocab_size": self.projection.vocab_size,
                           "compressed_size": self.projection.compressed_size},
            "corpus": corpus,
            "layers": None if self.layers is None else _layers_json(self.layers),
            "sweep": None if self.sweep is None else [p.to_json() for p in self.sweep],
            "tables": None if self.tables is None else self.tables.to_json(),
            "plot": self.plot,
        }

    def render(self, console: Console) -> None:
        if self.tables is not None:
            _render_tables(self.tables, console)
        if self.corpus is not None:
            _render_corpus(self, console)
        if self.layers is not None:
            _render_layers(self.spec, self.layers, console)
            if any(s.top_buckets is not None for orders in self.layers.values() for s in orders.values()):
                _render_top(self.layers, console)
        if self.sweep:
            _render_sweep(self.sweep, console)
        if self.plot:
            console.print(f"wrote {self.plot}")


def _pct(x: float) -> str:
    return f"{100 * x:.3f}%" if x < 0.01 else f"{100 * x:.2f}%"


def _plural(count: int, word: str) -> str:
    return f"{count:,} {word}{'' if count == 1 else 's'}"


def _render_corpus(report: InspectReport, console: Console) -> None:
    c = report.corpus
    assert c is not None
    text = f", {human_bytes(c.text_bytes)} of text tokenized" if c.text_bytes else ""
    spilled = f"; spilled {human_bytes(report.spilled_bytes)} to disk" if report.spilled_bytes else ""
    console.print(f"[bold]corpus[/]: {_plural(c.files, 'file')}, {_plural(c.documents, 'document')}, "
                  f"{_plural(c.tokens, 'token')}{text}; {report.seconds:.1f} s{spilled}")
    for note in c.warnings():
        console.print(f"[yellow]warning[/]: {note}")


def _render_layers(spec: TableSpec, layers: LayerStats, console: Console) -> None:
    table = Table(title=f"Collisions at the head sizes of {spec.name}")
    for column in ("layer", "n", "distinct", "per head", "ideal", "windows", "max load", "all heads", "mix"):
        table.add_column(column, justify="right")
    for layer, orders in layers.items():
        for n, s in orders.items():
            table.add_row(str(layer), str(n), f"{s.distinct:,}", _pct(s.mean("collision_rate")),
                          _pct(s.mean("expected_rate")), _pct(s.mean("weighted_rate")),
                          str(max(h.max_load for h in s.heads)), f"{s.all_heads_colliding:,}",
                          f"{s.mix_colliding:,}")
    console.print(table)
    console.print("per head: distinct n-grams that share their bucket (mean over heads); ideal: the same "
                  "under uniform hashing; windows: share of occurrences whose n-gram collides; all heads, "
                  "mix: n-grams that collide with one same n-gram in every head, or in the mix itself",
                  style="dim")


def _render_top(layers: LayerStats, console: Console) -> None:
    rows = [(layer, n, b) for layer, orders in layers.items() for n, s in orders.items()
            for b in (s.top_buckets or [])]
    if not rows:
        console.print("--top: no bucket holds more than one distinct n-gram")
        return
    table = Table(title="Most crowded buckets (n-gram x occurrences)")
    for column in ("layer", "n", "head", "bucket", "load"):
        table.add_column(column, justify="right")
    table.add_column("n-grams")
    for layer, n, b in rows:
        shown = ", ".join(f"{''.join(g['tokens'])!r} x{g['count']:,}" for g in b["ngrams"][:TOP_SHOWN])
        more = b["load"] - min(len(b["ngrams"]), TOP_SHOWN)
        table.add_row(str(layer), str(n), str(b["head"]), f"{b['bucket']:,}", str(b["load"]),
                      shown + (f", +{more} more" if more > 0 else ""))
    console.print(table)


def _render_sweep(sweep: list[SweepPoint], console: Console) -> None:
    table = Table(title="Size sweep: every head size scaled (means over layers and heads)")
    for column in ("n", "factor", "head size", "tables", "per head", "ideal", "windows", "all heads"):
        table.add_column(column, justify="right")
    orders = sorted({n for p in sweep for o in p.layers.values() for n in o})
    for n in orders:
        for point in sweep:
            stats = [o[n] for o in point.layers.values()]
            sizes = [h.size for s in stats for h in s.heads]
            table.add_row(
                str(n), f"{point.factor:g}x", f"{int(np.mean(sizes)):,}",
                human_bytes(point.spec.parameters * DTYPE_BYTES[point.spec.dtype]),
                _pct(np.mean([s.mean("collision_rate") for s in stats])),
                _pct(np.mean([s.mean("expected_rate") for s in stats])),
                _pct(np.mean([s.mean("weighted_rate") for s in stats])),
                f"{sum(s.all_heads_colliding for s in stats):,}")
        table.add_section()
    console.print(table)


def _render_tables(health: TableHealth, console: Console) -> None:
    console.print(f"[bold]tables[/]: {health.store} ({health.dtype}, "
                  f"{'complete' if health.complete else '[red]incomplete[/]'})")
    if health.verify is not None:
        console.print(f"verified {health.verify['shards']} shards, {human_bytes(health.verify['bytes'])}: "
                      "every checksum matches")
    table = Table(title="Table health per head")
    for column in ("layer", "order", "head", "rows", "mean", "std", "max |x|", "non-finite"):
        table.add_column(column, justify="right")
    for layer, info in health.layers.items():
        for h in info["heads"]:
            bad = h["nonfinite"]
            mean, std = ("-", "-") if h["mean"] is None else (f"{h['mean']:+.4f}", f"{h['std']:.4f}")
            rows = f"{h['size']:,}" if not h["unread_rows"] else f"{h['size'] - h['unread_rows']:,}/{h['size']:,}"
            table.add_row(str(layer), str(h["order"]), str(h["head"]), rows, mean, std,
                          f"{h['max_abs']:.4f}", f"[red]{bad:,}[/]" if bad else "0")
    console.print(table)
    layout = Table(title="Table layout")
    for column in ("layer", "rows", "dim", "on disk", "shards", "shard rows", "ranks", "missing"):
        layout.add_column(column, justify="right")
    for layer, info in health.layers.items():
        plan = info["shard_plan"]
        missing = len(info["missing_shards"])
        layout.add_row(str(layer), f"{info['rows']:,}", str(info["dim"]), human_bytes(info["bytes_on_disk"]),
                       str(plan["shards"]), f"{plan['shard_rows']:,}", str(len(plan["partition"])),
                       f"[red]{missing}[/]" if missing else "0")
    console.print(layout)


def parse_factors(text: str) -> list[float]:
    """`--sweep 1,2,5,10` as positive factors, in the order given, without repeats."""
    factors: list[float] = []
    for piece in text.split(","):
        try:
            value = float(piece)
        except ValueError:
            raise EngramError(f"--sweep takes comma-separated positive numbers, got {piece.strip()!r}") from None
        if not math.isfinite(value) or value <= 0:
            raise EngramError(f"--sweep factors must be positive, got {piece.strip()!r}")
        if value not in factors:
            factors.append(value)
    return factors


def default_memory_budget() -> int:
    """A quarter of the memory available now, between 256 MiB and 8 GiB."""
    import psutil

    return int(min(8 << 30, max(256 << 20, psutil.virtual_memory().available // 4)))


def _resolve(source: str, projection: str | Path | None) -> tuple[TableSpec, VocabProjection, Any]:
    """Spec, projection and (for a STORE) the opened store of the command's first argument."""
    path = Path(source)
    if path.is_dir():
        from .store import open_tables

        store = open_tables(path, allow_incomplete=True)
        stored = store.projection
        if projection is not None:
            given = resolve_projection(projection)
            if given.fingerprint() != stored.fingerprint():
                raise EngramError(f"projection {projection} does not match the one store {source} was built "
                                  f"with (fingerprints {given.fingerprint()[:12]} and {stored.fingerprint()[:12]})")
        return store.spec, stored, store
    return load_spec(source), resolve_projection(projection), None


def collision_statistics(spec: TableSpec, projection: VocabProjection, corpus: Corpus | Iterable[DocBatch], *,
                         factors: list[float] | None = None, top: int = 0,
                         memory_budget: int | None = None, spill_dir: str | Path | None = None,
                         on_batch: Callable[[DocBatch | None], None] | None = None,
                         on_statistic: Callable[[], None] | None = None, client: Any = None,
                         part_ids: int | None = None
                         ) -> tuple[LayerStats, list[SweepPoint] | None, int]:
    """Statistics at the spec's sizes and at every sweep factor, and the bytes spilled to disk.

    `corpus` is a `Corpus` or any iterable of `DocBatch` (documents of raw token ids).
    `on_statistic` is called after each (layer, order, size) is done. With a Dask `client`
    (and a `Corpus`), counting is mapped over corpus parts and merged by partition on the
    cluster (`part_ids`: the smallest range of a pre-tokenized file one task reads).
    """
    budget = memory_budget or default_memory_budget()
    window = WindowKeys.of(spec, projection)
    decoder = NgramDecoder(projection) if top else None
    scaled = [(f, spec if f == 1 else spec.scaled(f)) for f in (factors or [])]
    if client is not None:
        counts = count_on_cluster(client, corpus, spec, projection, window, budget, spill_dir,
                                  (lambda: on_batch(None)) if on_batch else None, part_ids)
    else:
        counts = KeyCountStore(window, budget, spill_dir)
    with ThreadPoolExecutor(max_workers=cpu_count()) as pool, counts as store:
        if client is None:
            count_corpus(corpus.batches() if isinstance(corpus, Corpus) else corpus, window, store, pool,
                         on_batch)
        if not store.occurrences[2]:
            detail = ""
            if isinstance(corpus, Corpus):
                read = corpus.summary
                detail = f" ({_plural(read.files, 'file')} read" + (
                    f", {_plural(read.skipped_binary, 'binary file')} skipped" if read.skipped_binary else "") + ")"
            raise EngramError(f"the corpus holds no tokens{detail}")
        layers: LayerStats = {}
        sweep_layers: list[LayerStats] = [{} for _ in scaled]
        for layer in spec.layer_ids:
            layers[layer] = {}
            for point in sweep_layers:
                point[layer] = {}
            for n in spec.orders:
                data = OrderInput(store, window.layout(n), spec.multipliers(layer, projection.compressed_size), pool)
                span = slice((n - 2) * spec.n_head_per_ngram, (n - 1) * spec.n_head_per_ngram)
                base = order_statistics(data, spec.head_sizes(layer)[span], budget, spill_dir, top, decoder)
                layers[layer][n] = base
                if on_statistic:
                    on_statistic()
                # A scaled spec keeps seed, layers and vocab, hence the multipliers: only sizes change.
                for (_, other), point in zip(scaled, sweep_layers):
                    if other is spec:
                        point[layer][n] = OrderStats(base.order, base.occurrences, base.distinct,
                                                     base.mix_colliding, base.all_heads_colliding, base.heads)
                        continue
                    point[layer][n] = order_statistics(data, other.head_sizes(layer)[span], budget, spill_dir)
                    if on_statistic:
                        on_statistic()
        spilled = store.spilled_bytes
    sweep = [SweepPoint(f, other, point) for (f, other), point in zip(scaled, sweep_layers)] if factors else None
    return layers, sweep, spilled


def inspect(source: str, *, projection: str | Path | None = None, corpus: list[str | Path] | None = None,
            options: CorpusOptions | None = None, sweep: list[float] | None = None,
            plot: str | Path | None = None, top: int = 0, verify: bool = False,
            memory_budget: int | None = None, spill_dir: str | Path | None = None,
            show_progress: bool = True, scheduler: str | None = None,
            dask_workers: int | None = None, part_ids: int | None = None) -> InspectReport:
    """The whole `engram inspect` job: table health of a STORE, collision statistics on a corpus.

    With `scheduler` or `dask_workers` the corpus is counted on a Dask cluster (see
    `count_on_cluster`); the numbers are the same to the last count.
    """
    from .cluster import dask_client
    from .report import progress

    spec, proj, store = _resolve(source, projection)
    if verify and store is None:
        raise EngramError("--verify needs a table store, not a spec")
    if store is None and not corpus:
        raise EngramError("nothing to inspect: a spec has no tables, so give --corpus PATH for collision "
                          "statistics (or pass a table store)")
    if (sweep or plot or top) and not corpus:
        raise EngramError("--sweep, --plot and --top describe collisions: give --corpus PATH")
    if plot is not None:
        plot = Path(plot)
        if plot.is_dir() or not plot.parent.is_dir():
            raise EngramError(f"cannot write the plot to {plot}: give a file in an existing folder")
    report = InspectReport(source=str(source), spec=spec, projection=proj)
    bar = progress(transient=True) if show_progress else None
    with bar if bar is not None else contextlib.nullcontext():
        if store is not None:
            rows = sum(store.layout(layer).rows for layer in store.layer_ids)
            task = bar.add_task("table health", total=rows) if bar is not None else None
            report.tables = table_health(
                store, verify, (lambda n: bar.advance(task, n)) if bar is not None else None)
        if corpus:
            started = time.perf_counter()
            reader = Corpus(list(corpus), proj, options, context=spec.max_ngram_size - 1)
            steps = len(spec.layer_ids) * len(spec.orders) * (1 + sum(f != 1 for f in sweep or []))
            reading = bar.add_task("reading corpus (bytes)", total=max(1, reader.total_bytes)) if bar else None
            counting = bar.add_task("collision statistics", total=steps) if bar else None

            def advance(_: DocBatch | None) -> None:
                if bar is not None:
                    bar.update(reading, completed=reader.bytes_done)

            def step() -> None:
                if bar is not None:
                    bar.update(reading, completed=reader.total_bytes)
                    bar.advance(counting)

            with dask_client(scheduler, dask_workers) as client:
                layers, points, spilled = collision_statistics(
                    spec, proj, reader, factors=sweep, top=top, memory_budget=memory_budget,
                    spill_dir=spill_dir, on_batch=advance, on_statistic=step, client=client,
                    part_ids=part_ids)
            report.corpus, report.layers, report.sweep = reader.summary, layers, points
            report.spilled_bytes, report.seconds = spilled, time.perf_counter() - started
    if plot is not None:
        from .plot import draw_collisions

        draw_collisions(report, plot)
        report.plot = str(plot)
    return report

