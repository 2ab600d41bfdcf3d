"""Collision statistics of Engram tables on a corpus, size sweeps, and table health.

Everything is counted exactly on the distinct n-grams of the corpus. A window (the
projected ids x[t-n+1] .. x[t], the projected pad before a document's start, exactly
what the hasher hashes) is packed into a key of one or more uint64 words; a batch of
documents maps to the distinct keys of each order with their occurrence counts, and
these partial counts merge by key. Keys are stored through an invertible multiply,
so their top bits spread them evenly over partitions: when the counts outgrow the
memory budget they spill to disk one file per partition, and each partition merges
on its own, with bounded memory and the same exact result.

Per layer, order and head size, two passes over the distinct n-grams follow: the
first counts distinct n-grams per bucket, the second flags those in a bucket with
others. An n-gram that shares its bucket in every head with one same other n-gram is
one whose mix agrees with it modulo the lcm of the head sizes (Chinese remainder
theorem); only n-grams crowded in every head can be one, so grouping those candidates
by that residue, and by the mix itself, gives `all_heads_colliding` and `mix_colliding`
exactly.
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
from ..spec import TableSpec
from ..vocab import VocabProjection
from .keys import PARTITION_BITS, WindowKeys, merge_partition
from .spill import KeyCountStore, append_file, as_rows, count_corpus, partition_file, read_counts, spill_folder


def count_part_task(
    part: CorpusPart,
    spec: TableSpec,
    projection: VocabProjection,
    options: CorpusOptions,
    budget: int,
    root: str,
    name: str,
    bits: int,
) -> CorpusSummary:
    """Map: one corpus part to its key counts, saved one file per (order, partition) under
    `root/name`; what was read comes back. A retried task starts its folder afresh."""
    window = WindowKeys.of(spec, projection)
    corpus = Corpus([part.sources[0].path], projection, options, context=spec.max_ngram_size - 1, part=part)
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
    `root/merged`; returns (distinct keys, occurrences). Only these partitions are in memory."""
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
    spec: TableSpec,
    projection: VocabProjection,
    window: WindowKeys,
    budget: int,
    spill_dir: str | Path | None,
    on_part: Callable[[], None] | None = None,
    part_ids: int | None = None,
) -> KeyCountStore:
    """Map the corpus parts and merge the partitions as Dask tasks; the key counts move only
    between workers through `spill_dir` (a folder every worker sees), never through the client."""
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
    [spec_f, projection_f] = client.scatter([spec, projection], broadcast=True)

    def mapped(_: str, summary: CorpusSummary) -> None:
        corpus.add_summary(summary)
        corpus.bytes_done = min(corpus.total_bytes, corpus.bytes_done + corpus.total_bytes // len(parts))
        if on_part:
            on_part()

    run_tasks(
        client,
        count_part_task,
        [
            (f"count-{p.name}", (p, spec_f, projection_f, corpus.options, per_worker, str(root), n, bits))
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
