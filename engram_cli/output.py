"""Writing an output: the one way every file or folder engram makes reaches its path.

A store (`engram import`), a DCP or safetensors export, a projection file, a hash file and a plot
are all written the same way, by `Output`:

1. Before any work, the target is checked: what stands at the path may be replaced only with
   `overwrite` and only when its kind (an `OutputKind`) says it is something of that kind (a
   store of ours, an export, a plain file); the folder it goes in must exist and be writable.
2. `Output.writing` then removes the temporaries that killed runs of this machine left in that
   folder, checks the free space for the bytes the writer will need, and hands the writer a
   fresh temporary path beside the target, `.engram-tmp-<name>.<host>-<pid>-<random>`: the run's
   marker, so that a later run can tell a dead run's leftover from a live run's work. The writer
   writes only there (a folder made for it, or a file it creates), under the kind's lock.
3. When the writer returns, the target is checked once more (it may have changed meanwhile) and
   the temporary is swapped into place: a file by one rename, a folder by renaming the old one
   aside first, so readers only ever see the old output or the whole new one. On every other
   exit (an error, Ctrl-C) the temporary is deleted and the target stays as it was.

A new output kind is one `OutputKind` subclass (its replace rules, and a lock if writers of it
can race), next to the writer that makes it. `engram build-tables` alone writes its store in
place, because `--resume` continues what a killed build left there (zarr makes missing parent
folders); it uses the same target rules (`store.writer.STORE`'s checks), folder check
(`check_folder`, for a folder that exists), stale-temporary removal and free-space check.
"""

from __future__ import annotations

import contextlib
import errno
import functools
import hashlib
import os
import re
import secrets
import shutil
import socket
from collections.abc import Iterator
from pathlib import Path

from .errors import EngramError, OutputExistsError, ResourceError, UsageError
from .helpers import human_bytes

TMP_PREFIX = ".engram-tmp-"  # every temporary file or folder engram writes beside a target starts so

_TMP_OWNER = re.compile(r"\.([0-9a-f]{8})-([0-9]+)-[0-9a-f]{8}$")

_FULL = {errno.ENOSPC, errno.EDQUOT, errno.EFBIG}


class OutputKind:
    """What an output is, for deciding what may stand at its path and be replaced.

    The defaults suit an output that replaces whatever plain thing is there with --overwrite;
    a kind narrows that by overriding `check_replaceable` (and `check_new` for a path with
    nothing there), and gives a lock where two writers could race.
    """

    def exists(self, path: Path) -> bool:
        """Whether something stands at `path` that writing it would replace."""
        return path.exists() or path.is_symlink()

    def check_target(self, path: Path, overwrite: bool) -> None:
        """Refuse, before any work, a target that may not be written (the `--overwrite` rules)."""
        if not self.exists(path):
            self.check_new(path)
            return
        if not overwrite:
            raise self.exists_error(path)
        self.check_replaceable(path)

    def exists_error(self, path: Path) -> EngramError:
        """The error for an existing target without `overwrite`."""
        return OutputExistsError(f"{path} already exists; pass --overwrite to replace it")

    def check_new(self, path: Path) -> None:
        """Refuse a path with nothing there (by default, every such path may be written)."""

    def check_replaceable(self, path: Path) -> None:
        """Refuse to replace what stands at `path` when it is not an output of this kind."""

    def shown_folder(self, path: Path) -> Path:
        """The folder the output goes in, as errors name it."""
        return path.absolute().parent

    def lock(self, path: Path, replacing: bool) -> contextlib.AbstractContextManager[None]:
        """Held while the output is written and swapped in (by default, no lock)."""
        return contextlib.nullcontext()


class FileKind(OutputKind):
    """A single file (a projection, a hash file): a folder at its path is never replaced."""

    def check_target(self, path: Path, overwrite: bool) -> None:
        if path.is_dir():
            raise EngramError(f"output {path} is a directory; give a file path")
        if path.exists() and not overwrite:
            raise OutputExistsError(f"output {path} exists; pass --overwrite to replace it")

    def shown_folder(self, path: Path) -> Path:
        return path.parent


class PlotKind(FileKind):
    """A picture `engram inspect --plot` draws: always replaced, refused only where no file can go."""

    def check_target(self, path: Path, overwrite: bool) -> None:
        if path.is_dir() or not path.parent.is_dir():
            raise UsageError(f"cannot write the plot to {path}: give a file in an existing folder")


