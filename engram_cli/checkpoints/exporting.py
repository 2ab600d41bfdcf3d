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

from pathlib import Path

from ..errors import EngramError
from .dcp import export_training
from .reports import ExportReport


def export_store(
    store: str | Path,
    output: str | Path,
    *,
    target: str,
    shards: int | None = None,
    key_template: str | None = None,
    per_head: bool = False,
    dtype: str | None = None,
    layout: str | None = None,
    max_shard_size: str | None = None,
    overwrite: bool = False,
    show_progress: bool = True,
    scheduler: str | None = None,
    dask_workers: int | None = None,
) -> ExportReport:
    """`engram export`: a DCP checkpoint (`target="training"`) or safetensors (`"inference"`)."""
    if target == "training":
        if layout is not None or max_shard_size is not None:
            raise EngramError("--layout and --max-shard-size apply to --for inference")
        if scheduler or dask_workers:
            raise EngramError(
                "--scheduler and --dask-workers apply to --for inference; a training "
                "export is written by DCP's own writer"
            )
        return export_training(
            store,
            output,
            shards=shards,
            key_template=key_template,
            per_head=per_head,
            dtype=dtype,
            overwrite=overwrite,
            show_progress=show_progress,
        )
    if target == "inference":
        if shards is not None or per_head:
            raise EngramError("--shards and --per-head apply to --for training")
        from .safetensors_export import export_inference

        return export_inference(
            store,
            output,
            dtype=dtype,
            layout=layout or "engram",
            max_shard_size=max_shard_size or "5GB",
            key_template=key_template,
            overwrite=overwrite,
            show_progress=show_progress,
            scheduler=scheduler,
            dask_workers=dask_workers,
        )
    raise EngramError(f"--for must be training or inference, got {target!r}")
