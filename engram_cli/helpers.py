"""Small helpers used across the package, written once.

Reads bounded by a size limit, file names that stay in their folder, the usable cpu count and
available memory, bounded parallel map and one-ahead prefetch, row blocks, and numbers as people
read them. Writing outputs (temporaries, the swap into place, free space) is `output`'s.
"""

from __future__ import annotations

import collections
import concurrent.futures
import contextlib
import gc
import os
import stat
from collections.abc import Callable, Generator, Iterable, Iterator, Sequence
from pathlib import Path
from typing import IO, Any, TypeVar

import numpy as np

from .errors import ResourceError

T = TypeVar("T")


def prefetched(items: Sequence[T], read: Callable[[T], Any], ahead: int = 1) -> Iterator[tuple[T, Any]]:
    """(item, read(item)) in order, the next `ahead` items read in background threads meanwhile:
    reading overlaps writing (and, with `ahead` > 1, other reads), and at most `ahead` + 1 blocks
    are in memory."""
    with concurrent.futures.ThreadPoolExecutor(ahead, thread_name_prefix="engram-read") as pool:
        pending = collections.deque(pool.submit(read, item) for item in items[:ahead])
        for i, item in enumerate(items):
            result = pending.popleft().result()
            if i + ahead < len(items):
                pending.append(pool.submit(read, items[i + ahead]))
            yield item, result


def in_parallel(items: Iterable[T], work: Callable[[T], Any], threads: int) -> Generator[Any, None, None]:
    """work(item) for every item on `threads` threads, results as they finish.

    At most `threads` items are in flight, so memory stays at `threads` items' worth; the first
    error stops what has not started and is raised once the running items are done.

    Args:
        items: the work items, consumed as threads free up.
        work: the function to run on each.
        threads: how many run at once.
    """
    with concurrent.futures.ThreadPoolExecutor(threads, thread_name_prefix="engram-work") as pool:
        pending: set[concurrent.futures.Future[Any]] = set()
        try:
            for item in items:
                if len(pending) >= threads:
                    done, pending = concurrent.futures.wait(pending, return_when=concurrent.futures.FIRST_COMPLETED)
                    for future in done:
                        yield future.result()
                pending.add(pool.submit(work, item))
            while pending:
                done, pending = concurrent.futures.wait(pending, return_when=concurrent.futures.FIRST_COMPLETED)
                for future in done:
                    yield future.result()
        finally:
            for future in pending:
                future.cancel()


@contextlib.contextmanager
def paused_gc() -> Iterator[None]:
    """No cyclic garbage collection inside the block: building a few hundred thousand small
    dicts and lists otherwise triggers full collections that rescan all of them, over and over."""
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if enabled:
            gc.enable()


def row_blocks(total: int, block: int) -> Iterator[tuple[int, int]]:
    """(begin, end) of consecutive blocks of `block` rows covering `total` rows, the last one short."""
    for begin in range(0, total, block):
        yield begin, min(begin + block, total)


def cpu_count() -> int:
    """The cores this process may run on (its affinity where the OS has one), at least 1."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # macOS and Windows
        return max(1, os.cpu_count() or 1)


def human_bytes(n: float) -> str:
    """A byte count in decimal units, as people read it: `512 B`, `1.5 GB`."""
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if abs(n) < 1000 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    raise AssertionError("unreachable")


def available_memory() -> int:
    """Bytes of memory this process can still get, now: the least of what the system can give
    without swapping (psutil), what its address-space limit leaves (`RLIMIT_AS`, as `ulimit -v`
    and batch schedulers set it, less the address space already mapped) and what its cgroup's
    memory limit leaves (v2 `memory.max`, v1 `memory.limit_in_bytes`, less the usage)."""
    import psutil

    return int(min([psutil.virtual_memory().available, *(room for _, room in memory_limits())]))


# cgroup files: (limit, usage) of v2, then v1, under the cgroup mount.
_CGROUP_FILES = (("memory.max", "memory.current"), ("memory/memory.limit_in_bytes", "memory/memory.usage_in_bytes"))


def memory_limits() -> list[tuple[str, int]]:
    """Each limit on this process's memory that is set, in words, with the bytes it leaves now."""
    import resource

    import psutil

    limits = []
    soft, _ = resource.getrlimit(resource.RLIMIT_AS)
    if soft != resource.RLIM_INFINITY:
        mapped = psutil.Process().memory_info().vms
        limits.append((f"an address-space limit (ulimit -v) of {gibibytes(soft)}", max(0, soft - mapped)))
    for limit_name, usage_name in _CGROUP_FILES:
        try:
            limit_text = Path("/sys/fs/cgroup", limit_name).read_text().strip()
            usage = int(Path("/sys/fs/cgroup", usage_name).read_text().strip())
        except (OSError, ValueError):
            continue
        if limit_text.isdigit() and int(limit_text) < 1 << 60:  # v1 writes a huge number for "no limit"
            limits.append((f"a cgroup memory limit of {gibibytes(int(limit_text))}", max(0, int(limit_text) - usage)))
        break
    return limits


