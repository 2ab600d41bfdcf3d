"""Per-head collision statistics of the distinct n-grams of a corpus, and size sweeps.

Everything is counted exactly on the distinct n-grams that `keys` and `spill` produce, with the
hasher's own mix computed back from each stored key and reduced by the same modulo (`kernels`).
Per layer, order and head size, two passes over the distinct n-grams follow: the first counts
distinct n-grams per bucket, the second flags those in a bucket with others (unweighted, and
weighted by occurrences). An n-gram that shares its bucket in every head with one same other
n-gram is one whose mix agrees with it modulo the lcm of the head sizes (Chinese remainder
theorem); only n-grams crowded in every head can be one, so grouping those candidates by that
residue, and by the mix itself, gives `all_heads_colliding` and `mix_colliding` exactly. The
candidates spill to disk by residue as the counts do, so equal residues meet in one partition;
when the lcm is at least 2**63 it exceeds every mix and the two counts are the same.

The ideal rate is what uniform hashing would give: 1 - (1 - 1/size)**(distinct - 1). A size sweep
scales every head size; a scaled spec keeps seed, layers and vocab, hence the multipliers, so
only the passes are redone.
"""

from __future__ import annotations

import math
import shutil
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numba
import numpy as np

from ..corpus.base import DocBatch
from ..corpus.reader import Corpus
from ..dtypes import DTYPE_BYTES
from ..errors import EngramError, ResourceError, UsageError
from ..helpers import available_memory, cpu_count, gibibytes, plural
from ..kernels import bucket
from ..spec import TableSpec
from ..vocab import VocabProjection
from .cluster import count_on_cluster
from .keys import KEY_MUL_U64, PARTITION_BITS, KeyCounts, KeyLayout, WindowKeys, mix_keys, unpack_windows
from .spill import KeyCountStore, append_file, count_corpus, default_memory_budget, spill_folder

if TYPE_CHECKING:
    from tokenizers import Tokenizer

# At most this many n-grams of a crowded bucket are listed by --top (in JSON; fewer on screen).
TOP_NGRAMS = 8
TOP_SHOWN = 4
MAX_MIX = 1 << 63


@numba.njit(nogil=True, cache=True)
def _add_loads(mix, size, loads):
    inverse = 1.0 / size
    for i in range(mix.size):
        loads[bucket(mix[i], np.float64(mix[i]), size, inverse)] += 1


@numba.njit(nogil=True, cache=True)
def _flag_collisions(mix, counts, sizes, crowded, byte_offsets, flags, colliding, weighted):
    """Per head, distinct n-grams in a crowded bucket and their occurrences; flags: crowded in all.

    `crowded` holds one bit per bucket (load > 1), so every head's buckets stay in cache.
    """
    inverses = 1.0 / sizes.astype(np.float64)
    for i in range(mix.size):
        every = True
        fmix = np.float64(mix[i])
        for h in range(sizes.size):
            b = bucket(mix[i], fmix, sizes[h], inverses[h])
            if (crowded[byte_offsets[h] + (b >> 3)] >> (b & 7)) & 1:
                colliding[h] += 1
                weighted[h] += counts[i]
            else:
                every = False
        flags[i] = every


@dataclass
class HeadStats:
    """Collisions in one head: buckets used, distinct n-grams sharing a bucket, and the load histogram."""

    size: int
    buckets_used: int
    colliding: int
    collision_rate: float
    expected_rate: float
    weighted_rate: float
    max_load: int
    load_histogram: dict[int, int]

    def to_json(self) -> dict[str, Any]:
        """One head's entry under `heads` in `engram inspect --json`."""
        return {
            "size": self.size,
            "buckets_used": self.buckets_used,
            "colliding": self.colliding,
            "collision_rate": self.collision_rate,
            "expected_rate": self.expected_rate,
            "weighted_rate": self.weighted_rate,
            "max_load": self.max_load,
            "load_histogram": {str(k): v for k, v in self.load_histogram.items()},
        }


