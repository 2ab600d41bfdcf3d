"""N-gram windows as stored keys, and their distinct counts: the first step of collision statistics.

Everything is counted exactly on the distinct n-grams of the corpus. A window (the projected ids
x[t-n+1] .. x[t], the projected pad before a document's start, and with barrier tokens the pad
at and before the nearest barrier, a barrier's own window all pad: exactly what the hasher hashes)
is packed into a key of one or more uint64 words: every id takes `bits` bits (enough for the
compressed vocab), 64 // bits of them to a word, the id k tokens back in word k // per_word.
Keys are stored through an invertible multiply: the words after the first are folded into it
(xor, multiply by `FOLD_MUL`, xorshift), and the first word is then multiplied by the odd
`KEY_MUL` modulo 2**64 (Fibonacci hashing). Both steps can be undone, so a stored key gives back
its window (`unpack_windows`) and the hasher's pre-modulo mix (`mix_keys`), and the multiply
spreads the top bits of stored keys evenly, which makes them balanced partitions (`spill`).

Key counts are sorted runs: rows of key words in lexicographic order (word 0, a hash of the
whole window, first), each distinct key once, with its count. A buffer of raw keys becomes a run
in place (`sort_and_count`: one-word keys by numpy's sort; longer keys by a counting sort on the
top bits of word 0, then small sorts that stay in cache), and runs merge pairwise in linear passes
(`merge_runs`). Word 0 is spread evenly, so any range of it cuts every run into pieces of about
proportional size (which `spill` merges one range at a time).
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass, field

import numba
import numpy as np

from ..corpus.base import DocBatch
from ..spec import TableSpec
from ..vocab import VocabProjection

# Invertible multiply that turns a packed window into a stored key (Fibonacci hashing).
KEY_MUL = 0x9E3779B97F4A7C15
KEY_INV = pow(KEY_MUL, -1, 1 << 64)
# Folds the extra words of a long window into the first one, so partitions stay balanced.
FOLD_MUL = 0xC2B2AE3D27D4EB4F
KEY_MUL_U64 = np.uint64(KEY_MUL)
_KEY_INV = np.uint64(KEY_INV)
_FOLD_MUL = np.uint64(FOLD_MUL)


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
def _pack_one_word(ids, lookup, is_start, barrier, context, pad, order, bits, out):
    """`_pack_windows` for windows that fit one word: shift the previous window in."""
    step = np.uint64(bits)
    mask = np.uint64(0xFFFFFFFFFFFFFFFF) >> np.uint64(64 - order * bits)
    padded = np.uint64(0)
    key = np.uint64(0)
    for k in range(order - 1):
        padded |= np.uint64(pad) << np.uint64(k * bits)
        key |= np.uint64(context[context.size - 1 - k]) << np.uint64(k * bits)
    gated = barrier.size > 0
    for i in range(ids.size):
        if is_start[i]:
            key = padded
        if gated and barrier[ids[i]]:
            key = ((padded << step) | np.uint64(pad)) & mask  # all pad; the next window starts afresh
        else:
            key = ((key << step) | np.uint64(lookup[ids[i]])) & mask
        out[i, 0] = key * KEY_MUL_U64


@numba.njit(nogil=True, cache=True)
def _pack_windows(ids, lookup, is_start, barrier, context, pad, order, bits, per_word, out):
    """Stored key of the order-`order` window ending at every token.

    `barrier` (a mask over the vocab, or empty) marks tokens no window spans: a barrier's own
    window is all pad, and the windows after it see pad where they would reach it, exactly as
    the hasher pads them.
    """
    if out.shape[1] == 1:
        _pack_one_word(ids, lookup, is_start, barrier, context, pad, order, bits, out)
        return
    word, shift = _slots(order, bits, per_word)
    hist = np.empty(order, np.int64)  # hist[k] = projected id k tokens back
    for k in range(1, order):
        hist[k] = context[context.size - k]
    gated = barrier.size > 0
    for i in range(ids.size):
        if is_start[i]:
            for k in range(1, order):
                hist[k] = pad
        if gated and barrier[ids[i]]:
            for k in range(1, order):
                hist[k] = pad
            hist[0] = pad
        else:
            hist[0] = lookup[ids[i]]
        for w in range(out.shape[1]):
            out[i, w] = 0
        for k in range(order):
            out[i, word[k]] |= np.uint64(hist[k]) << shift[k]
        out[i, 0] = (out[i, 0] ^ _fold(out, i)) * KEY_MUL_U64
        for k in range(order - 1, 0, -1):
            hist[k] = hist[k - 1]


@numba.njit(nogil=True, cache=True)
def unpack_windows(keys, order, bits, per_word, mask, out):
    """Projected ids of stored keys, out[i, k] = the id k tokens back.

    Args:
        keys: (rows, words) stored keys of one order.
        order, bits, per_word, mask: the order's `KeyLayout`.
        out: (rows, order) int64, filled.
    """
    word, shift = _slots(order, bits, per_word)
    for i in range(keys.shape[0]):
        first = (keys[i, 0] * _KEY_INV) ^ _fold(keys, i)
        for k in range(order):
            value = first if word[k] == 0 else keys[i, word[k]]
            out[i, k] = np.int64((value >> shift[k]) & mask)


@numba.njit(nogil=True, cache=True)
def mix_keys(keys, order, bits, per_word, mask, multipliers, out):
    """The hasher's pre-modulo mix x[t]*m[0] ^ x[t-1]*m[1] ^ ... of stored keys.

    Args:
        keys: (rows, words) stored keys of one order.
        order, bits, per_word, mask: the order's `KeyLayout`.
        multipliers: the layer's int64 multipliers (at least `order` of them).
        out: (rows,) int64, filled.
    """
    word, shift = _slots(order, bits, per_word)
    if keys.shape[1] == 1:  # one word: a loop without branches, which the compiler vectorizes
        for i in range(keys.shape[0]):
            first = keys[i, 0] * _KEY_INV
            mix = np.int64(0)
            for k in range(order):
                mix ^= np.int64((first >> shift[k]) & mask) * multipliers[k]
            out[i] = mix
        return
    for i in range(keys.shape[0]):
        first = (keys[i, 0] * _KEY_INV) ^ _fold(keys, i)
        mix = np.int64(0)
        for k in range(order):
            value = first if word[k] == 0 else keys[i, word[k]]
            mix ^= np.int64((value >> shift[k]) & mask) * multipliers[k]
        out[i] = mix


@dataclass(frozen=True)
class KeyLayout:
    """How an order-n window packs into words: `per_word` ids of `bits` bits in each."""

    order: int
    bits: int

    @property
    def per_word(self) -> int:
        """Window ids packed into one uint64 word."""
        return 64 // self.bits

    @property
    def words(self) -> int:
        """uint64 words of one stored key of this order."""
        return -(-self.order // self.per_word)

    @property
    def mask(self) -> np.uint64:
        """The mask of one packed id's bits."""
        return np.uint64((1 << self.bits) - 1)


