"""A corpus: every input file read by its reader, as batches of documents of raw token ids.

Text is tokenized with the projection's tokenizer in batches (the Rust tokenizer uses every
core) on a background thread, so reading and tokenizing overlap with whatever consumes the
batches; pre-tokenized inputs are read on a background thread too. Text inputs come first, then
pre-tokenized ones, each in input order. No input has to fit in memory: readers hand over
batches, a document that runs over a batch's end carries its tail to the next batch, and a
cluster part that starts inside a document carries that document's left context, so every
window is counted once with the context the hasher would see. The summary counts what was read,
per format too, as batches are consumed, and `max_tokens` cuts the last batch to fit.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from ..errors import EngramError
from ..vocab import VocabProjection
from .base import (
    ID_BATCH_TOKENS,
    TEXT_BATCH_CHARS,
    CorpusOptions,
    CorpusPart,
    CorpusSummary,
    DocBatch,
    tagged,
)
from .files import Source
from .ids import carry_tail
from .long_documents import PIECE_CHARS, added_tokens, pieces
from .readers import IdReader, IdReading, Span, TextReader, open_reader, reads_text
from .sources import find_sources

if TYPE_CHECKING:
    from tokenizers import Tokenizer


class Corpus:
    """The documents of a set of inputs as batches of raw token ids, in input order.

    `summary` fills in as batches are read. `context` is how many ids of a document's
    left context a batch that continues it must carry (max_ngram_size - 1). With `part`,
    only that part of the inputs is read (a cluster task's share).
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
        piece_chars: int = PIECE_CHARS,
    ) -> None:
        if not paths:
            raise EngramError("no corpus given: pass --corpus PATH (files or folders)")
        self.projection = projection
        self.options = options = options or CorpusOptions()
        self.context = context
        self.id_batch_tokens = id_batch_tokens
        self.text_batch_chars = text_batch_chars
        self.piece_chars = piece_chars
        self.part = part
        unreadable: list[str] | None = [] if options.skip_unreadable else None
        if part is not None:
            self.sources = list(part.sources)
        else:
            self.sources = find_sources(
                paths, options.glob, split=options.split, config=options.config, unreadable=unreadable
            )
        self.summary = CorpusSummary(inputs=[str(p) for p in paths], skipped_unreadable=len(unreadable or ()))
        self.total_bytes = sum(s.size for s in self.sources)
        self.bytes_done = 0
        self._tokenizer: Tokenizer | None = None
        self._read: dict[str, int] = {}

    def add_summary(self, other: CorpusSummary) -> None:
        """Fold in what a cluster task read of one part of this corpus."""
        self.summary.add(other)

    # the Tally that readers report to ---------------------------------------------------

    def count(self, name: str, amount: int = 1) -> None:
        """Tally: add to a read count, handed to the next batch."""
        self._read[name] = self._read.get(name, 0) + amount

    def advance(self, nbytes: int) -> None:
        """Tally: progress in bytes of the input files."""
        self.bytes_done += nbytes

    def _tagged(self, batch: DocBatch) -> DocBatch:
        """Hand the counts of what was read since the last batch to this one."""
        batch.read, self._read = self._read, {}
        return batch

    def _leftover(self) -> Iterator[DocBatch]:
        """An empty batch for what was read after the last batch (empty or skipped files)."""
        if any(self._read.values()):
            yield self._tagged(DocBatch(np.zeros(0, np.int64), np.zeros(0, np.int64)))

    def _span(self) -> Span | None:
        return None if self.part is None else self.part.span

    def _start(self, source: Source, span: Span | None) -> None:
        """Count a file once, however many parts read it."""
        if span is None or span[0] == 0:
            self.count("files")
            self.count(f"files:{source.kind}")

    def batches(self) -> Iterator[DocBatch]:
        """Every document once; stops at --max-tokens, cutting the last batch to fit."""
        limit = self.options.max_tokens
        text_sources = [s for s in self.sources if reads_text(s, self.options)]
        id_sources = [s for s in self.sources if not reads_text(s, self.options)]
        self.summary.tokenized = bool(text_sources)
        producers = []
        if text_sources:
            producers.append(lambda stop: self._text_batches(text_sources, stop))
        if id_sources:
            producers.append(lambda stop: self._id_batches(id_sources, stop))
        summary = self.summary
        for produce in producers:  # one after the other: readers report to one tally
            prefetch = _Prefetch(produce)
            try:
                for batch in prefetch:
                    summary.add_read(batch.read)
                    if limit is not None and summary.tokens + batch.tokens > limit:
                        batch = batch.cut(limit - summary.tokens)
                        summary.truncated = True
                    if batch.tokens:
                        summary.tokens += batch.tokens
                        summary.documents += int(batch.starts.size)
                        for name, (documents, tokens) in batch.per_format().items():
                            summary.count_format(name, documents=documents, tokens=tokens)
                        yield batch
                    if summary.truncated:
                        return
            finally:
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

    def _texts(self, sources: list[Source], stop: threading.Event) -> Iterator[tuple[str, str]]:
        """(format, text) of every text document."""
        span = self._span()
        for source in sources:
            if stop.is_set():
                return
            self._start(source, span)
            reader = open_reader(source, self.options)
            assert isinstance(reader, TextReader)
            for text in reader.texts(self, span):
                yield source.kind, text

    def _text_batches(self, sources: list[Source], stop: threading.Event) -> Iterator[DocBatch]:
        """Documents tokenized `text_batch_chars` at a time; a long document in pieces, so a
        batch may end inside one and the next carry its left context."""
        tokenizer = self.tokenizer()
        added = added_tokens(tokenizer)
        pending: list[str] = []
        formats: list[str] = []
        continues: list[bool] = []  # the text continues the document before it
        size = 0
        carry = np.zeros(0, np.int64)  # the last ids of the document the previous batch ended in
        for name, text in self._texts(sources, stop):
            for index, piece in enumerate(pieces(tokenizer, text, self.piece_chars, added)):
                pending.append(piece)
                formats.append(name)
                continues.append(index > 0)
                size += len(piece)
                if size >= self.text_batch_chars:
                    batch = self._encode(tokenizer, pending, formats, continues, carry)
                    carry = carry_tail(batch.ids, batch.starts, carry, self.context)
                    yield self._tagged(batch)
                    pending, formats, continues, size = [], [], [], 0
        if pending:
            yield self._tagged(self._encode(tokenizer, pending, formats, continues, carry))
        yield from self._leftover()

    def _encode(
        self, tokenizer: Any, texts: list[str], formats: list[str], continues: list[bool], carry: np.ndarray
    ) -> DocBatch:
        encodings = tokenizer.encode_batch_fast(texts, add_special_tokens=False)
        lengths = np.fromiter((len(e) for e in encodings), dtype=np.int64, count=len(encodings))
        ids = np.empty(int(lengths.sum()), dtype=np.int64)
        pos = 0
        for encoding, length in zip(encodings, lengths):
            ids[pos : pos + length] = encoding.ids
            pos += length
        ends = np.cumsum(lengths)
        new = (lengths > 0) & ~np.array(continues, dtype=bool)
        starts = (ends - lengths)[new]
        self.projection.check_ids(ids)
        runs = [
            (name, int(ends[i])) for i, name in enumerate(formats) if i + 1 == len(formats) or formats[i + 1] != name
        ]
        context = carry if continues[0] else np.zeros(0, np.int64)
        return DocBatch(ids, starts, context, formats=tuple(runs))

    # pre-tokenized ids ------------------------------------------------------------------

    def _id_batches(self, sources: list[Source], stop: threading.Event) -> Iterator[DocBatch]:
        reading = IdReading(self.id_batch_tokens, self.context, self.projection.vocab_size)
        span = self._span()
        for source in sources:
            if stop.is_set():
                return
            self._start(source, span)
            reader = open_reader(source, self.options)
            assert isinstance(reader, IdReader)
            for batch in reader.batches(self, reading, span):
                yield self._tagged(tagged(batch, source.kind))
        yield from self._leftover()


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
