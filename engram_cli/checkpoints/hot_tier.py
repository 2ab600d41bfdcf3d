"""The hot tier of an inference export: per layer, the rows a corpus reads most, in memory.

`engram export --for inference --hot-rows FILE --hot-bytes SIZE` adds, per layer, the first rows
of a hotness file (`engram_cli.hot_rows`, most looked-up first) that fit SIZE bytes (a row's bytes
at the export's dtype, its E8M0 scales included when fp8), as tensors under the prefix
`engram_hot_tier.`:

- `engram_hot_tier.layers.{L}.rows`: int64 (k,), the rows' ids in the layer's table, in the
  hotness file's order;
- `engram_hot_tier.layers.{L}.slots`: int64 (k,), the mapping a lookup uses: the tier positions
  in ascending row id order (`rows[slots]` is sorted), so a row is found by binary search;
- `engram_hot_tier.layers.{L}.weight`: (k, dim) at the export's dtype, the rows' bytes copied from
  the main table (so a row reads the same from either);
- `engram_hot_tier.layers.{L}.scale`: F8_E8M0 (k, dim / 32), when fp8.

The main tables stay complete, so a reader that ignores the tier reads the export as before. In
the engram layout the tier tensors sit in the export's own file(s) (readers find tables by the
header's `tables`, never by name). In the deepseek-v41 layout they go in a file of their own,
`engram_hot_tier.safetensors` beside the index and not listed in it: vLLM and SGLang load only
the files an index lists, and their loaders would take an unknown tensor name for a weight.

`LayerTier` is the read side: the tier loaded into memory, and a gather (`hot_tier_kernels`) that
takes the rows it holds from there and the rest from the memory-mapped main table, in one pass.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..errors import FormatError, UsageError
from ..helpers import row_blocks
from ..hot_rows import HotRows, read_hot_rows, spec_fingerprint
from ..spec import TableSpec
from ..vocab import VocabProjection
from .fp8 import dequantize
from .fp8_format import BLOCK

PREFIX = "engram_hot_tier."
TIER_FILE = "engram_hot_tier.safetensors"  # the deepseek-v41 layout's tier, beside its index


def tier_key(layer_id: int, part: str) -> str:
    """The name of one tier tensor of a layer: part is rows, slots, weight or scale."""
    return f"{PREFIX}layers.{layer_id}.{part}"


def is_tier_tensor(name: str) -> bool:
    """A tensor of the hot tier (never a table, whatever the layout)."""
    return name.startswith(PREFIX)


def choose_hot_rows(
    path: str | Path, spec: TableSpec, projection: VocabProjection, row_bytes: int, hot_bytes: int | None
) -> dict[int, np.ndarray]:
    """Per layer, the hot rows of the file at `path` that fit `hot_bytes` (None: all it lists),
    in its order; a file of another spec or projection, or one naming rows the tables lack, is
    a one-line error.

    Args:
        path: the hotness file.
        spec, projection: the tables' (compared by fingerprint with the file's).
        row_bytes: a tier row's bytes at the export's dtype (scales included).
        hot_bytes: the tier's bytes per layer.
    """
    if hot_bytes is not None and hot_bytes < row_bytes:
        raise UsageError(f"--hot-bytes {hot_bytes} holds no row of {row_bytes} bytes; give at least {row_bytes}")
    hot: HotRows = read_hot_rows(path)
    if hot.spec_fingerprint != spec_fingerprint(spec):
        raise UsageError(
            f"hot-rows file {path} was counted for spec {hot.spec_name!r}, whose rows differ from the store's "
            f"({spec.name!r}); count it with this store's spec"
        )
    if hot.projection_fingerprint != projection.fingerprint():
        raise UsageError(
            f"hot-rows file {path} was counted with another vocab projection than the store's; "
            "count it with this store's projection"
        )
    chosen = {}
    for layer in spec.layer_ids:
        rows = hot.rows.get(layer)
        if rows is None or not rows.size:
            continue
        if int(rows.max()) >= spec.rows(layer):
            raise FormatError(
                f"hot-rows file {path}: layer {layer} names row {int(rows.max())} of a {spec.rows(layer)}-row table"
            )
        k = rows.size if hot_bytes is None else min(rows.size, hot_bytes // row_bytes)
        chosen[layer] = rows[:k].copy()
    return chosen


@dataclass
class TierTraffic:
    """Rows gathered since the tables were opened: from the hot tier (hits) or the main tables
    (misses), in all and per layer (`{layer: {"hits": h, "misses": m}}`)."""

    hits: int = 0
    misses: int = 0
    layers: dict[int, dict[str, int]] = field(default_factory=dict)

    @property
    def hit_rate(self) -> float:
        """hits / (hits + misses); 0.0 before any lookup."""
        total = self.hits + self.misses
        return self.hits / total if total else 0.0


@dataclass
class LayerTier:
    """One layer's tier in memory: the rows in ascending order, their tier slots, the values."""

    sorted_rows: torch.Tensor
    slots: torch.Tensor
    weight: torch.Tensor
    scale: torch.Tensor | None

    @classmethod
    def load(cls, tensors: Any, layer_id: int, table_rows: int, dim: int, fp8: bool, where: str) -> LayerTier:
        """A layer's tier from `tensors` (name -> tensor), copied into memory and checked: rows of
        the table, distinct, slots that sort them, values as wide as the table."""
        rows = tensors(tier_key(layer_id, "rows")).clone()
        slots = tensors(tier_key(layer_id, "slots")).clone()
        weight = tensors(tier_key(layer_id, "weight")).clone()
        scale = tensors(tier_key(layer_id, "scale")).clone() if fp8 else None
        k = rows.shape[0]
        shapes_ok = (
            rows.dtype == slots.dtype == torch.int64
            and rows.dim() == slots.dim() == 1
            and slots.shape[0] == k
            and tuple(weight.shape) == (k, dim)
            and (scale is None or tuple(scale.shape) == (k, dim // BLOCK))
        )
        if not shapes_ok:
            raise FormatError(f"{where}: the hot tier of layer {layer_id} has tensors of mismatched shapes or dtypes")
        if k and not (bool((slots >= 0).all()) and bool((slots < k).all())):
            raise FormatError(f"{where}: the hot tier of layer {layer_id} has slots outside its {k} rows")
        sorted_rows = rows[slots] if k else rows
        if k and (
            int(sorted_rows[0]) < 0 or int(sorted_rows[-1]) >= table_rows or bool((sorted_rows.diff() <= 0).any())
        ):
            raise FormatError(f"{where}: the hot tier of layer {layer_id} does not map distinct rows of its table")
        return cls(sorted_rows, slots, weight, scale)

    def gather(
        self, flat: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor | None, threads: int = 1
    ) -> tuple[torch.Tensor, int]:
        """Rows `flat` of a layer whose mapped table is `weight` (and `scale`, when fp8): those of
        the tier from memory, the rest from the table, byte for byte, the ids split between
        `threads` threads; fp8 rows dequantized to bfloat16 as the untiered gather does. Returns
        the rows and the hits."""
        from .hot_tier_kernels import gather_tiered

        ids = flat.numpy()
        parts = list(row_blocks(ids.size, max(1, -(-ids.size // threads))))

        def picked(tier: torch.Tensor, main: torch.Tensor) -> tuple[torch.Tensor, int]:
            out = torch.empty(ids.size, main.shape[1], dtype=main.dtype)
            word = _word(main.shape[1] * main.element_size())  # rows copied in words, not bytes
            arrays = (self.sorted_rows.numpy(), self.slots.numpy(), tier.view(torch.uint8).numpy().view(word))
            table, into = main.view(torch.uint8).numpy().view(word), out.view(torch.uint8).numpy().view(word)

            def run(part: tuple[int, int]) -> int:
                a, b = part
                return int(gather_tiered(*arrays, table, ids[a:b], into[a:b]))

            if len(parts) > 1:
                with ThreadPoolExecutor(len(parts)) as pool:
                    return out, sum(pool.map(run, parts))
            return out, sum(run(part) for part in parts)

        rows, hits = picked(self.weight, weight)
        if scale is None or self.scale is None:
            return rows, hits
        scales, _ = picked(self.scale, scale)
        return dequantize(rows, scales), hits


def _word(row_bytes: int) -> type[np.unsignedinteger]:
    """The widest unsigned integer whose size divides a row's bytes."""
    for word in (np.uint64, np.uint32, np.uint16):
        if row_bytes % np.dtype(word).itemsize == 0:
            return word
    return np.uint8
