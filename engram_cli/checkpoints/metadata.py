"""The hashing metadata that rides along a training checkpoint as small tensors under `engram.*`.

`engram.meta` is the checkpoint's own description as UTF-8 JSON in a uint8 tensor (format
"engram-dcp", spec, dtypes, per_head and the key template, per layer the keys and row ranges of
its tensors, the store's sharding, the projection's metadata and fingerprint);
`engram.layers.{L}.head_sizes`, `.offsets` and `.multipliers` (int64), `engram.projection.lookup`
(int64) and `engram.projection.tokenizer_zip` (uint8, the deflated tokenizer.json) are what the
hasher needs, so training code can rebuild it from the checkpoint alone. The engram safetensors
layout carries the same tensors but `engram.meta`, whose place its header metadata takes
(`layouts`).
"""

from __future__ import annotations

import json
from typing import Any

import torch

from .sources import TableSource

META_KEY = "engram.meta"


def meta_tensors(source: TableSource, meta: dict[str, Any]) -> dict[str, torch.Tensor]:
    """The hashing metadata as small tensors, so nothing but the checkpoint is needed."""
    from ..tokenizer import zip_bytes

    spec, projection = source.spec, source.projection
    small = {META_KEY: torch.frombuffer(bytearray(json.dumps(meta).encode()), dtype=torch.uint8)}
    for layer_id in source.layer_ids:
        small[f"engram.layers.{layer_id}.head_sizes"] = torch.tensor(spec.head_sizes(layer_id), dtype=torch.int64)
        small[f"engram.layers.{layer_id}.offsets"] = torch.tensor(spec.offsets(layer_id), dtype=torch.int64)
        small[f"engram.layers.{layer_id}.multipliers"] = torch.from_numpy(
            spec.multipliers(layer_id, projection.compressed_size)
        )
    small["engram.projection.lookup"] = torch.from_numpy(projection.lookup.copy())
    if projection.tokenizer_json is not None:
        small["engram.projection.tokenizer_zip"] = torch.frombuffer(
            bytearray(zip_bytes(projection.tokenizer_json)), dtype=torch.uint8
        )
    return small
