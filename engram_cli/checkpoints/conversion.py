"""dtype changes of the tables in an export or import, and the largest change each made.

A conversion is lossless when the dtype stays, widens (bfloat16 or float16 to float32), or starts
from fp8 E4M3; anything else is lossy and announced, with the largest absolute change it made to
a value (measured for fp8 sources too). A conversion to fp8 is not counted here: the export reports
its quantization error instead (`fp8.QuantError`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from ..errors import UsageError

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
