"""`engram plan`: rows, parameters and bytes of a spec, per layer and in total, for every table dtype.

Computed from the spec alone (the prime walk of its head sizes), so a table size can be checked
before anything is built.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from .dtypes import DTYPE_BYTES
from .spec import TableSpec


@dataclass
class PlanReport:
    """Rows, parameters and bytes of a spec, per layer and in total, for every dtype."""

    spec: TableSpec

    def layer(self, layer_id: int) -> dict[str, Any]:
        """Rows, parameters, bytes per dtype and head sizes of one layer."""
        rows = self.spec.rows(layer_id)
        params = rows * self.spec.dim
        return {
            "rows": rows,
            "parameters": params,
            "bytes": {dtype: params * size for dtype, size in DTYPE_BYTES.items()},
            "head_sizes": self.spec.head_sizes(layer_id),
        }

    def to_json(self) -> dict[str, Any]:
        """The `engram plan --json` output."""
        spec = self.spec
        return {
            "spec": spec.to_dict(),
            "dim": spec.dim,
            "layers": {str(layer): self.layer(layer) for layer in spec.layer_ids},
            "total": {
                "rows": spec.total_rows,
                "parameters": spec.parameters,
                "bytes": {dtype: spec.parameters * size for dtype, size in DTYPE_BYTES.items()},
            },
        }
