"""safetensors files written by position, read by memory map.

A safetensors file is an 8-byte little-endian header length, a JSON header (dtype, shape and
data_offsets of every tensor, plus string `__metadata__`), then the raw bytes. safetensors' own
`save` wants every tensor in memory at once; a 100 GB table does not fit. Here the whole layout,
every header and every offset, is fixed before any data is written (`plan_layout`), the files
are created at full size, and each (tensor, row range) is then filled with `os.pwrite` at its
known position, in any order, by any process: one exporter streaming row blocks, or many tasks
filling their own ranges of the same files.
"""

from __future__ import annotations

import json
import mmap
import os
import re
import threading
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from math import prod
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..dtypes import SAFETENSORS
from ..errors import EngramError, FormatError
from ..helpers import plain_file_name

INDEX_NAME = "model.safetensors.index.json"
_HEADER_ALIGN = 8
_MAX_HEADER = 100_000_000  # safetensors refuses larger headers


@dataclass(frozen=True)
class TensorPlan:
    """One tensor of a layout: name, safetensors dtype ("BF16", "F8_E4M3", ...) and shape."""

    name: str
    dtype: str
    shape: tuple[int, ...]

    @property
    def nbytes(self) -> int:
        """Bytes of the tensor's data."""
        return prod(self.shape) * SAFETENSORS[self.dtype].itemsize

    @property
    def row_bytes(self) -> int:
        """Bytes of one row (of the first dimension)."""
        return prod(self.shape[1:]) * SAFETENSORS[self.dtype].itemsize


@dataclass(frozen=True)
class FilePlan:
    """One file: its header bytes and where each tensor's data starts in the file."""

    name: str
    header: bytes
    starts: dict[str, int]
    size: int


@dataclass(frozen=True)
class SafetensorsLayout:
    """Every file, header and byte offset of an output, decided before any data is written."""

    files: tuple[FilePlan, ...]
    tensors: dict[str, TensorPlan]
    with_index: bool
    index_metadata: dict[str, str] = field(default_factory=dict)

    def locate(self, name: str) -> tuple[FilePlan, int]:
        """The file that holds tensor `name` and where its data starts in it."""
        for plan in self.files:
            if name in plan.starts:
                return plan, plan.starts[name]
        raise KeyError(name)

    @property
    def total_bytes(self) -> int:
        """Bytes of every tensor's data (the index's `total_size`)."""
        return sum(t.nbytes for t in self.tensors.values())

    def index_json(self) -> dict[str, Any]:
        """The `model.safetensors.index.json` of a sharded output: metadata and weight map."""
        weight_map = {name: plan.name for plan in self.files for name in plan.starts}
        return {
            "metadata": {"total_size": self.total_bytes, **self.index_metadata},
            "weight_map": dict(sorted(weight_map.items())),
        }


def _header(tensors: list[TensorPlan], metadata: dict[str, str]) -> tuple[bytes, dict[str, int]]:
    """The padded header, and each tensor's start relative to the data section.

    Wider dtypes go first so that every tensor starts at a multiple of its item size
    (the data section itself starts at a multiple of 8), which zero-copy views need.
    """
    ordered = sorted(tensors, key=lambda t: -SAFETENSORS[t.dtype].itemsize)
    entries: dict[str, Any] = {"__metadata__": metadata} if metadata else {}
    starts, position = {}, 0
    for tensor in ordered:
        starts[tensor.name] = position
        entries[tensor.name] = {
            "dtype": tensor.dtype,
            "shape": list(tensor.shape),
            "data_offsets": [position, position + tensor.nbytes],
        }
        position += tensor.nbytes
    text = json.dumps(entries, separators=(",", ":")).encode("utf-8")
    text += b" " * (-(8 + len(text)) % _HEADER_ALIGN)
    return len(text).to_bytes(8, "little") + text, starts


