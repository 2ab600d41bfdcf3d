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

import os
import shutil
from pathlib import Path

from ..errors import EngramError, OutputExistsError
from ..helpers import temporary_name


def prepare_output(output: Path, overwrite: bool) -> Path:
    """Check the target and make a temporary folder beside it, renamed into place when done."""
    if output.exists() or output.is_symlink():
        if not overwrite:
            raise OutputExistsError(f"{output} already exists; pass --overwrite to replace it")
        if output.is_dir() and any(output.iterdir()) and not _looks_like_export(output):
            raise EngramError(f"{output} is a non-empty folder that is not a checkpoint; refusing to replace it")
        if not output.is_dir() and output.suffix != ".safetensors":
            raise EngramError(f"{output} is a file that is not a safetensors export; refusing to replace it")
    parent = output.absolute().parent
    if not parent.is_dir():
        raise EngramError(f"output folder {parent} does not exist")
    if not os.access(parent, os.W_OK):
        raise EngramError(f"output folder {parent} is not writable")
    tmp = temporary_name(parent / output.name)
    try:
        tmp.mkdir()
    except OSError as exc:
        raise EngramError(f"cannot write to {parent}: {exc.strerror or exc}") from None
    return tmp


def _looks_like_export(folder: Path) -> bool:
    names = {p.name for p in folder.iterdir()}
    return ".metadata" in names or any(n.endswith(".safetensors") for n in names)


def remove_tree(path: Path) -> None:
    if path.is_dir():
        shutil.rmtree(path, ignore_errors=True)
    elif path.exists():
        path.unlink()


def replace_output(tmp: Path, target: Path) -> None:
    """Move a finished output into place, replacing an old one only now that the new one is whole."""
    if target.exists() or target.is_symlink():
        old = temporary_name(target)
        os.replace(target, old)
        os.replace(tmp, target)
        if old.is_dir():
            shutil.rmtree(old)
        else:
            old.unlink()
    else:
        os.replace(tmp, target)
