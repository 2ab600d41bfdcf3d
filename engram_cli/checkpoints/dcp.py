"""Training checkpoints (torch.distributed.checkpoint) of a store, and reading them back.

`export_training` writes what N training ranks would have written with DCP: every table is one
logical (rows, dim) tensor (or one per head, with `per_head`) saved as N row pieces (a layer
tensor by default in the store's own rank partition, otherwise cut as `torch.chunk` cuts N
pieces), each piece in its own `__i_0.distcp` file as chunks of at most 32 MiB, plus a `.metadata`
that DCP's resharding reads. It drives DCP's own `FileSystemWriter` in one process with no process
group, one chunk in memory at a time (and the next one being read), whatever the piece size; any
world size then loads it (`dcp.load` into plain tensors, or into `Shard(0)` DTensors on M ranks).
Every write starts its way to disk at once, so the closing fsync waits only for the last ones.
The hashing metadata rides along as small tensors under `engram.*` (`metadata`), so training code
can rebuild the hasher from the checkpoint alone.

`DcpSource` reads such a checkpoint back, row window by row window, for `engram import`; a
checkpoint some framework wrote carries no such metadata, so `--spec`, `--projection` and the key
template then say what it holds, and every tensor's shape is checked against them. DCP metadata is
a pickle: it is only read with `trust_pickle`.
"""

from __future__ import annotations

import contextlib
import io
import json
import math
import os
import string
import struct
import time
import zipfile
import zlib
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

import torch

from ..dtypes import INFERENCE_DTYPES, STORE_DTYPES, from_torch, torch_dtype
from ..errors import ChecksumError, EngramError, FormatError, UsageError
from ..helpers import os_error_behind, plain_file_name, prefetched, row_blocks, swap_into_place, write_error
from ..progress import SILENT, Progress
from ..spec import TableSpec, spec_from_dict
from .conversion import Conversion
from .keys import (
    DEFAULT_HEAD_TEMPLATE,
    DEFAULT_KEY_TEMPLATE,
    LOOKUP_KEY,
    META_KEY,
    TOKENIZER_ZIP_KEY,
    check_distinct_keys,
    check_key_template,
    head_key,
    meta_keys,
    metadata_keys,
    piece_names,
)
from .metadata import check_given, check_meta_tensors, meta_tensors
from .output import prepare_output, remove_tree
from .reports import ExportReport
from .sources import LayerSource, StoreSource, TableSource, open_source_store

DCP_FORMAT = "engram-dcp"
DCP_FORMAT_VERSION = "1"
_CHUNK_BYTES = 32 << 20  # one DCP chunk: what the writer and each loading rank hold at a time


_ITEM_OVERHEAD = 4096  # bytes torch.save adds around each chunk (zip headers, pickle, padding)


_SMALL_LIMIT = 1 << 30  # elements of a metadata tensor (lookup, tokenizer zip) read whole


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
        "sharding": source.sharding,
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
    tmp = prepare_output(output, overwrite, needed)
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
        swap_into_place(tmp, output)
    except Exception as exc:
        cause = os_error_behind(exc)
        if cause is None:
            raise
        raise write_error(output, cause) from None
    finally:
        remove_tree(tmp)
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


def _read_dcp_metadata(path: Path, trust_pickle: bool) -> Any:
    from torch.distributed.checkpoint import FileSystemReader
    from torch.distributed.checkpoint.metadata import Metadata

    if not trust_pickle:
        raise UsageError(
            f"{path} is a DCP checkpoint, whose .metadata is a Python pickle that can run "
            "code when read; pass --trust-pickle if you trust where it came from"
        )
    try:
        metadata = FileSystemReader(path).read_metadata()
    except Exception as exc:  # any unpickling failure means this is no DCP metadata we can use
        raise FormatError(f"{path}/.metadata is not readable DCP metadata ({type(exc).__name__}: {exc})") from None
    if not isinstance(metadata, Metadata) or not isinstance(metadata.storage_data, dict):
        raise FormatError(f"{path}/.metadata is not DCP checkpoint metadata")
    return metadata