@dataclass
class OrderStats:
    """Collisions of one order of one layer: every head, and the n-grams that collide in all of them."""

    order: int
    occurrences: int
    distinct: int
    mix_colliding: int
    all_heads_colliding: int
    heads: list[HeadStats]
    top_buckets: list[dict[str, Any]] | None = None

    def mean(self, name: str) -> float:
        """The mean of one `HeadStats` field over the heads."""
        return float(np.mean([getattr(h, name) for h in self.heads]))

    def to_json(self) -> dict[str, Any]:
        """One order's entry under `orders` in `engram inspect --json`."""
        data = {
            "occurrences": self.occurrences,
            "distinct": self.distinct,
            "mix_colliding": self.mix_colliding,
            "all_heads_colliding": self.all_heads_colliding,
            "all_heads_rate": self.all_heads_colliding / self.distinct if self.distinct else 0.0,
            "collision_rate": self.mean("collision_rate"),
            "expected_rate": self.mean("expected_rate"),
            "weighted_rate": self.mean("weighted_rate"),
            "heads": [h.to_json() for h in self.heads],
        }
        if self.top_buckets is not None:
            data["top_buckets"] = self.top_buckets
        return data


LayerStats = dict[int, dict[int, OrderStats]]  # layer id -> order -> statistics


def expected_rate(size: int, distinct: int) -> float:
    """Chance that an n-gram shares its bucket when `distinct` n-grams hash uniformly into `size`."""
    if distinct <= 1:
        return 0.0
    return float(-math.expm1((distinct - 1) * math.log1p(-1.0 / size))) if size > 1 else 1.0


def _slices(n: int, pieces: int) -> list[tuple[int, int]]:
    edges = np.linspace(0, n, max(1, pieces) + 1).astype(np.int64)
    return [(int(a), int(b)) for a, b in zip(edges[:-1], edges[1:]) if b > a]


class _CandidateGroups:
    """N-grams crowded in every head, grouped by their mix modulo the lcm of the head sizes.

    Kept in memory while they fit the budget, then spilled by that residue, so that equal
    residues (and equal mixes) always meet in one partition.
    """

    def __init__(self, modulus: int, budget: int, spill_root: str | Path | None, bits: int) -> None:
        self.modulus = modulus
        self.budget = budget
        self.bits = bits
        self._root = spill_root
        self._dir: Path | None = None
        self._held: list[np.ndarray] = []
        self._bytes = 0

    def residue(self, mix: np.ndarray) -> np.ndarray:
        return mix if self.modulus >= MAX_MIX else mix % np.int64(self.modulus)

    def add(self, mix: np.ndarray) -> None:
        if not mix.size:
            return
        self._held.append(mix)
        self._bytes += mix.nbytes
        if self._bytes > self.budget:
            self._spill()

    def _spill(self) -> None:
        if self._dir is None:
            self._dir = spill_folder("engram-candidates-", self._root)
        mix = np.concatenate(self._held)
        pid = ((self.residue(mix).view(np.uint64) * KEY_MUL_U64) >> np.uint64(64 - self.bits)).astype(np.uint16)
        order = np.argsort(pid, kind="stable")
        edges = np.concatenate([[0], np.cumsum(np.bincount(pid, minlength=1 << self.bits))])
        for index in np.flatnonzero(np.diff(edges)):
            append_file(self._dir / f"{int(index):04d}.i64", mix[order[edges[index] : edges[index + 1]]])
        self._held, self._bytes = [], 0

    def _groups(self) -> Iterator[np.ndarray]:
        if self._dir is None:
            if self._held:
                yield np.concatenate(self._held)
            return
        if self._held:
            self._spill()
        for path in sorted(self._dir.iterdir()):
            yield np.fromfile(path, dtype=np.int64)

    def close(self) -> None:
        if self._dir is not None:
            shutil.rmtree(self._dir, ignore_errors=True)

    def __enter__(self) -> _CandidateGroups:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def counts(self) -> tuple[int, int]:
        """(mix_colliding, all_heads_colliding): the same when the lcm exceeds every mix."""
        mix_colliding = all_heads = 0
        for mix in self._groups():
            by_mix = _shared(mix)
            mix_colliding += by_mix
            all_heads += _shared(self.residue(mix)) if self.modulus < MAX_MIX else by_mix
        return mix_colliding, all_heads


