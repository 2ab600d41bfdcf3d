"""The `TableStore` API: an opened store, its attributes as typed values, checked reads and writes.

Every read checks the crc32c of each chunk it touches and names the layer, rows and shard of a bad
one; a store that does not say it is complete is checked for the shard files a read needs before
reading. On a local disk `read_rows` reads whole inner chunks straight from the shard files (about
3x zarr's decode path); `lookup` and remote stores go through zarr. Writes are whole shards only
(`write_shard`, `write_rows`), encoded by `shard_format` and written atomically by `files`. The
format itself is stated in `attributes`.
"""

from __future__ import annotations

import concurrent.futures
import os
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

import numpy as np
import zarr

from ..dtypes import numpy_dtype
from ..errors import ChecksumError, EngramError, FormatError, IncompleteStoreError, UsageError
from ..helpers import cpu_count
from ..init import INIT_ALGORITHM, fill_rows
from ..spec import TableSpec
from ..vocab import VocabProjection, checked_lookup
from . import zarr_bfloat16  # noqa: F401  # registers "bfloat16": opening a bf16 store needs it
from .attributes import ATTRS_KEY, PROJECTION_ARRAY, STORE_FORMAT, STORE_FORMAT_VERSION, TOKENIZER_ARRAY
from .consistency import check_array, check_vector, checked_attrs, parse_node
from .files import Files, is_url, store_path
from .layout import PIECE_BYTES, LayerLayout, ShardBy
from .shard_format import (
    CRC_BYTES,
    chunk_is_intact,
    chunk_size,
    crc_bytes,
    encode_shard,
    index_size,
    parse_index,
    rows_text,
    shard_file_size,
    shard_problem,
)

if TYPE_CHECKING:
    from ..hashing import NgramHasher


