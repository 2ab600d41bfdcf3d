"""`engram export --for training`: a store written as a DCP checkpoint (its format: `dcp_format`).

`export_training` writes what N training ranks would have written with DCP: every table is one
logical (rows, dim) tensor (or one per head, with `per_head`) saved as N row pieces (a layer
tensor by default in the store's own rank partition, otherwise cut as `torch.chunk` cuts N
pieces), each piece in its own `__i_0.distcp` file as chunks of at most 32 MiB, plus a `.metadata`
that DCP's resharding reads. It drives DCP's own `FileSystemWriter` in one process with no process
group, one chunk in memory at a time (and the next one being read), whatever the piece size; any
world size then loads it (`dcp.load` into plain tensors, or into `Shard(0)` DTensors on M ranks).
Every write starts its way to disk at once, so the closing fsync waits only for the last ones.
The hashing metadata rides along as small tensors under `engram.*` (`metadata`), so training code
can rebuild the hasher from the checkpoint alone. The checkpoint is written in a temporary folder
and swapped into place when complete (`engram_cli.output`).
"""

from __future__ import annotations

import contextlib
import io
import os
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ..dtypes import STORE_DTYPES, torch_dtype
from ..errors import UsageError
from ..helpers import os_error_behind, prefetched, row_blocks
from ..output import Output, write_error
from ..progress import SILENT, Progress
from .conversion import Conversion
from .dcp_format import DCP_FORMAT, DCP_FORMAT_VERSION
from .keys import (
    DEFAULT_HEAD_TEMPLATE,
    DEFAULT_KEY_TEMPLATE,
    check_distinct_keys,
    check_key_template,
    head_key,
    metadata_keys,
    piece_names,
)
from .metadata import meta_tensors
from .output import EXPORT
from .reports import ExportReport
from .sources import StoreSource, open_source_store

_CHUNK_BYTES = 32 << 20  # one DCP chunk: what the writer and each loading rank hold at a time


_ITEM_OVERHEAD = 4096  # bytes torch.save adds around each chunk (zip headers, pickle, padding)