def _shared(values: np.ndarray) -> int:
    """How many of `values` equal another one."""
    if values.size < 2:
        return 0
    ordered = np.sort(values)
    same = ordered[1:] == ordered[:-1]
    shared = np.zeros(values.size, np.bool_)
    shared[1:] |= same
    shared[:-1] |= same
    return int(np.count_nonzero(shared))


@dataclass
class OrderInput:
    """The distinct n-grams of one order, with their mix for one layer, pass after pass."""

    store: KeyCountStore
    layout: KeyLayout
    multipliers: np.ndarray
    pool: ThreadPoolExecutor
    _cached: tuple[KeyCounts, np.ndarray] | None = field(default=None, init=False, repr=False)

    def mixes(self, part: KeyCounts) -> np.ndarray:
        """The hasher's mix of every key of a part, computed on all cores."""
        out = np.empty(part.rows, np.int64)
        keys = part.keys
        jobs = [
            self.pool.submit(
                mix_keys,
                keys[a:b],
                self.layout.order,
                self.layout.bits,
                self.layout.per_word,
                self.layout.mask,
                self.multipliers,
                out[a:b],
            )
            for a, b in _slices(part.rows, cpu_count())
        ]
        for job in jobs:
            job.result()
        return out

    def parts(self) -> Iterator[tuple[KeyCounts, np.ndarray]]:
        """Every part of the order's counts with its mixes (computed once when the counts are in memory)."""
        single = self.store.single(self.layout.order)
        if single is not None:
            if self._cached is None:
                self._cached = (single, self.mixes(single))
            yield self._cached
            return
        for part in self.store.parts(self.layout.order):
            yield part, self.mixes(part)


def order_statistics(
    data: OrderInput,
    sizes: list[int],
    budget: int,
    spill_dir: str | Path | None,
    top: int = 0,
    decoder: NgramDecoder | None = None,
) -> OrderStats:
    """Every statistic of one order of one layer at the given head sizes.

    Args:
        data: the order's distinct n-grams and their mixes for this layer.
        sizes: the head sizes of this order.
        budget: bytes of all-heads candidates held in memory before spilling.
        spill_dir: where candidates spill (the system's temporary folder when None).
        top: how many of the most crowded buckets to list, with their n-grams.
        decoder: turns the listed n-grams back into text (needed with `top`).
    """
    order = data.layout.order
    distinct, occurrences = data.store.distinct[order], data.store.occurrences[order]
    pool = data.pool
    sizes_arr = np.array(sizes, np.int64)
    offsets = np.concatenate([[0], np.cumsum(sizes_arr)[:-1]]).astype(np.int64)
    loads = np.zeros(int(sizes_arr.sum()), np.int32 if distinct < 2**31 else np.int64)
    for _, mix in data.parts():
        jobs = [
            pool.submit(_add_loads, mix, int(size), loads[off : off + size])
            for size, off in zip(sizes, offsets.tolist())
        ]
        for job in jobs:
            job.result()

    crowded = [
        np.packbits(np.greater(loads[off : off + size], 1), bitorder="little")
        for size, off in zip(sizes, offsets.tolist())
    ]
    byte_offsets = np.concatenate([[0], np.cumsum([c.size for c in crowded])[:-1]]).astype(np.int64)
    bitmap = np.concatenate(crowded)
    colliding = np.zeros(len(sizes), np.int64)
    weighted = np.zeros(len(sizes), np.int64)
    with _CandidateGroups(math.lcm(*sizes), budget, spill_dir, PARTITION_BITS) as groups:
        for part, mix in data.parts():
            flags = np.empty(mix.size, np.bool_)
            results = []
            for a, b in _slices(mix.size, cpu_count()):
                c, w = np.zeros(len(sizes), np.int64), np.zeros(len(sizes), np.int64)
                results.append(
                    (
                        pool.submit(
                            _flag_collisions,
                            mix[a:b],
                            part.counts[a:b],
                            sizes_arr,
                            bitmap,
                            byte_offsets,
                            flags[a:b],
                            c,
                            w,
                        ),
                        c,
                        w,
                    )
                )
            for job, c, w in results:
                job.result()
                colliding += c
                weighted += w
            groups.add(mix[flags])
        mix_colliding, all_heads = groups.counts()

    heads = []
    for h, (size, off) in enumerate(zip(sizes, offsets.tolist())):
        histogram = np.bincount(loads[off : off + size])
        heads.append(
            HeadStats(
                size=size,
                buckets_used=int(size - histogram[0]),
                colliding=int(colliding[h]),
                collision_rate=float(colliding[h] / distinct) if distinct else 0.0,
                expected_rate=expected_rate(size, distinct),
                weighted_rate=float(weighted[h] / occurrences) if occurrences else 0.0,
                max_load=int(histogram.size - 1),
                load_histogram={int(k): int(v) for k, v in enumerate(histogram) if v},
            )
        )
    stats = OrderStats(order, occurrences, distinct, mix_colliding, all_heads, heads)
    if top and decoder is not None:
        stats.top_buckets = _top_buckets(data, sizes, offsets, loads, top, decoder)
    return stats


