"""Where tables come from, behind one interface: a store, a DCP checkpoint or a safetensors export.

A `TableSource` has the spec, the projection and the layer ids, and gives per layer a
`LayerSource`: the table's size and a reader of row ranges as torch tensors in the source's dtype.
`StoreSource` reads a complete store (what every export reads); `dcp.DcpSource` and
`safetensors_source.SafetensorsSource` read checkpoints back (what `engram import` reads).
"""

from __future__ import annotations

import concurrent.futures
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..dtypes import to_torch
from ..spec import TableSpec

_READ_THREADS = 2
_SPLIT_BYTES = 8 << 20  # blocks at least this large are read by all reader threads


@dataclass(frozen=True)
class LayerSource:
    """One layer table to copy: its size and a reader of row ranges (as torch tensors)."""

    layer_id: int
    rows: int
    dim: int
    read: Callable[[int, int], torch.Tensor]
    block_rows: int = 1

    def preferred_block(self, rows: int) -> int:
        """`rows` rounded to whole storage blocks, so no block is read twice."""
        return max(self.block_rows, rows // self.block_rows * self.block_rows)


class TableSource:
    """Where tables come from: a store, a DCP checkpoint or a safetensors export."""

    dtype: str
    store_dtype: str | None = None  # the dtype of the store the tables were exported from, if known
    sharding: dict[str, Any] | None = None

    def __init__(self, spec: TableSpec, projection: Any, layer_ids: tuple[int, ...]) -> None:
        self.spec = spec
        self.projection = projection
        self.layer_ids = layer_ids

    def layer(self, layer_id: int) -> LayerSource:
        """The reader of one layer's table."""
        raise NotImplementedError

    @property
    def total_rows(self) -> int:
        """Rows of every chosen layer: what an export or import advances its progress by."""
        return sum(self.spec.rows(layer) for layer in self.layer_ids)


class StoreSource(TableSource):
    """A complete store; every read checks the crc32c of the chunks it touches.

    A large block is read as two halves in parallel: decoding and checking chunks is CPU
    work, and one reader alone is slower than the disk writes it feeds.
    """

    def __init__(self, store: Any) -> None:
        super().__init__(store.spec, store.projection, tuple(store.layer_ids))
        self.store = store
        self.dtype = store.dtype
        self.sharding = {"ranks": store.ranks, "shard_by": store.shard_by}
        self._pool = concurrent.futures.ThreadPoolExecutor(_READ_THREADS, thread_name_prefix="engram-store")

    def layer(self, layer_id: int) -> LayerSource:
        """The reader of one layer's table; large blocks are read as halves in parallel."""
        layout = self.store.layout(layer_id)
        store = self.store

        def read(begin: int, end: int) -> torch.Tensor:
            rows = end - begin
            if rows * layout.dim * layout.itemsize < _SPLIT_BYTES:
                return to_torch(store.read_rows(layer_id, begin, end))
            out = np.empty((rows, layout.dim), dtype=store.numpy_dtype)
            step = -(-rows // _READ_THREADS // layout.chunk_rows) * layout.chunk_rows
            parts = [(a, min(a + step, end)) for a in range(begin, end, step)]

            def fill(part: tuple[int, int]) -> None:
                out[part[0] - begin : part[1] - begin] = store.read_rows(layer_id, *part)

            list(self._pool.map(fill, parts))
            return to_torch(out)

        return LayerSource(layer_id, layout.rows, layout.dim, read, layout.chunk_rows)


def open_source_store(path: str | Path) -> StoreSource:
    """A store to export; refuses, naming layer and rows, one whose build did not finish."""
    from ..store.tables import open_tables

    return StoreSource(open_tables(path))