def check_zip_crc(data: bytes, where: str) -> None:
    """Check every member of a zip archive (what `torch.save` writes, and so every tensor item
    of a `.distcp` file) against the CRC-32 its central directory records."""
    try:
        with zipfile.ZipFile(io.BytesIO(data)) as archive:
            bad = archive.testzip()
    except (zipfile.BadZipFile, NotImplementedError, ValueError, EOFError, OSError, zlib.error, struct.error) as exc:
        raise ChecksumError(f"{where} is damaged: {exc}") from None
    if bad is not None:
        raise ChecksumError(f"{where} is damaged: {bad} fails its CRC-32 check")


def _verified_reader(path: Path) -> Any:
    """DCP's FileSystemReader, reading each item whole and checking its zip CRC-32s first:
    torch.load does not, so flipped bytes would otherwise load as wrong values."""
    from torch.distributed.checkpoint import FileSystemReader

    class VerifiedReader(FileSystemReader):
        def _slice_file(self, file: Any, sinfo: Any) -> IO[bytes]:
            where = f"{path / sinfo.relative_path} (bytes {sinfo.offset:,}..{sinfo.offset + sinfo.length:,})"
            file.seek(sinfo.offset)
            data = file.read(sinfo.length)
            if len(data) != sinfo.length:
                raise FormatError(f"{where} is truncated: the file ends after {len(data):,} of those bytes")
            if not sinfo.transform_descriptors and data[:4] == b"PK\x03\x04":
                check_zip_crc(data, where)
            return io.BytesIO(data)

    return VerifiedReader(path)


def _load_failure(path: Path, exc: BaseException) -> EngramError:
    """One line for a DCP load that failed: our own errors as they are, the rest named."""
    from torch.distributed.checkpoint.api import CheckpointException

    if isinstance(exc, CheckpointException) and exc.failures:
        exc = next(iter(exc.failures.values()))[0]
    if isinstance(exc, EngramError):
        return exc
    if isinstance(exc, OSError):
        return FormatError(f"cannot read checkpoint {path}: {exc.strerror or exc} ({getattr(exc, 'filename', '')})")
    first = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
    return FormatError(f"cannot read checkpoint {path}: {type(exc).__name__}: {first}")


def _dcp_load(path: Path, windows: dict[str, tuple[int, torch.Tensor]]) -> None:
    """Fill each buffer with rows [start, start + len) of its key, through DCP's resharding reads."""
    import warnings

    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.api import CheckpointException
    from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner
    from torch.distributed.checkpoint.metadata import ChunkStorageMetadata, TensorStorageMetadata
    from torch.distributed.checkpoint.planner import LoadPlan
    from torch.distributed.checkpoint.planner_helpers import create_read_items_for_chunk_list

    class WindowPlanner(DefaultLoadPlanner):
        def create_local_plan(self) -> LoadPlan:
            items = []
            for key, (start, buffer) in windows.items():
                offsets = torch.Size([start] + [0] * (buffer.dim() - 1))
                chunk = ChunkStorageMetadata(offsets, buffer.shape)
                assert self.metadata is not None  # set by DefaultLoadPlanner.set_up_planner
                entry = self.metadata.state_dict_metadata[key]
                assert isinstance(entry, TensorStorageMetadata)
                items += create_read_items_for_chunk_list(key, entry, [chunk])
            return LoadPlan(items)

        def lookup_tensor(self, index: Any) -> torch.Tensor:
            return windows[index.fqn][1]

    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="torch.distributed is disabled")
            dcp.load({}, storage_reader=_verified_reader(path), planner=WindowPlanner())
    except (Exception, CheckpointException) as exc:
        raise _load_failure(path, exc) from None


