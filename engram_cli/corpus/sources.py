"""The input files of a corpus and their kind: `.jsonl`, `.npy` and `.bin` by suffix, anything else text.

Folders are walked recursively in sorted order, hidden entries skipped, so a corpus reads in the
same order everywhere.
"""

from __future__ import annotations

import fnmatch
from dataclasses import dataclass
from pathlib import Path

from ..errors import EngramError


@dataclass(frozen=True)
class Source:
    """One input file, its kind ("text", "jsonl", "npy" or "bin"), and whether a folder walk found it."""

    path: Path
    kind: str  # "text" | "jsonl" | "npy" | "bin"
    from_folder: bool


def _kind(path: Path) -> str:
    suffix = path.suffix.lower()
    return {".jsonl": "jsonl", ".npy": "npy", ".bin": "bin"}.get(suffix, "text")


def _hidden(path: Path, root: Path) -> bool:
    return any(part.startswith(".") for part in path.relative_to(root).parts)


def find_sources(paths: list[str | Path], glob: str | None = None) -> list[Source]:
    """Every input file, folders walked recursively in sorted order (hidden entries skipped)."""
    sources = []
    for raw in paths:
        path = Path(raw)
        if path.is_dir():
            found = sorted(p for p in path.rglob(glob or "*") if p.is_file() and not _hidden(p, path))
            sources += [Source(p, _kind(p), True) for p in found]
        elif path.is_file():
            if glob and not fnmatch.fnmatch(path.name, glob):
                raise EngramError(f"--corpus {path} does not match --glob {glob!r}")
            sources.append(Source(path, _kind(path), False))
        elif path.exists():
            raise EngramError(f"corpus input {path} is neither a file nor a folder")
        else:
            raise EngramError(f"no such corpus file or folder: {path}")
    return sources