def gibibytes(n: int) -> str:
    """A memory size in binary units, as budgets are given: MiB below 1 GiB, TiB past 1024 GiB."""
    if n < 1 << 30:
        return f"{n / (1 << 20):,.1f} MiB"
    return f"{n / (1 << 40):,.1f} TiB" if n >= 1 << 40 else f"{n / (1 << 30):,.1f} GiB"


def mebibytes(n: int) -> str:
    """A size limit as it is documented: in MiB."""
    return f"{n / (1 << 20):g} MiB"


def read_limited(stream: IO[bytes], limit: int, what: str) -> bytes:
    """All of `stream`, or a ResourceError once it passes `limit` bytes: it is read 1 MiB at a
    time, so no more than `limit` plus one piece is ever held, whatever the stream (a pipe, a
    device, a zip member inflating far past what its header claims).

    Args:
        stream: a binary stream, read to its end.
        limit: the most bytes accepted.
        what: names the input in the error.
    """
    buffer = bytearray()
    while len(buffer) <= limit:
        piece = stream.read(min(1 << 20, limit + 1 - len(buffer)))
        if not piece:
            return bytes(buffer)
        buffer += piece
    raise ResourceError(f"{what} is larger than {mebibytes(limit)}, the most engram reads for it")


def read_file_limited(path: Path, limit: int, what: str) -> bytes:
    """The bytes of a file, refused past `limit`: a regular file by its size before reading,
    anything else (a device, a pipe) once it has yielded `limit + 1` bytes.

    Args:
        path: the file.
        limit: the most bytes accepted.
        what: names the input in the error.
    """
    with open(path, "rb") as stream:
        info = os.fstat(stream.fileno())
        if stat.S_ISREG(info.st_mode) and info.st_size > limit:
            raise ResourceError(
                f"{what} is {human_bytes(info.st_size)}, larger than {mebibytes(limit)}, the most engram reads for it"
            )
        return read_limited(stream, limit, what)


def plain_file_name(name: Any) -> bool:
    """Whether a name a file records for another file (an index's shard, a checkpoint's piece) is
    a file of the same folder: no folder part, no `..`, not absolute, so reading it stays inside."""
    return isinstance(name, str) and name not in ("", ".", "..") and "/" not in name and "\\" not in name


def pct(x: float | np.floating[Any]) -> str:
    """A rate as a percentage, with three decimals below 1% so small rates do not read as zero."""
    return f"{100 * x:.3f}%" if x < 0.01 else f"{100 * x:.2f}%"


def plural(count: int, word: str) -> str:
    """A count with its noun, plural unless the count is 1: `1 file`, `2,048 files`."""
    return f"{count:,} {word}{'' if count == 1 else 's'}"


def first_line(exc: BaseException, os_words: bool = False) -> str:
    """The first line of an exception's message, for one-line errors; its type's name when the
    message is blank. With `os_words`, an OS error's own words where it has them (no errno, no path)."""
    text = str((getattr(exc, "strerror", None) if os_words else None) or exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def os_error_behind(exc: BaseException) -> OSError | None:
    """The OSError that caused `exc`, if any: libraries that write through their own layers
    (torch.save's zip writer) report a failed write as some other error raised while handling it."""
    seen: BaseException | None = exc
    while seen is not None:
        if isinstance(seen, OSError):
            return seen
        seen = seen.__cause__ or seen.__context__
    return None
