"""Where an export is written: a temporary folder beside the output, swapped in once complete.

An existing output is replaced (with --overwrite) only when it is something an export writes: a
`.safetensors` or `.gguf` file, or a folder holding nothing but the files of a DCP checkpoint (`.metadata`,
`__<rank>_<i>.distcp`) or of a safetensors export (`model.safetensors`,
`model-<i>-of-<n>.safetensors`, `model.safetensors.index.json`). Anything else, and any path
inside a table store, is refused before a byte is written.
"""

from __future__ import annotations

import os
import re
import shutil
from pathlib import Path

from ..errors import EngramError, OutputExistsError, UsageError
from ..helpers import check_free_space, remove_stale_temporaries, temporary_name, write_error

_EXPORT_ENTRY = re.compile(
    r"^(\.metadata|__[0-9]+_[0-9]+\.distcp|model\.safetensors|model-[0-9]+-of-[0-9]+\.safetensors"
    r"|model\.safetensors\.index\.json|engram_config\.json)$"
)


def check_export_target(output: Path, overwrite: bool) -> None:
    """Refuse an output that exists (without `overwrite`) or that is not an export to replace."""
    from ..store.create import check_outside_stores

    check_outside_stores(output)
    if not (output.exists() or output.is_symlink()):
        return
    if not overwrite:
        raise OutputExistsError(f"{output} already exists; pass --overwrite to replace it")
    if output.is_symlink():
        raise UsageError(f"{output} is a symbolic link; refusing to replace it")
    if output.is_dir():
        foreign = sorted(entry.name for entry in output.iterdir() if not _EXPORT_ENTRY.match(entry.name))
        if foreign:
            raise UsageError(f"{output} holds {foreign[0]!r}, which no export writes; refusing to replace the folder")
    elif output.suffix not in (".safetensors", ".gguf"):
        raise UsageError(f"{output} is a file that is not a safetensors export or a .gguf; refusing to replace it")


def prepare_output(output: Path, overwrite: bool, needed: int) -> Path:
    """Check the target and the free space (`needed` bytes), and make a temporary folder beside
    the target, renamed into place when done. Stale temporaries of killed runs go first."""
    check_export_target(output, overwrite)
    parent = output.absolute().parent
    if not parent.is_dir():
        raise EngramError(f"output folder {parent} does not exist")
    if not os.access(parent, os.W_OK):
        raise EngramError(f"output folder {parent} is not writable")
    remove_stale_temporaries(parent)
    check_free_space(parent, needed)
    tmp = temporary_name(parent / output.name)
    try:
        tmp.mkdir()
    except OSError as exc:
        raise write_error(parent, exc) from None
    return tmp


def remove_tree(path: Path) -> None:
    """Delete a file or folder if it exists (a temporary output left by a failed export)."""
    if path.is_dir():
        shutil.rmtree(path, ignore_errors=True)
    elif path.exists():
        path.unlink()
