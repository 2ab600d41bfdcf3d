"""What collision statistics report: per head, per order and layer, per sweep point.

The ideal rate is what uniform hashing would give: 1 - (1 - 1/size)**(distinct - 1). The JSON of
each report is what `engram inspect --json` writes under `layers` and `sweep`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np

from ..dtypes import DTYPE_BYTES
from ..spec import TableSpec


@dataclass
class HeadStats:
    """Collisions in one head: buckets used, distinct n-grams sharing a bucket, and the load histogram."""

    size: int
    buckets_used: int
    colliding: int
    collision_rate: float
    expected_rate: float
    weighted_rate: float
    max_load: int
    load_histogram: dict[int, int]

    def to_json(self) -> dict[str, Any]:
        """One head's entry under `heads` in `engram inspect --json`."""
        return {
            "size": self.size,
            "buckets_used": self.buckets_used,
            "colliding": self.colliding,
            "collision_rate": self.collision_rate,
            "expected_rate": self.expected_rate,
            "weighted_rate": self.weighted_rate,
            "max_load": self.max_load,
            "load_histogram": {str(k): v for k, v in self.load_histogram.items()},
        }


@dataclass
class OrderStats:
    """Collisions of one order of one layer: every head, and the n-grams that collide in all of them."""

    order: int
    occurrences: int
    distinct: int
    mix_colliding: int
    all_heads_colliding: int
    heads: list[HeadStats]
    top_buckets: list[dict[str, Any]] | None = None

    def mean(self, name: str) -> float:
        """The mean of one `HeadStats` field over the heads."""
        return float(np.mean([getattr(h, name) for h in self.heads]))

    def to_json(self) -> dict[str, Any]:
        """One order's entry under `orders` in `engram inspect --json`."""
        data = {
            "occurrences": self.occurrences,
            "distinct": self.distinct,
            "mix_colliding": self.mix_colliding,
            "all_heads_colliding": self.all_heads_colliding,
            "all_heads_rate": self.all_heads_colliding / self.distinct if self.distinct else 0.0,
            "collision_rate": self.mean("collision_rate"),
            "expected_rate": self.mean("expected_rate"),
            "weighted_rate": self.mean("weighted_rate"),
            "heads": [h.to_json() for h in self.heads],
        }
        if self.top_buckets is not None:
            data["top_buckets"] = self.top_buckets
        return data


LayerStats = dict[int, dict[int, OrderStats]]  # layer id -> order -> statistics


def expected_rate(size: int, distinct: int) -> float:
    """Chance that an n-gram shares its bucket when `distinct` n-grams hash uniformly into `size`."""
    if distinct <= 1:
        return 0.0
    return float(-math.expm1((distinct - 1) * math.log1p(-1.0 / size))) if size > 1 else 1.0


@dataclass
class SweepPoint:
    """The statistics of every layer at one sweep factor, and the scaled spec."""

    factor: float
    spec: TableSpec
    layers: LayerStats

    def to_json(self) -> dict[str, Any]:
        """One entry of `sweep` in `engram inspect --json`."""
        return {
            "factor": self.factor,
            "rows": self.spec.total_rows,
            "parameters": self.spec.parameters,
            "bytes": self.spec.parameters * DTYPE_BYTES[self.spec.dtype],
            "layers": layers_json(self.layers),
        }


def layers_json(layers: LayerStats) -> dict[str, Any]:
    """Statistics per layer and order as `engram inspect --json` writes them."""
    return {
        str(layer): {"orders": {str(n): s.to_json() for n, s in orders.items()}} for layer, orders in layers.items()
    }
