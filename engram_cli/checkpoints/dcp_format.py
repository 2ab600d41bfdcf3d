"""The training checkpoint on disk: what torch.distributed.checkpoint (DCP) writes, as engram reads it.

A DCP checkpoint is a folder: `.metadata`, a pickle of DCP's `Metadata` (every tensor's logical
shape and its chunks, and where each chunk is stored: a file, an offset, a length), and the
`__<rank>_<i>.distcp` files holding the chunks, each a `torch.save` zip. An engram export adds the
hashing metadata as small tensors under `engram.*` (`keys`, `metadata`): `META_KEY` holds a JSON
object with `format` "engram-dcp", the spec, the tables (per layer, the tensors that cover its rows
in order), the sharding and dtype of the store. The metadata is a pickle, so it is only read with
`trust_pickle`; every chunk is read whole and checked against its zip's CRC-32s first, and the
pieces a `.metadata` lists are checked to cover each tensor exactly, in files of the folder,
before anything is read (`check_pieces`). Reading goes through DCP's own resharding reads
(`load_windows`), so any rank partition loads into any window of rows.
"""

from __future__ import annotations

import io
import math
import struct
import zipfile
import zlib
from collections.abc import Iterable
from pathlib import Path
from typing import IO, Any

import torch

from ..errors import ChecksumError, EngramError, FormatError, UsageError
from ..helpers import plain_file_name
from ..spec import TableSpec
from .keys import META_KEY, check_distinct_keys, metadata_keys, piece_names

DCP_FORMAT = "engram-dcp"
DCP_FORMAT_VERSION = "1"


def read_metadata(path: Path, trust_pickle: bool) -> Any:
    """DCP's `Metadata` of the checkpoint at `path`: a pickle, so refused without `trust_pickle`."""
    from torch.distributed.checkpoint import FileSystemReader
    from torch.distributed.checkpoint.metadata import Metadata

    if not trust_pickle:
        raise UsageError(
            f"{path} is a DCP checkpoint, whose .metadata is a Python pickle that can run "
            "code when read; pass --trust-pickle if you trust where it came from"
        )
    try:
        metadata = FileSystemReader(path).read_metadata()
    except Exception as exc:  # any unpickling failure means this is no DCP metadata we can use
        raise FormatError(f"{path}/.metadata is not readable DCP metadata ({type(exc).__name__}: {exc})") from None
    if not isinstance(metadata, Metadata) or not isinstance(metadata.storage_data, dict):
        raise FormatError(f"{path}/.metadata is not DCP checkpoint metadata")
    return metadata


def check_zip_crc(data: bytes, where: str) -> None:
    """Check every member of a zip archive (what `torch.save` writes, and so every tensor item
    of a `.distcp` file) against the CRC-32 its central directory records."""
    try:
        with zipfile.ZipFile(io.BytesIO(data)) as archive:
            bad = archive.testzip()
    except (zipfile.BadZipFile, NotImplementedError, ValueError, EOFError, OSError, zlib.error, struct.error) as exc:
        raise ChecksumError(f"{where} is damaged: {exc}") from None
    if bad is not None:
        raise ChecksumError(f"{where} is damaged: {bad} fails its CRC-32 check")


def _verified_reader(path: Path) -> Any:
    """DCP's FileSystemReader, reading each item whole and checking its zip CRC-32s first:
    torch.load does not, so flipped bytes would otherwise load as wrong values."""
    from torch.distributed.checkpoint import FileSystemReader

    class VerifiedReader(FileSystemReader):
        def _slice_file(self, file: Any, sinfo: Any) -> IO[bytes]:
            where = f"{path / sinfo.relative_path} (bytes {sinfo.offset:,}..{sinfo.offset + sinfo.length:,})"
            file.seek(sinfo.offset)
            data = file.read(sinfo.length)
            if len(data) != sinfo.length:
                raise FormatError(f"{where} is truncated: the file ends after {len(data):,} of those bytes")
            if not sinfo.transform_descriptors and data[:4] == b"PK\x03\x04":
                check_zip_crc(data, where)
            return io.BytesIO(data)

    return VerifiedReader(path)


def _load_failure(path: Path, exc: BaseException) -> EngramError:
    """One line for a DCP load that failed: our own errors as they are, the rest named."""
    from torch.distributed.checkpoint.api import CheckpointException

    if isinstance(exc, CheckpointException) and exc.failures:
        exc = next(iter(exc.failures.values()))[0]
    if isinstance(exc, EngramError):
        return exc
    if isinstance(exc, OSError):
        return FormatError(f"cannot read checkpoint {path}: {exc.strerror or exc} ({getattr(exc, 'filename', '')})")
    first = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
    return FormatError(f"cannot read checkpoint {path}: {type(exc).__name__}: {first}")


