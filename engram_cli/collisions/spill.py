"""Key counts within a memory budget: a raw-key buffer, sorted runs on disk, merges by key range.

Counting appends the stored key of every window to one buffer per order (8 bytes a window and
word). When the buffers are full, each is sorted in place and reduced to its distinct keys and
counts (a sorted run, as much memory again at most), and the runs are written to the spill folder;
the buffers then start over. A corpus whose keys fit the buffers is never written to disk.

Runs merge by key range: word 0 of a stored key is spread evenly over its 64 bits, so the same
range cuts every run into a piece of about proportional size; a piece of every run is read,
merged in memory, and handed on, one range after the other, so memory is one range's pieces (a
few of them in flight on worker threads), whatever the corpus size. At most `fan_in` runs are
merged at once: beyond that, groups of runs are first merged into longer runs (a merge round).
A sample of word 0 every SAMPLE_ROWS rows, kept in memory, locates a range in a run on disk with
one small read.

The spill folder is engram's own: created at the start with a marker naming its owner (host,
pid, process start time), removed on every exit path. A folder left behind by a killed process
is recognized by its marker, its owner no longer running, and removed by the next run.
"""

from __future__ import annotations

import errno
import functools
import json
import math
import os
import shutil
import socket
import tempfile
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from ..corpus.base import DocBatch
from ..errors import EngramError, ResourceError
from ..helpers import available_memory
from .keys import KeyCounts, PackedBatch, WindowKeys, merge_runs, pack_windows, sort_and_count

SPILL_PREFIX = "engram-spill-"


MARKER = "engram-spill.json"


# Rows between two samples of word 0 of a run on disk (one read of this many rows locates a key).
SAMPLE_ROWS = 4096


# Runs merged at once; more are first merged in groups of this many (merge rounds).
FAN_IN = 64


# Buffer bytes per window and key word while counting: the raw key, then its sorted run or copy.
BUFFER_BYTES_PER_WORD = 16


def _owner() -> dict[str, Any]:
    import psutil

    return {"host": socket.gethostname(), "pid": os.getpid(), "started": psutil.Process().create_time()}


def _owner_gone(owner: dict[str, Any]) -> bool:
    """Whether the process a marker names has ended (only knowable on its own host)."""
    import psutil

    if owner.get("host") != socket.gethostname() or not isinstance(owner.get("pid"), int):
        return False
    try:
        return abs(psutil.Process(owner["pid"]).create_time() - float(owner["started"])) > 0.01
    except psutil.NoSuchProcess:
        return True
    except (psutil.Error, TypeError, ValueError):
        return False


def remove_stale_spill_folders(root: Path) -> list[Path]:
    """Remove the spill folders in `root` that engram left behind: named `engram-spill-*`, holding
    engram's marker, whose owning process on this host is gone. Anything else is left alone."""
    removed: list[Path] = []
    try:
        entries = list(root.iterdir())
    except OSError:
        return removed
    for entry in entries:
        if not entry.name.startswith(SPILL_PREFIX) or entry.is_symlink() or not entry.is_dir():
            continue
        marker = entry / MARKER
        try:
            if marker.is_symlink() or not marker.is_file():
                continue
            owner = json.loads(marker.read_text())
        except (OSError, ValueError):
            continue
        if isinstance(owner, dict) and owner.get("engram") == "spill" and _owner_gone(owner):
            shutil.rmtree(entry, ignore_errors=True)
            removed.append(entry)
    return removed


def disk_error(folder: Path, exc: OSError) -> EngramError:
    """A failed spill write as one line: a full disk says so, with what to do."""
    if exc.errno in (errno.ENOSPC, errno.EDQUOT):
        return ResourceError(
            f"not enough disk space to spill n-gram counts in {folder.parent} ({exc.strerror}); "
            "free some space, choose another spill folder, or raise the memory budget"
        )
    if exc.errno == errno.EFBIG:
        return ResourceError(
            f"cannot spill n-gram counts in {folder.parent}: a file outgrew the file size limit "
            "(ulimit -f); raise it or the memory budget"
        )
    return ResourceError(f"cannot spill n-gram counts to {folder}: {exc.strerror or exc}")