def plan_layout(
    tensors: list[TensorPlan],
    metadata: dict[str, str],
    *,
    max_shard_bytes: int | None,
    single_file: str | None = None,
    index_metadata: dict[str, str] | None = None,
) -> SafetensorsLayout:
    """Split tensors, in order, into files of at most `max_shard_bytes` (a larger tensor gets a
    file of its own, as Hugging Face does); every file carries `metadata`.

    `single_file` names the one file to write (no index); otherwise files are named
    `model-0000i-of-0000n.safetensors` and listed in `model.safetensors.index.json`.

    Args:
        tensors: every tensor's name, dtype and shape.
        metadata: the `__metadata__` strings of every header.
        max_shard_bytes: the size cap of a shard file (None: no cap).
        single_file: the name of the one file to write instead of shards.
        index_metadata: entries added to the index's metadata beside `total_size`.
    """
    groups: list[list[TensorPlan]] = []
    if single_file is not None:
        groups = [list(tensors)]
    else:
        current: list[TensorPlan] = []
        size = 0
        for tensor in tensors:
            if current and max_shard_bytes is not None and size + tensor.nbytes > max_shard_bytes:
                groups.append(current)
                current, size = [], 0
            current.append(tensor)
            size += tensor.nbytes
        groups.append(current)
    files = []
    for i, group in enumerate(groups):
        header, starts = _header(group, metadata)
        name = single_file or f"model-{i + 1:05d}-of-{len(groups):05d}.safetensors"
        data_size = sum(t.nbytes for t in group)
        files.append(
            FilePlan(
                name=name,
                header=header,
                starts={k: len(header) + v for k, v in starts.items()},
                size=len(header) + data_size,
            )
        )
    return SafetensorsLayout(
        files=tuple(files),
        tensors={t.name: t for t in tensors},
        with_index=single_file is None,
        index_metadata=dict(index_metadata or {}),
    )


class SafetensorsWriter:
    """Fills the files of a layout in `directory` by position.

    `create` writes every header and sizes every file (sparse, so nothing is written twice);
    `write_rows` may then be called for any tensor and row range, in any order, from any
    thread, and from any process that has created its own writer on the same directory with
    `create=False`.
    """

    def __init__(self, layout: SafetensorsLayout, directory: str | Path, *, create: bool) -> None:
        self.layout = layout
        self.directory = Path(directory)
        self._fds: dict[str, int] = {}
        self._lock = threading.Lock()
        if create:
            for plan in layout.files:
                with open(self.directory / plan.name, "wb") as handle:
                    handle.write(plan.header)
                    handle.truncate(plan.size)

    def _fd(self, file_name: str) -> int:
        with self._lock:
            fd = self._fds.get(file_name)
            if fd is None:
                fd = self._fds[file_name] = os.open(self.directory / file_name, os.O_WRONLY)
            return fd

    def write_rows(self, name: str, row_start: int, rows: torch.Tensor | np.ndarray) -> int:
        """Write a block of whole rows of tensor `name` starting at `row_start`; returns bytes."""
        tensor = self.layout.tensors[name]
        plan, start = self.layout.locate(name)
        data = _as_bytes(rows)
        if len(data) % max(tensor.row_bytes, 1) or row_start * tensor.row_bytes + len(data) > tensor.nbytes:
            raise ValueError(f"{len(data)} bytes at row {row_start} do not fit {name} {tensor.shape}")
        position = start + row_start * tensor.row_bytes
        fd = self._fd(plan.name)
        view = memoryview(data)
        while view:
            written = os.pwrite(fd, view, position)
            view, position = view[written:], position + written
        start_writeback(fd, position - len(data), len(data))
        return len(data)

    def close(self, sync: bool = True) -> None:
        """Close the files, first syncing them to disk when `sync`."""
        for fd in self._fds.values():
            if sync:
                os.fsync(fd)
            os.close(fd)
        self._fds.clear()

    def write_index(self) -> None:
        """Write `model.safetensors.index.json` when the layout has shards."""
        if self.layout.with_index:
            (self.directory / INDEX_NAME).write_text(json.dumps(self.layout.index_json(), indent=2) + "\n")


def start_writeback(fd: int, offset: int, length: int) -> None:
    """Have the kernel start writing a just-written range to disk now, not when `fsync` asks.

    The writes then reach the disk while the next blocks are being computed, so the closing
    `fsync` (still done) only waits for the last ones. On Linux, POSIX_FADV_DONTNEED starts
    writeback of the range's dirty pages without waiting for it (and drops pages of it already
    on disk from the page cache: an export does not read its output back).

    Args:
        fd: the open file.
        offset, length: the byte range just written.
    """
    if length > 0 and hasattr(os, "posix_fadvise"):
        os.posix_fadvise(fd, offset, length, os.POSIX_FADV_DONTNEED)


def _as_bytes(rows: torch.Tensor | np.ndarray) -> memoryview:
    if isinstance(rows, torch.Tensor):
        rows = rows.detach().contiguous().view(torch.uint8).numpy()
    return np.ascontiguousarray(rows).data.cast("B")


