"""Corpus files as readers see them: a `Source` (one file or Megatron pair and its kind), the
file system behind it (local or fsspec), and kinds from file names.

The kind comes from the name: after a compression suffix (`.gz`, `.zst`, `.zstd`, `.xz`, `.bz2`)
is set aside, `.jsonl`/`.ndjson` are JSON lines, `.json` JSON lines or an array, `.npy` and `.bin`
token ids (a `.bin` beside a `.idx` is a Megatron pair), `.parquet`/`.pq` Parquet, `.arrow` Arrow
IPC; anything else is text. A URL (`s3://`, `gs://`, `hf://`, `https://`, `memory://`, ...) is
opened with fsspec; `file://` URLs are plain local paths.
"""

from __future__ import annotations

import json
import os
import stat
from dataclasses import dataclass
from pathlib import Path, PurePath, PurePosixPath
from typing import IO, Any

import numpy as np

from ..errors import EngramError, FormatError, UsageError
from ..helpers import first_line

COMPRESSED_SUFFIXES = (".gz", ".zst", ".zstd", ".xz", ".bz2")


_KINDS = {
    ".jsonl": "jsonl",
    ".ndjson": "jsonl",
    ".json": "json",
    ".npy": "npy",
    ".bin": "bin",
    ".parquet": "parquet",
    ".pq": "parquet",
    ".arrow": "arrow",
}


# Kinds read through a decompressing stream when their file is compressed.
STREAM_KINDS = ("text", "jsonl", "json")


@dataclass(frozen=True)
class Source:
    """One input file: where it is, how to read it, and its size in bytes (for progress and parts).


    `fs` is the fsspec filesystem of a URL and `path` the path inside it; for local files `fs`
    is None and `path` a `Path`. A Megatron pair is its `.bin`; the `.idx` sits beside it.
    """

    path: PurePath
    kind: str
    from_folder: bool
    size: int = 0
    fs: Any = None

    @property
    def name(self) -> str:
        """The file's name."""
        return self.path.name

    @property
    def display(self) -> str:
        """The path, or the URL, as users wrote it: what messages name."""
        if self.fs is None:
            return str(self.path)
        protocol = self.fs.protocol if isinstance(self.fs.protocol, str) else self.fs.protocol[0]
        return f"{protocol}://{str(self.path).lstrip('/')}"

    def __str__(self) -> str:
        return self.display

    def sibling(self, suffix: str) -> Source:
        """The file beside this one with another suffix (the `.idx` of a Megatron `.bin`)."""
        return Source(self.path.with_suffix(suffix), self.kind, self.from_folder, 0, self.fs)

    def open(self) -> IO[bytes]:
        """The file's bytes, for reading; errors are one-line `EngramError`s."""
        try:
            if self.fs is None:
                return open(self.path, "rb")
            return self.fs.open(str(self.path), "rb")
        except (OSError, ValueError) as exc:
            raise EngramError(f"cannot read {self}: {first_line(exc, os_words=True)}") from None

    def read_array(self, offset: int, dtype: np.dtype, count: int) -> np.ndarray:
        """`count` items of `dtype` at byte `offset` (fewer at the end of the file).


        Args:
            offset: where they start, in bytes.
            dtype: their type.
            count: how many.
        """
        try:
            with self.open() as handle:
                handle.seek(offset)
                if self.fs is None:
                    return np.fromfile(handle, dtype=dtype, count=count)
                data = handle.read(count * dtype.itemsize)
        except OSError as exc:
            raise EngramError(f"cannot read {self}: {first_line(exc, os_words=True)}") from None
        usable = len(data) - len(data) % dtype.itemsize
        return np.frombuffer(data[:usable], dtype=dtype)

    def file_size(self) -> int:
        """The size of the file now, in bytes."""
        try:
            if self.fs is None:
                return Path(self.path).stat().st_size
            return int(self.fs.size(str(self.path)))
        except (OSError, ValueError) as exc:
            raise EngramError(f"cannot read {self}: {first_line(exc, os_words=True)}") from None


def kind_of(name: str, explicit: bool = True) -> str:
    """The reader kind a file name asks for. A compressed binary format (`x.npy.gz`) is refused
    when named, and in a folder left to the text reader, which skips it as binary."""
    lower = name.lower()
    compressed = next((s for s in COMPRESSED_SUFFIXES if lower.endswith(s)), None)
    inner = lower[: -len(compressed)] if compressed else lower
    kind = _KINDS.get(PurePosixPath(inner).suffix, "text")
    if compressed and kind not in STREAM_KINDS:
        if not explicit:
            return "text"
        raise UsageError(f"{name}: compressed {PurePosixPath(inner).suffix} files are not read; decompress it first")
    return kind


