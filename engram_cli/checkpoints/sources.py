"""Where tables come from, behind one interface: a store, a DCP checkpoint, a safetensors export or a GGUF.

A `TableSource` has the spec, the projection and the layer ids, what it is (`format`, `layout`),
the dtype it reads in and what it records of the store it came from (`store_dtype`, `sharding`),
and gives per layer a `LayerSource`: the table's size and a reader of row ranges as torch tensors
in the source's dtype, and the row windows an import reads it in (`read_windows`). Each source
checks what it is opened on, so a reader of sources (`importing`) needs nothing of any one kind.
`StoreSource` reads a complete store (what every export reads); `dcp_source.DcpSource`,
`safetensors_source.SafetensorsSource` and `gguf_source.GgufSource` read checkpoints back (what
`engram import` reads). A new kind of source is one module with one `TableSource` subclass, and a
line in `detect_format` and `open_checkpoint`, which open a checkpoint as the source of its kind.
"""

from __future__ import annotations

import concurrent.futures
from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import numpy as np
import torch

from ..dtypes import to_torch
from ..errors import FormatError, UsageError
from ..spec import TableSpec
from ..store.layout import SHARD_BY, ShardBy

if TYPE_CHECKING:
    from ..store.tables import TableStore
    from ..vocab import VocabProjection

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


CheckpointFormat = Literal["dcp", "safetensors", "gguf"]  # what `engram import` reads
SourceFormat = Literal["store", "dcp", "safetensors", "gguf"]
SourceLayout = Literal["store", "dcp", "engram", "deepseek-v41", "gguf"]  # "engram", "deepseek-v41": `layouts.Layout`


@dataclass(frozen=True)
class Sharding:
    """The rank partition a source records for the store its tables came from."""

    ranks: int = 1
    shard_by: ShardBy = "rows"

    @classmethod
    def recorded(cls, value: object, where: str) -> Sharding | None:
        """The sharding a checkpoint records (a JSON object, or nothing), checked when it is opened."""
        if not value:  # nothing recorded: the import's own default
            return None
        ranks = value.get("ranks", 1) if isinstance(value, dict) else None
        shard_by = value.get("shard_by", "rows") if isinstance(value, dict) else None
        if not isinstance(ranks, int) or shard_by not in SHARD_BY:
            raise FormatError(f"{where}: the sharding it records ({value!r}) is damaged")
        return cls(ranks or 1, shard_by or "rows")

    def to_json(self) -> dict[str, Any]:
        """What an export records (and `recorded` reads back)."""
        return {"ranks": self.ranks, "shard_by": self.shard_by}


class TableSource(ABC):
    """Where tables come from: a store, a DCP checkpoint, a safetensors set. Each source checks
    what it is opened on (its tables, dtype and recorded sharding) before anything is read.

    Attributes:
        spec, projection, layer_ids: what the tables are, and which layers are read.
        format, layout: what the source is, as an import records it.
        dtype: the tables' dtype as read (fp8 tables read as float32 blocks).
        store_dtype: the dtype of the store the tables were exported from, if it is recorded.
        sharding: the rank partition of that store, if it is recorded.
    """

    format: SourceFormat
    layout: SourceLayout
    dtype: str
    store_dtype: str | None = None
    sharding: Sharding | None = None

    def __init__(self, spec: TableSpec, projection: VocabProjection, layer_ids: tuple[int, ...]) -> None:
        self.spec = spec
        self.projection = projection
        self.layer_ids = layer_ids

    @abstractmethod
    def layer(self, layer_id: int) -> LayerSource:
        """The reader of one layer's table."""

    def read_windows(self, layer_id: int, shards: list[tuple[int, int]]) -> list[tuple[int, int]]:
        """Row windows of whole store shards to read one layer in (what an import reads at a time):
        one shard each unless the source's pieces make longer windows cheaper."""
        return shards

    @property
    def total_rows(self) -> int:
        """Rows of every chosen layer: what an export or import advances its progress by."""
        return sum(self.spec.rows(layer) for layer in self.layer_ids)


class StoreSource(TableSource):
    """A complete store; every read checks the crc32c of the chunks it touches.

    A large block is read as two halves in parallel: decoding and checking chunks is CPU
    work, and one reader alone is slower than the disk writes it feeds.
    """

    format = "store"
    layout = "store"

    def __init__(self, store: TableStore) -> None:
        super().__init__(store.spec, store.projection, tuple(store.layer_ids))
        self.store = store
        self.dtype = store.dtype
        self.sharding = Sharding(store.ranks, store.shard_by)
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
                store.read_rows(layer_id, *part, out=out[part[0] - begin : part[1] - begin])

            list(self._pool.map(fill, parts))
            return to_torch(out)

        return LayerSource(layer_id, layout.rows, layout.dim, read, layout.chunk_rows)


def open_source_store(path: str | Path) -> StoreSource:
    """A store to export; refuses, naming layer and rows, one whose build did not finish."""
    from ..store.tables import open_tables

    return StoreSource(open_tables(path))


def detect_format(path: Path) -> CheckpointFormat:
    """ "dcp", "safetensors" or "gguf"; a one-line error for anything else."""
    from .gguf_source import is_gguf

    if path.is_dir() and (path / ".metadata").is_file():
        return "dcp"
    if path.is_file() and is_gguf(path):
        return "gguf"
    if path.is_file() and (path.name.endswith(".safetensors") or path.name.endswith(".index.json")):
        return "safetensors"
    if path.is_dir() and any(p.name.endswith(".safetensors") for p in path.iterdir()):
        return "safetensors"
    if not path.exists():
        raise UsageError(f"no such checkpoint: {path}")
    raise FormatError(
        f"{path} is not a checkpoint engram can import (expected a DCP folder with "
        ".metadata, safetensors from `engram export`, or a GGUF)"
    )


def open_checkpoint(
    checkpoint: Path,
    kind: CheckpointFormat,
    *,
    trust_pickle: bool = False,
    spec: TableSpec | None = None,
    projection: VocabProjection | None = None,
    key_template: str | None = None,
    layers: list[int] | None = None,
) -> TableSource:
    """A checkpoint as a `TableSource` of its kind (`detect_format`); the arguments are
    `importing.import_checkpoint`'s. A new kind of source is one more line here and in `detect_format`."""
    if kind == "dcp":
        from .dcp_source import DcpSource

        return DcpSource(
            checkpoint,
            trust_pickle=trust_pickle,
            spec=spec,
            projection=projection,
            key_template=key_template,
            layers=layers,
        )
    if kind == "gguf":
        from .gguf_source import GgufSource

        return GgufSource(checkpoint, spec, projection, layers)
    from .safetensors_source import open_safetensors_source

    return open_safetensors_source(checkpoint, spec, projection, layers)
