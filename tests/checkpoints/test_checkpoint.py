"""DCP training exports: real stores, real checkpoints, plain loads and gloo ranks at other sizes."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from engram_cli.checkpoints.dcp_export import export_training
from engram_cli.checkpoints.importing import import_checkpoint
from engram_cli.checkpoints.keys import DEFAULT_HEAD_TEMPLATE, DEFAULT_KEY_TEMPLATE
from engram_cli.checkpoints.metadata import META_KEY
from engram_cli.cli.commands import run_export
from engram_cli.errors import EngramError
from engram_cli.spec import spec_from_dict
from engram_cli.store.build import build_tables
from engram_cli.store.tables import open_tables
from engram_cli.vocab import VocabProjection, compress_vocab


@pytest.fixture(scope="module")
def projection() -> VocabProjection:
    from conftest import letters_tokenizer

    return compress_vocab(letters_tokenizer())


@pytest.fixture(scope="module")
def stores(tmp_path_factory, projection, tiny_spec) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("stores")
    made = {}
    for dtype in ("bfloat16", "float32", "float16"):
        path = root / dtype
        build_tables(tiny_spec.replace(dtype=dtype), path, projection=projection, shards=2)
        made[dtype] = path
    return made


def table(store_path: Path, layer_id: int) -> np.ndarray:
    store = open_tables(store_path)
    return np.asarray(store.read_rows(layer_id, 0, store.spec.rows(layer_id)))


def torch_table(store_path: Path, layer_id: int) -> torch.Tensor:
    values = table(store_path, layer_id)
    if values.dtype.name == "bfloat16":
        return torch.from_numpy(values.view(np.uint16)).view(torch.bfloat16)
    return torch.from_numpy(values)


def same_bits(a: np.ndarray, b: np.ndarray) -> bool:
    return a.dtype == b.dtype and a.shape == b.shape and a.tobytes() == b.tobytes()


def dcp_metadata(path: Path):
    from torch.distributed.checkpoint import FileSystemReader

    return FileSystemReader(path).read_metadata()


def load_plain(path: Path, keys: list[str]) -> dict[str, torch.Tensor]:
    """torch.distributed.checkpoint.load into full tensors, one process, no process group."""
    import torch.distributed.checkpoint as dcp

    entries = dcp_metadata(path).state_dict_metadata
    state = {k: torch.empty(tuple(entries[k].size), dtype=entries[k].properties.dtype) for k in keys}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        dcp.load(state, checkpoint_id=str(path))
    return state


@pytest.mark.parametrize("dtype", ["bfloat16", "float32", "float16"])
def test_round_trip_is_bit_exact(stores, tmp_path, dtype):
    ckpt, back = tmp_path / "ckpt", tmp_path / "back"
    report = export_training(stores[dtype], ckpt)
    assert report.dtype == dtype and report.shards == 2 and not report.conversion["lossy"]
    imported = import_checkpoint(ckpt, back, trust_pickle=True)
    assert imported.complete and imported.format == "dcp"
    original, restored = open_tables(stores[dtype]), open_tables(back)
    assert restored.spec == original.spec and restored.dtype == dtype
    assert restored.projection.fingerprint() == original.projection.fingerprint()
    assert restored.projection.tokenizer_json == original.projection.tokenizer_json
    assert (restored.ranks, restored.shard_by) == (original.ranks, original.shard_by)
    for layer_id in original.layer_ids:
        assert same_bits(table(stores[dtype], layer_id), table(back, layer_id))
        assert (
            restored.attrs["layers"][str(layer_id)]["multipliers"]
            == original.attrs["layers"][str(layer_id)]["multipliers"]
        )


def test_plain_load_and_hasher_from_the_checkpoint_alone(stores, tmp_path):
    from engram_cli.hashing import NgramHasher

    ckpt = tmp_path / "ckpt"
    export_training(stores["bfloat16"], ckpt)
    store = open_tables(stores["bfloat16"])
    entries = dcp_metadata(ckpt).state_dict_metadata
    for layer_id in store.layer_ids:
        key = DEFAULT_KEY_TEMPLATE.format(layer_id=layer_id)
        chunks = sorted((c.offsets[0], c.offsets[0] + c.sizes[0]) for c in entries[key].chunks)
        assert chunks == store.partition(layer_id)  # the store's partition, one piece per rank
    small = [k for k in entries if k.startswith("engram.")]
    loaded = load_plain(ckpt, [DEFAULT_KEY_TEMPLATE.format(layer_id=l) for l in store.layer_ids] + small)
    meta = json.loads(loaded[META_KEY].numpy().tobytes())
    spec = spec_from_dict(meta["spec"])
    rebuilt = VocabProjection(loaded["engram.projection.lookup"].numpy(), {}, None)
    hasher, reference = NgramHasher(spec, rebuilt), store.hasher()
    ids = np.random.default_rng(3).integers(0, rebuilt.vocab_size, (3, 17))
    got, want = hasher.rows(ids), reference.rows(ids)
    for layer_id in store.layer_ids:
        weight = loaded[DEFAULT_KEY_TEMPLATE.format(layer_id=layer_id)]
        assert torch.equal(weight.view(torch.int16), torch_table(stores["bfloat16"], layer_id).view(torch.int16))
        assert np.array_equal(got[layer_id], want[layer_id])
        assert loaded[f"engram.layers.{layer_id}.head_sizes"].tolist() == spec.head_sizes(layer_id)
        assert loaded[f"engram.layers.{layer_id}.offsets"].tolist() == spec.offsets(layer_id)
        assert np.array_equal(loaded[f"engram.layers.{layer_id}.multipliers"].numpy(), reference.multipliers(layer_id))


def test_module_with_the_reference_parameter_name_loads_it(stores, tmp_path):
    """`embedding(hasher.rows(ids))` of a module loaded from the export equals a store lookup."""

    class MultiHeadEmbedding(torch.nn.Module):
        def __init__(self, rows: int, dim: int) -> None:
            super().__init__()
            self.embedding = torch.nn.Embedding(rows, dim)

    class Engram(torch.nn.Module):
        def __init__(self, rows: int, dim: int) -> None:
            super().__init__()
            self.multi_head_embedding = MultiHeadEmbedding(rows, dim)

    ckpt = tmp_path / "ckpt"
    export_training(stores["float32"], ckpt)
    store = open_tables(stores["float32"])
    ids = np.random.default_rng(5).integers(0, store.projection.vocab_size, (2, 11))
    rows = store.hasher().rows(ids)
    for layer_id in store.layer_ids:
        module = Engram(sum(store.head_sizes(layer_id)), store.spec.dim)
        prefix = f"model.layers.{layer_id}.engram."
        loaded = load_plain(ckpt, [DEFAULT_KEY_TEMPLATE.format(layer_id=layer_id)])
        module.load_state_dict({k[len(prefix) :]: v for k, v in loaded.items()})
        with torch.no_grad():
            out = module.multi_head_embedding.embedding(torch.from_numpy(rows[layer_id]))
        assert out.shape == (2, 11, store.spec.heads_per_layer, store.spec.dim)
        assert np.array_equal(out.numpy(), store.lookup(layer_id, rows[layer_id]))


def test_per_head_tensors(stores, tmp_path):
    ckpt, back = tmp_path / "ckpt", tmp_path / "back"
    report = export_training(stores["bfloat16"], ckpt, per_head=True, shards=3)
    store = open_tables(stores["bfloat16"])
    entries = dcp_metadata(ckpt).state_dict_metadata
    for layer_id in store.layer_ids:
        keys = [DEFAULT_HEAD_TEMPLATE.format(layer_id=layer_id, head=h) for h in range(store.spec.heads_per_layer)]
        assert report.layers[layer_id]["keys"] == keys
        assert [tuple(entries[k].size) for k in keys] == [(s, store.spec.dim) for s in store.head_sizes(layer_id)]
        assert all(len(entries[k].chunks) == 3 for k in keys)
        loaded = load_plain(ckpt, keys)
        whole = torch.cat([loaded[k] for k in keys])
        assert torch.equal(whole.view(torch.int16), torch_table(stores["bfloat16"], layer_id).view(torch.int16))
    import_checkpoint(ckpt, back, trust_pickle=True)
    for layer_id in store.layer_ids:
        assert same_bits(table(stores["bfloat16"], layer_id), table(back, layer_id))


def test_dtype_conversions(stores, tmp_path):
    widened = export_training(stores["bfloat16"], tmp_path / "f32", dtype="float32")
    assert not widened.conversion["lossy"]
    import_checkpoint(tmp_path / "f32", tmp_path / "back", trust_pickle=True)
    assert open_tables(tmp_path / "back").dtype == "bfloat16"  # the store's own dtype comes back
    assert same_bits(table(stores["bfloat16"], 1), table(tmp_path / "back", 1))

    narrowed = export_training(stores["float32"], tmp_path / "bf16", dtype="bfloat16")
    assert narrowed.conversion["lossy"] and narrowed.conversion["max_abs_error"] > 0
    original = torch_table(stores["float32"], 3)
    loaded = load_plain(tmp_path / "bf16", [DEFAULT_KEY_TEMPLATE.format(layer_id=3)])
    got = loaded[DEFAULT_KEY_TEMPLATE.format(layer_id=3)]
    assert got.dtype == torch.bfloat16 and torch.equal(got, original.to(torch.bfloat16))
    assert narrowed.conversion["max_abs_error"] == pytest.approx(float((got.float() - original).abs().max()))


def test_framework_checkpoint_without_engram_metadata(stores, tmp_path, projection, tiny_spec):
    """A checkpoint a trainer saved itself (its own keys, no engram.*) imports with --spec."""
    import torch.distributed.checkpoint as dcp

    spec = tiny_spec.replace(dtype="float32")
    state = {f"blocks.{l}.memory.weight": torch_table(stores["float32"], l) * 2 for l in spec.layer_ids}
    state["blocks.0.other.weight"] = torch.zeros(3)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        dcp.save(state, checkpoint_id=str(tmp_path / "trained"))
    with pytest.raises(EngramError, match=r"pass --spec \(and --projection"):
        import_checkpoint(tmp_path / "trained", tmp_path / "x", trust_pickle=True)
    with pytest.raises(EngramError, match="no tensor named like"):
        import_checkpoint(
            tmp_path / "trained",
            tmp_path / "x",
            trust_pickle=True,
            spec=spec,
            projection=projection,
        )
    report = import_checkpoint(
        tmp_path / "trained",
        tmp_path / "back",
        trust_pickle=True,
        spec=spec,
        projection=projection,
        key_template="blocks.{layer_id}.memory.weight",
    )
    assert report.complete and report.dtype == "float32"
    for layer_id in spec.layer_ids:
        assert np.array_equal(table(tmp_path / "back", layer_id), table(stores["float32"], layer_id) * 2)
    bad = spec.replace(engram_vocab_size=(300, 420))
    with pytest.raises(EngramError, match="needs"):
        import_checkpoint(
            tmp_path / "trained",
            tmp_path / "y",
            trust_pickle=True,
            spec=bad,
            projection=projection,
            key_template="blocks.{layer_id}.memory.weight",
        )


def test_cli_and_bad_input(stores, tmp_path, projection):
    from conftest import engram_json, run_engram

    ckpt = tmp_path / "ckpt"
    report = engram_json("export", str(stores["bfloat16"]), "--for", "training", "-o", str(ckpt), "--shards", "3")
    assert report["target"] == "training" and report["shards"] == 3 and ".metadata" in report["files"]
    refused = run_engram("import", str(ckpt), "-o", str(tmp_path / "back"))
    lines = refused.stderr.strip().splitlines()
    assert refused.returncode == 1 and len(lines) == 1 and "--trust-pickle" in lines[0]
    assert not (tmp_path / "back").exists()
    imported = engram_json("import", str(ckpt), "-o", str(tmp_path / "back"), "--trust-pickle")
    assert imported["complete"] and imported["format"] == "dcp"
    assert same_bits(table(tmp_path / "back", 3), table(stores["bfloat16"], 3))

    with pytest.raises(EngramError, match="already exists; pass --overwrite"):
        export_training(stores["bfloat16"], ckpt)
    export_training(stores["bfloat16"], ckpt, overwrite=True, shards=1)
    assert len(dcp_metadata(ckpt).state_dict_metadata[DEFAULT_KEY_TEMPLATE.format(layer_id=1)].chunks) == 1
    keep = tmp_path / "notes"
    keep.mkdir()
    (keep / "mine.txt").write_text("keep me")
    with pytest.raises(EngramError, match="which no export writes; refusing"):
        export_training(stores["bfloat16"], keep, overwrite=True)
    assert (keep / "mine.txt").read_text() == "keep me"
    with pytest.raises(EngramError, match="not a checkpoint engram can import"):
        import_checkpoint(keep, tmp_path / "x")
    for options, message in [
        ({"dtype": "float8_e4m3fn"}, "unknown dtype"),
        ({"key_template": "w.{layer_id}.{head}"}, "--per-head"),
        ({"key_template": "w.{layer_id}", "per_head": True}, "needs {head}"),
        ({"key_template": "w.weight"}, "needs {layer_id}"),
        ({"layout": "engram"}, "apply to --for inference"),
    ]:
        with pytest.raises(EngramError, match=message):
            run_export(str(stores["bfloat16"]), tmp_path / "x", target="training", **options)
    assert not (tmp_path / "x").exists()

    broken = tmp_path / "broken"
    shutil.copytree(stores["bfloat16"], broken)
    shard = broken / "layer_3" / "c" / "1" / "0"
    data = bytearray(shard.read_bytes())
    data[100] ^= 0xFF
    shard.write_bytes(bytes(data))
    with pytest.raises(EngramError, match=r"layer 3 rows \d+-\d+ .*crc32c"):
        export_training(broken, tmp_path / "x")
    shard.unlink()
    with pytest.raises(EngramError, match=r"layer 3 rows \d+-\d+"):
        export_training(broken, tmp_path / "x")
    assert not (tmp_path / "x").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temporary leftovers


def test_import_reads_each_piece_about_once():
    from engram_cli.checkpoints.dcp_source import read_windows

    shards = [(i * 10, min(i * 10 + 10, 95)) for i in range(10)]
    windows = read_windows(shards, [33, 66, 95])
    assert windows == [(0, 40), (40, 70), (70, 95)]
    assert windows[0][0] == 0 and windows[-1][1] == 95
    assert all(a[1] == b[0] for a, b in zip(windows, windows[1:]))
    assert read_windows(shards, [95]) == [(0, 95)]
    assert read_windows(shards, [10 * i for i in range(1, 10)] + [95]) == shards


# ---- gloo ranks at other world sizes --------------------------------------------------------


def run_ranks(tmp_path: Path, world: int, jobs: list[dict]) -> dict:
    """Spawn `world` real gloo processes that load every job's keys as Shard(0) DTensors."""
    init = f"file://{tmp_path}/rendezvous-{world}"
    procs, outs = [], []
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    for rank in range(world):
        out = tmp_path / f"rank{rank}-of-{world}.json"
        outs.append(out)
        procs.append(
            subprocess.Popen(
                [
                    sys.executable,
                    str(Path(__file__).with_name("dcp_rank_worker.py")),
                    str(rank),
                    str(world),
                    init,
                    json.dumps(jobs),
                    str(out),
                ],
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                text=True,
                env=env,
            )
        )
    logs = [p.communicate(timeout=300)[0] for p in procs]
    for proc, log in zip(procs, logs):
        assert proc.returncode == 0, log
    return {rank: json.loads(out.read_text()) for rank, out in enumerate(outs)}


