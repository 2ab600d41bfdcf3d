"""Small helpers used across the package, written once.

Atomic file writes (a temporary name beside the target, renamed onto it when complete, so
readers never see half a file), output-file checks before any work, reads bounded by a size
limit, file names that stay in their folder, the usable cpu count and available memory, bounded
parallel map and one-ahead prefetch, row blocks, and numbers as people read them.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import errno
import functools
import gc
import hashlib
import os
import re
import secrets
import shutil
import socket
import stat
from collections.abc import Callable, Generator, Iterable, Iterator, Sequence
from pathlib import Path
from typing import IO, Any, TypeVar

import numpy as np

from .errors import EngramError, OutputExistsError, ResourceError

T = TypeVar("T")


def prefetched(items: Sequence[T], read: Callable[[T], Any]) -> Iterator[tuple[T, Any]]:
    """(item, read(item)) in order, the next item read in a background thread meanwhile: reading
    overlaps writing, and at most two blocks are in memory."""
    if not items:
        return
    with concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="engram-read") as pool:
        pending = pool.submit(read, items[0])
        for i, item in enumerate(items):
            result = pending.result()
            if i + 1 < len(items):
                pending = pool.submit(read, items[i + 1])
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


def check_output_file(output: Path, overwrite: bool) -> None:
    """Refuse, before any work, an output file that cannot or may not be written."""
    if output.is_dir():
        raise EngramError(f"output {output} is a directory; give a file path")
    if output.exists() and not overwrite:
        raise OutputExistsError(f"output {output} exists; pass --overwrite to replace it")
    if not output.parent.is_dir():
        raise EngramError(f"output folder {output.parent} does not exist")
    if not os.access(output.parent, os.W_OK):
        raise EngramError(f"output folder {output.parent} is not writable")


TMP_PREFIX = ".engram-tmp-"  # every temporary file or folder engram writes beside a target starts so


_TMP_OWNER = re.compile(r"\.([0-9a-f]{8})-([0-9]+)-[0-9a-f]{8}$")


@functools.cache
def _host_tag() -> str:
    """Eight hex digits naming this machine in temporary names, so that a folder shared by
    several machines only ever has its own machine's temporaries judged."""
    return hashlib.sha256(socket.gethostname().encode()).hexdigest()[:8]


def temporary_name(path: Path) -> Path:
    """A fresh name beside `path` for writing it: renamed onto `path` only once complete.

    The name is `.engram-tmp-<name>.<host>-<pid>-<random>`: who is writing it, so that
    `remove_stale_temporaries` can tell a temporary of a killed run from one in use.
    """
    return path.with_name(f"{TMP_PREFIX}{path.name}.{_host_tag()}-{os.getpid()}-{secrets.token_hex(4)}")


def _process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OverflowError):  # another user's process, or no valid pid: not ours to judge
        return True
    return True


def remove_stale_temporaries(folder: Path) -> list[Path]:
    """Delete the temporaries that engram runs killed on this machine left in `folder`.

    Only names made by `temporary_name` count, and only when they carry this machine's tag and
    the process that made them no longer runs: a live run's temporary, another machine's, and
    anything else in the folder stay. Returns what was removed; failures to remove are ignored
    (the next run tries again).
    """
    removed: list[Path] = []
    try:
        entries = list(os.scandir(folder))
    except OSError:
        return removed
    for entry in entries:
        if not entry.name.startswith(TMP_PREFIX):
            continue
        match = _TMP_OWNER.search(entry.name)
        if match is None or match.group(1) != _host_tag() or _process_alive(int(match.group(2))):
            continue
        path = Path(entry.path)
        try:
            if entry.is_dir(follow_symlinks=False):
                shutil.rmtree(path)
            else:
                path.unlink()
        except OSError:
            continue
        removed.append(path)
    return removed


_FULL = {errno.ENOSPC, errno.EDQUOT, errno.EFBIG}


def first_line(exc: BaseException, os_words: bool = False) -> str:
    """The first line of an exception's message, for one-line errors; its type's name when the
    message is blank. With `os_words`, an OS error's own words where it has them (no errno, no path)."""
    text = str((getattr(exc, "strerror", None) if os_words else None) or exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def write_error(path: str | Path, exc: OSError) -> EngramError:
    """The one-line error of a failed write: a ResourceError when the disk (or a quota, or a
    file size limit) is full, an EngramError naming the reason otherwise."""
    cls = ResourceError if exc.errno in _FULL else EngramError
    return cls(f"cannot write {path}: {exc.strerror or exc}")


def os_error_behind(exc: BaseException) -> OSError | None:
    """The OSError that caused `exc`, if any: libraries that write through their own layers
    (torch.save's zip writer) report a failed write as some other error raised while handling it."""
    seen: BaseException | None = exc
    while seen is not None:
        if isinstance(seen, OSError):
            return seen
        seen = seen.__cause__ or seen.__context__
    return None


def check_free_space(path: str | Path, needed: int, reclaimed: int = 0) -> None:
    """Refuse up front writing `needed` bytes at `path` that its disk cannot hold.

    `reclaimed`: bytes the write frees first (what --overwrite deletes). URLs are not checked.
    """
    if "://" in str(path):
        return
    probe = Path(path).absolute()
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    try:
        free = shutil.disk_usage(probe).free + reclaimed
    except OSError:
        return
    if needed > free:
        raise ResourceError(
            f"not enough disk space for {path}: needs {human_bytes(needed)}, {human_bytes(free)} free on {probe}"
        )


@contextlib.contextmanager
def atomic_file(path: Path) -> Iterator[Path]:
    """Yield a temporary path beside `path` to write; rename it onto `path` when the block ends.

    Readers never see half a file, a failure leaves `path` as it was, and the file is created
    with an ordinary `open`, so its mode follows the umask like every other output. OS errors
    (a full disk, a read-only folder) become one-line errors naming the file.
    """
    remove_stale_temporaries(path.parent)
    tmp = temporary_name(path)
    try:
        yield tmp
        os.replace(tmp, path)
    except OSError as exc:
        raise write_error(path, exc) from None
    finally:
        tmp.unlink(missing_ok=True)


def swap_into_place(tmp: Path, target: Path) -> None:
    """Move a finished file or folder onto `target`, replacing what is there only now that the
    new one is whole: the old one is first renamed aside, then deleted."""
    try:
        if not (target.exists() or target.is_symlink()):
            os.replace(tmp, target)
            return
        old = temporary_name(target)
        os.replace(target, old)
        try:
            os.replace(tmp, target)
        except OSError:
            os.replace(old, target)
            raise
    except OSError as exc:
        raise write_error(target, exc) from None
    if old.is_dir() and not old.is_symlink():
        shutil.rmtree(old, ignore_errors=True)  # what stays is stale once we exit, and removed then
    else:
        old.unlink(missing_ok=True)


def atomic_write(path: Path, data: bytes) -> None:
    """Write `data` to `path` through `atomic_file`."""
    with atomic_file(path) as tmp:
        tmp.write_bytes(data)
