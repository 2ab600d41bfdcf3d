"""`.npy` token ids: shape (T,) is one stream (cut into documents at `--doc-sep` when given),
shape (B, T) is B documents. Only the header is parsed up front; ids are read a range at a time."""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np

from ..errors import FormatError
from .base import CorpusOptions, DocBatch
from .files import Source
from .ids import IdFile, id_spans, row_batches, stream_batches, with_progress
from .readers import IdReader, IdReading, Span, Tally


def open_npy(source: Source) -> IdFile:
    """Where the ids of a `.npy` file lie: C order, integers, 1-D or 2-D."""
    try:
        with source.open() as handle:
            version = np.lib.format.read_magic(handle)
            if version == (1, 0):
                shape, fortran, dtype = np.lib.format.read_array_header_1_0(handle)
            else:
                shape, fortran, dtype = np.lib.format.read_array_header_2_0(handle)
            offset = handle.tell()
    except (ValueError, OSError, EOFError) as exc:
        raise FormatError(f"{source} is not a readable .npy file: {exc}") from None
    if dtype.kind not in "iu":
        raise FormatError(f"{source}: token ids must be integers, got dtype {dtype}")
    if len(shape) not in (1, 2):
        raise FormatError(f"{source}: expected token ids of shape (T,) or (B, T), got {shape}")
    if fortran and len(shape) == 2:
        raise FormatError(
            f"{source} is stored in Fortran order; save it in C order (np.save(path, np.ascontiguousarray(ids)))"
        )
    return IdFile(source, dtype, tuple(shape), offset)


class NpyReader(IdReader):
    def __init__(self, source: Source, options: CorpusOptions) -> None:
        super().__init__(source, options)
        self.array = open_npy(source)

    def spans(self, target_bytes: int, min_ids: int) -> list[Span] | None:
        return id_spans(self.array, self.source.size, target_bytes, min_ids)

    def batches(self, tally: Tally, reading: IdReading, span: Span | None = None) -> Iterator[DocBatch]:
        if self.array.ndim == 2:
            batches = row_batches(self.array, reading, span)
        else:
            batches = stream_batches(self.array, reading, self.options.doc_sep, span)
        yield from with_progress(batches, tally, self.source.size, self.array.dtype.itemsize)


def make_reader(source: Source, options: CorpusOptions) -> NpyReader:
    """`.npy` token ids."""
    return NpyReader(source, options)
