"""Shard files and other store keys as whole objects: on a local disk directly, else through zarr.

A local store (a folder) is read and written with plain file calls, which is what makes reading
whole chunks straight from shard files fast; a write goes to a temporary name beside the key
(`.<name>.<pid>-<thread>.partial`) and is renamed onto it, so a file is either complete or absent,
and the partial files of writers that died are found by that suffix. Any other store (an fsspec
URL) goes through zarr's store API, one whole-object get or set per key.
"""

from __future__ import annotations

import os
import threading
from pathlib import Path
from typing import Any

try:
    import fcntl
except ImportError:  # Windows: no flock, no build lock
    fcntl = None  # type: ignore[assignment]

from zarr.core.buffer import default_buffer_prototype
from zarr.core.sync import sync
from zarr.storage import LocalStore

from ..errors import ResourceError

_PARTIAL_SUFFIX = ".partial"


def is_url(path: str) -> bool:
    """Whether a store path is a URL (`s3://...`, `gs://...`) rather than a local folder."""
    return "://" in path


def store_path(path: str | Path) -> str:
    """A folder path or an fsspec URL; a file:// URL is the plain local folder it names."""
    path = str(path)
    return path[len("file://") :] if path.startswith("file://") else path


class Files:
    """Whole-object reads and atomic writes of store keys, on disk or through zarr's store API."""

    def __init__(self, store: Any) -> None:
        self.store = store
        self.root = Path(store.root) if isinstance(store, LocalStore) else None

    def put(self, key: str, parts: list[Any]) -> None:
        """Write `parts` in order as the whole object `key`: atomically on a local disk (temporary name, rename)."""
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
        """The whole object `key`, or None when it does not exist."""
        if self.root is None:
            buf = sync(self.store.get(key, prototype=default_buffer_prototype()))
            return None if buf is None else buf.to_bytes()
        try:
            return (self.root / key).read_bytes()
        except (FileNotFoundError, NotADirectoryError, IsADirectoryError):
            return None

    def size(self, key: str) -> int | None:
        """The size of object `key` in bytes, or None when it does not exist (no read of its data)."""
        if self.root is None:
            if not sync(self.store.exists(key)):
                return None
            return int(sync(self.store.getsize(key)))
        try:
            return (self.root / key).stat().st_size
        except (FileNotFoundError, NotADirectoryError):
            return None

    def remove_partials(self, prefix: str) -> None:
        """Delete the temporary files that writers under `prefix` left behind when they died (local stores)."""
        if self.root is not None and (self.root / prefix).is_dir():
            for stale in (self.root / prefix).rglob(f".*{_PARTIAL_SUFFIX}"):
                stale.unlink(missing_ok=True)


LOCK_NAME = ".engram-build.lock"  # inside a local store while a build writes it


class BuildLock:
    """The exclusive lock a build holds on a local store while it writes it.

    An `fcntl.flock` on STORE/.engram-build.lock: the kernel drops it when the holder exits,
    however it dies (kill -9 included), so a lock is never stale; the file itself is removed
    when the build completes. fsspec URLs, and systems without flock, take no lock.
    """

    def __init__(self, path: str) -> None:
        self.path = path
        self._fd: int | None = None

    @property
    def file(self) -> Path:
        return Path(self.path) / LOCK_NAME

    def held_elsewhere_possible(self) -> bool:
        """Whether a build may be writing the store now: only a build in progress has the file."""
        return not is_url(self.path) and self.file.exists()

    def acquire(self) -> None:
        """Take the lock, or refuse at once (ResourceError) when another build holds it."""
        self.release()
        if is_url(self.path) or fcntl is None:
            return
        fd = os.open(self.file, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise ResourceError(
                f"{self.path} is being written by another engram build (it holds {self.file}); "
                "let that one finish, or stop it and resume"
            ) from None
        self._fd = fd

    def release(self, *, remove: bool = False) -> None:
        if self._fd is None:
            return
        if remove:
            self.file.unlink(missing_ok=True)
        os.close(self._fd)
        self._fd = None
