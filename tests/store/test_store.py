"""Table stores on disk: layout, determinism, zarr/tensorstore interop, faults and resume."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import ml_dtypes
import numpy as np
import pytest
import zarr
from engram_cli.errors import EngramError, UsageError
from engram_cli.hashing import NgramHasher
from engram_cli.init import generate_rows
from engram_cli.spec import load_spec
from engram_cli.store.build import build_shard, build_tables
from engram_cli.store.create import create_store
from engram_cli.store.layout import CHUNK_BYTES, SHARD_BYTES, plan_layout
from engram_cli.store.tables import open_tables
from engram_cli.vocab import VocabProjection, load_projection
from hypothesis import given, settings
from hypothesis import strategies as st

from conftest import ROOT, run_engram

SPEC = load_spec("demo").replace(tokenizer=None, compressed_vocab_size=None)


@pytest.fixture(scope="module")
def projection() -> VocabProjection:
    rng = np.random.default_rng(5)
    lookup = rng.permutation(np.concatenate([np.arange(700), rng.integers(0, 700, 300)]))  # onto 0..699
    return VocabProjection(lookup, {"made_by": "test_store"}, b'{"fake": 1}')


@pytest.fixture(scope="module")
def demo_store(tmp_path_factory, projection) -> Path:
    path = tmp_path_factory.mktemp("stores") / "demo.zarr"
    build_tables(SPEC, path, projection=projection, shards=3)
    return path


def tree_bytes(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def table_bytes(path: Path) -> dict[int, bytes]:
    store = open_tables(path)
    return {layer: np.asarray(store.table(layer)[:]).tobytes() for layer in store.layer_ids}


def write_spec(path: Path, rows_per_head: int, dim: int, dtype: str = "bfloat16", seed: int = 0) -> Path:
    path.write_text(f"""
[engram]
layer_ids = [1, 4]
max_ngram_size = 3
n_head_per_ngram = 2
engram_vocab_size = [{rows_per_head}, {rows_per_head}]
n_embed_per_ngram = {2 * dim}
pad_id = 2
seed = {seed}

