"""A new store written from rows that come from elsewhere (`engram import`), and a store as an output.

`StoreWriter` is all an importer needs of this package: it plans the layout for a spec, a
projection and a rank partition (so the bytes needed are known before anything is written),
creates the empty store at the path it is handed (`create.create_store`), takes rows in any
windows of whole shards (`TableStore.write_rows`) and marks the store complete at the end.

`STORE` is a table store as an `output.Output`: only a store of ours (`create.check_replaceable`)
is replaced, nothing is written inside another store, and a replaced store is locked against a
build still writing it (`files.BuildLock`).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

from ..output import OutputKind
from ..spec import TableSpec
from ..vocab import VocabProjection
from .create import check_outside_stores, check_replaceable, create_store, store_exists
from .files import BuildLock
from .layout import ShardBy, plan_layout
from .shard_format import layer_file_bytes
from .tables import TableStore


class StoreKind(OutputKind):
    """A table store: replaced only when it is one of ours, never written inside another store."""

    def exists(self, path: Path) -> bool:
        return store_exists(str(path))

    def check_new(self, path: Path) -> None:
        check_outside_stores(path)

    def check_replaceable(self, path: Path) -> None:
        check_replaceable(str(path))

    @contextlib.contextmanager
    def lock(self, path: Path, replacing: bool) -> Iterator[None]:
        """No build may be writing the store that this output replaces."""
        lock = BuildLock(str(path))
        try:
            if replacing and lock.held_elsewhere_possible():
                lock.acquire()
            yield
        finally:
            lock.release()


STORE = StoreKind()


class StoreWriter:
    """A store to write from given rows: planned now, created by `create`, complete after `finish`.

    Args:
        spec: the tables, in the store's dtype.
        projection: the vocab projection stored beside them.
        shards, shard_by: the rank partition.
        init: where the values come from (e.g. {"algorithm": "imported", ...}).
        layers: keep only these of the spec's layers (default: all of them).
    """

    def __init__(
        self,
        spec: TableSpec,
        projection: VocabProjection,
        *,
        shards: int,
        shard_by: ShardBy,
        init: dict[str, Any],
        layers: list[int] | None = None,
    ) -> None:
        self.spec, self.projection = spec, projection
        self.shards, self.shard_by, self.init, self.layers = shards, shard_by, init, layers
        planned = plan_layout(spec, shards, shard_by)
        self.bytes = sum(layer_file_bytes(planned[layer]) for layer in (layers or spec.layer_ids))
        self._store: TableStore | None = None

    def create(self, path: Path) -> None:
        """Create the empty store at `path` (a path with nothing there)."""
        self._store = create_store(
            path,
            self.spec,
            self.projection,
            shards=self.shards,
            shard_by=self.shard_by,
            init=self.init,
            layers=self.layers,
        )

    @property
    def store(self) -> TableStore:
        assert self._store is not None, "create the store first"
        return self._store

    def shard_ranges(self, layer_id: int) -> list[tuple[int, int]]:
        """The (begin, end) rows of each shard of a layer: writes come in runs of whole shards."""
        return self.store.shard_ranges(layer_id)

    def write_rows(self, layer_id: int, begin: int, values: np.ndarray) -> int:
        """Write rows [begin, begin + len(values)) of a layer (whole shards); returns bytes written."""
        return self.store.write_rows(layer_id, begin, values)

    def finish(self) -> None:
        """Mark the store complete: every shard is written."""
        self.store.mark_complete()
