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

import os
import threading
from pathlib import Path
from typing import Any

from zarr.core.buffer import default_buffer_prototype
from zarr.core.sync import sync
from zarr.storage import LocalStore

_PARTIAL_SUFFIX = ".partial"


def is_url(path: str) -> bool:
    return "://" in path


def store_path(path: str | Path) -> str:
    """A folder path or an fsspec URL; a file:// URL is the plain local folder it names."""
    path = str(path)
    return path[len("file://") :] if path.startswith("file://") else path


class Files:
    """Whole-object reads and atomic writes of store keys, on disk or through zarr's store API."""

    def __init__(self, store: Any) -> None:
        self.store = store
        self.root = Path(store.root) if isinstance(store, LocalStore) else None

    def put(self, key: str, parts: list[Any]) -> None:
        if self.root is None:
            joined = b"".join(memoryview(p).cast("B") for p in parts)
            sync(self.store.set(key, default_buffer_prototype().buffer.from_bytes(joined)))
            return
        path = self.root / key
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.parent / f".{path.name}.{os.getpid()}-{threading.get_ident()}{_PARTIAL_SUFFIX}"
        try:
            with open(tmp, "wb") as handle:
                for part in parts:
                    handle.write(part)
            os.replace(tmp, path)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise

    def get(self, key: str) -> bytes | None:
        if self.root is None:
            buf = sync(self.store.get(key, prototype=default_buffer_prototype()))
            return None if buf is None else buf.to_bytes()
        try:
            return (self.root / key).read_bytes()
        except (FileNotFoundError, NotADirectoryError, IsADirectoryError):
            return None

    def size(self, key: str) -> int | None:
        if self.root is None:
            if not sync(self.store.exists(key)):
                return None
            return int(sync(self.store.getsize(key)))
        try:
            return (self.root / key).stat().st_size
        except (FileNotFoundError, NotADirectoryError):
            return None

    def remove_partials(self, prefix: str) -> None:
        if self.root is not None and (self.root / prefix).is_dir():
            for stale in (self.root / prefix).rglob(f".*{_PARTIAL_SUFFIX}"):
                stale.unlink(missing_ok=True)