class SpillFolder:
    """A folder of engram's own for spilled counts, in `root` (default: the system temp folder).

    Created at once, so an unwritable root fails before any work; stale folders that earlier
    runs left in `root` are removed first. `close` removes it with everything in it.
    """

    def __init__(self, root: str | Path | None = None) -> None:
        base = Path(root) if root is not None else Path(tempfile.gettempdir())
        remove_stale_spill_folders(base)
        try:
            self.path = Path(tempfile.mkdtemp(prefix=SPILL_PREFIX, dir=base))
        except OSError as exc:
            raise ResourceError(f"cannot create a spill folder in {base}: {exc.strerror or exc}") from None
        try:
            tmp = self.path / f".{MARKER}.tmp"
            tmp.write_text(json.dumps({"engram": "spill", **_owner()}))
            tmp.replace(self.path / MARKER)
        except OSError as exc:
            shutil.rmtree(self.path, ignore_errors=True)
            raise disk_error(self.path, exc) from None
        self.written = 0
        self._names = 0

    @classmethod
    def task(cls, path: Path) -> SpillFolder:
        """The folder of one cluster task inside the run's spill folder (which holds the marker):
        started afresh (a retried task), and never recreating a spill folder already removed."""
        shutil.rmtree(path, ignore_errors=True)
        try:
            path.mkdir()
        except OSError as exc:
            raise disk_error(path, exc) from None
        folder = cls.__new__(cls)
        folder.path, folder.written, folder._names = path, 0, 0
        return folder

    def new_path(self, stem: str) -> Path:
        """A fresh path in the folder, named after `stem`."""
        self._names += 1
        return self.path / f"{stem}-{self._names:06d}"

    def append(self, path: Path, data: np.ndarray) -> None:
        """Append an array's bytes to a file of the folder."""
        try:
            with open(path, "ab", buffering=0) as handle:
                view = np.ascontiguousarray(data).data.cast("B")
                while view:  # (ndarray.tofile would lose the errno of a full disk)
                    view = view[handle.write(view) :]
        except OSError as exc:
            raise disk_error(self.path, exc) from None
        self.written += data.nbytes

    def close(self) -> None:
        """Remove the folder and everything in it."""
        shutil.rmtree(self.path, ignore_errors=True)

    def __enter__(self) -> SpillFolder:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


def _read_into(path: Path, offset: int, out: np.ndarray) -> None:
    """Fill the contiguous array `out` with the bytes of `path` from `offset`."""
    view = out.data.cast("B")
    try:
        with open(path, "rb", buffering=0) as handle:
            handle.seek(offset)
            got = 0
            while got < len(view):
                n = handle.readinto(view[got:])
                if not n:
                    raise EngramError(f"spill file {path} is shorter than expected; was it changed?")
                got += n
    except OSError as exc:
        raise EngramError(f"cannot read spill file {path}: {exc.strerror or exc}") from None


@dataclass
class Run:
    """A sorted run of distinct keys with their counts, in memory or in two files of a spill
    folder (`stem.keys`: rows of key words; `stem.counts`: int64)."""

    rows: int
    words: int
    occurrences: int
    stem: Path | None = None
    keys: np.ndarray | None = None
    counts: np.ndarray | None = None
    sample: np.ndarray = field(default_factory=lambda: np.zeros(0, np.uint64))
    keep: bool = False  # read by others too (a cluster's map outputs): merges leave it in place

    @staticmethod
    def in_memory(part: KeyCounts) -> Run:
        """A run of key counts held in memory."""
        return Run(part.rows, part.keys.shape[1], int(part.counts.sum()), keys=part.keys, counts=part.counts)

    @property
    def nbytes(self) -> int:
        """Bytes of the keys and counts."""
        return self.rows * (self.words + 1) * 8

    @property
    def on_disk(self) -> bool:
        """Whether the run is in the spill folder (else in memory)."""
        return self.stem is not None

    def locate(self, bounds: np.ndarray) -> np.ndarray:
        """The first row whose word 0 is at least each of the sorted uint64 `bounds`."""
        if self.keys is not None:
            return np.searchsorted(self.keys[:, 0], bounds, side="left").astype(np.int64)
        block = np.searchsorted(self.sample, bounds, side="left")
        found = np.empty(bounds.size, np.int64)
        for i, (bound, b) in enumerate(zip(bounds, block.tolist())):
            if b == 0:
                found[i] = 0
                continue
            lo = (b - 1) * SAMPLE_ROWS
            hi = min(b * SAMPLE_ROWS, self.rows)
            first = self.read(lo, hi).keys[:, 0]
            found[i] = lo + int(np.searchsorted(first, bound, side="left"))
        return found

    def read(self, lo: int, hi: int, keys: np.ndarray | None = None, counts: np.ndarray | None = None) -> KeyCounts:
        """Rows [lo, hi) of the run.

        Args:
            lo, hi: the rows.
            keys, counts: contiguous arrays of hi - lo rows to read into (allocated when None).
        """
        n = hi - lo
        if self.keys is not None:
            assert self.counts is not None
            if keys is None or counts is None:
                return KeyCounts(self.keys[lo:hi], self.counts[lo:hi])
            keys[:] = self.keys[lo:hi]
            counts[:] = self.counts[lo:hi]
            return KeyCounts(keys, counts)
        assert self.stem is not None
        keys = np.empty((n, self.words), np.uint64) if keys is None else keys
        counts = np.empty(n, np.int64) if counts is None else counts
        if n:
            _read_into(self.stem.with_suffix(".keys"), lo * self.words * 8, keys)
            _read_into(self.stem.with_suffix(".counts"), lo * 8, counts)
        return KeyCounts(keys, counts)

    def chunks(self, rows: int) -> Iterator[KeyCounts]:
        """The run `rows` at a time."""
        for lo in range(0, self.rows, max(1, rows)):
            yield self.read(lo, min(lo + rows, self.rows))

    def remove(self) -> None:
        """Delete the run's files (unless others read them: `keep`)."""
        if self.stem is not None and not self.keep:
            for suffix in (".keys", ".counts"):
                self.stem.with_suffix(suffix).unlink(missing_ok=True)


