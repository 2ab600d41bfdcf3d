"""Training checkpoints (torch.distributed.checkpoint) of a store, and `engram import` back.

`export_training` writes what N training ranks would have written with DCP: every table is one
logical (rows, dim) tensor saved as N row pieces, each piece in its own `__i_0.distcp` file as
chunks of at most 32 MiB, plus a `.metadata` that DCP's resharding reads. It drives DCP's own
`FileSystemWriter` in one process with no process group, one chunk in memory at a time (and the
next one being read), whatever the piece size; any world size then loads it (`dcp.load` into
plain tensors, or into `Shard(0)` DTensors on M ranks).
The hashing metadata rides along as small tensors under `engram.*`, so training code can
rebuild the hasher from the checkpoint alone.

`import_checkpoint` turns such a checkpoint, or an inference export (either layout), back into a
store. DCP metadata is a pickle: it is only read with `trust_pickle`.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import io
import json
import os
import shutil
import string
import time
import uuid
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
import torch

from .errors import EngramError
from .spec import TableSpec, human_bytes, load_spec, spec_from_dict

DEFAULT_KEY_TEMPLATE = "model.layers.{layer_id}.engram.multi_head_embedding.embedding.weight"
DEFAULT_HEAD_TEMPLATE = "model.layers.{layer_id}.engram.multi_head_embedding.embeddings.{head}.weight"
TORCH_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16,
                "float8_e4m3fn": torch.float8_e4m3fn}
STORE_DTYPES = ("float32", "bfloat16", "float16")
META_KEY = "engram.meta"
DCP_FORMAT = "engram-dcp"
DCP_FORMAT_VERSION = "1"
_LOSSLESS = {("bfloat16", "float32"), ("float16", "float32")}
_TEMPLATE_FIELDS = {"layer_id", "head", "order", "order_head"}
_CHUNK_BYTES = 32 << 20  # one DCP chunk: what the writer and each loading rank hold at a time
_READ_THREADS = 2
_SPLIT_BYTES = 8 << 20  # blocks at least this large are read by all reader threads
T = TypeVar("T")


# ---- shared by both export targets and by import --------------------------------------------

def to_torch(array: np.ndarray) -> torch.Tensor:
    """A numpy table block as a torch tensor without copying (ml_dtypes bfloat16 included)."""
    if array.dtype.name == "bfloat16":
        return torch.from_numpy(np.ascontiguousarray(array).view(np.uint16)).view(torch.bfloat16)
    return torch.from_numpy(np.ascontiguousarray(array))


def to_numpy(tensor: torch.Tensor) -> np.ndarray:
    """The inverse of `to_torch`: bfloat16 comes back as ml_dtypes.bfloat16, what stores hold."""
    from .dtypes import BFLOAT16

    tensor = tensor.detach().contiguous()
    if tensor.dtype == torch.bfloat16:
        return tensor.view(torch.int16).numpy().view(BFLOAT16)
    return tensor.numpy()


def is_lossless(source: str, target: str) -> bool:
    return source == target or (source, target) in _LOSSLESS or source == "float8_e4m3fn"


@dataclass
class Conversion:
    """A dtype change of the tables, announced when lossy, with the largest change it made."""

    source: str
    target: str
    max_abs_error: float = 0.0

    @property
    def lossy(self) -> bool:
        return not is_lossless(self.source, self.target) and self.target != "float8_e4m3fn"

    def check(self, before: torch.Tensor, after: torch.Tensor) -> None:
        if (self.lossy or self.source == "float8_e4m3fn") and before.numel():
            error = (before.float() - after.float()).abs().max()
            self.max_abs_error = max(self.max_abs_error, float(error))

    def to_json(self) -> dict[str, Any]:
        return {"from": self.source, "to": self.target, "lossy": self.lossy,
                "max_abs_error": self.max_abs_error}


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
        raise NotImplementedError


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
                out[part[0] - begin:part[1] - begin] = store.read_rows(layer_id, *part)

            list(self._pool.map(fill, parts))
            return to_torch(out)

        return LayerSource(layer_id, layout.rows, layout.dim, read, layout.chunk_rows)


def open_source_store(path: str | Path) -> StoreSource:
    """A store to export; refuses, naming layer and rows, one whose build did not finish."""
    from .store import open_tables

    return StoreSource(open_tables(path))


def prefetched(items: Sequence[T], read: Callable[[T], Any]) -> Iterator[tuple[T, Any]]:
    """(item, read(item)) in order, the next item read in a background thread meanwhile: reading
    overlaps writing, and at most two blocks are in memory."""
    if not items:
        return
    with concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="engram-read") as pool:
        pending = pool.submit(read, items[0])
        for i, item in enumerate(items):
            result = pending.result()
            if i + 1 < len(items):
                pending = pool.submit(read, items[i + 1])
            yield item, result


def in_parallel(items: Iterable[T], work: Callable[[T], Any], threads: int) -> Iterator[Any]:
    """work(item) for every item on `threads` threads, results as they finish.

    At most `threads` items are in flight, so memory stays at `threads` items' worth; the first
    error stops what has not started and is raised once the running items are done.
    """
    with concurrent.futures.ThreadPoolExecutor(threads, thread_name_prefix="engram-work") as pool:
        pending: set[concurrent.futures.Future[Any]] = set()
        try:
            for item in items:
                if len(pending) >= threads:
                    done, pending = concurrent.futures.wait(pending, return_when=concurrent.futures.FIRST_COMPLETED)
                    for future in done:
                        yield future.result()
                pending.add(pool.submit(work, item))
            while pending:
                done, pending = concurrent.futures.wait(pending, return_when=concurrent.futures.FIRST_COMPLETED)
                for future in done:
                    yield future.result()
        finally:
            for future in pending:
                future.cancel()


def row_blocks(total: int, block: int) -> Iterator[tuple[int, int]]:
    for begin in range(0, total, block):
        yield begin, min(begin + block, total)


def even_pieces(rows: int, pieces: int) -> list[tuple[int, int]]:
    """Row ranges of `torch.chunk`/DTensor `Shard(0)`: ceil-sized, trailing ones may be empty."""
    size = -(-rows // pieces)
    return [(min(r * size, rows), min((r + 1) * size, rows)) for r in range(pieces)]


def check_key_template(template: str, *, per_head: bool) -> list[str]:
    try:
        names = [f for _, f, _, _ in string.Formatter().parse(template) if f is not None]
    except ValueError as exc:
        raise EngramError(f"bad key template {template!r}: {exc}") from None
    unknown = sorted(set(names) - _TEMPLATE_FIELDS)
    if unknown or any(not n for n in names):
        raise EngramError(f"key template {template!r} has unknown field {{{unknown[0] if unknown else ''}}}; "
                          f"allowed: {{layer_id}}, and with --per-head {{head}}, {{order}}, {{order_head}}")
    if "layer_id" not in names:
        raise EngramError(f"key template {template!r} needs {{layer_id}} so that layers get distinct keys")
    if per_head and "head" not in names and not {"order", "order_head"} <= set(names):
        raise EngramError(f"a --per-head key template needs {{head}} (or {{order}} and {{order_head}}): "
                          f"{template!r}")
    if not per_head and set(names) - {"layer_id"}:
        raise EngramError(f"key template {template!r} uses head fields; pass --per-head for one tensor per head")
    return names


def prepare_output(output: Path, overwrite: bool) -> Path:
    """Check the target and make a temporary folder beside it, renamed into place when done."""
    if output.exists() or output.is_symlink():
        if not overwrite:
            raise EngramError(f"{output} already exists; pass --overwrite to replace it")
        if output.is_dir() and any(output.iterdir()) and not _looks_like_export(output):
            raise EngramError(f"{output} is a non-empty folder that is not a checkpoint; refusing to replace it")
        if not output.is_dir() and output.suffix != ".safetensors":
            raise EngramError(f"{output} is a file that is not a safetensors export; refusing to replace it")
    parent = output.absolute().parent
    if not parent.is_dir():
        raise EngramError(f"output folder {parent} does not exist")
    if not os.access(parent, os.W_OK):
        raise EngramError(f"output folder {parent} is not writable")
    tmp = parent / f".{output.name}.tmp-{uuid.uuid4().hex[:8]}"
    try:
        tmp.mkdir()
    except OSError as exc:
        raise EngramError(f"cannot write to {parent}: {exc.strerror or exc}") from None
    return tmp


def _looks_like_export(folder: Path) -> bool:
    names = {p.name for p in folder.iterdir()}
    return ".metadata" in names or any(n.endswith(".safetensors") for n in names)


@contextlib.contextmanager
def store_progress(source: TableSource, verb: str, show: bool) -> Iterator[Callable[[int], None]]:
    """A rows progress bar over every layer of `source` (silent when stderr is no terminal)."""
    from .report import progress

    bar = progress()
    bar.disable = bar.disable or not show
    with bar:
        task = bar.add_task(verb, total=sum(source.spec.rows(layer) for layer in source.layer_ids))
        yield lambda rows: bar.update(task, advance=rows)


@dataclass
class ExportReport:
    """What `engram export` wrote, how fast, and what the dtype change cost."""

    target: str
    layout: str
    output: str
    store: str
    dtype: str
    source_dtype: str
    files: list[str]
    index: bool
    layers: dict[int, dict[str, Any]]
    bytes: int
    seconds: float
    conversion: dict[str, Any]
    quantization: dict[str, float] | None = None
    shards: int | None = None
    per_head: bool = False

    def to_json(self) -> dict[str, Any]:
        return {
            "target": self.target, "layout": self.layout, "output": self.output, "store": self.store,
            "dtype": self.dtype, "source_dtype": self.source_dtype, "files": self.files,
            "index": self.index, "shards": self.shards, "per_head": self.per_head,
            "layers": {str(k): v for k, v in self.layers.items()},
            "bytes": self.bytes, "seconds": round(self.seconds, 3),
            "bytes_per_second": round(self.bytes / self.seconds) if self.seconds else 0,
            "conversion": self.conversion, "quantization": self.quantization,
        }

    def render(self, console: Any) -> None:
        rate = f"{human_bytes(self.bytes / self.seconds)}/s" if self.seconds else "-"
        what = (f"DCP checkpoint, {_count(self.shards or 0, 'row piece')} per tensor"
                + (", one tensor per head" if self.per_head else "")
                if self.target == "training" else f"safetensors, {self.layout} layout")
        console.print(f"exported {self.store} -> {self.output} ({what}): {_count(len(self.layers), 'layer')}, "
                      f"{self.dtype}, {_count(len(self.files), 'file')}, {human_bytes(self.bytes)} in "
                      f"{self.seconds:.1f} s ({rate})")
        render_conversion(console, self.conversion)
        if self.quantization:
            q = self.quantization
            console.print(f"fp8 E4M3 with E8M0 scales per 32 values: error relative to the block max "
                          f"{q['max_relative']:.4f} max, {q['rms_relative']:.4f} RMS")


def _count(n: int, noun: str) -> str:
    return f"{n} {noun}{'' if n == 1 else 's'}"


def render_conversion(console: Any, conversion: dict[str, Any]) -> None:
    if conversion["lossy"]:
        console.print(f"[yellow]lossy conversion {conversion['from']} -> {conversion['to']}[/]: "
                      f"largest change {conversion['max_abs_error']:.3g}")


# ---- DCP export --------------------------------------------------------------------------------

@dataclass(frozen=True)
class _Tensor:
    """One logical tensor of the checkpoint: rows [start, stop) of a layer table, in pieces."""

    key: str
    layer_id: int
    start: int
    stop: int
    pieces: tuple[tuple[int, int], ...]


def _training_tensors(source: StoreSource, key_template: str, per_head: bool,
                      shards: int | None) -> list[_Tensor]:
    spec = source.spec
    tensors = []
    for layer_id in source.layer_ids:
        rows = spec.rows(layer_id)
        if not per_head:
            pieces = (source.store.partition(layer_id) if shards is None else even_pieces(rows, shards))
            tensors.append(_Tensor(key_template.format(layer_id=layer_id), layer_id, 0, rows, tuple(pieces)))
            continue
        count = shards or source.store.ranks
        for head, (offset, size) in enumerate(zip(spec.offsets(layer_id), spec.head_sizes(layer_id))):
            order, order_head = divmod(head, spec.n_head_per_ngram)
            key = key_template.format(layer_id=layer_id, head=head, order=order + 2, order_head=order_head)
            tensors.append(_Tensor(key, layer_id, offset, offset + size, tuple(even_pieces(size, count))))
    keys = [t.key for t in tensors]
    if len(set(keys)) != len(keys):
        raise EngramError(f"key template {key_template!r} gives two tensors the same key")
    return tensors


def _meta_tensors(source: TableSource, meta: dict[str, Any]) -> dict[str, torch.Tensor]:
    """The hashing metadata as small tensors, so nothing but the checkpoint is needed."""
    from .tokenizer import zip_bytes

    spec, projection = source.spec, source.projection
    small = {META_KEY: torch.frombuffer(bytearray(json.dumps(meta).encode()), dtype=torch.uint8)}
    for layer_id in source.layer_ids:
        small[f"engram.layers.{layer_id}.head_sizes"] = torch.tensor(spec.head_sizes(layer_id), dtype=torch.int64)
        small[f"engram.layers.{layer_id}.offsets"] = torch.tensor(spec.offsets(layer_id), dtype=torch.int64)
        small[f"engram.layers.{layer_id}.multipliers"] = torch.from_numpy(
            spec.multipliers(layer_id, projection.compressed_size))
    small["engram.projection.lookup"] = torch.from_numpy(projection.lookup.copy())
    if projection.tokenizer_json is not None:
        small["engram.projection.tokenizer_zip"] = torch.frombuffer(
            bytearray(zip_bytes(projection.tokenizer_json)), dtype=torch.uint8)
    return small


def export_training(store: str | Path, output: str | Path, *, shards: int | None = None,
                    key_template: str | None = None, per_head: bool = False, dtype: str | None = None,
                    overwrite: bool = False, show_progress: bool = True) -> ExportReport:
    """Write a store as a DCP checkpoint of row-sharded tensors, one piece in memory at a time."""
    from torch.distributed.checkpoint import FileSystemWriter
    from torch.distributed.checkpoint.default_planner import DefaultSavePlanner
    from torch.distributed.checkpoint.metadata import (ChunkStorageMetadata, Metadata, MetadataIndex,
                                                       StorageMeta, TensorProperties, TensorStorageMetadata)
    from torch.distributed.checkpoint.planner import SavePlan, TensorWriteData, WriteItem, WriteItemType

    output = Path(output)
    if shards is not None and shards < 1:
        raise EngramError(f"--shards must be a positive integer, got {shards}")
    source = open_source_store(store)
    smallest = min(min(source.spec.head_sizes(layer)) if per_head else source.spec.rows(layer)
                   for layer in source.layer_ids)
    if shards is not None and shards > smallest:
        raise EngramError(f"--shards {shards} is more than the {smallest:,} rows of the smallest "
                          f"{'head table' if per_head else 'layer table'}")
    dtype = dtype or source.dtype
    if dtype not in STORE_DTYPES:
        raise EngramError(f"unknown dtype {dtype!r} for training; allowed: {', '.join(STORE_DTYPES)}")
    key_template = key_template or (DEFAULT_HEAD_TEMPLATE if per_head else DEFAULT_KEY_TEMPLATE)
    check_key_template(key_template, per_head=per_head)
    tensors = _training_tensors(source, key_template, per_head, shards)
    count = max(len(t.pieces) for t in tensors)
    spec, torch_dtype = source.spec, TORCH_DTYPES[dtype]
    tables: dict[str, Any] = {}
    for t in tensors:
        tables.setdefault(str(t.layer_id), []).append({"key": t.key, "start": t.start, "stop": t.stop})
    meta = {"format": DCP_FORMAT, "format_version": DCP_FORMAT_VERSION, "spec": spec.to_dict(),
            "dtype": dtype, "store_dtype": source.dtype, "per_head": per_head,
            "key_template": key_template, "tables": tables, "sharding": source.sharding,
            "projection": {**source.projection.metadata, "fingerprint": source.projection.fingerprint()}}
    small = _meta_tensors(source, meta)
    conversion = Conversion(source.dtype, dtype)

    properties = TensorProperties(dtype=torch_dtype)
    state_md: dict[str, Any] = {t.key: TensorStorageMetadata(properties, torch.Size([t.stop - t.start, spec.dim]), [])
                                for t in tensors}
    readers = {layer_id: source.layer(layer_id) for layer_id in source.layer_ids}
    plans: list[SavePlan] = []
    blocks: list[list[tuple[_Tensor, int, int]]] = []  # per plan, in write order
    for rank in range(count):
        for t in tensors:
            begin, end = t.pieces[rank] if rank < len(t.pieces) else (0, 0)
            if begin == end:
                continue
            size = torch.Size([t.stop - t.start, spec.dim])
            step = readers[t.layer_id].preferred_block(max(1, _CHUNK_BYTES // (spec.dim * torch_dtype.itemsize)))
            items, reads = [], []
            for a, b in row_blocks(end - begin, step):
                chunk = ChunkStorageMetadata(torch.Size([begin + a, 0]), torch.Size([b - a, spec.dim]))
                state_md[t.key].chunks.append(chunk)
                items.append(WriteItem(MetadataIndex(t.key, chunk.offsets), WriteItemType.SHARD,
                                       tensor_data=TensorWriteData(chunk, properties, size)))
                reads.append((t, begin + a, begin + b))
            plans.append(SavePlan(items))
            blocks.append(reads)
    small_items = []
    for key, value in small.items():
        chunk = ChunkStorageMetadata(torch.Size([0]), value.shape)
        props = TensorProperties(dtype=value.dtype)
        state_md[key] = TensorStorageMetadata(props, value.shape, [chunk])
        small_items.append(WriteItem(MetadataIndex(key, chunk.offsets), WriteItemType.TENSOR,
                                     tensor_data=TensorWriteData(chunk, props, value.shape)))
    plans.append(SavePlan(small_items))
    blocks.append([])
    advance: Callable[[int], None] = lambda rows: None

    def read(block: tuple[_Tensor, int, int]) -> torch.Tensor:
        t, a, b = block
        values = readers[t.layer_id].read(t.start + a, t.start + b)
        converted = values.to(torch_dtype)
        conversion.check(values, converted)
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
            if (t.key, a) != (write_item.index.fqn, write_item.index.offset[0]):
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

    tmp = prepare_output(output, overwrite)
    started = time.perf_counter()
    try:
        writer = Writer(tmp, single_file_per_rank=True, sync_files=True, thread_count=1, overwrite=False)
        writer.set_up_storage_writer(True, rank=0, use_collectives=True)
        plans = writer.prepare_global_plan([writer.prepare_local_plan(p) for p in plans])
        results = []
        with store_progress(source, "export", show_progress) as advance:
            for plan, reads in zip(plans, blocks):
                results.append(writer.write_data(plan, StorePlanner(reads)).value())
        metadata = Metadata(state_dict_metadata=state_md, planner_data={k: (k,) for k in state_md})
        writer.finish(metadata, results)
        from .safetensors_io import replace_output

        replace_output(tmp, output)
    finally:
        remove_tree(tmp)
    seconds = time.perf_counter() - started
    files = sorted(p.name for p in output.iterdir())
    total = sum((output / name).stat().st_size for name in files)
    return ExportReport(
        target="training", layout="dcp", output=str(output), store=str(store), dtype=dtype,
        source_dtype=source.dtype, files=files, index=True,
        layers={layer_id: {"keys": [entry["key"] for entry in tables[str(layer_id)]],
                           "rows": spec.rows(layer_id)} for layer_id in source.layer_ids},
        bytes=total, seconds=seconds, conversion=conversion.to_json(), shards=count, per_head=per_head)


class _WritebackFile(io.FileIO):
    """A file whose every write starts on its way to disk at once (`start_writeback`)."""

    def write(self, data: Any) -> int:
        from .safetensors_io import start_writeback

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


def remove_tree(path: Path) -> None:
    if path.is_dir():
        shutil.rmtree(path, ignore_errors=True)
    elif path.exists():
        path.unlink()


def export_store(store: str | Path, output: str | Path, *, target: str, shards: int | None = None,
                 key_template: str | None = None, per_head: bool = False, dtype: str | None = None,
                 layout: str | None = None, max_shard_size: str | None = None, overwrite: bool = False,
                 show_progress: bool = True, scheduler: str | None = None,
                 dask_workers: int | None = None) -> ExportReport:
    """`engram export`: a DCP checkpoint (`target="training"`) or safetensors (`"inference"`)."""
    if target == "training":
        if layout is not None or max_shard_size is not None:
            raise EngramError("--layout and --max-shard-size apply to --for inference")
        if scheduler or dask_workers:
            raise EngramError("--scheduler and --dask-workers apply to --for inference; a training "
                              "export is written by DCP's own writer")
        return export_training(store, output, shards=shards, key_template=key_template, per_head=per_head,
                               dtype=dtype, overwrite=overwrite, show_progress=show_progress)
    if target == "inference":
        if shards is not None or per_head:
            raise EngramError("--shards and --per-head apply to --for training")
        from .inference import export_inference

        return export_inference(store, output, dtype=dtype, layout=layout or "engram",
                                max_shard_size=max_shard_size or "5GB", key_template=key_template,
                                overwrite=overwrite, show_progress=show_progress, scheduler=scheduler,
                                dask_workers=dask_workers)
    raise EngramError(f"--for must be training or inference, got {target!r}")


# ---- DCP import --------------------------------------------------------------------------------

def _read_dcp_metadata(path: Path, trust_pickle: bool) -> Any:
    from torch.distributed.checkpoint import FileSystemReader

    if not trust_pickle:
        raise EngramError(f"{path} is a DCP checkpoint, whose .metadata is a Python pickle that can run "
                          "code when read; pass --trust-pickle if you trust where it came from")
    try:
        return FileSystemReader(path).read_metadata()
    except Exception as exc:  # any unpickling failure means this is no DCP metadata we can use
        raise EngramError(f"{path}/.metadata is not readable DCP metadata ({type(exc).__name__}: {exc})") from None


def _dcp_load(path: Path, windows: dict[str, tuple[int, torch.Tensor]]) -> None:
    """Fill each buffer with rows [start, start + len) of its key, through DCP's resharding reads."""
    import warnings

    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint import FileSystemReader
    from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner
    from torch.distributed.checkpoint.metadata import ChunkStorageMetadata
    from torch.distributed.checkpoint.planner import LoadPlan
    from torch.distributed.checkpoint.planner_helpers import create_read_items_for_chunk_list

    class WindowPlanner(DefaultLoadPlanner):
        def create_local_plan(self) -> LoadPlan:
            items = []
            for key, (start, buffer) in windows.items():
                offsets = torch.Size([start] + [0] * (buffer.dim() - 1))
                chunk = ChunkStorageMetadata(offsets, buffer.shape)
                items += create_read_items_for_chunk_list(key, self.metadata.state_dict_metadata[key], [chunk])
            return LoadPlan(items)

        def lookup_tensor(self, index: Any) -> torch.Tensor:
            return windows[index.fqn][1]

    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        dcp.load({}, storage_reader=FileSystemReader(path), planner=WindowPlanner())


