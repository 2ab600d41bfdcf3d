"""Collision statistics against a brute force written here, size sweeps, table health, `engram inspect`."""

from __future__ import annotations

import json
import math
import os
import re
import stat
import subprocess
import sys
from collections import Counter
from decimal import Decimal, localcontext
from pathlib import Path

import numpy as np
import pytest
from engram_cli.cli.commands import parse_factors
from engram_cli.collisions.budget import minimum_memory_budget
from engram_cli.collisions.counting import KeyCountStore
from engram_cli.collisions.keys import WindowKeys
from engram_cli.collisions.options import CountOptions
from engram_cli.collisions.reports import expected_rate
from engram_cli.collisions.runs import WHOLE, merge_pieces
from engram_cli.collisions.spill import SpillFolder, worker_pool
from engram_cli.collisions.statistics import collision_statistics
from engram_cli.corpus.base import CorpusOptions, DocBatch
from engram_cli.errors import EngramError, UsageError
from engram_cli.hashing import NgramHasher
from engram_cli.inspection import inspect
from engram_cli.kernels import FLOAT_REDUCTION_MIN_PRIME
from engram_cli.spec import TableSpec, load_spec
from engram_cli.store.build import build_tables
from engram_cli.store.tables import open_tables
from engram_cli.vocab import VocabProjection
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from matplotlib.image import imread

from conftest import engram_json, run_engram

INT64_MAX = (1 << 63) - 1


