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


@settings(max_examples=6, deadline=None)
@given(st.integers(1, 20_000), st.lists(st.integers(1, 20_000), max_size=3), st.booleans(), st.integers(0, 99))
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
    docs = zipf_docs(40_000, 3000, 7)
    capacity = 1 << 10
    small, _ = growth_of(docs, lookup, [1000, 20_000], minimum_memory_budget(SPEC), capacity)
    large, layers = growth_of(docs, lookup, [], 1 << 30, capacity)
    error = GrowthRecorder.relative_error(capacity)
    for n in SPEC.orders:
        assert small.points[n] == large.points[n]
        want = brute_growth(docs, lookup, SPEC.pad_id, n)
        assert [p.tokens for p in large.points[n]] == [t for t, _ in want]
        for p, (_, d) in zip(large.points[n][:-1], want):
            assert abs(p.distinct - d) <= 4 * error * d + 1, (n, p, d)
        assert large.points[n][-1].distinct == layers[1][n].distinct == want[-1][1]


def brute_rows(distinct: int, rate: float) -> int:
    """The smallest prime head whose ideal rate meets `rate`, by walking the primes from 2."""
    m = 2
    while not (is_prime(m) and 1 - (1 - 1 / m) ** (distinct - 1) <= rate):
        m += 1
    return m


@settings(max_examples=40, deadline=None)
@given(st.integers(2, 3000), st.floats(0.01, 0.9))
def test_head_size_for_a_target_is_the_smallest_prime_meeting_it(distinct, rate):
    """The first head of an order is the smallest prime meeting the rate (a direct search), and
    the all-heads start is the smallest whose walked primes meet the product."""
    start = start_for_target(distinct, rate, 3, "weighted")
    assert walked_heads(start, 3)[0] == brute_rows(distinct, rate)
    assert rows_for_rate(distinct, rate) == start
    start = start_for_target(distinct, rate, 2, "all-heads")
    assert all_heads_rate(walked_heads(start, 2), distinct) <= rate
    if start > 2:
        assert all_heads_rate(walked_heads(start - 1, 2), distinct) > rate


def test_sized_spec_meets_the_target_and_the_budget_spends_its_bytes():
    growth = {
        n: [GrowthPoint(t, int(t ** (0.8 + 0.05 * n))) for t in (4096, 8192, 16384, 32768, 65536)] for n in (2, 3)
    }
    sizing = size_for_target(SPEC, growth, 10**7, 60, 0.05)
    assert sizing.spec.engram_vocab_size != SPEC.engram_vocab_size
    for n, order in sizing.orders.items():
        assert order.head_rows == sizing.spec.head_sizes(1)[(n - 2) * 2 : (n - 1) * 2]
        assert order.weighted_rate <= 0.05
        assert order.prediction.low <= order.prediction.distinct <= order.prediction.high
    budget = size_for_budget(SPEC, growth, 10**7, 60, 10**9)
    spent = budget.spec.parameters * 2
    assert spent <= 10**9 and spent > 0.99 * 10**9
    more = size_for_budget(SPEC, growth, 10**7, 60, 10**10)
    assert sum(o.weighted_rate for o in more.orders.values()) < sum(o.weighted_rate for o in budget.orders.values())


def small_spec() -> TableSpec:
    """The demo spec (its DeepSeek-V3 projection), one layer, orders 2..4."""
    return load_spec("demo").replace(layer_ids=(1,), max_ngram_size=4, engram_vocab_size=(50_000,) * 3)


