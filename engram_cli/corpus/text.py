"""Text inputs: whole files as bytes, decoded as UTF-8 with invalid sequences replaced and counted."""

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
    """The bytes of a file; an OS error becomes a one-line error naming it."""
    try:
        return path.read_bytes()
    except OSError as exc:
        raise EngramError(f"cannot read {path}: {exc.strerror or exc}") from None