def _top_buckets(
    data: OrderInput, sizes: list[int], offsets: np.ndarray, loads: np.ndarray, top: int, decoder: NgramDecoder
) -> list[dict[str, Any]]:
    """The `top` most crowded buckets over all heads of an order, with their n-grams decoded."""
    chosen: list[tuple[int, int, int]] = []  # (load, head, bucket)
    for h, (size, off) in enumerate(zip(sizes, offsets.tolist())):
        head_loads = loads[off : off + size]
        k = min(top, size)
        idx = np.argpartition(head_loads, size - k)[size - k :]
        chosen += [(int(head_loads[b]), h, int(b)) for b in idx if head_loads[b] > 1]
    chosen = sorted(chosen, key=lambda t: (-t[0], t[1], t[2]))[:top]
    members: dict[tuple[int, int], list[tuple[np.ndarray, np.ndarray]]] = {(h, b): [] for _, h, b in chosen}
    heads = sorted({h for _, h, _ in chosen})
    for part, mix in data.parts():
        for h in heads:
            wanted = np.array([b for _, hh, b in chosen if hh == h], np.int64)
            buckets = mix % np.int64(sizes[h])
            hit = np.flatnonzero(np.isin(buckets, wanted))
            for i in hit:
                members[(h, int(buckets[i]))].append((part.keys[i : i + 1], part.counts[i : i + 1]))
    result = []
    layout = data.layout
    for load, h, b in chosen:
        found = members[(h, b)]
        keys = np.concatenate([k for k, _ in found])
        counts = np.concatenate([c for _, c in found])
        order = np.argsort(-counts, kind="stable")[:TOP_NGRAMS]
        windows = np.empty((order.size, layout.order), np.int64)
        unpack_windows(
            np.ascontiguousarray(keys[order]), layout.order, layout.bits, layout.per_word, layout.mask, windows
        )
        result.append(
            {
                "head": h,
                "size": sizes[h],
                "bucket": b,
                "load": load,
                "ngrams": [decoder.ngram(w[::-1], int(c)) for w, c in zip(windows, counts[order])],
            }
        )
    return result


