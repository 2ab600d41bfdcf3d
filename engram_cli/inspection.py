"""The `engram inspect` job: table health of a store and exact collision statistics on a corpus.

The numbers come from `store.health` (value statistics, checksums) and `collisions` (distinct
n-grams per order, per-head collisions, size sweeps); this module runs them in order over one
corpus reader and gathers one `InspectReport`, whose JSON is the command's `--json` output.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .collisions.budget import check_counter_memory, minimum_memory_budget, out_of_memory
from .collisions.growth import GrowthPoint, GrowthRecorder
from .collisions.options import CountOptions, count_options
from .collisions.reports import LayerStats, SweepPoint, layers_json
from .collisions.statistics import collision_statistics
from .corpus.base import CorpusOptions, CorpusSummary
from .corpus.reader import Corpus
from .errors import UsageError
from .progress import SILENT, Progress
from .sizing import Sizing, SizingRequest
from .spec import TableSpec
from .store.health import TableHealth, table_health
from .store.tables import TableStore
from .traffic.statistics import LRU_MAX_BYTES, LRU_SHARE, TrafficCounter, TrafficOptions, TrafficReport
from .vocab import VocabProjection, projection_for

if TYPE_CHECKING:
    from distributed import Client


@dataclass
class InspectReport:
    """What `engram inspect` found: collision statistics, the size sweep, table health."""

    source: str
    spec: TableSpec
    projection: VocabProjection
    corpus: CorpusSummary | None = None
    layers: LayerStats | None = None
    sweep: list[SweepPoint] | None = None
    tables: TableHealth | None = None
    spilled_bytes: int = 0
    seconds: float = 0.0
    plot: str | None = None
    barrier_ids: list[int] = field(default_factory=list)
    traffic: TrafficReport | None = None
    growth: dict[int, list[GrowthPoint]] | None = None
    sizing: Sizing | None = None

    def to_json(self) -> dict[str, Any]:
        """The `engram inspect --json` output."""
        corpus = None
        if self.corpus is not None:
            corpus = {
                **self.corpus.to_json(),
                "spilled_bytes": self.spilled_bytes,
                "seconds": self.seconds,
                "warnings": self.corpus.warnings(),
            }
        out = {
            "source": self.source,
            "spec": self.spec.to_dict(),
            "projection": {
                "fingerprint": self.projection.fingerprint(),
                "vocab_size": self.projection.vocab_size,
                "compressed_size": self.projection.compressed_size,
                "tokenizer": self.projection.metadata.get("tokenizer_source"),
            },
            "corpus": corpus,
            "barrier_ids": self.barrier_ids,
            "layers": None if self.layers is None else layers_json(self.layers),
            "sweep": None if self.sweep is None else [p.to_json() for p in self.sweep],
            "tables": None if self.tables is None else self.tables.to_json(),
            "plot": self.plot,
            "growth": None
            if self.growth is None
            else {str(n): [p.to_json() for p in points] for n, points in self.growth.items()},
            "sizing": None if self.sizing is None else self.sizing.to_json(),
        }
        if self.traffic is not None:  # only asked for: the JSON of an inspect without --traffic is unchanged
            out["traffic"] = self.traffic.to_json()
        return out


def inspect(
    source: TableSpec | TableStore,
    *,
    projection: VocabProjection | None = None,
    corpus: Sequence[str | Path] | None = None,
    options: CorpusOptions | None = None,
    sweep: list[float] | None = None,
    top: int = 0,
    verify: bool = False,
    barrier_ids: list[int] | None = None,
    counting: CountOptions | None = None,
    memory_budget: int | None = None,
    spill_dir: str | Path | None = None,
    client: Client | None = None,
    progress: Progress = SILENT,
    part_ids: int | None = None,
    traffic: TrafficOptions | None = None,
    sizing: SizingRequest | None = None,
) -> InspectReport:
    """The whole `engram inspect` job: table health of a store, collision statistics on a corpus.

    Args:
        source: a spec (collisions only) or an opened table store (its health, and collisions of
            its spec and projection).
        projection: the spec's projection (default: the store's, or that of the spec's tokenizer).
        corpus: files, folders or URLs to count n-grams in; `options` says how to read them.
        sweep: also every head size scaled by each factor; top: list the K most crowded buckets.
        verify: with a store, read every shard and check every checksum.
        barrier_ids: tokens no n-gram spans, counted as the hasher hashes them (see `NgramHasher`).
        counting: how the corpus is counted (`CountOptions`), or its fields as the keywords that
            follow, not both: `memory_budget` bytes for n-gram counts, bucket counters and collision
            candidates, the rest spilling to a folder in `spill_dir`, removed at the end (default:
            a quarter of the memory available; below the smallest that works, an error before any
            work); a Dask `client` counts the corpus as map/reduce tasks, to the same numbers, with
            `part_ids` ids per corpus part (default: sized to the corpus).
        progress: receives one task per pass (table health; reading and counting the corpus, merge
            rounds, key ranges merged, bucket loads and collisions of every order).
        traffic: also the row traffic of the corpus (`TrafficOptions`): lookups per row, coverage,
            cache hit rates, the hot rows; counted in the same reading of the corpus, within the
            same memory budget (the LRU curves take a share of it; see `traffic.statistics`).
        sizing: extrapolate the growth of distinct n-grams (recorded whenever the corpus is counted
            locally) to a training run's tokens, and size the heads for a target or a budget.
    """
    counting = count_options(
        counting, memory_budget=memory_budget, spill_dir=spill_dir, client=client, progress=progress, part_ids=part_ids
    )
    store = source if isinstance(source, TableStore) else None
    spec = source.spec if isinstance(source, TableStore) else source
    if store is not None:
        if projection is not None and projection.fingerprint() != store.projection.fingerprint():
            raise UsageError(
                f"{projection.origin or 'the projection given'} does not match the one store {store.path} was "
                f"built with (fingerprints {projection.fingerprint()[:12]} and {store.projection.fingerprint()[:12]})"
            )
        projection = store.projection  # checked against the spec when the store was opened
    else:
        projection = projection_for(spec, projection)
    if verify and store is None:
        raise UsageError("verify needs a table store, not a spec")
    if store is None and not corpus:
        raise UsageError(
            "nothing to inspect: a spec has no tables, so give a corpus for collision statistics (or a table store)"
        )
    if (sweep or top or barrier_ids or sizing) and not corpus:
        raise UsageError("a sweep, the top buckets, barrier ids and sizing describe collisions: give a corpus")
    if sizing is not None and counting.client is not None:
        raise UsageError(
            "sizing needs the growth of distinct n-grams, recorded when counting locally, not on a cluster"
        )
    if sizing is not None:
        sizing.check()
    if traffic is not None and not corpus:
        raise UsageError("row traffic is the lookups of a corpus: give a corpus")
    counter = None
    growth = None
    if corpus and counting.client is None and counting.growth is None:
        growth = GrowthRecorder()
        counting = replace(counting, growth=growth)
    if corpus:
        budget = check_counter_memory(
            spec, sweep, counting.memory_budget, local=counting.client is None
        )  # before table health too
        if traffic is not None:
            lru_memory = min(LRU_MAX_BYTES, budget // LRU_SHARE, budget - minimum_memory_budget(spec, sweep))
            if counting.client is not None:  # the LRU curves run on the client: the workers keep their budget
                lru_memory = min(LRU_MAX_BYTES, budget // LRU_SHARE)
            counter = TrafficCounter(spec, projection, barrier_ids, traffic, lru_memory)
            counting = replace(
                counting,
                memory_budget=budget if counting.client is not None else budget - lru_memory,
                on_batch=counter.chain(counting.on_batch),
                on_keys=counter.on_keys,
            )
    report = InspectReport(
        source=str(store.path if store is not None else spec.name),
        spec=spec,
        projection=projection,
        barrier_ids=sorted(set(barrier_ids or [])),
    )
    if store is not None:
        rows = sum(store.layout(layer).rows for layer in store.layer_ids)
        report.tables = table_health(store, verify, counting.progress.task("table health", rows).advance)
    if corpus:
        started = time.perf_counter()
        reader = Corpus(list(corpus), projection, options, context=spec.max_ngram_size - 1)
        try:
            layers, points, spilled = collision_statistics(
                spec,
                projection,
                reader,
                factors=sweep,
                top=top,
                barrier_ids=barrier_ids,
                counting=counting,
            )
            if counter is not None and counting.client is not None:
                # map tasks see their parts in no useful order: the LRU reads the corpus in order here
                replay = Corpus(list(corpus), projection, options, context=spec.max_ngram_size - 1)
                for batch in replay.batches():
                    counter.on_batch(batch)
            if counter is not None:
                report.traffic = counter.report(reader.summary.tokens)
        except MemoryError:
            raise out_of_memory(budget, spec, sweep) from None
        except RuntimeError as exc:  # what a thread that cannot get its stack raises
            if "can't start new thread" not in str(exc):
                raise
            raise out_of_memory(budget, spec, sweep) from None
        finally:
            if counter is not None:
                counter.close()
        report.corpus, report.layers, report.sweep = reader.summary, layers, points
        report.spilled_bytes, report.seconds = spilled, time.perf_counter() - started
        if growth is not None:
            report.growth = {n: growth.points.get(n, []) for n in spec.orders}
            if sizing is not None:
                note = f"{', '.join(str(c) for c in corpus)} ({reader.summary.tokens:,} tokens)"
                report.sizing = sizing.size(spec, report.growth, projection.compressed_size, note)
    return report