def load_windows(path: Path, windows: dict[str, tuple[int, torch.Tensor]]) -> None:
    """Fill each buffer with rows [start, start + len) of its key, through DCP's resharding reads."""
    import warnings

    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.api import CheckpointException
    from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner
    from torch.distributed.checkpoint.metadata import ChunkStorageMetadata, TensorStorageMetadata
    from torch.distributed.checkpoint.planner import LoadPlan
    from torch.distributed.checkpoint.planner_helpers import create_read_items_for_chunk_list

    class WindowPlanner(DefaultLoadPlanner):
        def create_local_plan(self) -> LoadPlan:
            items = []
            for key, (start, buffer) in windows.items():
                offsets = torch.Size([start] + [0] * (buffer.dim() - 1))
                chunk = ChunkStorageMetadata(offsets, buffer.shape)
                assert self.metadata is not None  # set by DefaultLoadPlanner.set_up_planner
                entry = self.metadata.state_dict_metadata[key]
                assert isinstance(entry, TensorStorageMetadata)
                items += create_read_items_for_chunk_list(key, entry, [chunk])
            return LoadPlan(items)

        def lookup_tensor(self, index: Any) -> torch.Tensor:
            return windows[index.fqn][1]

    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="torch.distributed is disabled")
            dcp.load({}, storage_reader=_verified_reader(path), planner=WindowPlanner())
    except (Exception, CheckpointException) as exc:
        raise _load_failure(path, exc) from None


def check_pieces(path: Path, metadata: Any, keys: Iterable[str]) -> None:
    """Refuse, before anything is read, a checkpoint whose `.metadata` does not add up: pieces
    of a tensor that overlap or leave part of it uncovered (the buffer would keep garbage there),
    a piece with no stored location, a location outside the folder, a missing or short file."""
    storage = {(index.fqn, tuple(index.offset or ())): info for index, info in metadata.storage_data.items()}
    sizes: dict[str, int] = {}
    for key in keys:
        entry = metadata.state_dict_metadata[key]
        shape = tuple(entry.size)
        boxes = []
        for chunk in entry.chunks:
            offsets, extent = tuple(chunk.offsets), tuple(chunk.sizes)
            if (
                len(offsets) != len(shape)
                or len(extent) != len(shape)
                or any(o < 0 or n < 0 or o + n > s for o, n, s in zip(offsets, extent, shape))
            ):
                raise FormatError(f"{path}/.metadata: a piece of {key} at {list(offsets)} lies outside its {shape}")
            info = storage.get((key, offsets))
            if info is None:
                raise FormatError(
                    f"{path}/.metadata lists a piece of {key} at {list(offsets)} but not where it is stored"
                )
            name = info.relative_path
            if not plain_file_name(name):
                raise FormatError(f"{path}/.metadata puts a piece of {key} in {name!r}, outside the checkpoint folder")
            if name not in sizes:
                try:
                    sizes[name] = (path / name).stat().st_size
                except FileNotFoundError:
                    raise FormatError(f"{path / name} is missing (it holds part of {key})") from None
                except OSError as exc:
                    raise FormatError(f"cannot read {path / name}: {exc.strerror or exc}") from None
            if info.offset < 0 or info.length <= 0 or info.offset + info.length > sizes[name]:
                raise FormatError(
                    f"{path / name} is truncated: a piece of {key} needs bytes {info.offset:,}.."
                    f"{info.offset + info.length:,} and the file has {sizes[name]:,}"
                )
            boxes.append((offsets, extent))
        covered = sum(math.prod(extent) for _, extent in boxes)
        overlap = _first_overlap(boxes)
        if overlap is not None or covered != math.prod(shape):
            what = f"overlap at {list(overlap)}" if overlap is not None else "leave part of it uncovered"
            raise FormatError(f"{path}/.metadata: the pieces of {key} {what}")


def _first_overlap(boxes: list[tuple[tuple[int, ...], tuple[int, ...]]]) -> tuple[int, ...] | None:
    """The offsets of a box that overlaps an earlier one (a sweep along the first axis)."""
    active: list[tuple[tuple[int, ...], tuple[int, ...]]] = []
    for offsets, extent in sorted(b for b in boxes if all(b[1])):
        active = [a for a in active if a[0][0] + a[1][0] > offsets[0]]
        for other, size in active:
            if all(o < p + n and p < o + m for o, m, p, n in zip(offsets, extent, other, size)):
                return offsets
        active.append((offsets, extent))
    return None


def recorded_tables(meta: dict[str, Any], spec: TableSpec, where: str) -> dict[int, list[tuple[str, int, int]]]:
    """The table pieces `engram export` recorded, refused unless each layer's pieces follow
    each other from row 0 to its last row under distinct names that no metadata tensor has."""
    try:
        tables = {
            int(layer): [(str(e["key"]), int(e["start"]), int(e["stop"])) for e in entries]
            for layer, entries in meta["tables"].items()
        }
    except (KeyError, TypeError, ValueError, AttributeError):
        raise FormatError(f"{where}: the table list in {META_KEY} is damaged") from None
    names = piece_names((layer, key, a, b) for layer, parts in tables.items() for key, a, b in parts)
    check_distinct_keys(names, metadata_keys(spec.layer_ids), where)
    for layer, parts in tables.items():
        if layer not in spec.layer_ids:
            raise FormatError(f"{where} records a table for layer {layer}, which its spec does not have")
        bounds = [0] + [b for _, _, b in parts]
        if not parts or [a for _, a, _ in parts] != bounds[:-1] or bounds[-1] != spec.rows(layer):
            raise FormatError(
                f"{where}: the recorded tensors of layer {layer} do not cover its {spec.rows(layer):,} rows in order"
            )
    return tables
