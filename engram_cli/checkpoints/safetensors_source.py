"""An inference export (either layout) or a DeepSeek-V4.1 model folder read back as a
`TableSource`, for `engram import`.

Tables are read through `EngramTables`' memory maps; fp8 ones are dequantized to float32 a block
at a time (float32(e4m3) * 2**(scale - 127), as the engines do). A deepseek-v41 set carries no
hashing tensors: its spec and projection come from its folder's `engram_*` config keys and
tokenizer.json (`model_config.model_hashing`), or from those given.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path

import torch

from ..dtypes import STORE_DTYPES, from_torch
from ..errors import EngramError
from ..spec import TableSpec, spec_from_dict
from ..vocab import VocabProjection
from .fp8 import dequantize, warm_dequantize
from .metadata import check_given
from .model_config import model_hashing
from .sources import LayerSource, Sharding, TableSource
from .tables import EngramTables


class SafetensorsSource(TableSource):
    """An inference export (either layout), or a DeepSeek-V4.1 model folder, read back as a table
    source for `engram import`."""

    format = "safetensors"

    def __init__(self, tables: EngramTables, layers: Iterable[int] | None, where: str) -> None:
        assert tables.spec is not None and tables.projection is not None, "resolved by open_safetensors_source"
        chosen = tables.layer_ids if layers is None else tuple(int(x) for x in layers)
        for layer_id in chosen:
            tables.weight(layer_id)
        super().__init__(tables.spec, tables.projection, chosen)
        self.tables = tables
        stored = tables.metadata
        self.store_dtype = spec_from_dict(json.loads(stored["spec"])).dtype if "spec" in stored else None
        self.sharding = Sharding.recorded(json.loads(stored.get("sharding", "null")), where)
        self.layout = "deepseek-v41" if tables.layout == "deepseek-v41" else "engram"
        self.dtype = "float8_e4m3fn" if tables.quantized else _name_of(tables.weight(chosen[0]).dtype)
        if tables.quantized:
            warm_dequantize()  # compiled before the import's clock starts

    def layer(self, layer_id: int) -> LayerSource:
        """The reader of one layer's table (fp8 blocks dequantized to float32)."""
        tables = self.tables
        weight, scale = tables.weight(layer_id), tables.scale(layer_id)

        def read(begin: int, end: int) -> torch.Tensor:
            if scale is None:
                return weight[begin:end].clone()
            return dequantize(weight[begin:end], scale[begin:end], torch.float32)

        return LayerSource(layer_id, int(weight.shape[0]), int(weight.shape[1]), read)


def _name_of(dtype: torch.dtype) -> str:
    name = from_torch(dtype).name
    if name in STORE_DTYPES:
        return name
    raise EngramError(f"tables of dtype {dtype} cannot go into a store")


def open_safetensors_source(
    path: Path, spec: TableSpec | None, projection: VocabProjection | None, layers: Iterable[int] | None
) -> SafetensorsSource:
    """An engram export as it describes itself (or as `spec`/`projection` say); a deepseek-v41 set
    (a model folder, or `engram export --layout deepseek-v41`) hashed as `model_hashing` finds.

    Args:
        path: a .safetensors file, an index json, or a folder holding either.
        spec, projection: what the tables are (for a deepseek-v41 set without config keys or
            tokenizer; checked against those it has).
        layers: read only these layers (default: all of them).
    """
    tables = EngramTables.open(path, spec=None, projection=None)
    if tables.layout == "deepseek-v41":
        spec, projection = model_hashing(path if path.is_dir() else path.parent, spec, projection)
        return SafetensorsSource(tables.with_hashing(spec, projection), layers, str(path))
    # an engram export hashes as it records: a given spec or projection need only agree with that
    assert tables.spec is not None, "an engram export records its spec"
    fingerprint = json.loads(tables.metadata.get("projection", "{}")).get("fingerprint")
    check_given(tables.spec, fingerprint, spec, projection, str(path))
    return SafetensorsSource(tables, layers, str(path))