@dataclass
class KeyCounts:
    """Distinct stored keys of one order and how often each occurred.

    Rows are sorted lexicographically, each key once (a run).
    """

    keys: np.ndarray  # (rows, words) uint64
    counts: np.ndarray  # (rows,) int64

    @property
    def rows(self) -> int:
        """How many distinct keys."""
        return int(self.counts.size)

    @property
    def nbytes(self) -> int:
        """Bytes the keys and counts take in memory (what the memory budget counts)."""
        return int(self.keys.nbytes + self.counts.nbytes)

    @staticmethod
    def empty(words: int) -> KeyCounts:
        """No keys, of `words` words each."""
        return KeyCounts(np.zeros((0, words), np.uint64), np.zeros(0, np.int64))


@dataclass(frozen=True)
class WindowKeys:
    """What turns token ids into stored keys: the projection, the projected pad, the orders, and
    the barrier tokens (a mask over the vocab; empty when there are none)."""

    lookup: np.ndarray
    pad: int
    max_order: int
    bits: int
    barrier: np.ndarray = field(default_factory=lambda: np.zeros(0, np.bool_))

    @staticmethod
    def of(spec: TableSpec, projection: VocabProjection, barrier_ids: Iterable[int] | None = None) -> WindowKeys:
        """The window keys of a spec's hasher: its projection, projected pad and orders, ids of just
        enough bits, and the barrier tokens' mask (checked as the hasher checks them).

        Args:
            spec: the tables' spec.
            projection: its projection.
            barrier_ids: tokens no window spans (default: none).
        """
        from ..hashing import NgramHasher

        hasher = NgramHasher(spec, projection)  # the same checks, pad and barrier mask as the hasher's
        bits = max(1, (projection.compressed_size - 1).bit_length())
        return WindowKeys(projection.lookup, hasher.pad, spec.max_ngram_size, bits, hasher.barrier_vocab(barrier_ids))

    def layout(self, order: int) -> KeyLayout:
        """How a window of `order` ids packs into words."""
        return KeyLayout(order, self.bits)

    @property
    def orders(self) -> range:
        """The n-gram orders counted: 2 .. max_ngram_size."""
        return range(2, self.max_order + 1)

    def context_ids(self, raw: np.ndarray) -> np.ndarray:
        """The projected left context of a batch that continues a document (max_order - 1 ids):
        pad before the document's start, and at and before its last barrier."""
        context = np.full(self.max_order - 1, self.pad, np.int64)
        tail = np.asarray(raw[-(self.max_order - 1) :], np.int64) if raw.size else np.zeros(0, np.int64)
        if self.barrier.size and tail.size:
            hits = np.flatnonzero(self.barrier[tail])
            if hits.size:
                tail = tail[hits[-1] + 1 :]
        if tail.size:
            context[context.size - tail.size :] = self.lookup[tail]
        return context