def even_pieces(rows: int, pieces: int) -> list[tuple[int, int]]:
    """Row ranges of `torch.chunk`/DTensor `Shard(0)`: ceil-sized, trailing ones may be empty."""
    size = -(-rows // pieces)
    return [(min(r * size, rows), min((r + 1) * size, rows)) for r in range(pieces)]


@dataclass(frozen=True)
class _Tensor:
    """One logical tensor of the checkpoint: rows [start, stop) of a layer table, in pieces."""

    key: str
    layer_id: int
    start: int
    stop: int
    pieces: tuple[tuple[int, int], ...]


def _training_tensors(source: StoreSource, key_template: str, per_head: bool, shards: int | None) -> list[_Tensor]:
    spec = source.spec
    tensors = []
    for layer_id in source.layer_ids:
        rows = spec.rows(layer_id)
        if not per_head:
            pieces = source.store.partition(layer_id) if shards is None else even_pieces(rows, shards)
            tensors.append(_Tensor(key_template.format(layer_id=layer_id), layer_id, 0, rows, tuple(pieces)))
            continue
        count = shards or source.store.ranks
        for head, (offset, size) in enumerate(zip(spec.offsets(layer_id), spec.head_sizes(layer_id))):
            key = head_key(key_template, layer_id, head, spec.n_head_per_ngram)
            tensors.append(_Tensor(key, layer_id, offset, offset + size, tuple(even_pieces(size, count))))
    check_distinct_keys(
        piece_names((t.layer_id, t.key, t.start, t.stop) for t in tensors),
        metadata_keys(spec.layer_ids),
        f"key template {key_template!r}",
    )
    return tensors


def export_training(
    store: str | Path,
    output: str | Path,
    *,
    shards: int | None = None,
    key_template: str | None = None,
    per_head: bool = False,
    dtype: str | None = None,
    overwrite: bool = False,
    progress: Progress = SILENT,
) -> ExportReport:
    """Write a store as a DCP checkpoint of row-sharded tensors, one piece in memory at a time.

    Args:
        store: the table store to read (it must be complete).
        output: the checkpoint folder to write.
        shards: how many row pieces each tensor is saved as, cut as `torch.chunk` cuts them
            (default: the store's rank partition, or for per-head tensors its rank count).
        key_template: the tensor names, with `{layer_id}` (and head fields with `per_head`).
        per_head: one tensor per head instead of one per layer.
        dtype: the saved dtype (default: the store's); a table dtype.
        overwrite: replace an existing checkpoint.
        progress: receives a task advancing by rows exported.
    """
    from torch.distributed.checkpoint import FileSystemWriter
    from torch.distributed.checkpoint.default_planner import DefaultSavePlanner
    from torch.distributed.checkpoint.metadata import (
        ChunkStorageMetadata,
        Metadata,
        MetadataIndex,
        StorageMeta,
        TensorProperties,
        TensorStorageMetadata,
    )
    from torch.distributed.checkpoint.planner import SavePlan, TensorWriteData, WriteItem, WriteItemType

    output = Path(output)
    if shards is not None and shards < 1:
        raise UsageError(f"--shards must be a positive integer, got {shards}")
    source = open_source_store(store)
    smallest = min(
        min(source.spec.head_sizes(layer)) if per_head else source.spec.rows(layer) for layer in source.layer_ids
    )
    if shards is not None and shards > smallest:
        raise UsageError(
            f"--shards {shards} is more than the {smallest:,} rows of the smallest "
            f"{'head table' if per_head else 'layer table'}"
        )
    dtype = dtype or source.dtype
    if dtype not in STORE_DTYPES:
        raise UsageError(f"unknown dtype {dtype!r} for training; allowed: {', '.join(STORE_DTYPES)}")
    key_template = key_template or (DEFAULT_HEAD_TEMPLATE if per_head else DEFAULT_KEY_TEMPLATE)
    check_key_template(key_template, per_head=per_head)
    tensors = _training_tensors(source, key_template, per_head, shards)
    count = max(len(t.pieces) for t in tensors)
    spec, target = source.spec, torch_dtype(dtype)
    tables: dict[str, Any] = {}
    for t in tensors:
        tables.setdefault(str(t.layer_id), []).append({"key": t.key, "start": t.start, "stop": t.stop})
    meta = {
        "format": DCP_FORMAT,
        "format_version": DCP_FORMAT_VERSION,
        "spec": spec.to_dict(),
        "dtype": dtype,
        "store_dtype": source.dtype,
        "per_head": per_head,
        "key_template": key_template,
        "tables": tables,
        "sharding": source.sharding and source.sharding.to_json(),
        "projection": {**source.projection.metadata, "fingerprint": source.projection.fingerprint()},
    }
    small = meta_tensors(source, meta)
    conversion = Conversion(source.dtype, dtype)

    properties = TensorProperties(dtype=target)
    state_md: dict[str, Any] = {
        t.key: TensorStorageMetadata(properties, torch.Size([t.stop - t.start, spec.dim]), []) for t in tensors
    }
    readers = {layer_id: source.layer(layer_id) for layer_id in source.layer_ids}
    plans: list[SavePlan] = []
    blocks: list[list[tuple[_Tensor, int, int]]] = []  # per plan, in write order
    for rank in range(count):
        for t in tensors:
            begin, end = t.pieces[rank] if rank < len(t.pieces) else (0, 0)
            if begin == end:
                continue
            size = torch.Size([t.stop - t.start, spec.dim])
            step = readers[t.layer_id].preferred_block(max(1, _CHUNK_BYTES // (spec.dim * target.itemsize)))
            items, reads = [], []
            for a, b in row_blocks(end - begin, step):
                chunk = ChunkStorageMetadata(torch.Size([begin + a, 0]), torch.Size([b - a, spec.dim]))
                state_md[t.key].chunks.append(chunk)
                items.append(
                    WriteItem(
                        MetadataIndex(t.key, chunk.offsets),
                        WriteItemType.SHARD,
                        tensor_data=TensorWriteData(chunk, properties, size),
                    )
                )
                reads.append((t, begin + a, begin + b))
            plans.append(SavePlan(items))
            blocks.append(reads)
    small_items = []
    for key, value in small.items():
        chunk = ChunkStorageMetadata(torch.Size([0]), value.shape)
        props = TensorProperties(dtype=value.dtype)
        state_md[key] = TensorStorageMetadata(props, value.shape, [chunk])
        small_items.append(
            WriteItem(
                MetadataIndex(key, chunk.offsets),
                WriteItemType.TENSOR,
                tensor_data=TensorWriteData(chunk, props, value.shape),
            )
        )
    plans.append(SavePlan(small_items))
    blocks.append([])
    advance: Callable[[int], None] = lambda rows: None

    def read(block: tuple[_Tensor, int, int]) -> torch.Tensor:
        t, a, b = block
        values = readers[t.layer_id].read(t.start + a, t.start + b)
        converted = values.to(target)
        conversion.check(values, converted, f"layer {t.layer_id} rows {t.start + a:,}-{t.start + b - 1:,}")
        return converted

    class StorePlanner(DefaultSavePlanner):
        """Hands the writer each block as it asks, the next one already being read meanwhile."""

        def __init__(self, reads: list[tuple[_Tensor, int, int]]) -> None:
            super().__init__()
            self.blocks = prefetched(reads, read)

        def resolve_data(self, write_item: WriteItem) -> Any:
            if write_item.index.fqn in small:
                return small[write_item.index.fqn]
            (t, a, b), values = next(self.blocks)
            offset = write_item.index.offset
            if offset is None or (t.key, a) != (write_item.index.fqn, offset[0]):
                raise RuntimeError(f"DCP asked for {write_item.index} out of the planned order")
            advance(b - a)
            return values

    final = output.absolute()

    class Writer(FileSystemWriter):
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            super().__init__(*args, **kwargs)
            self.fs = _writeback_filesystem()

        def storage_meta(self) -> StorageMeta:
            return StorageMeta(checkpoint_id=str(final), save_id=self.save_id)

    pieces = sum(len(md.chunks) for md in state_md.values())
    needed = sum(t.stop - t.start for t in tensors) * spec.dim * target.itemsize
    needed += sum(v.numel() * v.element_size() for v in small.values()) + _ITEM_OVERHEAD * pieces
    with Output(output, EXPORT, overwrite=overwrite).writing(needed, folder=True) as tmp:
        started = time.perf_counter()
        try:
            writer = Writer(tmp, single_file_per_rank=True, sync_files=True, thread_count=1, overwrite=False)
            writer.set_up_storage_writer(True, rank=0, use_collectives=True)
            plans = writer.prepare_global_plan([writer.prepare_local_plan(p) for p in plans])
            results = []
            advance = progress.task("export", source.total_rows).advance
            for plan, reads in zip(plans, blocks):
                results.append(writer.write_data(plan, StorePlanner(reads)).value())
            metadata = Metadata(state_dict_metadata=state_md, planner_data={k: (k,) for k in state_md})
            writer.finish(metadata, results)
        except Exception as exc:  # torch.save reports a failed write as some other error
            cause = os_error_behind(exc)
            if cause is None:
                raise
            raise write_error(output, cause) from None
    seconds = time.perf_counter() - started
    files = sorted(p.name for p in output.iterdir())
    total = sum((output / name).stat().st_size for name in files)
    return ExportReport(
        target="training",
        layout="dcp",
        output=str(output),
        store=str(store),
        dtype=dtype,
        source_dtype=source.dtype,
        files=files,
        index=True,
        layers={
            layer_id: {"keys": [entry["key"] for entry in tables[str(layer_id)]], "rows": spec.rows(layer_id)}
            for layer_id in source.layer_ids
        },
        bytes=total,
        seconds=seconds,
        conversion=conversion.to_json(),
        shards=count,
        per_head=per_head,
    )


class _WritebackFile(io.FileIO):
    """A file whose every write starts on its way to disk at once (`start_writeback`)."""

    def write(self, data: Any) -> int:
        from .safetensors_format import start_writeback

        position = self.tell()
        written = super().write(data)
        start_writeback(self.fileno(), position, written or 0)
        return written


def _writeback_filesystem() -> Any:
    """DCP's FileSystem, writing through `_WritebackFile`: the same bytes, and the closing
    fsync of each file then waits only for its last writes."""
    from torch.distributed.checkpoint.filesystem import FileSystem

    class WritebackFileSystem(FileSystem):
        @contextlib.contextmanager
        def create_stream(self, path: str | os.PathLike[str], mode: str) -> Iterator[io.IOBase]:
            if mode != "wb":
                with super().create_stream(path, mode) as stream:
                    yield stream
                return
            with io.BufferedWriter(_WritebackFile(path, "wb")) as stream:
                yield stream

    return WritebackFileSystem()
