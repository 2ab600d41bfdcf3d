"""Reading corpora into documents of token ids: text files and folders, jsonl, .npy and .bin.

Text is tokenized with the projection's tokenizer in batches (the Rust tokenizer
uses every core) on a background thread, so reading and tokenizing overlap with
whatever consumes the batches. Pre-tokenized arrays are memory-mapped and read in
chunks, so no input has to fit in memory; a stream split into documents at a
separator carries the tail of its last document from chunk to chunk.
"""

from __future__ import annotations

import fnmatch
import json
import os
import queue
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from .errors import EngramError
from .vocab import VocabProjection

DOC_PER = ("file", "line")
BIN_DTYPES = ("uint16", "uint32")
# Characters of text handed to one encode_batch call: enough for every core, small enough to overlap.
TEXT_BATCH_CHARS = 1 << 21
# Token ids per chunk of a pre-tokenized array.
ID_BATCH_TOKENS = 1 << 21
# Bytes looked at to tell a binary file from a text file in a folder walk.
BINARY_SNIFF_BYTES = 8192
_REPLACEMENT_BYTES = "\ufffd".encode("utf-8")


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
        return {
            "inputs": self.inputs, "files": self.files, "documents": self.documents,
            "tokens": self.tokens, "text_bytes": self.text_bytes, "tokenized": self.tokenized,
            "invalid_utf8": self.invalid_utf8, "invalid_utf8_files": self.invalid_utf8_files,
            "skipped_binary": self.skipped_binary, "truncated": self.truncated,
        }


@dataclass(frozen=True)
class _Source:
    path: Path
    kind: str  # "text" | "jsonl" | "npy" | "bin"
    from_folder: bool


def _kind(path: Path) -> str:
    suffix = path.suffix.lower()
    return {".jsonl": "jsonl", ".npy": "npy", ".bin": "bin"}.get(suffix, "text")


def _hidden(path: Path, root: Path) -> bool:
    return any(part.startswith(".") for part in path.relative_to(root).parts)


def find_sources(paths: list[str | Path], glob: str | None = None) -> list[_Source]:
    """Every input file, folders walked recursively in sorted order (hidden entries skipped)."""
    sources = []
    for raw in paths:
        path = Path(raw)
        if path.is_dir():
            found = sorted(p for p in path.rglob(glob or "*") if p.is_file() and not _hidden(p, path))
            sources += [_Source(p, _kind(p), True) for p in found]
        elif path.is_file():
            if glob and not fnmatch.fnmatch(path.name, glob):
                raise EngramError(f"--corpus {path} does not match --glob {glob!r}")
            sources.append(_Source(path, _kind(path), False))
        elif path.exists():
            raise EngramError(f"corpus input {path} is neither a file nor a folder")
        else:
            raise EngramError(f"no such corpus file or folder: {path}")
    return sources


def decode_utf8(data: bytes) -> tuple[str, int]:
    """Text of `data` with invalid sequences replaced, and how many were replaced."""
    try:
        return data.decode("utf-8"), 0
    except UnicodeDecodeError:
        text = data.decode("utf-8", errors="replace")
        return text, text.count("\ufffd") - data.count(_REPLACEMENT_BYTES)


