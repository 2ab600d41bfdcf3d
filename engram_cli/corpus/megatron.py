"""Megatron-LM / NeMo indexed datasets: `PREFIX.bin` (token ids) with `PREFIX.idx` (the index).

The index (`MMIDIDX`, version 1), all little-endian:

    bytes 0-8     magic b"MMIDIDX\\x00\\x00"
    9-16          version, uint64 = 1
    17            dtype code, uint8: 1 uint8, 2 int8, 3 int16, 4 int32, 5 int64, 8 uint16
                  (6 float64 and 7 float32 are not token ids)
    18-25         N, the number of sequences, uint64
    26-33         D, the number of document indices, uint64
    34...         N int32 sequence lengths (in ids), N int64 sequence pointers (byte offsets
                  into .bin), D int64 document indices; optionally N int8 sequence modes
                  (multimodal datasets), which are not needed here.

Document k is sequences [doc[k], doc[k+1]) (doc[0] = 0, doc[D-1] = N): the ids from the pointer
of its first sequence to that of the next document's. Megatron's builder lays sequences out back
to back, so the `.bin` is one stream of ids whose document boundaries come from the index, and no
`--doc-sep` is needed; the ids' dtype comes from the index too. The stream is read a chunk at a
time, like a flat `.bin`, and a cluster splits it into ranges of ids.

The index is read a block of `CHECK_BLOCK` entries at a time, never whole: memory follows the
ids read, not the counts an index claims (an index of many millions of empty documents costs
no more than one of a few).

Checked, each a one-line error naming the file: the header, the index size its counts imply,
the `.bin` size against the end of the last sequence, that sequences are back to back (each
sequence covering ids that are read is checked as they are read), and the order of documents.
"""

from __future__ import annotations

import struct
from collections.abc import Iterator

import numpy as np

from ..errors import FormatError
from .base import CorpusOptions, DocBatch
from .files import Source
from .ids import EMPTY, IdFile, carry_tail, check_chunk, id_spans, left_context
from .readers import IdReader, IdReading, Span, Tally

MAGIC = b"MMIDIDX\x00\x00"
LEGACY_MAGIC = b"TNTIDX\x00\x00"
HEADER = struct.Struct("<9sQBQQ")
DTYPES = {1: "uint8", 2: "int8", 3: "int16", 4: "int32", 5: "int64", 8: "uint16"}
FLOAT_CODES = {6: "float64", 7: "float32"}

# Sequences checked at a time.
CHECK_BLOCK = 1 << 16


