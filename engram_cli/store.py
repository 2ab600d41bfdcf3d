"""Table stores: the Engram tables of a spec as one sharded zarr v3 group.

Layout of a store (all zarr v3, readable by any zarr v3 reader):

    STORE/zarr.json                  group; attributes["engram"] hold the format version, the
                                     spec, the projection's metadata, per layer the head sizes,
                                     offsets, multipliers, dim, chunk/shard rows and the rank
                                     partition, the init algorithm id, and `complete`
    STORE/projection                 int64 (vocab_size,): tokenizer id -> canonical id
    STORE/projection_tokenizer       uint8: the tokenizer JSON the projection came from (if any)
    STORE/layer_<id>                 (rows, dim) table of one layer, heads one after another in
                                     hashing order (row = offset of head + bucket)
    STORE/layer_<id>/c/<i>/0         shard file i: rows [i * shard_rows, (i + 1) * shard_rows)

Each layer array uses the sharding codec: inner chunks of whole rows (about 1 MiB, cheap
random row reads) with a crc32c per chunk, shard files of at most 128 MiB with a crc32c'd
index. Rank boundaries always fall on shard boundaries, so every rank reads or writes whole
shard files alone; zarr rewrites a partially written shard, so no plan ever lets two writers
share one. Shards are encoded here (the sharding format is simple and fixed) and written to a
temporary name then renamed, so a shard file is either complete or absent; `complete` flips to
true only after every shard exists, which is what `--resume` and readers rely on.
"""

from __future__ import annotations

import concurrent.futures
import math
import os
import resource
import shutil
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any

import google_crc32c
import numpy as np
import zarr
from rich.console import Console
from rich.progress import TextColumn
from rich.table import Table
from zarr.codecs import Crc32cCodec, ZstdCodec
from zarr.core.buffer import default_buffer_prototype
from zarr.core.sync import sync
from zarr.storage import LocalStore

from .cluster import absolute_store_path, dask_client, run_tasks
from .dtypes import BFloat16, numpy_dtype
from .errors import EngramError
from .init import INIT_ALGORITHM, fill_rows
from .spec import DTYPE_BYTES, TableSpec, human_bytes, load_spec, spec_from_dict
from .vocab import VocabProjection, resolve_projection

FORMAT = "engram-tables"
FORMAT_VERSION = 1
ATTRS_KEY = "engram"
PROJECTION_ARRAY = "projection"
TOKENIZER_ARRAY = "projection_tokenizer"
SHARD_BY = ("rows", "heads")

CHUNK_BYTES = 1 << 20      # inner chunk: one random row read costs at most this much I/O
SHARD_BYTES = 128 << 20    # shard file: the unit of writing, resuming and per-rank ownership
MIN_CHUNK_BYTES = 16 << 10  # below this a head-aligned layout is refused as useless
BUFFER_BUDGET = 1 << 30    # shard buffers in flight across all build workers
PIECE_BYTES = 8 << 20      # rows one generation task fills
_EMPTY = 2**64 - 1         # sharding index entry of a chunk that is not stored
_PARTIAL_SUFFIX = ".partial"


def layer_array_name(layer_id: int) -> str:
    return f"layer_{layer_id}"