class DcpSource(TableSource):
    """A DCP checkpoint read back row window by row window (never a whole table at once)."""

    def __init__(self, path: Path, *, trust_pickle: bool, spec: TableSpec | None,
                 projection: Any, key_template: str | None, layers: Iterable[int] | None) -> None:
        from torch.distributed.checkpoint.metadata import TensorStorageMetadata

        self.path = path
        metadata = _read_dcp_metadata(path, trust_pickle)
        entries = metadata.state_dict_metadata
        self.entries = entries
        meta = self._load_meta()
        if meta is not None:
            stored_spec = spec_from_dict(meta["spec"])
            spec = spec or stored_spec
            projection = projection or self._stored_projection(entries, meta)
            tables = {int(k): [(e["key"], e["start"], e["stop"]) for e in v] for k, v in meta["tables"].items()}
            self.sharding = meta.get("sharding")
            self.store_dtype = meta.get("store_dtype")
        else:
            if spec is None or projection is None:
                raise EngramError(f"{path} carries no engram hashing metadata (not made by `engram export`): "
                                  "pass --spec and --projection")
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
                    order, order_head = divmod(head, spec.n_head_per_ngram)
                    key = template.format(layer_id=layer_id, head=head, order=order + 2, order_head=order_head)
                    tables[layer_id].append((key, offset, offset + size))
            tables = {k: v for k, v in tables.items() if any(key in entries for key, _, _ in v)}
            if not tables:
                raise EngramError(f"{path} has no tensor named like {template!r} (keys: "
                                  f"{', '.join(sorted(entries)[:4])}, ...); pass --key-template")
            self.store_dtype = None
        chosen = tuple(sorted(tables)) if layers is None else tuple(int(x) for x in layers)
        for layer_id in chosen:
            if layer_id not in tables:
                raise EngramError(f"{path} holds no table for layer {layer_id} (layers: {sorted(tables)})")
            if layer_id not in spec.layer_ids:
                raise EngramError(f"layer {layer_id} of {path} is not in spec {spec.name} "
                                  f"(layer_ids = {list(spec.layer_ids)})")
            for key, start, stop in tables[layer_id]:
                entry = entries.get(key)
                if not isinstance(entry, TensorStorageMetadata):
                    raise EngramError(f"{path} lacks tensor {key!r} of layer {layer_id}")
                if tuple(entry.size) != (stop - start, spec.dim):
                    raise EngramError(f"{key} in {path} is {tuple(entry.size)} but spec {spec.name} "
                                      f"needs {(stop - start, spec.dim)}")
            if tables[layer_id][-1][2] != spec.rows(layer_id) or tables[layer_id][0][1] != 0:
                raise EngramError(f"the tensors of layer {layer_id} in {path} do not cover its "
                                  f"{spec.rows(layer_id):,} rows")
        super().__init__(spec, projection, chosen)
        self.tables = tables
        dtypes = {entries[key].properties.dtype for layer in chosen for key, _, _ in tables[layer]}
        names = [n for n, d in TORCH_DTYPES.items() if d in dtypes]
        if len(dtypes) != 1 or not names:
            raise EngramError(f"{path}: tables of dtype {', '.join(map(str, dtypes))} cannot go into a store")
        self.dtype = names[0]

    def _load_meta(self) -> dict[str, Any] | None:
        if META_KEY not in self.entries:
            return None
        raw = self._load_small([META_KEY])[META_KEY]
        try:
            meta = json.loads(raw.numpy().tobytes())
        except (UnicodeDecodeError, json.JSONDecodeError):
            meta = None
        if not isinstance(meta, dict) or meta.get("format") != DCP_FORMAT:
            raise EngramError(f"{self.path}: {META_KEY} is not the metadata `engram export` writes")
        return meta

    def _load_small(self, keys: list[str]) -> dict[str, torch.Tensor]:
        buffers = {k: torch.empty(tuple(self.entries[k].size), dtype=self.entries[k].properties.dtype)
                   for k in keys}
        _dcp_load(self.path, {k: (0, v) for k, v in buffers.items()})
        return buffers

    def _stored_projection(self, entries: dict[str, Any], meta: dict[str, Any]) -> Any:
        from .vocab import restore_projection

        keys = [k for k in ("engram.projection.lookup", "engram.projection.tokenizer_zip") if k in entries]
        loaded = self._load_small(keys)
        zipped = loaded.get("engram.projection.tokenizer_zip")
        return restore_projection(loaded["engram.projection.lookup"].numpy(),
                                  None if zipped is None else zipped.numpy().tobytes(),
                                  meta["projection"], str(self.path))

    def boundaries(self, layer_id: int) -> list[int]:
        """Layer rows where a saved piece ends: reads aligned to them load each piece once."""
        ends = set()
        for key, start, _ in self.tables[layer_id]:
            for chunk in self.entries[key].chunks:
                ends.add(start + chunk.offsets[0] + chunk.sizes[0])
        return sorted(ends)

    def layer(self, layer_id: int) -> LayerSource:
        spec = self.spec
        parts = self.tables[layer_id]
        torch_dtype = TORCH_DTYPES[self.dtype]

        def read(begin: int, end: int) -> torch.Tensor:
            out = torch.empty((end - begin, spec.dim), dtype=torch_dtype)
            windows = {}
            for key, start, stop in parts:
                lo, hi = max(begin, start), min(end, stop)
                if lo < hi:
                    windows[key] = (lo - start, out[lo - begin:hi - begin])
            _dcp_load(self.path, windows)
            return out

        return LayerSource(layer_id, spec.rows(layer_id), spec.dim, read)