def _check_pieces(path: Path, metadata: Any, keys: Iterable[str]) -> None:
    """Refuse, before anything is read, a checkpoint whose `.metadata` does not add up: pieces
    of a tensor that overlap or leave part of it uncovered (the buffer would keep garbage there),
    a piece with no stored location, a location outside the folder, a missing or short file."""
    storage = {(index.fqn, tuple(index.offset or ())): info for index, info in metadata.storage_data.items()}
    sizes: dict[str, int] = {}
    for key in keys:
        entry = metadata.state_dict_metadata[key]
        shape = tuple(entry.size)
        boxes = []
        for chunk in entry.chunks:
            offsets, extent = tuple(chunk.offsets), tuple(chunk.sizes)
            if (
                len(offsets) != len(shape)
                or len(extent) != len(shape)
                or any(o < 0 or n < 0 or o + n > s for o, n, s in zip(offsets, extent, shape))
            ):
                raise FormatError(f"{path}/.metadata: a piece of {key} at {list(offsets)} lies outside its {shape}")
            info = storage.get((key, offsets))
            if info is None:
                raise FormatError(
                    f"{path}/.metadata lists a piece of {key} at {list(offsets)} but not where it is stored"
                )
            name = info.relative_path
            if not plain_file_name(name):
                raise FormatError(f"{path}/.metadata puts a piece of {key} in {name!r}, outside the checkpoint folder")
            if name not in sizes:
                try:
                    sizes[name] = (path / name).stat().st_size
                except FileNotFoundError:
                    raise FormatError(f"{path / name} is missing (it holds part of {key})") from None
                except OSError as exc:
                    raise FormatError(f"cannot read {path / name}: {exc.strerror or exc}") from None
            if info.offset < 0 or info.length <= 0 or info.offset + info.length > sizes[name]:
                raise FormatError(
                    f"{path / name} is truncated: a piece of {key} needs bytes {info.offset:,}.."
                    f"{info.offset + info.length:,} and the file has {sizes[name]:,}"
                )
            boxes.append((offsets, extent))
        covered = sum(math.prod(extent) for _, extent in boxes)
        overlap = _first_overlap(boxes)
        if overlap is not None or covered != math.prod(shape):
            what = f"overlap at {list(overlap)}" if overlap is not None else "leave part of it uncovered"
            raise FormatError(f"{path}/.metadata: the pieces of {key} {what}")


def _first_overlap(boxes: list[tuple[tuple[int, ...], tuple[int, ...]]]) -> tuple[int, ...] | None:
    """The offsets of a box that overlaps an earlier one (a sweep along the first axis)."""
    active: list[tuple[tuple[int, ...], tuple[int, ...]]] = []
    for offsets, extent in sorted(b for b in boxes if all(b[1])):
        active = [a for a in active if a[0][0] + a[1][0] > offsets[0]]
        for other, size in active:
            if all(o < p + n and p < o + m for o, m, p, n in zip(offsets, extent, other, size)):
                return offsets
        active.append((offsets, extent))
    return None


def _engram_tables(meta: dict[str, Any], spec: TableSpec, where: str) -> dict[int, list[tuple[str, int, int]]]:
    """The table pieces `engram export` recorded, refused unless each layer's pieces follow
    each other from row 0 to its last row under distinct names that no metadata tensor has."""
    try:
        tables = {
            int(layer): [(str(e["key"]), int(e["start"]), int(e["stop"])) for e in entries]
            for layer, entries in meta["tables"].items()
        }
    except (KeyError, TypeError, ValueError, AttributeError):
        raise FormatError(f"{where}: the table list in {META_KEY} is damaged") from None
    names = piece_names((layer, key, a, b) for layer, parts in tables.items() for key, a, b in parts)
    check_distinct_keys(names, metadata_keys(spec.layer_ids), where)
    for layer, parts in tables.items():
        if layer not in spec.layer_ids:
            raise FormatError(f"{where} records a table for layer {layer}, which its spec does not have")
        bounds = [0] + [b for _, _, b in parts]
        if not parts or [a for _, a, _ in parts] != bounds[:-1] or bounds[-1] != spec.rows(layer):
            raise FormatError(
                f"{where}: the recorded tensors of layer {layer} do not cover its {spec.rows(layer):,} rows in order"
            )
    return tables


