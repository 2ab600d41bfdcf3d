"""Documents in records (Parquet and Arrow batches, JSON objects): one per record, taken from a
text field (`--text-field`, tokenized) or from a field of token id lists (`--ids-field`).

Arrow columns are converted a batch at a time: a text column to Python strings (null and empty
values skipped), a list column to one flat id array plus the length of each row, so pre-tokenized
records cost no Python loop per row. Every list layout is read (`list`, `large_list`,
`fixed_size_list`, `list_view`, `large_list_view`), each flattened row by row in row order (a
list view's rows may lie anywhere in its values); the ids flattened must add up to the rows'
lengths, so a layout read wrongly is an error, never rows dropped. Rows of ids are gathered into
batches of about the batch size; a row is never cut, so a batch holds at least one whole row.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import numpy as np

from ..errors import FormatError
from .base import CorpusOptions, DocBatch
from .files import Source
from .ids import EMPTY, first_bad_id
from .text import Utf8Lines


def chosen_field(options: CorpusOptions) -> tuple[str, str]:
    """The field documents come from, and the option that chose it."""
    if options.ids_field is not None:
        return options.ids_field, "--ids-field"
    return options.text_field, "--text-field"


def require_column(source: Source, names: list[str], options: CorpusOptions) -> str:
    """The column the options choose, refused with the columns there are when it is missing.

    Args:
        source: the file, for the message.
        names: its columns.
        options: `--text-field` or `--ids-field`.
    """
    field, flag = chosen_field(options)
    if field not in names:
        raise FormatError(f"{source}: no {field!r} column (has: {', '.join(names)}); choose the column with {flag}")
    return field


def arrow_texts(array: Any, source: Source, field: str, lines: Utf8Lines) -> Iterator[str]:
    """The non-empty strings of a text Arrow column: string, large_string, string_view, the
    binary kinds, or a dictionary of any of them.

    A string column whose values are valid UTF-8 (checked by Arrow, in C) is taken as it is;
    one holding invalid UTF-8 (which writers do not always check) and binary columns are decoded
    value by value, invalid sequences replaced by U+FFFD and counted as for plain text files.

    Args:
        array: the column of one record batch.
        source: its file, for messages.
        field: the column's name, for messages.
        lines: decodes binary values and counts text bytes and invalid UTF-8.
    """
    import pyarrow as pa
    import pyarrow.compute as pc

    kind = array.type
    if pa.types.is_dictionary(kind):
        array, kind = array.dictionary_decode(), kind.value_type
    if pa.types.is_string_view(kind):
        array, kind = array.cast(pa.large_string()), pa.large_string()
    elif pa.types.is_binary_view(kind):
        array, kind = array.cast(pa.large_binary()), pa.large_binary()
    if pa.types.is_string(kind) or pa.types.is_large_string(kind):
        try:
            array.validate(full=True)
        except pa.ArrowInvalid:
            array, kind = array.cast(pa.large_binary()), pa.large_binary()
        else:
            lines.tally.count("text_bytes", int(pc.sum(pc.binary_length(array)).as_py() or 0))
            for text in array.to_pylist():
                if text:
                    yield text
            return
    if pa.types.is_binary(kind) or pa.types.is_large_binary(kind):
        for data in array.to_pylist():
            if data:
                yield lines.decode(data)
        return
    raise FormatError(f"{source}: column {field!r} holds {array.type}, not text; for token ids use --ids-field")


def arrow_id_rows(
    array: Any, source: Source, field: str, first_row: int, vocab_size: int
) -> tuple[np.ndarray, np.ndarray]:
    """The ids of a list-of-integers Arrow column, flat, and the number of ids of each row.

    Args:
        array: the column of one record batch.
        source: its file, for messages.
        field: the column's name, for messages.
        first_row: the row in the file of the batch's first row.
        vocab_size: every id must be below it.
    """
    import pyarrow as pa
    import pyarrow.compute as pc

    kind = array.type
    if not _is_list_type(kind) or not pa.types.is_integer(kind.value_type):
        raise FormatError(f"{source}: column {field!r} holds {kind}, not lists of integer token ids")
    flat = pc.list_flatten(array)
    if flat.null_count:
        raise FormatError(f"{source}: column {field!r} holds null token ids")
    lengths = pc.list_value_length(array).fill_null(0).to_numpy(zero_copy_only=False).astype(np.int64)
    if int(lengths.sum()) != len(flat):
        raise FormatError(
            f"{source}: column {field!r} ({kind}) rows {first_row:,}.. hold {int(lengths.sum()):,} ids "
            f"but flatten to {len(flat):,}; this list layout cannot be read"
        )
    ids = flat.to_numpy(zero_copy_only=False)
    check_rows(ids, lengths, source, first_row, vocab_size)
    return ids.astype(np.int64, copy=False), lengths


def _is_list_type(kind: Any) -> bool:
    """Whether an Arrow type is a list of any layout: list, large_list, fixed_size_list, and the
    list views (whose rows may lie anywhere in, and share, their values: flattened row by row)."""
    import pyarrow as pa

    tests = (pa.types.is_list, pa.types.is_large_list, pa.types.is_fixed_size_list)
    views = (pa.types.is_list_view, pa.types.is_large_list_view)
    return any(test(kind) for test in (*tests, *views))


def check_rows(ids: np.ndarray, lengths: np.ndarray, source: Source, first_row: int, vocab_size: int) -> None:
    """Refuse ids outside [0, vocab_size), naming the row and the position in it.

    Args:
        ids: the ids of some rows, flat.
        lengths: the number of ids of each row.
        source: their file, for the message.
        first_row: the row in the file of the first row.
        vocab_size: every id must be below it.
    """
    bad = first_bad_id(ids, vocab_size)
    if bad is None:
        return
    at, reason = bad
    ends = np.cumsum(lengths)
    row = int(np.searchsorted(ends, at, side="right"))
    index = at - int(ends[row] - lengths[row])
    raise FormatError(f"{source}: token id {int(ids[at])} at position [{first_row + row}, {index}] {reason}")


class RowBatcher:
    """Rows of ids gathered into `DocBatch`es of about `batch_tokens` ids: pieces are added whole,
    and a batch is handed over before a piece would take it past `batch_tokens`."""

    def __init__(self, batch_tokens: int) -> None:
        self.batch_tokens = batch_tokens
        self.ids: list[np.ndarray] = []
        self.lengths: list[np.ndarray] = []
        self.size = 0

    def add(self, ids: np.ndarray, lengths: np.ndarray) -> Iterator[DocBatch]:
        """Take rows (flat ids and each row's length); a full batch comes out first."""
        if self.size and self.size + ids.size > self.batch_tokens:
            yield self.take()
        if ids.size:
            self.ids.append(ids)
            self.lengths.append(lengths)
            self.size += ids.size
        if self.size >= self.batch_tokens:
            yield self.take()

    def finish(self) -> Iterator[DocBatch]:
        """The last, partial batch."""
        if self.size:
            yield self.take()

    def take(self) -> DocBatch:
        """The rows gathered so far as one batch."""
        ids = np.concatenate(self.ids) if len(self.ids) > 1 else self.ids[0]
        lengths = np.concatenate(self.lengths) if len(self.lengths) > 1 else self.lengths[0]
        starts = (np.cumsum(lengths) - lengths)[lengths > 0]
        self.ids, self.lengths, self.size = [], [], 0
        return DocBatch(ids, starts.astype(np.int64, copy=False), EMPTY)
