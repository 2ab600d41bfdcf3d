"""Arrays of token ids in files: reading ranges, cutting streams into documents, checking ids.

An `IdFile` is where the ids of a `.npy` or `.bin` (or the arrays of a Megatron index) lie in a
file, read a range at a time with plain reads: a memory map would do, but every page it touches
counts as resident memory until unmapped. A 1-D stream is cut into documents at a separator id
(`--doc-sep`, dropped) and read in chunks; the tail of the document that runs over a chunk's end
is carried to the next chunk as context, and a span that starts inside a document rebuilds the
context a reader from the start would have carried there (`stream_state`).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass

import numpy as np

from ..errors import EngramError, FormatError
from .base import DocBatch
from .files import Source
from .readers import IdReading, Span, Tally

EMPTY = np.zeros(0, np.int64)


@dataclass(frozen=True)
class IdFile:
    """Ids of shape (T,) or (B, T) and dtype `dtype`, `offset` bytes into a file."""

    source: Source
    dtype: np.dtype
    shape: tuple[int, ...]
    offset: int

    @property
    def ndim(self) -> int:
        """1 for a stream of ids, 2 for one document per row."""
        return len(self.shape)

    def read(self, lo: int, hi: int) -> np.ndarray:
        """Ids [lo, hi) of a 1-D file, or rows [lo, hi) of a 2-D one."""
        width = self.shape[1] if self.ndim == 2 else 1
        hi = min(hi, self.shape[0])
        count = max(0, hi - lo) * width
        data = self.source.read_array(self.offset + lo * width * self.dtype.itemsize, self.dtype, count)
        if data.size != count:
            raise FormatError(f"{self.source} is shorter than its header says; is it truncated?")
        return data.reshape(-1, width) if self.ndim == 2 else data


def first_bad_id(ids: np.ndarray, vocab_size: int) -> tuple[int, str] | None:
    """The flat index of the first id that is negative or not below `vocab_size`, and why (for
    the message every reader words alike); None when every id is usable."""
    if not ids.size or (ids.min() >= 0 and ids.max() < vocab_size):
        return None
    at = int(np.flatnonzero((ids < 0) | (ids >= vocab_size))[0])
    return at, "is negative" if ids.flat[at] < 0 else f"is not below the projection's vocab size {vocab_size}"


def check_chunk(ids: np.ndarray, source: Source, vocab_size: int, where: Callable[[tuple], list[int]]) -> None:
    """Refuse negative ids and ids past the vocab, naming the file and the position in it.

    Args:
        ids: a chunk of ids as read.
        source: its file.
        vocab_size: the projection's vocab size.
        where: the position in the file of an index into `ids`.
    """
    bad = first_bad_id(ids, vocab_size)
    if bad is None:
        return
    at, reason = bad
    index = tuple(int(i) for i in np.unravel_index(at, ids.shape))
    position = where(index)
    shown = position[0] if len(position) == 1 else position
    raise EngramError(f"{source}: token id {int(ids[index])} at position {shown} {reason}")


def left_context(starts: np.ndarray, tail: np.ndarray) -> np.ndarray:
    """The context of a batch: none when it begins with a document, else the carried `tail`."""
    return EMPTY if (starts.size and starts[0] == 0) else tail


def carry_tail(ids: np.ndarray, starts: np.ndarray, before: np.ndarray, context: int) -> np.ndarray:
    """The last `context` ids of the document a batch ends in, which the next batch carries if it
    continues that document; `before` is what this batch carried (a batch may lie in one document).

    Args:
        ids: the batch's ids.
        starts: where its documents begin.
        before: the tail the batch itself carried.
        context: how many ids of left context a batch carries.
    """
    current = ids[int(starts[-1]) :] if starts.size else np.concatenate([before, ids])
    return current[max(0, current.size - context) :].copy()


def id_spans(array: IdFile, size: int, target_bytes: int, min_ids: int) -> list[Span]:
    """Ranges of ids (rows of a 2-D array) of about `target_bytes` and at least `min_ids` ids.

    Args:
        array: the ids.
        size: the file's size in bytes.
        target_bytes: about how many bytes of the file one range covers.
        min_ids: the fewest ids one range holds.
    """
    count = array.shape[0]
    if count == 0:
        return [(0, 0)]
    width = array.shape[1] if array.ndim == 2 else 1
    unit_bytes = max(1, size // max(1, count))
    step = max(1, -(-min_ids // max(1, width)), target_bytes // unit_bytes)
    return [(lo, min(lo + step, count)) for lo in range(0, count, step)]


def stream_state(array: IdFile, position: int, sep: int | None, context: int) -> tuple[bool, np.ndarray]:
    """Whether a document starts at `position` of a stream, and the last `context` ids of the
    document that runs into it: what a reader that started at 0 would carry there.

    Args:
        array: the stream.
        position: where the reader starts.
        sep: the document separator id (None: the stream is one document).
        context: how many ids of left context a batch carries.
    """
    if position == 0:
        return True, EMPTY
    if sep is None:
        return False, array.read(max(0, position - context), position).astype(np.int64)
    window = max(64, 2 * context)
    while True:
        lo = max(0, position - window)
        before = array.read(lo, position).astype(np.int64)
        cuts = np.flatnonzero(before == sep)
        if cuts.size and cuts[-1] == before.size - 1:
            return True, EMPTY
        kept = before[cuts[-1] + 1 :] if cuts.size else before
        if cuts.size or kept.size >= context or lo == 0:
            return False, kept[max(0, kept.size - context) :].copy()
        window *= 2


def row_batches(array: IdFile, reading: IdReading, span: Span | None) -> Iterator[DocBatch]:
    """Documents (rows) [first, end) of a 2-D array.

    Args:
        array: the rows.
        reading: batch size and vocab size.
        span: the rows to read (None: all).
    """
    first, end = span or (0, array.shape[0])
    length = array.shape[1]
    if length == 0:
        return
    step = max(1, reading.batch_tokens // length)
    for lo in range(first, end, step):
        chunk = array.read(lo, min(lo + step, end))
        check_chunk(chunk, array.source, reading.vocab_size, lambda i: [lo + i[0], i[1]])
        yield DocBatch(chunk.reshape(-1), np.arange(chunk.shape[0], dtype=np.int64) * length)


def stream_batches(array: IdFile, reading: IdReading, sep: int | None, span: Span | None) -> Iterator[DocBatch]:
    """Ids [first, end) of one stream, split at `sep` (the separators themselves are dropped);
    a range that starts inside a document carries that document's left context.

    Args:
        array: the stream.
        reading: batch size, left context and vocab size.
        sep: the document separator id (None: the stream is one document).
        span: the ids to read (None: all).
    """
    first, end = span or (0, array.shape[0])
    context = reading.context
    at_start, tail = stream_state(array, first, sep, context)
    for lo in range(first, end, reading.batch_tokens):
        raw = array.read(lo, min(lo + reading.batch_tokens, end))
        if sep is None:
            ids, flags = raw, np.zeros(raw.size, bool)
            flags[:1] = at_start
        else:
            is_sep = raw == sep
            keep = ~is_sep
            previous = np.empty(raw.size, bool)
            previous[0] = at_start
            previous[1:] = is_sep[:-1]
            ids, flags = raw[keep], previous[keep]
            positions = np.flatnonzero(keep)
        where = (lambda i: [lo + int(i[0])]) if sep is None else (lambda i: [lo + int(positions[i[0]])])
        check_chunk(ids, array.source, reading.vocab_size, where)
        ids = ids.astype(np.int64, copy=False)
        starts = np.flatnonzero(flags)
        carried = left_context(starts, tail)
        tail = carry_tail(ids, starts, tail, context)
        at_start = bool(sep is not None and raw.size and raw[-1] == sep) or (at_start and ids.size == 0)
        if ids.size:
            yield DocBatch(ids, starts, carried)


def with_progress(batches: Iterator[DocBatch], tally: Tally, size: int, itemsize: int) -> Iterator[DocBatch]:
    """`batches` of a file of `size` bytes, advancing the tally by the bytes of each batch's ids
    as it goes (a large file shows progress before its end), then by what is left.

    Args:
        batches: the file's batches.
        tally: where progress is reported.
        size: the file's bytes.
        itemsize: bytes of one id in the file.
    """
    done = 0
    for batch in batches:
        step = min(batch.tokens * itemsize, size - done)
        tally.advance(step)
        done += step
        yield batch
    tally.advance(size - done)
