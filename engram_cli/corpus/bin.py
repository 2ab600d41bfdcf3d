"""Flat `.bin` token ids (the nanoGPT convention): little-endian `--bin-dtype` ids, one stream,
cut into documents at `--doc-sep` when given. A `.bin` beside a `.idx` is a Megatron dataset
(`megatron.py`) instead."""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np

from ..errors import FormatError
from .base import CorpusOptions, DocBatch
from .files import Source
from .ids import IdFile, id_spans, stream_batches, with_progress
from .readers import IdReader, IdReading, Span, Tally


class BinReader(IdReader):
    def __init__(self, source: Source, options: CorpusOptions) -> None:
        super().__init__(source, options)
        dtype = np.dtype(options.bin_dtype).newbyteorder("<")
        size = source.size
        if size % dtype.itemsize:
            raise FormatError(
                f"{source}: {size:,} bytes is not a whole number of {options.bin_dtype} ids "
                f"({dtype.itemsize} bytes each); is --bin-dtype right?"
            )
        self.array = IdFile(source, dtype, (size // dtype.itemsize,), 0)

    def spans(self, target_bytes: int, min_ids: int) -> list[Span] | None:
        return id_spans(self.array, self.source.size, target_bytes, min_ids)

    def batches(self, tally: Tally, reading: IdReading, span: Span | None = None) -> Iterator[DocBatch]:
        batches = stream_batches(self.array, reading, self.options.doc_sep, span)
        yield from with_progress(batches, tally, self.source.size, self.array.dtype.itemsize)


def make_reader(source: Source, options: CorpusOptions) -> BinReader:
    """A flat `.bin` stream of `--bin-dtype` ids."""
    return BinReader(source, options)
