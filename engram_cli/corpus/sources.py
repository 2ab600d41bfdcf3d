"""Reading corpora into documents of token ids: text files and folders, jsonl, .npy and .bin.

Text is tokenized with the projection's tokenizer in batches (the Rust tokenizer
uses every core) on a background thread, so reading and tokenizing overlap with
whatever consumes the batches. Pre-tokenized arrays are memory-mapped and read in
chunks, so no input has to fit in memory; a stream split into documents at a
separator carries the tail of its last document from chunk to chunk.
"""

from __future__ import annotations

import fnmatch
from dataclasses import dataclass
from pathlib import Path

from ..errors import EngramError


@dataclass(frozen=True)
class Source:
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
