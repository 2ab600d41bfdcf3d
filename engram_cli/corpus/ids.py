"""Pre-tokenized inputs: `.npy` arrays and raw `.bin` id streams, read a chunk at a time.

A `.npy` holds token ids of shape (T,) (one stream) or (B, T) (one document per row), in C order;
a `.bin` is a raw little-endian stream of uint16 or uint32 ids. Both are read with plain file reads
at computed offsets, checked against the vocab with the position of a bad id, and a reader that
starts inside a stream (a cluster part) first learns the state a reader from the start would
carry there (`stream_state`).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..errors import EngramError


def stream_state(array: IdFile, position: int, sep: int | None, context: int) -> tuple[bool, np.ndarray]:
    """Whether a document starts at `position` of a stream, and the last `context` ids of the
    document that runs into it: what a reader that started at 0 would carry there.

    Args:
        array: the stream.
        position: where the reader starts.
        sep: the document separator id (None: the stream is one document).
        context: how many ids of left context a batch carries.
    """
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
        kept = before[cuts[-1] + 1 :] if cuts.size else before
        if cuts.size or kept.size >= context or lo == 0:
            return False, kept[max(0, kept.size - context) :].copy()
        window *= 2


@dataclass(frozen=True)
class IdFile:
    """Where the ids of a .npy or .bin file lie, read a chunk at a time with plain file reads.

    (A memory map would do, but every page it touches counts as resident memory until unmapped.)
    """

    path: Path
    dtype: np.dtype
    shape: tuple[int, ...]
    offset: int

    @property
    def ndim(self) -> int:
        """1 for a stream of ids, 2 for one document per row."""
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


def open_ids(path: Path, kind: str, bin_dtype: str) -> IdFile:
    """The ids of a .npy (1-D or 2-D, C order) or of a raw .bin file.

    Args:
        path: the file.
        kind: "npy" or "bin".
        bin_dtype: the id type of a .bin file, "uint16" or "uint32" (little-endian).
    """
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
            raise EngramError(
                f"{path} is stored in Fortran order; save it in C order (np.save(path, np.ascontiguousarray(ids)))"
            )
        return IdFile(path, array.dtype, array.shape, int(getattr(array, "offset", 0)))
    dtype = np.dtype(bin_dtype).newbyteorder("<")
    size = path.stat().st_size
    if size % dtype.itemsize:
        raise EngramError(
            f"{path}: {size:,} bytes is not a whole number of {bin_dtype} ids "
            f"({dtype.itemsize} bytes each); is --bin-dtype right?"
        )
    return IdFile(path, dtype, (size // dtype.itemsize,), 0)


def check_chunk(ids: np.ndarray, path: Path, vocab_size: int, where: Callable[[tuple], list[int]]) -> None:
    """Refuse negative ids and ids past the vocab, naming the file and the position in it.

    Args:
        ids: a chunk of ids as read.
        path: its file.
        vocab_size: the projection's vocab size.
        where: the position in the file of an index into `ids`.
    """
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
