"""Sizing answers: growth of distinct n-grams, extrapolation, head sizes for a target or a budget,
the written spec, and the CLI's refusals of bad values."""

from __future__ import annotations

import math
import tomllib
from pathlib import Path

import numpy as np
import pytest
from engram_cli.collisions.budget import minimum_memory_budget
from engram_cli.collisions.growth import GrowthPoint, GrowthRecorder, checkpoint
from engram_cli.collisions.options import CountOptions
from engram_cli.collisions.statistics import collision_statistics
from engram_cli.primes import is_prime
from engram_cli.sizing import (
    all_heads_rate,
    predict,
    rows_for_rate,
    size_for_budget,
    size_for_target,
    start_for_target,
    walked_heads,
)
from engram_cli.spec import TableSpec, load_spec
from engram_cli.vocab import VocabProjection
from hypothesis import given, settings
from hypothesis import strategies as st
from test_statistics import as_batches

from conftest import engram_json, run_engram

SPEC = TableSpec(
    layer_ids=(1, 4),
    max_ngram_size=3,
    n_head_per_ngram=2,
    engram_vocab_size=(101, 211),
    n_embed_per_ngram=8,
    pad_id=0,
    seed=3,
)


def zipf_docs(tokens: int, vocab: int, seed: int, length: int = 500) -> list[list[int]]:
    """Documents of Zipf-distributed ids (exponent 1.1) below `vocab`."""
    rng = np.random.default_rng(seed)
    weights = 1.0 / np.arange(1, vocab + 1) ** 1.1
    ids = rng.choice(vocab, size=tokens, p=weights / weights.sum())
    return [[int(v) for v in ids[i : i + length]] for i in range(0, tokens, length)]


def brute_growth(docs: list[list[int]], lookup: np.ndarray, pad_id: int, order: int) -> list[tuple[int, int]]:
    """Distinct windows among the first N tokens, at every checkpoint and the end, in Python sets."""
    pad = int(lookup[pad_id])
    seen: set[tuple[int, ...]] = set()
    points = []
    tokens = 0
    k = 0
    for doc in docs:
        x = [pad] * (order - 1) + [int(lookup[v]) for v in doc]
        for t in range(order - 1, len(x)):
            seen.add(tuple(x[t - order + 1 : t + 1]))
            tokens += 1
            if tokens == checkpoint(k):
                points.append((tokens, len(seen)))
                k += 1
    if not points or points[-1][0] != tokens:
        points.append((tokens, len(seen)))
    return points


def growth_of(docs, lookup, cuts, budget, capacity=1 << 18):
    recorder = GrowthRecorder(capacity)
    batches = as_batches(docs, cuts, SPEC.max_ngram_size - 1)
    layers, _, _ = collision_statistics(
        SPEC, VocabProjection(lookup), batches, counting=CountOptions(memory_budget=budget, growth=recorder)
    )
    return recorder, layers


@settings(max_examples=15, deadline=None)
@given(st.integers(1, 40_000), st.lists(st.integers(1, 40_000), max_size=4), st.booleans(), st.integers(0, 99))
def test_growth_is_exact_and_the_same_at_any_budget(tokens, cuts, smallest, seed):
    """Below the sample's capacity every point is the brute force's distinct count, whatever the
    batches and the memory budget (the smallest spills runs)."""
    lookup = np.arange(60, dtype=np.int64) % 50
    docs = zipf_docs(tokens, 60, seed, length=300)
    budget = minimum_memory_budget(SPEC) if smallest else 1 << 30
    recorder, layers = growth_of(docs, lookup, cuts, budget)
    for n in SPEC.orders:
        got = [(p.tokens, p.distinct) for p in recorder.points[n]]
        assert got == brute_growth(docs, lookup, SPEC.pad_id, n)
        assert got[-1][1] == layers[1][n].distinct


def test_sampled_growth_is_within_its_error_and_budget_free():
    """Past the capacity the points are estimates within 4 standard errors of the brute force, and
    the same numbers at any memory budget or batching (the level depends on the n-grams seen only)."""
    lookup = np.arange(3000, dtype=np.int64)
    docs = zipf_docs(120_000, 3000, 7)
    capacity = 1 << 12
    small, _ = growth_of(docs, lookup, [1000, 50_000], minimum_memory_budget(SPEC), capacity)
    large, layers = growth_of(docs, lookup, [], 1 << 30, capacity)
    error = GrowthRecorder.relative_error(capacity)
    for n in SPEC.orders:
        assert small.points[n] == large.points[n]
        want = brute_growth(docs, lookup, SPEC.pad_id, n)
        assert [p.tokens for p in large.points[n]] == [t for t, _ in want]
        for p, (_, d) in zip(large.points[n][:-1], want):
            assert abs(p.distinct - d) <= 4 * error * d + 1, (n, p, d)
        assert large.points[n][-1].distinct == layers[1][n].distinct == want[-1][1]
