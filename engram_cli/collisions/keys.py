"""N-gram windows as stored keys: the first step of collision statistics.

Everything is counted exactly on the distinct n-grams of the corpus. A window (the projected ids
x[t-n+1] .. x[t], the projected pad before a document's start, and with barrier tokens the pad
at and before the nearest barrier, a barrier's own window all pad: exactly what the hasher hashes)
is packed into a key of one or more uint64 words: every id takes `bits` bits (enough for the
compressed vocab), 64 // bits of them to a word, the id k tokens back in word k // per_word.
Keys are stored through an invertible multiply: the words after the first are folded into it
(xor, multiply by `FOLD_MUL`, xorshift), and the first word is then multiplied by the odd
`KEY_MUL` modulo 2**64 (Fibonacci hashing). Both steps can be undone, so a stored key gives back
its window (`unpack_windows`) and the hasher's pre-modulo mix (`mix_keys`), and the multiply
spreads the top bits of stored keys evenly, which makes them balanced partitions (`runs`).
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
