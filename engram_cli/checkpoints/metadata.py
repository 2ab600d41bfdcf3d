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

import numpy as np
import torch

from ..tokenizer import zip_bytes
from .keys import LOOKUP_KEY, TOKENIZER_ZIP_KEY, meta_keys
from .sources import TableSource

META_KEY = "engram.meta"


def hashing_arrays(source: TableSource) -> dict[str, np.ndarray]:
    """What the hasher needs, under its checkpoint keys: per layer the head sizes, offsets and
    multipliers (int64), the projection's lookup (int64) and its deflated tokenizer (uint8)."""
    spec, projection = source.spec, source.projection
    arrays: dict[str, np.ndarray] = {}
    for layer_id in source.layer_ids:
        keys = meta_keys(layer_id)
        arrays[keys["head_sizes"]] = np.array(spec.head_sizes(layer_id), dtype=np.int64)
        arrays[keys["offsets"]] = np.array(spec.offsets(layer_id), dtype=np.int64)
        arrays[keys["multipliers"]] = spec.multipliers(layer_id, projection.compressed_size)
    arrays[LOOKUP_KEY] = projection.lookup
    if projection.tokenizer_json is not None:
        arrays[TOKENIZER_ZIP_KEY] = np.frombuffer(zip_bytes(projection.tokenizer_json), np.uint8)
    return arrays


def meta_tensors(source: TableSource, meta: dict[str, Any]) -> dict[str, torch.Tensor]:
    """`engram.meta` and the hashing arrays as tensors, so nothing but the checkpoint is needed."""
    small = {META_KEY: torch.frombuffer(bytearray(json.dumps(meta).encode()), dtype=torch.uint8)}
    small.update({key: torch.from_numpy(value.copy()) for key, value in hashing_arrays(source).items()})
    return small