@dataclass(frozen=True)
class PackedBatch:
    """A batch of documents as the packing kernels read it: int64 ids, document-start flags, and
    the projected left context of a batch that continues a document."""

    ids: np.ndarray
    is_start: np.ndarray
    context: np.ndarray

    @staticmethod
    def of(batch: DocBatch, window: WindowKeys) -> PackedBatch:
        """Flags and context of a batch, computed once for every order."""
        ids = batch.ids.astype(np.int64, copy=False)
        is_start = np.zeros(ids.size, np.bool_)
        is_start[batch.starts] = True
        return PackedBatch(ids, is_start, window.context_ids(batch.context))

    @property
    def tokens(self) -> int:
        """Windows of each order in the batch: one per token."""
        return int(self.ids.size)


def pack_windows(batch: PackedBatch, window: WindowKeys, order: int, out: np.ndarray) -> None:
    """The stored key of the order-`order` window ending at every token of `batch`, into `out`.

    Args:
        batch: the batch, flags and context computed.
        window: the spec's `WindowKeys`.
        order: the n-gram order.
        out: (tokens, words) uint64, filled.
    """
    layout = window.layout(order)
    _pack_windows(
        batch.ids,
        window.lookup,
        batch.is_start,
        window.barrier,
        batch.context,
        window.pad,
        order,
        layout.bits,
        layout.per_word,
        out,
    )


# Rows per group of the counting sort of multi-word keys: each group then sorts in cache.
SORT_GROUP_ROWS = 1 << 14


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
    words = keys.shape[1]
    for i in range(n):
        group = np.int64(keys[i, 0] >> shift)
        j = fill[group]
        for w in range(words):
            out[j, w] = keys[i, w]
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
    words = rows.shape[1]
    while i < n:
        j = i + 1
        while j < n and _compare(rows, j, rows, i) == 0:
            j += 1
        for w in range(words):
            keys_out[d, w] = rows[i, w]
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
    words = k1.shape[1]
    while i < b1 and j < b2:
        c = _compare(k1, i, k2, j)
        if c <= 0:
            for w in range(words):
                ok[n, w] = k1[i, w]
            oc[n] = c1[i] + (c2[j] if c == 0 else 0)
            i += 1
            if c == 0:
                j += 1
        else:
            for w in range(words):
                ok[n, w] = k2[j, w]
            oc[n] = c2[j]
            j += 1
        n += 1
    while i < b1:
        for w in range(words):
            ok[n, w] = k1[i, w]
        oc[n] = c1[i]
        i += 1
        n += 1
    while j < b2:
        for w in range(words):
            ok[n, w] = k2[j, w]
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