def held_out_error(spec: TableSpec, corpus: list[str], options: dict, tokens: int) -> dict[int, float]:
    """Fitted on the first tenth, the predicted distinct n-grams of the whole over the measured ones, less 1."""
    from engram_cli.corpus.base import CorpusOptions
    from engram_cli.inspection import inspect
    from engram_cli.sizing import SizingRequest

    whole = inspect(spec, corpus=corpus, options=CorpusOptions(**options, max_tokens=tokens))
    tenth = inspect(
        spec,
        corpus=corpus,
        options=CorpusOptions(**options, max_tokens=tokens // 10),
        sizing=SizingRequest(train_tokens=whole.corpus.tokens),
    )
    return {
        n: tenth.sizing.orders[n].prediction.distinct / whole.layers[spec.layer_ids[0]][n].distinct - 1
        for n in spec.orders
    }


def test_held_out_extrapolation_on_zipf_text(tmp_path):
    """Generated Zipf text (documents of 500 ids): fitted on the first tenth of 1 M tokens, the
    whole's distinct n-grams are predicted within 10 % (measured +1.4 %, -1.1 %, +0.2 %)."""
    ids = np.concatenate([[0, *(np.array(doc) + 1)] for doc in zipf_docs(1_000_000, 50_000, 1)]).astype(np.int64)
    np.save(tmp_path / "zipf.npy", ids)
    errors = held_out_error(small_spec(), [str(tmp_path / "zipf.npy")], {"doc_sep": 0}, 1_000_000)
    assert all(abs(e) <= 0.10 for e in errors.values()), errors


def stdlib_paragraphs(path: Path, chars: int) -> Path:
    """Real text: paragraphs (blank-line separated, at most 2,000 characters) of the standard
    library's .py files, shuffled (a sample of a training run is many documents in no order), as
    JSON lines."""
    import json
    import sysconfig

    paragraphs = []
    for file in sorted(Path(sysconfig.get_paths()["stdlib"]).rglob("*.py")):
        try:
            text = file.read_text(encoding="utf-8")
        except (UnicodeDecodeError, OSError):
            continue
        paragraphs += [p for p in text.split("\n\n") if p.strip() and len(p) <= 2000]
    order = np.random.default_rng(0).permutation(len(paragraphs))
    with open(path, "w", encoding="utf-8") as out:
        total = 0
        for i in order:
            out.write(json.dumps({"text": paragraphs[i]}) + "\n")
            total += len(paragraphs[i])
            if total > chars:
                break
    return path


def test_held_out_extrapolation_on_real_text(tmp_path):
    """Python paragraphs through the DeepSeek-V3 tokenizer, 1 M tokens: fitted on the first
    tenth, the prediction of the whole is within 10 % for orders 3 and 4 and within 20 % for
    bigrams (measured +11.9 %, +7.0 %, +1.2 %; docs/inspect.md)."""
    corpus = stdlib_paragraphs(tmp_path / "stdlib.jsonl", 4_000_000)
    errors = held_out_error(small_spec(), [str(corpus)], {}, 1_000_000)
    assert abs(errors[2]) <= 0.20 and abs(errors[3]) <= 0.10 and abs(errors[4]) <= 0.10, errors


def test_written_spec_round_trips_through_plan_build_and_inspect(tmp_path):
    """`--write-spec` keeps the input spec's lines but the sizes, says where they came from, and is
    a spec `plan`, `build-tables` and `inspect` take; the sized heads measured on the same corpus
    are near the target (the scatter is reported in docs/inspect.md); a second write needs --overwrite."""
    corpus = stdlib_paragraphs(tmp_path / "stdlib.jsonl", 200_000)
    spec = tmp_path / "tiny.toml"
    spec.write_text(
        "# tiny\n[engram]\nlayer_ids = [1]\nmax_ngram_size = 3\nn_head_per_ngram = 2\n"
        'engram_vocab_size = [101, 103]  # rows\nn_embed_per_ngram = 8\npad_id = 2\n\n[table]\ndtype = "bfloat16"\n'
    )
    out = tmp_path / "sized.toml"
    tokens = str(engram_json("inspect", str(spec), "--corpus", str(corpus))["corpus"]["tokens"])
    args = ["inspect", str(spec), "--corpus", str(corpus), "--train-tokens"]
    report = engram_json(*args, tokens, "--target-rate", "5%", "--write-spec", str(out))
    sizing = report["sizing"]
    assert report["projection"]["tokenizer"] and report["projection"]["compressed_size"] > 0
    assert [p["tokens"] for p in report["growth"]["2"]][:2] == [4096, 5793]
    assert report["growth"]["2"][-1]["distinct"] == report["layers"]["1"]["orders"]["2"]["distinct"]
    written = out.read_text()
    assert written.startswith("# Written by `engram inspect`") and "# rows" in written and "# tiny" in written
    raw = tomllib.loads(written)
    assert raw["engram"]["engram_vocab_size"] == sizing["engram_vocab_size"]
    for n in ("2", "3"):
        assert sizing["orders"][n]["head_rows"][0] >= sizing["engram_vocab_size"][int(n) - 2]
        lo, hi = sizing["orders"][n]["predicted_range"]
        assert lo <= sizing["orders"][n]["predicted_distinct"] <= hi
    plan = engram_json("plan", str(out))
    assert plan["total"]["rows"] == sizing["tables"]["rows"]
    run_engram("build-tables", str(out), "-o", str(tmp_path / "t.zarr"), check=True)
    again = engram_json("inspect", str(out), "--corpus", str(corpus), "--train-tokens", tokens)
    for n in ("2", "3"):
        measured = again["layers"]["1"]["orders"][n]
        assert again["sizing"]["orders"][n]["predicted_distinct"] == measured["distinct"]  # the last point
        assert measured["expected_rate"] <= 0.05
        for head in measured["heads"]:  # one head's weighted rate scatters around the expectation
            assert abs(head["weighted_rate"] - 0.05) <= 0.03, (n, head["weighted_rate"])
    refused = run_engram(*args, tokens, "--target-rate", "5%", "--write-spec", str(out))
    assert refused.returncode == 1 and "--overwrite" in refused.stderr
    assert run_engram(*args, tokens, "--target-rate", "5%", "--write-spec", str(out), "--overwrite").returncode == 0


@pytest.mark.parametrize(
    ("options", "message"),
    [
        (["--train-tokens", "1M", "--target-rate", "0"], "--target-rate must be between 0 and 1"),
        (["--train-tokens", "1M", "--target-rate", "1.5"], "--target-rate must be between 0 and 1"),
        (["--train-tokens", "-1"], "--train-tokens takes a positive number of tokens"),
        (["--train-tokens", "1M", "--target", "some"], "Invalid value for '--target'"),  # a usage error: exit 2
        (["--target-rate", "5%"], "need --train-tokens"),
        (["--train-tokens", "1M", "--max-table-bytes", "1KB"], "below the smallest tables"),
        (["--train-tokens", "1M", "--max-table-bytes", "lots"], "--max-table-bytes takes a positive size"),
    ],
)
def test_bad_sizing_values_are_one_line_errors(tmp_path, options, message):
    corpus = tmp_path / "a.txt"
    corpus.write_text("def f(x):\n    return x + 1\n" * 50)
    proc = run_engram("inspect", "demo", "--corpus", str(corpus), *options)
    assert proc.returncode == (2 if "--target" in options else 1), proc.stderr
    assert proc.stderr.startswith("engram: error:") and message in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1


def test_parsers_take_the_written_forms():
    from engram_cli.cli.quantities import parse_bytes, parse_count, parse_rate

    assert parse_count("2e12") == parse_count("2T") == 2 * 10**12
    assert parse_count("500B") == 5 * 10**11
    assert parse_rate("5%") == pytest.approx(0.05) and parse_rate("0.05") == 0.05
    assert parse_bytes("200GB") == 2 * 10**11 and parse_bytes("1GiB") == 1 << 30
    assert math.isclose(parse_rate("12.5%"), 0.125)


def test_sizing_plot_labels_never_overlap(tmp_path):
    """The sizing figure: every order's curves at the run and the sample, the all-heads rate, the
    target and the sized heads, named in a legend that covers neither the axes nor the title, whose
    "heads" agree with the title's."""
    from engram_cli.cli.plot import sizing_figure
    from engram_cli.corpus.base import CorpusOptions
    from engram_cli.inspection import inspect
    from engram_cli.sizing import SizingRequest
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    ids = np.concatenate([[0, *(np.array(doc) + 1)] for doc in zipf_docs(30_000, 5_000, 3)]).astype(np.int64)
    np.save(tmp_path / "ids.npy", ids)
    spec = small_spec()
    report = inspect(
        spec,
        corpus=[str(tmp_path / "ids.npy")],
        options=CorpusOptions(doc_sep=0),
        sizing=SizingRequest(train_tokens=10**9, target_rate=0.05),
    )
    fig = sizing_figure(report)
    canvas = FigureCanvasAgg(fig)
    canvas.draw()
    renderer = canvas.get_renderer()
    ax = fig.axes[0]
    legend = ax.get_legend()
    box = legend.get_window_extent(renderer)
    assert not box.overlaps(ax.get_window_extent(renderer))
    assert not box.overlaps(ax.title.get_window_extent(renderer))
    texts = [t.get_text() for t in legend.get_texts()]
    assert len(texts) == 4 * len(spec.orders) + 1 and any(t.startswith("target 5.00%") for t in texts)
    assert f"{spec.n_head_per_ngram} heads per order" in ax.get_title()
    assert all(f"all {spec.n_head_per_ngram} heads" in t for t in texts if "all" in t)


def test_spec_text_without_a_source_file_reads_back_as_the_sized_spec():
    """A store's spec has no file to keep: its fields are written out, and read back the same."""
    from engram_cli.sizing import spec_text
    from engram_cli.spec import spec_from_dict

    spec = load_spec("engram-27b").replace(engram_vocab_size=(7, 11))
    text = spec_text(spec, None, "sized\nfor a test")
    assert text.startswith("# sized\n# for a test\n")
    assert spec_from_dict(tomllib.loads(text), name=spec.name) == spec
    source = text.replace("engram_vocab_size = [7, 11]", "engram_vocab_size = [\n  1,\n  2,\n]  # kept")
    kept = spec_text(spec, source, "c")
    assert "engram_vocab_size = [7, 11]  # kept" in kept