def expected_bytes(tmp_path: Path, store_path: Path, layer_id: int, start: int, stop: int) -> str:
    path = tmp_path / f"expected-{layer_id}-{start}-{stop}.npy"
    values = np.asarray(open_tables(store_path).read_rows(layer_id, start, stop))
    np.save(path, values.view(np.uint8).reshape(stop - start, -1))
    return str(path)


@pytest.mark.slow
@pytest.mark.parametrize(
    "world,exports",
    [
        (3, [{"shards": None, "per_head": False}, {"shards": 2, "per_head": True}]),
        (2, [{"shards": 3, "per_head": False}]),
    ],
)
def test_gloo_ranks_load_row_sharded_dtensors(stores, tmp_path, world, exports):
    store = open_tables(stores["bfloat16"])
    jobs = []
    for i, options in enumerate(exports):
        ckpt = tmp_path / f"ckpt{i}"
        report = export_training(stores["bfloat16"], ckpt, **options)
        assert report.shards != world
        keys = {}
        for layer_id in store.layer_ids:
            if options["per_head"]:
                for head, (offset, size) in enumerate(zip(store.offsets(layer_id), store.head_sizes(layer_id))):
                    keys[DEFAULT_HEAD_TEMPLATE.format(layer_id=layer_id, head=head)] = expected_bytes(
                        tmp_path, stores["bfloat16"], layer_id, offset, offset + size
                    )
            else:
                keys[DEFAULT_KEY_TEMPLATE.format(layer_id=layer_id)] = expected_bytes(
                    tmp_path, stores["bfloat16"], layer_id, 0, store.spec.rows(layer_id)
                )
        jobs.append({"ckpt": str(ckpt), "keys": keys})
    results = run_ranks(tmp_path, world, jobs)
    for job in jobs:
        entries = dcp_metadata(Path(job["ckpt"])).state_dict_metadata
        for key in job["keys"]:
            rows = entries[key].size[0]
            sizes = results[0][f"{job['ckpt']}:{key}"]["sizes"]
            assert sum(sizes) == rows and len(sizes) == world and max(sizes) == -(-rows // world)
            for rank in range(world):
                outcome = results[rank][f"{job['ckpt']}:{key}"]
                assert outcome["local_equal"] and outcome["full_equal"], (rank, key)


def test_export_refuses_too_many_pieces_and_foreign_files(stores, tmp_path):
    from engram_cli.checkpoints.dcp_export import export_training

    with pytest.raises(EngramError, match="more than the"):
        export_training(stores["float32"], tmp_path / "dcp", shards=10**8)
    keep = tmp_path / "notes.txt"
    keep.write_text("mine")
    with pytest.raises(EngramError, match="not a safetensors export"):
        export_training(stores["float32"], keep, overwrite=True)
    assert keep.read_text() == "mine" and not (tmp_path / "dcp").exists()


def test_unknown_store_url_scheme_is_one_line(tmp_path, tiny_spec):
    with pytest.raises(EngramError, match="cannot create table store nosuch://x"):
        build_tables(tiny_spec, "nosuch://x", projection=VocabProjection(np.arange(50) % 7))
