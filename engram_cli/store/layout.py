"""How a layer table is cut: rows into inner chunks, chunks into shard files, shard files into ranks.

An inner chunk is `chunk_rows` whole rows of at most 1 MiB (`CHUNK_BYTES`): one random row read
costs at most that much I/O, and each chunk carries its own crc32c. A shard file is `shard_rows`
rows, a whole number of chunks, of at most 128 MiB (`SHARD_BYTES`): the unit of writing, resuming
and per-rank ownership; shard i holds rows [i * shard_rows, (i + 1) * shard_rows), the last one
possibly short. The rank partition gives each of `ranks` ranks a range of rows:

* `rows`: contiguous ranges, equal for every rank but the last (which may be short by a few
  chunks), each a whole number of shards: a rank's rows go into the fewest shards within the cap,
  those into the fewest chunks within theirs, all of one size.
* `heads`: whole heads per rank. zarr shards form a regular grid, so every rank boundary (a head
  offset) must be a multiple of the shard size: the chunk is the largest divisor of the
  boundaries' gcd within 1 MiB, the shard the largest multiple of it that divides the gcd within
  128 MiB. Head sizes are primes, so this can leave chunks too small for chunked reads (under
  16 KiB, `MIN_CHUNK_BYTES`); such a plan is refused with the reason.

Rank boundaries always fall on shard boundaries, so every rank reads or writes whole shard files
alone; zarr rewrites a partially written shard, so no plan ever lets two writers share one. The
plan depends only on the spec (rows, dim, dtype) and on (ranks, shard_by); the store records it,
and a resumed build must plan the same.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Literal, get_args

from ..dtypes import DTYPE_BYTES
from ..errors import EngramError, UsageError, choose
from ..helpers import human_bytes
from ..spec import TableSpec

ShardBy = Literal["rows", "heads"]
SHARD_BY: tuple[ShardBy, ...] = get_args(ShardBy)
CHUNK_BYTES = 1 << 20  # inner chunk: one random row read costs at most this much I/O
SHARD_BYTES = 128 << 20  # shard file: the unit of writing, resuming and per-rank ownership
MIN_CHUNK_BYTES = 16 << 10  # below this a head-aligned layout is refused as useless
PIECE_BYTES = 8 << 20  # rows one generation task fills


def layer_array_name(layer_id: int) -> str:
    """The zarr array name of a layer's table: `layer_<id>`."""
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
        """The zarr array name of this layer."""
        return layer_array_name(self.layer_id)

    @property
    def shards(self) -> int:
        """How many shard files the layer has (the last may hold fewer rows)."""
        return -(-self.rows // self.shard_rows)

    @property
    def chunks_per_shard(self) -> int:
        """Inner chunk slots in one shard file (the index has one entry per slot)."""
        return self.shard_rows // self.chunk_rows

    def shard_range(self, index: int) -> tuple[int, int]:
        """Rows (start, stop) of shard `index`; an EngramError when the layer has no such shard."""
        if not 0 <= index < self.shards:
            raise EngramError(f"layer {self.layer_id} has shards 0..{self.shards - 1}, not {index}")
        start = index * self.shard_rows
        return start, min(start + self.shard_rows, self.rows)

    def shard_ranges(self) -> list[tuple[int, int]]:
        """Rows (start, stop) of every shard, in order."""
        return [self.shard_range(i) for i in range(self.shards)]

    def shard_key(self, index: int) -> str:
        """The store key of shard `index`: `layer_<id>/c/<index>/0` (zarr's chunk key encoding)."""
        return f"{self.array}/c/{index}/0"

    def to_json(self) -> dict[str, Any]:
        """The layer's plan as the store records it (and `build-tables --json` reports it)."""
        return {
            "array": self.array,
            "rows": self.rows,
            "dim": self.dim,
            "chunk_rows": self.chunk_rows,
            "shard_rows": self.shard_rows,
            "shards": self.shards,
            "partition": [list(p) for p in self.partition],
        }


def plan_layout(spec: TableSpec, ranks: int = 1, shard_by: ShardBy = "rows") -> dict[int, LayerLayout]:
    """Chunk rows, shard rows and the rank partition of every layer.

    `rows`: contiguous ranges, equal for every rank but the last (which may be short by a few
    chunks), each a whole number of shards. `heads`: whole heads per rank, which needs every
    rank boundary to be a multiple of one shard size; an error says why when it is not.

    Args:
        spec: the tables to plan (rows, dim and dtype).
        ranks: how many ranks the rows are partitioned for.
        shard_by: "rows" or "heads".
    """
    if not isinstance(ranks, int) or ranks < 1:
        raise UsageError(f"the rank count must be a positive integer, got {ranks!r}")
    shard_by = choose(shard_by, SHARD_BY, "shard_by must be one of {allowed}, got {value!r}")
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
