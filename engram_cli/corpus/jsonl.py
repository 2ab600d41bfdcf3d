"""JSON inputs, plain or compressed: JSON lines (`.jsonl`, `.ndjson`, and `.json` files whose first
character is not `[`) and JSON arrays of records (`.json` starting with `[`).

Each record is an object and one document: its `--text-field` string, or with `--ids-field` its
list of token ids. Lines are parsed one at a time; an array is parsed one element at a time from
a growing window of decoded text, so neither form is ever held whole. Errors name the file and
line (`docs.jsonl:3: ...`) or element (`docs.json[2]: ...`).

Any valid JSON is parsed. An integer of more than `HUGE_DIGITS` digits (past Python's limit on
converting digits to `int`, which guards against quadratic conversion time) is read as an
infinite float: in a field the reader does not use it is ignored, as a token id it is refused as
not an integer. A text field holding a lone UTF-16 surrogate (`"\ud800"`, valid JSON but not a
Unicode string) has each surrogate replaced by U+FFFD and counted as invalid UTF-8, as the text
reader does for bytes that are not UTF-8.
"""

from __future__ import annotations

import codecs
import json
import re
from collections.abc import Iterator
from typing import IO, Any

import numpy as np

from ..errors import FormatError
from .base import CorpusOptions, DocBatch
from .compressed import open_stream
from .files import Source
from .ids import first_bad_id
from .readers import IdReader, IdReading, Span, Tally, TextReader
from .records import RowBatcher, chosen_field
from .text import Utf8Lines, decoded_lines, skip_binary, sniff

# Characters of a JSON array decoded at a time.
ARRAY_CHARS = 1 << 20

_WHITESPACE = " \t\r\n"
# Longest JSON token that parsing can fail at the start of when cut short (`\uXXXX`, `false`).
_LONGEST_TOKEN = 16
# Digits of the longest integer read exactly (Python's default int_max_str_digits is 4,300).
HUGE_DIGITS = 4000


def _parse_int(digits: str) -> int | float:
    """A JSON integer: exact, or past `HUGE_DIGITS` digits an infinite float of its sign."""
    if len(digits) <= HUGE_DIGITS:
        return int(digits)
    return float("-inf") if digits.startswith("-") else float("inf")


_DECODER = json.JSONDecoder(parse_int=_parse_int)
_SURROGATE = re.compile("[\ud800-\udfff]")


