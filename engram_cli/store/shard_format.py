"""Table stores: the Engram tables of a spec as one sharded zarr v3 group.

Layout of a store (all zarr v3, readable by any zarr v3 reader):

    STORE/zarr.json                  group; attributes["engram"] hold the format version, the
                                     spec, the projection's metadata, per layer the head sizes,
                                     offsets, multipliers, dim, chunk/shard rows and the rank
                                     partition, the init algorithm id, and `complete`
    STORE/projection                 int64 (vocab_size,): tokenizer id -> canonical id
    STORE/projection_tokenizer       uint8: the tokenizer JSON the projection came from (if any)
    STORE/layer_<id>                 (rows, dim) table of one layer, heads one after another in
                                     hashing order (row = offset of head + bucket)
    STORE/layer_<id>/c/<i>/0         shard file i: rows [i * shard_rows, (i + 1) * shard_rows)

Each layer array uses the sharding codec: inner chunks of whole rows (about 1 MiB, cheap
random row reads) with a crc32c per chunk, shard files of at most 128 MiB with a crc32c'd
index. Rank boundaries always fall on shard boundaries, so every rank reads or writes whole
shard files alone; zarr rewrites a partially written shard, so no plan ever lets two writers
share one. Shards are encoded here (the sharding format is simple and fixed) and written to a
temporary name then renamed, so a shard file is either complete or absent; `complete` flips to
true only after every shard exists, which is what `--resume` and readers rely on.
"""

from __future__ import annotations

import sys
from typing import Any

import google_crc32c
import numpy as np

from .layout import LayerLayout

_EMPTY = 2**64 - 1  # sharding index entry of a chunk that is not stored


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
    return int(google_crc32c.value(data)).to_bytes(4, "little")


def shard_file_size(layout: LayerLayout, index: int) -> int:
    start, stop = layout.shard_range(index)
    chunks = -(-(stop - start) // layout.chunk_rows)
    return chunks * (layout.chunk_rows * layout.dim * layout.itemsize + 4) + layout.chunks_per_shard * 16 + 4


def rows_text(start: int, stop: int) -> str:
    return f"rows {start}-{stop - 1}"


def shard_problem(data: bytes, layout: LayerLayout, index: int) -> str | None:
    start, stop = layout.shard_range(index)
    k = layout.chunks_per_shard
    index_len = k * 16 + 4
    if len(data) < index_len:
        return f"truncated ({len(data)} bytes)"
    buf = np.frombuffer(data, dtype=np.uint8)
    index_bytes = buf[len(buf) - index_len : len(buf) - 4]
    if crc_bytes(index_bytes) != bytes(buf[len(buf) - 4 :]):
        return "the shard index fails its crc32c checksum (truncated or corrupt file)"
    entries = index_bytes.view("<u8").reshape(k, 2)
    chunk_bytes = layout.chunk_rows * layout.dim * layout.itemsize + 4
    body = len(buf) - index_len
    for i in range(-(-(stop - start) // layout.chunk_rows)):
        offset, nbytes = int(entries[i, 0]), int(entries[i, 1])
        rows = rows_text(start + i * layout.chunk_rows, min(start + (i + 1) * layout.chunk_rows, stop))
        if offset == _EMPTY and nbytes == _EMPTY:
            return f"chunk {rows} is absent"
        if nbytes != chunk_bytes or offset + nbytes > body:
            return f"chunk {rows} has a bad index entry"
        payload = buf[offset : offset + nbytes - 4]
        if crc_bytes(payload) != bytes(buf[offset + nbytes - 4 : offset + nbytes]):
            return f"chunk {rows} fails its crc32c checksum"
    return None