[table]
dtype = "{dtype}"
init = {{ distribution = "normal", std = 1.0 }}
""")
    return path


# ---- layout ----------------------------------------------------------------------------------


@settings(max_examples=200, deadline=None)
@given(rows=st.integers(1, 10**9), dim=st.integers(1, 4096), itemsize=st.sampled_from([2, 4]), ranks=st.integers(1, 64))
def test_rows_partition_is_shard_aligned_and_near_equal(rows, dim, itemsize, ranks):
    spec = SPEC.replace(n_head_per_ngram=1, n_embed_per_ngram=dim, dtype="float32" if itemsize == 4 else "bfloat16")
    spec_rows = spec.rows(1)
    scale = rows / spec_rows
    spec = spec.scaled(scale) if scale > 1 else spec
    rows = spec.rows(1)
    try:
        layout = plan_layout(spec, ranks, "rows")[1]
    except EngramError as exc:
        assert "too few" in str(exc) and rows < ranks * ranks
        return
    row_bytes = dim * itemsize
    assert layout.shard_rows % layout.chunk_rows == 0
    assert layout.chunk_rows * row_bytes <= max(CHUNK_BYTES, row_bytes)
    assert layout.shard_rows * row_bytes <= max(SHARD_BYTES, row_bytes)
    bounds = [a for a, _ in layout.partition] + [rows]
    assert [b for _, b in layout.partition] == bounds[1:]
    assert bounds[0] == 0 and all(a < b for a, b in zip(bounds, bounds[1:]))
    assert all(b % layout.shard_rows == 0 for b in bounds[1:-1])
    sizes = [b - a for a, b in layout.partition]
    assert len(set(sizes[:-1])) <= 1
    # Only the last rank may be short, by less than one row per chunk and shard of a rank per rank.
    q = sizes[0]
    assert 0 < sizes[-1] <= q
    assert q - sizes[-1] < ranks * (q // layout.chunk_rows + q // layout.shard_rows + 1)


def test_heads_partition_follows_head_offsets_or_says_why():
    layout = plan_layout(SPEC, 2, "heads")[1]
    offsets = SPEC.offsets(1)
    assert layout.partition == ((0, offsets[4]), (offsets[4], SPEC.rows(1)))
    assert offsets[4] % layout.shard_rows == 0 and layout.shard_rows % layout.chunk_rows == 0
    with pytest.raises(EngramError, match="regular grid") as info:
        plan_layout(load_spec("engram-27b"), 4, "heads")
    assert "shard by rows" in str(info.value).lower()
    with pytest.raises(EngramError, match="8 heads.*at most 8 ranks"):
        plan_layout(SPEC, 9, "heads")


def test_layout_and_hashing_metadata_match_spec_and_hasher(demo_store, projection):
    store = open_tables(demo_store)
    hasher = NgramHasher(SPEC, projection)
    assert store.spec.to_dict() == SPEC.to_dict()
    assert store.layer_ids == SPEC.layer_ids
    assert store.attrs["init"]["algorithm"] == "engram-ctr-v1"
    assert store.projection.fingerprint() == projection.fingerprint()
    assert store.projection.tokenizer_json == projection.tokenizer_json
    assert store.projection.metadata == projection.metadata
    for layer in SPEC.layer_ids:
        table = store.table(layer)
        assert table.shape == (SPEC.rows(layer), SPEC.dim)
        assert store.head_sizes(layer) == SPEC.head_sizes(layer) == hasher.head_sizes(layer).tolist()
        assert store.offsets(layer) == hasher.offsets(layer).tolist()
        assert store.multipliers(layer).tolist() == hasher.multipliers(layer).tolist()
        assert store.attrs["layers"][str(layer)]["dim"] == SPEC.dim
        assert len(store.partition(layer)) == 3
        assert store.shard_ranges(layer)[0][0] == 0 and store.shard_ranges(layer)[-1][1] == SPEC.rows(layer)
    # The hasher's rows index the table directly: heads laid out in hashing order.
    ids = np.random.default_rng(1).integers(0, 1000, (3, 40))
    rows = store.hasher().rows(ids)
    for layer, index in rows.items():
        looked_up = store.lookup(layer, index)
        assert looked_up.shape == index.shape + (SPEC.dim,)
        flat = index.reshape(-1)
        expected = np.stack([generate_rows(SPEC, layer, r, r + 1)[0] for r in flat[:50]])
        assert looked_up.reshape(-1, SPEC.dim)[:50].tobytes() == expected.tobytes()
        buckets = hasher.hash(ids)[layer]
        assert (buckets < np.array(store.head_sizes(layer))).all()
        assert (index == buckets + np.array(store.offsets(layer))).all()


def test_store_holds_exactly_the_generated_values(demo_store):
    store = open_tables(demo_store)
    for layer in SPEC.layer_ids:
        whole = generate_rows(SPEC, layer, 0, SPEC.rows(layer))
        assert np.asarray(store.table(layer)[:]).tobytes() == whole.tobytes()
        assert store.read_rows(layer, 10, 20).tobytes() == whole[10:20].tobytes()
        rows = SPEC.rows(layer)
        assert store.read_rows(layer, rows - 3, rows).tobytes() == whole[rows - 3 :].tobytes()
        assert store.read_rows(layer, rows, rows).shape == (0, SPEC.dim)


@pytest.mark.parametrize("start,stop", [(-1, 5), (5, 4), (0, "rows+1"), ("rows+7", "rows+9"), (0, "rows+10**6")])
def test_read_rows_refuses_rows_outside_the_table(demo_store, start, stop):
    """The last chunk is padded on disk: a stop inside the padding must not return its bytes."""
    store = open_tables(demo_store)
    rows = SPEC.rows(SPEC.layer_ids[0])
    bounds = [eval(str(x), {"rows": rows}) for x in (start, stop)]
    with pytest.raises(UsageError, match=f"not within the {rows:,} rows"):
        store.read_rows(SPEC.layer_ids[0], *bounds)


# ---- determinism -------------------------------------------------------------------------------


def test_same_values_for_any_shards_workers_and_dtype_path(tmp_path, demo_store, projection):
    reference = table_bytes(demo_store)
    for shards, workers, by in ((1, 1, "rows"), (7, 2, "rows"), (2, 3, "heads")):
        path = tmp_path / f"s{shards}-w{workers}.zarr"
        report = build_tables(SPEC, path, projection=projection, shards=shards, shard_by=by, workers=workers)
        assert report.complete and report.shards_written == report.shards_total
        assert table_bytes(path) == reference
        layout = open_tables(path).layout(1)
        assert len(layout.partition) == shards


def test_float32_and_float16_stores(tmp_path, projection):
    for dtype in ("float32", "float16"):
        path = tmp_path / f"{dtype}.zarr"
        build_tables(SPEC, path, projection=projection, dtype=dtype)
        store = open_tables(path)
        assert store.dtype == dtype and store.table(3).dtype == np.dtype(dtype)
        assert np.asarray(store.table(3)[:100]).tobytes() == generate_rows(SPEC, 3, 0, 100, dtype).tobytes()


# ---- interop ----------------------------------------------------------------------------------


def test_bfloat16_round_trip_through_tensorstore(demo_store, tmp_path):
    import tensorstore as ts

    meta = json.loads((demo_store / "layer_1" / "zarr.json").read_text())
    assert meta["data_type"] == "bfloat16"
    array = ts.open(
        {"driver": "zarr3", "kvstore": {"driver": "file", "path": str(demo_store / "layer_1")}}, open=True
    ).result()
    assert array.dtype == ts.bfloat16 and tuple(array.shape) == (SPEC.rows(1), SPEC.dim)
    got = np.asarray(array[1000:3000].read().result())
    assert got.view(np.uint16).tobytes() == generate_rows(SPEC, 1, 1000, 3000).view(np.uint16).tobytes()
    # And back: tensorstore writes bfloat16, zarr-python with our registration reads it.
    values = (np.arange(64, dtype=np.float32).reshape(8, 8) / 7).astype(ml_dtypes.bfloat16)
    out = ts.open(
        {
            "driver": "zarr3",
            "kvstore": {"driver": "file", "path": str(tmp_path / "ts.zarr")},
            "metadata": {"shape": [8, 8], "data_type": "bfloat16"},
        },
        create=True,
    ).result()
    out.write(values).result()
    back = zarr.open_array(str(tmp_path / "ts.zarr"), mode="r")
    assert np.asarray(back[:]).view(np.uint16).tobytes() == values.view(np.uint16).tobytes()


def test_shard_files_are_what_zarr_itself_writes(demo_store, tmp_path):
    """Our shard encoder against zarr-python's sharding codec, byte for byte."""
    store = open_tables(demo_store)
    source = store.table(3)
    copy = zarr.create_array(
        str(tmp_path / "copy.zarr"),
        shape=source.shape,
        dtype=source.metadata.data_type,
        chunks=source.chunks,
        shards=source.shards,
        compressors=source.compressors,
        fill_value=0.0,
    )
    copy[:] = source[:]
    layout = store.layout(3)
    for index in range(layout.shards):
        ours = (demo_store / layout.shard_key(index)).read_bytes()
        theirs = (tmp_path / "copy.zarr" / "c" / str(index) / "0").read_bytes()
        assert ours == theirs


