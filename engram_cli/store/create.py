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

import shutil
from pathlib import Path
from typing import Any

import numpy as np
import zarr
from zarr.codecs import Crc32cCodec, ZstdCodec
from zarr.core.sync import sync

from ..errors import EngramError, OutputExistsError
from ..spec import TableSpec
from ..vocab import VocabProjection
from .attributes import ATTRS_KEY, PROJECTION_ARRAY, TOKENIZER_ARRAY, default_init, store_attrs
from .files import is_url, store_path
from .layout import LayerLayout, plan_layout
from .tables import TableStore
from .zarr_bfloat16 import BFloat16


def _zarr_dtype(dtype: str) -> Any:
    return BFloat16() if dtype == "bfloat16" else dtype


def create_layer_array(group: zarr.Group, dtype: str, layout: LayerLayout) -> None:
    """The array's metadata only; shards are written by `TableStore.write_shard`."""
    group.create_array(
        layout.array,
        shape=(layout.rows, layout.dim),
        dtype=_zarr_dtype(dtype),
        chunks=(layout.chunk_rows, layout.dim),
        shards=(layout.shard_rows, layout.dim),
        compressors=[Crc32cCodec()],
        fill_value=0.0,
        dimension_names=("row", "column"),
        attributes={"engram_layer_id": layout.layer_id},
        overwrite=True,
    )


def write_projection_arrays(group: zarr.Group, projection: VocabProjection) -> None:
    lookup = group.create_array(
        PROJECTION_ARRAY,
        shape=(projection.vocab_size,),
        dtype="int64",
        chunks=(projection.vocab_size,),
        compressors=[ZstdCodec(level=3)],
        fill_value=0,
        overwrite=True,
    )
    lookup[:] = projection.lookup
    if projection.tokenizer_json is not None:
        raw = np.frombuffer(projection.tokenizer_json, dtype=np.uint8)
        tok = group.create_array(
            TOKENIZER_ARRAY,
            shape=raw.shape,
            dtype="uint8",
            chunks=raw.shape,
            compressors=[ZstdCodec(level=3)],
            fill_value=0,
            overwrite=True,
        )
        tok[:] = raw


def _remove_existing(path: str) -> None:
    """Delete what --overwrite replaces, but never a folder that is not a table store."""
    if is_url(path):
        try:
            group = zarr.open_group(path, mode="r", zarr_format=3)
        except Exception:  # nothing there, or not zarr: the create below decides
            return
        if ATTRS_KEY not in dict(group.attrs):
            raise EngramError(f"{path} holds a zarr group that is not an engram table store; refusing to overwrite it")
        sync(group.store.delete_dir(""))
        return
    target = Path(path)
    if target.is_file() or target.is_symlink():
        raise EngramError(f"{path} is a file, not a table store; refusing to overwrite it")
    if not target.is_dir() or not any(target.iterdir()):
        return
    if not (target / "zarr.json").is_file():
        raise EngramError(f"{path} is a non-empty folder that is not a table store; refusing to overwrite it")
    try:
        shutil.rmtree(target)
    except OSError as exc:
        raise EngramError(f"cannot remove {path}: {exc.strerror or exc}") from None


def store_exists(path: str) -> bool:
    if is_url(path):
        try:
            zarr.open_group(path, mode="r", zarr_format=3)
            return True
        except Exception:  # any failure to open means there is no group to protect
            return False
    target = Path(path)
    return target.is_file() or (target.is_dir() and any(target.iterdir()))


def create_store(
    path: str | Path,
    spec: TableSpec,
    projection: VocabProjection,
    *,
    shards: int = 1,
    shard_by: str = "rows",
    dtype: str | None = None,
    overwrite: bool = False,
    init: dict[str, Any] | None = None,
    layers: list[int] | None = None,
) -> TableStore:
    """An empty store with the standard layout, ready for `write_rows`/`build_shard`.

    `layers` keeps only some of the spec's layers (an import of one layer of a published
    model): head sizes and offsets still come from the whole spec, so rows stay where the
    model's hasher puts them, and completeness counts only the layers kept.

    `init` records where the values come from (default: this module's generator and the spec's
    distribution); an importer passes e.g. {"algorithm": "imported", "source": "ckpt.pt"}.
    Call `mark_complete()` once every shard is written.
    """
    path = store_path(path)
    if dtype is not None:
        spec = spec.replace(dtype=dtype)
    layouts = plan_layout(spec, shards, shard_by)
    if layers is not None:
        for layer in layers:
            spec.head_sizes(layer)  # an EngramError naming the spec's layers if it has no such layer
        layouts = {layer: layouts[layer] for layer in spec.layer_ids if layer in set(layers)}
    if store_exists(path):
        if not overwrite:
            raise OutputExistsError(f"{path} already exists; pass --overwrite to replace it")
        _remove_existing(path)
    attrs = store_attrs(spec, projection, layouts, shards, shard_by, init or default_init(spec))
    if layers is not None:
        attrs["stored_layers"] = list(layouts)
    try:
        group = zarr.create_group(path, overwrite=False, attributes={ATTRS_KEY: attrs})
        for layout in layouts.values():
            create_layer_array(group, spec.dtype, layout)
        write_projection_arrays(group, projection)
    except (OSError, ValueError, ImportError) as exc:  # ImportError: e.g. s3fs not installed for s3://
        raise EngramError(f"cannot create table store {path}: {getattr(exc, 'strerror', None) or exc}") from None
    return TableStore(path, group, writable=True)