# ---- import --------------------------------------------------------------------------------------

def _windows(shards: list[tuple[int, int]], boundaries: list[int]) -> list[tuple[int, int]]:
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


def detect_format(path: Path) -> str:
    """"dcp" or "safetensors"; a one-line error for anything else."""
    if path.is_dir() and (path / ".metadata").is_file():
        return "dcp"
    if path.is_file() and (path.name.endswith(".safetensors") or path.name.endswith(".index.json")):
        return "safetensors"
    if path.is_dir() and any(p.name.endswith(".safetensors") for p in path.iterdir()):
        return "safetensors"
    if not path.exists():
        raise EngramError(f"no such checkpoint: {path}")
    raise EngramError(f"{path} is not a checkpoint engram can import (expected a DCP folder with "
                      ".metadata, or safetensors from `engram export`)")


@dataclass
class ImportReport:
    """What `engram import` read and the store it wrote."""

    checkpoint: str
    format: str
    layout: str
    store: str
    dtype: str
    source_dtype: str
    layers: dict[int, dict[str, Any]]
    complete: bool
    bytes: int
    seconds: float
    conversion: dict[str, Any]
    notes: list[str] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        return {"checkpoint": self.checkpoint, "format": self.format, "layout": self.layout,
                "store": self.store, "dtype": self.dtype, "source_dtype": self.source_dtype,
                "layers": {str(k): v for k, v in self.layers.items()}, "complete": self.complete,
                "bytes": self.bytes, "seconds": round(self.seconds, 3),
                "conversion": self.conversion, "notes": self.notes}

    def render(self, console: Any) -> None:
        console.print(f"imported {self.checkpoint} ({self.format}, {self.layout}) -> {self.store}: "
                      f"layers {', '.join(map(str, self.layers))}, {self.source_dtype} -> {self.dtype}, "
                      f"{human_bytes(self.bytes)} in {self.seconds:.1f} s")
        render_conversion(console, self.conversion)
        for note in self.notes:
            console.print(f"[yellow]{note}[/]")


