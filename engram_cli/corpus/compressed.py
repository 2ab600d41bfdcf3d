"""Compressed text inputs: gzip, zstd, xz and bz2 streams, told apart by their magic bytes.

A file's first bytes decide how it is decompressed (gzip `1f 8b`, zstd `28 b5 2f fd`, xz
`fd 37 7a 58 5a 00`, bz2 `BZh`), so a compressed file under a plain name is still read; a name
that promises a compression its bytes do not start with is an error. Streams are decompressed as
they are read, never whole. zstd input may hold several frames (as `pzstd` and concatenated
files do), and may begin with a skippable frame (RFC 8878 section 3.1.2, magic `5? 2a 4d 18`,
which some tools write for metadata). Every format may hold several streams back to back (as
concatenated files do): each is read to its end, and whatever follows one must be another whole
stream (for xz, after stream padding of NUL bytes), never passed over: Python's own `lzma` and
`bz2` readers stop silently at trailing bytes that are not a stream, which would read a file
whose second stream is corrupt as if it ended after the first. Input that ends inside a stream
is truncated. Corrupt or truncated data of any kind is a one-line `FormatError` naming the file.
"""

from __future__ import annotations

import bz2
import contextlib
import gzip
import io
import lzma
import zlib
from collections.abc import Iterator
from typing import IO, Any

from ..errors import FormatError
from ..helpers import first_line
from .files import Source

MAGIC = {
    b"\x1f\x8b": "gzip",
    b"\x28\xb5\x2f\xfd": "zstd",
    b"\xfd7zXZ\x00": "xz",
    b"BZh": "bz2",
}
SUFFIXES = {".gz": "gzip", ".zst": "zstd", ".zstd": "zstd", ".xz": "xz", ".bz2": "bz2"}

# Bytes of compressed input handed to a decompressor at a time.
READ_BYTES = 1 << 20


def compression_of(head: bytes) -> str | None:
    """The compression a file's first bytes announce, or None."""
    if len(head) >= 4 and head[0] & 0xF0 == 0x50 and head[1:4] == b"\x2a\x4d\x18":
        return "zstd"  # a skippable frame first
    return next((name for magic, name in MAGIC.items() if head.startswith(magic)), None)


@contextlib.contextmanager
def open_stream(source: Source) -> Iterator[tuple[IO[bytes], str | None]]:
    """The decompressed bytes of a file (buffered, with `peek`) and the compression found, for
    the length of a `with` block; decompression errors inside it name the file."""
    with source.open() as raw:
        head = raw.read(6)
        raw.seek(0)
        found = compression_of(head)
        promised = SUFFIXES.get(source.path.suffix.lower())
        if promised and promised != found:
            what = f"{found} data" if found else "not compressed"
            raise FormatError(f"{source}: the name says {promised}, but the file is {what}")
        if found is None:
            yield (raw if hasattr(raw, "peek") else io.BufferedReader(raw)), None  # type: ignore[type-var]
            return
        with _decompressed(raw, found) as stream, decompression_errors(source, found):
            yield stream, found


def _decompressed(raw: IO[bytes], compression: str) -> Any:
    if compression == "gzip":
        return gzip.GzipFile(fileobj=raw, mode="rb")
    return io.BufferedReader(_StreamsReader(raw, compression), buffer_size=READ_BYTES)


@contextlib.contextmanager
def decompression_errors(source: Source, compression: str) -> Iterator[None]:
    """Turn a decompressor's complaint into a one-line error that names the file."""
    import zstandard

    try:
        yield
    except (EOFError, zlib.error, lzma.LZMAError, zstandard.ZstdError, gzip.BadGzipFile, OSError) as exc:
        raise FormatError(f"{source}: corrupt or truncated {compression} data ({first_line(exc)})") from None


def _new_stream(compression: str) -> Any:
    """A decompressor of one stream (or zstd frame), with `eof` and `unused_data`."""
    if compression == "xz":
        return lzma.LZMADecompressor(lzma.FORMAT_XZ)
    if compression == "bz2":
        return bz2.BZ2Decompressor()
    import zstandard

    return zstandard.ZstdDecompressor().decompressobj()


class _StreamsReader(io.RawIOBase):
    """Decompressed bytes of one or more xz, bz2 or zstd streams back to back; bytes after a
    stream that do not start another whole one, or input that ends inside one, are an error."""

    def __init__(self, raw: IO[bytes], compression: str) -> None:
        self._raw = raw
        self._compression = compression
        self._stream: Any = None
        self._pending = b""
        self._out = memoryview(b"")

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:
        while not len(self._out):
            data = self._pending or self._raw.read(READ_BYTES)
            self._pending = b""
            if self._stream is None and self._compression == "xz":
                stripped = data.lstrip(b"\0")  # stream padding between xz streams
                if data and not stripped:
                    continue
                data = stripped
            if not data:
                if self._stream is not None:
                    unit = "frame" if self._compression == "zstd" else "stream"
                    raise EOFError(f"the input ends inside a {self._compression} {unit}")
                return 0
            if self._stream is None:
                self._stream = _new_stream(self._compression)
            self._out = memoryview(self._stream.decompress(data))
            if self._stream.eof:
                self._pending = self._stream.unused_data
                self._stream = None
        count = min(len(buffer), len(self._out))
        buffer[:count] = self._out[:count]
        self._out = self._out[count:]
        return count
