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

from ..errors import FormatError, UsageError
from ..spec import TableSpec
from ..tokenizer import zip_bytes
from ..vocab import VocabProjection
from .keys import LOOKUP_KEY, META_KEY, TOKENIZER_ZIP_KEY, meta_keys
from .sources import TableSource

__all__ = ["META_KEY", "check_given", "check_meta_tensors", "hashing_arrays", "meta_tensors"]


def hashing_arrays(source: TableSource) -> dict[str, np.ndarray]:
    """What the hasher needs, under its checkpoint keys: per layer the head sizes, offsets and
    multipliers (int64), the projection's lookup (int64) and its deflated tokenizer (uint8)."""
    spec, projection = source.spec, source.projection
    arrays: dict[str, np.ndarray] = {}
    for layer_id in source.layer_ids:
        keys = meta_keys(layer_id)
        for part, values in spec.layer_hashing(layer_id, projection.compressed_size).items():
            arrays[keys[part]] = np.array(values, dtype=np.int64)
    arrays[LOOKUP_KEY] = projection.lookup
    if projection.tokenizer_json is not None:
        arrays[TOKENIZER_ZIP_KEY] = np.frombuffer(zip_bytes(projection.tokenizer_json), np.uint8)
    return arrays


def meta_tensors(source: TableSource, meta: dict[str, Any]) -> dict[str, torch.Tensor]:
    """`engram.meta` and the hashing arrays as tensors, so nothing but the checkpoint is needed."""
    small = {META_KEY: torch.frombuffer(bytearray(json.dumps(meta).encode()), dtype=torch.uint8)}
    small.update({key: torch.from_numpy(value.copy()) for key, value in hashing_arrays(source).items()})
    return small


def check_given(
    recorded_spec: TableSpec,
    recorded_fingerprint: str | None,
    spec: TableSpec | None,
    projection: VocabProjection | None,
    where: str,
) -> None:
    """Refuse a spec or projection given for a checkpoint that records its own and differs
    from it: the tables were hashed with the recorded ones (a different seed, say, gives other
    multipliers). Only the hashing part of a spec ([engram]) must agree."""
    from ..store.attributes import spec_difference

    if spec is not None:
        diff = spec_difference(
            recorded_spec.to_dict()["engram"],
            spec.to_dict()["engram"],
            "engram.",
            ("in the spec the checkpoint records", "in --spec"),
        )
        if diff:
            raise UsageError(
                f"{where} records its own spec and --spec differs: {diff}; drop --spec "
                "(it is for checkpoints that carry none)"
            )
    if projection is not None and recorded_fingerprint is not None and projection.fingerprint() != recorded_fingerprint:
        raise UsageError(
            f"{where} records its own projection (lookup sha256 {recorded_fingerprint[:12]}...) and "
            f"--projection is another one ({projection.fingerprint()[:12]}...); drop --projection "
            "(it is for checkpoints that carry none)"
        )


def check_meta_tensors(values: dict[str, Any], spec: TableSpec, compressed_size: int, where: str) -> None:
    """Refuse hashing metadata tensors (head sizes, offsets, multipliers per layer) that
    disagree with the spec the same file records."""
    derived: dict[int, dict[str, list[int]]] = {}
    for name, value in values.items():
        layer_id, part = int(name.split(".")[2]), name.split(".")[3]
        if layer_id not in derived:
            derived[layer_id] = spec.layer_hashing(layer_id, compressed_size)
        expected = derived[layer_id][part]
        found = [int(v) for v in np.asarray(value).reshape(-1)]
        if found != expected:
            raise FormatError(f"{where}: {name} holds {found[:4]}... but the spec it records gives {expected[:4]}...")
