"""`engram export --for inference`: a store streamed into safetensors of either layout (`layouts`).

Every file, header and byte offset is planned before any data is written
(`safetensors_format.plan_layout`); row blocks are then read from the store, converted or
quantized (`fp8`) and written by position: locally on up to 8 threads, each block from read to
write on one thread (all of it outside the GIL), or on a Dask cluster as one task per block of
about 32 MiB, every task writing into the same files. The output is written in a temporary folder
and renamed into place when complete (`engram_cli.output`). A deepseek-v41 export also gets
`engram_config.json` beside its index, the `engram_*` keys of a model's config.json
(`model_config`), and the projection's `tokenizer.json`: what reading it back needs, so that
`engram import` of the folder takes nothing else. With a hotness file, each layer's hottest rows
are added as a hot tier (`hot_tier`), copied from the written tables once they are complete.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from ..cluster import absolute_store_path, run_tasks
from ..dtypes import DTYPE_BYTES, DTYPES, INFERENCE_DTYPES, InferenceDType, torch_dtype
from ..errors import EngramError, choose
from ..helpers import cpu_count, in_parallel, row_blocks
from ..output import Output
from ..progress import SILENT, Progress
from .conversion import Conversion
from .fp8 import QuantError, check_quantizable, quantize, warm_quantize
from .fp8_format import BLOCK, check_blockable
from .hot_tier import TIER_FILE, choose_hot_rows, tier_key
from .keys import (
    DEEPSEEK_SCALE,
    DEEPSEEK_WEIGHT,
    DEFAULT_KEY_TEMPLATE,
    check_key_template,
    scale_key,
)
from .layouts import LAYOUTS, SAFETENSORS_FORMAT, SAFETENSORS_FORMAT_VERSION, Layout, Table, check_table_names
from .metadata import hashing_arrays
from .model_config import ENGRAM_CONFIG, TOKENIZER, config_keys
from .output import EXPORT
from .reports import ExportReport
from .safetensors_format import MappedTensors, SafetensorsWriter, TensorPlan, open_set, parse_size, plan_layout
from .sources import LayerSource, TableSource, open_source_store

if TYPE_CHECKING:
    from distributed import Client

_BLOCK_BYTES = 32 << 20  # rows (as float32) read, converted and written by one Dask task
_LOCAL_BLOCK_BYTES = 4 << 20  # rows (as stored) one export thread reads, converts and writes at a time
_EXPORT_THREADS = max(2, min(8, cpu_count()))


def _plan(
    source: TableSource, layout: str, dtype: str, key_template: str
) -> tuple[list[Table], list[TensorPlan], dict[str, str], dict[str, Any]]:
    """Tensor names, shapes and file metadata of an export, and the small tensors' values."""
    spec, dim = source.spec, source.spec.dim
    fp8 = dtype == "float8_e4m3fn"
    tables: list[Table] = []
    plans: list[TensorPlan] = []
    small: dict[str, np.ndarray] = {}
    for layer_id in source.layer_ids:
        scale: str | None
        if layout == "deepseek-v41":
            weight, scale = DEEPSEEK_WEIGHT.format(layer_id=layer_id), DEEPSEEK_SCALE.format(layer_id=layer_id)
        else:
            weight = key_template.format(layer_id=layer_id)
            scale = scale_key(weight) if fp8 else None
        tables.append(Table(layer_id, weight, scale))
        rows = spec.rows(layer_id)
        plans.append(TensorPlan(weight, DTYPES[dtype].safetensors, (rows, dim)))
        if scale is not None:
            plans.append(TensorPlan(scale, "F8_E8M0", (rows, dim // BLOCK)))
    if layout == "deepseek-v41":
        return tables, plans, {"format": "pt"}, small
    projection = source.projection
    small = hashing_arrays(source)
    for name, value in small.items():
        plans.append(TensorPlan(name, "I64" if value.dtype == np.int64 else "U8", value.shape))
    metadata = {
        "format": SAFETENSORS_FORMAT,
        "format_version": SAFETENSORS_FORMAT_VERSION,
        "layout": layout,
        "dtype": dtype,
        "spec": json.dumps(spec.to_dict()),
        "projection": json.dumps({**projection.metadata, "fingerprint": projection.fingerprint()}),
        "tables": json.dumps({str(t.layer_id): {"weight": t.weight, "scale": t.scale} for t in tables}),
        "sharding": json.dumps(source.sharding and source.sharding.to_json()),
    }
    check_table_names(tables, spec.layer_ids, f"key template {key_template!r}")
    return tables, plans, metadata, small


def export_inference(
    store: str | Path,
    output: str | Path,
    *,
    dtype: InferenceDType | None = None,
    layout: Layout = "engram",
    max_shard_size: str | int = "5GB",
    key_template: str | None = None,
    overwrite: bool = False,
    client: Client | None = None,
    progress: Progress = SILENT,
    hot_rows: str | Path | None = None,
    hot_bytes: str | int | None = None,
) -> ExportReport:
    """Stream a store into safetensors for inference, one row block in memory at a time.

    Args:
        store: the table store to read.
        output: a `.safetensors` file, or a folder holding `model.safetensors` or shards of at most
            `max_shard_size` (bytes, or a size such as "5GB") with an index; always shards for
            the `deepseek-v41` layout.
        dtype: the exported dtype (default: the store's; `deepseek-v41` is float8_e4m3fn only).
        layout: "engram" (self-describing) or "deepseek-v41" (fp8 with scales, vLLM/SGLang names).
        key_template: tensor names of the engram layout, with `{layer_id}`.
        overwrite: replace an existing output.
        client: a Dask client: every row block is then a task that reads the store and writes its
            bytes by position into the same files (every header is laid out first), so the output
            folder must be on a filesystem the workers share.
        progress: receives a task advancing by rows exported.
        hot_rows: a hotness file (`engram_cli.hot_rows`) of the store's spec and projection: each
            layer's first rows are added as a hot tier (`hot_tier`).
        hot_bytes: the tier's bytes per layer (a row at the export's dtype, scales included;
            bytes or a size such as "1GiB"); default: every row the file lists.
    """
    layout = choose(layout, LAYOUTS, "unknown layout {value!r}; allowed: {allowed}")
    output = Path(output)
    source = open_source_store(store)
    dtype = dtype or ("float8_e4m3fn" if layout == "deepseek-v41" else source.spec.dtype)  # type: ignore[assignment]
    if dtype not in INFERENCE_DTYPES:
        raise EngramError(f"unknown dtype {dtype!r} for inference; allowed: {', '.join(INFERENCE_DTYPES)}")
    if layout == "deepseek-v41" and dtype != "float8_e4m3fn":
        raise EngramError(
            "the deepseek-v41 layout is fp8 only (F8_E4M3 weights, F8_E8M0 scales); drop --dtype or use --layout engram"
        )
    if dtype == "float8_e4m3fn":
        check_blockable(source.spec.dim)
    if key_template is not None and layout == "deepseek-v41":
        raise EngramError("the deepseek-v41 layout has fixed tensor names; --key-template applies to --layout engram")
    key_template = key_template or DEFAULT_KEY_TEMPLATE
    check_key_template(key_template, per_head=False)
    single = output.name.endswith(".safetensors")
    if single and layout == "deepseek-v41":
        raise EngramError(
            f"the deepseek-v41 layout is a folder of shards with an index; give a folder, not {output.name}"
        )
    max_bytes = parse_size(max_shard_size)
    tables, plans, metadata, small = _plan(source, layout, dtype, key_template)
    hot: dict[int, np.ndarray] = {}
    if hot_rows is not None:
        tier_row = source.spec.dim * DTYPES[dtype].itemsize + (
            source.spec.dim // BLOCK if dtype == "float8_e4m3fn" else 0
        )
        tier_bytes = None if hot_bytes is None else parse_size(hot_bytes)
        hot = choose_hot_rows(hot_rows, source.spec, source.projection, tier_row, tier_bytes)
    elif hot_bytes is not None:
        raise EngramError("--hot-bytes sizes the hot tier: add --hot-rows FILE")
    tier_plans = _tier_plans(hot, source.spec.dim, dtype)
    if layout == "engram":
        plans += tier_plans
    total = sum(p.nbytes for p in plans)
    if single:
        single_name = output.name
    elif layout == "engram" and total <= max_bytes:
        single_name = "model.safetensors"
    else:
        single_name = None
    layout_plan = plan_layout(
        plans,
        metadata,
        max_shard_bytes=max_bytes,
        single_file=single_name,
        index_metadata={"format": SAFETENSORS_FORMAT, "layout": layout} if layout == "engram" else None,
    )
    tier_layout = None
    if tier_plans and layout == "deepseek-v41":
        tier_layout = plan_layout(tier_plans, {"format": "pt"}, max_shard_bytes=None, single_file=TIER_FILE)
    target = Output(output, EXPORT, overwrite=overwrite)
    if dtype == "float8_e4m3fn" and client is None:  # on a cluster, each worker compiles its own
        warm_quantize(torch_dtype(source.dtype))
    start = time.perf_counter()
    quant = QuantError() if dtype == "float8_e4m3fn" else None
    conversion = Conversion(source.spec.dtype, dtype)
    readers = {t.layer_id: source.layer(t.layer_id) for t in tables}

    def blocks(block_bytes: int, row_bytes: int) -> list[tuple[Table, int, int]]:
        """Every table's rows in blocks of about `block_bytes`, in whole storage chunks."""
        return [
            (t, begin, end)
            for t in tables
            for begin, end in row_blocks(
                source.spec.rows(t.layer_id), readers[t.layer_id].preferred_block(max(1, block_bytes // row_bytes))
            )
        ]

    tier_size = 0 if tier_layout is None else tier_layout.files[0].size
    with target.writing(
        sum(f.size for f in layout_plan.files) + tier_size, folder=True, entry=output.name if single else None
    ) as tmp:
        writer = SafetensorsWriter(layout_plan, tmp, create=True)
        try:
            for name, value in small.items():
                writer.write_rows(name, 0, value)
            advance = progress.task("export", source.total_rows).advance
            if client is None:
                stored_row = source.spec.dim * DTYPE_BYTES[source.dtype]
                _export_locally(
                    readers, writer, blocks(_LOCAL_BLOCK_BYTES, stored_row), dtype, quant, conversion, advance
                )
            else:
                _export_on_cluster(
                    client,
                    absolute_store_path(store),
                    layout_plan,
                    tmp,
                    blocks(_BLOCK_BYTES, 4 * source.spec.dim),
                    dtype,
                    quant,
                    conversion,
                    advance,
                )
        finally:
            writer.close(sync=True)
        writer.write_index()
        if hot:
            written = MappedTensors(open_set(tmp / output.name if single else tmp))
            _write_tier(written, tables, hot, tier_layout or layout_plan, tmp, create=tier_layout is not None)
        if layout == "deepseek-v41":  # what reading the tensors back needs: the config keys and the tokenizer
            keys = config_keys(source.spec, source.projection.compressed_size)
            (tmp / ENGRAM_CONFIG).write_text(json.dumps(keys, indent=2) + "\n")
            if source.projection.tokenizer_json is not None:
                (tmp / TOKENIZER).write_bytes(source.projection.tokenizer_json)
    seconds = time.perf_counter() - start
    return ExportReport(
        target="inference",
        layout=layout,
        output=str(output),
        store=str(store),
        dtype=dtype,
        source_dtype=source.spec.dtype,
        files=[f.name for f in layout_plan.files] + ([TIER_FILE] if tier_layout is not None else []),
        index=layout_plan.with_index,
        config=ENGRAM_CONFIG if layout == "deepseek-v41" else None,
        layers={t.layer_id: {"key": t.weight, "scale": t.scale, "rows": source.spec.rows(t.layer_id)} for t in tables},
        bytes=total,
        seconds=seconds,
        conversion=conversion.to_json(),
        quantization=None if quant is None else quant.to_json(),
        hot_tier={
            layer: {"rows": int(rows.size), "bytes": _tier_bytes(tier_plans, layer)} for layer, rows in hot.items()
        }
        if hot_rows is not None
        else None,
    )


def _tier_plans(hot: dict[int, np.ndarray], dim: int, dtype: str) -> list[TensorPlan]:
    """The tier tensors of every layer (`hot_tier` names them)."""
    plans = []
    for layer, rows in hot.items():
        k = int(rows.size)
        plans += [
            TensorPlan(tier_key(layer, "rows"), "I64", (k,)),
            TensorPlan(tier_key(layer, "slots"), "I64", (k,)),
            TensorPlan(tier_key(layer, "weight"), DTYPES[dtype].safetensors, (k, dim)),
        ]
        if dtype == "float8_e4m3fn":
            plans.append(TensorPlan(tier_key(layer, "scale"), "F8_E8M0", (k, dim // BLOCK)))
    return plans


def _tier_bytes(plans: list[TensorPlan], layer: int) -> int:
    """The bytes of one layer's tier rows (weight and scales; the row ids not counted)."""
    return sum(p.nbytes for p in plans if p.name in (tier_key(layer, "weight"), tier_key(layer, "scale")))


def _write_tier(
    written: MappedTensors,
    tables: list[Table],
    hot: dict[int, np.ndarray],
    tier_layout: Any,
    directory: Path,
    *,
    create: bool,
) -> None:
    """Copy each layer's hot rows out of its written table (and scales) into the tier tensors,
    so a row reads bit for bit the same from either."""
    writer = SafetensorsWriter(tier_layout, directory, create=create)
    try:
        for table in tables:
            rows = hot.get(table.layer_id)
            if rows is None:
                continue
            index = torch.from_numpy(rows)
            writer.write_rows(tier_key(table.layer_id, "rows"), 0, rows)
            writer.write_rows(tier_key(table.layer_id, "slots"), 0, np.argsort(rows, kind="stable").astype(np.int64))
            writer.write_rows(
                tier_key(table.layer_id, "weight"), 0, written.tensor(table.weight).index_select(0, index)
            )
            if table.scale is not None:
                scales = written.tensor(table.scale).index_select(0, index)
                writer.write_rows(tier_key(table.layer_id, "scale"), 0, scales)
    finally:
        writer.close(sync=True)
        written.close()


def _write_block(
    writer: SafetensorsWriter,
    table: Table,
    begin: int,
    values: torch.Tensor,
    dtype: str,
    quant: QuantError | None,
    conversion: Conversion,
    threads: int = 1,
) -> None:
    """Convert (or quantize, on `threads` threads) one row block of a table and write it at its place."""
    where = f"layer {table.layer_id} rows {begin:,}-{begin + len(values) - 1:,}"
    if quant is None:
        converted = values.to(torch_dtype(dtype))
        conversion.check(values, converted, where)
        writer.write_rows(table.weight, begin, converted)
    else:
        check_quantizable(values, f"layer {table.layer_id}", first_row=begin)
        codes, scales = quantize(values, quant, threads=threads)
        writer.write_rows(table.weight, begin, codes)
        assert table.scale is not None  # fp8 tables carry their scales
        writer.write_rows(table.scale, begin, scales)


def export_block_task(
    store: str, layout_plan: Any, directory: str, table: Table, begin: int, end: int, dtype: str
) -> tuple[int, QuantError | None, float]:
    """One Dask task: rows [begin, end) of one table, read from the store and written by
    position; returns (rows, quantization error, largest conversion error) for the merge.

    Args:
        store: the store, as every worker can open it.
        layout_plan: the planned files of the export (`SafetensorsLayout`).
        directory: the folder being written, seen by every worker.
        table: the table's tensor names.
        begin, end: the rows to export.
        dtype: the exported dtype.
    """
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


def _export_locally(
    readers: dict[int, LayerSource],
    writer: SafetensorsWriter,
    blocks: list[tuple[Table, int, int]],
    dtype: str,
    quant: QuantError | None,
    conversion: Conversion,
    advance: Any,
) -> None:
    """Each block read, converted and written by position, `_EXPORT_THREADS` blocks at a time.

    Reading (checksums included), quantizing and writing all run outside the GIL, so every core
    works on a block of its own from start to end, with no hand-over between threads.
    """

    def export_block(block: tuple[Table, int, int]) -> tuple[int, QuantError | None, float]:
        table, begin, end = block
        values = readers[table.layer_id].read(begin, end)
        block_quant = None if quant is None else QuantError()
        block_conversion = Conversion(conversion.source, conversion.target)
        _write_block(writer, table, begin, values, dtype, block_quant, block_conversion)
        return end - begin, block_quant, block_conversion.max_abs_error

    for rows, block_quant, block_error in in_parallel(blocks, export_block, _EXPORT_THREADS):
        _merge(quant, conversion, block_quant, block_error)
        advance(rows)


def _merge(
    quant: QuantError | None, conversion: Conversion, block_quant: QuantError | None, block_error: float
) -> None:
    if quant is not None and block_quant is not None:
        quant.merge(block_quant)
    conversion.max_abs_error = max(conversion.max_abs_error, block_error)


def _export_on_cluster(
    client: Any,
    store: str,
    layout_plan: Any,
    directory: Path,
    blocks: list[tuple[Table, int, int]],
    dtype: str,
    quant: QuantError | None,
    conversion: Conversion,
    advance: Any,
) -> None:
    def done(_name: str, result: tuple[int, QuantError | None, float]) -> None:
        rows, block_quant, block_error = result
        _merge(quant, conversion, block_quant, block_error)
        advance(rows)

    tasks = [
        (f"layer{table.layer_id}-rows{begin}-{end - 1}", (store, layout_plan, str(directory), table, begin, end, dtype))
        for table, begin, end in blocks
    ]
    run_tasks(client, export_block_task, tasks, on_done=done)
