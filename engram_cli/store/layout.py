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

import math
from dataclasses import dataclass
from typing import Any, Literal, get_args

from ..dtypes import DTYPE_BYTES
from ..errors import EngramError, UsageError
from ..helpers import human_bytes
from ..spec import TableSpec

ShardBy = Literal["rows", "heads"]
SHARD_BY: tuple[str, ...] = get_args(ShardBy)
CHUNK_BYTES = 1 << 20  # inner chunk: one random row read costs at most this much I/O
SHARD_BYTES = 128 << 20  # shard file: the unit of writing, resuming and per-rank ownership
MIN_CHUNK_BYTES = 16 << 10  # below this a head-aligned layout is refused as useless
PIECE_BYTES = 8 << 20  # rows one generation task fills


def layer_array_name(layer_id: int) -> str:
    return f"layer_{layer_id}"


@dataclass(frozen=True)
class LayerLayout:
    """Rows, chunking, sharding and rank partition of one layer table."""

    layer_id: int
    rows: int
    dim: int
    chunk_rows: int
    shard_rows: int
    partition: tuple[tuple[int, int], ...]
    itemsize: int

    @property
    def array(self) -> str:
        return layer_array_name(self.layer_id)

    @property
    def shards(self) -> int:
        return -(-self.rows // self.shard_rows)

    @property
    def chunks_per_shard(self) -> int:
        return self.shard_rows // self.chunk_rows

    def shard_range(self, index: int) -> tuple[int, int]:
        if not 0 <= index < self.shards:
            raise EngramError(f"layer {self.layer_id} has shards 0..{self.shards - 1}, not {index}")
        start = index * self.shard_rows
        return start, min(start + self.shard_rows, self.rows)

    def shard_ranges(self) -> list[tuple[int, int]]:
        return [self.shard_range(i) for i in range(self.shards)]

    def shard_key(self, index: int) -> str:
        return f"{self.array}/c/{index}/0"

    def to_json(self) -> dict[str, Any]:
        return {
            "array": self.array,
            "rows": self.rows,
            "dim": self.dim,
            "chunk_rows": self.chunk_rows,
            "shard_rows": self.shard_rows,
            "shards": self.shards,
            "partition": [list(p) for p in self.partition],
        }


def plan_layout(spec: TableSpec, ranks: int = 1, shard_by: str = "rows") -> dict[int, LayerLayout]:
    """Chunk rows, shard rows and the rank partition of every layer.

    `rows`: contiguous ranges, equal for every rank but the last (which may be short by a few
    chunks), each a whole number of shards. `heads`: whole heads per rank, which needs every
    rank boundary to be a multiple of one shard size; an error says why when it is not.
    """
    if not isinstance(ranks, int) or ranks < 1:
        raise UsageError(f"the rank count must be a positive integer, got {ranks!r}")
    if shard_by not in SHARD_BY:
        raise UsageError(f"shard_by must be one of {', '.join(SHARD_BY)}, got {shard_by!r}")
    row_bytes = spec.dim * DTYPE_BYTES[spec.dtype]
    layouts = {}
    for layer in spec.layer_ids:
        rows = spec.rows(layer)
        if shard_by == "heads" and ranks > 1:
            chunk, shard, partition = _heads_layout(layer, spec.offsets(layer), rows, row_bytes, ranks)
        else:
            chunk, shard, partition = _rows_layout(layer, rows, row_bytes, ranks)
        layouts[layer] = LayerLayout(layer, rows, spec.dim, chunk, shard, partition, DTYPE_BYTES[spec.dtype])
    return layouts


def _rows_layout(layer: int, rows: int, row_bytes: int, ranks: int) -> tuple[int, int, tuple[tuple[int, int], ...]]:
    per_rank = -(-rows // ranks)
    max_chunk = max(1, CHUNK_BYTES // row_bytes)
    shards_per_rank = max(1, -(-per_rank * row_bytes // SHARD_BYTES))
    while True:  # rounding the chunk up can overshoot the shard cap by a few rows: split further
        shard_target = -(-per_rank // shards_per_rank)
        chunks_per_shard = -(-shard_target // max_chunk)
        chunk = -(-shard_target // chunks_per_shard)
        shard = chunk * chunks_per_shard
        if shard * row_bytes <= SHARD_BYTES or shard == chunk:
            break
        shards_per_rank += 1
    step = shards_per_rank * shard
    if (ranks - 1) * step >= rows:
        raise UsageError(
            f"layer {layer} has {rows:,} rows: too few to give each of {ranks} ranks "
            "a shard-aligned range of its own; use fewer ranks"
        )
    bounds = [min(r * step, rows) for r in range(ranks)] + [rows]
    return chunk, shard, tuple(zip(bounds[:-1], bounds[1:]))


def _divisors(n: int) -> list[int]:
    small, large = [], []
    d = 1
    while d * d <= n:
        if n % d == 0:
            small.append(d)
            if d * d != n:
                large.append(n // d)
        d += 1
    return small + large[::-1]


def _heads_layout(
    layer: int, offsets: list[int], rows: int, row_bytes: int, ranks: int
) -> tuple[int, int, tuple[tuple[int, int], ...]]:
    heads = len(offsets)
    if ranks > heads:
        raise UsageError(
            f"layer {layer} has {heads} heads, so sharding by heads can serve at most "
            f"{heads} ranks, not {ranks}; shard by rows"
        )
    bounds = [offsets[(r * heads) // ranks] for r in range(ranks)] + [rows]
    common = 0
    for b in bounds[1:-1]:
        common = math.gcd(common, b)
    divisors = _divisors(common)
    chunk = max(d for d in divisors if d * row_bytes <= CHUNK_BYTES or d == 1)
    if chunk * row_bytes < MIN_CHUNK_BYTES:
        shown = ", ".join(f"{b:,}" for b in bounds[1:-1][:4]) + (", ..." if ranks > 5 else "")
        raise UsageError(
            f"cannot split layer {layer} by whole heads among {ranks} ranks: its head sizes are "
            f"primes, the rank boundaries fall at rows {shown}, and zarr shards form a regular "
            f"grid, so every shard would have to be a divisor of {common:,} rows; the largest "
            f"usable one is {chunk} rows ({human_bytes(chunk * row_bytes)}), too small for chunked "
            "reads. Shard by rows, or choose a rank count whose boundaries align"
        )
    multiple = max((d for d in _divisors(common // chunk) if chunk * d * row_bytes <= SHARD_BYTES), default=1)
    return chunk, chunk * multiple, tuple(zip(bounds[:-1], bounds[1:]))
