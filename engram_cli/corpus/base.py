"""The shapes a corpus is read into: options, batches of documents, the summary of what was read.

A `DocBatch` is documents of raw token ids concatenated, with the offsets where each begins; a
document may continue from the batch before (its `context` then carries the ids just before
it). `formats` says which input format each stretch of ids came from, so that the summary can
count documents and tokens per format.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal, get_args

import numpy as np

from ..errors import EngramError
from .files import Source

DocPer = Literal["file", "line"]  # a text file is one document, or each line is one
DOC_PER: tuple[str, ...] = get_args(DocPer)


BinDType = Literal["uint16", "uint32"]  # the token ids of a raw .bin file
BIN_DTYPES: tuple[str, ...] = get_args(BinDType)


# Characters of text handed to one encode_batch call: enough for every core, small enough to overlap.
TEXT_BATCH_CHARS = 1 << 21


# Token ids per chunk of a pre-tokenized array.
ID_BATCH_TOKENS = 1 << 21


# Bytes looked at to tell a binary file from a text file in a folder walk.
BINARY_SNIFF_BYTES = 8192


@dataclass
class CorpusOptions:
    """How to read the inputs; the defaults read plain UTF-8 text, one document per file."""

    doc_per: DocPer = "file"
    text_field: str = "text"
    ids_field: str | None = None
    bin_dtype: BinDType = "uint16"
    doc_sep: int | None = None
    glob: str | None = None
    max_tokens: int | None = None
    split: str | None = None
    config: str | None = None
    skip_unreadable: bool = False

    def __post_init__(self) -> None:
        if self.doc_per not in DOC_PER:
            raise EngramError(f"--doc-per must be one of {', '.join(DOC_PER)}, got {self.doc_per!r}")
        if self.bin_dtype not in BIN_DTYPES:
            raise EngramError(f"--bin-dtype must be one of {', '.join(BIN_DTYPES)}, got {self.bin_dtype!r}")
        if self.doc_sep is not None and self.doc_sep < 0:
            raise EngramError(f"--doc-sep must be a non-negative token id, got {self.doc_sep}")
        if self.max_tokens is not None and self.max_tokens < 1:
            raise EngramError(f"--max-tokens must be positive, got {self.max_tokens}")
        if not self.text_field:
            raise EngramError("--text-field must name a field")
        if self.ids_field is not None and not self.ids_field:
            raise EngramError("--ids-field must name a field")


@dataclass
class DocBatch:
    """Documents concatenated: `starts` are the indices in `ids` where a document begins.

    When `ids[0]` continues a document from the previous batch, `context` holds that
    document's raw ids just before it (at most max_ngram_size - 1 of them). `formats` runs
    over the ids in order as (format, end offset) pairs: ids [previous end, end) came from
    inputs of that format (empty: unknown).
    """

    ids: np.ndarray
    starts: np.ndarray
    context: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))
    read: dict[str, int] = field(default_factory=dict)  # files, bytes, ... read to make this batch
    formats: tuple[tuple[str, int], ...] = ()

    @property
    def tokens(self) -> int:
        """How many token ids the batch holds."""
        return int(self.ids.size)

    def per_format(self) -> dict[str, tuple[int, int]]:
        """(documents, tokens) that start or lie in this batch, per format (`starts` is sorted: a run's
        documents are found by bisection, not by a scan of every start per run)."""
        counts: dict[str, tuple[int, int]] = {}
        begin = 0
        for name, end in self.formats:
            end = min(end, self.tokens)
            docs = int(np.searchsorted(self.starts, end) - np.searchsorted(self.starts, begin))
            before = counts.get(name, (0, 0))
            counts[name] = (before[0] + docs, before[1] + end - begin)
            begin = end
        return counts

    def cut(self, keep: int) -> DocBatch:
        """The first `keep` ids of the batch."""
        formats = tuple((name, min(end, keep)) for name, end in self.formats)
        return DocBatch(self.ids[:keep], self.starts[self.starts < keep], self.context, formats=formats)


def tagged(batch: DocBatch, format_name: str) -> DocBatch:
    """The batch with all its ids marked as read from inputs of one format."""
    batch.formats = ((format_name, batch.tokens),)
    return batch


READ_COUNTS = ("files", "text_bytes", "invalid_utf8", "invalid_utf8_files", "skipped_binary", "skipped_unreadable")


@dataclass
class CorpusSummary:
    """What was read: the counts behind every statistic, and what was replaced or skipped."""

    inputs: list[str]
    files: int = 0
    documents: int = 0
    tokens: int = 0
    text_bytes: int = 0
    tokenized: bool = False
    invalid_utf8: int = 0
    invalid_utf8_files: int = 0
    skipped_binary: int = 0
    skipped_unreadable: int = 0
    truncated: bool = False
    formats: dict[str, dict[str, int]] = field(default_factory=dict)

    def count_format(self, name: str, files: int = 0, documents: int = 0, tokens: int = 0) -> None:
        """Add to the counts of one input format.

        Args:
            name: the format (`text`, `jsonl`, `parquet`, `megatron`, ...).
            files: files read in it.
            documents: documents that start in it.
            tokens: token ids read from it.
        """
        entry = self.formats.setdefault(name, {"files": 0, "documents": 0, "tokens": 0})
        entry["files"] += files
        entry["documents"] += documents
        entry["tokens"] += tokens

    def add_read(self, read: dict[str, int]) -> None:
        """Fold in counts of what was read (`files:FORMAT` keys count files per format)."""
        for name, amount in read.items():
            if name.startswith("files:"):
                self.count_format(name[len("files:") :], files=amount)
            else:
                setattr(self, name, getattr(self, name) + amount)

    def add(self, other: CorpusSummary) -> None:
        """Fold in what another reader (a cluster task) read of the same corpus."""
        for name in (*READ_COUNTS, "documents", "tokens"):
            setattr(self, name, getattr(self, name) + getattr(other, name))
        self.tokenized |= other.tokenized
        for name, counts in other.formats.items():
            self.count_format(name, **counts)

    def warnings(self) -> list[str]:
        """One line for each thing the reader replaced, skipped or cut, for people to see."""
        notes = []
        if self.invalid_utf8:
            files = "1 file" if self.invalid_utf8_files == 1 else f"{self.invalid_utf8_files:,} files"
            notes.append(f"replaced {self.invalid_utf8:,} invalid UTF-8 sequences in {files} by U+FFFD")
        if self.skipped_binary:
            notes.append(f"skipped {self.skipped_binary:,} binary files (NUL bytes) found in folders")
        if self.skipped_unreadable:
            notes.append(f"skipped {self.skipped_unreadable:,} unreadable files or folders (--skip-unreadable)")
        if self.truncated:
            notes.append(f"stopped at --max-tokens ({self.tokens:,} tokens)")
        return notes

    def to_json(self) -> dict[str, Any]:
        """The `corpus` section of `engram inspect --json` (without its timing)."""
        return {
            "inputs": self.inputs,
            "files": self.files,
            "documents": self.documents,
            "tokens": self.tokens,
            "text_bytes": self.text_bytes,
            "tokenized": self.tokenized,
            "invalid_utf8": self.invalid_utf8,
            "invalid_utf8_files": self.invalid_utf8_files,
            "skipped_binary": self.skipped_binary,
            "skipped_unreadable": self.skipped_unreadable,
            "truncated": self.truncated,
            "formats": {name: dict(counts) for name, counts in sorted(self.formats.items())},
        }


@dataclass(frozen=True)
class CorpusPart:
    """A piece of a corpus that a cluster task reads alone: whole files, or a span of one file
    in the units its reader splits by (ids, rows of a 2-D array, Parquet row groups)."""

    sources: tuple[Source, ...]
    span: tuple[int, int] | None = None

    @property
    def name(self) -> str:
        """A short name for messages and task keys: the first file, its span, how many more files."""
        first = self.sources[0].name
        span = f"[{self.span[0]}:{self.span[1]}]" if self.span else ""
        more = f"+{len(self.sources) - 1}" if len(self.sources) > 1 else ""
        return f"{first}{span}{more}"
