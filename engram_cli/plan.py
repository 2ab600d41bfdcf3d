"""Table specs: the single source of truth for head sizes, offsets and multipliers.

A spec is a small TOML file that uses the reference EngramConfig's own field
names, so users can copy their training config into it unchanged.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from .dtypes import DTYPE_BYTES
from .helpers import human_bytes
from .spec import TableSpec


@dataclass
class PlanReport:
    """Rows, parameters and bytes of a spec, per layer and in total, for every dtype."""

    spec: TableSpec

    def _layer(self, layer_id: int) -> dict[str, Any]:
        rows = self.spec.rows(layer_id)
        params = rows * self.spec.dim
        return {
            "rows": rows,
            "parameters": params,
            "bytes": {dtype: params * size for dtype, size in DTYPE_BYTES.items()},
            "head_sizes": self.spec.head_sizes(layer_id),
        }

    def to_json(self) -> dict[str, Any]:
        spec = self.spec
        return {
            "spec": spec.to_dict(),
            "dim": spec.dim,
            "layers": {str(layer): self._layer(layer) for layer in spec.layer_ids},
            "total": {
                "rows": spec.total_rows,
                "parameters": spec.parameters,
                "bytes": {dtype: spec.parameters * size for dtype, size in DTYPE_BYTES.items()},
            },
        }

    def render(self, console: Any) -> None:
        from rich.table import Table

        spec = self.spec
        table = Table(
            title=f"{spec.name}: {len(spec.layer_ids)} layers, orders 2..{spec.max_ngram_size}, "
            f"{spec.n_head_per_ngram} heads per order, {spec.dim} dims per head"
        )
        for column in ("layer", "rows", "parameters", *DTYPE_BYTES):
            table.add_column(column, justify="right")
        for layer in spec.layer_ids:
            info = self._layer(layer)
            table.add_row(
                str(layer),
                f"{info['rows']:,}",
                f"{info['parameters']:,}",
                *(human_bytes(b) for b in info["bytes"].values()),
            )
        table.add_row(
            "total",
            f"{spec.total_rows:,}",
            f"{spec.parameters:,}",
            *(human_bytes(spec.parameters * s) for s in DTYPE_BYTES.values()),
            style="bold",
        )
        console.print(table)
