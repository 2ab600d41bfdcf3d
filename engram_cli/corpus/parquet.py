"""Parquet files (FineWeb, DCLM and most Hub datasets): one document per row, from a text column
(`--text-field`, default `text`) or a list-of-integers column of token ids (`--ids-field`).

Only that column is read, with pyarrow, row group by row group in record batches sized from the
file's own metadata (about `batch_tokens` ids, or about 16 MiB of text, per batch), so memory
follows the batch size, not the file. A cluster splits a file by row groups.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

from ..errors import FormatError
from ..helpers import first_line
from .base import CorpusOptions, DocBatch
from .files import Source
from .readers import IdReader, IdReading, Reader, Span, Tally, TextReader
from .records import RowBatcher, arrow_id_rows, arrow_texts, require_column
from .text import Utf8Lines

# Bytes of uncompressed text per record batch.
TEXT_BATCH_BYTES = 16 << 20


class _ParquetFile:
    """One Parquet file: its chosen column, its row groups, and batches of that column."""

    def __init__(self, source: Source, options: CorpusOptions) -> None:
        import pyarrow as pa
        import pyarrow.parquet as pq

        self.source = source
        self._errors = (pa.ArrowException, OSError, ValueError)
        try:
            self.file = pq.ParquetFile(str(source.path) if source.fs is None else source.open())
        except self._errors as exc:
            raise FormatError(f"{source}: not a readable Parquet file ({first_line(exc)})") from None
        self.meta = self.file.metadata
        self.field = require_column(source, self.file.schema_arrow.names, options)
        self.groups = self.meta.num_row_groups

    def group_rows(self, group: int) -> int:
        return int(self.meta.row_group(group).num_rows)

    def _chunks(self, group: int) -> Iterator[Any]:
        """The column chunks of the chosen column in a row group: its leaf columns, if nested."""
        row_group = self.meta.row_group(group)
        for j in range(row_group.num_columns):
            chunk = row_group.column(j)
            if chunk.path_in_schema.split(".")[0] == self.field:
                yield chunk

    def group_bytes(self, group: int, compressed: bool = True) -> int:
        """Bytes of the chosen column in a row group."""
        return sum(c.total_compressed_size if compressed else c.total_uncompressed_size for c in self._chunks(group))

    def group_values(self, group: int) -> int:
        """Values (token ids, for a list column) of the chosen column in a row group."""
        return sum(c.num_values for c in self._chunks(group))

    def spans(self, target_bytes: int) -> list[Span] | None:
        """Consecutive row groups of about `target_bytes` (compressed) each; None for one group."""
        if self.groups <= 1:
            return None
        spans, begin, size = [], 0, 0
        for group in range(self.groups):
            size += self.group_bytes(group)
            if size >= target_bytes:
                spans.append((begin, group + 1))
                begin, size = group + 1, 0
        if begin < self.groups:
            spans.append((begin, self.groups))
        return spans if len(spans) > 1 else None

    def columns(self, span: Span | None, per_batch: Any, tally: Tally) -> Iterator[tuple[int, Any]]:
        """(first row, column array) of each record batch of row groups `span`, counting progress.

        Args:
            span: the row groups to read (None: all).
            per_batch: rows per record batch, given a row group.
            tally: where progress is reported.
        """
        first, end = span or (0, self.groups)
        row = sum(self.group_rows(g) for g in range(first))
        for group in range(first, end):
            rows = self.group_rows(group)
            batch_rows = max(1, min(rows, per_batch(group)))
            try:
                for batch in self.file.iter_batches(batch_size=batch_rows, row_groups=[group], columns=[self.field]):
                    yield row, batch.column(0)
                    row += batch.num_rows
            except self._errors as exc:
                raise FormatError(f"{self.source}: cannot read row group {group} ({first_line(exc)})") from None
            tally.advance(self.group_bytes(group))


class _ParquetReader(Reader):
    """What the text and id readers of a Parquet file share: the file, split by row groups."""

    def __init__(self, source: Source, options: CorpusOptions) -> None:
        super().__init__(source, options)
        self.parquet = _ParquetFile(source, options)

    def spans(self, target_bytes: int, min_ids: int) -> list[Span] | None:
        return self.parquet.spans(target_bytes)


class ParquetTextReader(_ParquetReader, TextReader):
    def texts(self, tally: Tally, span: Span | None = None) -> Iterator[str]:
        parquet = self.parquet
        lines = Utf8Lines(tally)

        def per_batch(group: int) -> int:
            return TEXT_BATCH_BYTES * parquet.group_rows(group) // max(1, parquet.group_bytes(group, compressed=False))

        for _, column in parquet.columns(span, per_batch, tally):
            yield from arrow_texts(column, self.source, parquet.field, lines)


class ParquetIdReader(_ParquetReader, IdReader):
    def batches(self, tally: Tally, reading: IdReading, span: Span | None = None) -> Iterator[DocBatch]:
        parquet = self.parquet
        rows = RowBatcher(reading.batch_tokens)

        def per_batch(group: int) -> int:
            return reading.batch_tokens * parquet.group_rows(group) // max(1, parquet.group_values(group))

        for first_row, column in parquet.columns(span, per_batch, tally):
            ids, lengths = arrow_id_rows(column, self.source, parquet.field, first_row, reading.vocab_size)
            yield from rows.add(ids, lengths)
        yield from rows.finish()


def make_reader(source: Source, options: CorpusOptions) -> Reader:
    """Ids from `--ids-field`, else text from `--text-field`."""
    return ParquetIdReader(source, options) if options.ids_field is not None else ParquetTextReader(source, options)
