"""An empty table store: the group and its attributes, every layer array's metadata, the projection.

The layout written is the one `attributes` states; no shard file is written here (`build` or an
importer fills them, then marks the store complete). `--overwrite` removes the old store first,
but never a file, a non-empty folder or a zarr group that is not a table store.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import zarr
from zarr.codecs import Crc32cCodec, ZstdCodec
from zarr.core.sync import sync

from ..dtypes import StoreDType
from ..errors import EngramError, OutputExistsError, UsageError
from ..output import temporary_name
from ..spec import TableSpec
from ..vocab import VocabProjection
from .attributes import ATTRS_KEY, PROJECTION_ARRAY, STORE_FORMAT, TOKENIZER_ARRAY, default_init, store_attrs
from .files import LOCK_NAME, is_url, store_path
from .layout import LayerLayout, ShardBy, plan_layout
from .tables import TableStore
from .zarr_bfloat16 import BFloat16


def _zarr_dtype(dtype: str) -> Any:
    return BFloat16() if dtype == "bfloat16" else dtype


def create_layer_array(group: zarr.Group, dtype: str, layout: LayerLayout) -> None:
    """The array's metadata only; shards are written by `TableStore.write_shard`.

    Args:
        group: the store's zarr group.
        dtype: the table dtype ("bfloat16" becomes the zarr extension data type).
        layout: the layer's plan: shape, chunk and shard rows.
    """
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
    """Write the projection lookup (and its tokenizer JSON, when it has one) as arrays of the group."""
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


_STORE_ENTRY = re.compile(
    r"^(zarr\.json|layer_[0-9]+|" + PROJECTION_ARRAY + "|" + TOKENIZER_ARRAY + "|" + re.escape(LOCK_NAME) + ")$"
)


def _engram_attrs(zarr_json: Path) -> dict[str, Any] | None:
    """The engram attributes of a local zarr v3 group file, or None for anything else."""
    try:
        meta = json.loads(zarr_json.read_bytes())
    except (OSError, UnicodeDecodeError, ValueError):
        return None
    if not isinstance(meta, dict) or meta.get("node_type") != "group":
        return None
    attrs = meta.get("attributes")
    engram = attrs.get(ATTRS_KEY) if isinstance(attrs, dict) else None
    return engram if isinstance(engram, dict) and engram.get("format") == STORE_FORMAT else None


def is_engram_store(path: str | Path) -> bool:
    """Whether `path` is a table store (complete or not), recognized by its own group attributes."""
    path = store_path(path)
    if is_url(path):
        try:
            group = zarr.open_group(path, mode="r", zarr_format=3)
        except Exception:  # nothing there, or not zarr: not a store
            return False
        attrs = dict(group.attrs).get(ATTRS_KEY)
        return isinstance(attrs, dict) and attrs.get("format") == STORE_FORMAT
    folder = Path(path)
    return folder.is_dir() and not folder.is_symlink() and _engram_attrs(folder / "zarr.json") is not None


def enclosing_store(path: str | Path) -> Path | None:
    """The table store that `path` lies inside (itself excluded), if any."""
    if is_url(store_path(path)):
        return None
    for parent in Path(path).resolve().parents:
        if _engram_attrs(parent / "zarr.json") is not None:
            return parent
    return None


def check_outside_stores(path: str | Path) -> None:
    """Refuse an output inside a table store: it would become part of that store, or replace
    part of it."""
    inside = enclosing_store(path)
    if inside is not None:
        raise UsageError(f"{path} lies inside the table store {inside}; write it somewhere outside that store")


def check_replaceable(path: str) -> None:
    """Refuse, before anything is written, to --overwrite what is not a table store of ours:
    a file, a link, a foreign folder or zarr dataset, a path inside another store, or a store
    folder that also holds files of its own (they would be deleted with it)."""
    check_outside_stores(path)
    if is_url(path):
        if not is_engram_store(path):
            raise UsageError(f"{path} is not an engram table store; refusing to overwrite it")
        return
    target = Path(path)
    if target.is_symlink():
        raise UsageError(f"{path} is a symbolic link, not a table store; refusing to overwrite it")
    if target.is_file():
        raise UsageError(f"{path} is a file, not a table store; refusing to overwrite it")
    if not target.is_dir() or not any(target.iterdir()):
        return
    if not is_engram_store(target):
        what = "a zarr dataset" if (target / "zarr.json").is_file() else "a folder"
        raise UsageError(f"{path} is {what} that is not an engram table store; refusing to overwrite it")
    foreign = sorted(entry.name for entry in target.iterdir() if not _STORE_ENTRY.match(entry.name))
    if foreign:
        raise UsageError(
            f"{path} is a table store but also holds {foreign[0]!r}, which is not part of it; "
            "move that out before overwriting the store"
        )


def remove_existing(path: str) -> None:
    """Delete the store that --overwrite replaces, after `check_replaceable`: a local store is
    first renamed aside, so a failure never leaves half of it."""
    check_replaceable(path)
    if is_url(path):
        group = zarr.open_group(path, mode="r+", zarr_format=3)
        sync(group.store.delete_dir(""))
        return
    target = Path(path)
    if not target.is_dir():
        return
    aside = temporary_name(target)
    try:
        os.replace(target, aside)
    except OSError as exc:
        raise EngramError(f"cannot remove {path}: {exc.strerror or exc}") from None
    shutil.rmtree(aside, ignore_errors=True)  # what stays is a stale temporary, removed by a later run


def store_exists(path: str) -> bool:
    """Whether something is at `path` that an overwrite would replace: a zarr group, a file or a non-empty folder."""
    if is_url(path):
        try:
            zarr.open_group(path, mode="r", zarr_format=3)
            return True
        except Exception:  # any failure to open means there is no group to protect
            return False
    target = Path(path)
    return target.is_file() or target.is_symlink() or (target.is_dir() and any(target.iterdir()))


def create_store(
    path: str | Path,
    spec: TableSpec,
    projection: VocabProjection,
    *,
    shards: int = 1,
    shard_by: ShardBy = "rows",
    dtype: StoreDType | None = None,
    overwrite: bool = False,
    init: dict[str, Any] | None = None,
    layers: list[int] | None = None,
) -> TableStore:
    """An empty store with the standard layout, ready for `write_rows`/`build_shard`.

    Call `mark_complete()` once every shard is written.

    Args:
        path: the store folder or fsspec URL.
        spec: the tables' spec; head sizes and offsets always come from the whole spec.
        projection: the vocab projection to store beside the tables.
        shards, shard_by: the rank partition to plan for (`layout.plan_layout`).
        dtype: the table dtype (default: the spec's).
        overwrite: replace an existing table store (never anything else).
        init: where the values come from (default: this package's generator and the spec's
            distribution); an importer passes e.g. {"algorithm": "imported", "source": "ckpt.pt"}.
        layers: keep only some of the spec's layers (an import of one layer of a published model):
            rows stay where the model's hasher puts them, and completeness counts only the layers kept.
    """
    spec = spec if dtype is None else spec.replace(dtype=dtype)
    spec.check_compressed_size(projection.compressed_size, "the projection")
    return new_store(
        path, spec, projection, shards=shards, shard_by=shard_by, overwrite=overwrite, init=init, layers=layers
    )


def new_store(
    path: str | Path,
    spec: TableSpec,
    projection: VocabProjection,
    *,
    shards: int = 1,
    shard_by: ShardBy = "rows",
    overwrite: bool = False,
    init: dict[str, Any] | None = None,
    layers: list[int] | None = None,
) -> TableStore:
    """`create_store` for a spec and projection already checked against each other where they
    entered (a build, an import): the same store, without checking their sizes again."""
    path = store_path(path)
    layouts = plan_layout(spec, shards, shard_by)
    if layers is not None:
        for layer in layers:
            spec.head_sizes(layer)  # an EngramError naming the spec's layers if it has no such layer
        layouts = {layer: layouts[layer] for layer in spec.layer_ids if layer in set(layers)}
    check_outside_stores(path)
    projection.check_onto()
    projection.canonical_pad(spec.pad_id)
    if store_exists(path):
        if not overwrite:
            raise OutputExistsError(f"{path} already exists; pass --overwrite to replace it")
        remove_existing(path)
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
