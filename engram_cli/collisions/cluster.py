"""Counting on a Dask cluster: map tasks count corpus parts into sorted runs, reduce tasks
merge every order's runs by key range.

A map task counts one part of the corpus as a local run does (its own memory budget, its
buffers sorted into runs) and leaves every run in the shared spill folder. A reduce task merges,
for one order and one range of word 0 of the keys, the pieces of every map's runs that fall in
the range (in merge rounds of at most `fan_in` runs when there are more), and writes the merged
distinct keys of the range as one run. The ranges cut the key space evenly, so the reduce tasks
hold about equal shares, and the runs they write, in range order, are the order's distinct keys
in key order: the statistics then stream through them as through a local run's. Keys move
between workers through the spill folder (which every worker must see), never through the client.
"""

from __future__ import annotations

import math
import socket
from pathlib import Path

from ..corpus.base import CorpusOptions, CorpusPart, CorpusSummary
from ..corpus.reader import Corpus
from ..helpers import cpu_count
from ..vocab import VocabProjection
from .budget import check_available
from .counting import KeyCountStore
from .keys import WindowKeys
from .options import CountOptions
from .runs import WHOLE, KeyRange, OrderKeys, Run, RunWriter, merge_pieces, merge_rounds
from .spill import SpillFolder, worker_pool

# Reduce tasks per order and worker thread: a few, so the last tasks do not leave workers idle.
REDUCE_TASKS_PER_THREAD = 2


def count_part_task(
    part: CorpusPart,
    window: WindowKeys,
    projection: VocabProjection,
    options: CorpusOptions,
    budget: int,
    folder: str,
) -> tuple[CorpusSummary, dict[int, list[Run]], int]:
    """Map: one corpus part to sorted runs of key counts per order, in `folder`.

    Args:
        part: the files, or the span of one file, to read.
        window: the spec's `WindowKeys` (projection, pad, orders, barriers).
        projection: the projection whose tokenizer reads text.
        options: how to read the corpus.
        budget: bytes of memory this task counts in.
        folder: this task's folder inside the run's spill folder (a retried task starts it afresh).

    Returns what was read, the runs of every order, and the bytes written.
    """

    check_available(budget, f" on worker host {socket.gethostname()}")
    corpus = Corpus([part.sources[0].display], projection, options, context=window.max_order - 1, part=part)
    spill = SpillFolder.task(Path(folder))
    with worker_pool(cpu_count()) as pool:
        store = KeyCountStore(window, budget, spill, pool)
        for batch in corpus.batches():
            store.add(batch)
        store.finish()
        store.spill_in_memory()
    for runs in store.runs.values():
        for run in runs:
            run.keep = True
    return corpus.summary, store.runs, spill.written


