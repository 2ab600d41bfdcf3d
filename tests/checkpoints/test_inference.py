"""Inference exports: safetensors read back by safetensors itself, by EngramTables, and by import."""

from __future__ import annotations

import json
import multiprocessing
from pathlib import Path

import numpy as np
import pytest
import torch
from engram_cli.checkpoints.fp8_format import BLOCK
from engram_cli.checkpoints.importing import import_checkpoint
from engram_cli.checkpoints.keys import DEFAULT_KEY_TEMPLATE
from engram_cli.checkpoints.safetensors_export import export_inference
from engram_cli.checkpoints.safetensors_format import INDEX_NAME, SafetensorsWriter, TensorPlan, plan_layout
from engram_cli.checkpoints.tables import EngramTables
from engram_cli.cli.commands import run_export
from engram_cli.errors import EngramError
from engram_cli.store.build import build_tables
from engram_cli.store.create import create_store
from engram_cli.store.tables import open_tables
from engram_cli.vocab import VocabProjection, compress_vocab
from safetensors import safe_open

from conftest import engram_json, make_byte_level_tokenizer, run_engram


@pytest.fixture(scope="module")
def projection() -> VocabProjection:
    pieces = [chr(c) for c in range(ord("a"), ord("z") + 1)] + ["Hello", "hello", " world", "World"]
    return compress_vocab(make_byte_level_tokenizer(pieces, special=["<s>", "<pad>"]))


@pytest.fixture(scope="module")
def stores(tmp_path_factory, projection, tiny_spec) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("stores")
    made = {}
    for dtype in ("bfloat16", "float32", "float16"):
        made[dtype] = root / dtype
        build_tables(tiny_spec.replace(dtype=dtype), made[dtype], projection=projection, shards=2)
    return made


def table(store_path: Path, layer_id: int) -> np.ndarray:
    store = open_tables(store_path)
    return np.asarray(store.read_rows(layer_id, 0, store.spec.rows(layer_id)))


