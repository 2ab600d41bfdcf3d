"""`engram export --for inference --layout gguf`: the tables as a GGUF llama.cpp reads, streamed.

The header (keys and tensor infos, `gguf_file.layout_file`) is laid out first: every tensor's size
follows from its shape and type, so each tensor's offset is known before a byte of data is. Then
each table is read from the store a block of 4 MiB of values at a time, quantized (`gguf_quants`)
and appended; the next `_AHEAD` blocks are read and quantized in background threads while one is
written, so reading, quantizing and writing overlap on every CPU and memory holds `_AHEAD` + 1
blocks whatever the table size. The quantizer measures the largest change it made to a value, in
the same pass, as every lossy export reports. Tables whose store dtype is the file's type (float32
to F32, bfloat16 to BF16, float16 to F16) are copied as they are.

Without `--into` the file holds the Engram keys (`gguf_format`) under `general.architecture`
deepseek41 and one tensor per layer. With `--into MODEL.gguf` it is a copy of that model with its
Engram keys and tensors replaced by the store's: every other key is copied as its encoded bytes and
every other tensor's data byte for byte, in the model's order (the Engram keys and each layer's
table where the model's were, else at the end); the model's alignment is kept.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import BinaryIO

import numpy as np
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType, GGUFValueType

from ..dtypes import to_numpy
from ..errors import EngramError, UsageError
from ..helpers import prefetched, row_blocks
from ..output import Output
from ..progress import SILENT, Progress
from .gguf_file import Header, encode_key, layout_file, read_set
from .gguf_format import ARCH, engram_keys, has_engram_keys, is_engram_key, tensor_name
from .gguf_quants import WRITE_TYPES, fits_blocks, quantize_measured
from .output import EXPORT
from .reports import ExportReport
from .sources import StoreSource, open_source_store

_BLOCK_BYTES = 4 << 20  # float32 values quantized and written at a time
_AHEAD = 3  # blocks read and quantized at once, in background threads, while one is written
_COPY_BYTES = 16 << 20
_AS_IS = {
    "float32": GGMLQuantizationType.F32,
    "bfloat16": GGMLQuantizationType.BF16,
    "float16": GGMLQuantizationType.F16,
}
_ARCH_KEY = "general.architecture"


def export_gguf(
    store: str | Path,
    output: str | Path,
    *,
    quant: str = "q8_0",
    into: str | Path | None = None,
    overwrite: bool = False,
    progress: Progress = SILENT,
) -> ExportReport:
    """Write a store's tables (and hashing keys) as a GGUF, or into a copy of a model's GGUF.

    Args:
        store: the table store to read.
        output: the .gguf file to write.
        quant: the tables' ggml type: q8_0 (as the published conversion), q4_0, bf16, f16 or f32.
        into: a model GGUF (one file) whose Engram keys and tables the output replaces.
        overwrite: replace an existing output.
        progress: receives a task advancing by rows exported.
    """
    if quant not in WRITE_TYPES:
        raise UsageError(f"unknown --quant {quant!r}; allowed: {', '.join(WRITE_TYPES)}")
    output = Path(output)
    if output.suffix != ".gguf":
        raise UsageError(f"a GGUF export is one .gguf file; got {output.name}")
    target = Output(output, EXPORT, overwrite=overwrite)  # refused before any work
    qtype = WRITE_TYPES[quant]
    source = open_source_store(store)
    spec = source.spec
    if set(source.layer_ids) != set(spec.layer_ids):
        raise UsageError(
            f"{store} holds only layers {list(source.layer_ids)} of the spec's {list(spec.layer_ids)}; "
            "a GGUF holds every layer its keys describe"
        )
    if not fits_blocks(qtype, spec.dim):
        raise UsageError(
            f"{quant} packs {GGML_QUANT_SIZES[qtype][0]}-value blocks, but a table row has {spec.dim} values; "
            "use bf16, f16 or f32"
        )
    tables: list[tuple[str, tuple[int, ...], GGMLQuantizationType]] = [
        (tensor_name(layer), (spec.dim, spec.rows(layer)), qtype) for layer in spec.layer_ids
    ]
    model = None if into is None else _model(Path(into), spec.layer_ids)
    keys, tensors, copied, alignment = _plan(source, tables, model)
    header, offsets, size = layout_file(keys, tensors, alignment)
    started = time.perf_counter()
    task = progress.task("export", source.total_rows)
    largest = 0.0
    with target.writing(size) as tmp, tmp.open("wb") as out:
        out.write(header)
        for (name, _, _), offset in zip(tensors, offsets, strict=True):
            out.write(b"\0" * (offset - out.tell()))
            if name in copied:
                _copy(copied[name], out)
            else:
                layer_id = int(name.split(".")[1])
                largest = max(largest, _write_table(source, layer_id, qtype, out, task.advance))
        out.flush()
        os.fsync(out.fileno())
    return ExportReport(
        target="inference",
        layout="gguf",
        output=str(output),
        store=str(store),
        dtype=quant,
        source_dtype=spec.dtype,
        files=[output.name],
        index=False,
        layers={layer: {"key": tensor_name(layer), "rows": spec.rows(layer)} for layer in spec.layer_ids},
        bytes=size,
        seconds=time.perf_counter() - started,
        conversion={
            "from": spec.dtype,
            "to": quant,
            "lossy": _AS_IS.get(spec.dtype) != qtype and quant != "f32",
            "max_abs_error": largest,
        },
        config=None if into is None else str(into),
    )


def _model(path: Path, layer_ids: tuple[int, ...]) -> Header:
    """The header of the model to copy; refused when its Engram layers are not the store's."""
    if not path.is_file():
        raise UsageError(f"no such GGUF: {path}")
    model = read_set(path)
    if len(model.files) > 1:
        raise UsageError(
            f"{path} is the first of a split set; --into takes one whole GGUF (merge it with llama-gguf-split)"
        )
    theirs = sorted(int(n.split(".")[1]) for n in model.tensors if _is_engram_tensor(n))
    if (theirs or has_engram_keys(model)) and theirs != sorted(layer_ids):
        raise UsageError(f"{path} has Engram tables for layers {theirs}, but the store has layers {list(layer_ids)}")
    return model