def draw_multipliers(seed: int, layer_id: int, compressed_size: int, max_ngram: int) -> list[int]:
    """The reference's draw, from the published facts."""
    rng = np.random.default_rng(seed + 10007 * layer_id)
    bound = max(1, (INT64_MAX // compressed_size) // 2)
    return [2 * int(r) + 1 for r in rng.integers(0, bound, size=max_ngram, dtype=np.int64)]


def brute_force(docs: list[list[int]], spec: TableSpec, lookup: np.ndarray) -> dict:
    """Every statistic from Python dicts: windows, mixes, buckets, one n-gram at a time."""
    lookup = [int(v) for v in lookup]
    pad = lookup[spec.pad_id]
    compressed = max(lookup) + 1
    result = {}
    for layer in spec.layer_ids:
        mults = draw_multipliers(spec.seed, layer, compressed, spec.max_ngram_size)
        sizes = spec.head_sizes(layer)
        result[layer] = {}
        for n in spec.orders:
            counts: Counter = Counter()
            for doc in docs:
                x = [pad] * (n - 1) + [lookup[v] for v in doc]
                for t in range(n - 1, len(x)):
                    counts[tuple(x[t - n + 1 : t + 1])] += 1
            mix = {}
            for gram in counts:
                value = 0
                for k in range(n):
                    value ^= gram[n - 1 - k] * mults[k]
                mix[gram] = value
            heads_sizes = sizes[(n - 2) * spec.n_head_per_ngram : (n - 1) * spec.n_head_per_ngram]
            by_mix = Counter(mix.values())
            by_buckets = Counter(tuple(mix[g] % p for p in heads_sizes) for g in counts)
            total = sum(counts.values())
            heads = []
            for p in heads_sizes:
                load = Counter(mix[g] % p for g in counts)
                colliding = [g for g in counts if load[mix[g] % p] > 1]
                histogram = Counter(load.values())
                histogram[0] = p - len(load)
                heads.append(
                    {
                        "size": p,
                        "buckets_used": len(load),
                        "colliding": len(colliding),
                        "collision_rate": len(colliding) / len(counts) if counts else 0.0,
                        "expected_rate": (1 - (1 - 1 / p) ** (len(counts) - 1)) if len(counts) > 1 else 0.0,
                        "weighted_rate": sum(counts[g] for g in colliding) / total if total else 0.0,
                        "max_load": max(load.values(), default=0),
                        "load_histogram": {k: v for k, v in sorted(histogram.items()) if v},
                        "load": load,
                    }
                )
            result[layer][n] = {
                "occurrences": total,
                "distinct": len(counts),
                "mix_colliding": sum(1 for g in counts if by_mix[mix[g]] > 1),
                "all_heads_colliding": sum(1 for g in counts if by_buckets[tuple(mix[g] % p for p in heads_sizes)] > 1),
                "heads": heads,
                "counts": counts,
                "mix": mix,
            }
    return result


def as_batches(docs: list[list[int]], cuts: list[int], context: int) -> list[DocBatch]:
    """The documents as one stream cut at `cuts`: a batch that starts inside a document carries
    that document's previous `context` ids, as the corpus reader hands them over."""
    stream = [v for doc in docs for v in doc]
    doc_of = [i for i, doc in enumerate(docs) for _ in doc]
    first = {sum(len(d) for d in docs[:i]) for i, doc in enumerate(docs) if doc}
    edges = sorted({0, len(stream), *[c for c in cuts if 0 < c < len(stream)]})
    batches = []
    for a, b in zip(edges[:-1], edges[1:]):
        starts = [i - a for i in range(a, b) if i in first]
        doc_start = min(j for j in range(a + 1) if doc_of[j] == doc_of[a]) if a < len(stream) else a
        ctx = stream[max(doc_start, a - context) : a] if a not in first else []
        batches.append(DocBatch(np.array(stream[a:b], np.int64), np.array(starts, np.int64), np.array(ctx, np.int64)))
    return batches


def check_against(stats: dict, expected: dict) -> None:
    for layer, orders in expected.items():
        for n, want in orders.items():
            got = stats[layer][n]
            for name in ("occurrences", "distinct", "mix_colliding", "all_heads_colliding"):
                assert getattr(got, name) == want[name], (layer, n, name)
            assert len(got.heads) == len(want["heads"])
            for head, wanted in zip(got.heads, want["heads"]):
                for name in ("size", "buckets_used", "colliding", "max_load", "load_histogram"):
                    assert getattr(head, name) == wanted[name], (layer, n, name)
                for name in ("collision_rate", "weighted_rate"):
                    assert math.isclose(getattr(head, name), wanted[name], rel_tol=1e-12, abs_tol=1e-15)
                # the brute force's plain power loses digits that expm1/log1p keep
                assert math.isclose(head.expected_rate, wanted["expected_rate"], rel_tol=1e-9, abs_tol=1e-15)


@st.composite
def problems(draw):
    vocab = draw(st.integers(2, 40))
    compressed = draw(st.integers(1, vocab))
    lookup = np.array(draw(st.lists(st.integers(0, compressed - 1), min_size=vocab, max_size=vocab)), np.int64)
    max_n = draw(st.integers(2, 4))
    spec = TableSpec(
        layer_ids=tuple(draw(st.lists(st.integers(0, 30), min_size=1, max_size=2, unique=True))),
        max_ngram_size=max_n,
        n_head_per_ngram=draw(st.integers(1, 3)),
        engram_vocab_size=tuple(draw(st.lists(st.integers(2, 30), min_size=max_n - 1, max_size=max_n - 1))),
        n_embed_per_ngram=6,
        pad_id=draw(st.integers(0, vocab - 1)),
        seed=draw(st.integers(0, 1000)),
    )
    docs = draw(st.lists(st.lists(st.integers(0, vocab - 1), max_size=60), min_size=1, max_size=8))
    total = sum(len(d) for d in docs)
    cuts = draw(st.lists(st.integers(0, max(0, total)), max_size=4))
    smallest = draw(st.booleans())  # the smallest budget that works, or plenty
    fan_in = draw(st.integers(2, 4))
    return lookup, spec, docs, cuts, smallest, fan_in


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(problems())
def test_every_statistic_matches_brute_force(problem):
    lookup, spec, docs, cuts, smallest, fan_in = problem
    projection = VocabProjection(lookup)
    batches = as_batches(docs, cuts, spec.max_ngram_size - 1)
    if not any(len(d) for d in docs):
        with pytest.raises(EngramError, match="no tokens"):
            collision_statistics(spec, projection, batches)
        return
    budget = minimum_memory_budget(spec) if smallest else 1 << 30
    layers, sweep, spilled = collision_statistics(spec, projection, batches, memory_budget=budget, fan_in=fan_in)
    assert sweep is None and (spilled > 0) == smallest  # the smallest budget leaves no room for counts
    check_against(layers, brute_force(docs, spec, lookup))


def test_count_options_count_as_their_keywords_do():
    """`counting=CountOptions(...)` is the keywords taken whole: the smallest budget spills and
    still gives the brute force's numbers; giving both ways at once is refused, naming the keywords."""
    spec = TableSpec(
        layer_ids=(1, 4),
        max_ngram_size=3,
        n_head_per_ngram=2,
        engram_vocab_size=(17, 23),
        n_embed_per_ngram=6,
        pad_id=0,
        seed=3,
    )
    lookup = np.arange(30, dtype=np.int64) % 20
    rng = np.random.default_rng(5)
    docs = [[int(v) for v in rng.integers(0, 30, n)] for n in (40, 3, 25)]
    counting = CountOptions(memory_budget=minimum_memory_budget(spec), fan_in=2)
    layers, _, spilled = collision_statistics(
        spec, VocabProjection(lookup), as_batches(docs, [11, 50], 2), counting=counting
    )
    assert spilled > 0
    check_against(layers, brute_force(docs, spec, lookup))
    with pytest.raises(UsageError, match=r"not both \(memory_budget, fan_in\)"):
        collision_statistics(spec, VocabProjection(lookup), [], counting=counting, memory_budget=1 << 30, fan_in=3)


def test_windows_are_exactly_what_the_hasher_hashes():
    """The buckets implied by the statistics' windows are the NgramHasher's buckets, token by token."""
    rng = np.random.default_rng(3)
    lookup = rng.integers(0, 50, 80)
    spec = TableSpec(
        layer_ids=(2, 9),
        max_ngram_size=3,
        n_head_per_ngram=2,
        engram_vocab_size=(11, 17),
        n_embed_per_ngram=4,
        pad_id=7,
        seed=11,
    )
    docs = [rng.integers(0, 80, n).tolist() for n in (1, 2, 40, 75)]
    expected = brute_force(docs, spec, lookup)
    hasher = NgramHasher(spec, VocabProjection(lookup))
    pad = int(lookup[spec.pad_id])
    for doc in docs:
        buckets = hasher.hash(np.array(doc))
        for layer in spec.layer_ids:
            for n in spec.orders:
                x = [pad] * (n - 1) + [int(lookup[v]) for v in doc]
                for t in range(len(doc)):
                    mix = expected[layer][n]["mix"][tuple(x[t : t + n])]
                    for j, head in enumerate(expected[layer][n]["heads"]):
                        assert buckets[layer][t, (n - 2) * spec.n_head_per_ngram + j] == mix % head["size"]
    layers, _, _ = collision_statistics(spec, VocabProjection(lookup), as_batches(docs, [], 2))
    check_against(layers, expected)


@pytest.mark.slow
def test_multi_word_keys_and_mix_collisions():
    """A canonical id near 2**61 needs 61 bits per id (one id per key word) and forces every
    multiplier to 1, so the mix is a plain XOR and distinct n-grams share it."""
    lookup = np.array([0, 1, 2, 3, 4, 5, (1 << 61) - 1], np.int64)
    spec = TableSpec(
        layer_ids=(1,),
        max_ngram_size=4,
        n_head_per_ngram=2,
        engram_vocab_size=(5, 7, 3),
        n_embed_per_ngram=2,
        pad_id=0,
        seed=0,
    )
    rng = np.random.default_rng(0)
    docs = [rng.integers(0, 7, n).tolist() for n in (5, 30, 60, 1)]
    expected = brute_force(docs, spec, lookup)
    assert all(m == 1 for m in draw_multipliers(0, 1, 1 << 61, 4))
    assert expected[1][2]["mix_colliding"] > 0 and expected[1][4]["mix_colliding"] > 0
    for budget in (1 << 30, minimum_memory_budget(spec)):
        layers, _, _ = collision_statistics(
            spec, VocabProjection(lookup), as_batches(docs, [7, 50], 3), memory_budget=budget, fan_in=2
        )
        check_against(layers, expected)


def test_realistic_head_sizes_take_the_float_reduction_and_stay_exact():
    rng = np.random.default_rng(1)
    lookup = np.arange(300) // 2
    spec = TableSpec(
        layer_ids=(0, 5),
        max_ngram_size=3,
        n_head_per_ngram=2,
        engram_vocab_size=(FLOAT_REDUCTION_MIN_PRIME + 100, 3 * FLOAT_REDUCTION_MIN_PRIME),
        n_embed_per_ngram=2,
        pad_id=1,
        seed=3,
    )
    docs = [rng.integers(0, 300, n).tolist() for n in rng.integers(1, 700, 30)]
    expected = brute_force(docs, spec, lookup)
    assert all(h["colliding"] for h in expected[0][2]["heads"])  # the test can see a wrong bucket
    layers, _, _ = collision_statistics(spec, VocabProjection(lookup), as_batches(docs, [1000], 2))
    check_against(layers, expected)


def test_sweep_and_top_buckets():
    rng = np.random.default_rng(2)
    lookup = np.arange(60)
    spec = TableSpec(
        layer_ids=(1, 3),
        max_ngram_size=3,
        n_head_per_ngram=3,
        engram_vocab_size=(40, 90),
        n_embed_per_ngram=3,
        pad_id=0,
        seed=9,
    )
    docs = [rng.integers(0, 60, n).tolist() for n in (50, 200, 13)]
    factors = [0.5, 1, 3]
    layers, sweep, _ = collision_statistics(
        spec, VocabProjection(lookup), as_batches(docs, [], 2), factors=factors, top=4
    )
    assert [p.factor for p in sweep] == factors
    for point in sweep:
        assert point.spec.head_sizes(1) == spec.scaled(point.factor).head_sizes(1)
        check_against(point.layers, brute_force(docs, spec.scaled(point.factor), lookup))
    expected = brute_force(docs, spec, lookup)
    check_against(layers, expected)
    for layer, orders in layers.items():
        for n, stats in orders.items():
            want = expected[layer][n]
            loads = sorted((load for head in want["heads"] for load in head["load"].values() if load > 1), reverse=True)
            assert [b["load"] for b in stats.top_buckets] == loads[:4]
            for bucket in stats.top_buckets:
                head = want["heads"][bucket["head"]]
                assert head["load"][bucket["bucket"]] == bucket["load"]
                members = {g: c for g, c in want["counts"].items() if want["mix"][g] % head["size"] == bucket["bucket"]}
                assert len(bucket["ngrams"]) == min(len(members), 8)
                for gram in bucket["ngrams"]:
                    assert members[tuple(gram["ids"])] == gram["count"]
                    assert gram["tokens"] == [f"#{i}" for i in gram["ids"]]  # no tokenizer: ids shown
                shown = [g["count"] for g in bucket["ngrams"]]
                assert shown == sorted(members.values(), reverse=True)[:8]


def count_runs(batches, window, budget, folder, pool):
    """Key counts of some batches as sorted runs (what one corpus part, or a cluster map task, yields)."""
    store = KeyCountStore(window, budget, folder, pool)
    for batch in batches:
        store.add(batch)
    store.finish()
    if store.in_memory:
        store.spill_in_memory()
    return store.runs


@pytest.mark.slow
def test_runs_of_corpus_parts_merge_by_key_range_to_the_same_counts(tmp_path):
    """Sorted runs of separate corpus parts, merged one key range at a time (the pieces a cluster's
    reduce tasks merge): every distinct n-gram once, with its exact count, ranges in key order."""
    rng = np.random.default_rng(4)
    lookup = np.arange(1000)
    spec = TableSpec(
        layer_ids=(1,), max_ngram_size=3, n_head_per_ngram=1, engram_vocab_size=(50, 50), n_embed_per_ngram=2, pad_id=0
    )
    docs = [rng.integers(0, 30, n).tolist() for n in rng.integers(1, 300, 40)]
    window = WindowKeys.of(spec, VocabProjection(lookup))
    batches = as_batches(docs, [500, 2000, 3500], 2)
    expected = brute_force(docs, spec, lookup)[1]
    with SpillFolder(tmp_path) as folder, worker_pool(2) as pool:
        parts = [count_runs(batches[i : i + 2], window, 2000, folder, pool) for i in range(0, len(batches), 2)]
        for n in spec.orders:
            runs = [run for part in parts for run in part[n]]
            assert len(runs) > 4  # several runs per part (a small budget) and several parts
            edges = [0, 1 << 61, 3 << 62, 1 << 64]
            pieces = []
            for low, high in zip(edges[:-1], edges[1:]):
                for piece in merge_pieces(runs, 50, pool, 3, (low, high)):
                    assert np.all((piece.keys[:, 0] >= low) & (piece.keys[:, 0] < high))
                    pieces.append(piece)
            keys = np.concatenate([p.keys for p in pieces])
            counts = np.concatenate([p.counts for p in pieces])
            assert np.all(np.diff(keys[:, 0].astype(np.float64)) >= 0) and len(pieces) > 10
            assert len(counts) == expected[n]["distinct"] and sorted(counts.tolist()) == sorted(
                expected[n]["counts"].values()
            )
            whole = list(merge_pieces(runs, 1 << 20, pool, 3, WHOLE))
            assert len(whole) == 1 and np.array_equal(whole[0].keys, keys)


@pytest.mark.slow
def test_spilled_counts_equal_in_memory_counts(tmp_path):
    rng = np.random.default_rng(5)
    lookup = np.arange(5000)
    spec = TableSpec(
        layer_ids=(1,),
        max_ngram_size=4,
        n_head_per_ngram=2,
        engram_vocab_size=(97, 89, 83),
        n_embed_per_ngram=2,
        pad_id=0,
    )
    docs = [rng.integers(0, 5000, n).tolist() for n in rng.integers(1, 400, 60)]
    batches = as_batches(docs, list(range(0, 20000, 997)), 3)
    results = []
    for budget in (1 << 30, minimum_memory_budget(spec)):
        layers, _, spilled = collision_statistics(
            spec, VocabProjection(lookup), batches, memory_budget=budget, spill_dir=tmp_path
        )
        results.append((layers, spilled))
    assert results[0][1] == 0 and results[1][1] > 0
    check_against(results[1][0], brute_force(docs, spec, lookup))
    assert list(tmp_path.iterdir()) == []  # the spill folder is removed


def test_key_count_store_holds_exact_counts_under_any_budget(tmp_path):
    rng = np.random.default_rng(6)
    lookup = np.arange(100)
    spec = TableSpec(
        layer_ids=(1,), max_ngram_size=2, n_head_per_ngram=1, engram_vocab_size=(5,), n_embed_per_ngram=1, pad_id=0
    )
    docs = [rng.integers(0, 100, 200).tolist() for _ in range(30)]
    window = WindowKeys.of(spec, VocabProjection(lookup))
    expected = brute_force(docs, spec, lookup)[1][2]["counts"]
    for budget in (160, 3000, 1 << 30):
        with SpillFolder(tmp_path) as folder, worker_pool(2) as pool:
            store = KeyCountStore(window, budget, folder, pool)
            assert store.capacity == max(1, budget // 16)
            for batch in as_batches(docs, list(range(0, 6000, 450)), 1):
                store.add(batch)
            store.finish()
            runs = [store.in_memory[2]] if store.in_memory else store.runs[2]
            assert len(runs) == (1 if budget == 1 << 30 else -(-6000 // store.capacity))
            merged = list(merge_pieces(runs, 1000, pool, 3))
            assert sum(p.rows for p in merged) == len(expected)
            assert sum(int(p.counts.sum()) for p in merged) == 6000
            assert sorted(int(c) for p in merged for c in p.counts) == sorted(expected.values())


class Recorded:
    """A Progress that keeps what a job reported: (description, total, units done, notes)."""

    def __init__(self) -> None:
        self.tasks: list[dict] = []

    def task(self, description, total=None):
        record = {"description": description, "total": total, "done": 0, "notes": []}
        self.tasks.append(record)
        recorded = self

        class Task:
            def advance(self, amount=1, *, note=None):
                record["done"] += amount
                if note:
                    record["notes"].append(note)

            def update(self, completed, *, note=None):
                record["done"] = completed
                if note:
                    record["notes"].append(note)

        assert recorded is self
        return Task()

    def named(self, text: str) -> list[dict]:
        return [t for t in self.tasks if text in t["description"]]


@pytest.mark.slow
def test_many_partitions_and_several_merge_rounds_match_brute_force(tmp_path):
    """The smallest budget that works spills a run every few hundred windows; a fan-in of 3 then
    takes several merge rounds, and the merge streams through many key ranges, with sweep sizes
    and a small-lcm spec whose residues are counted apart: every number is the brute force's."""
    rng = np.random.default_rng(12)
    lookup = rng.integers(0, 700, 900)
    spec = TableSpec(
        layer_ids=(3, 8),
        max_ngram_size=3,
        n_head_per_ngram=2,
        engram_vocab_size=(11, 13),
        n_embed_per_ngram=2,
        pad_id=5,
        seed=2,
    )
    docs = [rng.integers(0, 900, n).tolist() for n in rng.integers(1, 400, 60)]
    budget = minimum_memory_budget(spec, [1, 30])
    progress = Recorded()
    layers, sweep, spilled = collision_statistics(
        spec,
        VocabProjection(lookup),
        as_batches(docs, list(range(0, 12000, 1500)), 2),
        factors=[1, 30],
        memory_budget=budget,
        spill_dir=tmp_path,
        fan_in=3,
        progress=progress,
    )
    tokens = sum(len(d) for d in docs)
    runs = -(-tokens // KeyCountStore.capacity_for(WindowKeys.of(spec, VocabProjection(lookup)), budget))
    assert spilled > 0 and runs > 27  # more than fan_in ** 3: three merge rounds
    for n in spec.orders:
        (rounds,) = progress.named(f"order {n}: merge rounds")
        assert rounds["total"] == rounds["done"] >= 3 and len(rounds["notes"]) == rounds["done"]
        (merging,) = progress.named(f"order {n}: merging")
        assert merging["total"] == merging["done"] > 50  # many key ranges
    expected = brute_force(docs, spec, lookup)
    check_against(layers, expected)
    check_against(sweep[1].layers, brute_force(docs, spec.scaled(30), lookup))
    assert any(s.mix_colliding < s.all_heads_colliding for o in layers.values() for s in o.values())
    assert list(tmp_path.iterdir()) == []


def test_expected_rate_and_factors():
    assert expected_rate(7, 1) == 0.0 and expected_rate(1, 5) == 1.0
    with localcontext() as ctx:
        ctx.prec = 60
        exact = 1 - (1 - Decimal(1) / 646_403) ** 499_999
    assert math.isclose(expected_rate(646_403, 500_000), float(exact), rel_tol=1e-14)
    assert parse_factors("1, 2,5,10,2") == [1.0, 2.0, 5.0, 10.0]
    for bad in ("0", "-1", "x", "1,,2", "nan"):
        with pytest.raises(EngramError, match="--sweep"):
            parse_factors(bad)


# ---- table health and the command -------------------------------------------------------------

SMALL = TableSpec(
    layer_ids=(1, 3),
    max_ngram_size=3,
    n_head_per_ngram=2,
    engram_vocab_size=(3000, 2000),
    n_embed_per_ngram=16,
    pad_id=2,
    seed=4,
    dtype="bfloat16",
)


@pytest.fixture(scope="module")
def projection() -> VocabProjection:
    rng = np.random.default_rng(8)
    lookup = rng.permutation(np.concatenate([np.arange(400), rng.integers(0, 400, 100)]))  # onto 0..399
    return VocabProjection(lookup, {"made_by": "test_statistics"})


@pytest.fixture(scope="module")
def store_path(tmp_path_factory, projection) -> Path:
    path = tmp_path_factory.mktemp("stores") / "small.zarr"
    build_tables(SMALL, path, projection=projection, shards=2)
    return path


@pytest.fixture(scope="module")
def ids_file(tmp_path_factory) -> tuple[Path, list[list[int]]]:
    rng = np.random.default_rng(9)
    docs = [rng.integers(3, 500, n).tolist() for n in rng.integers(1, 400, 50)]
    path = tmp_path_factory.mktemp("ids") / "docs.bin"
    np.array([v for d in docs for v in d + [0]], np.uint16).tofile(path)
    return path, docs


def test_table_health_matches_the_stored_values(store_path):
    report = inspect(open_tables(store_path))
    assert report.layers is None and report.tables is not None and report.tables.complete
    store = open_tables(store_path)
    for layer in SMALL.layer_ids:
        info = report.tables.layers[layer]
        table = np.asarray(store.table(layer)[:]).astype(np.float64)
        assert info["rows"] == table.shape[0] and info["dim"] == SMALL.dim
        assert info["bytes_on_disk"] >= table.size * 2
        assert info["shard_plan"]["shards"] == len(store.shard_ranges(layer))
        for h, (size, off) in enumerate(zip(SMALL.head_sizes(layer), SMALL.offsets(layer))):
            values = table[off : off + size]
            head = info["heads"][h]
            assert (head["order"], head["head"], head["size"]) == (2 + h // 2, h % 2, size)
            assert math.isclose(head["mean"], values.mean(), rel_tol=1e-9, abs_tol=1e-12)
            assert math.isclose(head["std"], values.std(), rel_tol=1e-9)
            assert head["max_abs"] == np.abs(values).max() and head["nonfinite"] == 0


def test_table_health_of_an_incomplete_store_reads_what_is_there(tmp_path, projection):
    path = tmp_path / "holes.zarr"
    build_tables(SMALL, path, projection=projection, shards=2)
    store = open_tables(path)
    start, stop = store.layout(3).shard_range(1)
    (path / store.layout(3).shard_key(1)).unlink()
    health = inspect(open_tables(path, allow_incomplete=True)).tables
    assert (
        not health.complete and health.layers[3]["missing_shards"] == [1] and health.layers[1]["missing_shards"] == []
    )
    for h, (size, off) in enumerate(zip(SMALL.head_sizes(3), SMALL.offsets(3))):
        head = health.layers[3]["heads"][h]
        unread = max(0, min(stop, off + size) - max(start, off))
        assert head["unread_rows"] == unread
        if unread < size:
            values = np.asarray(store.table(3)[off : min(off + size, start)]).astype(np.float64)
            assert math.isclose(head["mean"], values.mean(), rel_tol=1e-9, abs_tol=1e-12)
        else:
            assert head["mean"] is None and head["std"] is None


def test_inspect_command_json_plot_and_schema(tmp_path, store_path, projection_file, projection, ids_file):
    path, docs = ids_file
    plot = tmp_path / "collisions.png"
    data = engram_json(
        "inspect",
        str(store_path),
        "--projection",
        str(projection_file),
        "--corpus",
        str(path),
        "--doc-sep",
        "0",
        "--sweep",
        "1,2",
        "--plot",
        str(plot),
        "--top",
        "2",
    )
    assert data["corpus"]["tokens"] == sum(len(d) for d in docs) and data["corpus"]["documents"] == len(docs)
    assert data["tables"]["complete"] and set(data["tables"]["layers"]) == {"1", "3"}
    expected = brute_force(docs, SMALL, projection.lookup)
    for layer in ("1", "3"):
        for n in ("2", "3"):
            got = data["layers"][layer]["orders"][n]
            want = expected[int(layer)][int(n)]
            assert {k: got[k] for k in ("occurrences", "distinct", "mix_colliding", "all_heads_colliding")} == {
                k: want[k] for k in ("occurrences", "distinct", "mix_colliding", "all_heads_colliding")
            }
            for head, wanted in zip(got["heads"], want["heads"]):
                assert set(head) >= {
                    "size",
                    "buckets_used",
                    "colliding",
                    "collision_rate",
                    "expected_rate",
                    "weighted_rate",
                    "max_load",
                }
                assert (head["size"], head["colliding"], head["max_load"]) == (
                    wanted["size"],
                    wanted["colliding"],
                    wanted["max_load"],
                )
            assert len(got["top_buckets"]) == 2
    assert [p["factor"] for p in data["sweep"]] == [1.0, 2.0]
    assert data["sweep"][0]["layers"]["1"]["orders"]["2"]["heads"] == data["layers"]["1"]["orders"]["2"]["heads"]
    assert data["plot"] == str(plot)
    image = imread(plot)
    assert image.shape[0] > 400 and image.shape[1] > 1000 and image.std() > 0.05
    umask = os.umask(0)
    os.umask(umask)
    assert stat.S_IMODE(plot.stat().st_mode) == 0o666 & ~umask  # like every other output


@pytest.mark.parametrize("tokens", [40, 20_000])
def test_plot_value_labels_never_sit_under_the_legend(tmp_path, store_path, tokens):
    """Every rate label of the sweep panel stays clear of its legend: with few distinct n-grams
    every rate is near 0 and the labels run along the bottom (where a legend inside the axes
    sat), with many they span the panel."""
    from engram_cli.cli.plot import collision_figure
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    path = tmp_path / "ids.bin"
    np.random.default_rng(tokens).integers(1, 500, tokens).astype(np.uint16).tofile(path)
    report = inspect(
        open_tables(store_path), corpus=[path], options=CorpusOptions(doc_sep=0), sweep=[0.05, 0.2, 1, 5, 50]
    )
    fig = collision_figure(report)
    canvas = FigureCanvasAgg(fig)
    canvas.draw()
    renderer = canvas.get_renderer()
    rate_ax = fig.axes[0]
    legend = rate_ax.get_legend().get_window_extent(renderer)
    labels = [t for t in rate_ax.texts if t.get_text().endswith("%")]
    assert len(labels) >= 5 * len(SMALL.orders)
    for label in labels:
        assert not label.get_window_extent(renderer).overlaps(legend), label.get_text()


def test_tables_never_cut_numbers_on_a_narrow_terminal(store_path, ids_file):
    """Where rich would end long numbers with an ellipsis, the rightmost columns are left out
    (and named) instead: every number shown is whole."""

    def stderr_at(columns: int, *args: str) -> str:
        env = {**os.environ, "COLUMNS": str(columns)}
        proc = subprocess.run(
            [sys.executable, "-m", "engram_cli", *args], capture_output=True, text=True, env=env, timeout=600
        )
        assert proc.returncode == 0, proc.stderr
        assert "\u2026" not in proc.stderr
        return proc.stderr

    plan = load_spec("deepseek-v4.1-flash")
    narrow = stderr_at(60, "plan", "deepseek-v4.1-flash")
    assert f"{plan.rows(plan.layer_ids[0]):,}" in narrow and f"{plan.parameters:,}" in narrow
    assert "not shown at 60 columns" in narrow and "float16" in narrow.split("not shown")[0].splitlines()[-1]
    wide = stderr_at(200, "plan", "deepseek-v4.1-flash")
    assert "not shown" not in wide
    path, _ = ids_file
    report = stderr_at(80, "inspect", str(store_path), "--corpus", str(path), "--doc-sep", "0", "--sweep", "1,2")
    assert "Collisions at the head sizes" in report


def test_inspect_with_a_spec_and_bad_inputs_give_one_line_errors(tmp_path, store_path, projection_file, demo_spec_file):
    ids = tmp_path / "ids.npy"
    np.save(ids, np.array([[5, 6, 7], [8, 9, 700]], np.int32))
    odd = tmp_path / "odd.bin"
    odd.write_bytes(b"\x01\x00\x02")
    empty = tmp_path / "empty"
    empty.mkdir()
    other = tmp_path / "other.safetensors"
    VocabProjection(np.arange(500)).save(other)
    shard = store_path.parent / "broken.zarr"
    build_tables(SMALL, shard, projection=VocabProjection(np.arange(500) % 400))
    store = open_tables(shard)
    layout = store.layout(3)
    key = shard / layout.shard_key(0)
    data = bytearray(key.read_bytes())
    data[100] ^= 0xFF
    key.write_bytes(bytes(data))
    start, stop = layout.shard_range(0)
    demo = str(demo_spec_file)  # the demo spec untied from its tokenizer, for the toy projection
    cases = [
        (
            ["demo", "--projection", str(projection_file), "--corpus", str(ids)],
            "has 400 canonical ids, but spec demo says compressed_vocab_size = 98,627",
        ),
        (
            [demo, "--projection", str(projection_file), "--corpus", str(ids)],
            rf"{ids}: token id 700 at position \[1, 2\] is not below the projection's vocab size 500",
        ),
        ([demo, "--projection", str(projection_file), "--corpus", str(odd)], "not a whole number of uint16"),
        ([demo, "--projection", str(projection_file), "--corpus", str(empty)], "the corpus holds no tokens"),
        ([str(store_path), "--projection", str(other), "--corpus", str(ids)], "does not match"),
        ([demo, "--projection", str(projection_file)], "nothing to inspect"),
        ([demo, "--corpus", str(ids), "--projection", str(projection_file), "--verify"], "needs a table store"),
        ([str(shard), "--verify"], rf"layer 3 rows {start}-{stop - 1} \(shard 0\)"),
    ]
    for args, message in cases:
        proc = run_engram("inspect", *args)
        assert proc.returncode == 1, (args, proc.stderr)
        assert proc.stderr.startswith("engram: error: ") and len(proc.stderr.strip().splitlines()) == 1, proc.stderr
        assert re.search(message, proc.stderr), (message, proc.stderr)


def test_human_report_renders(store_path, projection_file, ids_file):
    path, _ = ids_file
    proc = run_engram(
        "inspect", str(store_path), "--corpus", str(path), "--doc-sep", "0", "--sweep", "1,3", "--top", "1"
    )
    assert proc.returncode == 0, proc.stderr
    for text in (
        "Table health per head",
        "Collisions at the head sizes of",
        "Most crowded buckets",
        "Size sweep",
        "3x",
    ):
        assert text in proc.stderr
    assert proc.stdout == ""
    assert json.loads(run_engram("inspect", str(store_path), "--json").stdout)["layers"] is None


def test_decoder_names_each_canonical_id_by_its_first_raw_id():
    """np.unique's first index, not a repeated fancy-index assignment whose winner NumPy leaves open."""
    from engram_cli.collisions.decoder import NgramDecoder

    rng = np.random.default_rng(3)
    lookup = rng.integers(0, 40, 5000)
    lookup[:40] = np.arange(40)[::-1]  # every canonical id occurs, first at a known place
    decoder = NgramDecoder(VocabProjection(lookup))
    brute = {}
    for raw, canonical in enumerate(lookup.tolist()):
        brute.setdefault(canonical, raw)
    assert [decoder.token(c) for c in range(40)] == [f"#{c}" for c in range(40)]  # no tokenizer: ids
    assert decoder._first.tolist() == [brute[c] for c in range(40)]
