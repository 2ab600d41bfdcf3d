"""Table health: value statistics of every head of a store, with its layout and bytes on disk.

Each layer is read shard by shard (every chunk's checksum checked on the way) and each head's
values summed in float64: mean, standard deviation and largest magnitude of the finite values,
and how many are not finite (what a bad init or a broken import shows first). Shards that are
missing are listed and their rows counted as unread, so an interrupted build can still be
inspected. With `verify`, every shard is read and checked first (`TableStore.verify`).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numba
import numpy as np

from .tables import TableStore


@numba.njit(nogil=True, cache=True)
def _value_moments(values, out):
    """Accumulate sum, sum of squares, max |x| of finite values, and the non-finite count."""
    total, squares, peak, bad = out[0], out[1], out[2], out[3]
    for x in values:
        v = np.float64(x)
        if math.isfinite(v):
            total += v
            squares += v * v
            if abs(v) > peak:
                peak = abs(v)
        else:
            bad += 1
    out[0], out[1], out[2], out[3] = total, squares, peak, bad


@dataclass
class TableHealth:
    """Value statistics of every head of a store, with its layout and bytes on disk."""

    store: str
    dtype: str
    complete: bool
    layers: dict[int, dict[str, Any]]
    verify: dict[str, Any] | None = None

    def to_json(self) -> dict[str, Any]:
        """The `tables` section of `engram inspect --json`."""
        return {
            "store": self.store,
            "dtype": self.dtype,
            "complete": self.complete,
            "layers": {str(k): v for k, v in self.layers.items()},
            "verify": self.verify,
        }


def _head_values(
    store: Any, layer_id: int, missing: set[tuple[int, int]], on_rows: Callable[[int], None] | None
) -> list[dict[str, Any]]:
    """Mean, std, max |x| and non-finite count of every head, reading the layer shard by shard."""
    sizes = store.head_sizes(layer_id)
    offsets = store.offsets(layer_id)
    per_order = store.spec.n_head_per_ngram
    moments = np.zeros((len(sizes), 4), np.float64)
    unread = np.zeros(len(sizes), np.int64)
    for index, (start, stop) in enumerate(store.shard_ranges(layer_id)):
        rows = None if (layer_id, index) in missing else store.read_rows(layer_id, start, stop)
        for h, (size, off) in enumerate(zip(sizes, offsets)):
            a, b = max(start, off), min(stop, off + size)
            if a >= b:
                continue
            if rows is None:
                unread[h] += b - a
                continue
            block = rows[a - start : b - start]
            if block.dtype != np.float32:
                block = block.astype(np.float32)
            _value_moments(block.reshape(-1), moments[h])
        if on_rows:
            on_rows(stop - start)
    dim = store.spec.dim
    heads = []
    for h, (size, off) in enumerate(zip(sizes, offsets)):
        total, squares, peak, bad = moments[h]
        finite = (size - unread[h]) * dim - bad
        mean = total / finite if finite else None
        std = math.sqrt(max(0.0, squares / finite - mean * mean)) if mean is not None else None
        heads.append(
            {
                "order": 2 + h // per_order,
                "head": h % per_order,
                "offset": off,
                "size": size,
                "mean": mean,
                "std": std,
                "max_abs": float(peak),
                "nonfinite": int(bad),
                "unread_rows": int(unread[h]),
            }
        )
    return heads


def table_health(store: TableStore, verify: bool = False, on_rows: Callable[[int], None] | None = None) -> TableHealth:
    """The health of every layer of a store (complete or not).

    Args:
        store: an opened store.
        verify: first read every shard and check every checksum.
        on_rows: called with the rows of each shard read, for progress.
    """
    checked = None
    if verify:
        checked = store.verify().to_json()
    layers = {}
    missing = store.missing_shards()
    absent = set(missing)
    for layer_id in store.layer_ids:
        table = store.table(layer_id)
        layers[layer_id] = {
            "rows": store.layout(layer_id).rows,
            "dim": store.spec.dim,
            "bytes_on_disk": int(table.nbytes_stored()),
            "shard_plan": store.layout(layer_id).to_json(),
            "missing_shards": [index for layer, index in missing if layer == layer_id],
            "heads": _head_values(store, layer_id, absent, on_rows),
        }
    return TableHealth(store.path, store.dtype, store.is_complete and not missing, layers, checked)