def test_fsspec_memory_store(projection):
    url = f"memory://engram-test-{os.getpid()}/demo.zarr"
    build_tables(SPEC, url, projection=projection, shards=2)
    store = open_tables(url)
    assert np.asarray(store.table(1)[5:9]).tobytes() == generate_rows(SPEC, 1, 5, 9).tobytes()
    store.verify()


# ---- the library API for importers ------------------------------------------------------------


def test_create_store_and_write_whole_shards(tmp_path, demo_store, projection):
    path = tmp_path / "imported.zarr"
    store = create_store(path, SPEC, projection, shards=3, init={"algorithm": "imported", "source": "test"})
    layout = store.layout(1)
    with pytest.raises(EngramError, match="whole shards"):
        store.write_rows(1, 1, generate_rows(SPEC, 1, 1, 10))
    with pytest.raises(EngramError, match="incomplete"):
        open_tables(path)
    for layer in SPEC.layer_ids:
        store.write_rows(layer, 0, generate_rows(SPEC, layer, 0, SPEC.rows(layer)).astype(np.float32))
    store.mark_complete()
    assert table_bytes(path) == table_bytes(demo_store)
    assert open_tables(path).init == {"algorithm": "imported", "source": "test"}
    with pytest.raises(EngramError, match="not generated"):
        open_tables(path, writable=True).build_shard(1, 0)
    assert layout.shards == open_tables(demo_store).layout(1).shards


