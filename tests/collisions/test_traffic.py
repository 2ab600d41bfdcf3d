"""Row traffic against a brute force written here: every window hashed by `NgramHasher.rows`, rows
counted and sorted, an LRU simulated with an ordered dict; budgets, spills, a LocalCluster, SHARDS
sampling, the hot-rows file, the CLI."""

from __future__ import annotations

import math
from collections import Counter, OrderedDict
from pathlib import Path

import numpy as np
import pytest
from engram_cli.collisions.budget import minimum_memory_budget
from engram_cli.corpus.base import CorpusOptions
from engram_cli.errors import FormatError
from engram_cli.hashing import NgramHasher
from engram_cli.hot_rows import read_hot_rows, spec_fingerprint
from engram_cli.inspection import inspect
from engram_cli.spec import TableSpec
from engram_cli.traffic.lru import MIN_TRACKED, SAMPLE_MODULUS, LruCurve, sample_threshold
from engram_cli.traffic.statistics import COVERAGE_FRACTIONS, TrafficOptions, row_bytes
from engram_cli.vocab import VocabProjection
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from conftest import engram_json, run_engram

SMALL = TableSpec(
    layer_ids=(1, 3),
    max_ngram_size=3,
    n_head_per_ngram=2,
    engram_vocab_size=(300, 200),
    n_embed_per_ngram=16,
    pad_id=2,
    seed=4,
    dtype="bfloat16",
)

ROW = 16  # bytes of a SMALL row in bfloat16 (8 values)

CACHE_SIZES = (ROW, 10 * ROW, 100 * ROW, 1000 * ROW)


def lookup_streams(docs: list[list[int]], spec: TableSpec, projection: VocabProjection, barrier_ids=None) -> dict:
    """Every layer's lookups in corpus order: `NgramHasher.rows` of each document, token by token."""
    hasher = NgramHasher(spec, projection)
    streams: dict[int, list[int]] = {layer: [] for layer in spec.layer_ids}
    for doc in docs:
        if not doc:
            continue
        rows = hasher.rows(np.array(doc, np.int64), barrier_ids=barrier_ids)
        for layer, r in rows.items():
            streams[layer].extend(np.asarray(r).reshape(-1).tolist())
    return streams


def lru_hits(stream: list[int], capacity: int) -> int:
    cache: OrderedDict[int, None] = OrderedDict()
    hits = 0
    for row in stream:
        if row in cache:
            hits += 1
            cache.move_to_end(row)
        else:
            cache[row] = None
            if len(cache) > capacity:
                cache.popitem(last=False)
    return hits if capacity else 0


def brute_traffic(streams: dict, cache_rows: list[int]) -> dict:
    out = {}
    for layer, stream in streams.items():
        counts = Counter(stream)
        ranked = sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))
        values = [c for _, c in ranked]
        total = len(stream)
        cumulative = np.cumsum(values)
        coverage = [int(np.searchsorted(cumulative, f * total - 1e-9, side="left")) + 1 for f in COVERAGE_FRACTIONS]
        out[layer] = {
            "lookups": total,
            "rows_read": len(counts),
            "coverage": coverage,
            "static": [sum(values[:k]) / total for k in cache_rows],
            "lru": [lru_hits(stream, k) / total for k in cache_rows],
            "ranked": ranked,
        }
    return out


def write_ids(path: Path, docs: list[list[int]]) -> Path:
    np.array([v for d in docs for v in [*d, 0]], np.uint16).tofile(path)
    return path