class RunWriter:
    """Writes a sorted run to the spill folder piece by piece (pieces in key order)."""

    def __init__(self, folder: SpillFolder, words: int, stem: str = "run") -> None:
        self.folder = folder
        self.run = Run(0, words, 0, stem=folder.new_path(stem))
        self._samples: list[np.ndarray] = []

    def add(self, part: KeyCounts) -> None:
        """Append a piece of the run (pieces in key order)."""
        if not part.rows:
            return
        run = self.run
        assert run.stem is not None
        first = (-run.rows) % SAMPLE_ROWS
        self._samples.append(part.keys[first::SAMPLE_ROWS, 0].copy())
        self.folder.append(run.stem.with_suffix(".keys"), np.ascontiguousarray(part.keys))
        self.folder.append(run.stem.with_suffix(".counts"), np.ascontiguousarray(part.counts))
        run.rows += part.rows
        run.occurrences += int(part.counts.sum())

    def close(self) -> Run:
        """The run written."""
        self.run.sample = np.concatenate(self._samples) if self._samples else np.zeros(0, np.uint64)
        return self.run


def write_run(folder: SpillFolder, part: KeyCounts, stem: str = "run") -> Run:
    """A sorted run of key counts written to the spill folder whole.

    Args:
        folder: the spill folder.
        part: the run.
        stem: the start of its file names.
    """
    writer = RunWriter(folder, part.keys.shape[1], stem)
    writer.add(part)
    return writer.close()


# A range of word 0 of the stored keys: [low, high), high at most 2**64.
KeyRange = tuple[int, int]


WHOLE: KeyRange = (0, 1 << 64)


