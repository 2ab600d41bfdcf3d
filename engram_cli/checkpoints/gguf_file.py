"""The GGUF container: reading a file's header (or a split set's), and encoding one.

A GGUF file (version 2 or 3, little-endian) is, in order: the magic `GGUF`, the version (uint32),
the tensor count and the key count (uint64 each); the keys, each a string (uint64 length, UTF-8
bytes), a value type (uint32, `GGUFValueType`) and the value (an array is its item type, uint64
count and items); the tensor infos, each a name string, the dimension count (uint32), the ggml
dimensions (uint64, innermost first: {head_dim, rows} for a table), the tensor type (uint32,
`GGMLQuantizationType`) and the data offset (uint64, relative to the data section); padding to
`general.alignment` (default 32); the data section, each tensor starting at a multiple of the
alignment. A tensor's size follows from its shape and type (`GGML_QUANT_SIZES`).

A split set (llama.cpp's gguf-split) is `NAME-00001-of-000NN.gguf` ... each a GGUF of its own
holding some of the tensors, with `split.no`, `split.count` and `split.tensors.count`; the first
holds the model's keys. `read_set` reads the headers of every file of a set from its first.

The header is parsed with every length checked against the file's size before
it is used, so a truncated or damaged file is a one-line `FormatError`, never a huge allocation.
Each key keeps its encoded bytes, so a copy (`--into`) writes the keys it keeps byte for byte.
"""

from __future__ import annotations

import re
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np
from gguf import GGML_QUANT_SIZES, GGUF_DEFAULT_ALIGNMENT, GGUF_MAGIC, GGMLQuantizationType, GGUFValueType

from ..errors import FormatError

_SCALARS: dict[GGUFValueType, str] = {
    GGUFValueType.UINT8: "<u1",
    GGUFValueType.INT8: "<i1",
    GGUFValueType.UINT16: "<u2",
    GGUFValueType.INT16: "<i2",
    GGUFValueType.UINT32: "<u4",
    GGUFValueType.INT32: "<i4",
    GGUFValueType.FLOAT32: "<f4",
    GGUFValueType.UINT64: "<u8",
    GGUFValueType.INT64: "<i8",
    GGUFValueType.FLOAT64: "<f8",
    GGUFValueType.BOOL: "<u1",
}
_MAX_DIMS = 4  # GGML_MAX_DIMS
ALIGNMENT_KEY = "general.alignment"
SPLIT_COUNT = "split.count"
_SPLIT_NAME = re.compile(r"^(?P<stem>.+)-(?P<no>\d{5})-of-(?P<count>\d{5})\.gguf$")


@dataclass(frozen=True)
class Field:
    """One key: its value type, its value (a scalar, str, numpy array or list of str), its bytes."""

    kind: GGUFValueType
    value: Any
    raw: bytes
    item_kind: GGUFValueType | None = None


@dataclass(frozen=True)
class TensorInfo:
    """One tensor of a file: ggml shape (innermost first), type, and where its bytes are."""

    name: str
    shape: tuple[int, ...]
    qtype: GGMLQuantizationType
    path: Path
    offset: int  # absolute, in `path`
    nbytes: int


@dataclass
class Header:
    """A GGUF file's (or split set's) keys and tensors."""

    path: Path
    version: int
    fields: dict[str, Field]
    tensors: dict[str, TensorInfo]
    alignment: int
    files: list[Path]

    def value(self, key: str) -> Any:
        """The value of a key (None when absent)."""
        field = self.fields.get(key)
        return None if field is None else field.value


class _Cursor:
    """Reads little-endian values from a file, refusing to pass its end."""

    def __init__(self, handle: BinaryIO, size: int, path: Path) -> None:
        self.handle, self.size, self.path, self.at = handle, size, path, 0

    def take(self, n: int, what: str) -> bytes:
        if n < 0 or self.at + n > self.size:
            raise FormatError(
                f"{self.path} is truncated or damaged: {what} needs {n:,} bytes at offset {self.at:,}, "
                f"but the file has {self.size:,}"
            )
        self.at += n
        return self.handle.read(n)

    def since(self, start: int) -> bytes:
        """The bytes from `start` to here (read again: the encoded form of what was parsed)."""
        end = self.at
        self.handle.seek(start)
        raw = self.handle.read(end - start)
        self.handle.seek(end)
        return raw

    def scalar(self, fmt: str, what: str) -> Any:
        return struct.unpack(fmt, self.take(struct.calcsize(fmt), what))[0]

    def string(self, what: str) -> str:
        size = self.scalar("<Q", what)
        try:
            return self.take(size, what).decode("utf-8")
        except UnicodeDecodeError:
            raise FormatError(f"{self.path}: {what} is not UTF-8") from None

    def value(self, kind: GGUFValueType, what: str) -> tuple[Any, GGUFValueType | None]:
        if kind == GGUFValueType.STRING:
            return self.string(what), None
        if kind in _SCALARS:
            value = np.frombuffer(self.take(np.dtype(_SCALARS[kind]).itemsize, what), _SCALARS[kind])[0]
            return (bool(value) if kind == GGUFValueType.BOOL else value.item()), None
        if kind != GGUFValueType.ARRAY:
            raise FormatError(f"{self.path}: {what} has unknown value type {int(kind)}")
        item = _value_type(self.scalar("<I", what), self.path, what)
        count = self.scalar("<Q", what)
        if item == GGUFValueType.STRING:
            if count > self.size:
                self.take(count * 8, what)  # a count no file this size can hold: truncated
            return [self.string(what) for _ in range(count)], item
        if item not in _SCALARS:
            raise FormatError(f"{self.path}: {what} is an array of {item.name}, which engram does not read")
        dtype = np.dtype(_SCALARS[item])
        return np.frombuffer(self.take(count * dtype.itemsize, what), dtype).copy(), item