def as_float32(values: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(values.astype(np.float32))


def same_bits(a: np.ndarray, b: np.ndarray) -> bool:
    return a.dtype == b.dtype and a.shape == b.shape and a.tobytes() == b.tobytes()


def read_all(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Every tensor of a file or shard set through safetensors' own reader."""
    files = [path] if path.is_file() else sorted(path.glob("*.safetensors"))
    tensors, metadata = {}, {}
    for file in files:
        with safe_open(str(file), framework="pt") as handle:
            metadata = metadata or (handle.metadata() or {})
            tensors.update({k: handle.get_tensor(k) for k in handle.keys()})  # noqa: SIM118 (a safetensors handle, not a dict)
    return tensors, metadata


@pytest.mark.parametrize(
    "store_dtype,dtype",
    [
        ("bfloat16", None),
        ("float32", None),
        ("float16", None),
        ("bfloat16", "float32"),
        ("float16", "float32"),
    ],
)
def test_lossless_round_trips(stores, tmp_path, store_dtype, dtype):
    out, back = tmp_path / "tables.safetensors", tmp_path / "back"
    report = export_inference(stores[store_dtype], out, dtype=dtype)
    assert report.files == ["tables.safetensors"] and not report.index and not report.conversion["lossy"]
    tensors, metadata = read_all(out)
    assert metadata["format"] == "engram-tables" and metadata["layout"] == "engram"
    for layer_id in (1, 3):
        weight = tensors[DEFAULT_KEY_TEMPLATE.format(layer_id=layer_id)]
        assert weight.dtype == getattr(torch, dtype or store_dtype)
        assert torch.equal(weight.float(), as_float32(table(stores[store_dtype], layer_id)))
    import_checkpoint(out, back)
    restored, original = open_tables(back), open_tables(stores[store_dtype])
    assert restored.spec == original.spec and restored.dtype == store_dtype
    assert restored.projection.fingerprint() == original.projection.fingerprint()
    assert restored.projection.tokenizer_json == original.projection.tokenizer_json
    for layer_id in (1, 3):
        assert same_bits(table(back, layer_id), table(stores[store_dtype], layer_id))


def test_lossy_conversion_is_announced(stores, tmp_path):
    report = export_inference(stores["float32"], tmp_path / "t.safetensors", dtype="bfloat16")
    assert report.conversion["lossy"] and report.conversion["max_abs_error"] > 0
    tensors, _ = read_all(tmp_path / "t.safetensors")
    original = as_float32(table(stores["float32"], 3))
    assert torch.equal(tensors[DEFAULT_KEY_TEMPLATE.format(layer_id=3)], original.to(torch.bfloat16))
    proc = run_engram(
        "export",
        str(stores["float32"]),
        "--for",
        "inference",
        "--dtype",
        "float16",
        "-o",
        str(tmp_path / "h.safetensors"),
    )
    assert proc.returncode == 0 and "lossy conversion float32 -> float16" in proc.stderr


def check_fp8(weight: torch.Tensor, scale: torch.Tensor, original: torch.Tensor) -> torch.Tensor:
    """Check the scales and error bounds of one fp8 table; its errors relative to the block max."""
    rows, dim = original.shape
    assert weight.dtype == torch.float8_e4m3fn and weight.shape == (rows, dim)
    assert scale.dtype == torch.float8_e8m0fnu and scale.shape == (rows, dim // BLOCK)
    blocks = original.reshape(rows, -1, BLOCK)
    amax = blocks.abs().amax(-1)
    s = scale.float()
    assert bool((torch.log2(s) == torch.round(torch.log2(s))).all())  # powers of two
    assert bool((amax <= 448 * s).all()) and bool(((amax == 0) | (amax > 224 * s)).all())  # smallest such
    back = weight.float().reshape(rows, -1, BLOCK) * s.unsqueeze(-1)
    relative = (back - blocks).abs() / amax.unsqueeze(-1)
    assert float(relative.max()) <= 1 / 16
    return relative.reshape(-1)


@pytest.mark.parametrize("layout", ["engram", "deepseek-v41"])
def test_fp8_layouts(stores, tmp_path, layout, projection, tiny_spec):
    out = tmp_path / "fp8"
    report = export_inference(stores["bfloat16"], out, layout=layout, dtype="float8_e4m3fn", max_shard_size="100KB")
    assert report.index and len(report.files) > 1
    index = json.loads((out / INDEX_NAME).read_text())
    tensors, metadata = read_all(out)
    assert set(index["weight_map"]) == set(tensors)
    for name, file in index["weight_map"].items():
        with safe_open(str(out / file), framework="pt") as handle:
            assert name in handle.keys()  # noqa: SIM118
    assert index["metadata"]["total_size"] == sum(t.numel() * t.element_size() for t in tensors.values())
    relative = []
    for layer_id in (1, 3):
        if layout == "deepseek-v41":
            weight_key, scale_key = f"layers.{layer_id}.engram.embed.weight", f"layers.{layer_id}.engram.embed.scale"
        else:
            weight_key = DEFAULT_KEY_TEMPLATE.format(layer_id=layer_id)
            scale_key = weight_key[: -len("weight")] + "scale"
        original = as_float32(table(stores["bfloat16"], layer_id))
        relative.append(check_fp8(tensors[weight_key], tensors[scale_key], original))
    relative = torch.cat(relative).double()
    assert report.quantization["max_relative"] == pytest.approx(float(relative.max()))
    assert report.quantization["rms_relative"] == pytest.approx(float(relative.square().mean().sqrt()))
    if layout == "deepseek-v41":
        assert set(tensors) == {f"layers.{l}.engram.embed.{p}" for l in (1, 3) for p in ("weight", "scale")}
        assert metadata == {"format": "pt"}
    # import dequantizes with the scales; the values are exactly representable in bfloat16
    kwargs = {"spec": tiny_spec, "projection": projection} if layout == "deepseek-v41" else {}
    import_checkpoint(out, tmp_path / "back", **kwargs)
    tables = EngramTables.open(out, **kwargs)
    for layer_id in (1, 3):
        restored = table(tmp_path / "back", layer_id)
        assert restored.dtype.name == "bfloat16"
        assert torch.equal(as_float32(restored), tables.gather(layer_id, torch.arange(tables.rows(layer_id))).float())


@pytest.mark.parametrize("layout,dtype", [("engram", None), ("engram", "float8_e4m3fn"), ("deepseek-v41", None)])
def test_engram_tables_lookup_matches_the_store(stores, tmp_path, layout, dtype, projection):
    out = tmp_path / "out"
    export_inference(stores["bfloat16"], out, layout=layout, dtype=dtype)
    store = open_tables(stores["bfloat16"])
    if layout == "deepseek-v41":
        # the spec comes from the engram_config.json beside the shards, the projection from the
        # tokenizer.json the export writes beside them; without that file (an older export) the
        # default projection is not the store's toy tokenizer's
        alone = EngramTables.open(out)
        alone.lookup(np.zeros((1, 3), dtype=np.int64))
        assert alone.projection.fingerprint() == store.projection.fingerprint()
        (out / "tokenizer.json").unlink()
        with pytest.raises(EngramError, match="has no tokenizer.json: give the projection of its tokenizer"):
            EngramTables.open(out).lookup(np.zeros((1, 3), dtype=np.int64))
        described = EngramTables.open(out, projection=store.projection)
        described.lookup(np.zeros((1, 3), dtype=np.int64))
        assert described.spec.head_sizes(3) == store.spec.head_sizes(3)
        assert described.spec.compressed_vocab_size == store.projection.compressed_size
        tables = EngramTables.open(out / INDEX_NAME, spec=store.spec, projection=store.projection)
    else:
        tables = EngramTables.open(out)
        assert tables.spec == store.spec and tables.projection.fingerprint() == store.projection.fingerprint()
    ids = np.random.default_rng(1).integers(0, projection.vocab_size, (3, 9))
    got = tables.lookup(torch.from_numpy(ids))
    rows = store.hasher().rows(ids)
    for layer_id in store.layer_ids:
        assert got[layer_id].shape == (3, 9, store.spec.heads_per_layer, store.spec.dim)
        assert got[layer_id].dtype == torch.bfloat16
        want = as_float32(store.lookup(layer_id, rows[layer_id]))
        if tables.quantized:
            scale = tables.scale(layer_id).index_select(0, torch.from_numpy(rows[layer_id].reshape(-1))).float()
            bound = 448 * scale.repeat_interleave(BLOCK, dim=-1).reshape(want.shape) / 16
            assert bool(((got[layer_id].float() - want).abs() <= bound).all())
        else:
            assert torch.equal(got[layer_id].float(), want)
    with pytest.raises(EngramError, match="row indices"):
        tables.gather(1, torch.tensor([tables.rows(1)]))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs an accelerator (run on a GPU machine)")
@pytest.mark.parametrize("dtype", [None, "float8_e4m3fn"])
def test_engram_tables_lookup_returns_values_on_the_ids_device(stores, tmp_path, dtype, projection):
    """Tables stay in host memory; CUDA ids are gathered on the host, values come back on CUDA."""
    out = tmp_path / "out"
    export_inference(stores["bfloat16"], out, dtype=dtype)
    tables = EngramTables.open(out)
    ids = torch.from_numpy(np.random.default_rng(2).integers(0, projection.vocab_size, (2, 7)))
    on_host = tables.lookup(ids)
    on_device = tables.lookup(ids.cuda())
    for layer_id, values in on_host.items():
        assert on_device[layer_id].device.type == "cuda"
        assert torch.equal(on_device[layer_id].cpu(), values)


def test_module_with_the_reference_parameter_name_loads_it(stores, tmp_path):
    out = tmp_path / "t.safetensors"
    export_inference(stores["float32"], out)
    store = open_tables(stores["float32"])
    ids = np.random.default_rng(2).integers(0, store.projection.vocab_size, (2, 5))
    rows = store.hasher().rows(ids)
    with safe_open(str(out), framework="pt") as handle:
        for layer_id in store.layer_ids:
            module = torch.nn.Module()
            module.multi_head_embedding = torch.nn.Module()
            module.multi_head_embedding.embedding = torch.nn.Embedding(store.spec.rows(layer_id), store.spec.dim)
            key = DEFAULT_KEY_TEMPLATE.format(layer_id=layer_id)
            module.load_state_dict({"multi_head_embedding.embedding.weight": handle.get_tensor(key)})
            with torch.no_grad():
                out_rows = module.multi_head_embedding.embedding(torch.from_numpy(rows[layer_id]))
            assert np.array_equal(out_rows.numpy(), store.lookup(layer_id, rows[layer_id]))


def test_deepseek_import_needs_and_checks_the_spec(stores, tmp_path, projection, tiny_spec):
    out = tmp_path / "ds"
    export_inference(stores["bfloat16"], out, layout="deepseek-v41")
    (out / "tokenizer.json").unlink()  # an export of an older engram: no tokenizer beside the shards
    with pytest.raises(EngramError, match="has no tokenizer.json: give the projection"):
        import_checkpoint(out, tmp_path / "a")
    wrong = tiny_spec.replace(engram_vocab_size=(300, 420))
    with pytest.raises(EngramError, match=r"engram_vocab_size = \[300, 420\], but .*engram_config.json has"):
        import_checkpoint(out, tmp_path / "b", spec=wrong, projection=projection)
    (out / "engram_config.json").unlink()  # an export of an older engram: only the tensors
    with pytest.raises(EngramError, match="has no config.json with engram_\\* keys: give its spec"):
        import_checkpoint(out, tmp_path / "a")
    with pytest.raises(EngramError, match="layer 1 .* says"):
        import_checkpoint(out, tmp_path / "b", spec=wrong, projection=projection)
    report = import_checkpoint(out, tmp_path / "c", spec=tiny_spec, projection=projection, layers=[3])
    assert list(report.layers) == [3] and report.complete and report.notes
    partial = open_tables(tmp_path / "c")
    assert partial.layer_ids == (3,) and partial.head_sizes(3) == tiny_spec.head_sizes(3)
    assert partial.spec.layer_ids == tiny_spec.layer_ids
    with pytest.raises(EngramError, match="layer 1 is not in the store"):
        partial.read_rows(1, 0, 1)
    tables = EngramTables.open(out, spec=tiny_spec, projection=projection)
    assert torch.equal(
        as_float32(np.asarray(partial.read_rows(3, 0, tables.rows(3)))),
        tables.gather(3, torch.arange(tables.rows(3))).float(),
    )
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()


def _fill_half(layout, directory: str, name: str, begin: int, values: np.ndarray) -> None:
    writer = SafetensorsWriter(layout, directory, create=False)
    writer.write_rows(name, begin, values)
    writer.close()


def test_writer_fills_row_ranges_independently_from_other_processes(tmp_path):
    """The header is fixed first, so separate processes can fill (tensor, row range)s by position."""
    rng = np.random.default_rng(4)
    a = rng.standard_normal((37, 8)).astype(np.float32)
    b = rng.integers(0, 255, (50, 3)).astype(np.uint8)
    ids = np.arange(5, dtype=np.int64)
    layout = plan_layout(
        [TensorPlan("a", "F32", a.shape), TensorPlan("b", "U8", b.shape), TensorPlan("ids", "I64", ids.shape)],
        {"k": "v"},
        max_shard_bytes=1000,
    )
    assert len(layout.files) == 2
    writer = SafetensorsWriter(layout, tmp_path, create=True)
    pieces = [("b", 20, b[20:]), ("a", 0, a[:20]), ("a", 20, a[20:]), ("b", 0, b[:20]), ("ids", 0, ids)]
    context = multiprocessing.get_context("spawn")
    with context.Pool(2) as pool:
        pool.starmap(_fill_half, [(layout, str(tmp_path), *piece) for piece in pieces])
    writer.write_index()
    tensors, metadata = read_all(tmp_path)
    assert metadata == {"k": "v"}
    assert np.array_equal(tensors["a"].numpy(), a) and np.array_equal(tensors["b"].numpy(), b)
    assert np.array_equal(tensors["ids"].numpy(), ids)
    for plan in layout.files:  # every tensor starts at a multiple of its item size
        for name, start in plan.starts.items():
            assert start % np.dtype({"a": np.float32, "b": np.uint8, "ids": np.int64}[name]).itemsize == 0
    with pytest.raises(ValueError):
        writer.write_rows("a", 30, a[:10])


def test_cli_export_import_and_bad_input(stores, tmp_path):
    out = tmp_path / "inf"
    report = engram_json("export", str(stores["bfloat16"]), "--for", "inference", "-o", str(out))
    assert report["files"] == ["model.safetensors"] and report["layout"] == "engram"
    assert report["bytes"] > 0 and report["conversion"]["lossy"] is False
    again = run_engram("export", str(stores["bfloat16"]), "--for", "inference", "-o", str(out))
    assert again.returncode == 1 and "--overwrite" in again.stderr
    imported = engram_json("import", str(out), "-o", str(tmp_path / "back"))
    assert imported["complete"] and imported["layout"] == "engram"
    assert same_bits(table(tmp_path / "back", 1), table(stores["bfloat16"], 1))
    proc = run_engram(
        "export",
        str(stores["bfloat16"]),
        "--for",
        "inference",
        "-o",
        str(tmp_path / "x"),
        "--layout",
        "deepseek-v41",
        "--dtype",
        "float16",
    )
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 1 and len(lines) == 1 and "fp8 only" in lines[0], proc.stderr
    for options, message in [
        ({"layout": "nope"}, "unknown layout"),
        ({"dtype": "int8"}, "unknown dtype"),
        ({"per_head": True}, "apply to --for training"),
        ({"max_shard_size": "lots"}, "cannot read size"),
        ({"key_template": "t.{head}"}, "unknown field|needs {layer_id}|--per-head"),
    ]:
        with pytest.raises(EngramError, match=message):
            run_export(str(stores["bfloat16"]), tmp_path / "x", target="inference", **options)
    (tmp_path / "junk.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00not json at all!")
    with pytest.raises(EngramError, match="not a safetensors file"):
        import_checkpoint(tmp_path / "junk.safetensors", tmp_path / "y")
    assert not (tmp_path / "x").exists() and not (tmp_path / "y").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["back", "inf", "junk.safetensors"]


def test_refuses_incomplete_stores_and_odd_widths(tmp_path, projection, tiny_spec):
    store = create_store(tmp_path / "partial", tiny_spec, projection, shards=2)
    store.build_shard(1, 0)
    proc = run_engram("export", str(tmp_path / "partial"), "--for", "inference", "-o", str(tmp_path / "o"))
    assert proc.returncode == 1 and "incomplete" in proc.stderr and "layer 1" in proc.stderr
    narrow = tiny_spec.replace(n_embed_per_ngram=48)
    build_tables(narrow, tmp_path / "narrow", projection=projection)
    with pytest.raises(EngramError, match="multiple of 32"):
        export_inference(tmp_path / "narrow", tmp_path / "o", dtype="float8_e4m3fn")
    assert not (tmp_path / "o").exists()


def test_a_damaged_projection_in_an_export_is_refused(stores, tmp_path):
    """Edit one id of the lookup inside a safetensors export: its recorded fingerprint no
    longer matches, and opening it (for lookups or import) says so instead of hashing wrongly."""
    path = tmp_path / "t.safetensors"
    export_inference(stores["float32"], path)
    from safetensors import safe_open

    with safe_open(str(path), "np") as handle:
        lookup = handle.get_tensor("engram.projection.lookup")
    data = bytearray(path.read_bytes())
    header = int.from_bytes(data[:8], "little")
    import json as _json

    begin = _json.loads(data[8 : 8 + header])["engram.projection.lookup"]["data_offsets"][0] + 8 + header
    data[begin : begin + 8] = int(lookup[0] + 1).to_bytes(8, "little", signed=True)
    path.write_bytes(bytes(data))
    with pytest.raises(EngramError, match="does not match its recorded fingerprint"):
        EngramTables.open(path)
