"""Export outputs appear whole or not at all.

An export writes into a temporary folder beside its target (`helpers.temporary_name`) and is
renamed into place only once complete; an existing output is replaced only then, and only when
`--overwrite` was given and it looks like an export (a DCP `.metadata` or safetensors files).
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
    """Delete a file or folder if it exists (a temporary output left by a failed export)."""
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