class DcpSource(TableSource):
    """A DCP checkpoint read back row window by row window (never a whole table at once)."""

    def __init__(
        self,
        path: Path,
        *,
        trust_pickle: bool,
        spec: TableSpec | None,
        projection: Any,
        key_template: str | None,
        layers: Iterable[int] | None,
    ) -> None:
        from torch.distributed.checkpoint.metadata import TensorStorageMetadata

        self.path = path
        metadata = _read_dcp_metadata(path, trust_pickle)
        entries = metadata.state_dict_metadata
        self.entries = entries
        self._metadata = metadata
        meta = self._load_meta()
        if meta is not None:
            try:
                stored_spec = spec_from_dict(meta["spec"])
                recorded = meta["projection"]
                fingerprint = recorded.get("fingerprint")
            except (KeyError, TypeError, AttributeError, EngramError) as exc:
                raise FormatError(f"{path}: the spec or projection in {META_KEY} is damaged ({exc})") from None
            check_given(stored_spec, fingerprint, spec, projection, str(path))
            spec = stored_spec
            projection = self._stored_projection(entries, recorded)
            tables = _engram_tables(meta, spec, str(path))
            self.sharding = meta.get("sharding")
            self.store_dtype = meta.get("store_dtype")
        else:
            if spec is None:
                raise UsageError(
                    f"{path} carries no engram hashing metadata (not made by `engram export`): "
                    "pass --spec (and --projection, unless the spec's tokenizer is the model's)"
                )
            if projection is None:
                from ..vocab import spec_projection

                projection = spec_projection(spec)
            template = key_template or DEFAULT_KEY_TEMPLATE
            fields = {f for _, f, _, _ in string.Formatter().parse(template) if f}
            names = check_key_template(template, per_head=bool(fields & {"head", "order", "order_head"}))
            tables = {}
            for layer_id in spec.layer_ids:
                if len(names) == 1:
                    tables[layer_id] = [(template.format(layer_id=layer_id), 0, spec.rows(layer_id))]
                    continue
                tables[layer_id] = []
                for head, (offset, size) in enumerate(zip(spec.offsets(layer_id), spec.head_sizes(layer_id))):
                    key = head_key(template, layer_id, head, spec.n_head_per_ngram)
                    tables[layer_id].append((key, offset, offset + size))
            check_distinct_keys(
                piece_names((layer, key, a, b) for layer, parts in tables.items() for key, a, b in parts),
                (),
                f"key template {template!r}",
            )
            tables = {k: v for k, v in tables.items() if any(key in entries for key, _, _ in v)}
            if not tables:
                raise UsageError(
                    f"{path} has no tensor named like {template!r} (keys: "
                    f"{', '.join(sorted(entries)[:4])}, ...); pass --key-template"
                )
            self.store_dtype = None
        chosen = tuple(sorted(tables)) if layers is None else tuple(int(x) for x in layers)
        for layer_id in chosen:
            if layer_id not in tables:
                raise UsageError(f"{path} holds no table for layer {layer_id} (layers: {sorted(tables)})")
            for key, start, stop in tables[layer_id]:
                entry = entries.get(key)
                if not isinstance(entry, TensorStorageMetadata):
                    raise FormatError(f"{path} lacks tensor {key!r} of layer {layer_id}")
                if tuple(entry.size) != (stop - start, spec.dim):
                    raise FormatError(
                        f"{key} in {path} is {tuple(entry.size)} but spec {spec.name} needs {(stop - start, spec.dim)}"
                    )
        _check_pieces(path, metadata, [key for layer in chosen for key, _, _ in tables[layer]])
        super().__init__(spec, projection, chosen)
        self.tables = tables
        dtypes = {entries[key].properties.dtype for layer in chosen for key, _, _ in tables[layer]}
        names = [from_torch(d).name for d in dtypes if str(d).removeprefix("torch.") in INFERENCE_DTYPES]
        if len(dtypes) != 1 or not names:
            raise FormatError(f"{path}: tables of dtype {', '.join(map(str, dtypes))} cannot go into a store")
        self.dtype = names[0]
        if meta is not None:
            present = [name for layer in chosen for name in meta_keys(layer).values() if name in entries]
            check_meta_tensors(self._load_small(present), spec, projection.compressed_size, str(path))

    def _load_meta(self) -> dict[str, Any] | None:
        if META_KEY not in self.entries:
            return None
        raw = self._load_small([META_KEY])[META_KEY]
        try:
            meta = json.loads(raw.numpy().tobytes())
        except (UnicodeDecodeError, json.JSONDecodeError):
            meta = None
        if not isinstance(meta, dict) or meta.get("format") != DCP_FORMAT:
            raise FormatError(f"{self.path}: {META_KEY} is not the metadata `engram export` writes")
        return meta

    def _load_small(self, keys: list[str]) -> dict[str, torch.Tensor]:
        from torch.distributed.checkpoint.metadata import TensorStorageMetadata

        for key in keys:
            entry = self.entries[key]
            if not isinstance(entry, TensorStorageMetadata) or len(entry.size) != 1 or entry.size[0] > _SMALL_LIMIT:
                raise FormatError(f"{self.path}: {key} is not the small 1-D tensor engram writes there")
        _check_pieces(self.path, self._metadata, keys)
        buffers = {k: torch.empty(tuple(self.entries[k].size), dtype=self.entries[k].properties.dtype) for k in keys}
        _dcp_load(self.path, {k: (0, v) for k, v in buffers.items()})
        return buffers

    def _stored_projection(self, entries: dict[str, Any], recorded: dict[str, Any]) -> Any:
        from ..vocab import restore_projection

        if LOOKUP_KEY not in entries:
            raise FormatError(f"{self.path} records engram metadata but lacks {LOOKUP_KEY}")
        keys: list[str] = [k for k in (LOOKUP_KEY, TOKENIZER_ZIP_KEY) if k in entries]
        loaded = self._load_small(keys)
        zipped = loaded.get(TOKENIZER_ZIP_KEY)
        if zipped is not None and zipped.dtype != torch.uint8:
            raise FormatError(f"{self.path}: {TOKENIZER_ZIP_KEY} must hold uint8 zip bytes")
        return restore_projection(
            loaded[LOOKUP_KEY].numpy(),
            None if zipped is None else zipped.numpy().tobytes(),
            recorded,
            str(self.path),
        )

    def boundaries(self, layer_id: int) -> list[int]:
        """Layer rows where a saved piece ends: reads aligned to them load each piece once."""
        ends = set()
        for key, start, _ in self.tables[layer_id]:
            for chunk in self.entries[key].chunks:
                ends.add(start + chunk.offsets[0] + chunk.sizes[0])
        return sorted(ends)

    def layer(self, layer_id: int) -> LayerSource:
        """The reader of one layer's table: each read loads just its rows through DCP's resharding reads."""
        spec = self.spec
        parts = self.tables[layer_id]
        target = torch_dtype(self.dtype)

        def read(begin: int, end: int) -> torch.Tensor:
            out = torch.empty((end - begin, spec.dim), dtype=target)
            windows = {}
            for key, start, stop in parts:
                lo, hi = max(begin, start), min(end, stop)
                if lo < hi:
                    windows[key] = (lo - start, out[lo - begin : hi - begin])
            _dcp_load(self.path, windows)
            return out

        return LayerSource(layer_id, spec.rows(layer_id), spec.dim, read)


def read_windows(shards: list[tuple[int, int]], boundaries: list[int]) -> list[tuple[int, int]]:
    """Runs of whole store shards, each ending at the first shard end at or past the end of the
    source piece it starts in: every source piece is then loaded about once, and a window holds
    at most one piece plus a shard."""
    windows, i = [], 0
    while i < len(shards):
        begin = shards[i][0]
        piece_end = next((b for b in boundaries if b > begin), shards[-1][1])
        j = i
        while j < len(shards) - 1 and shards[j][1] < piece_end:
            j += 1
        windows.append((begin, shards[j][1]))
        i = j + 1
    return windows