class MegatronIndex:
    """The index of a Megatron pair, read a range at a time (never whole)."""

    def __init__(self, data: Source) -> None:
        self.data = data
        self.index = index = data.sibling(".idx")
        with index.open() as handle:
            head = handle.read(HEADER.size)
        if head.startswith(LEGACY_MAGIC):
            raise FormatError(f"{index}: a legacy Megatron 'lazy'/'cached' index (TNTIDX); only MMIDIDX is read")
        if len(head) < HEADER.size or not head.startswith(MAGIC):
            raise FormatError(f"{index}: not a Megatron MMIDIDX index (bad header)")
        _, version, code, count, documents = HEADER.unpack(head)
        if version != 1:
            raise FormatError(f"{index}: MMIDIDX version {version}; only version 1 is read")
        if code in FLOAT_CODES:
            raise FormatError(f"{index}: dtype code {code} ({FLOAT_CODES[code]}) is not token ids")
        if code not in DTYPES:
            raise FormatError(f"{index}: unknown dtype code {code}")
        self.dtype = np.dtype(DTYPES[code]).newbyteorder("<")
        self.count, self.documents = count, documents
        size = index.file_size()
        expected = HEADER.size + 12 * count + 8 * documents
        if size not in (expected, expected + count):
            raise FormatError(
                f"{index}: {size:,} bytes, but its header counts {count:,} sequences and {documents:,} "
                f"document indices ({expected:,} bytes)"
            )
        self.lengths = IdFile(index, np.dtype("<i4"), (count,), HEADER.size)
        self.pointers = IdFile(index, np.dtype("<i8"), (count,), HEADER.size + 4 * count)
        self.doc_index = IdFile(index, np.dtype("<i8"), (documents,), HEADER.size + 12 * count)
        self.data_bytes = data.file_size()
        itemsize = self.dtype.itemsize
        if self.data_bytes % itemsize:
            raise FormatError(f"{data}: {self.data_bytes:,} bytes is not a whole number of {self.dtype.name} ids")
        self.tokens = self.data_bytes // itemsize
        self.ids = IdFile(data, self.dtype, (self.tokens,), 0)
        if (
            documents < 1
            or self.doc_index.read(0, 1)[0] != 0
            or self.doc_index.read(documents - 1, documents)[0] != count
        ):
            raise FormatError(f"{index}: document indices must run from 0 to the sequence count {count:,}")
        end = 0
        if count:
            first = int(self.pointers.read(0, 1)[0])
            end = int(self.pointers.read(count - 1, count)[0]) + int(self.lengths.read(count - 1, count)[0]) * itemsize
            if first != 0:
                raise FormatError(f"{index}: the first sequence starts at byte {first:,} of {data.name}, not 0")
        if end != self.data_bytes:
            raise FormatError(
                f"{index}: its sequences end at byte {end:,}, but {data.name} holds {self.data_bytes:,} bytes"
            )

    def pointer(self, sequence: int) -> int:
        """Byte offset of a sequence; the end of the data for `sequence == count`."""
        if sequence >= self.count:
            return self.data_bytes
        return int(self.pointers.read(sequence, sequence + 1)[0])

    def doc_start(self, document: int) -> int:
        """Id offset where document `document` starts (the end of the ids for the last index)."""
        sequence = int(self.doc_index.read(document, document + 1)[0])
        if not 0 <= sequence <= self.count:
            raise FormatError(
                f"{self.index}: document index {document:,} points at sequence {sequence:,} of {self.count:,}"
            )
        return self.pointer(sequence) // self.dtype.itemsize

    def first_doc_from(self, position: int) -> int:
        """The first document (counting the end marker D-1) that starts at or after `position`."""
        lo, hi = 0, self.documents - 1
        while lo < hi:
            mid = (lo + hi) // 2
            if self.doc_start(mid) < position:
                lo = mid + 1
            else:
                hi = mid
        return lo

    def starts_in(self, lo: int, hi: int) -> np.ndarray:
        """Id offsets in [lo, hi) where a non-empty document starts, in order.

        The document indices and pointers are read `CHECK_BLOCK` at a time, so memory stays
        bounded by the ids in [lo, hi) whatever the index claims (millions of empty documents
        at one offset hold no ids and take no more memory than one).
        """
        first, end = self.first_doc_from(lo), self.first_doc_from(hi)
        found: list[np.ndarray] = []
        last = -1
        previous = 0
        for block in range(first, end, CHECK_BLOCK):
            sequences = self.doc_index.read(block, min(block + CHECK_BLOCK, end))
            if np.any(np.diff(sequences) < 0) or sequences[0] < previous or sequences[-1] > self.count:
                raise FormatError(f"{self.index}: document indices {first:,}..{end:,} are out of order")
            previous = int(sequences[-1])
            inside = np.unique(sequences[sequences < self.count])
            for piece in range(0, inside.size, CHECK_BLOCK):
                starts = self._pointers_of(inside[piece : piece + CHECK_BLOCK]) // self.dtype.itemsize
                if np.any(starts < lo) or np.any(starts >= hi):
                    raise FormatError(
                        f"{self.index}: sequence pointers of documents {first:,}..{end:,} are out of order"
                    )
                starts = np.unique(starts)
                starts = starts[starts > last]
                if starts.size:
                    found.append(starts.astype(np.int64))
                    last = int(starts[-1])
        if not found:
            return EMPTY
        return np.unique(np.concatenate(found))

    def _pointers_of(self, sequences: np.ndarray) -> np.ndarray:
        """The pointers of sorted, distinct sequences, read `CHECK_BLOCK` pointers at a time."""
        out = np.empty(sequences.size, np.int64)
        done = 0
        while done < sequences.size:
            base = int(sequences[done])
            stop = int(np.searchsorted(sequences, base + CHECK_BLOCK))
            window = self.pointers.read(base, int(sequences[stop - 1]) + 1)
            out[done:stop] = window[sequences[done:stop] - base]
            done = stop
        return out

    def sequence_at(self, position: int) -> int:
        """The last sequence whose pointer is at or before id `position`."""
        target = position * self.dtype.itemsize
        lo, hi = 0, self.count
        while lo < hi:
            mid = (lo + hi) // 2
            if self.pointer(mid) <= target:
                lo = mid + 1
            else:
                hi = mid
        return max(0, lo - 1)