def test_build_shard_is_a_plain_function_of_path_layer_index(tmp_path, demo_store, projection):
    path = tmp_path / "tasks.zarr"
    store = create_store(path, SPEC, projection, shards=3)
    jobs = [(layer, i) for layer in SPEC.layer_ids for i in range(store.layout(layer).shards)]
    written = sum(build_shard(str(path), layer, i) for layer, i in reversed(jobs))
    assert written == sum((path / store.layout(l).shard_key(i)).stat().st_size for l, i in jobs)
    store.mark_complete()
    assert tree_bytes(path) == tree_bytes(demo_store)


# ---- faults -----------------------------------------------------------------------------------


def test_existing_store_needs_resume_or_overwrite(tmp_path, projection, projection_file, demo_spec_file):
    path = tmp_path / "t.zarr"
    build_tables(SPEC, path, projection=projection)
    proc = run_engram("build-tables", str(demo_spec_file), "--projection", str(projection_file), "-o", str(path))
    assert proc.returncode == 1 and "already exists" in proc.stderr and "Traceback" not in proc.stderr
    other = tmp_path / "not-a-store"
    other.mkdir()
    (other / "precious.txt").write_text("keep me")
    proc = run_engram(
        "build-tables", str(demo_spec_file), "--projection", str(projection_file), "-o", str(other), "--overwrite"
    )
    assert proc.returncode == 1 and "not an engram table store" in proc.stderr
    assert (other / "precious.txt").read_text() == "keep me"
    report = build_tables(SPEC, path, projection=projection, resume=True)
    assert report.shards_kept == report.shards_total and report.shards_written == 0


def test_resume_refuses_a_different_spec_projection_or_layout(tmp_path, projection):
    path = tmp_path / "t.zarr"
    build_tables(SPEC, path, projection=projection, shards=2)
    with pytest.raises(EngramError, match=r"different spec \(engram.seed is 0 in the store but 9 now\)"):
        build_tables(SPEC.replace(seed=9), path, projection=projection, resume=True)
    with pytest.raises(EngramError, match="dtype"):
        build_tables(SPEC, path, projection=projection, resume=True, dtype="float32")
    other = VocabProjection(projection.lookup[::-1].copy(), {}, None)
    with pytest.raises(EngramError, match="different projection"):
        build_tables(SPEC, path, projection=other, resume=True)
    with pytest.raises(EngramError, match="laid out for 2 ranks by rows, not 3"):
        build_tables(SPEC, path, projection=projection, resume=True, shards=3)