def _value_type(raw: int, path: Path, what: str) -> GGUFValueType:
    try:
        return GGUFValueType(raw)
    except ValueError:
        raise FormatError(f"{path}: {what} has unknown value type {raw}") from None


def read_header(path: Path) -> Header:
    """The keys and tensor infos of one GGUF file, every tensor checked to lie whole in the file."""
    try:
        with path.open("rb", buffering=1 << 20) as handle:
            size = path.stat().st_size
            if size < 24:
                raise FormatError(f"{path} is not a GGUF file (only {size} bytes)")
            return _parse(_Cursor(handle, size, path))
    except OSError as exc:
        raise FormatError(f"cannot read {path}: {exc.strerror or exc}") from None


def _parse(cursor: _Cursor) -> Header:
    path = cursor.path
    if cursor.scalar("<I", "the magic") != GGUF_MAGIC:
        raise FormatError(f"{path} is not a GGUF file (no GGUF magic)")
    version = cursor.scalar("<I", "the version")
    if version not in (2, 3):
        raise FormatError(f"{path} is GGUF version {version}; engram reads versions 2 and 3 (little-endian)")
    tensor_count = cursor.scalar("<Q", "the tensor count")
    key_count = cursor.scalar("<Q", "the key count")
    fields: dict[str, Field] = {}
    for index in range(key_count):
        start = cursor.at
        key = cursor.string(f"key {index}")
        kind = _value_type(cursor.scalar("<I", key), path, key)
        value, item = cursor.value(kind, key)
        if key in fields:
            raise FormatError(f"{path} has key {key} twice")
        fields[key] = Field(kind, value, cursor.since(start), item)
    alignment = fields[ALIGNMENT_KEY].value if ALIGNMENT_KEY in fields else GGUF_DEFAULT_ALIGNMENT
    if not isinstance(alignment, int) or alignment <= 0 or alignment & (alignment - 1):
        raise FormatError(f"{path}: {ALIGNMENT_KEY} is {alignment!r}, not a power of two")
    infos = []
    for index in range(tensor_count):
        name = cursor.string(f"tensor info {index}")
        dims = cursor.scalar("<I", name)
        if not 1 <= dims <= _MAX_DIMS:
            raise FormatError(f"{path}: tensor {name} has {dims} dimensions (ggml has 1 to {_MAX_DIMS})")
        shape = tuple(int(d) for d in np.frombuffer(cursor.take(8 * dims, name), "<u8"))
        raw = cursor.scalar("<I", name)
        try:
            qtype = GGMLQuantizationType(raw)
        except ValueError:
            raise FormatError(f"{path}: tensor {name} has unknown ggml type {raw}") from None
        infos.append((name, shape, qtype, cursor.scalar("<Q", name)))
    data_start = -(-cursor.at // alignment) * alignment
    tensors: dict[str, TensorInfo] = {}
    for name, shape, qtype, offset in infos:
        if name in tensors:
            raise FormatError(f"{path} has tensor {name} twice")
        tensors[name] = _tensor(path, name, shape, qtype, data_start + offset, alignment)
    _check_extents(path, list(tensors.values()), cursor.size)
    return Header(path, version, fields, tensors, alignment, [path])


def _tensor(
    path: Path, name: str, shape: tuple[int, ...], qtype: GGMLQuantizationType, offset: int, alignment: int
) -> TensorInfo:
    if qtype not in GGML_QUANT_SIZES:
        raise FormatError(f"{path}: tensor {name} has ggml type {qtype.name}, whose block size is unknown")
    block, type_size = GGML_QUANT_SIZES[qtype]
    if shape[0] % block:
        raise FormatError(
            f"{path}: tensor {name} has shape {_shape(shape)} of type {qtype.name}, but a row of "
            f"{shape[0]} values is not whole {block}-value blocks"
        )
    if offset % alignment:
        raise FormatError(f"{path}: tensor {name} starts at {offset:,}, not a multiple of the alignment {alignment}")
    return TensorInfo(name, shape, qtype, path, offset, int(np.prod(shape, dtype=object)) // block * type_size)


def _check_extents(path: Path, tensors: list[TensorInfo], size: int) -> None:
    """Every tensor lies in the file and none overlaps the next: a size that disagrees with its
    shape and type (or a cut file) would read another tensor's bytes, or past the end."""
    ordered = sorted(tensors, key=lambda t: t.offset)
    for tensor, following in zip(ordered, [*ordered[1:], None], strict=True):
        end = tensor.offset + tensor.nbytes
        if following is not None and end > following.offset:
            raise FormatError(
                f"{path}: tensor {tensor.name} ({_shape(tensor.shape)} of {tensor.qtype.name}, "
                f"{tensor.nbytes:,} bytes) runs into tensor {following.name} at offset {following.offset:,}: "
                "its size disagrees with its shape and type"
            )
        if end > size:
            raise FormatError(
                f"{path} is truncated: tensor {tensor.name} ({_shape(tensor.shape)} of {tensor.qtype.name}) "
                f"ends at byte {end:,}, but the file has {size:,}"
            )


def _shape(shape: tuple[int, ...]) -> str:
    return "{" + ", ".join(f"{d:,}" for d in shape) + "}"


def split_names(path: Path) -> list[Path] | None:
    """Every file of a split set named by its first (`-00001-of-000NN.gguf`); None for a lone file."""
    match = _SPLIT_NAME.match(path.name)
    if match is None:
        return None
    count = int(match.group("count"))
    return [path.with_name(f"{match.group('stem')}-{i:05d}-of-{count:05d}.gguf") for i in range(1, count + 1)]


def read_set(path: Path) -> Header:
    """The header of a GGUF file, or of a whole split set given its first file: the first file's
    keys and every file's tensors."""
    header = read_header(path)
    names = split_names(path)
    count = header.value(SPLIT_COUNT)
    if names is None or count is None:
        return header
    if int(header.value("split.no") or 0) != 0:
        raise FormatError(f"{path} is part {header.value('split.no') + 1} of a split set; give its first file")
    if count != len(names):
        raise FormatError(f"{path} says split.count {count}, but its name says {len(names)} files")
    for other in names[1:]:
        if not other.is_file():
            raise FormatError(f"{path} is the first of {count} files, but {other.name} is missing")
        part = read_header(other)
        for name, tensor in part.tensors.items():
            if name in header.tensors:
                raise FormatError(f"tensor {name} is in both {header.tensors[name].path.name} and {other.name}")
            header.tensors[name] = tensor
    header.files = names
    wanted = header.value("split.tensors.count")
    if wanted is not None and wanted != len(header.tensors):
        raise FormatError(f"{path} says split.tensors.count {wanted}, but its {count} files hold {len(header.tensors)}")
    return header


def encode_string(text: str) -> bytes:
    """A GGUF string: uint64 length and UTF-8 bytes."""
    raw = text.encode("utf-8")
    return struct.pack("<Q", len(raw)) + raw


def encode_key(key: str, kind: GGUFValueType, value: Any, item: GGUFValueType | None = None) -> bytes:
    """One key's bytes: name, value type, value (an array needs its `item` type)."""
    head = encode_string(key) + struct.pack("<I", int(kind))
    if kind == GGUFValueType.STRING:
        return head + encode_string(value)
    if kind == GGUFValueType.ARRAY:
        assert item is not None and item in _SCALARS, "arrays of numbers only"
        array = np.ascontiguousarray(value, dtype=_SCALARS[item])
        return head + struct.pack("<IQ", int(item), array.size) + array.tobytes()
    return head + np.asarray(value, dtype=_SCALARS[kind]).tobytes()


def encode_tensor_info(name: str, shape: tuple[int, ...], qtype: GGMLQuantizationType, offset: int) -> bytes:
    """One tensor info's bytes: name, dimensions (innermost first), type, data offset."""
    return (
        encode_string(name)
        + struct.pack("<I", len(shape))
        + struct.pack(f"<{len(shape)}Q", *shape)
        + struct.pack("<IQ", int(qtype), offset)
    )


def tensor_bytes(shape: tuple[int, ...], qtype: GGMLQuantizationType) -> int:
    """Bytes of a tensor of this ggml shape and type."""
    block, type_size = GGML_QUANT_SIZES[qtype]
    return int(np.prod(shape, dtype=object)) // block * type_size


def layout_file(
    keys: list[bytes], tensors: list[tuple[str, tuple[int, ...], GGMLQuantizationType]], alignment: int
) -> tuple[bytes, list[int], int]:
    """The header of a GGUF file of these keys and tensors (in this order), with where each
    tensor's data starts (absolute) and the file's size."""
    offsets, at = [], 0
    for _, shape, qtype in tensors:
        offsets.append(at)
        at = -(-(at + tensor_bytes(shape, qtype)) // alignment) * alignment
    infos = [encode_tensor_info(n, s, q, o) for (n, s, q), o in zip(tensors, offsets, strict=True)]
    header = struct.pack("<IIQQ", GGUF_MAGIC, 3, len(tensors), len(keys)) + b"".join(keys) + b"".join(infos)
    header += b"\0" * (-len(header) % alignment)
    last = tensor_bytes(tensors[-1][1], tensors[-1][2]) if tensors else 0
    size = len(header) + (offsets[-1] + last if tensors else 0)
    return header, [len(header) + o for o in offsets], size
