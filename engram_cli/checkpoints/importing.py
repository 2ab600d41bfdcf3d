"""`engram import`: a DCP checkpoint or an inference export (either layout) back into a table store.

The source (a `TableSource`) is read a window of whole store shards at a time (for DCP, windows
aligned to the saved pieces so each is loaded about once, `dcp.read_windows`), converted to the
store dtype and written shard by shard; the new store records `init` as imported from the
checkpoint, keeps the source's sharding unless told otherwise, and is marked complete at the end.
"""

from __future__ import annotations

import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from ..dtypes import STORE_DTYPES, to_numpy, torch_dtype
from ..errors import EngramError, FormatError, OutputExistsError, UsageError
from ..helpers import check_free_space, remove_stale_temporaries, swap_into_place, temporary_name
from ..progress import SILENT, Progress
from ..spec import TableSpec
from ..vocab import VocabProjection
from .conversion import Conversion, NonFiniteRows
from .dcp import DcpSource, read_windows
from .output import remove_tree
from .reports import ImportReport


def detect_format(path: Path) -> str:
    """ "dcp" or "safetensors"; a one-line error for anything else."""
    if path.is_dir() and (path / ".metadata").is_file():
        return "dcp"
    if path.is_file() and (path.name.endswith(".safetensors") or path.name.endswith(".index.json")):
        return "safetensors"
    if path.is_dir() and any(p.name.endswith(".safetensors") for p in path.iterdir()):
        return "safetensors"
    if not path.exists():
        raise UsageError(f"no such checkpoint: {path}")
    raise FormatError(
        f"{path} is not a checkpoint engram can import (expected a DCP folder with "
        ".metadata, or safetensors from `engram export`)"
    )