class NgramDecoder:
    """Canonical ids back to text, through the first tokenizer id of each canonical id."""

    def __init__(self, projection: VocabProjection) -> None:
        lookup = projection.lookup
        self._first = np.full(projection.compressed_size, -1, np.int64)
        canonical, first = np.unique(lookup, return_index=True)  # the first raw id of each canonical id
        self._first[canonical] = first
        self._tokenizer: Tokenizer | None
        try:
            self._tokenizer = projection.tokenizer()
        except EngramError:
            self._tokenizer = None
        self._cache: dict[int, str] = {}

    def token(self, canonical: int) -> str:
        """The text of one canonical id (`#<id>` when the projection carries no tokenizer)."""
        if canonical not in self._cache:
            raw = int(self._first[canonical])
            self._cache[canonical] = (
                f"#{canonical}" if self._tokenizer is None else self._tokenizer.decode([raw], skip_special_tokens=False)
            )
        return self._cache[canonical]

    def ngram(self, window: np.ndarray, count: int) -> dict[str, Any]:
        """An n-gram's ids, tokens, text and occurrence count, as `--top` lists them."""
        tokens = [self.token(int(c)) for c in window]
        return {"ids": [int(c) for c in window], "tokens": tokens, "text": "".join(tokens), "count": count}


@dataclass
class SweepPoint:
    """The statistics of every layer at one sweep factor, and the scaled spec."""

    factor: float
    spec: TableSpec
    layers: LayerStats

    def to_json(self) -> dict[str, Any]:
        """One entry of `sweep` in `engram inspect --json`."""
        return {
            "factor": self.factor,
            "rows": self.spec.total_rows,
            "parameters": self.spec.parameters,
            "bytes": self.spec.parameters * DTYPE_BYTES[self.spec.dtype],
            "layers": layers_json(self.layers),
        }


def layers_json(layers: LayerStats) -> dict[str, Any]:
    """Statistics per layer and order as `engram inspect --json` writes them."""
    return {
        str(layer): {"orders": {str(n): s.to_json() for n, s in orders.items()}} for layer, orders in layers.items()
    }


def counter_bytes(sizes: list[int]) -> int:
    """Memory of one order's statistic at these head sizes: a load counter per bucket (int32,
    int64 past 2**31 distinct n-grams), the crowded-bucket bitmap twice, one head's comparison."""
    return 4 * sum(sizes) + sum(sizes) // 4 + max(sizes)