def merge_range_task(runs: list[Run], key_range: KeyRange, budget: int, folder: str, fan_in: int) -> tuple[Run, int]:
    """Reduce: the keys of `runs` in `key_range` merged into one run in `folder`, smaller ranges
    one after the other within `budget` bytes (in rounds of at most `fan_in` runs first when there
    are more). Returns the merged run and the bytes written.

    Args:
        runs: every map task's runs of one order.
        key_range: the range of word 0 of the keys this task merges.
        budget: bytes of memory this task merges in.
        folder: this task's folder inside the run's spill folder.
        fan_in: the most runs merged at once.
    """

    spill = SpillFolder.task(Path(folder))
    threads = cpu_count()
    words = runs[0].words
    piece_rows = max(1, budget // ((threads + 2) * 2 * 8 * (words + 1)))
    with worker_pool(threads) as pool:
        merged = merge_rounds(runs, spill, piece_rows, pool, threads + 1, fan_in, key_range=key_range)
        writer = RunWriter(spill, words, "merged")
        for part in merge_pieces(merged, piece_rows, pool, threads + 1, key_range):
            writer.add(part)
        for run in merged:
            run.remove()
    run = writer.close()
    run.keep = True
    return run, spill.written


def key_ranges(tasks: int) -> list[KeyRange]:
    """`tasks` equal ranges of word 0 of the stored keys, in order."""
    low, high = WHOLE
    edges = [low + (i * (high - low)) // tasks for i in range(tasks + 1)]
    return list(zip(edges[:-1], edges[1:]))


def count_on_cluster(
    corpus: Corpus,
    projection: VocabProjection,
    window: WindowKeys,
    budget: int,
    folder: SpillFolder,
    counting: CountOptions,
) -> dict[int, OrderKeys]:
    """Map the corpus parts and merge every order by key range as Dask tasks.

    Args:
        corpus: the inputs, split into parts here.
        projection: the spec's projection.
        window: the spec's `WindowKeys`.
        budget: bytes of memory for each worker (a worker running several tasks at once gives
            each its share).
        folder: the run's spill folder, which every worker must see; the merged runs stay there.
        counting: its `client` runs the tasks; `progress` gets a task for the map tasks and one for
            the reduce tasks, `on_batch` is called after each map task (with None); `part_ids` is
            the smallest span of a pre-tokenized file one task reads, `fan_in` the most runs one
            reduce task merges at once.

    Returns the merged runs of every order, by key range in key order.
    """
    from ..cluster import run_tasks
    from ..corpus.base import ID_BATCH_TOKENS
    from ..corpus.parts import split_corpus

    client, progress, on_batch, part_ids, fan_in = (
        counting.client,
        counting.progress,
        counting.on_batch,
        counting.part_ids,
        counting.fan_in,
    )
    assert client is not None
    threads = client.nthreads()
    workers = max(1, sum(threads.values()))
    per_task = max(1, budget // max(1, max(threads.values(), default=1)))
    parts = split_corpus(corpus, parts=4 * workers, min_ids=part_ids or ID_BATCH_TOKENS)
    [window_f, projection_f] = client.scatter([window, projection], broadcast=True)
    mapping = progress.task("counting n-grams (corpus parts)", len(parts))

    def mapped(_: str, result: tuple[CorpusSummary, dict[int, list[Run]], int]) -> None:
        """Fold in what a map task read and wrote, and report it."""
        corpus.add_summary(result[0])
        folder.written += result[2]
        corpus.bytes_done = min(corpus.total_bytes, corpus.bytes_done + corpus.total_bytes // len(parts))
        mapping.advance()
        if on_batch:
            on_batch(None)

    maps = run_tasks(
        client,
        count_part_task,
        [
            (
                f"count-{p.name}",
                (p, window_f, projection_f, corpus.options, per_task, str(folder.path / f"map-{i:05d}")),
            )
            for i, p in enumerate(parts)
        ],
        on_done=mapped,
    )
    runs = {n: [run for _, by_order, _ in maps for run in by_order[n] if run.rows] for n in window.orders}
    ranges = key_ranges(max(1, math.ceil(REDUCE_TASKS_PER_THREAD * workers)))
    jobs = [(n, i, r) for n in window.orders for i, r in enumerate(ranges) if runs[n]]
    merging = progress.task("merging n-gram counts (key ranges)", len(jobs))
    merged = run_tasks(
        client,
        merge_range_task,
        [
            (
                f"merge-order{n}-range{i}",
                (runs[n], r, per_task, str(folder.path / f"merged-order{n}-{i:04d}"), fan_in),
            )
            for n, i, r in jobs
        ],
        on_done=lambda *_: merging.advance(),
    )
    for n in window.orders:
        for run in runs[n]:
            run.keep = False
            run.remove()
    found: dict[int, list[Run]] = {n: [] for n in window.orders}
    for (n, _, _), (run, written) in zip(jobs, merged):
        folder.written += written
        run.keep = False
        if run.rows:
            found[n].append(run)
    return {n: OrderKeys(window.layout(n), found[n], True) for n in window.orders}