def import_checkpoint(checkpoint: str | Path, output: str | Path, *, trust_pickle: bool = False,
                      spec: str | Path | TableSpec | None = None, projection: str | Path | Any = None,
                      key_template: str | None = None, layers: Iterable[int] | None = None,
                      dtype: str | None = None, shards: int | None = None, shard_by: str | None = None,
                      overwrite: bool = False, show_progress: bool = True) -> ImportReport:
    """Turn a DCP checkpoint or a safetensors export back into a store, one shard run at a time.

    Hashing metadata comes from the checkpoint when `engram export` wrote it; otherwise (the
    deepseek-v41 layout, a framework's own checkpoint) `spec` and `projection` are required and
    every table's shape is checked against them.
    """
    from .store import create_store
    from .vocab import VocabProjection, load_projection

    checkpoint, output = Path(checkpoint), Path(output)
    kind = detect_format(checkpoint)
    if dtype is not None and dtype not in STORE_DTYPES:
        raise EngramError(f"unknown store dtype {dtype!r}; allowed: {', '.join(STORE_DTYPES)}")
    if spec is not None and not isinstance(spec, TableSpec):
        spec = load_spec(spec)
    if projection is not None and not isinstance(projection, VocabProjection):
        projection = load_projection(projection)
    layers = None if layers is None else list(dict.fromkeys(int(x) for x in layers)) or None
    source: Any
    if kind == "dcp":
        source = DcpSource(checkpoint, trust_pickle=trust_pickle, spec=spec, projection=projection,
                           key_template=key_template, layers=layers)
        layout = "dcp"
    else:
        from .inference import open_safetensors_source

        source = open_safetensors_source(checkpoint, spec, projection, layers)
        layout = source.tables.layout
    store_dtype = dtype or source.store_dtype or (source.dtype if source.dtype in STORE_DTYPES
                                                  else source.spec.dtype)
    sharding = source.sharding or {}
    ranks = shards or sharding.get("ranks") or 1
    by = shard_by or sharding.get("shard_by") or "rows"
    init = {"algorithm": "imported", "source": str(checkpoint.absolute()), "format": kind, "layout": layout}
    started = time.perf_counter()
    partial = set(source.layer_ids) != set(source.spec.layer_ids)
    store = create_store(output, source.spec, source.projection, shards=ranks, shard_by=by,
                         dtype=store_dtype, overwrite=overwrite, init=init,
                         layers=list(source.layer_ids) if partial else None)
    conversion = Conversion(source.dtype, store_dtype)
    target = TORCH_DTYPES[store_dtype]
    written = 0
    with store_progress(source, "import", show_progress) as advance:
        for layer_id in source.layer_ids:
            reader = source.layer(layer_id)
            shards = store.shard_ranges(layer_id)
            windows = _windows(shards, source.boundaries(layer_id)) if kind == "dcp" else shards
            for begin, end in windows:
                values = reader.read(begin, end)
                converted = values.to(target)
                conversion.check(values, converted)
                written += store.write_rows(layer_id, begin, to_numpy(converted))
                advance(end - begin)
    store.mark_complete()
    complete = True
    notes = []
    if partial:
        notes.append(f"only layers {', '.join(map(str, source.layer_ids))} of the spec's "
                     f"{', '.join(map(str, source.spec.layer_ids))} imported; the store holds just those")
    return ImportReport(
        checkpoint=str(checkpoint), format=kind, layout=layout, store=str(output), dtype=store_dtype,
        source_dtype=source.dtype,
        layers={layer_id: {"rows": source.spec.rows(layer_id)} for layer_id in source.layer_ids},
        complete=complete, bytes=written, seconds=time.perf_counter() - started,
        conversion=conversion.to_json(), notes=notes)
