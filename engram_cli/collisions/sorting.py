"""Sorted runs of distinct keys and their counts: a buffer of keys sorted in place, runs merged.

A run is rows of key words in lexicographic order (word 0, a hash of the whole window, first),
each distinct key once, with its count. A buffer of raw keys becomes a run in place
(`sort_and_count`: one-word keys by numpy's sort; longer keys by a counting sort on the top bits
of word 0, then small sorts that stay in cache), and runs merge pairwise in linear passes
(`merge_runs`). Word 0 is spread evenly, so any range of it cuts every run into pieces of about
proportional size (which `runs` merges one range at a time).
"""

from __future__ import annotations

import math

import numba
import numpy as np

from .keys import KeyCounts

# Rows per group of the counting sort of multi-word keys: each group then sorts in cache.
SORT_GROUP_ROWS = 1 << 14


@numba.njit(nogil=True, cache=True)
def _compare(a, i, b, j):
    """-1, 0 or 1 as row a[i] is below, equal to or above row b[j] (lexicographic)."""
    for w in range(a.shape[1]):
        x = a[i, w]
        y = b[j, w]
        if x < y:
            return -1
        if x > y:
            return 1
    return 0


@numba.njit(nogil=True, cache=True, inline="always")
def _copy_row(src, i, dst, n):
    """dst[n] = src[i], word by word (no temporary slice)."""
    for w in range(src.shape[1]):
        dst[n, w] = src[i, w]


@numba.njit(nogil=True, cache=True)
def _count_sorted_1(keys, n, counts):
    """Sorted one-word keys[:n] to their distinct keys (moved to the front) and counts; returns how many."""
    if n == 0:
        return 0
    d = 0
    current = keys[0]
    run = 1
    for i in range(1, n):
        x = keys[i]
        if x == current:
            run += 1
        else:
            keys[d] = current
            counts[d] = run
            d += 1
            current = x
            run = 1
    keys[d] = current
    counts[d] = run
    return d + 1


@numba.njit(nogil=True, cache=True)
def _group_by_top_bits(keys, n, bits, out, edges):
    """Rows keys[:n] into out[:n] grouped by the top `bits` (>= 1) bits of word 0, in group order
    (a counting sort); rows edges[g] .. edges[g + 1] are group g."""
    groups = 1 << bits
    shift = np.uint64(64 - bits)
    edges[:] = 0
    for i in range(n):
        edges[np.int64(keys[i, 0] >> shift) + 1] += 1
    for g in range(groups):
        edges[g + 1] += edges[g]
    fill = edges[:groups].copy()
    for i in range(n):
        group = np.int64(keys[i, 0] >> shift)
        j = fill[group]
        _copy_row(keys, i, out, j)
        fill[group] = j + 1


@numba.njit(nogil=True, cache=True)
def _sort_rows(rows, lo, hi, scratch):
    """Sort rows[lo:hi] lexicographically (multi-word keys): by word 0, then the rest."""
    n = hi - lo
    order = np.argsort(rows[lo:hi, 0])
    for i in range(n):
        for w in range(rows.shape[1]):
            scratch[i, w] = rows[lo + order[i], w]
    i = 0
    while i < n:  # equal word 0: almost always the same key; insertion sort by the other words
        j = i + 1
        while j < n and scratch[j, 0] == scratch[i, 0]:
            j += 1
        for a in range(i + 1, j):
            b = a
            while b > i and _compare(scratch, b - 1, scratch, b) > 0:
                for w in range(scratch.shape[1]):
                    t = scratch[b, w]
                    scratch[b, w] = scratch[b - 1, w]
                    scratch[b - 1, w] = t
                b -= 1
        i = j
    for i in range(n):
        for w in range(rows.shape[1]):
            rows[lo + i, w] = scratch[i, w]


@numba.njit(nogil=True, cache=True)
def _count_sorted_rows(rows, n, keys_out, counts_out):
    """Distinct rows of sorted rows[:n] into keys_out and how often each occurs into counts_out;
    returns how many. counts_out may share memory with rows: count d is written after row d is read."""
    d = 0
    i = 0
    while i < n:
        j = i + 1
        while j < n and _compare(rows, j, rows, i) == 0:
            j += 1
        _copy_row(rows, i, keys_out, d)
        counts_out[d] = j - i
        d += 1
        i = j
    return d


def sort_and_count(buffer: np.ndarray, n: int, scratch: np.ndarray | None = None) -> KeyCounts:
    """The raw keys buffer[:n] as a sorted run: distinct keys, in place at the front of `buffer`,
    and their counts, at the front of `scratch`. No other memory of that size is taken.

    Args:
        buffer: (capacity, words) uint64 raw keys.
        n: how many rows of it hold keys.
        scratch: a flat uint64 array of at least n * words words, reused from run to run
            (allocated when None).
    """
    words = buffer.shape[1]
    if scratch is None:
        scratch = np.empty(n * words, np.uint64)
    counts = scratch.view(np.int64)
    if words == 1:
        column = buffer[:n, 0]
        column.sort()
        d = int(_count_sorted_1(column, n, counts))
        return KeyCounts(buffer[:d], counts[:d])
    grouped = scratch[: n * words].reshape(n, words)
    bits = int(min(16, max(1, math.ceil(math.log2(max(2, n / SORT_GROUP_ROWS))))))
    edges = np.zeros((1 << bits) + 1, np.int64)
    _group_by_top_bits(buffer, n, bits, grouped, edges)
    bounds = edges.tolist()
    tmp = np.empty((int(np.diff(edges).max()) if n else 0, words), np.uint64)
    for lo, hi in zip(bounds[:-1], bounds[1:]):
        if hi - lo > 1:
            _sort_rows(grouped, lo, hi, tmp)
    d = int(_count_sorted_rows(grouped, n, buffer, counts))
    return KeyCounts(buffer[:d], counts[:d])


