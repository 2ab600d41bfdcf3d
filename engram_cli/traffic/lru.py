"""Hit rates of an LRU cache of rows, from reuse (stack) distances, exact or SHARDS-sampled.

An LRU cache of k rows hits a lookup exactly when fewer than k distinct other rows were read
since the row's previous lookup (its reuse distance; Mattson's stack property), so one pass over
the lookup stream gives the hit rate of every cache size at once. The distance is counted with a
Fenwick tree over access times holding a mark at each row's last access: the marks after the
row's previous access are the distinct rows read since. Times are renumbered (compacted) when they
reach the tree's end, so memory follows the rows tracked, not the stream's length.

At scale, rows are sampled spatially in the manner of SHARDS (Waldspurger et al., FAST 2015): a
row is tracked when hash(row) mod P < T, the same rows throughout, so a sampled row keeps every
one of its lookups; reuse distances measured among sampled rows, divided by the rate R = T / P,
estimate the full distances. The rate is chosen so the sampled rows fit the memory given (rate 1,
exact, when the layer's rows fit). The tests measure the sampled curve against the exact one.
"""

from __future__ import annotations

import numba
import numpy as np

from ..kernels import buckets

# The sampling modulus P: a row is sampled when the low bits of its hash are below T.
SAMPLE_MODULUS = 1 << 24

# Tokens whose rows are computed at once, head by head, before the sampled ones are tracked.
FEED_BLOCK = 1024

# Bytes of memory per tracked row: up to four hash-table slots of (row, time) and Fenwick entries.
TRACKED_ROW_BYTES = 96

# The fewest rows a sampled curve tracks (1.5 MiB): on 8 M lookups of the demo spec, 40 K sampled
# rows were within 0.008 of the exact curve, 4 K within 0.028, 400 within 0.049.
MIN_TRACKED = 1 << 14

_EMPTY = -1


@numba.njit(nogil=True, cache=True)
def _mix64(x):
    """splitmix64's finalizer: the row's sampling hash (uniform low bits)."""
    z = np.uint64(x) + np.uint64(0x9E3779B97F4A7C15)
    z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return z ^ (z >> np.uint64(31))


@numba.njit(nogil=True, cache=True)
def _tree_add(tree, i, v):
    i += 1
    while i < tree.size:
        tree[i] += v
        i += i & -i


@numba.njit(nogil=True, cache=True)
def _tree_prefix(tree, i):
    """Marks at times 0 .. i."""
    s = 0
    i += 1
    while i > 0:
        s += tree[i]
        i -= i & -i
    return s


@numba.njit(nogil=True, cache=True)
def _compact(keys, times, tree, live):
    """Renumber the live rows' last-access times 0 .. live-1 in order; rebuild the tree."""
    slots = np.flatnonzero(keys != _EMPTY)
    order = np.argsort(times[slots])
    for rank in range(slots.size):
        times[slots[order[rank]]] = rank
    tree[:] = 0
    for t in range(live):
        _tree_add(tree, t, 1)
    return live


@numba.njit(nogil=True, cache=True)
def _sampled(row, threshold):
    """Whether SHARDS tracks `row`: the low bits of its hash below the threshold."""
    return threshold >= SAMPLE_MODULUS or np.int64(_mix64(row) & np.uint64(SAMPLE_MODULUS - 1)) < threshold


@numba.njit(nogil=True, cache=True)
def _track(row, limits, keys, times, tree, meta, hits):
    """One lookup of a sampled `row`: its reuse distance counted at every cache size, its last
    access moved to now. meta = [now, live rows, sampled lookups]."""
    if meta[0] >= tree.size - 1:
        meta[0] = _compact(keys, times, tree, meta[1])
    mask = keys.size - 1
    slot = np.int64(_mix64(row ^ 0x5BD1E995) & np.uint64(mask))
    while keys[slot] != _EMPTY and keys[slot] != row:
        slot = (slot + 1) & mask
    meta[2] += 1
    if keys[slot] == row:
        previous = times[slot]
        distance = meta[1] - _tree_prefix(tree, previous)  # distinct rows read since
        for k in range(limits.size):
            if distance < limits[k]:
                hits[k] += 1
        _tree_add(tree, previous, -1)
    else:
        keys[slot] = row
        meta[1] += 1
    times[slot] = meta[0]
    _tree_add(tree, meta[0], 1)
    meta[0] += 1


@numba.njit(nogil=True, cache=True)
def _feed_rows(rows, threshold, limits, keys, times, tree, meta, hits):
    for i in range(rows.size):
        if _sampled(rows[i], threshold):
            _track(rows[i], limits, keys, times, tree, meta, hits)