@dataclass
class VerifyReport:
    """What `TableStore.verify` read: every shard of every layer, all checksums good."""

    path: str
    shards: int
    bytes: int
    seconds: float

    def to_json(self) -> dict[str, Any]:
        """The `tables.verify` section of `engram inspect --verify --json`."""
        return {"store": self.path, "shards": self.shards, "bytes": self.bytes, "seconds": self.seconds, "ok": True}


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
        self._files = Files(group.store)
        attrs = dict(group.attrs).get(ATTRS_KEY)
        if not isinstance(attrs, dict) or attrs.get("format") != STORE_FORMAT:
            raise FormatError(f"{path} is a zarr group but not an engram table store")
        if attrs.get("format_version") != STORE_FORMAT_VERSION:
            raise FormatError(
                f"{path} has table store format version {attrs.get('format_version')}; "
                f"this engram reads version {STORE_FORMAT_VERSION}"
            )
        self._attrs = attrs
        self.spec: TableSpec
        self.layouts: dict[int, LayerLayout]
        self.spec, self.layouts = checked_attrs(attrs, path)
        self.dtype: str = attrs["dtype"]
        self._check_arrays()
        self._tables: dict[int, Any] = {}
        self._verified_present = False

    def _check_arrays(self) -> None:
        """Each array's zarr.json against the attributes (see `consistency`). An array a killed
        build never created may be absent from an incomplete store; `--resume` creates it."""
        info = self._attrs["projection"]
        names: list[tuple[str, LayerLayout | None]] = [(layout.array, layout) for layout in self.layouts.values()]
        names.append((PROJECTION_ARRAY, None))
        if info.get("tokenizer_array"):
            names.append((TOKENIZER_ARRAY, None))
        for name, layout in names:
            where = f"{self.path}/{name}/zarr.json"
            try:
                raw = self._files.get(f"{name}/zarr.json")
            except OSError as exc:
                raise FormatError(f"cannot read {where}: {exc.strerror or exc}") from None
            if raw is None:
                if self.is_complete:
                    raise FormatError(f"{where} is missing; the store is damaged")
                continue
            node = parse_node(raw, where)
            if layout is not None:
                check_array(node, layout, self.dtype, where)
            elif name == PROJECTION_ARRAY:
                check_vector(node, info["vocab_size"], "int64", where)
            else:
                check_vector(node, None, "uint8", where)

    # ---- reading ---------------------------------------------------------------------------

    @property
    def attrs(self) -> dict[str, Any]:
        """The store's attributes["engram"], as read when it was opened (see `attributes`)."""
        return self._attrs

    @property
    def layer_ids(self) -> tuple[int, ...]:
        """The layers this store holds: all of the spec's, or those an import chose."""
        return tuple(self.layouts)

    @property
    def ranks(self) -> int:
        """The rank count the store's layout was planned for."""
        return int(self._attrs["sharding"]["ranks"])

    @property
    def shard_by(self) -> ShardBy:
        """How ranks split the layers: "rows" or "heads" (`consistency` checked it on open)."""
        return cast(ShardBy, self._attrs["sharding"]["shard_by"])

    @property
    def init(self) -> dict[str, Any]:
        """Where the values come from: the generator's algorithm and distribution, or an import's record."""
        return dict(self._attrs["init"])

    @property
    def is_generated(self) -> bool:
        """Whether the values come from engram's generator (so `build-tables --resume` can
        write what is missing), not from an imported checkpoint."""
        return self._attrs.get("init", {}).get("algorithm") == INIT_ALGORITHM

    @property
    def is_complete(self) -> bool:
        """Whether the build marked the store complete (the shard files are not listed here)."""
        return bool(self._attrs.get("complete"))

    @property
    def numpy_dtype(self) -> np.dtype:
        """The in-memory numpy dtype of the tables (`ml_dtypes.bfloat16` for bfloat16)."""
        return numpy_dtype(self.dtype)

    def layout(self, layer_id: int) -> LayerLayout:
        """The plan of a layer; a UsageError naming the store's layers when it holds no such layer."""
        try:
            return self.layouts[int(layer_id)]
        except (KeyError, ValueError):
            raise UsageError(
                f"layer {layer_id} is not in the store (layers: {', '.join(map(str, self.layer_ids))})"
            ) from None

    def _layer_attrs(self, layer_id: int) -> dict[str, Any]:
        self.layout(layer_id)
        return self._attrs["layers"][str(int(layer_id))]

    def head_sizes(self, layer_id: int) -> list[int]:
        """The prime size of every head of a layer, as recorded when the store was created."""
        return list(self._layer_attrs(layer_id)["head_sizes"])

    def offsets(self, layer_id: int) -> list[int]:
        """The first row of every head in the layer table, as recorded."""
        return list(self._layer_attrs(layer_id)["offsets"])

    def multipliers(self, layer_id: int) -> np.ndarray:
        """The layer's int64 hash multipliers, as recorded."""
        return np.array(self._layer_attrs(layer_id)["multipliers"], dtype=np.int64)

    def partition(self, layer_id: int) -> list[tuple[int, int]]:
        """Rows (start, stop) of every rank: whole shards, so each rank reads and writes alone."""
        return list(self.layout(layer_id).partition)

    def shard_ranges(self, layer_id: int) -> list[tuple[int, int]]:
        """Rows (start, stop) of every shard file of a layer."""
        return self.layout(layer_id).shard_ranges()

    def table(self, layer_id: int) -> zarr.Array:
        """The zarr array of a layer: `table[hasher.rows(ids)[layer_id]]`-style reads."""
        layout = self.layout(layer_id)
        if layout.layer_id not in self._tables:
            try:
                self._tables[layout.layer_id] = self._group[layout.array]
            except KeyError:
                raise FormatError(
                    f"{self.path} has no array {layout.array}: the store is damaged; rebuild it with --overwrite"
                ) from None
        return self._tables[layout.layer_id]

    @cached_property
    def projection(self) -> VocabProjection:
        """The projection stored beside the tables, read once and checked against its fingerprint."""
        info = self._attrs["projection"]
        try:
            lookup = np.asarray(self._group[info["array"]][:])  # type: ignore[index]  # an array, not a group
            tokenizer = None
            if info.get("tokenizer_array"):
                tokenizer = np.asarray(self._group[info["tokenizer_array"]][:]).tobytes()  # type: ignore[index]
        except (KeyError, ValueError, OSError) as exc:
            raise FormatError(
                f"{self.path}: cannot read the projection arrays ({exc}); rebuild the store with --overwrite"
            ) from None
        try:
            projection = VocabProjection(checked_lookup(lookup), dict(info.get("metadata", {})), tokenizer)
        except (FormatError, TypeError, ValueError) as exc:
            raise FormatError(f"{self.path}: the projection array is damaged ({exc})") from None
        if projection.fingerprint() != info["fingerprint"]:
            raise ChecksumError(
                f"{self.path}: the projection array does not match its recorded fingerprint; the store is damaged"
            )
        self.spec.check_compressed_size(projection.compressed_size, f"the projection of store {self.path}", FormatError)
        if projection.compressed_size != info["compressed_size"]:
            raise FormatError(
                f"{self.path}: the projection maps onto {projection.compressed_size:,} canonical ids but the "
                f"attributes say {info['compressed_size']:,}; the store is damaged"
            )
        return projection

    def hasher(self) -> NgramHasher:
        """An `NgramHasher` of the store's spec and projection: its `rows` index the layer tables."""
        from ..hashing import NgramHasher

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
            parts.append(f"layer {layer} {rows_text(start, stop)} ({which})")
        more = f" and {len(spans) - limit} more ranges" if len(spans) > limit else ""
        return "; ".join(parts) + more

    def check_complete(self) -> None:
        """Raise EngramError naming layers and rows unless the build finished and every shard
        file is in place (a cheap listing; `verify()` also reads the checksums)."""
        missing = self.missing_shards()
        if not self.is_complete:
            what = (
                f"{self._describe(missing)} missing"
                if missing
                else "every shard is written but it was never marked complete"
            )
            if self.is_generated:
                raise IncompleteStoreError(
                    f"table store {self.path} is incomplete (its build was interrupted): "
                    f"{what}; finish it with `engram build-tables ... -o {self.path} --resume`"
                )
            raise IncompleteStoreError(
                f"table store {self.path} is incomplete (its import was interrupted): {what}; "
                f"import it again with `engram import ... -o {self.path} --overwrite`"
            )
        if missing:
            again = "rebuild it with --resume" if self.is_generated else "import it again with --overwrite"
            raise IncompleteStoreError(
                f"table store {self.path} is damaged: {self._describe(missing)} missing or truncated; {again}"
            )
        self._verified_present = True

    def check_shard(self, layer_id: int, index: int) -> str | None:
        """Why shard `index` of a layer is unusable (missing, truncated, checksum), or None."""
        layout = self.layout(layer_id)
        data = self._files.get(layout.shard_key(index))
        return "missing" if data is None else shard_problem(data, layout, index)

    def verify(self, workers: int | None = None, on_shard: Callable[[int], None] | None = None) -> VerifyReport:
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
            return layer, index, shard_problem(data, layout, index), len(data)

        with concurrent.futures.ThreadPoolExecutor(max_workers=workers or min(4, cpu_count())) as pool:
            for layer, index, problem, nbytes in pool.map(check, jobs):
                total += nbytes
                if problem:
                    bad.append((layer, index, problem))
                if on_shard:
                    start, stop = self.layouts[layer].shard_range(index)
                    on_shard(stop - start)
        if bad:
            lines = [
                f"layer {layer} {rows_text(*self.layouts[layer].shard_range(index))} (shard {index}): {problem}"
                for layer, index, problem in bad[:5]
            ]
            more = f"; and {len(bad) - 5} more bad shards" if len(bad) > 5 else ""
            raise ChecksumError(f"table store {self.path} failed verification: " + "; ".join(lines) + more)
        if not self.is_complete:
            self.check_complete()
        return VerifyReport(self.path, len(jobs), total, time.perf_counter() - started)

    def _ensure_readable(self, layer_id: int, start: int, stop: int) -> None:
        if self._verified_present:
            return
        layout = self.layout(layer_id)
        first, last = start // layout.shard_rows, max(start, stop - 1) // layout.shard_rows
        absent = [
            (layout.layer_id, i)
            for i in range(first, min(last, layout.shards - 1) + 1)
            if self._files.size(layout.shard_key(i)) != shard_file_size(layout, i)
        ]
        if absent:
            raise IncompleteStoreError(
                f"table store {self.path} is incomplete: {self._describe(absent)} not written yet"
            )

    def _read_failed(self, layer_id: int, start: int, stop: int, exc: Exception) -> EngramError:
        layout = self.layout(layer_id)
        first, last = start // layout.shard_rows, max(start, stop - 1) // layout.shard_rows
        for index in range(first, min(last, layout.shards - 1) + 1):
            problem = self.check_shard(layer_id, index)
            if problem:
                return EngramError(
                    f"table store {self.path}: layer {layout.layer_id} "
                    f"{rows_text(*layout.shard_range(index))} (shard {index}): {problem}"
                )
        raise exc

    def read_rows(self, layer_id: int, start: int, stop: int, out: np.ndarray | None = None) -> np.ndarray:
        """Rows [start, stop) of a layer; a bad checksum raises ChecksumError naming the rows.

        Args:
            layer_id: the layer.
            start, stop: the row range, within the layer's rows.
            out: a C-contiguous (stop - start, dim) array of the store's dtype to read into (and
                return), so a caller assembling a block copies no bytes twice.
        """
        layout = self.layout(layer_id)
        if not 0 <= start <= stop <= layout.rows:
            raise UsageError(f"rows [{start}, {stop}) are not within the {layout.rows:,} rows of layer {layer_id}")
        if out is None:
            out = np.empty((stop - start, layout.dim), dtype=self.numpy_dtype)
        elif out.shape != (stop - start, layout.dim) or out.dtype != self.numpy_dtype or not out.flags.c_contiguous:
            raise ValueError(f"out must be C-contiguous {self.numpy_dtype} of shape {(stop - start, layout.dim)}")
        if start == stop:
            return out
        self._ensure_readable(layer_id, start, stop)
        if self._files.root is not None:
            return self._read_local_rows(layout, start, stop, out)
        try:
            out[:] = np.asarray(self.table(layer_id)[start:stop])
        except (ValueError, OSError) as exc:
            raise self._read_failed(layer_id, start, stop, exc) from None
        return out

    def _read_local_rows(self, layout: LayerLayout, start: int, stop: int, out: np.ndarray) -> np.ndarray:
        """Read whole inner chunks straight from the shard files, checking each crc32c: about
        3x zarr's decode path, which is what exports and table statistics stream through. A chunk
        wholly inside the range is read into `out` itself (preadv: its rows, then its crc32c)."""
        flat = out.view(np.uint8).reshape(len(out), -1)
        crc = bytearray(CRC_BYTES)
        row_bytes = layout.dim * layout.itemsize
        tail_size = index_size(layout)
        root = self._files.root
        assert root is not None  # only local stores read this way
        for shard in range(start // layout.shard_rows, -(-stop // layout.shard_rows)):
            base = shard * layout.shard_rows
            first = (max(start, base) - base) // layout.chunk_rows
            last = (min(stop, base + layout.shard_rows) - 1 - base) // layout.chunk_rows
            path = root / layout.shard_key(shard)

            def bad(what: str, a: int = base, b: int = min(base + layout.shard_rows, layout.rows)) -> EngramError:
                return ChecksumError(
                    f"table store {self.path}: layer {layout.layer_id} {rows_text(a, b)} (shard {shard}): {what}"
                )

            try:
                with open(path, "rb") as handle:
                    size = os.fstat(handle.fileno()).st_size
                    tail = os.pread(handle.fileno(), tail_size, size - tail_size) if size >= tail_size else b""
                    entries = parse_index(tail, layout)
                    if entries is None:
                        raise bad("the shard index fails its crc32c checksum (truncated or corrupt file)")
                    for chunk in range(first, last + 1):
                        a = base + chunk * layout.chunk_rows
                        b = min(a + layout.chunk_rows, layout.rows)
                        offset, nbytes = int(entries[chunk, 0]), int(entries[chunk, 1])
                        if nbytes != chunk_size(layout):
                            raise bad("bad shard index entry", a, b)
                        lo, hi = max(a, start), min(b, stop)
                        if (lo, hi) == (a, b) and (b - a) * row_bytes == nbytes - CRC_BYTES:
                            rows = flat[lo - start : hi - start]
                            got = os.preadv(handle.fileno(), [rows.data, crc], offset)
                            if got != nbytes or crc_bytes(rows) != crc:
                                raise bad("fails its crc32c checksum", a, b)
                            continue
                        payload = os.pread(handle.fileno(), nbytes, offset)
                        if not chunk_is_intact(payload, layout):
                            raise bad("fails its crc32c checksum", a, b)
                        flat[lo - start : hi - start] = np.frombuffer(
                            payload, dtype=np.uint8, count=(hi - lo) * row_bytes, offset=(lo - a) * row_bytes
                        ).reshape(hi - lo, row_bytes)
            except FileNotFoundError:
                raise IncompleteStoreError(bad("not written yet (the build is incomplete)").args[0]) from None
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
            raise UsageError(f"row indices must lie in [0, {layout.rows}) for layer {layout.layer_id}")
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
        """Write one whole shard (all its rows) atomically; returns the bytes written.

        Args:
            layer_id: the layer.
            index: the shard of that layer.
            data: its rows, shape (shard rows, dim); converted to the table dtype if need be.
        """
        self._require_writable()
        layout = self.layout(layer_id)
        start, stop = layout.shard_range(index)
        data = np.asarray(data)
        if data.shape != (stop - start, layout.dim):
            raise UsageError(
                f"shard {index} of layer {layout.layer_id} holds rows {start}-{stop - 1}: "
                f"expected shape {(stop - start, layout.dim)}, got {data.shape}"
            )
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

        Args:
            layer_id: the layer.
            start: the first row, a shard start.
            data: the rows, shape (rows, dim).
        """
        layout = self.layout(layer_id)
        stop = start + len(data)
        if (
            start % layout.shard_rows
            or (stop % layout.shard_rows and stop != layout.rows)
            or stop > layout.rows
            or start < 0
        ):
            raise UsageError(
                f"write_rows writes whole shards of {layout.shard_rows} rows: layer "
                f"{layout.layer_id} rows {start}-{stop - 1} do not start and end on "
                f"shard boundaries (the layer has {layout.rows} rows)"
            )
        written = 0
        for index in range(start // layout.shard_rows, -(-stop // layout.shard_rows)):
            a, b = layout.shard_range(index)
            written += self.write_shard(layout.layer_id, index, data[a - start : b - start])
        return written

    def build_shard(
        self,
        layer_id: int,
        index: int,
        buffer: np.ndarray | None = None,
        pool: concurrent.futures.Executor | None = None,
    ) -> int:
        """Generate one shard with the store's init algorithm and write it; returns bytes.

        With a thread `pool` the rows are generated in pieces in parallel (the kernels release
        the GIL), so a few shard buffers in flight keep every core busy.

        Args:
            layer_id: the layer.
            index: the shard of that layer.
            buffer: reusable bytes to generate into (a new one when None or too small).
            pool: threads to generate 8 MiB pieces on (default: this thread alone).
        """
        if self._attrs["init"].get("algorithm") != INIT_ALGORITHM:
            raise UsageError(
                f"{self.path} holds tables from {self._attrs['init'].get('algorithm')!r}, "
                "not generated ones; it cannot be built here"
            )
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
            pieces = [
                pool.submit(fill_rows, self.spec, layout.layer_id, start + a, out[a : a + step])
                for a in range(0, len(out), step)
            ]
            for piece in pieces:
                piece.result()
        return self.write_shard(layout.layer_id, index, out)

    def ensure_shard(
        self,
        layer_id: int,
        index: int,
        buffer: np.ndarray | None = None,
        pool: concurrent.futures.Executor | None = None,
    ) -> tuple[str, int]:
        """Keep a shard whose checksums pass, rebuild it otherwise: ("kept"|"written"|"repaired", bytes).

        Args:
            layer_id, index: the shard; buffer, pool: as for `build_shard`.
        """
        layout = self.layout(layer_id)
        data = self._files.get(layout.shard_key(index))
        if data is not None:
            if shard_problem(data, layout, index) is None:
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


def _open_group(path: str, mode: str) -> zarr.Group:
    try:
        return zarr.open_group(path, mode=mode, zarr_format=3)  # type: ignore[arg-type]  # 'r' or 'r+'
    except (FileNotFoundError, zarr.errors.GroupNotFoundError, zarr.errors.NodeTypeValidationError):
        raise EngramError(f"no table store at {path}") from None
    except ValueError as exc:  # zarr.json that is not JSON, or not zarr v3 metadata
        raise FormatError(f"cannot open table store {path}: its zarr.json is damaged ({exc})") from None
    except (OSError, ImportError) as exc:  # ImportError: an fsspec backend not installed
        raise EngramError(f"cannot open table store {path}: {exc}") from None


def open_tables(path: str | Path, *, allow_incomplete: bool = False, writable: bool = False) -> TableStore:
    """Open a table store (a directory or an fsspec URL).

    Refuses, naming layers and rows, a store whose build never finished or whose shard files
    are missing, unless `allow_incomplete` (for `--resume` and inspection).

    Args:
        path: the store folder or URL.
        allow_incomplete: open a store that is not complete.
        writable: open it for writing shards and attributes.
    """
    path = store_path(path)
    if not is_url(path) and not Path(path).exists():
        raise EngramError(f"no table store at {path}")
    store = TableStore(path, _open_group(path, "r+" if writable else "r"), writable)
    if not allow_incomplete:
        store.check_complete()
    return store