@numba.njit(nogil=True, cache=True)
def _merge_two_1(k1, c1, a1, b1, k2, c2, a2, b2, ok, oc, n):
    """Merge sorted one-word runs k1[a1:b1] and k2[a2:b2] into ok/oc from index n, summing the
    counts of equal keys; returns the index after the last written."""
    i = a1
    j = a2
    while i < b1 and j < b2:
        x = k1[i]
        y = k2[j]
        if x < y:
            ok[n] = x
            oc[n] = c1[i]
            i += 1
        elif y < x:
            ok[n] = y
            oc[n] = c2[j]
            j += 1
        else:
            ok[n] = x
            oc[n] = c1[i] + c2[j]
            i += 1
            j += 1
        n += 1
    while i < b1:
        ok[n] = k1[i]
        oc[n] = c1[i]
        i += 1
        n += 1
    while j < b2:
        ok[n] = k2[j]
        oc[n] = c2[j]
        j += 1
        n += 1
    return n


@numba.njit(nogil=True, cache=True)
def _merge_two_rows(k1, c1, a1, b1, k2, c2, a2, b2, ok, oc, n):
    """`_merge_two_1` for multi-word rows."""
    i = a1
    j = a2
    while i < b1 and j < b2:
        c = _compare(k1, i, k2, j)
        if c <= 0:
            _copy_row(k1, i, ok, n)
            oc[n] = c1[i] + (c2[j] if c == 0 else 0)
            i += 1
            if c == 0:
                j += 1
        else:
            _copy_row(k2, j, ok, n)
            oc[n] = c2[j]
            j += 1
        n += 1
    while i < b1:
        _copy_row(k1, i, ok, n)
        oc[n] = c1[i]
        i += 1
        n += 1
    while j < b2:
        _copy_row(k2, j, ok, n)
        oc[n] = c2[j]
        j += 1
        n += 1
    return n


def _make_merge_runs(merge_two):
    """The pairwise merge of many runs over a two-run merge kernel (one-word or multi-word)."""

    @numba.njit(nogil=True, cache=True)
    def merge(keys, counts, offsets, keys_b, counts_b):
        """Merge the sorted runs keys[offsets[r]:offsets[r + 1]] pairwise, pass after pass,
        between the two buffers; returns (rows, whether the result is in the b buffers).

        Args:
            keys, counts: the runs end to end (the first buffer).
            offsets: where each run starts, and the end.
            keys_b, counts_b: the second buffer, as large.
        """
        runs = offsets.size - 1
        bounds = offsets.copy()
        in_b = False
        while runs > 1:
            src_k, src_c = (keys_b, counts_b) if in_b else (keys, counts)
            dst_k, dst_c = (keys, counts) if in_b else (keys_b, counts_b)
            merged = 0
            n = 0
            r = 0
            while r < runs:
                start = n
                if r + 1 < runs:
                    hi = bounds[r + 2]
                    n = merge_two(
                        src_k, src_c, bounds[r], bounds[r + 1], src_k, src_c, bounds[r + 1], hi, dst_k, dst_c, n
                    )
                else:
                    n = merge_two(src_k, src_c, bounds[r], bounds[r + 1], src_k, src_c, 0, 0, dst_k, dst_c, n)
                bounds[merged] = start
                merged += 1
                r += 2
            bounds[merged] = n
            runs = merged
            in_b = not in_b
        return bounds[1] - bounds[0], in_b

    return merge


_merge_runs_1 = _make_merge_runs(_merge_two_1)


_merge_runs_rows = _make_merge_runs(_merge_two_rows)


def merge_runs(keys: np.ndarray, counts: np.ndarray, offsets: np.ndarray) -> KeyCounts:
    """One sorted run from the sorted runs keys[offsets[r]:offsets[r + 1]] laid end to end
    (counts summed by key). The inputs are one of the two buffers the passes alternate between,
    so they are overwritten: memory is twice the input.

    Args:
        keys: (rows, words) uint64, the runs end to end.
        counts: (rows,) int64.
        offsets: where each run starts, and the end.
    """
    if offsets.size <= 2:
        return KeyCounts(keys, counts)
    offsets = offsets.astype(np.int64)
    keys_b = np.empty_like(keys)
    counts_b = np.empty_like(counts)
    if keys.shape[1] == 1:
        rows, in_b = _merge_runs_1(keys[:, 0], counts, offsets, keys_b[:, 0], counts_b)
    else:
        rows, in_b = _merge_runs_rows(keys, counts, offsets, keys_b, counts_b)
    return KeyCounts(keys_b[:rows], counts_b[:rows]) if in_b else KeyCounts(keys[:rows], counts[:rows])