FILE = FileKind()
PLOT = PlotKind()


class Output:
    """A file or folder to write at `path`, checked now (before any work) by `kind`'s rules.

    Args:
        path: the target.
        kind: what it is, and so what may be replaced there.
        overwrite: whether an existing output of that kind may be replaced.
    """

    def __init__(self, path: str | Path, kind: OutputKind = FILE, *, overwrite: bool = False) -> None:
        self.path = Path(path)
        self.kind = kind
        self.overwrite = overwrite
        self.check()

    def check(self) -> None:
        """The target's rules, then its folder: it exists and may be written."""
        self.kind.check_target(self.path, self.overwrite)
        check_folder(self.path.absolute().parent, self.kind.shown_folder(self.path))

    @contextlib.contextmanager
    def writing(
        self, needed: int = 0, *, folder: bool = False, entry: str | None = None, os_errors: bool = True
    ) -> Iterator[Path]:
        """Yield the temporary path to write, and swap it into place when the block ends.

        Args:
            needed: bytes the writer will write, refused up front when the disk cannot hold them
                (small files pass 0: a full disk is then reported by the write itself).
            folder: make the temporary path a folder (an export, a store) rather than leave it to
                the writer to create a file there.
            entry: the output is this entry of the temporary folder (a writer of folders asked
                for one file), not the folder itself.
            os_errors: turn an OSError of the writer into a one-line error naming the target (a
                writer that also reads files, whose errors name those, passes False).
        """
        parent = self.path.absolute().parent
        remove_stale_temporaries(parent)
        check_free_space(parent, needed)
        tmp = temporary_name(parent / self.path.name)
        replacing = self.kind.exists(self.path)
        try:
            if folder or entry is not None:
                try:
                    tmp.mkdir()
                except OSError as exc:
                    raise write_error(parent, exc) from None
            with self.kind.lock(self.path, replacing):
                try:
                    yield tmp
                except OSError as exc:
                    if not os_errors:
                        raise
                    raise write_error(self.path, exc) from None
                if replacing:
                    self.kind.check_replaceable(self.path)  # still what may be replaced, now that it is about to go
                try:
                    swap_into_place(tmp if entry is None else tmp / entry, self.path)
                except OSError as exc:
                    raise write_error(self.path, exc) from None
        finally:
            remove_tree(tmp)


def check_folder(folder: Path, shown: Path | None = None) -> None:
    """Refuse an output folder that does not exist or may not be written (`shown`: as errors name it)."""
    shown = folder if shown is None else shown
    if not folder.is_dir():
        raise EngramError(f"output folder {shown} does not exist")
    if not os.access(folder, os.W_OK):
        raise EngramError(f"output folder {shown} is not writable")


def write_file(path: str | Path, data: bytes, kind: OutputKind = FILE, *, overwrite: bool = True) -> None:
    """Write `data` as the file `path` through `Output` (by default replacing a file there)."""
    with Output(path, kind, overwrite=overwrite).writing() as tmp:
        tmp.write_bytes(data)


def remove_tree(path: Path) -> None:
    """Delete a file or folder if it exists (a temporary output left by a failed writer)."""
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


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


def write_error(path: str | Path, exc: OSError) -> EngramError:
    """The one-line error of a failed write: a ResourceError when the disk (or a quota, or a
    file size limit) is full, an EngramError naming the reason otherwise."""
    cls = ResourceError if exc.errno in _FULL else EngramError
    return cls(f"cannot write {path}: {exc.strerror or exc}")


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


def swap_into_place(tmp: Path, target: Path) -> None:
    """Move a finished file or folder onto `target`, replacing what is there only now that the
    new one is whole: a file by one rename; a folder (or a file in a folder's place) by first
    renaming the old one aside, then deleting it. OSErrors are the caller's to report."""
    if not (target.exists() or target.is_symlink()) or (tmp.is_file() and target.is_file()):
        os.replace(tmp, target)
        return
    old = temporary_name(target)
    os.replace(target, old)
    try:
        os.replace(tmp, target)
    except OSError:
        os.replace(old, target)
        raise
    remove_tree(old)  # what stays is stale once we exit, and removed then