def counter_limit(memory_budget: int | None = None) -> int:
    """Bytes the bucket counters of one order may take: the memory available now less the
    n-gram counts' budget (held at the same time), and never less than a quarter of it."""
    available = available_memory()
    budget = memory_budget or default_memory_budget()
    return max(available - budget, available // 4)


def check_counter_memory(spec: TableSpec, factors: list[float] | None, memory_budget: int | None = None) -> None:
    """Refuse, before reading any corpus, statistics whose bucket counters cannot fit in memory.

    The counters are not spilled (every head's loads are needed at once for the second pass),
    so a spec or sweep factor whose heads hold more buckets than memory does is an error.

    Args:
        spec: the spec at its own sizes.
        factors: the sweep factors, if any.
        memory_budget: bytes of n-gram counts held beside the counters (default: as counting uses).
    """
    limit = counter_limit(memory_budget)
    for factor in [1.0, *(f for f in factors or [] if f != 1)]:
        scaled = spec if factor == 1 else spec.scaled(factor)
        for layer in scaled.layer_ids:
            sizes = scaled.head_sizes(layer)
            for n in scaled.orders:
                heads = sizes[(n - 2) * scaled.n_head_per_ngram : (n - 1) * scaled.n_head_per_ngram]
                need = counter_bytes(heads)
                if need > limit:
                    at = "the spec's head sizes" if factor == 1 else f"sweep factor {factor:g}"
                    raise ResourceError(
                        f"collision statistics at {at} need {gibibytes(need)} of bucket counters for layer "
                        f"{layer}, order {n} ({plural(len(heads), 'head')} of up to {max(heads):,} rows); "
                        f"at most {gibibytes(limit)} may go to them (the memory available less the n-gram "
                        "budget): use smaller head sizes or sweep factors"
                    )


def collision_statistics(
    spec: TableSpec,
    projection: VocabProjection,
    corpus: Corpus | Iterable[DocBatch],
    *,
    factors: list[float] | None = None,
    top: int = 0,
    memory_budget: int | None = None,
    spill_dir: str | Path | None = None,
    on_batch: Callable[[DocBatch | None], None] | None = None,
    on_statistic: Callable[[], None] | None = None,
    client: Any = None,
    part_ids: int | None = None,
    barrier_ids: Iterable[int] | None = None,
) -> tuple[LayerStats, list[SweepPoint] | None, int]:
    """Statistics at the spec's sizes and at every sweep factor, and the bytes spilled to disk.

    Args:
        spec: the tables whose head sizes are measured.
        projection: the spec's vocab projection.
        corpus: a `Corpus` or any iterable of `DocBatch` (documents of raw token ids).
        factors: the sweep: also every head size scaled by each factor.
        top: list the `top` most crowded buckets per order, with their n-grams.
        memory_budget: bytes of counts held in memory (default: a quarter of what is available).
        spill_dir: where counts spill beyond the budget; on a cluster, a folder every worker sees.
        on_batch: called after each batch (or cluster map task, with None), for progress.
        on_statistic: called after each (layer, order, size) is done.
        client: a Dask client (with a `Corpus`): counting is then mapped over corpus parts and
            merged by partition on the cluster, to the same numbers.
        part_ids: on a cluster, the smallest range of a pre-tokenized file one task reads.
        barrier_ids: tokens no n-gram spans, counted as the hasher hashes them (see `NgramHasher`).
    """
    budget = memory_budget or default_memory_budget()
    check_counter_memory(spec, factors, budget)
    window = WindowKeys.of(spec, projection, barrier_ids)
    decoder = NgramDecoder(projection) if top else None
    scaled = [(f, spec if f == 1 else spec.scaled(f)) for f in (factors or [])]
    if client is not None:
        if not isinstance(corpus, Corpus):
            raise UsageError("a cluster counts a Corpus of files, not an iterable of batches")
        counts = count_on_cluster(
            client,
            corpus,
            projection,
            window,
            budget,
            spill_dir,
            (lambda: on_batch(None)) if on_batch else None,
            part_ids,
        )
    else:
        counts = KeyCountStore(window, budget, spill_dir)
    with ThreadPoolExecutor(max_workers=cpu_count()) as pool, counts as store:
        if client is None:
            count_corpus(corpus.batches() if isinstance(corpus, Corpus) else corpus, window, store, pool, on_batch)
        if not store.occurrences[2]:
            detail = ""
            if isinstance(corpus, Corpus):
                read = corpus.summary
                detail = (
                    f" ({plural(read.files, 'file')} read"
                    + (f", {plural(read.skipped_binary, 'binary file')} skipped" if read.skipped_binary else "")
                    + ")"
                )
            raise EngramError(f"the corpus holds no tokens{detail}")
        layers: LayerStats = {}
        sweep_layers: list[LayerStats] = [{} for _ in scaled]
        for layer in spec.layer_ids:
            layers[layer] = {}
            for point in sweep_layers:
                point[layer] = {}
            for n in spec.orders:
                data = OrderInput(store, window.layout(n), spec.multipliers(layer, projection.compressed_size), pool)
                span = slice((n - 2) * spec.n_head_per_ngram, (n - 1) * spec.n_head_per_ngram)
                base = order_statistics(data, spec.head_sizes(layer)[span], budget, spill_dir, top, decoder)
                layers[layer][n] = base
                if on_statistic:
                    on_statistic()
                # A scaled spec keeps seed, layers and vocab, hence the multipliers: only sizes change.
                for (_, other), point in zip(scaled, sweep_layers):
                    if other is spec:
                        point[layer][n] = OrderStats(
                            base.order,
                            base.occurrences,
                            base.distinct,
                            base.mix_colliding,
                            base.all_heads_colliding,
                            base.heads,
                        )
                        continue
                    point[layer][n] = order_statistics(data, other.head_sizes(layer)[span], budget, spill_dir)
                    if on_statistic:
                        on_statistic()
        spilled = store.spilled_bytes
    sweep = [SweepPoint(f, other, point) for (f, other), point in zip(scaled, sweep_layers)] if factors else None
    return layers, sweep, spilled