def _hidden(relative: PurePath) -> bool:
    return any(part.startswith(".") for part in relative.parts)


class Files:
    """The filesystem a corpus input lives on: local paths or an fsspec filesystem."""

    def __init__(self, fs: Any = None) -> None:
        self.fs = fs

    def path(self, raw: str) -> PurePath:
        return Path(raw) if self.fs is None else PurePosixPath(raw)

    def is_dir(self, path: PurePath) -> bool:
        return Path(path).is_dir() if self.fs is None else bool(self.fs.isdir(str(path)))

    def is_file(self, path: PurePath) -> bool:
        return Path(path).is_file() if self.fs is None else bool(self.fs.isfile(str(path)))

    def exists(self, path: PurePath) -> bool:
        return Path(path).exists() if self.fs is None else bool(self.fs.exists(str(path)))

    def size(self, path: PurePath) -> int:
        return Path(path).stat().st_size if self.fs is None else int(self.fs.size(str(path)))

    def read_text(self, path: PurePath) -> str:
        if self.fs is None:
            return Path(path).read_text(encoding="utf-8")
        with self.fs.open(str(path), "rb") as handle:
            return handle.read().decode("utf-8")

    def head(self, path: PurePath, count: int) -> bytes:
        if self.fs is None:
            with open(path, "rb") as handle:
                return handle.read(count)
        with self.fs.open(str(path), "rb") as handle:
            return handle.read(count)

    def walk(self, root: PurePath, unreadable: list[str] | None = None) -> list[tuple[PurePath, int]]:
        """Every file under `root` with its size, sorted, hidden entries skipped.

        A folder that cannot be listed or a file that cannot be read (permission denied) is an
        error naming it, never passed over; with `unreadable` given, its path is added there
        instead and the walk goes on.
        """
        if self.fs is None:
            return self._walk_local(Path(root), unreadable)
        entries = self.fs.find(str(root), detail=True)
        files = []
        for name, info in entries.items():
            path = PurePosixPath(name)
            if info.get("type", "file") == "file" and not _hidden(path.relative_to(root)):
                files.append((path, int(info.get("size") or 0)))
        return sorted(files)

    @staticmethod
    def _walk_local(root: Path, unreadable: list[str] | None) -> list[tuple[PurePath, int]]:
        def refuse(path: str, exc: OSError | None, what: str) -> None:
            if unreadable is None:
                why = first_line(exc, os_words=True) if exc is not None else "permission denied"
                raise EngramError(
                    f"cannot read {what} {path}: {why}; pass --skip-unreadable to skip (and count) what cannot be read"
                )
            unreadable.append(path)

        found: list[tuple[PurePath, int]] = []
        for folder, dirs, names in os.walk(root, onerror=lambda exc: refuse(str(exc.filename), exc, "folder")):
            dirs[:] = [d for d in dirs if not d.startswith(".")]
            for name in names:
                path = Path(folder) / name
                if name.startswith("."):
                    continue
                try:
                    info = path.stat()
                except FileNotFoundError:
                    continue  # a dangling link, or removed since it was listed
                except OSError as exc:
                    refuse(str(path), exc, "file")
                    continue
                if not stat.S_ISREG(info.st_mode):
                    continue
                if not os.access(path, os.R_OK):
                    refuse(str(path), None, "file")
                    continue
                found.append((path, info.st_size))
        return sorted(found)

    def source(self, path: PurePath, kind: str, from_folder: bool, size: int | None = None) -> Source:
        """A `Source` on this filesystem.


        Args:
            path: the file.
            kind: its reader kind.
            from_folder: whether a folder walk found it.
            size: its size in bytes (None: looked up).
        """
        return Source(path, kind, from_folder, self.size(path) if size is None else size, self.fs)


def filesystem(url: str) -> tuple[Any, str]:
    """The fsspec filesystem of a URL and the path in it; a missing backend names its package."""
    import fsspec

    protocol = url.split("://", 1)[0].lower()
    try:
        return fsspec.core.url_to_fs(url)
    except ImportError as exc:
        missing = getattr(exc.__cause__, "name", None) or getattr(exc, "name", None)
        package = (missing or protocol).split(".")[0]
        raise UsageError(f"reading {protocol}:// URLs needs the {package} package: pip install {package}") from None
    except ValueError as exc:
        raise UsageError(f"cannot open {url}: {first_line(exc, os_words=True)}") from None


def read_json(files: Files, path: PurePath) -> Any:
    """A small JSON file (a dataset's state), parsed; unreadable JSON names the file."""
    try:
        return json.loads(files.read_text(path))
    except (OSError, ValueError, RecursionError) as exc:
        raise FormatError(f"{path}: not readable JSON ({first_line(exc, os_words=True)})") from None