class _JsonRecords:
    """The records of one JSON file with where each came from, counting what was read."""

    def __init__(self, source: Source, options: CorpusOptions) -> None:
        self.source = source
        self.field, self.flag = chosen_field(options)

    def records(self, tally: Tally) -> Iterator[tuple[str, Any]]:
        """(where, record) of every record: `file:line` or `file[element]`, and the parsed JSON."""
        with open_stream(self.source) as (stream, compression):
            head = sniff(stream)
            if skip_binary(self.source, head, tally):
                return
            first = head.lstrip()[:1]
            if self.source.kind == "json" and first == b"[":
                yield from self._array(stream, tally, compression is None)
            else:
                yield from self._lines(stream, tally, compression is None)
        if compression is not None:
            tally.advance(self.source.size)

    def _lines(self, stream: IO[bytes], tally: Tally, plain: bool) -> Iterator[tuple[str, Any]]:
        for number, text in enumerate(decoded_lines(stream, tally, plain), start=1):
            if not text.strip():
                continue
            where = f"{self.source}:{number}"
            try:
                record = _DECODER.decode(text)
            except json.JSONDecodeError as exc:
                raise FormatError(f"{where}: not valid JSON ({exc.msg})") from None
            except RecursionError:
                raise FormatError(f"{where}: JSON nested too deeply to read") from None
            yield where, record

    def _array(self, stream: IO[bytes], tally: Tally, plain: bool) -> Iterator[tuple[str, Any]]:
        decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        buffer, pos, ended, index = "", 0, False, 0
        expect_value = True  # after "[" or ","

        def more() -> bool:
            nonlocal buffer, pos, ended
            data = stream.read(ARRAY_CHARS)
            if plain:
                tally.advance(len(data))
            tally.count("text_bytes", len(data))
            text = decoder.decode(data, final=not data)
            bad = text.count("\ufffd") - data.count(b"\xef\xbf\xbd")
            if bad > 0:
                tally.count("invalid_utf8", bad)
            buffer, pos = buffer[pos:] + text, 0
            ended = not data
            return bool(data)

        def skip_space() -> bool:
            nonlocal pos
            while True:
                while pos < len(buffer) and buffer[pos] in _WHITESPACE:
                    pos += 1
                if pos < len(buffer):
                    return True
                if ended or not more():
                    return False

        skip_space()
        pos += 1  # the "[" that made this an array
        while True:
            if not skip_space():
                raise FormatError(f"{self.source}: the JSON array ends before its closing ']'")
            char = buffer[pos]
            if char == "]":
                pos += 1
                if skip_space():
                    raise FormatError(f"{self.source}: text after the end of the JSON array")
                return
            if not expect_value:
                if char != ",":
                    raise FormatError(f"{self.source}[{index}]: expected ',' or ']' in the JSON array")
                pos += 1
                expect_value = True
                continue
            while True:
                try:
                    record, end = _DECODER.raw_decode(buffer, pos)
                    break
                except RecursionError:
                    raise FormatError(f"{self.source}[{index}]: JSON nested too deeply to read") from None
                except json.JSONDecodeError as exc:
                    # An element cut by the window's end fails at (or a token before) the end, or
                    # inside an unterminated string; only those are worth more text.
                    cut = exc.msg.startswith("Unterminated string") or exc.pos >= len(buffer) - _LONGEST_TOKEN
                    if not cut or ended or not more():
                        raise FormatError(f"{self.source}[{index}]: not valid JSON ({exc.msg})") from None
            pos = end
            expect_value = False
            yield f"{self.source}[{index}]", record
            index += 1

    def value(self, where: str, record: Any) -> Any:
        """The chosen field of a record, refused with the fields there are when it is missing."""
        if not isinstance(record, dict) or self.field not in record:
            keys = ", ".join(sorted(record)) if isinstance(record, dict) else type(record).__name__
            raise FormatError(f"{where}: no {self.field!r} field (has: {keys}); choose the field with {self.flag}")
        return record[self.field]


def _without_surrogates(text: str, lines: Utf8Lines) -> str:
    """`text` with each lone surrogate (which no tokenizer takes) replaced by U+FFFD and counted."""
    if text.isascii():
        return text
    cleaned, count = _SURROGATE.subn("\ufffd", text)
    lines.replaced(count)
    return cleaned


class JsonTextReader(TextReader):
    def texts(self, tally: Tally, span: Span | None = None) -> Iterator[str]:
        records = _JsonRecords(self.source, self.options)
        lines = Utf8Lines(tally)
        for where, record in records.records(tally):
            value = records.value(where, record)
            if not isinstance(value, str):
                raise FormatError(f"{where}: field {records.field!r} is {type(value).__name__}, not a string")
            if value:
                yield _without_surrogates(value, lines)


class JsonIdReader(IdReader):
    def batches(self, tally: Tally, reading: IdReading, span: Span | None = None) -> Iterator[DocBatch]:
        records = _JsonRecords(self.source, self.options)
        rows = RowBatcher(reading.batch_tokens)
        for where, record in records.records(tally):
            value = records.value(where, record)
            try:
                ids = np.array(value) if isinstance(value, list) else None
            except (ValueError, OverflowError):
                ids = None
            if ids is None or ids.ndim != 1 or (ids.size and ids.dtype.kind not in "iu"):
                raise FormatError(f"{where}: field {records.field!r} is not a list of integer token ids")
            ids = ids.astype(np.int64)
            bad = first_bad_id(ids, reading.vocab_size)
            if bad is not None:
                at, reason = bad
                raise FormatError(f"{where}: token id {int(ids[at])} at position {at} {reason}")
            yield from rows.add(ids, np.array([ids.size], np.int64))
        yield from rows.finish()


def make_reader(source: Source, options: CorpusOptions) -> JsonTextReader | JsonIdReader:
    """Ids from `--ids-field`, else text from `--text-field`."""
    return JsonIdReader(source, options) if options.ids_field is not None else JsonTextReader(source, options)
