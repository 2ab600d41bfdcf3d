"""The Dask client of a command: `--scheduler URL` connects to a cluster, `--dask-workers N` starts one."""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING

from ..errors import EngramError, UsageError

if TYPE_CHECKING:
    from distributed import Client


@contextmanager
def dask_client(
    scheduler: str | None = None, workers: int | None = None, connect_timeout: str = "15s"
) -> Iterator[Client | None]:
    """A `distributed.Client` for `--scheduler URL` or `--dask-workers N`; None for neither.

    Args:
        scheduler: the scheduler address of an existing cluster (`--scheduler`).
        workers: start a local cluster of this many single-threaded worker processes.
        connect_timeout: how long to wait for the scheduler before a one-line error.
    """
    if scheduler and workers:
        raise UsageError("give either --scheduler or --dask-workers, not both")
    if not scheduler and not workers:
        yield None
        return
    try:
        from distributed import Client, LocalCluster
    except ImportError:
        raise EngramError("scale-out needs Dask: pip install 'dask[distributed]'") from None
    if scheduler:
        try:
            client = Client(scheduler, timeout=connect_timeout)
        except (OSError, TimeoutError, ValueError) as exc:  # ValueError: not a HOST:PORT address
            raise EngramError(f"cannot reach the Dask scheduler at {scheduler}: {exc}") from None
        with client:
            yield client
        return
    if workers is None or workers < 1:
        raise UsageError(f"--dask-workers must be at least 1, got {workers}")
    # a failed task is reported in one line by engram; the workers' own error logs would repeat it as a traceback
    with (
        LocalCluster(
            n_workers=workers,
            threads_per_worker=1,
            processes=True,
            dashboard_address=None,
            silence_logs=logging.CRITICAL,
        ) as cluster,
        Client(cluster) as client,
    ):
        yield client
