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

import contextlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

from ..helpers import human_bytes
from .sources import TableSource


@contextlib.contextmanager
def store_progress(source: TableSource, verb: str, show: bool) -> Iterator[Callable[[int], None]]:
    """A rows progress bar over every layer of `source` (silent when stderr is no terminal)."""
    from ..cli.render import progress

    bar = progress()
    bar.disable = bar.disable or not show
    with bar:
        task = bar.add_task(verb, total=sum(source.spec.rows(layer) for layer in source.layer_ids))
        yield lambda rows: bar.update(task, advance=rows)


@dataclass
class ExportReport:
    """What `engram export` wrote, how fast, and what the dtype change cost."""

    target: str
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

    def to_json(self) -> dict[str, Any]:
        return {
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
        }

    def render(self, console: Any) -> None:
        rate = f"{human_bytes(self.bytes / self.seconds)}/s" if self.seconds else "-"
        what = (
            f"DCP checkpoint, {_count(self.shards or 0, 'row piece')} per tensor"
            + (", one tensor per head" if self.per_head else "")
            if self.target == "training"
            else f"safetensors, {self.layout} layout"
        )
        console.print(
            f"exported {self.store} -> {self.output} ({what}): {_count(len(self.layers), 'layer')}, "
            f"{self.dtype}, {_count(len(self.files), 'file')}, {human_bytes(self.bytes)} in "
            f"{self.seconds:.1f} s ({rate})"
        )
        render_conversion(console, self.conversion)
        if self.quantization:
            q = self.quantization
            console.print(
                f"fp8 E4M3 with E8M0 scales per 32 values: error relative to the block max "
                f"{q['max_relative']:.4f} max, {q['rms_relative']:.4f} RMS"
            )


def _count(n: int, noun: str) -> str:
    return f"{n} {noun}{'' if n == 1 else 's'}"


def render_conversion(console: Any, conversion: dict[str, Any]) -> None:
    if conversion["lossy"]:
        console.print(
            f"[yellow]lossy conversion {conversion['from']} -> {conversion['to']}[/]: "
            f"largest change {conversion['max_abs_error']:.3g}"
        )


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

    def render(self, console: Any) -> None:
        console.print(
            f"imported {self.checkpoint} ({self.format}, {self.layout}) -> {self.store}: "
            f"layers {', '.join(map(str, self.layers))}, {self.source_dtype} -> {self.dtype}, "
            f"{human_bytes(self.bytes)} in {self.seconds:.1f} s"
        )
        render_conversion(console, self.conversion)
        for note in self.notes:
            console.print(f"[yellow]{note}[/]")
