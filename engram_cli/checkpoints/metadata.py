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
