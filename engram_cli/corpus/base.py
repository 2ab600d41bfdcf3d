"""The shared types of corpus reading: how to read, what a batch is, what was read, and batch sizes.

`CorpusOptions` says how to read the inputs, `DocBatch` is documents of raw token ids
concatenated, `CorpusSummary` counts what was read (and replaced or skipped), and `CorpusPart` is
a piece of a corpus that one cluster task reads alone.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

from ..errors import EngramError
from .sources import Source

DOC_PER = ("file", "line")
BIN_DTYPES = ("uint16", "uint32")
# Characters of text handed to one encode_batch call: enough for every core, small enough to overlap.
TEXT_BATCH_CHARS = 1 << 21
# Token ids per chunk of a pre-tokenized array.
ID_BATCH_TOKENS = 1 << 21
# Bytes looked at to tell a binary file from a text file in a folder walk.
BINARY_SNIFF_BYTES = 8192


@dataclass
class CorpusOptions:
    """How to read the inputs; the defaults read plain UTF-8 text, one document per file."""

    doc_per: str = "file"
    text_field: str = "text"
    bin_dtype: str = "uint16"
    doc_sep: int | None = None
    glob: str | None = None
    max_tokens: int | None = None

    def __post_init__(self) -> None:
        if self.doc_per not in DOC_PER:
            raise EngramError(f"--doc-per must be one of {', '.join(DOC_PER)}, got {self.doc_per!r}")
        if self.bin_dtype not in BIN_DTYPES:
            raise EngramError(f"--bin-dtype must be one of {', '.join(BIN_DTYPES)}, got {self.bin_dtype!r}")
        if self.doc_sep is not None and self.doc_sep < 0:
            raise EngramError(f"--doc-sep must be a non-negative token id, got {self.doc_sep}")
        if self.max_tokens is not None and self.max_tokens < 1:
            raise EngramError(f"--max-tokens must be positive, got {self.max_tokens}")


@dataclass
class DocBatch:
    """Documents concatenated: `starts` are the indices in `ids` where a document begins.

    When `ids[0]` continues a document from the previous batch, `context` holds that
    document's raw ids just before it (at most max_ngram_size - 1 of them).
    """

    ids: np.ndarray
    starts: np.ndarray
    context: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))
    read: dict[str, int] = field(default_factory=dict)  # files, bytes, ... read to make this batch

    @property
    def tokens(self) -> int:
        """How many token ids the batch holds."""
        return int(self.ids.size)


_READ_COUNTS = ("files", "text_bytes", "invalid_utf8", "invalid_utf8_files", "skipped_binary")


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
    truncated: bool = False

    def warnings(self) -> list[str]:
        """One line for each thing the reader replaced, skipped or cut, for people to see."""
        notes = []
        if self.invalid_utf8:
            files = "1 file" if self.invalid_utf8_files == 1 else f"{self.invalid_utf8_files:,} files"
            notes.append(f"replaced {self.invalid_utf8:,} invalid UTF-8 sequences in {files} by U+FFFD")
        if self.skipped_binary:
            notes.append(f"skipped {self.skipped_binary:,} binary files (NUL bytes) found in folders")
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
            "truncated": self.truncated,
        }


@dataclass(frozen=True)
class CorpusPart:
    """A piece of a corpus that a cluster task reads alone: whole files, or a range of the
    ids (of the documents, for a 2-D array) of one pre-tokenized file."""

    sources: tuple[Source, ...]
    id_range: tuple[int, int] | None = None

    @property
    def name(self) -> str:
        """A short name for messages and task keys: the first file, its id range, how many more files."""
        first = self.sources[0].path.name
        span = f"[{self.id_range[0]}:{self.id_range[1]}]" if self.id_range else ""
        more = f"+{len(self.sources) - 1}" if len(self.sources) > 1 else ""
        return f"{first}{span}{more}"