@numba.njit(nogil=True, cache=True)
def _sample_flags(rows, threshold, out):
    """`_sampled` of every row into `out` (a loop the compiler vectorizes)."""
    for i in range(rows.size):
        out[i] = np.int64(_mix64(rows[i]) & np.uint64(SAMPLE_MODULUS - 1)) < threshold


@numba.njit(nogil=True, cache=True)
def _feed_mixes(mixes, orders, sizes, offsets, threshold, limits, keys, times, tree, meta, hits):
    """The lookups of tokens given by their mixes (mixes[o, t]: the window of order index o ending
    at token t), token by token, head by head (head h reads mixes[orders[h]] modulo sizes[h], plus
    offsets[h]). A block of tokens at a time, head-major: rows and sampling flags in loops the
    compiler vectorizes, then the sampled lookups tracked in order."""
    heads = sizes.size
    rows = np.empty((heads, FEED_BLOCK), np.int64)
    flags = np.empty((heads, FEED_BLOCK), np.bool_)
    every = threshold >= SAMPLE_MODULUS
    for lo in range(0, mixes.shape[1], FEED_BLOCK):
        n = min(FEED_BLOCK, mixes.shape[1] - lo)
        for h in range(heads):
            buckets(mixes[orders[h], lo : lo + n], sizes[h], rows[h, :n])
            rows[h, :n] += offsets[h]
            if not every:
                _sample_flags(rows[h, :n], threshold, flags[h, :n])
        for t in range(n):
            for h in range(heads):
                if every or flags[h, t]:
                    _track(rows[h, t], limits, keys, times, tree, meta, hits)


def sample_threshold(rows: int, memory: int) -> int:
    """T of the rate T / SAMPLE_MODULUS at which about `rows` rows, sampled, fit `memory` bytes
    (SAMPLE_MODULUS, every row, when they all fit); never fewer than MIN_TRACKED rows, whatever
    the memory (the error grows as the rows sampled shrink)."""
    fits = max(MIN_TRACKED, memory // TRACKED_ROW_BYTES)
    if rows <= fits:
        return SAMPLE_MODULUS
    return max(1, fits * SAMPLE_MODULUS // rows)


class LruCurve:
    """One layer's LRU hit counts at a list of cache sizes (rows), fed its lookups in order.

    The tracker is sized once for the rows that can be sampled (all `universe` rows at rate 1;
    else the expected count and a margin of 8 standard deviations), so it never grows.

    Args:
        cache_rows: the cache sizes, in rows.
        universe: rows of the layer (row ids are below it).
        threshold: the sampling threshold T (rate T / SAMPLE_MODULUS; SAMPLE_MODULUS is exact).
    """

    def __init__(self, cache_rows: list[int], universe: int, threshold: int = SAMPLE_MODULUS) -> None:
        self.threshold = int(min(max(1, threshold), SAMPLE_MODULUS))
        self.rate = self.threshold / SAMPLE_MODULUS
        self.cache_rows = list(cache_rows)
        # a sampled distance d stands for d / rate: a hit when d / rate < k
        self.limits = np.array([k * self.rate for k in self.cache_rows], np.float64)
        self.hits = np.zeros(len(self.cache_rows), np.int64)
        self.meta = np.zeros(3, np.int64)
        expected = universe * self.rate
        bound = universe if self.rate == 1 else min(universe, int(expected + 8 * expected**0.5 + 64))
        slots = 1 << max(4, (2 * bound).bit_length())
        self.keys = np.full(slots, _EMPTY, np.int64)
        self.times = np.zeros(slots, np.int64)
        self.tree = np.zeros(slots + 1, np.int64)

    def feed(self, rows: np.ndarray) -> None:
        """The next lookups of the layer, in order (int64 row ids)."""
        rows = np.ascontiguousarray(rows, np.int64).reshape(-1)
        _feed_rows(rows, self.threshold, self.limits, self.keys, self.times, self.tree, self.meta, self.hits)

    def feed_mixes(self, mixes: np.ndarray, orders: np.ndarray, sizes: np.ndarray, offsets: np.ndarray) -> None:
        """The next tokens' lookups, from their windows' mixes (see `_feed_mixes`)."""
        _feed_mixes(
            mixes,
            orders,
            sizes,
            offsets,
            self.threshold,
            self.limits,
            self.keys,
            self.times,
            self.tree,
            self.meta,
            self.hits,
        )

    def hit_rates(self) -> list[float]:
        """Hit rate at each cache size: hits among the sampled lookups."""
        sampled = int(self.meta[2])
        return [float(h / sampled) if sampled else 0.0 for h in self.hits]
