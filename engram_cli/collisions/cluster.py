"""Collision counting as Dask map/reduce: the key counts move between workers only through a folder.

Map: each task reads one corpus part (`corpus.parts`) and saves its key counts one file per
(order, partition) under the shared spill folder (a retried task starts its folder afresh).
Reduce: each task merges a group of partitions of one order over every map output into
`merged/`, holding only those partitions in memory. The partition count (at most 2**8) is chosen
so that every worker has partitions to merge and one partition fits a worker's share of the
memory budget. Only corpus summaries and counts pass through the client, and the merged folder
reads like a local run's spilled counts, so the statistics that follow are the same numbers.
"""

from __future__ import annotations

import math
import shutil
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from ..corpus.base import CorpusOptions, CorpusPart, CorpusSummary
from ..corpus.reader import Corpus
from ..helpers import cpu_count
from ..vocab import VocabProjection
from .keys import PARTITION_BITS, WindowKeys, merge_partition
from .spill import KeyCountStore, append_file, as_rows, count_corpus, partition_file, read_counts, spill_folder


def count_part_task(
    part: CorpusPart,
    window: WindowKeys,
    projection: VocabProjection,
    options: CorpusOptions,
    budget: int,
    root: str,
    name: str,
    bits: int,
) -> CorpusSummary:
    """Map: one corpus part to its key counts, saved one file per (order, partition) under
    `root/name`; what was read comes back. A retried task starts its folder afresh.

    Args:
        part: the files, or the id range of one file, to read.
        window: the window keys (projection, pad, orders, barriers) of the hasher counted.
        projection: the projection the corpus is tokenized and read with.
        options: how to read the corpus.
        budget: bytes of counts this task holds in memory before spilling.
        root: the folder every worker sees.
        name: this map output's folder under `root`.
        bits: partitions are the top `bits` bits of the stored keys.
    """
    corpus = Corpus([part.sources[0].display], projection, options, context=window.max_order - 1, part=part)
    final, scratch = Path(root) / name, Path(root) / f"{name}.partial"
    shutil.rmtree(scratch, ignore_errors=True)
    with (
        ThreadPoolExecutor(max_workers=cpu_count()) as pool,
        KeyCountStore(window, budget, root, partition_bits=bits) as store,
    ):
        count_corpus(corpus.batches(), window, store, pool)
        store.save_partitions(scratch)
    shutil.rmtree(final, ignore_errors=True)
    scratch.rename(final)
    return corpus.summary


def merge_partition_task(root: str, maps: list[str], order: int, indices: list[int], words: int) -> tuple[int, int]:
    """Reduce: merge partitions `indices` of one order over every map output into
    `root/merged`; returns (distinct keys, occurrences). Only these partitions are in memory.

    Args:
        root: the folder every worker sees.
        maps: the map outputs' folder names under `root`.
        order: the n-gram order.
        indices: the partitions this task merges.
        words: uint64 words of one stored key of that order.
    """
    distinct = occurrences = 0
    target = Path(root) / "merged"
    for index in indices:
        name = partition_file(order, index)
        chunks = [read_counts(Path(root) / m / name, words) for m in maps if (Path(root) / m / name).exists()]
        if not chunks:
            continue
        merged = merge_partition(chunks)
        tmp = target / f"{name}.partial"
        tmp.unlink(missing_ok=True)
        append_file(tmp, as_rows(merged))
        tmp.replace(target / name)
        distinct += merged.rows
        occurrences += int(merged.counts.sum())
    return distinct, occurrences


def count_on_cluster(
    client: Any,
    corpus: Corpus,
    projection: VocabProjection,
    window: WindowKeys,
    budget: int,
    spill_dir: str | Path | None,
    on_part: Callable[[], None] | None = None,
    part_ids: int | None = None,
) -> KeyCountStore:
    """Map the corpus parts and merge the partitions as Dask tasks; the key counts move only
    between workers through `spill_dir` (a folder every worker sees), never through the client.

    Args:
        client: the Dask client.
        corpus: the inputs, split into parts here.
        projection: the projection the corpus is read with.
        window: the `WindowKeys` of the hasher whose windows are counted (barriers included).
        budget: bytes of counts for all workers together (each gets its share).
        spill_dir: the shared folder.
        on_part: called after each map task, for progress.
        part_ids: the smallest id range of a pre-tokenized file one task reads.
    """
    from ..cluster import run_tasks
    from ..corpus.base import ID_BATCH_TOKENS
    from ..corpus.parts import split_corpus

    workers = max(1, sum(client.nthreads().values()))
    parts = split_corpus(corpus, parts=4 * workers, min_ids=part_ids or ID_BATCH_TOKENS)
    root = spill_folder("engram-cluster-counts-", spill_dir)
    (root / "merged").mkdir()
    names = [f"map-{i:05d}" for i in range(len(parts))]
    per_worker = max(64 << 20, budget // workers)
    # Enough partitions to keep every worker busy merging, and for one to fit a worker's budget
    # (keys take about 8 bytes per token and order; tokens are about a quarter of the input bytes).
    key_bytes = 2 * corpus.total_bytes * len(window.orders)
    bits = min(PARTITION_BITS, max(1, math.ceil(math.log2(max(4 * workers, key_bytes / per_worker)))))
    group = max(1, (1 << bits) // workers)
    [window_f, projection_f] = client.scatter([window, projection], broadcast=True)

    def mapped(_: str, summary: CorpusSummary) -> None:
        corpus.add_summary(summary)
        corpus.bytes_done = min(corpus.total_bytes, corpus.bytes_done + corpus.total_bytes // len(parts))
        if on_part:
            on_part()

    run_tasks(
        client,
        count_part_task,
        [
            (f"count-{p.name}", (p, window_f, projection_f, corpus.options, per_worker, str(root), n, bits))
            for p, n in zip(parts, names)
        ],
        on_done=mapped,
    )
    groups = [list(range(a, min(a + group, 1 << bits))) for a in range(0, 1 << bits, group)]
    jobs = [(order, g) for order in window.orders for g in groups]
    results = run_tasks(
        client,
        merge_partition_task,
        [
            (f"merge-order{order}-parts{g[0]}-{g[-1]}", (str(root), names, order, g, window.layout(order).words))
            for order, g in jobs
        ],
    )
    distinct = {n: 0 for n in window.orders}
    occurrences = {n: 0 for n in window.orders}
    for (order, _), (rows, total) in zip(jobs, results):
        distinct[order] += rows
        occurrences[order] += total
    for name in names:
        shutil.rmtree(root / name, ignore_errors=True)
    store = KeyCountStore.merged_in(window, budget, root / "merged", bits, distinct, occurrences)
    store.cleanup = root
    return store
