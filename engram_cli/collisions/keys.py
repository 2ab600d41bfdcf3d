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

A batch of documents maps to the distinct keys of each order with their occurrence counts
(`map_order`), and these partial counts merge by key (`merge_partition`): one-word keys are kept
sorted and merge as sorted runs in linear time; longer keys merge by open addressing.
"""

from __future__ import annotations

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
# Partitions of spilled key counts: the top bits of a stored key.
PARTITION_BITS = 8
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
    for i in range(keys.shape[0]):
        first = (keys[i, 0] * _KEY_INV) ^ _fold(keys, i)
        mix = np.int64(0)
        for k in range(order):
            value = first if word[k] == 0 else keys[i, word[k]]
            mix ^= np.int64((value >> shift[k]) & mask) * multipliers[k]
        out[i] = mix


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

    One-word keys are kept sorted (runs merge in linear time); longer keys are not.
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
    """Distinct windows of one order in a batch of documents, with their counts.

    Args:
        batch: documents of raw token ids (and the left context of one continued from before).
        window: the spec's `WindowKeys`.
        order: the n-gram order.
    """
    layout = window.layout(order)
    ids = batch.ids.astype(np.int64, copy=False)
    is_start = np.zeros(ids.size, np.bool_)
    is_start[batch.starts] = True
    context = window.context_ids(batch.context)
    out = np.empty((ids.size, layout.words), np.uint64)
    _pack_windows(
        ids, window.lookup, is_start, window.barrier, context, window.pad, order, layout.bits, layout.per_word, out
    )
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
    edges = np.concatenate([[0], np.cumsum(np.bincount(pid, minlength=1 << bits))]).tolist()
    keys, counts = part.keys[order], part.counts[order]
    return [KeyCounts(keys[a:b], counts[a:b]) for a, b in zip(edges[:-1], edges[1:])]


def map_part(batch: DocBatch, window: WindowKeys, bits: int = PARTITION_BITS) -> dict[int, list[KeyCounts]]:
    """One part of a corpus to its key counts per order, split into 2**bits partitions.

    Args:
        batch: documents of raw token ids.
        window: the spec's `WindowKeys`.
        bits: partitions are the top `bits` bits of the stored keys.
    """
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
        runs = merged + runs[len(runs) - len(runs) % 2 :]
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
