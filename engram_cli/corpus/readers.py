"""One reader per input kind, behind one interface.

A reader reads one `Source`. Text readers (plain text, JSON, the text column of Parquet or Arrow)
hand over documents as strings, which the corpus tokenizes with the projection's tokenizer in
large batches; id readers (`.npy`, `.bin`, Megatron indexed datasets, the list-of-ids column of
Parquet, Arrow or JSON) hand over `DocBatch`es of raw token ids directly. Either kind may say
how its file splits into spans for a cluster (`spans`), and reads one span when given one.
Readers report what they read (files, bytes, replaced bytes, progress) through a `Tally`.

Which reader reads a source is decided by its kind and, for record formats that hold either text
or ids, by whether `--ids-field` is given. Modules are imported when first needed, so reading
text does not import pyarrow.
"""

from __future__ import annotations

import importlib
from abc import ABC, abstractmethod
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Protocol

from .base import CorpusOptions, DocBatch
from .files import Source

Span = tuple[int, int]


class Tally(Protocol):
    """Where a reader reports what it read."""

    def count(self, name: str, amount: int = 1) -> None:
        """Add to a read count: files, text_bytes, invalid_utf8, invalid_utf8_files, skipped_binary,
        or files:FORMAT (files per format)."""

    def advance(self, nbytes: int) -> None:
        """Progress: this many more bytes of the source files are read."""


@dataclass(frozen=True)
class IdReading:
    """How id readers batch and check: ids per batch, ids of left context a continued document
    carries (max_ngram_size - 1), and the vocab size every id must be below."""

    batch_tokens: int
    context: int
    vocab_size: int


class Reader:
    """Reads the documents of one source (or of one span of it)."""

    def __init__(self, source: Source, options: CorpusOptions) -> None:
        self.source = source
        self.options = options

    def spans(self, target_bytes: int, min_ids: int) -> list[Span] | None:
        """How a cluster may split this source: spans of about `target_bytes` (and at least
        `min_ids` ids), in the reader's own units; None reads it whole."""
        return None


class TextReader(Reader, ABC):
    """A reader of documents as text, which the corpus tokenizes."""

    @abstractmethod
    def texts(self, tally: Tally, span: Span | None = None) -> Iterator[str]:
        """Every non-empty document of the source (or span), in order."""


class IdReader(Reader, ABC):
    """A reader of pre-tokenized documents."""

    @abstractmethod
    def batches(self, tally: Tally, reading: IdReading, span: Span | None = None) -> Iterator[DocBatch]:
        """The documents of the source (or span) as batches of about `reading.batch_tokens` ids;
        ids at or above `reading.vocab_size` (or negative) are an error naming the file and position.

        Args:
            tally: where to report files, bytes and progress.
            reading: batch size, left context and vocab size.
            span: the part of the file to read, in the units of `spans` (None: all of it).
        """


# kind -> module that reads it; each module's `make_reader(source, options)` picks the reader class.
_MODULES = {
    "text": "text",
    "jsonl": "jsonl",
    "json": "jsonl",
    "npy": "npy",
    "bin": "bin",
    "megatron": "megatron",
    "parquet": "parquet",
    "arrow": "hf",
    "hf-dataset": "hf",
}


_ALWAYS_TEXT = ("text",)
_ALWAYS_IDS = ("npy", "bin", "megatron")


def reads_text(source: Source, options: CorpusOptions) -> bool:
    """Whether a source's documents are text to tokenize (or else token ids), without opening it."""
    if source.kind in _ALWAYS_TEXT:
        return True
    if source.kind in _ALWAYS_IDS:
        return False
    return options.ids_field is None


def open_reader(source: Source, options: CorpusOptions) -> Reader:
    """The reader of a source."""
    module = importlib.import_module(f"{__package__}.{_MODULES[source.kind]}")
    reader: Reader = module.make_reader(source, options)
    return reader