_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([KMGT]i?B|B)?\s*$", re.IGNORECASE)
_UNITS = {
    "B": 1,
    "KB": 10**3,
    "MB": 10**6,
    "GB": 10**9,
    "TB": 10**12,
    "KIB": 2**10,
    "MIB": 2**20,
    "GIB": 2**30,
    "TIB": 2**40,
}


def parse_size(text: str | int) -> int:
    """'5GB' (decimal, as Hugging Face reads it), '512MiB', or a byte count."""
    if isinstance(text, int):
        size = text
    else:
        match = _SIZE.match(text)
        if not match:
            raise EngramError(f"cannot read size {text!r}; write it like 5GB, 500MB or 2GiB")
        size = int(float(match.group(1)) * _UNITS[(match.group(2) or "B").upper()])
    if size <= 0:
        raise EngramError(f"size must be positive, got {text!r}")
    return size


@dataclass(frozen=True)
class TensorEntry:
    """A tensor found in a file's header: where its bytes are."""

    name: str
    dtype: str
    shape: tuple[int, ...]
    path: Path
    start: int
    end: int


@dataclass
class SafetensorsSet:
    """The headers of one file or of a shard set, with the tensors found in them."""

    files: list[Path]
    tensors: dict[str, TensorEntry]
    metadata: dict[str, str]


