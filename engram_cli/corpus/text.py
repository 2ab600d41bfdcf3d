"""Plain UTF-8 text: one document per file, or per line with `--doc-per line`.

Invalid UTF-8 is replaced by U+FFFD and counted. In folders, a file with a NUL byte in its
first 8 KiB is binary and skipped (and counted); a file named on the command line is always
read. A compressed file (gzip, zstd, xz, bz2) is read through its decompressor.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import IO

from .base import BINARY_SNIFF_BYTES, CorpusOptions
from .compressed import open_stream
from .files import Source
from .readers import Span, Tally, TextReader

_REPLACEMENT_BYTES = "\ufffd".encode()


def decode_utf8(data: bytes) -> tuple[str, int]:
    """Text of `data` with invalid sequences replaced, and how many were replaced."""
    try:
        return data.decode("utf-8"), 0
    except UnicodeDecodeError:
        text = data.decode("utf-8", errors="replace")
        return text, text.count("\ufffd") - data.count(_REPLACEMENT_BYTES)


class Utf8Lines:
    """Decode lines of one file, counting invalid UTF-8 (and the file, once) through a tally."""

    def __init__(self, tally: Tally) -> None:
        self.tally = tally
        self.file_bad = False

    def decode(self, data: bytes) -> str:
        """Text of one line or file, invalid UTF-8 replaced and counted."""
        text, bad = decode_utf8(data)
        self.tally.count("text_bytes", len(data))
        self.replaced(bad)
        return text

    def replaced(self, count: int) -> None:
        """Count `count` invalid sequences replaced in this file (and the file, the first time)."""
        if count:
            self.tally.count("invalid_utf8", count)
            if not self.file_bad:
                self.tally.count("invalid_utf8_files")
                self.file_bad = True


def sniff(stream: IO[bytes]) -> bytes:
    """The first bytes of a (buffered) stream, left in it to be read."""
    return stream.peek(BINARY_SNIFF_BYTES)[:BINARY_SNIFF_BYTES]  # type: ignore[attr-defined]


def skip_binary(source: Source, head: bytes, tally: Tally) -> bool:
    """Whether a file found in a folder is binary (a NUL byte early on), counted as skipped and
    as read (progress covers the whole file).

    Args:
        source: the file.
        head: its first bytes (decompressed).
        tally: counts the skipped file.
    """
    if source.from_folder and b"\0" in head[:BINARY_SNIFF_BYTES]:
        tally.count("files", -1)
        tally.count(f"files:{source.kind}", -1)
        tally.count("skipped_binary")
        tally.advance(source.size)
        return True
    return False


def decoded_lines(stream: IO[bytes], tally: Tally, plain: bool) -> Iterator[str]:
    """Every line of a stream, decoded, without its line end (empty lines too, so callers can
    number them); when `plain` (not compressed), progress advances by each line's bytes.

    Args:
        stream: the file's (decompressed) bytes.
        tally: counts text bytes, invalid UTF-8 and progress.
        plain: whether the stream's bytes are the file's own.
    """
    lines = Utf8Lines(tally)
    for line in stream:
        if plain:
            tally.advance(len(line))
        yield lines.decode(line.rstrip(b"\r\n"))


class TextFileReader(TextReader):
    def texts(self, tally: Tally, span: Span | None = None) -> Iterator[str]:
        with open_stream(self.source) as (stream, compression):
            if skip_binary(self.source, sniff(stream), tally):
                return
            if self.options.doc_per == "line":
                yield from (text for text in decoded_lines(stream, tally, compression is None) if text)
                if compression is not None:
                    tally.advance(self.source.size)
                return
            data = stream.read()
        tally.advance(self.source.size)
        yield Utf8Lines(tally).decode(data)


def make_reader(source: Source, options: CorpusOptions) -> TextFileReader:
    """Text, one document per file or per line."""
    return TextFileReader(source, options)
