"""Reading corpora into documents of token ids: text files and folders, jsonl, .npy and .bin.

Text is tokenized with the projection's tokenizer in batches (the Rust tokenizer
uses every core) on a background thread, so reading and tokenizing overlap with
whatever consumes the batches. Pre-tokenized arrays are read in chunks, so no input has to fit in
memory; a stream split into documents at a separator carries the tail of its last document from
chunk to chunk, and a cluster part that starts inside a document carries that document's left
context, so every window is counted once with the context the hasher would see.
"""

from __future__ import annotations

import json
import queue
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from ..errors import EngramError
from ..vocab import VocabProjection
from .base import (
    _READ_COUNTS,
    BINARY_SNIFF_BYTES,
    ID_BATCH_TOKENS,
    TEXT_BATCH_CHARS,
    CorpusOptions,
    CorpusPart,
    CorpusSummary,
    DocBatch,
)
from .ids import IdFile, check_chunk, open_ids, stream_state
from .sources import Source, find_sources
from .text import decode_utf8, read_bytes

if TYPE_CHECKING:
    from tokenizers import Tokenizer


class Corpus:
    """The documents of a set of inputs as batches of raw token ids, in input order.

    `summary` fills in as batches are read. `context` is how many ids of a document's
    left context a batch that continues it must carry (max_ngram_size - 1).
    """

    def __init__(
        self,
        paths: list[str | Path],
        projection: VocabProjection,
        options: CorpusOptions | None = None,
        context: int = 1,
        id_batch_tokens: int = ID_BATCH_TOKENS,
        text_batch_chars: int = TEXT_BATCH_CHARS,
        part: CorpusPart | None = None,
    ) -> None:
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
        self._tokenizer: Tokenizer | None = None
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

    def _texts(self, sources: list[Source], stop: threading.Event) -> Iterator[str]:
        for source in sources:
            if stop.is_set():
                return
            self._count("files")
            if source.kind == "jsonl":
                yield from self._jsonl_texts(source)
            elif self.options.doc_per == "line":
                yield from self._line_texts(source)
            else:
                data = read_bytes(source.path)
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

    def _lines(self, source: Source) -> Iterator[tuple[int, str]]:
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

    def _line_texts(self, source: Source) -> Iterator[str]:
        return (text for _, text in self._lines(source) if text)

    def _jsonl_texts(self, source: Source) -> Iterator[str]:
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
                raise EngramError(
                    f"{path}:{number}: no {field_name!r} field (has: {keys}); choose the field with --text-field"
                )
            value = record[field_name]
            if not isinstance(value, str):
                raise EngramError(f"{path}:{number}: field {field_name!r} is {type(value).__name__}, not a string")
            if value:
                yield value

    def _text_batches(self, sources: list[Source], stop: threading.Event) -> Iterator[DocBatch]:
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
            ids[pos : pos + length] = encoding.ids
            pos += length
        nonempty = lengths > 0
        starts = (np.cumsum(lengths) - lengths)[nonempty]
        self.projection.check_ids(ids)
        return DocBatch(ids, starts)

    # pre-tokenized ids ------------------------------------------------------------------

    def _id_batches(self, sources: list[Source]) -> Iterator[DocBatch]:
        ids_range = None if self.part is None else self.part.id_range
        for source in sources:
            if ids_range is None or ids_range[0] == 0:  # a file split over parts counts once
                self._count("files")
            array = open_ids(source.path, source.kind, self.options.bin_dtype)
            if array.ndim == 2:
                batches = self._row_batches(array, source.path, *(ids_range or (0, array.shape[0])))
            else:
                batches = self._stream_batches(array, source.path, *(ids_range or (0, array.shape[0])))
            for batch in batches:
                yield self._tagged(batch)
            self.bytes_done += source.path.stat().st_size
        yield from self._leftover()

    def _row_batches(self, array: IdFile, path: Path, first: int, end: int) -> Iterator[DocBatch]:
        """Documents (rows) [first, end) of a 2-D array."""
        length = array.shape[1]
        if length == 0:
            return
        step = max(1, self.id_batch_tokens // length)
        for lo in range(first, end, step):
            chunk = array.read(lo, min(lo + step, end))
            check_chunk(chunk, path, self.projection.vocab_size, lambda i: [lo + i[0], i[1]])
            yield DocBatch(chunk.reshape(-1), np.arange(chunk.shape[0], dtype=np.int64) * length)

    def _stream_batches(self, array: IdFile, path: Path, first: int, end: int) -> Iterator[DocBatch]:
        """Ids [first, end) of one stream, split at --doc-sep (the separators themselves are
        dropped); a range that starts inside a document carries that document's left context."""
        sep = self.options.doc_sep
        at_start, tail = stream_state(array, first, sep, self.context)
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
            check_chunk(ids, path, self.projection.vocab_size, where)
            ids = ids.astype(np.int64, copy=False)
            starts = np.flatnonzero(flags)
            context = np.zeros(0, np.int64) if (starts.size and starts[0] == 0) else tail
            current = ids[starts[-1] :] if starts.size else np.concatenate([tail, ids])
            tail = current[max(0, current.size - self.context) :].copy()
            at_start = bool(sep is not None and raw.size and raw[-1] == sep) or (at_start and ids.size == 0)
            if ids.size:
                yield DocBatch(ids, starts, context)


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
