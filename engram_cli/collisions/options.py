"""How a corpus is counted: memory, spill folder, merge fan-in, a cluster, progress.

None of these change the numbers (`statistics` gives the same figures for any of them); they say
where and in what memory the work runs. One frozen value carries them from `inspect` through
`collision_statistics` to the counting and the cluster tasks, so a new way to run the count is one
field here rather than one more parameter on every function between.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING

from ..errors import UsageError
from ..progress import SILENT, Progress

if TYPE_CHECKING:
    from concurrent.futures import ThreadPoolExecutor

    from distributed import Client

    from ..corpus.base import DocBatch
    from .growth import GrowthRecorder
    from .runs import OrderKeys

# Runs merged at once; more are first merged in groups of this many (merge rounds).
FAN_IN = 64


@dataclass(frozen=True, kw_only=True)
class CountOptions:
    """How `collision_statistics` counts a corpus (the same numbers whatever they are).

    Attributes:
        memory_budget: bytes of memory for n-gram counts, bucket counters and collision
            candidates; the rest goes to a folder in `spill_dir`, removed at the end (default: a
            quarter of what is available, at least `minimum_memory_budget`; less is refused).
        spill_dir: where that folder goes; on a cluster, a folder every worker sees.
        client: a Dask client (with a `Corpus`): counting is then mapped over corpus parts and
            merged by key range on the cluster, each task within `memory_budget`.
        part_ids: on a cluster, the smallest range of a pre-tokenized file one task reads
            (default: sized to the corpus).
        fan_in: the most runs merged at once (more take merge rounds first).
        progress: gets a task per pass (counting, merge rounds, ranges merged, loads, collisions).
        on_batch: called after each batch (or cluster map task, with None), for progress.
        on_statistic: called after each (layer, order, size) is done.
        on_keys: called with each order's distinct n-grams (merged) once its statistics are done,
            the bytes of the budget free then, and the worker threads (row traffic counts them).
        growth: records how the distinct n-grams grow with the tokens read (local counting only;
            the same numbers at any memory budget).
    """

    memory_budget: int | None = None
    spill_dir: str | Path | None = None
    client: Client | None = None
    part_ids: int | None = None
    fan_in: int = FAN_IN
    progress: Progress = SILENT
    on_batch: Callable[[DocBatch | None], None] | None = None
    on_statistic: Callable[[], None] | None = None
    on_keys: Callable[[OrderKeys, int, ThreadPoolExecutor], None] | None = None
    growth: GrowthRecorder | None = None


def count_options(given: CountOptions | None, **fields: object) -> CountOptions:
    """`given`, or the options the keywords of a public function name (those it still takes one
    by one, as documented before `CountOptions`); an error when a call gives both."""
    defaults = CountOptions()
    named = {name: value for name, value in fields.items() if value != getattr(defaults, name)}
    if given is None:
        return replace(defaults, **named)  # type: ignore[arg-type]  # the fields, typed by the caller
    if named:
        raise UsageError(f"give the counting options as `counting=` or as keywords, not both ({', '.join(named)})")
    return given