def range_bounds(pieces: int, key_range: KeyRange = WHOLE) -> np.ndarray:
    """The pieces - 1 inner bounds that cut a range of word 0 into `pieces` equal ranges."""
    low, high = key_range
    return np.array([low + (i * (high - low)) // pieces for i in range(1, pieces)], np.uint64)


def cut_rows(run: Run, bounds: np.ndarray, key_range: KeyRange) -> np.ndarray:
    """The rows of `run` at the ends of `key_range` and at each inner bound.

    Args:
        run: a sorted run.
        bounds: sorted values of word 0 inside the range.
        key_range: the range.
    """
    low, high = key_range
    first = 0 if low == 0 else int(run.locate(np.array([low], np.uint64))[0])
    last = run.rows if high >= 1 << 64 else int(run.locate(np.array([high], np.uint64))[0])
    inner = run.locate(bounds) if bounds.size else np.zeros(0, np.int64)
    return np.concatenate([[first], np.clip(inner, first, last), [last]]).astype(np.int64)


def ordered(pool: ThreadPoolExecutor, jobs: Iterable[Callable[[], Any]], ahead: int) -> Iterator[Any]:
    """Results of `jobs` run on `pool`, in order, at most `ahead` running or done but not taken
    (so memory holds that many results, however many jobs there are).

    Args:
        pool: the worker threads.
        jobs: functions of no arguments.
        ahead: results in flight.
    """
    pending: deque[Future[Any]] = deque()
    try:
        for job in jobs:
            pending.append(pool.submit(job))
            if len(pending) >= ahead:
                yield pending.popleft().result()
        while pending:
            yield pending.popleft().result()
    finally:
        for future in pending:
            future.cancel()


def merge_pieces(
    runs: list[Run],
    piece_rows: int,
    pool: ThreadPoolExecutor,
    ahead: int,
    key_range: KeyRange = WHOLE,
    on_plan: Callable[[int], None] | None = None,
) -> Iterator[KeyCounts]:
    """The merged key counts of `runs` in `key_range`, one smaller range at a time, in key order.

    Args:
        runs: sorted runs of one order.
        piece_rows: rows of all runs together in one smaller range (its pieces and their merge
            take twice their bytes in memory).
        pool: the worker threads that read and merge.
        ahead: ranges in memory at most.
        key_range: the range of word 0 to merge.
        on_plan: told how many smaller ranges there are; empty ones yield empty counts.
    """
    if not runs:
        if on_plan:
            on_plan(0)
        return
    ends = [cut_rows(run, np.zeros(0, np.uint64), key_range) for run in runs]
    total = sum(int(e[-1] - e[0]) for e in ends)
    pieces = max(1, math.ceil(total / max(1, piece_rows)))
    if on_plan:
        on_plan(pieces)
    bounds = range_bounds(pieces, key_range)
    cuts = [cut_rows(run, bounds, key_range) for run in runs]
    words = runs[0].words

    def merge(p: int) -> KeyCounts:
        """Read and merge the pieces of range `p`."""
        spans = [(run, int(c[p]), int(c[p + 1])) for run, c in zip(runs, cuts) if c[p + 1] > c[p]]
        rows = sum(hi - lo for _, lo, hi in spans)
        keys = np.empty((rows, words), np.uint64)
        counts = np.empty(rows, np.int64)
        offsets = [0]
        for run, lo, hi in spans:
            at = offsets[-1]
            run.read(lo, hi, keys[at : at + hi - lo], counts[at : at + hi - lo])
            offsets.append(at + hi - lo)
        return merge_runs(keys, counts, np.array(offsets, np.int64))

    yield from ordered(pool, (functools.partial(merge, p) for p in range(pieces)), ahead)


def rounds_needed(runs: int, fan_in: int = FAN_IN) -> int:
    """Merge rounds that bring `runs` runs down to at most `fan_in`."""
    rounds = 0
    while runs > max(2, fan_in):
        runs = -(-runs // max(2, fan_in))
        rounds += 1
    return rounds


def merge_rounds(
    runs: list[Run],
    folder: SpillFolder,
    piece_rows: int,
    pool: ThreadPoolExecutor,
    ahead: int,
    fan_in: int = FAN_IN,
    on_round: Callable[[int, int], None] | None = None,
    key_range: KeyRange = WHOLE,
) -> list[Run]:
    """Merge groups of `fan_in` runs (their keys in `key_range`) into longer runs until at most
    `fan_in` are left; inputs not marked `keep` are removed once merged.

    Args:
        runs: sorted runs of one order.
        folder: where the longer runs go.
        piece_rows, pool, ahead: as for `merge_pieces`.
        fan_in: the most runs merged at once (at least 2).
        on_round: told (runs before, runs after) after each round.
        key_range: the range of word 0 to merge.
    """
    fan_in = max(2, fan_in)
    while len(runs) > fan_in:
        merged = []
        for g in range(0, len(runs), fan_in):
            group = runs[g : g + fan_in]
            if len(group) == 1:
                merged.append(group[0])
                continue
            writer = RunWriter(folder, group[0].words, "round")
            for part in merge_pieces(group, piece_rows, pool, ahead, key_range):
                writer.add(part)
            merged.append(writer.close())
            for run in group:
                run.remove()
        if on_round:
            on_round(len(runs), len(merged))
        runs = merged
    return runs


class KeyCountStore:
    """Counts the windows of every order: a raw-key buffer per order, sorted into runs when full.

    `capacity` windows fit the buffers of all orders within `memory_budget` bytes (a buffer and
    its sorted run take BUFFER_BYTES_PER_WORD bytes a window and key word). `finish` leaves each
    order as one run in memory when nothing was spilled, else as runs in the spill folder.
    """

    def __init__(self, window: WindowKeys, memory_budget: int, folder: SpillFolder, pool: ThreadPoolExecutor) -> None:
        self.window = window
        self.folder = folder
        self.pool = pool
        self.capacity = self.capacity_for(window, memory_budget)
        self.words = {n: window.layout(n).words for n in window.orders}
        self._buffers: dict[int, np.ndarray] = {}
        self._scratch: dict[int, np.ndarray] = {}  # counts (or the sort's copy), reused run after run
        self._fill = 0
        self._pending: deque[tuple[DocBatch, list[Future[None]]]] = deque()
        self.runs: dict[int, list[Run]] = {n: [] for n in window.orders}
        self.in_memory: dict[int, Run] = {}

    @staticmethod
    def capacity_for(window: WindowKeys, memory_budget: int) -> int:
        """Windows per order held in memory before spilling, within `memory_budget` bytes."""
        per_window = sum(BUFFER_BYTES_PER_WORD * window.layout(n).words for n in window.orders)
        return max(1, memory_budget // per_window)

    @property
    def spilled(self) -> bool:
        """Whether runs went to the spill folder."""
        return any(self.runs.values())

    def _buffer(self, order: int) -> np.ndarray:
        if order not in self._buffers:
            self._buffers[order] = np.empty((self.capacity, self.words[order]), np.uint64)
        return self._buffers[order]

    def add(self, batch: DocBatch, on_done: Callable[[DocBatch], None] | None = None) -> None:
        """Count the windows of one batch (packed on the pool; the previous batch may still be
        packing while the next is read). `on_done(batch)` once its windows are in the buffers."""
        packed = PackedBatch.of(batch, self.window)
        tokens = packed.tokens
        if tokens and self._fill + tokens <= self.capacity:
            lo = self._fill
            self._fill += tokens
            jobs = [
                self.pool.submit(pack_windows, packed, self.window, n, self._buffer(n)[lo : lo + tokens])
                for n in self.window.orders
            ]
            self._pending.append((batch, jobs))
            self._drain(keep=1, on_done=on_done)
            return
        self._drain(keep=0, on_done=on_done)
        if tokens:
            scratch = {n: np.empty((tokens, self.words[n]), np.uint64) for n in self.window.orders}
            for job in [self.pool.submit(pack_windows, packed, self.window, n, scratch[n]) for n in scratch]:
                job.result()
            done = 0
            while done < tokens:
                take = min(self.capacity - self._fill, tokens - done)
                for n, keys in scratch.items():
                    self._buffer(n)[self._fill : self._fill + take] = keys[done : done + take]
                self._fill += take
                done += take
                if self._fill == self.capacity:
                    self._spill()
        if on_done:
            on_done(batch)

    def _drain(self, keep: int, on_done: Callable[[DocBatch], None] | None) -> None:
        while len(self._pending) > keep:
            batch, jobs = self._pending.popleft()
            for job in jobs:
                job.result()
            if on_done:
                on_done(batch)

    def _sorted_runs(self) -> dict[int, KeyCounts]:
        """Sort every buffer into its run (orders in parallel)."""
        fill = self._fill
        for n in self.window.orders:
            if n not in self._scratch:
                self._scratch[n] = np.empty(self.capacity * self.words[n], np.uint64)
        jobs = {
            n: self.pool.submit(sort_and_count, self._buffer(n), fill, self._scratch[n]) for n in self.window.orders
        }
        return {n: job.result() for n, job in jobs.items()}

    def _spill(self) -> None:
        for order, part in self._sorted_runs().items():
            self.runs[order].append(write_run(self.folder, part, f"order{order}"))
        self._fill = 0

    def finish(self, on_done: Callable[[DocBatch], None] | None = None) -> None:
        """Count what the buffers hold: one run in memory per order when nothing was spilled,
        else the last runs spilled too (the buffers are released)."""
        self._drain(keep=0, on_done=on_done)
        if not self.spilled:
            self.in_memory = {n: Run.in_memory(part) for n, part in self._sorted_runs().items()}
        elif self._fill:
            self._spill()
        if self.spilled:
            self._buffers.clear()
            self._scratch.clear()

    @property
    def resident_bytes(self) -> int:
        """Memory the in-memory runs still hold: the part of the buffer that was filled, and
        the counts (one-word keys) or the sort's copy (longer keys)."""
        total = 0
        for n, run in self.in_memory.items():
            words = self.words[n]
            total += self._fill * words * 8 + (run.rows * 8 if words == 1 else self._fill * words * 8)
        return total

    def release(self, order: int) -> None:
        """Drop the in-memory run of an order once its statistics are done."""
        self.in_memory.pop(order, None)
        self._buffers.pop(order, None)
        self._scratch.pop(order, None)

    def spill_in_memory(self) -> None:
        """Write the in-memory runs to the spill folder and release their memory."""
        for order, run in self.in_memory.items():
            assert run.keys is not None and run.counts is not None
            self.runs[order].append(write_run(self.folder, KeyCounts(run.keys, run.counts), f"order{order}"))
        self.in_memory = {}
        self._buffers.clear()
        self._scratch.clear()
        self._fill = 0


def default_memory_budget() -> int:
    """A quarter of the memory available now, between 256 MiB and 8 GiB."""
    return int(min(8 << 30, max(256 << 20, available_memory() // 4)))