@dataclass(frozen=True)
class LayerLayout:
    """Rows, chunking, sharding and rank partition of one layer table."""

    layer_id: int
    rows: int
    dim: int
    chunk_rows: int
    shard_rows: int
    partition: tuple[tuple[int, int], ...]
    itemsize: int

    @property
    def array(self) -> str:
        return layer_array_name(self.layer_id)

    @property
    def shards(self) -> int:
        return -(-self.rows // self.shard_rows)

    @property
    def chunks_per_shard(self) -> int:
        return self.shard_rows // self.chunk_rows

    def shard_range(self, index: int) -> tuple[int, int]:
        if not 0 <= index < self.shards:
            raise EngramError(f"layer {self.layer_id} has shards 0..{self.shards - 1}, not {index}")
        start = index * self.shard_rows
        return start, min(start + self.shard_rows, self.rows)

    def shard_ranges(self) -> list[tuple[int, int]]:
        return [self.shard_range(i) for i in range(self.shards)]

    def shard_key(self, index: int) -> str:
        return f"{self.array}/c/{index}/0"

    def to_json(self) -> dict[str, Any]:
        return {"array": self.array, "rows": self.rows, "dim": self.dim,
                "chunk_rows": self.chunk_rows, "shard_rows": self.shard_rows,
                "shards": self.shards, "partition": [list(p) for p in self.partition]}


def plan_layout(spec: TableSpec, ranks: int = 1, shard_by: str = "rows") -> dict[int, LayerLayout]:
    """Chunk rows, shard rows and the rank partition of every layer.

    `rows`: contiguous ranges, equal for every rank but the last (which may be short by a few
    chunks), each a whole number of shards. `heads`: whole heads per rank, which needs every
    rank boundary to be a multiple of one shard size; an error says why when it is not.
    """
    if not isinstance(ranks, int) or ranks < 1:
        raise EngramError(f"--shards must be a positive integer, got {ranks!r}")
    if shard_by not in SHARD_BY:
        raise EngramError(f"--shard-by must be one of {', '.join(SHARD_BY)}, got {shard_by!r}")
    row_bytes = spec.dim * DTYPE_BYTES[spec.dtype]
    layouts = {}
    for layer in spec.layer_ids:
        rows = spec.rows(layer)
        if shard_by == "heads" and ranks > 1:
            chunk, shard, partition = _heads_layout(layer, spec.offsets(layer), rows, row_bytes, ranks)
        else:
            chunk, shard, partition = _rows_layout(layer, rows, row_bytes, ranks)
        layouts[layer] = LayerLayout(layer, rows, spec.dim, chunk, shard, partition,
                                     DTYPE_BYTES[spec.dtype])
    return layouts


def _rows_layout(layer: int, rows: int, row_bytes: int,
                 ranks: int) -> tuple[int, int, tuple[tuple[int, int], ...]]:
    per_rank = -(-rows // ranks)
    max_chunk = max(1, CHUNK_BYTES // row_bytes)
    shards_per_rank = max(1, -(-per_rank * row_bytes // SHARD_BYTES))
    while True:  # rounding the chunk up can overshoot the shard cap by a few rows: split further
        shard_target = -(-per_rank // shards_per_rank)
        chunks_per_shard = -(-shard_target // max_chunk)
        chunk = -(-shard_target // chunks_per_shard)
        shard = chunk * chunks_per_shard
        if shard * row_bytes <= SHARD_BYTES or shard == chunk:
            break
        shards_per_rank += 1
    step = shards_per_rank * shard
    if (ranks - 1) * step >= rows:
        raise EngramError(f"layer {layer} has {rows:,} rows: too few to give each of {ranks} ranks "
                          "a shard-aligned range of its own; use fewer --shards")
    bounds = [min(r * step, rows) for r in range(ranks)] + [rows]
    return chunk, shard, tuple(zip(bounds[:-1], bounds[1:]))


def _divisors(n: int) -> list[int]:
    small, large = [], []
    d = 1
    while d * d <= n:
        if n % d == 0:
            small.append(d)
            if d * d != n:
                large.append(n // d)
        d += 1
    return small + large[::-1]


def _heads_layout(layer: int, offsets: list[int], rows: int, row_bytes: int,
                  ranks: int) -> tuple[int, int, tuple[tuple[int, int], ...]]:
    heads = len(offsets)
    if ranks > heads:
        raise EngramError(f"layer {layer} has {heads} heads, so --shard-by heads can serve at most "
                          f"{heads} ranks, not {ranks}; use --shard-by rows")
    bounds = [offsets[(r * heads) // ranks] for r in range(ranks)] + [rows]
    common = 0
    for b in bounds[1:-1]:
        common = math.gcd(common, b)
    divisors = _divisors(common)
    chunk = max(d for d in divisors if d * row_bytes <= CHUNK_BYTES or d == 1)
    if chunk * row_bytes < MIN_CHUNK_BYTES:
        shown = ", ".join(f"{b:,}" for b in bounds[1:-1][:4]) + (", ..." if ranks > 5 else "")
        raise EngramError(
            f"cannot split layer {layer} by whole heads among {ranks} ranks: its head sizes are "
            f"primes, the rank boundaries fall at rows {shown}, and zarr shards form a regular "
            f"grid, so every shard would have to be a divisor of {common:,} rows; the largest "
            f"usable one is {chunk} rows ({human_bytes(chunk * row_bytes)}), too small for chunked "
            "reads. Use --shard-by rows, or a rank count whose boundaries align")
    multiple = max((d for d in _divisors(common // chunk) if chunk * d * row_bytes <= SHARD_BYTES),
                   default=1)
    return chunk, chunk * multiple, tuple(zip(bounds[:-1], bounds[1:]))


def _is_url(path: str) -> bool:
    return "://" in path


def store_path(path: str | Path) -> str:
    """A folder path or an fsspec URL; a file:// URL is the plain local folder it names."""
    path = str(path)
    return path[len("file://"):] if path.startswith("file://") else path


class _Files:
    """Whole-object reads and atomic writes of store keys, on disk or through zarr's store API."""

    def __init__(self, store: Any) -> None:
        self.store = store
        self.root = Path(store.root) if isinstance(store, LocalStore) else None

    def put(self, key: str, parts: list[Any]) -> None:
        if self.root is None:
            joined = b"".join(memoryview(p).cast("B") for p in parts)
            sync(self.store.set(key, default_buffer_prototype().buffer.from_bytes(joined)))
            return
        path = self.root / key
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.parent / f".{path.name}.{os.getpid()}-{threading.get_ident()}{_PARTIAL_SUFFIX}"
        try:
            with open(tmp, "wb") as handle:
                for part in parts:
                    handle.write(part)
            os.replace(tmp, path)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise

    def get(self, key: str) -> bytes | None:
        if self.root is None:
            buf = sync(self.store.get(key, prototype=default_buffer_prototype()))
            return None if buf is None else buf.to_bytes()
        try:
            return (self.root / key).read_bytes()
        except (FileNotFoundError, NotADirectoryError, IsADirectoryError):
            return None

    def size(self, key: str) -> int | None:
        if self.root is None:
            if not sync(self.store.exists(key)):
                return None
            return int(sync(self.store.getsize(key)))
        try:
            return (self.root / key).stat().st_size
        except (FileNotFoundError, NotADirectoryError):
            return None

    def remove_partials(self, prefix: str) -> None:
        if self.root is not None and (self.root / prefix).is_dir():
            for stale in (self.root / prefix).rglob(f".*{_PARTIAL_SUFFIX}"):
                stale.unlink(missing_ok=True)


def encode_shard(data: np.ndarray, layout: LayerLayout) -> list[Any]:
    """The bytes of one shard file as buffers to write in order (no copy of `data`).

    zarr's `sharding_indexed` format with codecs [bytes(little), crc32c] per inner chunk and
    index codecs [bytes(little), crc32c], index at the end. A chunk that runs past the end of
    the array is padded with the fill value 0, as zarr does; chunks wholly past it are absent.
    """
    if sys.byteorder != "little":
        data = data.byteswap()
    rows = data.shape[0]
    raw = np.ascontiguousarray(data).view(np.uint8).reshape(rows, -1)
    chunk_bytes = layout.chunk_rows * raw.shape[1]
    index = np.full((layout.chunks_per_shard, 2), _EMPTY, dtype="<u8")
    parts: list[Any] = []
    offset = 0
    for i in range(layout.chunks_per_shard):
        start = i * layout.chunk_rows
        if start >= rows:
            break
        block = raw[start:start + layout.chunk_rows]
        if block.shape[0] < layout.chunk_rows:
            padded = np.zeros((layout.chunk_rows, raw.shape[1]), dtype=np.uint8)
            padded[:block.shape[0]] = block
            block = padded
        parts += [block, _crc_bytes(block)]
        index[i] = (offset, chunk_bytes + 4)
        offset += chunk_bytes + 4
    index_bytes = index.tobytes()
    parts += [index_bytes, _crc_bytes(index_bytes)]
    return parts


def _crc_bytes(data: Any) -> bytes:
    return int(google_crc32c.value(data)).to_bytes(4, "little")


def shard_file_size(layout: LayerLayout, index: int) -> int:
    start, stop = layout.shard_range(index)
    chunks = -(-(stop - start) // layout.chunk_rows)
    return chunks * (layout.chunk_rows * layout.dim * layout.itemsize + 4) + \
        layout.chunks_per_shard * 16 + 4


def _rows_text(start: int, stop: int) -> str:
    return f"rows {start}-{stop - 1}"


@dataclass
class VerifyReport:
    """What `TableStore.verify` read: every shard of every layer, all checksums good."""

    path: str
    shards: int
    bytes: int
    seconds: float

    def to_json(self) -> dict[str, Any]:
        return {"store": self.path, "shards": self.shards, "bytes": self.bytes,
                "seconds": self.seconds, "ok": True}

    def render(self, console: Console) -> None:
        console.print(f"{self.path}: {self.shards} shards, {human_bytes(self.bytes)} read, "
                      f"every crc32c checksum matches ({self.seconds:.1f} s)")


class TableStore:
    """An opened table store. Use `open_tables(path)` to read and `create_store(...)` to write.

    `.spec`, `.dtype`, `.layer_ids`, `.attrs` (the "engram" group attributes: spec, hashing
    metadata, layout), `.projection` (a VocabProjection read from the group's arrays),
    `.hasher()`, `.table(layer_id)` (the zarr array), `.head_sizes/.offsets/.multipliers`,
    `.partition(layer_id)` (rank -> (start, stop) rows), `.shard_ranges(layer_id)`,
    `.check_complete()`, `.verify()`, `.read_rows()`, `.lookup()`; writers use
    `.write_rows()`/`.write_shard()`/`.build_shard()` and then `.mark_complete()`.
    """

    def __init__(self, path: str, group: zarr.Group, writable: bool) -> None:
        self.path = path
        self._group = group
        self._writable = writable
        self._files = _Files(group.store)
        attrs = dict(group.attrs).get(ATTRS_KEY)
        if not isinstance(attrs, dict) or attrs.get("format") != FORMAT:
            raise EngramError(f"{path} is a zarr group but not an engram table store")
        if attrs.get("format_version") != FORMAT_VERSION:
            raise EngramError(f"{path} has table store format version {attrs.get('format_version')}; "
                              f"this engram reads version {FORMAT_VERSION}")
        self._attrs = attrs
        try:
            self.spec: TableSpec = spec_from_dict(attrs["spec"], name=attrs["spec"].get("name", "custom"))
            self.dtype: str = attrs["dtype"]
            self.layouts: dict[int, LayerLayout] = {}
            for layer in attrs.get("stored_layers", self.spec.layer_ids):
                info = attrs["layers"][str(layer)]
                self.layouts[layer] = LayerLayout(
                    layer, info["rows"], info["dim"], info["chunk_rows"], info["shard_rows"],
                    tuple(tuple(p) for p in info["partition"]), DTYPE_BYTES[self.dtype])
        except (KeyError, TypeError, ValueError, AttributeError) as exc:
            raise EngramError(f"{path}: the store's attributes are damaged ({exc!r})") from None
        self._tables: dict[int, Any] = {}
        self._verified_present = False

    # ---- reading ---------------------------------------------------------------------------

    @property
    def attrs(self) -> dict[str, Any]:
        return self._attrs

    @property
    def layer_ids(self) -> tuple[int, ...]:
        """The layers this store holds: all of the spec's, or those an import chose."""
        return tuple(self.layouts)

    @property
    def ranks(self) -> int:
        return int(self._attrs["sharding"]["ranks"])

    @property
    def shard_by(self) -> str:
        return str(self._attrs["sharding"]["shard_by"])

    @property
    def init(self) -> dict[str, Any]:
        return dict(self._attrs["init"])

    @property
    def is_complete(self) -> bool:
        return bool(self._attrs.get("complete"))

    @property
    def numpy_dtype(self) -> np.dtype:
        return numpy_dtype(self.dtype)

    def layout(self, layer_id: int) -> LayerLayout:
        try:
            return self.layouts[int(layer_id)]
        except (KeyError, ValueError):
            raise EngramError(f"layer {layer_id} is not in the store (layers: "
                              f"{', '.join(map(str, self.layer_ids))})") from None

    def _layer_attrs(self, layer_id: int) -> dict[str, Any]:
        self.layout(layer_id)
        return self._attrs["layers"][str(int(layer_id))]

    def head_sizes(self, layer_id: int) -> list[int]:
        return list(self._layer_attrs(layer_id)["head_sizes"])

    def offsets(self, layer_id: int) -> list[int]:
        return list(self._layer_attrs(layer_id)["offsets"])

    def multipliers(self, layer_id: int) -> np.ndarray:
        return np.array(self._layer_attrs(layer_id)["multipliers"], dtype=np.int64)

    def partition(self, layer_id: int) -> list[tuple[int, int]]:
        """Rows (start, stop) of every rank: whole shards, so each rank reads and writes alone."""
        return list(self.layout(layer_id).partition)

    def shard_ranges(self, layer_id: int) -> list[tuple[int, int]]:
        return self.layout(layer_id).shard_ranges()

    def table(self, layer_id: int) -> Any:
        """The zarr array of a layer: `table[hasher.rows(ids)[layer_id]]`-style reads."""
        layout = self.layout(layer_id)
        if layout.layer_id not in self._tables:
            try:
                self._tables[layout.layer_id] = self._group[layout.array]
            except KeyError:
                raise EngramError(f"{self.path} has no array {layout.array}: the store is damaged; "
                                  "rebuild it with --overwrite") from None
        return self._tables[layout.layer_id]

    @cached_property
    def projection(self) -> VocabProjection:
        info = self._attrs["projection"]
        try:
            lookup = np.asarray(self._group[info["array"]][:])
            tokenizer = None
            if info.get("tokenizer_array"):
                tokenizer = np.asarray(self._group[info["tokenizer_array"]][:]).tobytes()
        except (KeyError, ValueError, OSError) as exc:
            raise EngramError(f"{self.path}: cannot read the projection arrays ({exc}); "
                              "rebuild the store with --overwrite") from None
        projection = VocabProjection(lookup, dict(info.get("metadata", {})), tokenizer)
        if projection.fingerprint() != info["fingerprint"]:
            raise EngramError(f"{self.path}: the projection array does not match its recorded "
                              "fingerprint; the store is damaged")
        return projection

    def hasher(self) -> Any:
        from .hashing import NgramHasher

        return NgramHasher(self.spec, self.projection)

    def missing_shards(self) -> list[tuple[int, int]]:
        """(layer, shard index) of every shard file that is absent or of the wrong size."""
        missing = []
        for layer, layout in self.layouts.items():
            for index in range(layout.shards):
                if self._files.size(layout.shard_key(index)) != shard_file_size(layout, index):
                    missing.append((layer, index))
        return missing

    def _describe(self, shards: list[tuple[int, int]], limit: int = 4) -> str:
        spans: list[tuple[int, int, int, int]] = []  # layer, first shard, last shard, count
        for layer, index in shards:
            if spans and spans[-1][0] == layer and spans[-1][2] == index - 1:
                spans[-1] = (layer, spans[-1][1], index, spans[-1][3] + 1)
            else:
                spans.append((layer, index, index, 1))
        parts = []
        for layer, first, last, _ in spans[:limit]:
            layout = self.layouts[layer]
            start, stop = layout.shard_range(first)[0], layout.shard_range(last)[1]
            which = f"shard {first}" if first == last else f"shards {first}-{last}"
            parts.append(f"layer {layer} {_rows_text(start, stop)} ({which})")
        more = f" and {len(spans) - limit} more ranges" if len(spans) > limit else ""
        return "; ".join(parts) + more

    def check_complete(self) -> None:
        """Raise EngramError naming layers and rows unless the build finished and every shard
        file is in place (a cheap listing; `verify()` also reads the checksums)."""
        missing = self.missing_shards()
        if not self.is_complete:
            what = (f"{self._describe(missing)} missing" if missing
                    else "every shard is written but it was never marked complete")
            raise EngramError(f"table store {self.path} is incomplete (its build was interrupted): "
                              f"{what}; finish it with `engram build-tables ... -o {self.path} --resume`")
        if missing:
            raise EngramError(f"table store {self.path} is damaged: {self._describe(missing)} "
                              "missing or truncated; rebuild it with --resume")
        self._verified_present = True

    def check_shard(self, layer_id: int, index: int) -> str | None:
        """Why shard `index` of a layer is unusable (missing, truncated, checksum), or None."""
        layout = self.layout(layer_id)
        data = self._files.get(layout.shard_key(index))
        return "missing" if data is None else _shard_problem(data, layout, index)

    def verify(self, workers: int | None = None,
               on_shard: Callable[[int], None] | None = None) -> VerifyReport:
        """Read every shard and check every crc32c; raise EngramError naming bad layers and rows.

        `on_shard(rows)` is called after each shard, for progress bars.
        """
        started = time.perf_counter()
        jobs = [(layer, i) for layer, lay in self.layouts.items() for i in range(lay.shards)]
        bad: list[tuple[int, int, str]] = []
        total = 0

        def check(job: tuple[int, int]) -> tuple[int, int, str | None, int]:
            layer, index = job
            layout = self.layouts[layer]
            data = self._files.get(layout.shard_key(index))
            if data is None:
                return layer, index, "missing", 0
            return layer, index, _shard_problem(data, layout, index), len(data)

        with concurrent.futures.ThreadPoolExecutor(max_workers=workers or min(4, _cpu_count())) as pool:
            for layer, index, problem, nbytes in pool.map(check, jobs):
                total += nbytes
                if problem:
                    bad.append((layer, index, problem))
                if on_shard:
                    start, stop = self.layouts[layer].shard_range(index)
                    on_shard(stop - start)
        if bad:
            lines = [f"layer {layer} {_rows_text(*self.layouts[layer].shard_range(index))} "
                     f"(shard {index}): {problem}" for layer, index, problem in bad[:5]]
            more = f"; and {len(bad) - 5} more bad shards" if len(bad) > 5 else ""
            raise EngramError(f"table store {self.path} failed verification: " + "; ".join(lines) + more)
        if not self.is_complete:
            self.check_complete()
        return VerifyReport(self.path, len(jobs), total, time.perf_counter() - started)

    def _ensure_readable(self, layer_id: int, start: int, stop: int) -> None:
        if self._verified_present:
            return
        layout = self.layout(layer_id)
        first, last = start // layout.shard_rows, max(start, stop - 1) // layout.shard_rows
        absent = [(layout.layer_id, i) for i in range(first, min(last, layout.shards - 1) + 1)
                  if self._files.size(layout.shard_key(i)) != shard_file_size(layout, i)]
        if absent:
            raise EngramError(f"table store {self.path} is incomplete: {self._describe(absent)} "
                              "not written yet")

    def _read_failed(self, layer_id: int, start: int, stop: int, exc: Exception) -> EngramError:
        layout = self.layout(layer_id)
        first, last = start // layout.shard_rows, max(start, stop - 1) // layout.shard_rows
        for index in range(first, min(last, layout.shards - 1) + 1):
            problem = self.check_shard(layer_id, index)
            if problem:
                return EngramError(f"table store {self.path}: layer {layout.layer_id} "
                                   f"{_rows_text(*layout.shard_range(index))} (shard {index}): {problem}")
        raise exc

    def read_rows(self, layer_id: int, start: int, stop: int) -> np.ndarray:
        """Rows [start, stop) of a layer; a bad checksum raises EngramError naming the rows."""
        self._ensure_readable(layer_id, start, stop)
        if self._files.root is not None:
            return self._read_local_rows(self.layout(layer_id), start, stop)
        try:
            return np.asarray(self.table(layer_id)[start:stop])
        except (ValueError, OSError) as exc:
            raise self._read_failed(layer_id, start, stop, exc) from None

    def _read_local_rows(self, layout: LayerLayout, start: int, stop: int) -> np.ndarray:
        """Read whole inner chunks straight from the shard files, checking each crc32c: about
        3x zarr's decode path, which is what exports and table statistics stream through."""
        out = np.empty((max(stop - start, 0), layout.dim), dtype=self.numpy_dtype)
        flat = out.view(np.uint8).reshape(len(out), -1)
        row_bytes = layout.dim * layout.itemsize
        chunk_bytes = layout.chunk_rows * row_bytes
        index_len = layout.chunks_per_shard * 16 + 4
        for shard in range(start // layout.shard_rows, -(-stop // layout.shard_rows)):
            base = shard * layout.shard_rows
            first = (max(start, base) - base) // layout.chunk_rows
            last = (min(stop, base + layout.shard_rows) - 1 - base) // layout.chunk_rows
            path = self._files.root / layout.shard_key(shard)

            def bad(what: str, a: int = base, b: int = min(base + layout.shard_rows, layout.rows)) -> EngramError:
                return EngramError(f"table store {self.path}: layer {layout.layer_id} "
                                   f"{_rows_text(a, b)} (shard {shard}): {what}")
            try:
                with open(path, "rb") as handle:
                    size = os.fstat(handle.fileno()).st_size
                    tail = os.pread(handle.fileno(), index_len, size - index_len) if size >= index_len else b""
                    if len(tail) != index_len or _crc_bytes(tail[:-4]) != tail[-4:]:
                        raise bad("the shard index fails its crc32c checksum (truncated or corrupt file)")
                    entries = np.frombuffer(tail[:-4], dtype="<u8").reshape(-1, 2)
                    for chunk in range(first, last + 1):
                        a = base + chunk * layout.chunk_rows
                        b = min(a + layout.chunk_rows, layout.rows)
                        offset, nbytes = int(entries[chunk, 0]), int(entries[chunk, 1])
                        if nbytes != chunk_bytes + 4:
                            raise bad("bad shard index entry", a, b)
                        payload = os.pread(handle.fileno(), nbytes, offset)
                        if len(payload) != nbytes or _crc_bytes(np.frombuffer(payload, dtype=np.uint8, count=nbytes - 4)) != payload[-4:]:
                            raise bad("fails its crc32c checksum", a, b)
                        lo, hi = max(a, start), min(b, stop)
                        flat[lo - start:hi - start] = np.frombuffer(
                            payload, dtype=np.uint8, count=(hi - lo) * row_bytes,
                            offset=(lo - a) * row_bytes).reshape(hi - lo, row_bytes)
            except FileNotFoundError:
                raise bad("not written yet (the build is incomplete)") from None
            except OSError as exc:
                raise bad(f"cannot be read: {exc.strerror or exc}") from None
        if sys.byteorder != "little":
            out.byteswap(inplace=True)
        return out

    def lookup(self, layer_id: int, rows: Any) -> np.ndarray:
        """The table rows of an integer array of any shape: result shape rows.shape + (dim,)."""
        rows = np.asarray(rows, dtype=np.int64)
        layout = self.layout(layer_id)
        if rows.size and (rows.min() < 0 or rows.max() >= layout.rows):
            raise EngramError(f"row indices must lie in [0, {layout.rows}) for layer {layout.layer_id}")
        flat = rows.reshape(-1)
        unique, inverse = np.unique(flat, return_inverse=True)
        if unique.size == 0:
            return np.empty(rows.shape + (layout.dim,), dtype=self.numpy_dtype)
        self._ensure_readable(layer_id, int(unique[0]), int(unique[-1]) + 1)
        try:
            values = np.asarray(self.table(layer_id).get_orthogonal_selection((unique, slice(None))))
        except (ValueError, OSError) as exc:
            raise self._read_failed(layer_id, int(unique[0]), int(unique[-1]) + 1, exc) from None
        return values[inverse].reshape(rows.shape + (layout.dim,))

    # ---- writing ---------------------------------------------------------------------------

    def _require_writable(self) -> None:
        if not self._writable:
            raise EngramError(f"{self.path} was opened read-only")

    def write_shard(self, layer_id: int, index: int, data: np.ndarray) -> int:
        """Write one whole shard (all its rows) atomically; returns the bytes written."""
        self._require_writable()
        layout = self.layout(layer_id)
        start, stop = layout.shard_range(index)
        data = np.asarray(data)
        if data.shape != (stop - start, layout.dim):
            raise EngramError(f"shard {index} of layer {layout.layer_id} holds rows {start}-{stop - 1}: "
                              f"expected shape {(stop - start, layout.dim)}, got {data.shape}")
        if data.dtype != self.numpy_dtype:
            data = data.astype(self.numpy_dtype)
        parts = encode_shard(data, layout)
        key = layout.shard_key(index)
        try:
            self._files.put(key, parts)
        except OSError as exc:
            raise EngramError(f"cannot write {key} in {self.path}: {exc.strerror or exc}") from None
        return sum(memoryview(p).nbytes for p in parts)

    def write_rows(self, layer_id: int, start: int, data: np.ndarray) -> int:
        """Write rows [start, start + len(data)) that cover whole shards; returns bytes written.

        Writes never touch part of a shard (zarr would rewrite it and a concurrent writer of the
        same shard would lose rows), so `start` must be a shard start and the rows must end on a
        shard boundary or at the end of the layer.
        """
        layout = self.layout(layer_id)
        stop = start + len(data)
        if start % layout.shard_rows or (stop % layout.shard_rows and stop != layout.rows) \
                or stop > layout.rows or start < 0:
            raise EngramError(f"write_rows writes whole shards of {layout.shard_rows} rows: layer "
                              f"{layout.layer_id} rows {start}-{stop - 1} do not start and end on "
                              f"shard boundaries (the layer has {layout.rows} rows)")
        written = 0
        for index in range(start // layout.shard_rows, -(-stop // layout.shard_rows)):
            a, b = layout.shard_range(index)
            written += self.write_shard(layout.layer_id, index, data[a - start:b - start])
        return written

    def build_shard(self, layer_id: int, index: int, buffer: np.ndarray | None = None,
                    pool: concurrent.futures.Executor | None = None) -> int:
        """Generate one shard with the store's init algorithm and write it; returns bytes.

        With a thread `pool` the rows are generated in pieces in parallel (the kernels release
        the GIL), so a few shard buffers in flight keep every core busy.
        """
        if self._attrs["init"].get("algorithm") != INIT_ALGORITHM:
            raise EngramError(f"{self.path} holds tables from {self._attrs['init'].get('algorithm')!r}, "
                              "not generated ones; it cannot be built here")
        layout = self.layout(layer_id)
        start, stop = layout.shard_range(index)
        nbytes = (stop - start) * layout.dim * layout.itemsize
        if buffer is None or buffer.nbytes < nbytes:
            buffer = np.empty(nbytes, dtype=np.uint8)
        out = buffer[:nbytes].view(self.numpy_dtype).reshape(stop - start, layout.dim)
        if pool is None:
            fill_rows(self.spec, layout.layer_id, start, out)
        else:
            step = max(1, PIECE_BYTES // (layout.dim * layout.itemsize))
            pieces = [pool.submit(fill_rows, self.spec, layout.layer_id, start + a, out[a:a + step])
                      for a in range(0, len(out), step)]
            for piece in pieces:
                piece.result()
        return self.write_shard(layout.layer_id, index, out)

    def ensure_shard(self, layer_id: int, index: int, buffer: np.ndarray | None = None,
                     pool: concurrent.futures.Executor | None = None) -> tuple[str, int]:
        """Keep a shard whose checksums pass, rebuild it otherwise: ("kept"|"written"|"repaired", bytes)."""
        layout = self.layout(layer_id)
        data = self._files.get(layout.shard_key(index))
        if data is not None:
            if _shard_problem(data, layout, index) is None:
                return "kept", 0
            del data
            return "repaired", self.build_shard(layer_id, index, buffer, pool)
        return "written", self.build_shard(layer_id, index, buffer, pool)

    def mark_complete(self) -> None:
        """Record that every shard is written: the last write of a build, so a store that says
        complete is complete. Temporary files of writers that died (a killed Dask worker whose
        shard was redone elsewhere) go first."""
        self._require_writable()
        for layout in self.layouts.values():
            self._files.remove_partials(layout.array)
        missing = self.missing_shards()
        if missing:
            raise EngramError(f"cannot mark {self.path} complete: {self._describe(missing)} missing")
        self._set_attrs({**self._attrs, "complete": True})
        self._verified_present = True

    def _set_attrs(self, attrs: dict[str, Any]) -> None:
        try:
            self._group.update_attributes({ATTRS_KEY: attrs})
        except OSError as exc:
            raise EngramError(f"cannot write {self.path}/zarr.json: {exc.strerror or exc}") from None
        self._attrs = attrs


def _shard_problem(data: bytes, layout: LayerLayout, index: int) -> str | None:
    start, stop = layout.shard_range(index)
    k = layout.chunks_per_shard
    index_len = k * 16 + 4
    if len(data) < index_len:
        return f"truncated ({len(data)} bytes)"
    buf = np.frombuffer(data, dtype=np.uint8)
    index_bytes = buf[len(buf) - index_len:len(buf) - 4]
    if _crc_bytes(index_bytes) != bytes(buf[len(buf) - 4:]):
        return "the shard index fails its crc32c checksum (truncated or corrupt file)"
    entries = index_bytes.view("<u8").reshape(k, 2)
    chunk_bytes = layout.chunk_rows * layout.dim * layout.itemsize + 4
    body = len(buf) - index_len
    for i in range(-(-(stop - start) // layout.chunk_rows)):
        offset, nbytes = int(entries[i, 0]), int(entries[i, 1])
        rows = _rows_text(start + i * layout.chunk_rows, min(start + (i + 1) * layout.chunk_rows, stop))
        if offset == _EMPTY and nbytes == _EMPTY:
            return f"chunk {rows} is absent"
        if nbytes != chunk_bytes or offset + nbytes > body:
            return f"chunk {rows} has a bad index entry"
        payload = buf[offset:offset + nbytes - 4]
        if _crc_bytes(payload) != bytes(buf[offset + nbytes - 4:offset + nbytes]):
            return f"chunk {rows} fails its crc32c checksum"
    return None


def _cpu_count() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1


def _open_group(path: str, mode: str) -> zarr.Group:
    try:
        return zarr.open_group(path, mode=mode, zarr_format=3)
    except (FileNotFoundError, zarr.errors.GroupNotFoundError, zarr.errors.NodeTypeValidationError):
        raise EngramError(f"no table store at {path}") from None
    except (OSError, ValueError, ImportError) as exc:  # ImportError: an fsspec backend not installed
        raise EngramError(f"cannot open table store {path}: {exc}") from None


def open_tables(path: str | Path, *, allow_incomplete: bool = False, writable: bool = False) -> TableStore:
    """Open a table store (a directory or an fsspec URL).

    Refuses, naming layers and rows, a store whose build never finished or whose shard files
    are missing, unless `allow_incomplete` (for `--resume` and inspection).
    """
    path = store_path(path)
    if not _is_url(path) and not Path(path).exists():
        raise EngramError(f"no table store at {path}")
    store = TableStore(path, _open_group(path, "r+" if writable else "r"), writable)
    if not allow_incomplete:
        store.check_complete()
    return store


def _store_attrs(spec: TableSpec, projection: VocabProjection, layouts: dict[int, LayerLayout],
                 ranks: int, shard_by: str, init: dict[str, Any]) -> dict[str, Any]:
    layers = {}
    for layer, layout in layouts.items():
        layers[str(layer)] = {
            **layout.to_json(),
            "head_sizes": spec.head_sizes(layer),
            "offsets": spec.offsets(layer),
            "multipliers": [int(m) for m in spec.multipliers(layer, projection.compressed_size)],
        }
    return {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "complete": False,
        "spec": spec.to_dict(),
        "dtype": spec.dtype,
        "init": init,
        "projection": {
            "array": PROJECTION_ARRAY,
            "tokenizer_array": TOKENIZER_ARRAY if projection.tokenizer_json is not None else None,
            "vocab_size": projection.vocab_size,
            "compressed_size": projection.compressed_size,
            "fingerprint": projection.fingerprint(),
            "metadata": dict(projection.metadata),
        },
        "hashing": {"max_ngram_size": spec.max_ngram_size, "n_head_per_ngram": spec.n_head_per_ngram,
                    "pad_id": spec.pad_id, "dim": spec.dim},
        "sharding": {"ranks": ranks, "shard_by": shard_by},
        "layers": layers,
    }


def default_init(spec: TableSpec) -> dict[str, Any]:
    return {"algorithm": INIT_ALGORITHM, **spec.init.to_dict()}


def _zarr_dtype(dtype: str) -> Any:
    return BFloat16() if dtype == "bfloat16" else dtype


def _create_layer_array(group: zarr.Group, dtype: str, layout: LayerLayout) -> None:
    """The array's metadata only; shards are written by `TableStore.write_shard`."""
    group.create_array(
        layout.array, shape=(layout.rows, layout.dim), dtype=_zarr_dtype(dtype),
        chunks=(layout.chunk_rows, layout.dim), shards=(layout.shard_rows, layout.dim),
        compressors=[Crc32cCodec()], fill_value=0.0, dimension_names=("row", "column"),
        attributes={"engram_layer_id": layout.layer_id}, overwrite=True)


def _write_projection(group: zarr.Group, projection: VocabProjection) -> None:
    lookup = group.create_array(PROJECTION_ARRAY, shape=(projection.vocab_size,), dtype="int64",
                                chunks=(projection.vocab_size,), compressors=[ZstdCodec(level=3)],
                                fill_value=0, overwrite=True)
    lookup[:] = projection.lookup
    if projection.tokenizer_json is not None:
        raw = np.frombuffer(projection.tokenizer_json, dtype=np.uint8)
        tok = group.create_array(TOKENIZER_ARRAY, shape=raw.shape, dtype="uint8", chunks=raw.shape,
                                 compressors=[ZstdCodec(level=3)], fill_value=0, overwrite=True)
        tok[:] = raw


def _remove_existing(path: str) -> None:
    """Delete what --overwrite replaces, but never a folder that is not a table store."""
    if _is_url(path):
        try:
            group = zarr.open_group(path, mode="r", zarr_format=3)
        except Exception:  # nothing there, or not zarr: the create below decides
            return
        if ATTRS_KEY not in dict(group.attrs):
            raise EngramError(f"{path} holds a zarr group that is not an engram table store; "
                              "refusing to overwrite it")
        sync(group.store.delete_dir(""))
        return
    target = Path(path)
    if target.is_file() or target.is_symlink():
        raise EngramError(f"{path} is a file, not a table store; refusing to overwrite it")
    if not target.is_dir() or not any(target.iterdir()):
        return
    if not (target / "zarr.json").is_file():
        raise EngramError(f"{path} is a non-empty folder that is not a table store; "
                          "refusing to overwrite it")
    try:
        shutil.rmtree(target)
    except OSError as exc:
        raise EngramError(f"cannot remove {path}: {exc.strerror or exc}") from None


def _store_exists(path: str) -> bool:
    if _is_url(path):
        try:
            zarr.open_group(path, mode="r", zarr_format=3)
            return True
        except Exception:  # any failure to open means there is no group to protect
            return False
    target = Path(path)
    return target.is_file() or (target.is_dir() and any(target.iterdir()))


def create_store(path: str | Path, spec: TableSpec, projection: VocabProjection, *,
                 shards: int = 1, shard_by: str = "rows", dtype: str | None = None,
                 overwrite: bool = False, init: dict[str, Any] | None = None,
                 layers: list[int] | None = None) -> TableStore:
    """An empty store with the standard layout, ready for `write_rows`/`build_shard`.

    `layers` keeps only some of the spec's layers (an import of one layer of a published
    model): head sizes and offsets still come from the whole spec, so rows stay where the
    model's hasher puts them, and completeness counts only the layers kept.

    `init` records where the values come from (default: this module's generator and the spec's
    distribution); an importer passes e.g. {"algorithm": "imported", "source": "ckpt.pt"}.
    Call `mark_complete()` once every shard is written.
    """
    path = store_path(path)
    if dtype is not None:
        spec = spec.replace(dtype=dtype)
    layouts = plan_layout(spec, shards, shard_by)
    if layers is not None:
        for layer in layers:
            spec.head_sizes(layer)  # an EngramError naming the spec's layers if it has no such layer
        layouts = {layer: layouts[layer] for layer in spec.layer_ids if layer in set(layers)}
    if _store_exists(path):
        if not overwrite:
            raise EngramError(f"{path} already exists; pass --overwrite to replace it")
        _remove_existing(path)
    attrs = _store_attrs(spec, projection, layouts, shards, shard_by, init or default_init(spec))
    if layers is not None:
        attrs["stored_layers"] = list(layouts)
    try:
        group = zarr.create_group(path, overwrite=False, attributes={ATTRS_KEY: attrs})
        for layout in layouts.values():
            _create_layer_array(group, spec.dtype, layout)
        _write_projection(group, projection)
    except (OSError, ValueError, ImportError) as exc:  # ImportError: e.g. s3fs not installed for s3://
        raise EngramError(f"cannot create table store {path}: {getattr(exc, 'strerror', None) or exc}") from None
    return TableStore(path, group, writable=True)


def build_shard(path: str, layer_id: int, index: int) -> int:
    """Generate and write shard `index` of one layer of the store at `path`; returns bytes.

    A plain function of picklable arguments, so a cluster can run one task per shard; the
    store must exist (create it with `create_store`) and the caller marks it complete.
    """
    return open_tables(path, allow_incomplete=True, writable=True).build_shard(layer_id, index)


def _spec_difference(stored: dict[str, Any], wanted: dict[str, Any], prefix: str = "") -> str | None:
    for key in sorted(set(stored) | set(wanted)):
        if key == "name" and not prefix:
            continue
        a, b = stored.get(key), wanted.get(key)
        if isinstance(a, dict) and isinstance(b, dict):
            found = _spec_difference(a, b, f"{prefix}{key}.")
            if found:
                return found
        elif a != b:
            return f"{prefix}{key} is {a!r} in the store but {b!r} now"
    return None


def _check_resumable(store: TableStore, spec: TableSpec, projection: VocabProjection,
                     shards: int, shard_by: str) -> None:
    where = store.path
    diff = _spec_difference(store.attrs["spec"], spec.to_dict())
    if diff:
        raise EngramError(f"cannot resume {where}: it was built from a different spec ({diff}); "
                          "use the same spec, or --overwrite to start again")
    if store.attrs["projection"]["fingerprint"] != projection.fingerprint():
        raise EngramError(f"cannot resume {where}: it was built with a different projection "
                          f"(lookup sha256 {store.attrs['projection']['fingerprint'][:12]}... in the "
                          f"store, {projection.fingerprint()[:12]}... now); use the same "
                          "--projection, or --overwrite")
    if store.init != default_init(spec):
        raise EngramError(f"cannot resume {where}: its values come from {store.init}, not "
                          f"{default_init(spec)}; use --overwrite")
    if (store.ranks, store.shard_by) != (shards, shard_by):
        raise EngramError(f"cannot resume {where}: it is laid out for {store.ranks} ranks by "
                          f"{store.shard_by}, not {shards} by {shard_by}; drop --shards/--shard-by "
                          "or pass the stored ones")


def _open_for_resume(path: str, spec: TableSpec, projection: VocabProjection,
                     shards: int | None, shard_by: str | None) -> TableStore:
    """The existing store, once it is shown to be the same build (nothing is written)."""
    store = open_tables(path, allow_incomplete=True)
    shards = store.ranks if shards is None else shards
    shard_by = store.shard_by if shard_by is None else shard_by
    _check_resumable(store, spec, projection, shards, shard_by)
    expected = plan_layout(spec, shards, shard_by)
    if {k: v.to_json() for k, v in expected.items()} != \
            {k: v.to_json() for k, v in store.layouts.items()}:
        raise EngramError(f"cannot resume {path}: its shard layout differs from what this engram "
                          "plans for the same spec; use --overwrite")
    return store


def _repair_for_resume(path: str, spec: TableSpec, projection: VocabProjection) -> TableStore:
    """Reopen for writing, recreating the metadata a build killed early never wrote, and drop
    the temporary files of shards that were being written when it died."""
    store = open_tables(path, allow_incomplete=True, writable=True)
    for layout in store.layouts.values():
        try:
            ok = store._group[layout.array].shape == (layout.rows, layout.dim)
        except (KeyError, ValueError, OSError):
            ok = False
        if not ok:
            _create_layer_array(store._group, spec.dtype, layout)
        store._files.remove_partials(layout.array)
    try:
        store.projection  # noqa: B018 - reading it checks the fingerprint
    except EngramError:
        _write_projection(store._group, projection)
    return open_tables(path, allow_incomplete=True, writable=True)


@dataclass
class BuildReport:
    """What `engram build-tables` planned and did."""

    store: str
    spec_name: str
    dtype: str
    ranks: int
    shard_by: str
    layers: list[dict[str, Any]]
    parameters: int
    bytes: int
    files: int
    init: dict[str, Any]
    dry_run: bool = False
    action: str = "create"
    workers: int = 1
    shards_in_flight: int = 1
    shards_total: int = 0
    shards_written: int = 0
    shards_kept: int = 0
    shards_repaired: int = 0
    bytes_written: int = 0
    seconds: float = 0.0
    peak_rss_bytes: int = 0
    complete: bool = False

    @property
    def parameters_per_second(self) -> float:
        built = self.shards_written + self.shards_repaired
        if not self.seconds or not built:
            return 0.0
        return self.bytes_written / DTYPE_BYTES[self.dtype] / self.seconds

    def to_json(self) -> dict[str, Any]:
        return {
            "store": self.store, "spec": self.spec_name, "dtype": self.dtype,
            "dry_run": self.dry_run, "action": self.action, "complete": self.complete,
            "ranks": self.ranks, "shard_by": self.shard_by, "init": self.init,
            "layers": self.layers,
            "total": {"parameters": self.parameters, "bytes": self.bytes, "shards": self.shards_total,
                      "files": self.files},
            "shards_written": self.shards_written, "shards_kept": self.shards_kept,
            "shards_repaired": self.shards_repaired, "bytes_written": self.bytes_written,
            "workers": self.workers, "shards_in_flight": self.shards_in_flight,
            "seconds": round(self.seconds, 3),
            "parameters_per_second": round(self.parameters_per_second),
            "bytes_per_second": round(self.bytes_written / self.seconds) if self.seconds else 0,
            "peak_rss_bytes": self.peak_rss_bytes,
        }

    def render(self, console: Console) -> None:
        where = f" -> {self.store}" if self.store else ""
        table = Table(title=f"{'plan: ' if self.dry_run else ''}{self.spec_name}{where}, {self.dtype}, "
                            f"{self.ranks} rank{'s' if self.ranks != 1 else ''} by {self.shard_by}")
        for column in ("layer", "rows", "parameters", "size", "chunk rows", "shard rows", "shards"):
            table.add_column(column, justify="right")
        for layer in self.layers:
            table.add_row(str(layer["layer"]), f"{layer['rows']:,}", f"{layer['parameters']:,}",
                          human_bytes(layer["bytes"]), f"{layer['chunk_rows']:,}",
                          f"{layer['shard_rows']:,}", str(layer["shards"]))
        table.add_row("total", "", f"{self.parameters:,}", human_bytes(self.bytes), "", "",
                      str(self.shards_total), style="bold")
        console.print(table)
        if self.ranks > 1:
            first = self.layers[0]
            spans = [f"rank {r}: rows {a:,}-{b - 1:,}" for r, (a, b) in enumerate(first["partition"])]
            shown = spans if len(spans) <= 4 else spans[:2] + ["..."] + spans[-1:]
            console.print(f"layer {first['layer']} partition: " + "; ".join(shown))
        if self.dry_run:
            target = "" if not where else f"{self.action} {self.store}: "
            console.print(f"would {target}write {self.files} files, {human_bytes(self.bytes)}; "
                          f"init {self.init['algorithm']}; nothing written")
            return
        rate = human_bytes(self.bytes_written / self.seconds) + "/s" if self.seconds else "-"
        console.print(f"{self.action}: wrote {self.shards_written} shards, rewrote "
                      f"{self.shards_repaired} bad ones, kept {self.shards_kept} good ones; "
                      f"{human_bytes(self.bytes_written)} in {self.seconds:.1f} s ({rate}, "
                      f"{self.parameters_per_second / 1e6:.0f} M parameters/s, {self.workers} workers); "
                      f"peak RSS {human_bytes(self.peak_rss_bytes)}; "
                      f"{'[green]complete[/]' if self.complete else '[red]incomplete[/]'}")


def _peak_rss() -> int:
    """Peak resident memory of this process image. Linux's VmHWM, because ru_maxrss also
    counts the parent's memory at the fork that started us (it survives exec)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def _tree_bytes(path: str) -> int:
    return sum(p.stat().st_size for p in Path(path).rglob("*") if p.is_file())


def _check_free_space(path: str, needed: int, reclaimed: int = 0) -> None:
    """Refuse up front a build the disk cannot hold (`reclaimed`: what --overwrite deletes)."""
    if _is_url(path):
        return
    probe = Path(path).absolute()
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    try:
        free = shutil.disk_usage(probe).free + reclaimed
    except OSError:
        return
    if needed > free:
        raise EngramError(f"not enough disk space for {path}: needs {human_bytes(needed)}, "
                          f"{human_bytes(free)} free on {probe}")


def _load_inputs(spec: TableSpec | str | Path, projection: VocabProjection | str | Path | None,
                 dtype: str | None) -> tuple[TableSpec, VocabProjection]:
    spec = spec if isinstance(spec, TableSpec) else load_spec(spec)
    if dtype is not None and dtype not in DTYPE_BYTES:
        raise EngramError(f"--dtype must be one of {', '.join(DTYPE_BYTES)}, got {dtype!r}")
    if dtype is not None:
        spec = spec.replace(dtype=dtype)
    if not isinstance(projection, VocabProjection):
        projection = resolve_projection(projection)
    return spec, projection


def build_tables(spec: TableSpec | str | Path, output: str | Path | None, *,
                 projection: VocabProjection | str | Path | None = None,
                 shards: int | None = None, shard_by: str | None = None,
                 workers: int | None = None, dtype: str | None = None, resume: bool = False,
                 overwrite: bool = False, dry_run: bool = False,
                 show_progress: bool = True, scheduler: str | None = None,
                 dask_workers: int | None = None) -> BuildReport:
    """The whole `engram build-tables` job: plan, create or resume, fill every shard, mark complete.

    The bytes of the result depend only on the spec, the projection and the layout (shards and
    shard_by); not on workers, interruptions or resumes. `output` may be None for a dry run.
    `shards`/`shard_by` default to 1 and "rows", or to the store's own when resuming.
    With `scheduler` (a Dask scheduler address) or `dask_workers` (a local Dask cluster), every
    shard is one Dask task that generates and writes that shard file on a worker.
    """
    if output is None and not dry_run:
        raise EngramError("missing option -o/--output: the table store to write")
    if resume and overwrite:
        raise EngramError("--resume and --overwrite exclude each other")
    if workers is not None and workers < 1:
        raise EngramError(f"--workers must be a positive integer, got {workers}")
    spec, projection = _load_inputs(spec, projection, dtype)
    output = None if output is None else store_path(output)
    action, existing = "plan", None
    if output is not None:
        exists = _store_exists(output)
        if exists and not (resume or overwrite):
            raise EngramError(f"{output} already exists; pass --resume to finish an interrupted "
                              "build or --overwrite to replace it")
        action = "resume" if exists and resume else ("overwrite" if exists else "create")
        if action == "resume":
            existing = _open_for_resume(output, spec, projection, shards, shard_by)
            shards, shard_by = existing.ranks, existing.shard_by
    shards, shard_by = shards or 1, shard_by or "rows"
    layouts = plan_layout(spec, shards, shard_by)
    shard_count = sum(lay.shards for lay in layouts.values())
    total_bytes = sum(shard_file_size(lay, i) for lay in layouts.values() for i in range(lay.shards))
    report = BuildReport(
        store=output or "", spec_name=spec.name, dtype=spec.dtype, ranks=shards, shard_by=shard_by,
        layers=[{"layer": lay.layer_id, "parameters": lay.rows * lay.dim,
                 "bytes": lay.rows * lay.dim * DTYPE_BYTES[spec.dtype], **lay.to_json()}
                for lay in layouts.values()],
        parameters=spec.parameters, bytes=spec.parameters * DTYPE_BYTES[spec.dtype],
        files=shard_count + 1 + len(layouts) + 2 * (1 + (projection.tokenizer_json is not None)),
        init=default_init(spec), dry_run=dry_run, action=action, shards_total=shard_count)
    limit = max(1, BUFFER_BUDGET // max(lay.shard_rows * lay.dim * DTYPE_BYTES[spec.dtype]
                                        for lay in layouts.values()))
    report.workers = workers or _cpu_count()
    report.shards_in_flight = min(report.workers, limit, shard_count)
    if output is not None:
        if existing is not None:
            needed = sum(shard_file_size(existing.layout(layer), i)
                         for layer, i in existing.missing_shards())
        else:
            needed = total_bytes
        reclaimed = _tree_bytes(output) if action == "overwrite" and not _is_url(output) else 0
        _check_free_space(output, needed, reclaimed)
    if dry_run:
        return report

    with dask_client(scheduler, dask_workers) as client:
        started = time.perf_counter()
        if action == "resume":
            store = _repair_for_resume(output, spec, projection)
        else:
            store = create_store(output, spec, projection, shards=shards, shard_by=shard_by,
                                 overwrite=overwrite)
        if client is None:
            _fill(store, report, show_progress)
        else:
            _fill_on_cluster(client, store, report, show_progress)
    store.mark_complete()
    report.complete = True
    report.seconds = time.perf_counter() - started
    report.peak_rss_bytes = _peak_rss()
    return report


def _fill(store: TableStore, report: BuildReport, show_progress: bool) -> None:
    """Run every shard through `ensure_shard`: a few shard threads, each with one reusable
    buffer, hand the generation to `report.workers` threads and write the result."""
    jobs = [(layer, i) for layer, lay in store.layouts.items() for i in range(lay.shards)]
    local = threading.local()
    started = time.perf_counter()

    def run(job: tuple[int, int]) -> tuple[int, str, int]:
        layer, index = job
        if not hasattr(local, "buffer"):
            local.buffer = np.empty(0, dtype=np.uint8)
        layout = store.layout(layer)
        need = layout.shard_rows * layout.dim * DTYPE_BYTES[store.dtype]
        if local.buffer.nbytes < need:
            local.buffer = np.empty(need, dtype=np.uint8)
        outcome, nbytes = store.ensure_shard(layer, index, local.buffer, compute)
        start, stop = layout.shard_range(index)
        return stop - start, outcome, nbytes

    bar, task = _build_progress(store, report, show_progress)
    compute = concurrent.futures.ThreadPoolExecutor(max_workers=report.workers,
                                                    thread_name_prefix="engram-generate")
    pool = concurrent.futures.ThreadPoolExecutor(max_workers=report.shards_in_flight,
                                                 thread_name_prefix="engram-shard")
    try:
        with bar:
            futures = [pool.submit(run, job) for job in jobs]
            for future in concurrent.futures.as_completed(futures):
                _count_shard(report, bar, task, started, *future.result())
    except BaseException as exc:
        pool.shutdown(wait=True, cancel_futures=True)
        compute.shutdown(wait=True, cancel_futures=True)
        if isinstance(exc, KeyboardInterrupt):
            Console(stderr=True).print(f"interrupted: {store.path} is incomplete; run the same "
                                       "command with --resume to finish it")
        raise
    pool.shutdown(wait=True)
    compute.shutdown(wait=True)


def _build_progress(store: TableStore, report: BuildReport, show: bool) -> tuple[Any, Any]:
    from .report import progress

    bar = progress(TextColumn("rows"), TextColumn("{task.fields[rate]}"))
    if not show:
        bar.disable = True
    task = bar.add_task(f"{report.action} {Path(store.path).name}", rate="",
                        total=sum(lay.rows for lay in store.layouts.values()))
    return bar, task


def _count_shard(report: BuildReport, bar: Any, task: Any, started: float,
                 rows: int, outcome: str, nbytes: int) -> None:
    report.bytes_written += nbytes
    if outcome == "kept":
        report.shards_kept += 1
    elif outcome == "repaired":
        report.shards_repaired += 1
    else:
        report.shards_written += 1
    elapsed = time.perf_counter() - started
    bar.update(task, advance=rows,
               rate=f"{report.bytes_written / elapsed / 1e9:.2f} GB/s" if elapsed else "")


def ensure_shard_task(path: str, layer_id: int, index: int) -> tuple[int, str, int]:
    """One Dask task: keep a good shard file or (re)build it; (rows, outcome, bytes written).

    The shard is generated in pieces on all of the worker's cores (the kernels release the GIL),
    so the last shards of a build do not leave cores idle."""
    store = open_tables(path, allow_incomplete=True, writable=True)
    with concurrent.futures.ThreadPoolExecutor(_cpu_count(), thread_name_prefix="engram-generate") as pool:
        outcome, nbytes = store.ensure_shard(layer_id, index, pool=pool)
    start, stop = store.layout(layer_id).shard_range(index)
    return stop - start, outcome, nbytes


def _fill_on_cluster(client: Any, store: TableStore, report: BuildReport, show_progress: bool) -> None:
    """One task per shard file, so no two workers ever write the same shard; only the
    (rows, outcome, bytes) of each task come back to the client."""
    jobs = [(f"layer{layer}-shard{i}", (absolute_store_path(store.path), layer, i))
            for layer, lay in store.layouts.items() for i in range(lay.shards)]
    report.workers = sum(client.nthreads().values())
    report.shards_in_flight = min(report.workers, len(jobs))
    bar, task = _build_progress(store, report, show_progress)
    started = time.perf_counter()
    with bar:
        run_tasks(client, ensure_shard_task, jobs,
                  on_done=lambda _name, result: _count_shard(report, bar, task, started, *result))