def test_corrupt_and_missing_shards_are_named_and_repaired(tmp_path, demo_store, projection):
    path = tmp_path / "t.zarr"
    build_tables(SPEC, path, projection=projection, shards=3)
    store = open_tables(path)
    layout = store.layout(3)
    start, stop = layout.shard_range(1)
    shard = path / layout.shard_key(1)
    data = bytearray(shard.read_bytes())
    data[1000] ^= 0xFF
    shard.write_bytes(bytes(data))
    with pytest.raises(EngramError, match=rf"layer 3 rows {start}-{stop - 1} \(shard 1\):.*crc32c"):
        store.verify()
    with pytest.raises(EngramError, match=rf"layer 3 rows {start}-\d+ \(shard 1\).*crc32c"):
        open_tables(path).read_rows(3, start, start + 5)
    report = build_tables(SPEC, path, projection=projection, resume=True)
    assert report.shards_repaired == 1 and report.shards_kept == report.shards_total - 1
    assert tree_bytes(path) == tree_bytes(demo_store)
    (path / layout.shard_key(2)).unlink()
    with pytest.raises(EngramError, match=rf"damaged: layer 3 rows {layout.shard_range(2)[0]}-"):
        open_tables(path)


def test_unwritable_and_full_targets_give_one_line_errors(tmp_path, projection_file, demo_spec_file):
    proc = run_engram(
        "build-tables", str(demo_spec_file), "--projection", str(projection_file), "-o", "/proc/engram-test.zarr"
    )
    assert proc.returncode == 1 and proc.stderr.startswith("engram: error: ")
    assert len(proc.stderr.strip().splitlines()) == 1
    blocker = tmp_path / "file"
    blocker.write_text("x")
    proc = run_engram(
        "build-tables", str(demo_spec_file), "--projection", str(projection_file), "-o", str(blocker / "t.zarr")
    )
    assert proc.returncode == 1 and len(proc.stderr.strip().splitlines()) == 1
    # A write that fails midway (here: the file-size limit, EFBIG) is one line too, and names --resume.
    script = (
        "import resource, signal, sys; signal.signal(signal.SIGXFSZ, signal.SIG_IGN); "
        "resource.setrlimit(resource.RLIMIT_FSIZE, (4 << 20, 4 << 20)); "
        "sys.argv = ['engram'] + sys.argv[1:]; from engram_cli.cli import main; main()"
    )
    proc = subprocess.run(
        [
            sys.executable,
            "-c",
            script,
            "build-tables",
            str(demo_spec_file),
            "--projection",
            str(projection_file),
            "-o",
            str(tmp_path / "big.zarr"),
        ],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=300,
    )
    assert proc.returncode == 1, proc.stderr
    assert proc.stderr.startswith("engram: error: cannot write") and "Traceback" not in proc.stderr
    with pytest.raises(EngramError, match="incomplete"):
        open_tables(tmp_path / "big.zarr")


def test_full_disk_gives_one_line_error(tmp_path, projection_file, demo_spec_file):
    mount = tmp_path / "small"
    mount.mkdir()
    if (
        os.geteuid() != 0
        or subprocess.run(
            ["mount", "-t", "tmpfs", "-o", "size=8m", "tmpfs", str(mount)], capture_output=True
        ).returncode
        != 0
    ):
        pytest.skip("needs permission to mount a small tmpfs")
    try:
        proc = run_engram(
            "build-tables", str(demo_spec_file), "--projection", str(projection_file), "-o", str(mount / "t.zarr")
        )
        assert proc.returncode == 1 and "not enough disk space" in proc.stderr
        assert len(proc.stderr.strip().splitlines()) == 1
    finally:
        subprocess.run(["umount", str(mount)], check=True)


def test_dry_run_writes_nothing_and_plans_what_a_build_writes(tmp_path, projection_file, demo_spec_file):
    out = tmp_path / "plan.zarr"
    proc = run_engram(
        "build-tables",
        "engram-27b",  # with the projection of the tokenizer it names
        "-o",
        str(out),
        "--shards",
        "8",
        "--dry-run",
        "--json",
    )
    assert proc.returncode == 0, proc.stderr
    plan = json.loads(proc.stdout)
    spec = load_spec("engram-27b")
    assert plan["dry_run"] and not out.exists()
    assert plan["total"]["parameters"] == spec.parameters
    assert plan["total"]["bytes"] == spec.parameters * 2
    assert all(len(layer["partition"]) == 8 for layer in plan["layers"])
    small = json.loads(
        run_engram(
            "build-tables",
            str(demo_spec_file),
            "--projection",
            str(projection_file),
            "-o",
            str(out),
            "--shards",
            "2",
            "--dry-run",
            "--json",
        ).stdout
    )
    assert not out.exists()
    built = json.loads(
        run_engram(
            "build-tables",
            str(demo_spec_file),
            "--projection",
            str(projection_file),
            "-o",
            str(out),
            "--shards",
            "2",
            "--json",
        ).stdout
    )
    assert len([p for p in out.rglob("*") if p.is_file()]) == small["total"]["files"]
    assert small["layers"] == built["layers"] and built["complete"]
    assert len(list(out.glob("layer_*/c/*/0"))) == small["total"]["shards"]


