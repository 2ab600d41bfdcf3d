"""dtype changes of the tables in an export or import, and the largest change each made.

A conversion is lossless when the dtype stays, widens (bfloat16 or float16 to float32), or starts
from fp8 E4M3; anything else is lossy and announced, with the largest absolute change it made to
a value (measured for fp8 sources too). A conversion to fp8 is not counted here: the export reports
its quantization error instead (`fp8.QuantError`).

An import also counts, per layer, the rows holding a value that is not finite (NaN or inf) and
the rows holding nothing else (`NonFiniteRows`): an fp8 table whose E8M0 scale is 255 (NaN in the
OCP MX specification) dequantizes to NaN, and a row with no finite value is an embedding no model
can use, so such a row refuses the import unless it is asked to keep them.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from ..errors import FormatError, UsageError

_LOSSLESS = {("bfloat16", "float32"), ("float16", "float32")}


def is_lossless(source: str, target: str) -> bool:
    """Whether converting tables from dtype `source` to `target` keeps every value."""
    return source == target or (source, target) in _LOSSLESS or source == "float8_e4m3fn"


@dataclass
class Conversion:
    """A dtype change of the tables, announced when lossy, with the largest change it made."""

    source: str
    target: str
    max_abs_error: float = 0.0

    @property
    def lossy(self) -> bool:
        """Whether the conversion can change values (and is reported as lossy)."""
        return not is_lossless(self.source, self.target) and self.target != "float8_e4m3fn"

    def check(self, before: torch.Tensor, after: torch.Tensor, where: str = "") -> None:
        """Track the largest change, and refuse finite values that became inf or nan (past the
        target's range, as 1e5 in float16): the export would hold other values than the store.
        Values that were already inf or nan stay what they were and are left out of the error."""
        if not ((self.lossy or self.source == "float8_e4m3fn") and before.numel()):
            return
        finite = torch.isfinite(before)
        kept = finite & torch.isfinite(after)
        if not bool(kept.eq(finite).all()):
            lost = finite & ~kept
            largest = float(before[lost].float().abs().max())
            raise UsageError(
                f"{where + ': ' if where else ''}{int(lost.sum()):,} values (up to {largest:.6g} in magnitude) "
                f"are outside the range of {self.target}; export as a wider dtype"
            )
        if bool(kept.any()):
            error = (before.float() - after.float()).abs()[kept].max()
            self.max_abs_error = max(self.max_abs_error, float(error))

    def to_json(self) -> dict[str, Any]:
        """The `conversion` section of the export and import `--json` reports."""
        return {"from": self.source, "to": self.target, "lossy": self.lossy, "max_abs_error": self.max_abs_error}


@dataclass
class NonFiniteRows:
    """Rows of each layer imported that hold a non-finite value (`nonfinite_rows`) and those that
    hold no finite value at all (`all_nonfinite_rows`); with `allow` False, the first window with
    a row of the second kind is refused, naming the layer and row."""

    allow: bool = False
    rows: dict[int, int] = field(default_factory=dict)
    entire: dict[int, int] = field(default_factory=dict)

    def count(self, layer_id: int, begin: int, values: torch.Tensor) -> None:
        """Count the non-finite rows of one window of a layer.

        Args:
            layer_id: the layer.
            begin: the window's first row.
            values: its rows, (rows, dim), as they will be stored.
        """
        finite = torch.isfinite(values.float() if values.element_size() == 1 else values)
        some = int((~finite.all(dim=1)).sum())
        none = ~finite.any(dim=1)
        entire = int(none.sum())
        self.rows[layer_id] = self.rows.get(layer_id, 0) + some
        self.entire[layer_id] = self.entire.get(layer_id, 0) + entire
        if entire and not self.allow:
            first = begin + int(none.nonzero()[0, 0])
            more = f" (and {entire - 1:,} more in rows {begin:,}-{begin + values.shape[0] - 1:,})" if entire > 1 else ""
            raise FormatError(
                f"layer {layer_id}: row {first:,}{more} holds no finite value (NaN or inf; an E8M0 scale of "
                "255 is NaN); pass --allow-nonfinite to import such rows anyway"
            )

    def of(self, layer_id: int) -> dict[str, int]:
        """The counts of one layer, as its entry of the import report has them."""
        return {"nonfinite_rows": self.rows.get(layer_id, 0), "all_nonfinite_rows": self.entire.get(layer_id, 0)}

    def notes(self) -> list[str]:
        """One line for each layer with non-finite rows, for people to see."""
        return [
            f"layer {layer}: {count:,} rows hold non-finite values (NaN or inf), {self.entire.get(layer, 0):,} "
            "of them no finite value at all"
            for layer, count in sorted(self.rows.items())
            if count
        ]
