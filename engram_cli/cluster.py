"""Scale-out on Dask distributed: running a command's tasks on the cluster of a client.

The commands stay the same; only where their per-shard or per-partition tasks run changes (the
CLI's `--scheduler` and `--dask-workers` make the client, `cli.cluster`). Tasks are plain
functions of picklable arguments, so a worker needs the package and the store's filesystem (or
object-store URL), and nothing passes through the client but results. Dask retries a failing task
and reschedules the tasks of a worker that died; a task that still fails ends the command with
one line naming it.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from .errors import EngramError

TASK_RETRIES = 2


def absolute_store_path(path: str | Path) -> str:
    """What a worker on another machine can open: an absolute folder path, or the URL as is."""
    path = str(path)
    return path if "://" in path else os.path.abspath(path)


def run_tasks(
    client: Any,
    fn: Callable[..., Any],
    tasks: Sequence[tuple[str, tuple]],
    on_done: Callable[[str, Any], None] | None = None,
) -> list[Any]:
    """Run `fn(*args)` for every (name, args) on the cluster; results in the order given.

    Dask retries a failing task and reschedules the tasks of a worker that died; a task that
    still fails ends the command with one line naming it. `on_done` feeds the progress bar.

    Args:
        client: the Dask client.
        fn: the task function.
        tasks: (name, args) of every task; the name appears in the task key and in errors.
        on_done: called with (name, result) as each task finishes.
    """
    from distributed import as_completed

    run_id = uuid.uuid4().hex[:8]
    futures = {
        client.submit(fn, *args, key=f"engram-{name}-{run_id}", pure=False, retries=TASK_RETRIES): name
        for name, args in tasks
    }
    results: dict[str, Any] = {}
    try:
        for future in as_completed(futures):
            name = futures[future]
            try:
                result = future.result()
            except EngramError:
                raise
            except Exception as exc:  # a worker's exception or a KilledWorker, reported as one line
                detail = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
                raise EngramError(
                    f"Dask task {name} failed: {type(exc).__name__}{': ' + detail if detail else ''}"
                ) from None
            results[name] = result
            if on_done is not None:
                on_done(name, result)
    finally:
        for future in futures:
            future.cancel()
    return [results[name] for name, _ in tasks]
