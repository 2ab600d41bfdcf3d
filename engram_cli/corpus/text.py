"""Reading corpora into documents of token ids: text files and folders, jsonl, .npy and .bin.

Text is tokenized with the projection's tokenizer in batches (the Rust tokenizer
uses every core) on a background thread, so reading and tokenizing overlap with
whatever consumes the batches. Pre-tokenized arrays are memory-mapped and read in
chunks, so no input has to fit in memory; a stream split into documents at a
separator carries the tail of its last document from chunk to chunk.
"""

from __future__ import annotations

from pathlib import Path

from ..errors import EngramError

_REPLACEMENT_BYTES = "\ufffd".encode("utf-8")


def decode_utf8(data: bytes) -> tuple[str, int]:
    """Text of `data` with invalid sequences replaced, and how many were replaced."""
    try:
        return data.decode("utf-8"), 0
    except UnicodeDecodeError:
        text = data.decode("utf-8", errors="replace")
        return text, text.count("\ufffd") - data.count(_REPLACEMENT_BYTES)


def read_bytes(path: Path) -> bytes:
    try:
        return path.read_bytes()
    except OSError as exc:
        raise EngramError(f"cannot read {path}: {exc.strerror or exc}") from None
