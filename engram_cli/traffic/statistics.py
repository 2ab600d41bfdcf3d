"""Row traffic of a spec on a corpus: lookups per row, coverage, and the hit rates of row caches.

Collected alongside collision statistics, in the same reading of the corpus (`TrafficCounter`):
every batch, as it is counted, gives its lookups in corpus order (`rows.batch_mixes`) to one LRU
curve per layer (`lru`), each layer on a thread of its own; every order's distinct n-grams, once their
collision statistics are done, give each row's lookups (`rows.count_order_rows`). On a Dask
cluster the counting runs in map tasks, which see their parts of the corpus in no useful order, so
the LRU curve reads the corpus once more on the client in corpus order (the only way its hit rates
equal a local run's); the row counts come from the cluster's merged n-grams as locally.

Coverage: the fewest rows that serve a fraction f of a layer's lookups are the most read ones, so
sorting row counts descending (the histogram of counts, exactly) and summing until f is reached
gives them. The static top-k cache holds the k most read rows, chosen with hindsight on the same
corpus: its hit rate, the top k counts over all lookups, is an upper bound for any pinned set of k
rows on this corpus. Cache sizes in bytes hold whole rows at the store dtype.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from ..checkpoints.fp8_format import BLOCK
from ..collisions.keys import WindowKeys
from ..collisions.runs import OrderKeys
from ..corpus.base import DocBatch
from ..dtypes import DTYPE_BYTES
from ..errors import UsageError
from ..hot_rows import HotRows, spec_fingerprint
from ..spec import TableSpec
from ..vocab import VocabProjection
from .lru import SAMPLE_MODULUS, LruCurve, sample_threshold
from .rows import LayerRows, RowMap, batch_mixes, count_order_rows

# The fractions of lookups the coverage curve reports.
COVERAGE_FRACTIONS = (0.5, 0.9, 0.99, 0.999)

# The default cache sizes.
DEFAULT_CACHE_SIZES = (1 << 30, 8 << 30, 64 << 30)

# Share of the memory budget the LRU curves take while the corpus is counted, and its cap.
LRU_SHARE = 8
LRU_MAX_BYTES = 16 << 20

# Batches whose lookups wait for the LRU thread at most (memory: their row arrays).
BATCHES_AHEAD = 2


@dataclass(frozen=True, kw_only=True)
class TrafficOptions:
    """What `inspect` measures of row traffic.

    Attributes:
        cache_sizes: cache sizes in bytes (each layer's cache holds whole rows at the store dtype).
        hot_rows: keep each layer's most read rows for a hotness file.
        hot_bytes: keep at most this many bytes of rows per layer (None: every row read).
        sample_rate: force the LRU's SHARDS sampling rate (None: from the memory budget, 1 when the
            rows fit); it is rounded to a multiple of 1 / 2**24.
    """

    cache_sizes: tuple[int, ...] = DEFAULT_CACHE_SIZES
    hot_rows: bool = False
    hot_bytes: int | None = None
    sample_rate: float | None = None

    def __post_init__(self) -> None:
        if not self.cache_sizes or any(size <= 0 for size in self.cache_sizes):
            raise UsageError(f"cache sizes must be positive byte counts, got {list(self.cache_sizes)}")
        if self.hot_bytes is not None and self.hot_bytes <= 0:
            raise UsageError(f"the hot bytes per layer must be positive, got {self.hot_bytes}")
        if self.sample_rate is not None and not 0 < self.sample_rate <= 1:
            raise UsageError(f"the sampling rate must be in (0, 1], got {self.sample_rate}")


def row_bytes(spec: TableSpec) -> dict[str, int]:
    """Bytes of one row at the store dtype, in bf16, and in the V4.1 fp8 layout (an E4M3 byte a
    value and an E8M0 scale byte per BLOCK values)."""
    dim = spec.dim
    return {spec.dtype: dim * DTYPE_BYTES[spec.dtype], "bfloat16": 2 * dim, "fp8": dim + -(-dim // BLOCK)}


@dataclass
class LayerTraffic:
    """One layer's traffic figures."""

    lookups: int
    rows_read: int
    coverage: list[dict[str, Any]]
    cache: list[dict[str, Any]]
    lru_sample_rate: float

    def to_json(self) -> dict[str, Any]:
        """`traffic.layers["<L>"]` of `engram inspect --json`."""
        return {
            "lookups": self.lookups,
            "rows_read": self.rows_read,
            "coverage": self.coverage,
            "cache": self.cache,
            "lru_sample_rate": self.lru_sample_rate,
        }


