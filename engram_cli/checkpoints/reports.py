"""The reports of `engram export` and `engram import`: plain data whose `to_json()` is the `--json` output."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

ExportTarget = Literal["training", "inference"]  # DCP for training, safetensors for inference


@dataclass
class ExportReport:
    """What `engram export` wrote, how fast, and what the dtype change cost."""

    target: ExportTarget
    layout: str
    output: str
    store: str
    dtype: str
    source_dtype: str
    files: list[str]
    index: bool
    layers: dict[int, dict[str, Any]]
    bytes: int
    seconds: float
    conversion: dict[str, Any]
    quantization: dict[str, float] | None = None
    shards: int | None = None
    per_head: bool = False
    config: str | None = None  # engram_config.json beside a deepseek-v41 export
    hot_tier: dict[int, dict[str, int]] | None = None  # layer -> rows and bytes of its hot tier, when one was asked for

    def to_json(self) -> dict[str, Any]:
        """The `engram export --json` output (`hot_tier` only for an export with one)."""
        result = {
            "target": self.target,
            "layout": self.layout,
            "output": self.output,
            "store": self.store,
            "dtype": self.dtype,
            "source_dtype": self.source_dtype,
            "files": self.files,
            "index": self.index,
            "shards": self.shards,
            "per_head": self.per_head,
            "layers": {str(k): v for k, v in self.layers.items()},
            "bytes": self.bytes,
            "seconds": round(self.seconds, 3),
            "bytes_per_second": round(self.bytes / self.seconds) if self.seconds else 0,
            "conversion": self.conversion,
            "quantization": self.quantization,
            "config": self.config,
        }
        if self.hot_tier is not None:
            result["hot_tier"] = {str(k): v for k, v in self.hot_tier.items()}
        return result


@dataclass
class ImportReport:
    """What `engram import` read and the store it wrote."""

    checkpoint: str
    format: str
    layout: str
    store: str
    dtype: str
    source_dtype: str
    layers: dict[int, dict[str, Any]]
    complete: bool
    bytes: int
    seconds: float
    conversion: dict[str, Any]
    notes: list[str] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        """The `engram import --json` output."""
        return {
            "checkpoint": self.checkpoint,
            "format": self.format,
            "layout": self.layout,
            "store": self.store,
            "dtype": self.dtype,
            "source_dtype": self.source_dtype,
            "layers": {str(k): v for k, v in self.layers.items()},
            "complete": self.complete,
            "bytes": self.bytes,
            "seconds": round(self.seconds, 3),
            "conversion": self.conversion,
            "notes": self.notes,
        }
