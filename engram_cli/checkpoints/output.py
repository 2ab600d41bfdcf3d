"""An export as an output (`output.Output`): what an export may replace at its path.

An existing output is replaced (with --overwrite) only when it is something an export writes: a
`.safetensors` or `.gguf` file, or a folder holding nothing but the files of a DCP checkpoint (`.metadata`,
`__<rank>_<i>.distcp`) or of a safetensors export (`model.safetensors`,
`model-<i>-of-<n>.safetensors`, `model.safetensors.index.json`, `engram_config.json`). Anything
else, and any path inside a table store, is refused before a byte is written. A new export format
whose files are named otherwise adds its names here.
"""

from __future__ import annotations

import re
from pathlib import Path

from ..errors import UsageError
from ..output import OutputKind

_EXPORT_ENTRY = re.compile(
    r"^(\.metadata|__[0-9]+_[0-9]+\.distcp|model\.safetensors|model-[0-9]+-of-[0-9]+\.safetensors"
    r"|model\.safetensors\.index\.json|engram_config\.json)$"
)


class ExportKind(OutputKind):
    """A DCP or safetensors export: a file or folder of export files, never inside a store."""

    def check_target(self, path: Path, overwrite: bool) -> None:
        from ..store.create import check_outside_stores

        check_outside_stores(path)
        super().check_target(path, overwrite)

    def check_replaceable(self, path: Path) -> None:
        if path.is_symlink():
            raise UsageError(f"{path} is a symbolic link; refusing to replace it")
        if path.is_dir():
            foreign = sorted(entry.name for entry in path.iterdir() if not _EXPORT_ENTRY.match(entry.name))
            if foreign:
                raise UsageError(f"{path} holds {foreign[0]!r}, which no export writes; refusing to replace the folder")
        elif path.suffix not in (".safetensors", ".gguf"):
            raise UsageError(f"{path} is a file that is not a safetensors export or a .gguf; refusing to replace it")


EXPORT = ExportKind()
