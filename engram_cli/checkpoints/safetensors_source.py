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
from collections.abc import Iterable
from pathlib import Path

import torch

from ..dtypes import STORE_DTYPES, from_torch
from ..errors import EngramError
from ..spec import TableSpec, spec_from_dict
from ..vocab import VocabProjection
from .fp8 import dequantize
from .sources import LayerSource, TableSource
from .tables import EngramTables


class SafetensorsSource(TableSource):
    """An inference export (either layout) read back as a table source, for `engram import`."""

    def __init__(self, tables: EngramTables, layers: Iterable[int] | None) -> None:
        if tables.spec is None or tables.projection is None:
            raise EngramError(
                f"{tables.path} is in the deepseek-v41 layout, which carries no hashing "
                "metadata: pass --spec and --projection (e.g. --spec deepseek-v4.1-flash)"
            )
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
    name = from_torch(dtype).name
    if name in STORE_DTYPES:
        return name
    raise EngramError(f"tables of dtype {dtype} cannot go into a store")


def open_safetensors_source(
    path: Path, spec: TableSpec | None, projection: VocabProjection | None, layers: Iterable[int] | None
) -> SafetensorsSource:
    return SafetensorsSource(EngramTables.open(path, spec=spec, projection=projection), layers)
