"""Inference exports: safetensors that an engine memory-maps, and `EngramTables`, its read path.

Two layouts:

* `engram` (default): each layer's table under the Hugging Face-style parameter name (the
  training key template), its E8M0 scales beside it when fp8, and everything the hasher needs
  (spec, per-layer head sizes, offsets and multipliers, the projection lookup and its tokenizer),
  so an engine needs nothing else.
* `deepseek-v41`: exactly DeepSeek-V4.1-Flash's tensors, which vLLM and SGLang load:
  `layers.{L}.engram.embed.weight` F8_E4M3 (rows, dim) and `layers.{L}.engram.embed.scale`
  F8_E8M0 (rows, dim / 32), in shards with a `model.safetensors.index.json`; no hashing metadata.

Both keep the row = offset(head) + bucket order of the store, so a row index from the hasher
reads the file directly.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .checkpoint import (DEFAULT_KEY_TEMPLATE, TORCH_DTYPES, Conversion, ExportReport, LayerSource,
                         TableSource, check_key_template, in_parallel, open_source_store, prepare_output,
                         remove_tree, row_blocks, store_progress)
from .cluster import absolute_store_path, dask_client, run_tasks
from .errors import EngramError
from .quant import BLOCK, QuantError, check_blockable, dequantize, gather_dequantize, quantize
from .safetensors_io import (SAFETENSORS_DTYPES, MappedTensors, SafetensorsWriter, TensorPlan, open_set,
                             parse_size, plan_layout, replace_output)
from .spec import DTYPE_BYTES, TableSpec, spec_from_dict
from .tokenizer import zip_bytes
from .vocab import VocabProjection, restore_projection

LAYOUTS = ("engram", "deepseek-v41")
INFERENCE_DTYPES = ("float32", "bfloat16", "float16", "float8_e4m3fn")
FORMAT = "engram-tables"
FORMAT_VERSION = "1"
DEEPSEEK_WEIGHT = "layers.{layer_id}.engram.embed.weight"
DEEPSEEK_SCALE = "layers.{layer_id}.engram.embed.scale"
_BLOCK_BYTES = 32 << 20  # rows (as float32) read, converted and written by one Dask task
_LOCAL_BLOCK_BYTES = 4 << 20  # rows (as stored) one export thread reads, converts and writes at a time
_EXPORT_THREADS = max(2, min(8, os.cpu_count() or 1))
_GATHER_THREADS = 2
_PARALLEL_VALUES = 1 << 20  # fp8 gathers at least this large dequantize on all gather threads


def scale_key(weight_key: str) -> str:
    """Where the E8M0 scales of an fp8 weight live: `...weight` -> `...scale`."""
    return weight_key[: -len("weight")] + "scale" if weight_key.endswith("weight") else weight_key + ".scale"


def _meta_keys(layer_id: int) -> dict[str, str]:
    return {part: f"engram.layers.{layer_id}.{part}" for part in ("head_sizes", "offsets", "multipliers")}


@dataclass(frozen=True)
class _Table:
    layer_id: int
    weight: str
    scale: str | None


def _plan(source: TableSource, layout: str, dtype: str, key_template: str) -> tuple[list[_Table], list[TensorPlan],
                                                                                 dict[str, str], dict[str, Any]]:
    """Tensor names, shapes and file metadata of an export, and the small tensors' values."""
    spec, dim = source.spec, source.spec.dim
    fp8 = dtype == "float8_e4m3fn"
    tables, plans, small = [], [], {}
    for layer_id in source.layer_ids:
        if layout == "deepseek-v41":
            weight, scale = DEEPSEEK_WEIGHT.format(layer_id=layer_id), DEEPSEEK_SCALE.format(layer_id=layer_id)
        else:
            weight = key_template.format(layer_id=layer_id)
            scale = scale_key(weight) if fp8 else None
        tables.append(_Table(layer_id, weight, scale))
        rows = spec.rows(layer_id)
        plans.append(TensorPlan(weight, SAFETENSORS_DTYPES[TORCH_DTYPES[dtype]], (rows, dim)))
        if scale is not None:
            plans.append(TensorPlan(scale, "F8_E8M0", (rows, dim // BLOCK)))
    if layout == "deepseek-v41":
        return tables, plans, {"format": "pt"}, small
    projection = source.projection
    for layer_id in source.layer_ids:
        keys = _meta_keys(layer_id)
        small[keys["head_sizes"]] = np.array(spec.head_sizes(layer_id), dtype=np.int64)
        small[keys["offsets"]] = np.array(spec.offsets(layer_id), dtype=np.int64)
        small[keys["multipliers"]] = spec.multipliers(layer_id, projection.compressed_size)
    small["engram.projection.lookup"] = projection.lookup
    if projection.tokenizer_json is not None:
        small["engram.projection.tokenizer_zip"] = np.frombuffer(zip_bytes(projection.tokenizer_json), np.uint8)
    for name, value in small.items():
        plans.append(TensorPlan(name, "I64" if value.dtype == np.int64 else "U8", value.shape))
    metadata = {
        "format": FORMAT, "format_version": FORMAT_VERSION, "layout": layout, "dtype": dtype,
        "spec": json.dumps(spec.to_dict()),
        "projection": json.dumps({**projection.metadata, "fingerprint": projection.fingerprint()}),
        "tables": json.dumps({str(t.layer_id): {"weight": t.weight, "scale": t.scale} for t in tables}),
        "sharding": json.dumps(source.sharding),
    }
    return tables, plans, metadata, small


def export_inference(store: str | Path, output: str | Path, *, dtype: str | None = None,
                     layout: str = "engram", max_shard_size: str | int = "5GB",
                     key_template: str | None = None, overwrite: bool = False,
                     show_progress: bool = True, scheduler: str | None = None,
                     dask_workers: int | None = None) -> ExportReport:
    """Stream a store into safetensors for inference, one row block in memory at a time.

    `output` ending in `.safetensors` is one file; otherwise a folder holding `model.safetensors`,
    or shards of at most `max_shard_size` with an index (always shards for `deepseek-v41`).
    With `scheduler` or `dask_workers`, every row block is a Dask task that reads the store and
    writes its bytes by position into the same files (every header is laid out first), so the
    output folder must be on a filesystem the workers share.
    """
    if layout not in LAYOUTS:
        raise EngramError(f"unknown layout {layout!r}; allowed: {', '.join(LAYOUTS)}")
    output = Path(output)
    source = open_source_store(store)
    dtype = dtype or ("float8_e4m3fn" if layout == "deepseek-v41" else source.spec.dtype)
    if dtype not in INFERENCE_DTYPES:
        raise EngramError(f"unknown dtype {dtype!r} for inference; allowed: {', '.join(INFERENCE_DTYPES)}")
    if layout == "deepseek-v41" and dtype != "float8_e4m3fn":
        raise EngramError("the deepseek-v41 layout is fp8 only (F8_E4M3 weights, F8_E8M0 scales); "
                          "drop --dtype or use --layout engram")
    if dtype == "float8_e4m3fn":
        check_blockable(source.spec.dim)
    if key_template is not None and layout == "deepseek-v41":
        raise EngramError("the deepseek-v41 layout has fixed tensor names; --key-template applies to --layout engram")
    key_template = key_template or DEFAULT_KEY_TEMPLATE
    check_key_template(key_template, per_head=False)
    single = output.name.endswith(".safetensors")
    if single and layout == "deepseek-v41":
        raise EngramError("the deepseek-v41 layout is a folder of shards with an index; give a folder, "
                          f"not {output.name}")
    max_bytes = parse_size(max_shard_size)
    tables, plans, metadata, small = _plan(source, layout, dtype, key_template)
    total = sum(p.nbytes for p in plans)
    if single:
        single_name = output.name
    elif layout == "engram" and total <= max_bytes:
        single_name = "model.safetensors"
    else:
        single_name = None
    layout_plan = plan_layout(plans, metadata, max_shard_bytes=max_bytes, single_file=single_name,
                              index_metadata={"format": FORMAT, "layout": layout} if layout == "engram" else None)
    tmp = prepare_output(output, overwrite)
    start = time.perf_counter()
    quant = QuantError() if dtype == "float8_e4m3fn" else None
    conversion = Conversion(source.spec.dtype, dtype)
    readers = {t.layer_id: source.layer(t.layer_id) for t in tables}

    def blocks(block_bytes: int, row_bytes: int) -> list[tuple[_Table, int, int]]:
        """Every table's rows in blocks of about `block_bytes`, in whole storage chunks."""
        return [(t, begin, end) for t in tables
                for begin, end in row_blocks(source.spec.rows(t.layer_id), readers[t.layer_id].preferred_block(
                    max(1, block_bytes // row_bytes)))]
    try:
        writer = SafetensorsWriter(layout_plan, tmp, create=True)
        try:
            for name, value in small.items():
                writer.write_rows(name, 0, value)
            with store_progress(source, "export", show_progress) as advance, \
                    dask_client(scheduler, dask_workers) as client:
                if client is None:
                    stored_row = source.spec.dim * DTYPE_BYTES[source.dtype]
                    _export_locally(readers, writer, blocks(_LOCAL_BLOCK_BYTES, stored_row), dtype, quant,
                                    conversion, advance)
                else:
                    _export_on_cluster(client, absolute_store_path(store), layout_plan, tmp,
                                       blocks(_BLOCK_BYTES, 4 * source.spec.dim), dtype, quant, conversion, advance)
        finally:
            writer.close(sync=True)
        writer.write_index()
        replace_output(tmp / output.name if single else tmp, output)
    finally:
        remove_tree(tmp)
    seconds = time.perf_counter() - start
    return ExportReport(
        target="inference", layout=layout, output=str(output), store=str(store), dtype=dtype,
        source_dtype=source.spec.dtype, files=[f.name for f in layout_plan.files],
        index=layout_plan.with_index, layers={t.layer_id: {"key": t.weight, "scale": t.scale,
                                                           "rows": source.spec.rows(t.layer_id)}
                                              for t in tables},
        bytes=total, seconds=seconds, conversion=conversion.to_json(),
        quantization=None if quant is None else quant.to_json())


def _write_block(writer: SafetensorsWriter, table: _Table, begin: int, values: torch.Tensor,
                 dtype: str, quant: QuantError | None, conversion: Conversion, threads: int = 1) -> None:
    """Convert (or quantize, on `threads` threads) one row block of a table and write it at its place."""
    if quant is None:
        converted = values.to(TORCH_DTYPES[dtype])
        conversion.check(values, converted)
        writer.write_rows(table.weight, begin, converted)
    else:
        codes, scales = quantize(values, quant, threads=threads)
        writer.write_rows(table.weight, begin, codes)
        writer.write_rows(table.scale, begin, scales)


def export_block_task(store: str, layout_plan: Any, directory: str, table: _Table, begin: int,
                      end: int, dtype: str) -> tuple[int, QuantError | None, float]:
    """One Dask task: rows [begin, end) of one table, read from the store and written by
    position; returns (rows, quantization error, largest conversion error) for the merge."""
    source = open_source_store(store)
    conversion = Conversion(source.spec.dtype, dtype)
    quant = QuantError() if dtype == "float8_e4m3fn" else None
    writer = SafetensorsWriter(layout_plan, directory, create=False)
    try:
        values = source.layer(table.layer_id).read(begin, end)
        _write_block(writer, table, begin, values, dtype, quant, conversion, threads=2)
    finally:
        writer.close(sync=True)
    return end - begin, quant, conversion.max_abs_error


def _export_locally(readers: dict[int, LayerSource], writer: SafetensorsWriter,
                    blocks: list[tuple[_Table, int, int]], dtype: str, quant: QuantError | None,
                    conversion: Conversion, advance: Any) -> None:
    """Each block read, converted and written by position, `_EXPORT_THREADS` blocks at a time.

    Reading (checksums included), quantizing and writing all run outside the GIL, so every core
    works on a block of its own from start to end, with no hand-over between threads.
    """
    def export_block(block: tuple[_Table, int, int]) -> tuple[int, QuantError | None, float]:
        table, begin, end = block
        values = readers[table.layer_id].read(begin, end)
        block_quant = None if quant is None else QuantError()
        block_conversion = Conversion(conversion.source, conversion.target)
        _write_block(writer, table, begin, values, dtype, block_quant, block_conversion)
        return end - begin, block_quant, block_conversion.max_abs_error

    for rows, block_quant, block_error in in_parallel(blocks, export_block, _EXPORT_THREADS):
        _merge(quant, conversion, block_quant, block_error)
        advance(rows)


def _merge(quant: QuantError | None, conversion: Conversion, block_quant: QuantError | None,
           block_error: float) -> None:
    if quant is not None and block_quant is not None:
        quant.merge(block_quant)
    conversion.max_abs_error = max(conversion.max_abs_error, block_error)


def _export_on_cluster(client: Any, store: str, layout_plan: Any, directory: Path,
                       blocks: list[tuple[_Table, int, int]], dtype: str, quant: QuantError | None,
                       conversion: Conversion, advance: Any) -> None:
    def done(_name: str, result: tuple[int, QuantError | None, float]) -> None:
        rows, block_quant, block_error = result
        _merge(quant, conversion, block_quant, block_error)
        advance(rows)

    tasks = [(f"layer{table.layer_id}-rows{begin}-{end - 1}",
              (store, layout_plan, str(directory), table, begin, end, dtype))
             for table, begin, end in blocks]
    run_tasks(client, export_block_task, tasks, on_done=done)


class EngramTables:
    """Memory-mapped Engram tables of an inference export, either layout.

    `lookup(input_ids)` hashes with the tables' own metadata (or the spec and projection given to
    `open`, which a deepseek-v41 shard set needs) and gathers rows straight from the mapped
    files: the host-offload read path. fp8 rows come back dequantized to bfloat16.
    """

    def __init__(self, path: Path, mapped: MappedTensors, tables: dict[int, _Table], layout: str,
                 spec: TableSpec | None, projection: VocabProjection | None) -> None:
        self.path = path
        self.layout = layout
        self.metadata = mapped.found.metadata
        self.spec = spec
        self.projection = projection
        self._mapped = mapped
        self._tables = tables
        self._weights = {layer: mapped.tensor(t.weight) for layer, t in tables.items()}
        self._scales = {layer: mapped.tensor(t.scale) for layer, t in tables.items() if t.scale}
        self._hasher = None
        for layer, scale in self._scales.items():
            rows, dim = self._weights[layer].shape
            if tuple(scale.shape) != (rows, dim // BLOCK) or dim % BLOCK:
                raise EngramError(f"{path}: layer {layer} has scales of shape {tuple(scale.shape)} for a "
                                  f"{rows} x {dim} table; expected one per {BLOCK} values, ({rows}, {dim // BLOCK})")

    @classmethod
    def open(cls, path: str | Path, spec: TableSpec | None = None,
             projection: VocabProjection | None = None) -> EngramTables:
        """Open a .safetensors file, an index json, or a folder holding either."""
        path = Path(path)
        found = open_set(path)
        mapped = MappedTensors(found)
        metadata = found.metadata
        if metadata.get("format") == FORMAT:
            try:
                tables = {int(k): _Table(int(k), v["weight"], v["scale"])
                          for k, v in json.loads(metadata["tables"]).items()}
                stored_spec = spec_from_dict(json.loads(metadata["spec"]))
                projection_meta = json.loads(metadata.get("projection", "{}"))
            except (KeyError, ValueError, TypeError, AttributeError):
                raise EngramError(f"{path}: the engram metadata in its header is damaged") from None
            layout = metadata.get("layout", "engram")
            spec = spec or stored_spec
            needed = [t.weight for t in tables.values()] + [t.scale for t in tables.values() if t.scale]
            if projection is None:
                needed.append("engram.projection.lookup")
        else:
            tables = _deepseek_tables(found.tensors, path)
            layout = "deepseek-v41"
            needed = [name for t in tables.values() for name in (t.weight, t.scale)]
        missing = [name for name in needed if name not in found.tensors]
        if missing:
            raise EngramError(f"{path} lacks tensor {missing[0]!r} (an incomplete shard set?)")
        if layout != "deepseek-v41" and projection is None:
            projection = _stored_projection(found.tensors, mapped, projection_meta, str(path))
        opened = cls(path, mapped, tables, layout, spec, projection)
        if spec is not None:
            opened._check_spec(spec)
        return opened

    @property
    def layer_ids(self) -> tuple[int, ...]:
        return tuple(sorted(self._tables))

    @property
    def dim(self) -> int:
        return int(next(iter(self._weights.values())).shape[1])

    def rows(self, layer_id: int) -> int:
        return int(self.weight(layer_id).shape[0])

    @property
    def quantized(self) -> bool:
        return bool(self._scales)

    def weight(self, layer_id: int) -> torch.Tensor:
        """The mapped table of a layer (fp8 codes when quantized); read-only."""
        try:
            return self._weights[int(layer_id)]
        except KeyError:
            raise EngramError(f"layer {layer_id} is not in {self.path} (layers: {list(self.layer_ids)})") from None

    def scale(self, layer_id: int) -> torch.Tensor | None:
        self.weight(layer_id)
        return self._scales.get(int(layer_id))

    def gather(self, layer_id: int, rows: Any) -> torch.Tensor:
        """Rows of a layer's table for an index tensor of any shape -> (*shape, dim)."""
        index = torch.as_tensor(rows, dtype=torch.int64)
        weight = self.weight(layer_id)
        flat = index.reshape(-1)
        if flat.numel() and (int(flat.min()) < 0 or int(flat.max()) >= weight.shape[0]):
            raise EngramError(f"row indices must lie in [0, {weight.shape[0]}) for layer {layer_id}")
        scale = self._scales.get(int(layer_id))
        if scale is None:
            picked = weight.index_select(0, flat)
        else:
            threads = _GATHER_THREADS if flat.numel() * weight.shape[1] >= _PARALLEL_VALUES else 1
            picked = gather_dequantize(weight, scale, flat, threads=threads)
        return picked.reshape(*index.shape, weight.shape[1])

    def hasher(self) -> Any:
        if self.spec is None or self.projection is None:
            raise EngramError(f"{self.path} carries no hashing metadata ({self.layout} layout); "
                              "open it with spec= and projection= (e.g. the deepseek-v4.1-flash preset)")
        if self._hasher is None:
            from .hashing import NgramHasher

            self._hasher = NgramHasher(self.spec, self.projection)
        return self._hasher

    def lookup(self, input_ids: Any, layers: Iterable[int] | None = None) -> dict[int, torch.Tensor]:
        """{layer_id: (B, T, heads, dim)} for token ids (B, T) (or (T, heads, dim) for 1-D ids)."""
        chosen = list(self.layer_ids if layers is None else layers)
        rows = self.hasher().rows(input_ids, layers=chosen)
        return {layer: self.gather(layer, torch.as_tensor(r)) for layer, r in rows.items()}

    def _check_spec(self, spec: TableSpec) -> None:
        for layer_id in self.layer_ids:
            if layer_id not in spec.layer_ids:
                raise EngramError(f"{self.path} holds layer {layer_id}, which spec {spec.name} does not have "
                                  f"(layer_ids = {list(spec.layer_ids)})")
            rows, dim = self.weight(layer_id).shape
            if (rows, dim) != (spec.rows(layer_id), spec.dim):
                raise EngramError(f"layer {layer_id} of {self.path} is {rows:,} x {dim} but spec {spec.name} "
                                  f"says {spec.rows(layer_id):,} x {spec.dim}")


def _stored_projection(tensors: dict[str, Any], mapped: MappedTensors, metadata: dict[str, str],
                       where: str) -> VocabProjection:
    zipped = tensors.get("engram.projection.tokenizer_zip")
    return restore_projection(
        mapped.tensor("engram.projection.lookup").numpy().copy(),
        None if zipped is None else mapped.tensor("engram.projection.tokenizer_zip").numpy().tobytes(),
        metadata, where)


def _deepseek_tables(tensors: dict[str, Any], path: Path) -> dict[int, _Table]:
    import re

    pattern = re.compile(r"^layers\.(\d+)\.engram\.embed\.weight$")
    tables = {}
    for name in tensors:
        match = pattern.match(name)
        if match:
            layer_id = int(match.group(1))
            tables[layer_id] = _Table(layer_id, name, DEEPSEEK_SCALE.format(layer_id=layer_id))
    if not tables:
        raise EngramError(f"{path} holds no Engram tables (neither an engram export nor "
                          "layers.N.engram.embed.weight of the deepseek-v41 layout)")
    return tables


class SafetensorsSource(TableSource):
    """An inference export (either layout) read back as a table source, for `engram import`."""

    def __init__(self, tables: EngramTables, layers: Iterable[int] | None) -> None:
        if tables.spec is None or tables.projection is None:
            raise EngramError(f"{tables.path} is in the deepseek-v41 layout, which carries no hashing "
                              "metadata: pass --spec and --projection (e.g. --spec deepseek-v4.1-flash)")
        chosen = tables.layer_ids if layers is None else tuple(int(x) for x in layers)
        for layer_id in chosen:
            tables.weight(layer_id)
        super().__init__(tables.spec, tables.projection, chosen)
        self.tables = tables
        stored = tables.metadata
        self.store_dtype = spec_from_dict(json.loads(stored["spec"])).dtype if "spec" in stored else None
        self.sharding = json.loads(stored.get("sharding", "null"))
        self.dtype = "float8_e4m3fn" if tables.quantized else _name_of(tables.weight(chosen[0]).dtype)

    def layer(self, layer_id: int) -> LayerSource:
        tables = self.tables
        weight, scale = tables.weight(layer_id), tables.scale(layer_id)

        def read(begin: int, end: int) -> torch.Tensor:
            if scale is None:
                return weight[begin:end].clone()
            return dequantize(weight[begin:end], scale[begin:end], torch.float32)

        return LayerSource(layer_id, int(weight.shape[0]), int(weight.shape[1]), read)


def _name_of(dtype: torch.dtype) -> str:
    for name, value in TORCH_DTYPES.items():
        if value == dtype:
            return name
    raise EngramError(f"tables of dtype {dtype} cannot go into a store")


def open_safetensors_source(path: Path, spec: TableSpec | None, projection: VocabProjection | None,
                            layers: Iterable[int] | None) -> SafetensorsSource:
    return SafetensorsSource(EngramTables.open(path, spec=spec, projection=projection), layers)