class Corpus:
    """The documents of a set of inputs as batches of raw token ids, in input order.

    `summary` fills in as batches are read. `context` is how many ids of a document's
    left context a batch that continues it must carry (max_ngram_size - 1).
    """

    def __init__(self, paths: list[str | Path], projection: VocabProjection,
                 options: CorpusOptions | None = None, context: int = 1,
                 id_batch_tokens: int = ID_BATCH_TOKENS, text_batch_chars: int = TEXT_BATCH_CHARS,
                 part: CorpusPart | None = None) -> None:
        if not paths:
            raise EngramError("no corpus given: pass --corpus PATH (files or folders)")
        self.projection = projection
        self.options = options or CorpusOptions()
        self.context = context
        self.id_batch_tokens = id_batch_tokens
        self.text_batch_chars = text_batch_chars
        self.part = part
        self.sources = list(part.sources) if part is not None else find_sources(paths, self.options.glob)
        self.summary = CorpusSummary(inputs=[str(p) for p in paths])
        self.total_bytes = sum(s.path.stat().st_size for s in self.sources)
        self.bytes_done = 0
        self._tokenizer = None
        self._read = dict.fromkeys(_READ_COUNTS, 0)

    def add_summary(self, other: CorpusSummary) -> None:
        """Fold in what a cluster task read of one part of this corpus."""
        for name in (*_READ_COUNTS, "documents", "tokens"):
            setattr(self.summary, name, getattr(self.summary, name) + getattr(other, name))
        self.summary.tokenized |= other.tokenized

    def _count(self, name: str, amount: int = 1) -> None:
        self._read[name] += amount

    def _tagged(self, batch: DocBatch) -> DocBatch:
        """Hand the counts of what was read since the last batch to this one."""
        batch.read, self._read = self._read, dict.fromkeys(_READ_COUNTS, 0)
        return batch

    def _leftover(self) -> Iterator[DocBatch]:
        """An empty batch for what was read after the last batch (empty or skipped files)."""
        if any(self._read.values()):
            yield self._tagged(DocBatch(np.zeros(0, np.int64), np.zeros(0, np.int64)))

    def batches(self) -> Iterator[DocBatch]:
        """Every document once; stops at --max-tokens, cutting the last batch to fit."""
        limit = self.options.max_tokens
        text_sources = [s for s in self.sources if s.kind in ("text", "jsonl")]
        id_sources = [s for s in self.sources if s.kind in ("npy", "bin")]
        self.summary.tokenized = bool(text_sources)
        prefetch = _Prefetch(lambda stop: self._text_batches(text_sources, stop)) if text_sources else None
        try:
            streams = [iter(prefetch)] if prefetch else []
            if id_sources:
                streams.append(self._id_batches(id_sources))
            for stream in streams:
                for batch in stream:
                    for name, amount in batch.read.items():
                        setattr(self.summary, name, getattr(self.summary, name) + amount)
                    if limit is not None and self.summary.tokens + batch.tokens > limit:
                        batch = _cut(batch, limit - self.summary.tokens)
                        self.summary.truncated = True
                    if batch.tokens:
                        self.summary.tokens += batch.tokens
                        self.summary.documents += int(batch.starts.size)
                        yield batch
                    if self.summary.truncated:
                        return
        finally:
            if prefetch is not None:
                prefetch.close()

    # text ------------------------------------------------------------------------------

    def tokenizer(self) -> Any:
        """The projection's tokenizer, with any truncation or padding in its JSON switched off."""
        if self._tokenizer is None:
            tok = self.projection.tokenizer()
            if tok.truncation is not None or tok.padding is not None:
                from tokenizers import Tokenizer

                tok = Tokenizer.from_str(tok.to_str())
                tok.no_truncation()
                tok.no_padding()
            self._tokenizer = tok
        return self._tokenizer

    def _texts(self, sources: list[_Source], stop: threading.Event) -> Iterator[str]:
        for source in sources:
            if stop.is_set():
                return
            self._count("files")
            if source.kind == "jsonl":
                yield from self._jsonl_texts(source)
            elif self.options.doc_per == "line":
                yield from self._line_texts(source)
            else:
                data = _read_bytes(source.path)
                self.bytes_done += len(data)
                if source.from_folder and b"\0" in data[:BINARY_SNIFF_BYTES]:
                    self._count("files", -1)
                    self._count("skipped_binary")
                    continue
                text, bad = self._decoded(data)
                self._count("invalid_utf8_files", int(bad > 0))
                yield text

    def _decoded(self, data: bytes) -> tuple[str, int]:
        text, bad = decode_utf8(data)
        self._count("text_bytes", len(data))
        self._count("invalid_utf8", bad)
        return text, bad

    def _lines(self, source: _Source) -> Iterator[tuple[int, str]]:
        """Number and text of every line of a file, counting invalid UTF-8 once per file."""
        file_bad = False
        try:
            with open(source.path, "rb") as handle:
                if source.from_folder and b"\0" in handle.peek(BINARY_SNIFF_BYTES)[:BINARY_SNIFF_BYTES]:
                    self._count("files", -1)
                    self._count("skipped_binary")
                    self.bytes_done += source.path.stat().st_size
                    return
                for number, line in enumerate(handle, start=1):
                    self.bytes_done += len(line)
                    text, bad = self._decoded(line.rstrip(b"\r\n"))
                    if bad and not file_bad:
                        self._count("invalid_utf8_files")
                        file_bad = True
                    yield number, text
        except OSError as exc:
            raise EngramError(f"cannot read {source.path}: {exc.strerror or exc}") from None

    def _line_texts(self, source: _Source) -> Iterator[str]:
        return (text for _, text in self._lines(source) if text)

    def _jsonl_texts(self, source: _Source) -> Iterator[str]:
        field_name = self.options.text_field
        path = source.path
        for number, line in self._lines(source):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as exc:
                raise EngramError(f"{path}:{number}: not valid JSON ({exc.msg})") from None
            if not isinstance(record, dict) or field_name not in record:
                keys = ", ".join(sorted(record)) if isinstance(record, dict) else type(record).__name__
                raise EngramError(f"{path}:{number}: no {field_name!r} field (has: {keys}); "
                                  "choose the field with --text-field")
            value = record[field_name]
            if not isinstance(value, str):
                raise EngramError(f"{path}:{number}: field {field_name!r} is {type(value).__name__}, "
                                  "not a string")
            if value:
                yield value

    def _text_batches(self, sources: list[_Source], stop: threading.Event) -> Iterator[DocBatch]:
        tokenizer = self.tokenizer()
        pending: list[str] = []
        size = 0
        for text in self._texts(sources, stop):
            pending.append(text)
            size += len(text)
            if size >= self.text_batch_chars:
                yield self._tagged(self._encode(tokenizer, pending))
                pending, size = [], 0
        if pending:
            yield self._tagged(self._encode(tokenizer, pending))
        yield from self._leftover()

    def _encode(self, tokenizer: Any, texts: list[str]) -> DocBatch:
        encodings = tokenizer.encode_batch_fast(texts, add_special_tokens=False)
        lengths = np.fromiter((len(e) for e in encodings), dtype=np.int64, count=len(encodings))
        ids = np.empty(int(lengths.sum()), dtype=np.int64)
        pos = 0
        for encoding, length in zip(encodings, lengths):
            ids[pos:pos + length] = encoding.ids
            pos += length
        nonempty = lengths > 0
        starts = (np.cumsum(lengths) - lengths)[nonempty]
        self.projection.check_ids(ids)
        return DocBatch(ids, starts)

    # pre-tokenized ids ------------------------------------------------------------------

    def _id_batches(self, sources: list[_Source]) -> Iterator[DocBatch]:
        ids_range = None if self.part is None else self.part.id_range
        for source in sources:
            if ids_range is None or ids_range[0] == 0:  # a file split over parts counts once
                self._count("files")
            array = _open_ids(source.path, source.kind, self.options.bin_dtype)
            if array.ndim == 2:
                batches = self._row_batches(array, source.path, *(ids_range or (0, array.shape[0])))
            else:
                batches = self._stream_batches(array, source.path, *(ids_range or (0, array.shape[0])))
            for batch in batches:
                yield self._tagged(batch)
            self.bytes_done += source.path.stat().st_size
        yield from self._leftover()

    def _row_batches(self, array: _IdFile, path: Path, first: int, end: int) -> Iterator[DocBatch]:
        """Documents (rows) [first, end) of a 2-D array."""
        length = array.shape[1]
        if length == 0:
            return
        step = max(1, self.id_batch_tokens // length)
        for lo in range(first, end, step):
            chunk = array.read(lo, min(lo + step, end))
            _check_chunk(chunk, path, self.projection.vocab_size, lambda i: [lo + i[0], i[1]])
            yield DocBatch(chunk.reshape(-1), np.arange(chunk.shape[0], dtype=np.int64) * length)

    def _stream_batches(self, array: _IdFile, path: Path, first: int, end: int) -> Iterator[DocBatch]:
        """Ids [first, end) of one stream, split at --doc-sep (the separators themselves are
        dropped); a range that starts inside a document carries that document's left context."""
        sep = self.options.doc_sep
        at_start, tail = _stream_state(array, first, sep, self.context)
        for lo in range(first, end, self.id_batch_tokens):
            raw = array.read(lo, min(lo + self.id_batch_tokens, end))
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
            _check_chunk(ids, path, self.projection.vocab_size, where)
            ids = ids.astype(np.int64, copy=False)
            starts = np.flatnonzero(flags)
            context = np.zeros(0, np.int64) if (starts.size and starts[0] == 0) else tail
            current = ids[starts[-1]:] if starts.size else np.concatenate([tail, ids])
            tail = current[max(0, current.size - self.context):].copy()
            at_start = bool(sep is not None and raw.size and raw[-1] == sep) or (at_start and ids.size == 0)
            if ids.size:
                yield DocBatch(ids, starts, context)


def _stream_state(array: _IdFile, position: int, sep: int | None, context: int) -> tuple[bool, np.ndarray]:
    """Whether a document starts at `position` of a stream, and the last `context` ids of the
    document that runs into it: what a reader that started at 0 would carry there."""
    empty = np.zeros(0, np.int64)
    if position == 0:
        return True, empty
    if sep is None:
        return False, array.read(max(0, position - context), position).astype(np.int64)
    window = max(64, 2 * context)
    while True:
        lo = max(0, position - window)
        before = array.read(lo, position).astype(np.int64)
        cuts = np.flatnonzero(before == sep)
        if cuts.size and cuts[-1] == before.size - 1:
            return True, empty
        kept = before[cuts[-1] + 1:] if cuts.size else before
        if cuts.size or kept.size >= context or lo == 0:
            return False, kept[max(0, kept.size - context):].copy()
        window *= 2


@dataclass(frozen=True)
class CorpusPart:
    """A piece of a corpus that a cluster task reads alone: whole files, or a range of the
    ids (of the documents, for a 2-D array) of one pre-tokenized file."""

    sources: tuple[_Source, ...]
    id_range: tuple[int, int] | None = None

    @property
    def name(self) -> str:
        first = self.sources[0].path.name
        span = f"[{self.id_range[0]}:{self.id_range[1]}]" if self.id_range else ""
        more = f"+{len(self.sources) - 1}" if len(self.sources) > 1 else ""
        return f"{first}{span}{more}"


def split_corpus(corpus: Corpus, parts: int, min_ids: int = ID_BATCH_TOKENS) -> list[CorpusPart]:
    """Cut a corpus into about `parts` pieces of similar size, in input order: text files in
    groups, each pre-tokenized file in ranges of at least `min_ids` ids (rows of a 2-D array)."""
    options, sources = corpus.options, corpus.sources
    if options.max_tokens is not None:
        raise EngramError("--max-tokens reads the inputs in order and cannot be split over a cluster; "
                          "drop it, or run without --scheduler/--dask-workers")
    texts = [s for s in sources if s.kind in ("text", "jsonl")]
    total = sum(s.path.stat().st_size for s in sources) or 1
    target = max(1, total // max(1, parts))
    pieces: list[CorpusPart] = []
    group: list[_Source] = []
    size = 0
    for source in texts:
        group.append(source)
        size += source.path.stat().st_size
        if size >= target:
            pieces.append(CorpusPart(tuple(group)))
            group, size = [], 0
    if group:
        pieces.append(CorpusPart(tuple(group)))
    for source in sources:
        if source.kind not in ("npy", "bin"):
            continue
        array = _open_ids(source.path, source.kind, options.bin_dtype)
        count = array.shape[0]
        width = array.shape[1] if array.ndim == 2 else 1
        unit_bytes = max(1, source.path.stat().st_size // max(1, count))
        step = max(1, -(-min_ids // max(1, width)), target // unit_bytes)
        pieces += [CorpusPart((source,), (lo, min(lo + step, count))) for lo in range(0, count, step)]
        if count == 0:
            pieces.append(CorpusPart((source,), (0, 0)))
    return pieces


def _read_bytes(path: Path) -> bytes:
    try:
        return path.read_bytes()
    except OSError as exc:
        raise EngramError(f"cannot read {path}: {exc.strerror or exc}") from None


@dataclass(frozen=True)
class _IdFile:
    """Where the ids of a .npy or .bin file lie, read a chunk at a time with plain file reads.

    (A memory map would do, but every page it touches counts as resident memory until unmapped.)
    """

    path: Path
    dtype: np.dtype
    shape: tuple[int, ...]
    offset: int

    @property
    def ndim(self) -> int:
        return len(self.shape)

    def read(self, lo: int, hi: int) -> np.ndarray:
        """Ids [lo, hi) of a 1-D file, or rows [lo, hi) of a 2-D one."""
        width = self.shape[1] if self.ndim == 2 else 1
        hi = min(hi, self.shape[0])
        try:
            with open(self.path, "rb") as handle:
                handle.seek(self.offset + lo * width * self.dtype.itemsize)
                data = np.fromfile(handle, dtype=self.dtype, count=(hi - lo) * width)
        except OSError as exc:
            raise EngramError(f"cannot read {self.path}: {exc.strerror or exc}") from None
        if data.size != (hi - lo) * width:
            raise EngramError(f"{self.path} is shorter than its header says; is it truncated?")
        return data.reshape(-1, width) if self.ndim == 2 else data


def _open_ids(path: Path, kind: str, bin_dtype: str) -> _IdFile:
    """The ids of a .npy (1-D or 2-D, C order) or of a raw .bin file."""
    if kind == "npy":
        try:
            array = np.load(path, mmap_mode="r", allow_pickle=False)
        except (ValueError, OSError, EOFError) as exc:
            raise EngramError(f"{path} is not a readable .npy file: {exc}") from None
        if array.dtype.kind not in "iu":
            raise EngramError(f"{path}: token ids must be integers, got dtype {array.dtype}")
        if array.ndim not in (1, 2):
            raise EngramError(f"{path}: expected token ids of shape (T,) or (B, T), got {array.shape}")
        if not array.flags.c_contiguous:
            raise EngramError(f"{path} is stored in Fortran order; save it in C order "
                              "(np.save(path, np.ascontiguousarray(ids)))")
        return _IdFile(path, array.dtype, array.shape, int(getattr(array, "offset", 0)))
    dtype = np.dtype(bin_dtype).newbyteorder("<")
    size = path.stat().st_size
    if size % dtype.itemsize:
        raise EngramError(f"{path}: {size:,} bytes is not a whole number of {bin_dtype} ids "
                          f"({dtype.itemsize} bytes each); is --bin-dtype right?")
    return _IdFile(path, dtype, (size // dtype.itemsize,), 0)


def _check_chunk(ids: np.ndarray, path: Path, vocab_size: int, where: Callable[[tuple], list[int]]) -> None:
    """Refuse negative ids and ids past the vocab, naming the file and the position in it."""
    if not ids.size:
        return
    low, high = ids.min(), ids.max()
    if low >= 0 and high < vocab_size:
        return
    bad = np.argwhere((ids < 0) | (ids >= vocab_size))[0]
    value = int(ids[tuple(bad)])
    position = where(tuple(int(i) for i in bad))
    shown = position[0] if len(position) == 1 else position
    reason = "is negative" if value < 0 else f"is not below the projection's vocab size {vocab_size}"
    raise EngramError(f"{path}: token id {value} at position {shown} {reason}")


def _cut(batch: DocBatch, keep: int) -> DocBatch:
    starts = batch.starts[batch.starts < keep]
    return DocBatch(batch.ids[:keep], starts, batch.context)


class _Prefetch:
    """Run a producer on a thread, `depth` items ahead, re-raising its errors in the consumer."""

    _DONE = object()

    def __init__(self, produce: Callable[[threading.Event], Iterator[Any]], depth: int = 2) -> None:
        self._queue: queue.Queue = queue.Queue(maxsize=depth)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, args=(produce,), daemon=True)
        self._thread.start()

    def _run(self, produce: Callable[[threading.Event], Iterator[Any]]) -> None:
        try:
            for item in produce(self._stop):
                if not self._put(item):
                    return
        except BaseException as exc:  # handed to the consumer, which re-raises it
            self._put(exc)
            return
        self._put(self._DONE)

    def _put(self, item: Any) -> bool:
        while not self._stop.is_set():
            try:
                self._queue.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def __iter__(self) -> Iterator[Any]:
        try:
            while True:
                item = self._queue.get()
                if item is self._DONE:
                    return
                if isinstance(item, BaseException):
                    raise item
                yield item
        finally:
            self.close()

    def close(self) -> None:
        self._stop.set()
        self._thread.join()


def cpu_count() -> int:
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # macOS and Windows
        return max(1, os.cpu_count() or 1)