def _is_engram_tensor(name: str) -> bool:
    parts = name.split(".")
    return len(parts) == 4 and parts[0] == "blk" and parts[1].isdigit() and parts[2:] == ["engram_embd", "weight"]


def _plan(
    source: StoreSource,
    tables: list[tuple[str, tuple[int, ...], GGMLQuantizationType]],
    model: Header | None,
) -> tuple[list[bytes], list[tuple[str, tuple[int, ...], GGMLQuantizationType]], dict[str, tuple[Path, int, int]], int]:
    """Keys, tensors (in file order), the model's tensors to copy (path, offset, bytes), alignment."""
    ours = engram_keys(source.spec, source.projection)
    if model is None:
        return [encode_key(_ARCH_KEY, GGUFValueType.STRING, ARCH), *ours], tables, {}, 32
    keys: list[bytes] = []
    for key, field in model.fields.items():
        if is_engram_key(key):
            if ours:
                keys.extend(ours)
                ours = []
        else:
            keys.append(field.raw)
    keys.extend(ours)
    tensors: list[tuple[str, tuple[int, ...], GGMLQuantizationType]] = []
    copied: dict[str, tuple[Path, int, int]] = {}
    pending = {name: (name, shape, qtype) for name, shape, qtype in tables}
    for name, info in model.tensors.items():
        if _is_engram_tensor(name):
            tensors.append(pending.pop(name))
        else:
            tensors.append((name, info.shape, info.qtype))
            copied[name] = (info.path, info.offset, info.nbytes)
    tensors.extend(pending.values())
    return keys, tensors, copied, model.alignment


def _copy(where: tuple[Path, int, int], out: BinaryIO) -> None:
    """A model tensor's bytes, as they are."""
    path, offset, nbytes = where
    with path.open("rb") as handle:
        handle.seek(offset)
        left = nbytes
        while left:
            chunk = handle.read(min(left, _COPY_BYTES))
            if not chunk:
                raise EngramError(f"{path} ended while copying its tensors")
            out.write(chunk)
            left -= len(chunk)


def _write_table(
    source: StoreSource, layer_id: int, qtype: GGMLQuantizationType, out: BinaryIO, advance: Callable[[int], None]
) -> float:
    """One table, block by block: read and quantized in the background while the last is written;
    returns the largest change quantizing made to a finite value."""
    reader = source.layer(layer_id)
    as_is = _AS_IS.get(source.dtype) == qtype
    block = reader.preferred_block(max(1, _BLOCK_BYTES // (4 * reader.dim)))

    def encode(rows: tuple[int, int]) -> tuple[np.ndarray, float]:
        values = to_numpy(reader.read(*rows))
        if as_is:
            return np.ascontiguousarray(values).view(np.uint8), 0.0
        values = values.astype(np.float32, copy=False)
        data, change = quantize_measured(values, qtype)
        if change == np.inf:
            raise UsageError(
                f"layer {layer_id} rows {rows[0]:,}-{rows[1] - 1:,}: {qtype.name} cannot hold these values (inf or "
                "nan, or a block scale past float16's range); export as f32, f16 or bf16"
            )
        return data, change

    largest = 0.0
    for (begin, end), (data, change) in prefetched(list(row_blocks(reader.rows, block)), encode, _AHEAD):
        out.write(memoryview(data).cast("B"))
        largest = max(largest, change)
        advance(end - begin)
    return largest
