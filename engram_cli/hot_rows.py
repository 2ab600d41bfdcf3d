"""The hotness file: per layer, the rows a corpus read most, for warming up (or pinning) a row cache.

A safetensors file (what `engram inspect --traffic --hot-rows OUT.safetensors` writes):

- `layers.{L}.rows`: int64, the layer's row ids (global in the layer's table: head offset plus
  bucket), most looked-up first, ties by row id ascending;
- `layers.{L}.lookups`: int64, the lookups of each of those rows, the same length, non-increasing;
- metadata (strings): `format` = "engram-hot-rows", `version` = "1", `spec` (the spec's name),
  `spec_fingerprint` (`spec_fingerprint`), `projection_fingerprint` (the projection's),
  `corpus_tokens`, `layers` (comma-separated layer ids), and per layer `lookups.{L}` (the layer's
  total lookups, of which the rows listed serve `sum(layers.{L}.lookups)`) and `row_bytes.{L}` (a
  row's bytes at the store dtype, by which `--hot-bytes` cut the list).

A cache fills with the first rows of each layer's list, as many as it holds: the rows that served
the most lookups of the corpus. `read_hot_rows` checks every part of that contract and says in one
line what is wrong with a damaged file.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from safetensors import SafetensorError
from safetensors.numpy import load, save

from .errors import FormatError, UsageError
from .helpers import read_file_limited
from .output import write_file
from .spec import TableSpec

FORMAT = "engram-hot-rows"
VERSION = "1"

# The largest hot-rows file read back (16 bytes a row: 2**33 bytes is over 500 M rows).
MAX_FILE_BYTES = 1 << 36


def spec_fingerprint(spec: TableSpec) -> str:
    """The sha256 of what decides a spec's rows (its `[engram]` fields, as canonical JSON): a hot-rows
    file applies to tables of the same fingerprint, whatever their name, dtype or init."""
    fields = json.dumps(spec.to_dict()["engram"], sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(fields.encode()).hexdigest()


@dataclass
class HotRows:
    """A hotness file's contents: per layer the rows (most looked-up first) and their lookups."""

    spec_name: str
    spec_fingerprint: str
    projection_fingerprint: str
    corpus_tokens: int
    rows: dict[int, np.ndarray]  # layer -> int64 row ids
    lookups: dict[int, np.ndarray]  # layer -> int64 lookups of those rows
    total_lookups: dict[int, int]  # layer -> all lookups of the layer in the corpus
    row_bytes: dict[int, int]  # layer -> bytes of a row at the store dtype

    def write(self, path: str | Path) -> None:
        """Write the file (atomically: a reader never sees half of it)."""
        tensors = {}
        for layer in sorted(self.rows):
            tensors[f"layers.{layer}.rows"] = np.ascontiguousarray(self.rows[layer], np.int64)
            tensors[f"layers.{layer}.lookups"] = np.ascontiguousarray(self.lookups[layer], np.int64)
        metadata = {
            "format": FORMAT,
            "version": VERSION,
            "spec": self.spec_name,
            "spec_fingerprint": self.spec_fingerprint,
            "projection_fingerprint": self.projection_fingerprint,
            "corpus_tokens": str(self.corpus_tokens),
            "layers": ",".join(str(layer) for layer in sorted(self.rows)),
            **{f"lookups.{layer}": str(total) for layer, total in self.total_lookups.items()},
            **{f"row_bytes.{layer}": str(size) for layer, size in self.row_bytes.items()},
        }
        write_file(path, save(tensors, metadata=metadata))


def _int(metadata: dict[str, str], key: str, where: str) -> int:
    text = metadata.get(key)
    if text is None:
        raise FormatError(f"{where}: metadata {key!r} is missing")
    try:
        value = int(text)
    except ValueError:
        raise FormatError(f"{where}: metadata {key!r} must be an integer, got {text!r}") from None
    if value < 0:
        raise FormatError(f"{where}: metadata {key!r} must not be negative, got {value}")
    return value


def read_hot_rows(path: str | Path) -> HotRows:
    """A hotness file, checked: its format, metadata, and per layer int64 rows and lookups of one
    length, lookups non-increasing and positive, ties in ascending row order, rows distinct and not
    negative; anything else is a one-line `FormatError`."""
    where = f"hot-rows file {path}"
    try:
        data = read_file_limited(Path(path), MAX_FILE_BYTES, where)
    except OSError as exc:
        raise UsageError(f"cannot read {where}: {exc.strerror or exc}") from None
    try:
        with_header = load(data)
        header_size = int.from_bytes(data[:8], "little")
        metadata = json.loads(data[8 : 8 + header_size]).get("__metadata__") or {}
    except (SafetensorError, ValueError, UnicodeDecodeError) as exc:
        raise FormatError(f"{where} is not a readable safetensors file: {str(exc).splitlines()[0]}") from None
    if not isinstance(metadata, dict) or metadata.get("format") != FORMAT:
        raise FormatError(f"{where} is not an engram hot-rows file (metadata format is not {FORMAT!r})")
    if metadata.get("version") != VERSION:
        raise FormatError(f"{where} has version {metadata.get('version')!r}; this engram reads version {VERSION}")
    for key in ("spec", "spec_fingerprint", "projection_fingerprint", "layers"):
        if key not in metadata:
            raise FormatError(f"{where}: metadata {key!r} is missing")
    try:
        layers = [int(x) for x in metadata["layers"].split(",") if x]
    except ValueError:
        raise FormatError(f"{where}: metadata 'layers' must list layer ids, got {metadata['layers']!r}") from None
    expected = {f"layers.{layer}.{part}" for layer in layers for part in ("rows", "lookups")}
    if set(with_header) != expected:
        extra = sorted(set(with_header) ^ expected)
        raise FormatError(f"{where}: tensors do not match the layers {layers} ({', '.join(extra[:4])})")
    rows, lookups, totals, row_bytes = {}, {}, {}, {}
    for layer in layers:
        r, c = with_header[f"layers.{layer}.rows"], with_header[f"layers.{layer}.lookups"]
        if r.dtype != np.int64 or c.dtype != np.int64 or r.ndim != 1 or r.shape != c.shape:
            raise FormatError(
                f"{where}: layer {layer} needs 1-D int64 rows and lookups of one length, got "
                f"{r.dtype} {list(r.shape)} and {c.dtype} {list(c.shape)}"
            )
        if r.size and (r.min() < 0 or c.min() < 1):
            raise FormatError(f"{where}: layer {layer} has a negative row id or a row of no lookups")
        if r.size > 1:
            step = np.diff(c)
            if (step > 0).any() or ((step == 0) & (np.diff(r) <= 0)).any():
                raise FormatError(
                    f"{where}: layer {layer} is not in hotness order (most looked-up first, ties by row id)"
                )
            if np.unique(r).size != r.size:
                raise FormatError(f"{where}: layer {layer} lists a row twice")
        rows[layer], lookups[layer] = r, c
        totals[layer] = _int(metadata, f"lookups.{layer}", where)
        row_bytes[layer] = _int(metadata, f"row_bytes.{layer}", where)
        if int(c.sum()) > totals[layer]:
            raise FormatError(f"{where}: layer {layer}'s rows have more lookups than the layer's total")
    return HotRows(
        spec_name=metadata["spec"],
        spec_fingerprint=metadata["spec_fingerprint"],
        projection_fingerprint=metadata["projection_fingerprint"],
        corpus_tokens=_int(metadata, "corpus_tokens", where),
        rows=rows,
        lookups=lookups,
        total_lookups=totals,
        row_bytes=row_bytes,
    )
