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

from dataclasses import dataclass
from typing import Any

import torch

_LOSSLESS = {("bfloat16", "float32"), ("float16", "float32")}


def is_lossless(source: str, target: str) -> bool:
    return source == target or (source, target) in _LOSSLESS or source == "float8_e4m3fn"


@dataclass
class Conversion:
    """A dtype change of the tables, announced when lossy, with the largest change it made."""

    source: str
    target: str
    max_abs_error: float = 0.0

    @property
    def lossy(self) -> bool:
        return not is_lossless(self.source, self.target) and self.target != "float8_e4m3fn"

    def check(self, before: torch.Tensor, after: torch.Tensor) -> None:
        if (self.lossy or self.source == "float8_e4m3fn") and before.numel():
            error = (before.float() - after.float()).abs().max()
            self.max_abs_error = max(self.max_abs_error, float(error))

    def to_json(self) -> dict[str, Any]:
        return {"from": self.source, "to": self.target, "lossy": self.lossy, "max_abs_error": self.max_abs_error}
