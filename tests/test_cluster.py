"""Scale-out on a real Dask LocalCluster: same bytes and numbers as the local path."""

from __future__ import annotations

import filecmp
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from distributed import Client, LocalCluster
from engram_cli import EngramError
from engram_cli.cli.cluster import dask_client
from engram_cli.cluster import run_tasks
from engram_cli.spec import TableSpec, load_spec
from engram_cli.store.build import build_tables
from engram_cli.store.tables import open_tables
from engram_cli.vocab import VocabProjection, load_projection

pytestmark = pytest.mark.slow


def same_tree(a: Path, b: Path) -> bool:
    files_a = sorted(p.relative_to(a) for p in a.rglob("*") if p.is_file())
    files_b = sorted(p.relative_to(b) for p in b.rglob("*") if p.is_file())
    return files_a == files_b and all(filecmp.cmp(a / f, b / f, shallow=False) for f in files_a)


@pytest.fixture(scope="module")
def cluster():
    with (
        LocalCluster(n_workers=2, threads_per_worker=1, processes=True, dashboard_address=None) as cluster,
        Client(cluster) as client,
    ):
        yield cluster, client


@pytest.fixture(scope="module")
def projection():
    return VocabProjection(__import__("numpy").arange(1000) // 3)


SMALL = TableSpec(
    layer_ids=(1, 4),
    max_ngram_size=3,
    n_head_per_ngram=2,
    engram_vocab_size=(3000, 2000),
    n_embed_per_ngram=32,
    pad_id=0,
    dtype="float32",
)


def test_cluster_build_is_byte_identical_to_local(tmp_path, cluster, projection):
    local = build_tables(SMALL, tmp_path / "local.zarr", projection=projection, shards=3)
    remote = build_tables(
        SMALL,
        f"file://{tmp_path / 'dask.zarr'}",
        projection=projection,
        shards=3,
        client=cluster[1],
    )
    assert remote.complete and remote.shards_written == local.shards_written == 6
    assert same_tree(tmp_path / "local.zarr", tmp_path / "dask.zarr")
    resumed = build_tables(
        SMALL,
        tmp_path / "dask.zarr",
        projection=projection,
        resume=True,
        client=cluster[1],
    )
    assert resumed.shards_kept == 6 and resumed.shards_written == 0


def test_cli_local_cluster_option(tmp_path, projection):
    projection_file = tmp_path / "p.safetensors"
    projection.save(projection_file)
    spec_file = tmp_path / "small.toml"
    spec_file.write_text(
        "[engram]\nlayer_ids = [1, 4]\nmax_ngram_size = 3\nn_head_per_ngram = 2\n"
        "engram_vocab_size = [3000, 2000]\nn_embed_per_ngram = 32\npad_id = 0\n"
        '[table]\ndtype = "float32"\n'
    )
    build_tables(load_spec(spec_file), tmp_path / "local.zarr", projection=load_projection(projection_file), shards=2)
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "engram_cli",
            "build-tables",
            str(spec_file),
            "--projection",
            str(projection_file),
            "-o",
            str(tmp_path / "dask.zarr"),
            "--shards",
            "2",
            "--dask-workers",
            "2",
            "--json",
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr
    assert same_tree(tmp_path / "local.zarr", tmp_path / "dask.zarr")


def test_killed_worker_still_gives_identical_bytes(tmp_path, projection):
    """SIGKILL one worker process while its shards are being written: Dask reschedules its
    tasks (or a rerun with --resume finishes), and the bytes equal the local build's."""
    spec = TableSpec(
        layer_ids=(1, 2),
        max_ngram_size=2,
        n_head_per_ngram=4,
        engram_vocab_size=(400_000,),
        n_embed_per_ngram=64,
        pad_id=0,
        dtype="float32",
    )
    build_tables(spec, tmp_path / "local.zarr", projection=projection, shards=8)
    with (
        LocalCluster(n_workers=2, threads_per_worker=1, processes=True, dashboard_address=None) as cluster,
        Client(cluster) as client,
    ):
        pids = list(client.run(os.getpid).values())
        target = tmp_path / "dask.zarr"
        script = (
            "import sys; from engram_cli.store import build_tables; from engram_cli.spec import "
            "spec_from_dict; from engram_cli.vocab import load_projection; import json;"
            "from distributed import Client; client = Client(sys.argv[4]);"
            "build_tables(spec_from_dict(json.loads(sys.argv[1])), sys.argv[2], "
            "projection=load_projection(sys.argv[3]), shards=8, client=client)"
        )
        projection.save(tmp_path / "p.safetensors")
        import json

        proc = subprocess.Popen(
            [
                sys.executable,
                "-c",
                script,
                json.dumps(spec.to_dict()),
                str(target),
                str(tmp_path / "p.safetensors"),
                cluster.scheduler_address,
            ],
            stderr=subprocess.PIPE,
            text=True,
        )
        deadline = time.time() + 120
        while not list(target.glob("layer_*/c/*/0")) and time.time() < deadline:
            time.sleep(0.005)
        complete_at_kill = open_tables(target, allow_incomplete=True).is_complete
        os.kill(pids[0], signal.SIGKILL)
        _, err = proc.communicate(timeout=300)
        if proc.returncode != 0:
            assert "engram" in err or "Dask" in err
            build_tables(
                spec,
                target,
                projection=projection,
                resume=True,
                client=client,
            )
    assert not complete_at_kill
    assert open_tables(target).is_complete
    assert same_tree(tmp_path / "local.zarr", target)


def _fails(x: int) -> int:
    raise ValueError(f"bad input {x}")


def test_a_failing_task_is_one_line_naming_it(cluster):
    with pytest.raises(EngramError, match=r"task shard-7 failed: ValueError: bad input 7"):
        run_tasks(cluster[1], _fails, [("shard-7", (7,))])


def test_scheduler_and_workers_exclude_each_other():
    with pytest.raises(EngramError, match="not both"):
        with dask_client("tcp://127.0.0.1:1", 2):
            pass
    with pytest.raises(EngramError, match="cannot reach"):
        with dask_client("tcp://127.0.0.1:1", None, connect_timeout="2s"):
            pass
    with pytest.raises(EngramError, match="cannot reach"):
        with dask_client("not-an-address", None):
            pass


@pytest.mark.parametrize("layout,dtype", [("engram", "bfloat16"), ("deepseek-v41", "float8_e4m3fn")])
def test_cluster_inference_export_is_byte_identical_to_local(tmp_path, cluster, projection, layout, dtype):
    from engram_cli.checkpoints.safetensors_export import export_inference

    spec = SMALL.replace(n_embed_per_ngram=64)
    build_tables(spec, tmp_path / "t.zarr", projection=projection, shards=2)
    local = export_inference(
        tmp_path / "t.zarr", tmp_path / "local", layout=layout, dtype=dtype, max_shard_size="100KB"
    )
    remote = export_inference(
        tmp_path / "t.zarr",
        tmp_path / "dask",
        layout=layout,
        dtype=dtype,
        max_shard_size="100KB",
        client=cluster[1],
    )
    assert len(local.files) > 1 and local.files == remote.files
    assert same_tree(tmp_path / "local", tmp_path / "dask")
    assert remote.to_json()["quantization"] == local.to_json()["quantization"]


def _numbers(report) -> dict:
    out = report.to_json()
    corpus = {k: v for k, v in out["corpus"].items() if k not in ("seconds", "spilled_bytes")}
    return {"corpus": corpus, "layers": out["layers"], "sweep": out["sweep"]}


def test_cluster_inspect_equals_local_on_text(tmp_path, cluster):
    from engram_cli.inspection import inspect

    src = Path(__import__("json").__file__).parent
    kwargs = dict(corpus=[src, Path(__import__("email").__file__).parent / "mime"], sweep=[1, 3], top=2)
    local = inspect(load_spec("demo"), **kwargs)
    remote = inspect(load_spec("demo"), client=cluster[1], **kwargs)
    assert local.corpus.files > 5 and _numbers(local) == _numbers(remote)


@pytest.mark.parametrize("doc_sep,barrier_ids", [(None, None), (7, [5])])
def test_cluster_inspect_splits_id_streams_exactly(tmp_path, cluster, doc_sep, barrier_ids):
    """Ranges of one .bin stream (and rows of a 2-D .npy) read by separate tasks give the
    local numbers to the last count: each range carries its document's left context (and the
    barriers in it)."""
    from engram_cli.corpus.base import CorpusOptions
    from engram_cli.inspection import inspect

    rng = __import__("numpy").random.default_rng(5)
    stream = rng.integers(0, 40, size=30_000).astype("uint16")
    stream[rng.integers(0, stream.size, 300)] = 7
    stream.tofile(tmp_path / "ids.bin")
    __import__("numpy").save(tmp_path / "rows.npy", rng.integers(0, 40, size=(50, 333)).astype("int32"))
    spec = tmp_path / "s.toml"
    spec.write_text(
        "[engram]\nlayer_ids = [1]\nmax_ngram_size = 4\nn_head_per_ngram = 2\n"
        "engram_vocab_size = [97, 89, 83]\nn_embed_per_ngram = 8\npad_id = 0\n"
    )
    projection = tmp_path / "p.safetensors"
    VocabProjection(__import__("numpy").arange(64) % 23).save(projection)
    kwargs = dict(
        projection=load_projection(projection),
        corpus=[tmp_path / "ids.bin", tmp_path / "rows.npy"],
        options=CorpusOptions(doc_sep=doc_sep),
        barrier_ids=barrier_ids,
    )
    local = inspect(load_spec(spec), **kwargs)
    remote = inspect(load_spec(spec), client=cluster[1], part_ids=997, **kwargs)
    assert _numbers(local) == _numbers(remote)
    assert local.corpus.files == 2


def test_cluster_refuses_max_tokens(cluster):
    from engram_cli.corpus.base import CorpusOptions
    from engram_cli.inspection import inspect

    with pytest.raises(EngramError, match="--max-tokens"):
        inspect(
            load_spec("demo"),
            corpus=[Path(__import__("json").__file__).parent],
            options=CorpusOptions(max_tokens=100),
            client=cluster[1],
        )


def test_cluster_inspect_splits_parquet_and_megatron_exactly(tmp_path, cluster):
    """Row groups of Parquet files and id ranges of a Megatron dataset read by separate tasks,
    next to whole compressed JSON lines: the local numbers, per format too."""
    import json

    import numpy as np
    import pyarrow as pa
    import pyarrow.parquet as pq
    import zstandard
    from engram_cli.corpus.base import CorpusOptions
    from engram_cli.inspection import inspect

    from corpus_forms import write_megatron

    rng = np.random.default_rng(8)
    docs = [rng.integers(0, 60, size=int(rng.integers(1, 400))).tolist() for _ in range(120)]
    write_megatron(tmp_path / "mega", docs[:60], piece=50)
    pq.write_table(pa.table({"input_ids": docs[60:]}), tmp_path / "ids.parquet", row_group_size=6)
    (tmp_path / "ids.jsonl.zst").write_bytes(
        zstandard.ZstdCompressor().compress("".join(json.dumps({"ids": d}) + "\n" for d in docs[:10]).encode())
    )
    spec = tmp_path / "s.toml"
    spec.write_text(
        "[engram]\nlayer_ids = [1]\nmax_ngram_size = 3\nn_head_per_ngram = 2\n"
        "engram_vocab_size = [97, 89]\nn_embed_per_ngram = 8\npad_id = 0\n"
    )
    kwargs = dict(
        projection=VocabProjection(np.arange(64) % 23),
        corpus=[tmp_path / "mega", tmp_path / "ids.parquet", tmp_path / "ids.jsonl.zst"],
        options=CorpusOptions(ids_field="ids"),
    )
    with pytest.raises(EngramError, match="no 'ids' column"):
        inspect(load_spec(spec), **kwargs)
    pq.write_table(pa.table({"ids": docs[60:]}), tmp_path / "ids.parquet", row_group_size=6)
    local = inspect(load_spec(spec), **kwargs)
    remote = inspect(load_spec(spec), client=cluster[1], part_ids=500, **kwargs)
    assert _numbers(local) == _numbers(remote)
    assert local.corpus.formats == {
        "megatron": {"files": 1, "documents": 60, "tokens": sum(map(len, docs[:60]))},
        "parquet": {"files": 1, "documents": 60, "tokens": sum(map(len, docs[60:]))},
        "jsonl": {"files": 1, "documents": 10, "tokens": sum(map(len, docs[:10]))},
    }