# ---- kill -9 and Ctrl-C in the middle of a real build -----------------------------------------


def _start_build(spec_path: Path, projection_file: Path, out: Path) -> subprocess.Popen:
    return subprocess.Popen(
        [
            sys.executable,
            "-m",
            "engram_cli",
            "build-tables",
            str(spec_path),
            "--projection",
            str(projection_file),
            "-o",
            str(out),
            "--shards",
            "16",
            "--workers",
            "1",
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        cwd=ROOT,
    )


def _wait_for_shards(out: Path, proc: subprocess.Popen, count: int) -> None:
    deadline = time.monotonic() + 120
    while len(list(out.glob("layer_*/c/*/0"))) < count:
        assert proc.poll() is None, f"the build ended before it could be interrupted: {proc.stderr.read()}"
        assert time.monotonic() < deadline
        time.sleep(0.002)


@pytest.mark.slow
@pytest.mark.parametrize("how", ["SIGKILL", "SIGINT"])
def test_interrupted_build_resumes_to_identical_bytes(tmp_path, projection_file, how):
    spec_path = write_spec(tmp_path / "mid.toml", rows_per_head=40_000, dim=64, dtype="float32")
    out = tmp_path / "killed.zarr"
    proc = _start_build(spec_path, projection_file, out)
    _wait_for_shards(out, proc, 3)
    proc.send_signal(9 if how == "SIGKILL" else 2)
    _, stderr = proc.communicate(timeout=60)
    if how == "SIGKILL":
        assert proc.returncode == -9
    else:
        assert proc.returncode == 130 and "--resume" in stderr
    assert not json.loads((out / "zarr.json").read_text())["attributes"]["engram"]["complete"]
    with pytest.raises(EngramError, match="incomplete.*layer 1 rows"):
        open_tables(out)
    done = len(list(out.glob("layer_*/c/*/0")))
    resumed = run_engram(
        "build-tables", str(spec_path), "--projection", str(projection_file), "-o", str(out), "--resume", "--json"
    )
    assert resumed.returncode == 0, resumed.stderr
    summary = json.loads(resumed.stdout)
    assert summary["complete"] and summary["shards_kept"] == done
    assert summary["shards_written"] == summary["total"]["shards"] - done
    assert not list(out.rglob("*.partial"))
    fresh = tmp_path / "fresh.zarr"
    build_tables(load_spec(spec_path), fresh, projection=load_projection(projection_file), shards=16)
    assert tree_bytes(out) == tree_bytes(fresh)
    open_tables(out).verify()


def test_an_untyped_caller_naming_no_dtype_or_sharding_gets_one_line():
    """The signatures take `StoreDType` and `ShardBy`; a caller that passes another string (no type
    checker, or a value read from a file) gets the one-line UsageError before any work."""
    spec = load_spec("demo")
    with pytest.raises(UsageError, match=r"^dtype must be one of float32, bfloat16, float16, got 'fp8'$"):
        build_tables(spec, None, dry_run=True, dtype="fp8")  # type: ignore[arg-type]
    with pytest.raises(UsageError, match=r"^shard_by must be one of rows, heads, got 'cols'$"):
        build_tables(spec, None, dry_run=True, shard_by="cols")  # type: ignore[arg-type]
    assert build_tables(spec, None, dry_run=True, dtype="float16", shard_by="heads").dtype == "float16"