def zipf_docs(seed: int, tokens: int, vocab: int = 400) -> list[list[int]]:
    rng = np.random.default_rng(seed)
    ids = (rng.zipf(1.2, tokens) % (vocab - 3) + 3).tolist()
    cuts = sorted(rng.choice(np.arange(1, tokens), size=max(1, tokens // 300), replace=False).tolist())
    return [ids[a:b] for a, b in zip([0, *cuts], [*cuts, tokens]) if b > a]


@pytest.fixture(scope="module")
def projection() -> VocabProjection:
    rng = np.random.default_rng(8)
    return VocabProjection(rng.permutation(np.concatenate([np.arange(400), rng.integers(0, 400, 100)])))


@pytest.fixture(scope="module")
def corpus(tmp_path_factory, projection):
    docs = zipf_docs(1, 6000)
    path = write_ids(tmp_path_factory.mktemp("traffic") / "docs.bin", docs)
    return path, docs, brute_traffic(lookup_streams(docs, SMALL, projection), [s // ROW for s in CACHE_SIZES])


def check(report, expected, exact_lru: bool = True) -> None:
    assert report is not None
    for layer, want in expected.items():
        got = report.layers[layer]
        assert got.lookups == want["lookups"] and got.rows_read == want["rows_read"]
        assert [c["rows"] for c in got.coverage] == want["coverage"]
        sizes = row_bytes(SMALL)
        for c in got.coverage:
            assert c["bytes"] == {name: c["rows"] * b for name, b in sizes.items()}
        assert [c["static_hit_rate"] for c in got.cache] == pytest.approx(want["static"], abs=1e-12)
        if exact_lru:
            assert [c["lru_hit_rate"] for c in got.cache] == pytest.approx(want["lru"], abs=1e-12)


@pytest.mark.parametrize("budget", ["plenty", "smallest"])
def test_traffic_matches_brute_force_across_budgets(corpus, projection, budget):
    """Every figure equals the brute force's, with the counts in memory and spilled (the smallest
    budget: counts and row counters in passes; its LRU would sample, so the rate is set to 1)."""
    path, _, expected = corpus
    memory = None if budget == "plenty" else minimum_memory_budget(SMALL) + (64 << 10)
    report = inspect(
        SMALL,
        projection=projection,
        corpus=[path],
        options=CorpusOptions(doc_sep=0),
        memory_budget=memory,
        traffic=TrafficOptions(cache_sizes=CACHE_SIZES, hot_rows=True, sample_rate=None if budget == "plenty" else 1.0),
    )
    assert report.traffic is not None
    check(report.traffic, expected)
    if budget == "smallest":
        assert report.spilled_bytes > 0
    hot = report.traffic.hot
    assert hot is not None
    for layer, want in expected.items():
        assert hot.rows[layer].tolist() == [r for r, _ in want["ranked"]]
        assert hot.lookups[layer].tolist() == [c for _, c in want["ranked"]]
        assert report.traffic.to_json()["layers"][str(layer)]["lookups"] == want["lookups"]


def test_sampling_rate_follows_the_memory(corpus, projection):
    """The rate tracks what fits (every row when all fit, never fewer than MIN_TRACKED rows); a
    sampled run through `inspect` stays close to the exact hit rates on this small corpus."""
    assert sample_threshold(1000, 1 << 20) == SAMPLE_MODULUS
    assert sample_threshold(10**8, 96 * 10**6) == 10**6 * SAMPLE_MODULUS // 10**8
    assert sample_threshold(10**8, 0) == MIN_TRACKED * SAMPLE_MODULUS // 10**8
    path, _, expected = corpus
    report = inspect(
        SMALL,
        projection=projection,
        corpus=[path],
        options=CorpusOptions(doc_sep=0),
        traffic=TrafficOptions(cache_sizes=CACHE_SIZES, sample_rate=0.5),
    )
    assert report.traffic is not None
    check(report.traffic, expected, exact_lru=False)
    for layer, want in expected.items():
        got = report.traffic.layers[layer]
        assert got.lru_sample_rate == 0.5
        assert max(abs(c["lru_hit_rate"] - w) for c, w in zip(got.cache, want["lru"])) <= 0.05


def test_barriers_pad_as_the_hasher_does(tmp_path, projection):
    """Barrier tokens read their padded rows, as `NgramHasher.rows` hashes them."""
    docs = zipf_docs(3, 3000)
    path = write_ids(tmp_path / "b.bin", docs)
    barrier = [docs[0][0], 5]
    expected = brute_traffic(lookup_streams(docs, SMALL, projection, barrier), [s // ROW for s in CACHE_SIZES])
    report = inspect(
        SMALL,
        projection=projection,
        corpus=[path],
        options=CorpusOptions(doc_sep=0),
        barrier_ids=barrier,
        traffic=TrafficOptions(cache_sizes=CACHE_SIZES),
    )
    check(report.traffic, expected)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    st.lists(st.integers(0, 60), min_size=1, max_size=400),
    st.lists(st.integers(1, 70), min_size=1, max_size=4),
)
def test_lru_curve_is_an_lru(stream, sizes):
    """Reuse distances give an ordered dict's hits at every size, through time compaction (the
    tracker is sized for 61 rows: its times wrap many times over 400 lookups)."""
    curve = LruCurve(sizes, 61)
    for a in range(0, len(stream), 37):
        curve.feed(np.array(stream[a : a + 37], np.int64))
    assert curve.hits.tolist() == [lru_hits(stream, k) for k in sizes]
    assert curve.rate == 1


def test_sampled_lru_is_within_two_points(corpus, projection):
    """SHARDS at a 10 % rate, against the exact simulation, on a Zipfian stream of 200 k lookups
    per layer: at most 0.02 off at every size."""
    docs = zipf_docs(5, 50_000, vocab=4000)
    big = TableSpec(
        layer_ids=(1,),
        max_ngram_size=2,
        n_head_per_ngram=4,
        engram_vocab_size=(5000,),
        n_embed_per_ngram=32,
        pad_id=2,
        seed=1,
    )
    proj = VocabProjection(np.arange(4000) % 3000)
    stream = np.array(lookup_streams(docs, big, proj)[1], np.int64)
    sizes = [100, 1000, 5000, 10000]
    exact = LruCurve(sizes, big.rows(1))
    sampled = LruCurve(sizes, big.rows(1), SAMPLE_MODULUS // 10)
    exact.feed(stream)
    sampled.feed(stream)
    assert sampled.rate == pytest.approx(0.1, rel=1e-6)
    errors = np.abs(np.array(exact.hit_rates()) - np.array(sampled.hit_rates()))
    assert errors.max() <= 0.02, errors


def test_hot_rows_file_cut_order_and_ties(tmp_path, corpus, projection):
    """`--hot-rows` with `--hot-bytes`: the first rows of the brute force's ranking (most looked-up
    first, ties by row id), cut at the bytes given; metadata as documented; the CLI's JSON too."""
    path, docs, expected = corpus
    out = tmp_path / "hot.safetensors"
    spec_file = tmp_path / "small.toml"
    spec_file.write_text(
        "[engram]\nlayer_ids = [1, 3]\nmax_ngram_size = 3\nn_head_per_ngram = 2\nengram_vocab_size = [300, 200]\n"
        'n_embed_per_ngram = 16\npad_id = 2\nseed = 4\n\n[table]\ndtype = "bfloat16"\n'
    )
    proj_file = tmp_path / "p.safetensors"
    projection.save(proj_file)
    result = engram_json(
        "inspect", str(spec_file), "--projection", str(proj_file), "--corpus", str(path), "--doc-sep", "0",
        "--traffic", "--cache-sizes", "16,160B,1600", "--hot-rows", str(out), "--hot-bytes", f"{37 * ROW + 5}",
    )  # fmt: skip
    layers = result["traffic"]["layers"]
    assert set(layers) == {"1", "3"} and result["traffic"]["hot_rows"] == str(out)
    assert [c["bytes"] for c in layers["1"]["cache"]] == [16, 160, 1600]
    hot = read_hot_rows(out)
    assert hot.corpus_tokens == sum(len(d) for d in docs)
    assert hot.projection_fingerprint == projection.fingerprint()
    assert hot.spec_fingerprint == spec_fingerprint(SMALL)
    for layer, want in expected.items():
        assert hot.rows[layer].tolist() == [r for r, _ in want["ranked"][:37]]
        assert hot.lookups[layer].tolist() == [c for _, c in want["ranked"][:37]]
        assert hot.total_lookups[layer] == want["lookups"] == layers[str(layer)]["lookups"]
        ties = [c for _, c in want["ranked"][:37]]
        assert len(set(ties)) < len(ties)  # the cut crosses rows of equal counts: ties were ordered


def test_damaged_hot_rows_file_is_one_line(tmp_path, corpus, projection):
    path, _, _ = corpus
    report = inspect(
        SMALL,
        projection=projection,
        corpus=[path],
        options=CorpusOptions(doc_sep=0),
        traffic=TrafficOptions(cache_sizes=CACHE_SIZES, hot_rows=True, hot_bytes=20 * ROW),
    )
    assert report.traffic is not None and report.traffic.hot is not None
    good = tmp_path / "hot.safetensors"
    report.traffic.hot.write(good)
    assert read_hot_rows(good).rows[1].size == 20
    data = good.read_bytes()
    (tmp_path / "cut.safetensors").write_bytes(data[: len(data) - 9])
    with pytest.raises(FormatError, match="not a readable safetensors"):
        read_hot_rows(tmp_path / "cut.safetensors")
    swapped = report.traffic.hot
    swapped.rows[1] = swapped.rows[1][::-1].copy()
    swapped.write(tmp_path / "order.safetensors")
    with pytest.raises(FormatError, match="hotness order"):
        read_hot_rows(tmp_path / "order.safetensors")


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--traffic", "--cache-sizes", "0"], "--cache-sizes: size must be positive"),
        (["--traffic", "--hot-rows", "h.safetensors", "--hot-bytes", "-1"], "--hot-bytes: cannot read size"),
        (["--cache-sizes", "1GiB"], "add --traffic"),
        (["--traffic", "--hot-bytes", "1MiB"], "add --hot-rows"),
    ],
)
def test_bad_traffic_options_are_one_line(tmp_path, corpus, args, message):
    path, _, _ = corpus
    proc = run_engram("inspect", "demo", "--corpus", str(path), "--doc-sep", "0", *args, cwd=tmp_path)
    assert proc.returncode != 0
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("engram: error:") and message in lines[0], proc.stderr


def test_cluster_gives_the_local_numbers(corpus, projection):
    """On a LocalCluster the row counts come from the merged n-grams and the LRU replays the
    corpus in order on the client: the brute force's numbers, exactly."""
    from distributed import Client, LocalCluster

    path, _, expected = corpus
    with (
        LocalCluster(n_workers=2, threads_per_worker=1, processes=True, dashboard_address=None) as cluster,
        Client(cluster) as client,
    ):
        report = inspect(
            SMALL,
            projection=projection,
            corpus=[path],
            options=CorpusOptions(doc_sep=0),
            client=client,
            part_ids=2000,
            traffic=TrafficOptions(cache_sizes=CACHE_SIZES),
        )
    check(report.traffic, expected)
    assert not math.isnan(report.seconds)
