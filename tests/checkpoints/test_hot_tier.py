"""The hot tier of an inference export: written from a hotness file, read by EngramTables."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from engram_cli.checkpoints.hot_tier import TIER_FILE, tier_key
from engram_cli.checkpoints.importing import import_checkpoint
from engram_cli.checkpoints.safetensors_export import export_inference
from engram_cli.checkpoints.safetensors_format import INDEX_NAME
from engram_cli.checkpoints.tables import EngramTables
from engram_cli.hot_rows import HotRows, spec_fingerprint
from engram_cli.spec import TableSpec
from engram_cli.store.build import build_tables
from engram_cli.store.tables import open_tables
from engram_cli.vocab import VocabProjection, compress_vocab
from hypothesis import given, settings
from hypothesis import strategies as st
from safetensors import safe_open

from conftest import make_byte_level_tokenizer, make_tiny_spec, run_engram


@pytest.fixture(scope="module")
def projection() -> VocabProjection:
    pieces = [chr(c) for c in range(ord("a"), ord("z") + 1)] + ["Hello", "hello", " world", "World"]
    return compress_vocab(make_byte_level_tokenizer(pieces, special=["<s>", "<pad>"]))


@pytest.fixture(scope="module")
def store(tmp_path_factory, projection) -> Path:
    path = tmp_path_factory.mktemp("store") / "tables"
    build_tables(make_tiny_spec(), path, projection=projection, shards=2)
    return path


def corpus(projection: VocabProjection, seed: int = 3) -> np.ndarray:
    """Token ids with a skew (a few ids far more often), so that some rows are hot."""
    rng = np.random.default_rng(seed)
    return (rng.zipf(1.6, (16, 64)) % projection.vocab_size).astype(np.int64)


def hot_rows_of(store_path: Path, ids: np.ndarray, spec: TableSpec | None = None) -> HotRows:
    """The hotness file of `ids`, counted here by brute force: every row the hasher gives, counted,
    most counted first, ties by row id."""
    tables = open_tables(store_path)
    rows = tables.hasher().rows(ids)
    spec = spec or tables.spec
    hot, lookups, totals = {}, {}, {}
    for layer, r in rows.items():
        counts = np.bincount(np.asarray(r).reshape(-1), minlength=tables.spec.rows(layer))
        read = np.flatnonzero(counts)
        order = np.lexsort((read, -counts[read]))
        hot[layer], lookups[layer] = read[order].astype(np.int64), counts[read][order].astype(np.int64)
        totals[layer] = int(counts.sum())
    return HotRows(
        spec_name=spec.name,
        spec_fingerprint=spec_fingerprint(spec),
        projection_fingerprint=tables.projection.fingerprint(),
        corpus_tokens=int(ids.size),
        rows=hot,
        lookups=lookups,
        total_lookups=totals,
        row_bytes={layer: tables.spec.dim * 2 for layer in rows},
    )


@pytest.fixture(scope="module")
def hot_file(tmp_path_factory, store, projection) -> Path:
    path = tmp_path_factory.mktemp("hot") / "hot.safetensors"
    hot_rows_of(store, corpus(projection)).write(path)
    return path


@pytest.fixture(scope="module")
def exports(tmp_path_factory, store, hot_file) -> dict[str, tuple[Path, Path]]:
    """Per layout, an export without a tier and one with a tier of 40 rows a layer."""
    root = tmp_path_factory.mktemp("exports")
    made = {}
    for layout, row_bytes in (("engram", 2 * make_tiny_spec().dim), ("deepseek-v41", make_tiny_spec().dim * 33 // 32)):
        plain, tiered = root / f"{layout}-plain", root / f"{layout}-tier"
        export_inference(store, plain, layout=layout)  # type: ignore[arg-type]
        export_inference(store, tiered, layout=layout, hot_rows=hot_file, hot_bytes=40 * row_bytes)  # type: ignore[arg-type]
        made[layout] = (plain, tiered)
    return made


def opened(path: Path, store: Path) -> EngramTables:
    tables = open_tables(store)
    return EngramTables.open(path, spec=tables.spec, projection=tables.projection)


@pytest.mark.parametrize("layout", ["engram", "deepseek-v41"])
def test_the_tier_holds_the_hot_rows_in_the_files_order(exports, store, hot_file, layout, tmp_path):
    plain, tiered = exports[layout]
    tier_path = tiered / TIER_FILE if layout == "deepseek-v41" else tiered / "model.safetensors"
    hot = hot_rows_of(store, corpus(open_tables(store).projection))
    with safe_open(str(tier_path), framework="pt") as handle:
        for layer in (1, 3):
            rows = handle.get_tensor(tier_key(layer, "rows")).numpy()
            assert np.array_equal(rows, hot.rows[layer][:40])
            slots = handle.get_tensor(tier_key(layer, "slots")).numpy()
            assert np.array_equal(rows[slots], np.sort(rows))
    tables = opened(tiered, store)
    assert tables.hot_tier == {1: 40, 3: 40}
    assert opened(plain, store).hot_tier == {}
    if layout == "engram":  # readers that know nothing of the tier read the complete tables
        import_checkpoint(tiered, tmp_path / "back")
        back, original = open_tables(tmp_path / "back"), open_tables(store)
        assert np.array_equal(back.read_rows(1, 0, 500).view(np.uint16), original.read_rows(1, 0, 500).view(np.uint16))
    if layout == "deepseek-v41":
        # engines load the files the index lists: the tier is not among them, nor is any tier name
        index = json.loads((tiered / INDEX_NAME).read_text())
        assert TIER_FILE not in set(index["weight_map"].values())
        assert not any(name.startswith("engram_hot_tier.") for name in index["weight_map"])


@pytest.mark.parametrize("layout", ["engram", "deepseek-v41"])
@settings(max_examples=25, deadline=None)
@given(ids=st.lists(st.integers(0, 29), min_size=1, max_size=40), batch=st.integers(1, 3))
def test_tiered_lookups_equal_untiered_ones_and_traffic_counts(exports, store, layout, ids, batch):
    plain, tiered = exports[layout]
    without, with_tier = opened(plain, store), opened(tiered, store)
    tokens = torch.tensor([ids] * batch)
    want, got = without.lookup(tokens), with_tier.lookup(tokens)
    rows = open_tables(store).hasher().rows(tokens.numpy())
    for layer in (1, 3):
        assert got[layer].dtype == want[layer].dtype
        assert torch.equal(got[layer], want[layer])
    # brute force: a row is a hit when the hotness file's first 40 rows of its layer list it
    hot = hot_rows_of(store, corpus(open_tables(store).projection))
    expected = {}
    for layer in (1, 3):
        flat = np.asarray(rows[layer]).reshape(-1)
        hits = int(np.isin(flat, hot.rows[layer][:40]).sum())
        expected[layer] = {"hits": hits, "misses": flat.size - hits}
    traffic = with_tier.traffic()
    assert traffic.layers == expected
    assert traffic.hits == sum(c["hits"] for c in expected.values())
    assert traffic.misses == sum(c["misses"] for c in expected.values())
    assert without.traffic().hits == 0 and without.traffic().misses == traffic.hits + traffic.misses


def test_hot_bytes_cuts_the_tier_and_reports_it(tmp_path, store, hot_file):
    report = export_inference(store, tmp_path / "out", dtype="float32", hot_rows=hot_file, hot_bytes="2KiB")
    dim = make_tiny_spec().dim
    assert report.hot_tier == {
        layer: {"rows": 2048 // (4 * dim), "bytes": 2048 // (4 * dim) * 4 * dim} for layer in (1, 3)
    }
    assert "hot_tier" not in export_inference(store, tmp_path / "plain").to_json()
    everything = export_inference(store, tmp_path / "all", hot_rows=hot_file).hot_tier
    hot = hot_rows_of(store, corpus(open_tables(store).projection))
    assert everything == {
        layer: {"rows": hot.rows[layer].size, "bytes": hot.rows[layer].size * 2 * dim} for layer in (1, 3)
    }


def one_line_error(*args: str) -> str:
    result = run_engram(*args)
    assert result.returncode != 0
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("engram: error: "), result.stderr
    return lines[0]


def test_bad_input_is_one_line(tmp_path, store, hot_file, projection):
    out = str(tmp_path / "out")
    base = ("export", str(store), "--for", "inference", "-o", out)
    assert "--hot-bytes" in one_line_error(*base, "--hot-rows", str(hot_file), "--hot-bytes", "-1")
    assert "--hot-bytes" in one_line_error(*base, "--hot-rows", str(hot_file), "--hot-bytes", "0")
    assert "holds no row" in one_line_error(*base, "--hot-rows", str(hot_file), "--hot-bytes", "10")
    assert "add --hot-rows" in one_line_error(*base, "--hot-bytes", "1MiB")
    assert "--for inference" in one_line_error(
        "export", str(store), "--for", "training", "-o", out, "--hot-rows", str(hot_file)
    )
    assert "--for inference" in one_line_error(*base, "--layout", "gguf", "--hot-rows", str(hot_file))
    # a hotness file of another spec, and of another projection
    other_spec = tmp_path / "other-spec.safetensors"
    hot_rows_of(store, corpus(projection), spec=make_tiny_spec(seed=12)).write(other_spec)
    assert "spec" in one_line_error(*base, "--hot-rows", str(other_spec))
    other_projection = tmp_path / "other-projection.safetensors"
    moved = hot_rows_of(store, corpus(projection))
    moved.projection_fingerprint = "0" * 64
    moved.write(other_projection)
    assert "projection" in one_line_error(*base, "--hot-rows", str(other_projection))
    # a damaged file: cut short, and rows out of hotness order
    damaged = tmp_path / "damaged.safetensors"
    damaged.write_bytes(hot_file.read_bytes()[:-40])
    one_line_error(*base, "--hot-rows", str(damaged))
    reordered = hot_rows_of(store, corpus(projection))
    reordered.rows[1] = reordered.rows[1][::-1].copy()
    reordered.write(damaged)
    assert "hotness order" in one_line_error(*base, "--hot-rows", str(damaged))
    assert not Path(out).exists()


@pytest.mark.parametrize("layout", ["engram", "deepseek-v41"])
def test_a_large_gather_split_between_threads_equals_the_untiered_one(exports, store, layout):
    plain, tiered = exports[layout]
    without, with_tier = opened(plain, store), opened(tiered, store)
    rows = torch.from_numpy(np.random.default_rng(5).integers(0, without.rows(3), 3 * (1 << 20) // without.dim))
    hot = hot_rows_of(store, corpus(open_tables(store).projection)).rows[3][:40]
    rows[::7] = torch.from_numpy(hot[np.arange(rows[::7].numel()) % hot.size])  # many hits
    assert torch.equal(with_tier.gather(3, rows), without.gather(3, rows))
    assert with_tier.traffic().hits == int(np.isin(rows.numpy(), hot).sum())
