"""`engram import`: a DCP checkpoint, an inference export (either layout) or a GGUF back into a table store.

The checkpoint is opened as a `TableSource` (`sources.open_checkpoint`: `dcp_source`,
`safetensors_source` or `gguf_source`), which checks what it holds; it is read a window of whole
store shards at a time (the windows the source asks for, `TableSource.read_windows`), converted to
the store dtype and handed to the store package's `StoreWriter`, which writes into the temporary
path `output.Output` gives and is swapped into place once complete. The new store records `init` as
imported from the checkpoint, keeps the source's sharding unless told otherwise, and is marked
complete at the end.
"""

from __future__ import annotations

import time
from collections.abc import Iterable
from pathlib import Path
from typing import TYPE_CHECKING

from ..dtypes import STORE_DTYPES, StoreDType, to_numpy, torch_dtype
from ..errors import UsageError
from ..output import Output
from ..progress import SILENT, Progress
from ..spec import TableSpec
from ..vocab import VocabProjection
from .conversion import Conversion, NonFiniteRows
from .reports import ImportReport
from .sources import Sharding, detect_format, open_checkpoint

if TYPE_CHECKING:
    from ..store.layout import ShardBy


def import_checkpoint(
    checkpoint: str | Path,
    output: str | Path,
    *,
    trust_pickle: bool = False,
    spec: TableSpec | None = None,
    projection: VocabProjection | None = None,
    key_template: str | None = None,
    layers: Iterable[int] | None = None,
    dtype: StoreDType | None = None,
    shards: int | None = None,
    shard_by: ShardBy | None = None,
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
        checkpoint: a DCP folder, a .safetensors file, an index json, a folder of safetensors, a
            DeepSeek-V4.1 model folder, or a GGUF (whole, or the first file of a split set; its
            spec and projection from its `deepseek41.engram.*` keys, see `gguf_source`).
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
    from ..store.writer import STORE, StoreWriter

    checkpoint, output = Path(checkpoint), Path(output)
    kind = detect_format(checkpoint)  # before any other check: a missing checkpoint is the first thing to say
    if dtype is not None and dtype not in STORE_DTYPES:
        raise UsageError(f"unknown store dtype {dtype!r}; allowed: {', '.join(STORE_DTYPES)}")
    target = Output(output, STORE, overwrite=overwrite)
    layers = None if layers is None else list(dict.fromkeys(int(x) for x in layers)) or None
    source = open_checkpoint(
        checkpoint,
        kind,
        trust_pickle=trust_pickle,
        spec=spec,
        projection=projection,
        key_template=key_template,
        layers=layers,
    )
    store_dtype = dtype or source.store_dtype or (source.dtype if source.dtype in STORE_DTYPES else source.spec.dtype)
    recorded = source.sharding or Sharding()
    init = {
        "algorithm": "imported",
        "source": str(checkpoint.absolute()),
        "format": source.format,
        "layout": source.layout,
    }
    started = time.perf_counter()
    partial = set(source.layer_ids) != set(source.spec.layer_ids)
    writer = StoreWriter(
        source.spec.replace(dtype=store_dtype),
        source.projection,
        shards=shards or recorded.ranks,
        shard_by=shard_by or recorded.shard_by,
        init=init,
        layers=list(source.layer_ids) if partial else None,
    )
    with target.writing(writer.bytes, os_errors=False) as tmp:
        writer.create(tmp)
        conversion = Conversion(source.dtype, store_dtype)
        nonfinite = NonFiniteRows(allow_nonfinite)
        torch_target = torch_dtype(store_dtype)
        written = 0
        task = progress.task("import", source.total_rows)
        for layer_id in source.layer_ids:
            reader = source.layer(layer_id)
            for begin, end in source.read_windows(layer_id, writer.shard_ranges(layer_id)):
                values = reader.read(begin, end)
                converted = values.to(torch_target)
                conversion.check(values, converted, f"layer {layer_id} rows {begin:,}-{end - 1:,}")
                nonfinite.count(layer_id, begin, converted)
                written += writer.write_rows(layer_id, begin, to_numpy(converted))
                task.advance(end - begin)
        writer.finish()
    complete = True
    notes = nonfinite.notes()
    if partial:
        notes.append(
            f"only layers {', '.join(map(str, source.layer_ids))} of the spec's "
            f"{', '.join(map(str, source.spec.layer_ids))} imported; the store holds just those"
        )
    return ImportReport(
        checkpoint=str(checkpoint),
        format=source.format,
        layout=source.layout,
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