@dataclass
class TrafficReport:
    """Row traffic of every layer, and the hotness file's contents when asked for."""

    row_bytes: dict[str, int]
    layers: dict[int, LayerTraffic]
    hot: HotRows | None = None
    hot_rows_path: str | None = None
    plot: str | None = None
    curves: dict[int, list[tuple[int, float]]] = field(default_factory=dict)  # (bytes, fraction) to plot

    def to_json(self) -> dict[str, Any]:
        """`traffic` of `engram inspect --json`."""
        return {
            "row_bytes": self.row_bytes,
            "layers": {str(layer): stats.to_json() for layer, stats in self.layers.items()},
            "hot_rows": self.hot_rows_path,
            "plot": self.plot,
        }


def _descending(histogram: dict[int, int]) -> tuple[np.ndarray, np.ndarray]:
    """(counts, rows with that count), most read first."""
    counts = np.array(sorted(histogram, reverse=True), np.int64)
    return counts, np.array([histogram[int(c)] for c in counts], np.int64)


def rows_serving(histogram: dict[int, int], target: float) -> int:
    """The fewest rows whose lookups sum to at least `target` (the most read rows)."""
    counts, rows = _descending(histogram)
    served = np.cumsum(counts * rows)
    group = int(np.searchsorted(served, target, side="left"))
    if group >= counts.size:
        return int(rows.sum())
    before = int(served[group - 1]) if group else 0
    return int(rows[:group].sum()) + max(0, -(-(int(np.ceil(target)) - before) // int(counts[group])))


def top_lookups(histogram: dict[int, int], k: int) -> int:
    """Lookups served by the k most read rows."""
    counts, rows = _descending(histogram)
    taken = np.minimum(np.cumsum(rows), k)
    per_group = np.diff(np.concatenate([[0], taken]))
    return int((per_group * counts).sum())


class TrafficCounter:
    """Row traffic collected while collision statistics count a corpus.

    Args:
        spec, projection, barrier_ids: the tables, as the hasher hashes them.
        options: what to measure.
        lru_memory: bytes for the LRU curves of all layers (the sampling rate follows).
    """

    def __init__(
        self,
        spec: TableSpec,
        projection: VocabProjection,
        barrier_ids: list[int] | None,
        options: TrafficOptions,
        lru_memory: int,
    ) -> None:
        self.spec = spec
        self.projection = projection
        self.options = options
        self.window = WindowKeys.of(spec, projection, barrier_ids)
        self.rows = RowMap.of(spec, projection)
        self.sizes = row_bytes(spec)
        store_bytes = self.sizes[spec.dtype]
        self.keep = None if options.hot_bytes is None else options.hot_bytes // store_bytes
        if not options.hot_rows:
            self.keep = 0
        cache_rows = [size // store_bytes for size in options.cache_sizes]
        per_layer = lru_memory // max(1, len(spec.layer_ids))
        self.curves = {}
        for layer in spec.layer_ids:
            if options.sample_rate is not None:
                threshold = max(1, round(options.sample_rate * SAMPLE_MODULUS))
            else:
                threshold = sample_threshold(spec.rows(layer), per_layer)
            self.curves[layer] = LruCurve(cache_rows, spec.rows(layer), threshold)
        self._columns = {layer: self.rows.columns(layer) for layer in spec.layer_ids}
        self.layers = {layer: LayerRows(self.keep) for layer in spec.layer_ids}
        self.tokens = 0
        # a thread per layer: each layer's lookups stay in order, layers run side by side
        self._threads = {
            layer: ThreadPoolExecutor(max_workers=1, thread_name_prefix=f"engram-lru-{layer}")
            for layer in spec.layer_ids
        }
        self._pending: deque[list[Future[None]]] = deque()

    def _feed(self, batch: DocBatch, layer: int) -> None:
        for mixes in batch_mixes(batch, self.window, self.rows, layer):
            self.curves[layer].feed_mixes(mixes, *self._columns[layer])

    def on_batch(self, batch: DocBatch | None) -> None:
        """One batch counted (in corpus order): its lookups go to the LRU curves (a cluster's map
        tasks report None: their batches are replayed by `replay`)."""
        if batch is None:
            return
        self.tokens += batch.tokens
        self._pending.append([thread.submit(self._feed, batch, layer) for layer, thread in self._threads.items()])
        while len(self._pending) > BATCHES_AHEAD:
            for job in self._pending.popleft():
                job.result()

    def chain(self, other: Callable[[DocBatch | None], None] | None) -> Callable[[DocBatch | None], None]:
        """`on_batch` followed by another callback."""

        def both(batch: DocBatch | None) -> None:
            self.on_batch(batch)
            if other is not None:
                other(batch)

        return both

    def on_keys(self, keys: OrderKeys, memory: int, pool: ThreadPoolExecutor) -> None:
        """One order's distinct n-grams: their lookups added to every layer's rows."""
        count_order_rows(keys, self.rows, self.layers, memory, pool)

    def close(self) -> None:
        """Wait for the LRU threads and stop them."""
        try:
            while self._pending:
                for job in self._pending.popleft():
                    job.result()
        finally:
            for thread in self._threads.values():
                thread.shutdown(wait=True, cancel_futures=True)

    def report(self, corpus_tokens: int) -> TrafficReport:
        """The figures, once every batch and order is in."""
        self.close()
        store_dtype = self.spec.dtype
        layers: dict[int, LayerTraffic] = {}
        curves: dict[int, list[tuple[int, float]]] = {}
        for layer, counted in self.layers.items():
            histogram = dict(counted.histogram)
            lookups = counted.lookups
            coverage = []
            for fraction in COVERAGE_FRACTIONS:
                k = rows_serving(histogram, fraction * lookups) if lookups else 0
                coverage.append(
                    {"fraction": fraction, "rows": k, "bytes": {name: k * b for name, b in self.sizes.items()}}
                )
            curve = self.curves[layer]
            cache = [
                {
                    "bytes": size,
                    "lru_hit_rate": lru,
                    "static_hit_rate": top_lookups(histogram, rows) / lookups if lookups else 0.0,
                }
                for size, rows, lru in zip(self.options.cache_sizes, curve.cache_rows, curve.hit_rates())
            ]
            layers[layer] = LayerTraffic(lookups, counted.rows_read, coverage, cache, curve.rate)
            curves[layer] = _coverage_curve(histogram, lookups, self.sizes[store_dtype])
        hot = None
        if self.options.hot_rows:
            hottest = {layer: c.hottest() for layer, c in self.layers.items()}
            hot = HotRows(
                spec_name=self.spec.name,
                spec_fingerprint=spec_fingerprint(self.spec),
                projection_fingerprint=self.projection.fingerprint(),
                corpus_tokens=corpus_tokens,
                rows={layer: rows for layer, (rows, _) in hottest.items()},
                lookups={layer: lookups for layer, (_, lookups) in hottest.items()},
                total_lookups={layer: c.lookups for layer, c in self.layers.items()},
                row_bytes={layer: self.sizes[store_dtype] for layer in self.layers},
            )
        return TrafficReport(self.sizes, layers, hot=hot, curves=curves)


def _coverage_curve(histogram: dict[int, int], lookups: int, row_size: int) -> list[tuple[int, float]]:
    """(cache bytes, fraction of lookups served) at each step of the histogram, for the plot."""
    counts, rows = _descending(histogram)
    if not lookups or not counts.size:
        return []
    held = np.cumsum(rows) * row_size
    served = np.cumsum(counts * rows) / lookups
    return list(zip(held.tolist(), served.tolist()))
