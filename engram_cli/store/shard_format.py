"""The bytes of one shard file: zarr v3's `sharding_indexed` codec as engram writes it.

A shard holds the inner chunks of `chunk_rows` whole rows each, in order, every chunk followed
by its crc32c (codecs [bytes(little), crc32c]); then the index, one (offset, nbytes) uint64 pair
per chunk slot (2**64-1 twice for an absent chunk), followed by the index's own crc32c
(index codecs [bytes(little), crc32c], index at the end). A chunk running past the end of the
array is padded with the fill value 0, as zarr does; chunks wholly past it are absent.

Pure functions, no I/O: `encode_shard` makes the bytes, `index_size`/`chunk_size`/
`shard_file_size` say how large they are, `parse_index` and `chunk_is_intact` read them back,
`shard_problem` checks a whole shard. A test compares the bytes with zarr's own encoder.
"""

from __future__ import annotations

import sys
from typing import Any

import google_crc32c
import numpy as np

from .layout import LayerLayout

_EMPTY = 2**64 - 1  # sharding index entry of a chunk that is not stored
CRC_BYTES = 4  # bytes of a crc32c
_ENTRY = 16  # bytes of one index entry: offset and nbytes, little-endian uint64


def encode_shard(data: np.ndarray, layout: LayerLayout) -> list[Any]:
    """The bytes of one shard file as buffers to write in order (no copy of `data`).

    zarr's `sharding_indexed` format with codecs [bytes(little), crc32c] per inner chunk and
    index codecs [bytes(little), crc32c], index at the end. A chunk that runs past the end of
    the array is padded with the fill value 0, as zarr does; chunks wholly past it are absent.
    """
    if sys.byteorder != "little":
        data = data.byteswap()
    rows = data.shape[0]
    raw = np.ascontiguousarray(data).view(np.uint8).reshape(rows, -1)
    chunk_bytes = layout.chunk_rows * raw.shape[1]
    index = np.full((layout.chunks_per_shard, 2), _EMPTY, dtype="<u8")
    parts: list[Any] = []
    offset = 0
    for i in range(layout.chunks_per_shard):
        start = i * layout.chunk_rows
        if start >= rows:
            break
        block = raw[start : start + layout.chunk_rows]
        if block.shape[0] < layout.chunk_rows:
            padded = np.zeros((layout.chunk_rows, raw.shape[1]), dtype=np.uint8)
            padded[: block.shape[0]] = block
            block = padded
        parts += [block, crc_bytes(block)]
        index[i] = (offset, chunk_bytes + 4)
        offset += chunk_bytes + 4
    index_bytes = index.tobytes()
    parts += [index_bytes, crc_bytes(index_bytes)]
    return parts


def crc_bytes(data: Any) -> bytes:
    """The crc32c of `data` as the 4 little-endian bytes zarr's crc32c codec appends."""
    return int(google_crc32c.value(data)).to_bytes(4, "little")


def index_size(layout: LayerLayout) -> int:
    """Bytes of a shard's index with its checksum: the last bytes of every shard file."""
    return layout.chunks_per_shard * _ENTRY + CRC_BYTES


def chunk_size(layout: LayerLayout) -> int:
    """Bytes of one stored inner chunk with its checksum."""
    return layout.chunk_rows * layout.dim * layout.itemsize + CRC_BYTES


def shard_file_size(layout: LayerLayout, index: int) -> int:
    """Bytes of shard file `index` when complete: its chunks with their checksums, and the index."""
    start, stop = layout.shard_range(index)
    chunks = -(-(stop - start) // layout.chunk_rows)
    return chunks * chunk_size(layout) + index_size(layout)


def layer_file_bytes(layout: LayerLayout) -> int:
    """Bytes of all shard files of a layer, in closed form: every shard but the last is full."""
    if layout.shards == 0:
        return 0
    return (layout.shards - 1) * shard_file_size(layout, 0) + shard_file_size(layout, layout.shards - 1)


def parse_index(tail: bytes, layout: LayerLayout) -> np.ndarray | None:
    """The (chunks_per_shard, 2) offset/nbytes entries of a shard's last `index_size` bytes, or
    None when they are short or fail their checksum (a truncated or corrupt file)."""
    if len(tail) != index_size(layout) or crc_bytes(tail[:-CRC_BYTES]) != tail[-CRC_BYTES:]:
        return None
    return np.frombuffer(tail[:-CRC_BYTES], dtype="<u8").reshape(-1, 2)


def chunk_is_intact(payload: bytes, layout: LayerLayout) -> bool:
    """Whether a stored chunk read back whole has the right size and checksum."""
    nbytes = chunk_size(layout)
    if len(payload) != nbytes:
        return False
    return crc_bytes(np.frombuffer(payload, np.uint8, nbytes - CRC_BYTES)) == payload[-CRC_BYTES:]


def rows_text(start: int, stop: int) -> str:
    """Rows [start, stop) as people read them in messages: `rows 0-99`."""
    return f"rows {start}-{stop - 1}"


def shard_problem(data: bytes, layout: LayerLayout, index: int) -> str | None:
    """What is wrong with the bytes of shard `index`, or None when every chunk is intact.

    Args:
        data: the whole shard file.
        layout: the plan of its layer.
        index: which shard of the layer it is (it decides how many chunks must be present).
    """
    start, stop = layout.shard_range(index)
    tail_size = index_size(layout)
    if len(data) < tail_size:
        return f"truncated ({len(data)} bytes)"
    entries = parse_index(data[len(data) - tail_size :], layout)
    if entries is None:
        return "the shard index fails its crc32c checksum (truncated or corrupt file)"
    body = len(data) - tail_size
    for i in range(-(-(stop - start) // layout.chunk_rows)):
        offset, nbytes = int(entries[i, 0]), int(entries[i, 1])
        rows = rows_text(start + i * layout.chunk_rows, min(start + (i + 1) * layout.chunk_rows, stop))
        if offset == _EMPTY and nbytes == _EMPTY:
            return f"chunk {rows} is absent"
        if nbytes != chunk_size(layout) or offset + nbytes > body:
            return f"chunk {rows} has a bad index entry"
        if not chunk_is_intact(data[offset : offset + nbytes], layout):
            return f"chunk {rows} fails its crc32c checksum"
    return None
