"""Progress as long jobs report it: named tasks that advance. Whoever calls the job draws it.

The library never draws anything: a job takes a `Progress` and starts one task per pass (rows
written, bytes read, partitions merged, ...). The CLI passes one that draws rich bars on stderr;
library callers pass their own or leave the silent default. A pass ends with its task at its
total (`update(total)`), also when it stopped early (`--max-tokens`), so no bar stays short of
100 % while the next pass runs.

A pass that counts bytes starts its task with `byte_task`: a `Progress` that can show units (the
CLI's: `4.1 MB`) has a method `byte_task(description, total)` of its own; any other gets a plain
`task`, so a `Progress` written before byte tasks existed still works.
"""

from __future__ import annotations

from typing import Protocol


class ProgressTask(Protocol):
    """One pass of a job: `advance` by done units, or `update` to an absolute count."""

    def advance(self, amount: float = 1, *, note: str | None = None) -> None:
        """Count `amount` more units done; `note` replaces the free text shown beside the bar."""

    def update(self, completed: float, *, note: str | None = None) -> None:
        """Set the units done to `completed`; `note` as for `advance`."""


class Progress(Protocol):
    """Starts the tasks of a job; `total` is None when the size of a pass is not known."""

    def task(self, description: str, total: float | None = None) -> ProgressTask:
        """Start a task of `total` units (None: unknown) and return it."""


class _SilentTask:
    def advance(self, amount: float = 1, *, note: str | None = None) -> None:
        pass

    def update(self, completed: float, *, note: str | None = None) -> None:
        pass


class Silent:
    """Progress that goes nowhere: the default of every job."""

    def task(self, description: str, total: float | None = None) -> ProgressTask:
        """A task that ignores what it is told."""
        return _SilentTask()


SILENT = Silent()


def byte_task(progress: Progress, description: str, total: float | None = None) -> ProgressTask:
    """Start a task whose units are bytes: `progress.byte_task` where it has one, else `task`."""
    start = getattr(progress, "byte_task", None)
    return start(description, total) if start is not None else progress.task(description, total)