class _SequenceCheck:
    """Checks that sequences lie back to back, block by block, as far as the ids read so far."""

    def __init__(self, index: MegatronIndex, position: int) -> None:
        self.index = index
        self.next = index.sequence_at(position) if index.count else 0

    def through(self, position: int) -> None:
        """Check every sequence that holds ids before `position`."""
        index, itemsize = self.index, self.index.dtype.itemsize
        while self.next < index.count and index.pointer(self.next) < position * itemsize:
            lo, hi = self.next, min(self.next + CHECK_BLOCK, index.count)
            lengths = index.lengths.read(lo, hi).astype(np.int64)
            pointers = index.pointers.read(lo, hi)
            following = np.append(pointers[1:], index.pointer(hi))
            bad = np.flatnonzero((lengths < 0) | (pointers + lengths * itemsize != following))
            if bad.size:
                at = lo + int(bad[0])
                raise FormatError(
                    f"{index.index}: sequence {at:,} (bytes {int(pointers[bad[0]]):,} + {int(lengths[bad[0]]):,} ids) "
                    f"does not end where the next one starts, or overruns {index.data.name}"
                )
            self.next = hi


class MegatronReader(IdReader):
    def __init__(self, source: Source, options: CorpusOptions) -> None:
        super().__init__(source, options)
        self.index = MegatronIndex(source)

    def spans(self, target_bytes: int, min_ids: int) -> list[Span] | None:
        return id_spans(self.index.ids, self.index.data_bytes, target_bytes, min_ids)

    def batches(self, tally: Tally, reading: IdReading, span: Span | None = None) -> Iterator[DocBatch]:
        index, ids_file, context = self.index, self.index.ids, reading.context
        first, end = span or (0, index.tokens)
        check = _SequenceCheck(index, first)
        tail = EMPTY
        if first > 0:
            start = index.doc_start(max(0, index.first_doc_from(first) - 1))
            if start < first:
                check.through(first)
                tail = ids_file.read(max(start, first - context), first).astype(np.int64)
        for lo in range(first, end, reading.batch_tokens):
            hi = min(lo + reading.batch_tokens, end)
            check.through(hi)
            raw = ids_file.read(lo, hi)
            check_chunk(raw, self.source, reading.vocab_size, lambda i: [lo + int(i[0])])
            ids = raw.astype(np.int64, copy=False)
            starts = index.starts_in(lo, hi) - lo
            carried = left_context(starts, tail)
            tail = carry_tail(ids, starts, tail, context)
            if ids.size:
                yield DocBatch(ids, starts, carried)
        tally.advance(self.source.size)


def make_reader(source: Source, options: CorpusOptions) -> MegatronReader:
    """A Megatron `.bin` + `.idx` pair."""
    return MegatronReader(source, options)
