"""The spill folder: where counting puts what does not fit the memory budget, and only that.

The folder is engram's own: created at the start with a marker naming its owner (host, pid,
process start time), removed on every exit path (errors, Ctrl-C and SIGTERM too; worker threads
are stopped first so nothing writes into it afterwards). A folder left behind by a killed process
is recognized by its marker, its owner no longer running, and removed by the next run; nothing
without the marker is ever touched. A full disk, a file size limit or an unwritable folder are
one-line errors naming the folder.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import socket
import tempfile
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import EngramError, ResourceError

SPILL_PREFIX = "engram-spill-"


MARKER = "engram-spill.json"


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


@contextmanager
def worker_pool(threads: int) -> Iterator[ThreadPoolExecutor]:
    """A thread pool that, on the way out (an error or Ctrl-C too), drops what has not started
    and waits for what runs, so nothing writes to the spill folder once it is removed."""
    pool = ThreadPoolExecutor(max_workers=threads, thread_name_prefix="engram-count")
    try:
        yield pool
    finally:
        pool.shutdown(wait=True, cancel_futures=True)
