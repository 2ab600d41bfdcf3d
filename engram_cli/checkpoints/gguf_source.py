"""A DeepSeek-V4.1 GGUF (a whole file or a split set) read back as a `TableSource`, for `engram import`.

Only the header and the Engram tables are read: the spec and projection come from the
`deepseek41.engram.*` keys (`gguf_format.gguf_hashing`, checked against what engram derives),
and each `blk.{L}.engram_embd.weight` is memory-mapped and dequantized a block of rows at a time
(`gguf_quants.dequantize_rows`), so memory stays bounded whatever the table size. F32, F16 and
BF16 tables are read as they are (float32, float16, bfloat16: exact); quantized ones as float32.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

import numpy as np
import torch
from gguf import GGMLQuantizationType

from ..dtypes import numpy_dtype, to_torch
from ..errors import FormatError, UsageError
from ..spec import TableSpec
from ..vocab import VocabProjection
from .gguf_file import TensorInfo, read_set
from .gguf_format import TOKEN_MAP, gguf_hashing, tensor_name
from .gguf_quants import READ_TYPES, dequantize_rows, row_bytes
from .model_config import check_projection_agrees
from .sources import LayerSource, TableSource

_PLAIN = {
    GGMLQuantizationType.F32: "float32",
    GGMLQuantizationType.F16: "float16",
    GGMLQuantizationType.BF16: "bfloat16",
}


def is_gguf(path: Path) -> bool:
    """A file that starts with the GGUF magic (or is named .gguf)."""
    if path.suffix == ".gguf":
        return True
    try:
        with path.open("rb") as handle:
            return handle.read(4) == b"GGUF"
    except OSError:
        return False


class GgufSource(TableSource):
    """The Engram tables of a GGUF file or split set."""

    format = "gguf"
    layout = "gguf"

    def __init__(
        self, path: Path, spec: TableSpec | None, projection: VocabProjection | None, layers: Iterable[int] | None
    ) -> None:
        header = read_set(path)
        own_spec, own_projection, self.store_dtype = gguf_hashing(header, spec)
        if projection is not None:
            check_projection_agrees(projection, own_projection, f"{path}'s {TOKEN_MAP}")
        chosen = own_spec.layer_ids if layers is None else tuple(int(x) for x in layers)
        self.tables: dict[int, TensorInfo] = {}
        for layer_id in chosen:
            if layer_id not in own_spec.layer_ids:
                raise UsageError(f"{path} has no Engram layer {layer_id} (it has {list(own_spec.layer_ids)})")
            self.tables[layer_id] = self._table(header.tensors, path, own_spec, layer_id)
        super().__init__(own_spec, own_projection, chosen)
        types = {t.qtype for t in self.tables.values()}
        plain = {_PLAIN.get(t, "float32") for t in types}
        self.dtype = plain.pop() if len(plain) == 1 else "float32"

    @staticmethod
    def _table(tensors: dict[str, TensorInfo], path: Path, spec: TableSpec, layer_id: int) -> TensorInfo:
        name = tensor_name(layer_id)
        tensor = tensors.get(name)
        if tensor is None:
            raise FormatError(f"{path} has Engram keys for layer {layer_id} but no tensor {name}")
        expected = (spec.dim, spec.rows(layer_id))
        if tensor.shape != expected:
            raise FormatError(
                f"{path}: tensor {name} has ggml shape {list(tensor.shape)}, but the Engram keys make "
                f"{list(expected)} (key_length, sum of the layer's primes)"
            )
        if tensor.qtype not in READ_TYPES:
            raise FormatError(
                f"{path}: tensor {name} is {tensor.qtype.name}; engram reads {', '.join(t.name for t in READ_TYPES)}"
            )
        return tensor

    def layer(self, layer_id: int) -> LayerSource:
        """The reader of one layer's table: rows memory-mapped and dequantized a block at a time."""
        tensor = self.tables[layer_id]
        dim, rows = tensor.shape
        width = row_bytes(tensor.qtype, dim)
        data = np.memmap(tensor.path, dtype=np.uint8, mode="r", offset=tensor.offset, shape=(rows, width))
        plain = _PLAIN.get(tensor.qtype)
        dtype = self.dtype

        def read(begin: int, end: int) -> torch.Tensor:
            if plain == dtype:  # the file's own values, as they are
                return to_torch(np.array(data[begin:end]).view(numpy_dtype(dtype)))
            return torch.from_numpy(dequantize_rows(data[begin:end], tensor.qtype, dim))

        return LayerSource(layer_id, rows, dim, read)