def import_checkpoint(
    checkpoint: str | Path,
    output: str | Path,
    *,
    trust_pickle: bool = False,
    spec: TableSpec | None = None,
    projection: VocabProjection | None = None,
    key_template: str | None = None,
    layers: Iterable[int] | None = None,
    dtype: str | None = None,
    shards: int | None = None,
    shard_by: str | None = None,
    overwrite: bool = False,
    allow_nonfinite: bool = False,
    progress: Progress = SILENT,
) -> ImportReport:
    """Turn a DCP checkpoint, a safetensors export or a DeepSeek-V4.1 model folder into a store,
    one shard run at a time.

    Hashing metadata comes from the checkpoint when `engram export` wrote it; a deepseek-v41
    folder describes its spec with `engram_*` config keys and its projection with its
    tokenizer.json (see `model_hashing`: only the files holding Engram tensors are opened, and
    fp8 tables are dequantized as the engines do, float32(e4m3) * 2**(scale - 127), then rounded
    to the store dtype). Otherwise (a framework's own checkpoint) `spec` is required, the
    projection defaults to that of the spec's tokenizer, and every table's shape is checked.

    Args:
        checkpoint: a DCP folder, a .safetensors file, an index json, a folder of safetensors, or a
            DeepSeek-V4.1 model folder.
        output: the store to write.
        trust_pickle: allow reading DCP's `.metadata`, a pickle that can run code.
        spec, projection: what the tables are; default: the checkpoint's own metadata (or config
            keys and tokenizer.json), else the spec's tokenizer's projection.
        key_template: the tensor names of a checkpoint without engram metadata.
        layers: import only these layers (default: all the checkpoint holds).
        dtype: the store dtype (default: the one the tables were exported from, else theirs or the spec's).
        shards, shard_by: the store's rank partition (default: the one recorded, else 1 by rows).
        overwrite: replace an existing store.
        allow_nonfinite: import rows with no finite value (refused otherwise); every row holding a
            non-finite value is counted per layer in the report either way.
        progress: receives a task advancing by rows imported.
    """
    from ..store.create import check_outside_stores, check_replaceable, create_store, store_exists
    from ..store.files import BuildLock
    from ..store.layout import plan_layout
    from ..store.shard_format import layer_file_bytes

    checkpoint, output = Path(checkpoint), Path(output)
    kind = detect_format(checkpoint)
    if dtype is not None and dtype not in STORE_DTYPES:
        raise UsageError(f"unknown store dtype {dtype!r}; allowed: {', '.join(STORE_DTYPES)}")
    exists = store_exists(str(output))
    if exists and not overwrite:
        raise OutputExistsError(f"{output} already exists; pass --overwrite to replace it")
    if exists:
        check_replaceable(str(output))
    else:
        check_outside_stores(output)
    parent = output.absolute().parent
    if not parent.is_dir():
        raise EngramError(f"output folder {parent} does not exist")
    layers = None if layers is None else list(dict.fromkeys(int(x) for x in layers)) or None
    source: Any
    if kind == "dcp":
        source = DcpSource(
            checkpoint,
            trust_pickle=trust_pickle,
            spec=spec,
            projection=projection,
            key_template=key_template,
            layers=layers,
        )
        layout = "dcp"
    else:
        from .safetensors_source import open_safetensors_source

        source = open_safetensors_source(checkpoint, spec, projection, layers)
        layout = source.tables.layout
    store_dtype = dtype or source.store_dtype or (source.dtype if source.dtype in STORE_DTYPES else source.spec.dtype)
    sharding = source.sharding or {}
    if not (
        isinstance(sharding, dict)
        and isinstance(sharding.get("ranks", 1), int)
        and sharding.get("shard_by", "rows") in ("rows", "heads")
    ):
        raise FormatError(f"{checkpoint}: the sharding it records ({sharding!r}) is damaged")
    ranks = shards or sharding.get("ranks") or 1
    by = shard_by or sharding.get("shard_by") or "rows"
    init = {"algorithm": "imported", "source": str(checkpoint.absolute()), "format": kind, "layout": layout}
    started = time.perf_counter()
    partial = set(source.layer_ids) != set(source.spec.layer_ids)
    planned = plan_layout(source.spec.replace(dtype=store_dtype), ranks, by)
    needed = sum(layer_file_bytes(planned[layer]) for layer in source.layer_ids)
    remove_stale_temporaries(parent)
    check_free_space(parent, needed)
    tmp = temporary_name(parent / output.name)
    lock = BuildLock(str(output))
    try:
        if exists and lock.held_elsewhere_possible():
            lock.acquire()  # no build may be writing the store this import replaces
        store = create_store(
            tmp,
            source.spec,
            source.projection,
            shards=ranks,
            shard_by=by,
            dtype=store_dtype,
            init=init,
            layers=list(source.layer_ids) if partial else None,
        )
        conversion = Conversion(source.dtype, store_dtype)
        nonfinite = NonFiniteRows(allow_nonfinite)
        target = torch_dtype(store_dtype)
        written = 0
        task = progress.task("import", source.total_rows)
        for layer_id in source.layer_ids:
            reader = source.layer(layer_id)
            ranges = store.shard_ranges(layer_id)
            windows = read_windows(ranges, source.boundaries(layer_id)) if kind == "dcp" else ranges
            for begin, end in windows:
                values = reader.read(begin, end)
                converted = values.to(target)
                conversion.check(values, converted, f"layer {layer_id} rows {begin:,}-{end - 1:,}")
                nonfinite.count(layer_id, begin, converted)
                written += store.write_rows(layer_id, begin, to_numpy(converted))
                task.advance(end - begin)
        store.mark_complete()
        if exists:
            check_replaceable(str(output))  # still a store of ours, now that it is about to go
        swap_into_place(tmp, output)
    finally:
        lock.release()
        remove_tree(tmp)
    complete = True
    notes = nonfinite.notes()
    if partial:
        notes.append(
            f"only layers {', '.join(map(str, source.layer_ids))} of the spec's "
            f"{', '.join(map(str, source.spec.layer_ids))} imported; the store holds just those"
        )
    return ImportReport(
        checkpoint=str(checkpoint),
        format=kind,
        layout=layout,
        store=str(output),
        dtype=store_dtype,
        source_dtype=source.dtype,
        layers={
            layer_id: {"rows": source.spec.rows(layer_id), **nonfinite.of(layer_id)} for layer_id in source.layer_ids
        },
        complete=complete,
        bytes=written,
        seconds=time.perf_counter() - started,
        conversion=conversion.to_json(),
        notes=notes,
    )