def _is_count(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def read_header(path: Path, select: Callable[[str], bool] | None = None) -> tuple[dict[str, Any], int]:
    """A file's parsed header and where its data section starts; FormatError for any header
    the official safetensors library would refuse: not a JSON object, `__metadata__` that is
    not strings, a shape that is not non-negative integers, a byte range of another size than
    dtype and shape give, ranges that overlap or leave gaps, or ranges that do not end exactly
    at the end of the file.

    With `select`, only the tensors it accepts are kept, and only they need a dtype engram knows:
    the rest of a model's file may hold others (their byte ranges are still checked).
    """
    try:
        with open(path, "rb") as handle:
            size = os.fstat(handle.fileno()).st_size
            prefix = handle.read(8)
            length = int.from_bytes(prefix, "little") if len(prefix) == 8 else -1
            if not 0 < length <= min(_MAX_HEADER, size - 8):
                raise FormatError(f"{path} is not a safetensors file (bad header length)")
            raw = handle.read(length)
    except OSError as exc:
        raise FormatError(f"cannot read {path}: {exc.strerror or exc}") from None
    try:
        header = json.loads(raw) if raw.startswith(b"{") else None
    except (UnicodeDecodeError, json.JSONDecodeError):
        raise FormatError(f"{path} is not a safetensors file (header is not JSON)") from None
    if not isinstance(header, dict):
        raise FormatError(f"{path} is not a safetensors file (header is not a JSON object)")
    metadata = header.get("__metadata__", {})
    if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
        raise FormatError(f"{path}: __metadata__ must map names to strings")
    data_start = 8 + length
    ranges = []
    for name, entry in header.items():
        if name == "__metadata__":
            continue
        problem = _entry_problem(entry, known=select is None or select(name))
        if problem:
            raise FormatError(f"{path}: tensor {name!r} {problem}")
        ranges.append((entry["data_offsets"][0], entry["data_offsets"][1], name))
    position = 0
    for begin, end, name in sorted(ranges):
        if begin != position:
            what = "overlaps the tensor before it" if begin < position else "leaves a gap before it"
            raise FormatError(f"{path}: tensor {name!r} {what} (data_offsets start at {begin}, not {position})")
        position = end
    if position != size - data_start:
        raise FormatError(
            f"{path}: the tensors cover {position:,} bytes of data but the file holds {size - data_start:,} "
            "(truncated or padded)"
        )
    if select is not None:
        header = {k: v for k, v in header.items() if k == "__metadata__" or select(k)}
    return header, data_start


def _entry_problem(entry: Any, known: bool = True) -> str | None:
    """Why a header entry is malformed, or None. `known`: its dtype must be one engram reads
    (otherwise only a dtype name, and no size check, is required)."""
    if not isinstance(entry, dict) or set(entry) != {"dtype", "shape", "data_offsets"}:
        return "needs exactly dtype, shape and data_offsets"
    dtype, shape, offsets = entry["dtype"], entry["shape"], entry["data_offsets"]
    if not isinstance(dtype, str) or (known and dtype not in SAFETENSORS):
        return f"has dtype {dtype!r}, which engram does not read"
    if not isinstance(shape, list) or not all(_is_count(n) for n in shape):
        return f"has shape {shape!r}; a shape is a list of non-negative integers"
    if not (isinstance(offsets, list) and len(offsets) == 2 and all(_is_count(n) for n in offsets)):
        return f"has data_offsets {offsets!r}; they are two byte positions"
    if offsets[1] < offsets[0]:
        return f"has data_offsets {offsets}, which end before they start"
    if dtype in SAFETENSORS and offsets[1] - offsets[0] != prod(shape) * SAFETENSORS[dtype].itemsize:
        return f"has data_offsets {offsets} for {prod(shape) * SAFETENSORS[dtype].itemsize:,} bytes of {dtype} {shape}"
    return None


def open_set(path: str | Path, select: Callable[[str], bool] | None = None) -> SafetensorsSet:
    """Headers of a .safetensors file, of an index json, or of a folder holding either.

    `select` picks tensors by name (a model's Engram tables among all its weights): an index
    then opens only the files that hold a selected tensor, and the other files may be absent.
    An index may only name files of its own folder.
    """
    path = Path(path)
    if path.is_dir():
        index = path / INDEX_NAME
        if index.is_file():
            path = index
        else:
            files = sorted(path.glob("*.safetensors"))
            if not files:
                raise EngramError(f"{path} holds no .safetensors files")
            return _collect(files, select)
    if not path.exists():
        raise EngramError(f"no such file or folder: {path}")
    if path.name.endswith(".json"):
        try:
            weight_map = json.loads(path.read_text())["weight_map"]
            chosen = {name: file for name, file in weight_map.items() if select is None or select(name)}
        except (OSError, UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError, AttributeError):
            raise FormatError(f"{path} is not a safetensors index (no weight_map)") from None
        outside = sorted(repr(n) for n in set(weight_map.values()) if not plain_file_name(n))
        if outside:
            raise FormatError(f"{path} lists {outside[0]}, which is not a file name in its folder")
        files = sorted({path.parent / name for name in chosen.values()})
        missing = [str(f) for f in files if not f.is_file()]
        if missing:
            raise FormatError(f"{path} lists {missing[0]}, which does not exist")
        found = _collect(files, select)
        for tensor, name in chosen.items():
            entry = found.tensors.get(tensor)
            if entry is None or entry.path.name != name:
                raise FormatError(f"{path} says {tensor!r} is in {name}, but it is not there")
        return found
    return _collect([path], select)


def _collect(files: list[Path], select: Callable[[str], bool] | None = None) -> SafetensorsSet:
    tensors: dict[str, TensorEntry] = {}
    metadata: dict[str, str] = {}
    for file in files:
        header, data_start = read_header(file, select)
        metadata = metadata or header.get("__metadata__") or {}
        for name, entry in header.items():
            if name == "__metadata__":
                continue
            if name in tensors:
                raise FormatError(f"tensor {name!r} is in both {tensors[name].path} and {file}")
            begin, end = entry["data_offsets"]
            tensors[name] = TensorEntry(
                name, entry["dtype"], tuple(entry["shape"]), file, data_start + begin, data_start + end
            )
    return SafetensorsSet(files=files, tensors=tensors, metadata=metadata)


class MappedTensors:
    """Zero-copy torch views of the tensors of a set, backed by read-only memory maps.

    A shared read-only map costs no memory of its own: pages come from the page cache on
    first touch and the kernel may drop them again, so a table larger than RAM still opens.
    The views must not be written to (nothing here does).
    """

    def __init__(self, found: SafetensorsSet) -> None:
        self.found = found
        self._maps: dict[Path, mmap.mmap] = {}

    def tensor(self, name: str) -> torch.Tensor:
        """A read-only zero-copy view of tensor `name`, mapping its file on first use."""
        entry = self.found.tensors[name]
        mapped = self._maps.get(entry.path)
        if mapped is None:
            with open(entry.path, "rb") as handle:
                mapped = self._maps[entry.path] = mmap.mmap(handle.fileno(), 0, access=mmap.ACCESS_READ)
        dtype = SAFETENSORS[entry.dtype].torch
        count = (entry.end - entry.start) // SAFETENSORS[entry.dtype].itemsize
        if count == 0:
            return torch.empty(entry.shape, dtype=dtype)
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="The given buffer is not writable")
            flat = torch.frombuffer(mapped, dtype=dtype, count=count, offset=entry.start)
        return flat.view(entry.shape)

    def close(self) -> None:
        """Forget the maps; each closes once the last view of it is gone."""
        self._maps.clear()  # the maps close once the last view of them is gone
