"""GGUF for llama.cpp: kernels against the `gguf` package, files written by its GGUFWriter, round
trips store -> gguf -> store, split sets, `--into`, and the one-line errors."""

from __future__ import annotations

import struct
from pathlib import Path

import gguf
import numpy as np
import pytest
from engram_cli.checkpoints.gguf_export import export_gguf
from engram_cli.checkpoints.gguf_file import read_header
from engram_cli.checkpoints.gguf_format import PREFIX, gguf_hashing, tensor_name
from engram_cli.checkpoints.gguf_quants import dequantize_rows, largest_change, quantize_measured, quantize_rows
from engram_cli.checkpoints.importing import import_checkpoint
from engram_cli.errors import EngramError
from engram_cli.spec import TableSpec
from engram_cli.store.build import build_tables
from engram_cli.store.tables import open_tables
from engram_cli.vocab import VocabProjection, compress_vocab
from hypothesis import given, settings
from hypothesis import strategies as st

T = gguf.GGMLQuantizationType
K_QUANTS = (T.Q2_K, T.Q3_K, T.Q4_K, T.Q5_K, T.Q6_K)
# where each K-quant super-block keeps its float16 scales (d, and dmin where it has one)
HALF_FIELDS = {T.Q2_K: (80, 82), T.Q3_K: (108,), T.Q4_K: (0, 2), T.Q5_K: (0, 2), T.Q6_K: (208,)}


def tiny_spec(dim: int = 64, dtype: str = "float32", seed: int = 0) -> TableSpec:
    return TableSpec(
        layer_ids=(1, 3),
        max_ngram_size=3,
        n_head_per_ngram=2,
        engram_vocab_size=(300, 410),
        n_embed_per_ngram=2 * dim,
        pad_id=2,
        seed=seed,
        dtype=dtype,
        name="tiny",
    )


@pytest.fixture(scope="module")
def projection() -> VocabProjection:
    from conftest import letters_tokenizer

    return compress_vocab(letters_tokenizer())


@pytest.fixture(scope="module")
def stores(tmp_path_factory, projection) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("stores")
    made = {}
    for dtype in ("bfloat16", "float32"):
        build_tables(tiny_spec(dtype=dtype), root / dtype, projection=projection, shards=2)
        made[dtype] = root / dtype
    return made


def table(store: Path, layer_id: int) -> np.ndarray:
    opened = open_tables(store)
    return np.asarray(opened.read_rows(layer_id, 0, opened.spec.rows(layer_id)))


def f32(values: np.ndarray) -> np.ndarray:
    return np.asarray(values).astype(np.float32)


# --- kernels -------------------------------------------------------------------------------------


@settings(max_examples=40, deadline=None)
@given(
    seed=st.integers(0, 2**32 - 1),
    rows=st.integers(1, 9),
    blocks=st.integers(1, 4),
    scale=st.sampled_from([0.0, 1e-30, 1e-6, 1.0, 3e4, 1e30]),
)
def test_quantize_is_bit_identical_to_the_gguf_package(seed, rows, blocks, scale):
    rng = np.random.default_rng(seed)
    x = (rng.standard_normal((rows, 32 * blocks)) * scale).astype(np.float32)
    x[0, :32] = np.where(rng.random(32) < 0.3, 0, x[0, :32])  # zeros and ties within a block
    x[-1, -1] = -abs(x[-1]).max()  # a negative maximum (Q4_0 takes its sign)
    for qtype in (T.Q8_0, T.Q4_0, T.F16, T.BF16, T.F32):
        ours = quantize_rows(x, qtype)
        with np.errstate(over="ignore"):  # scales past float16 become inf, in both
            reference = gguf.quants.quantize(x, qtype).view(np.uint8).reshape(ours.shape)
        assert ours.tobytes() == reference.tobytes(), qtype.name


@settings(max_examples=60, deadline=None)
@given(st.lists(st.integers(0, 2**32 - 1), min_size=1, max_size=64))
def test_half_casts_agree_with_numpy_for_every_bit_pattern(patterns):
    """Subnormals, overflow, infinities and NaN payloads, as numpy (F16) and ggml (BF16) cast them."""
    x = np.array(patterns, dtype=np.uint32).view(np.float32).reshape(1, -1)
    with np.errstate(all="ignore"):
        assert quantize_rows(x, T.F16).tobytes() == x.astype(np.float16).tobytes()
        assert quantize_rows(x, T.BF16).tobytes() == gguf.quants.quantize(x, T.BF16).tobytes()


def valid_blocks(rng: np.random.Generator, qtype: T, count: int) -> np.ndarray:
    """Random blocks of `qtype` whose float16 scales are finite (any bits elsewhere are valid)."""
    size = gguf.GGML_QUANT_SIZES[qtype][1]
    blocks = rng.integers(0, 256, (count, size), dtype=np.uint8)
    if qtype in HALF_FIELDS:
        for at in HALF_FIELDS[qtype]:
            scales = (rng.standard_normal(count) * 10.0 ** rng.integers(-6, 3, count)).astype(np.float16)
            blocks[:, at : at + 2] = scales.view(np.uint8).reshape(count, 2)
    elif qtype in (T.Q8_0, T.Q4_0):
        blocks[:, 0:2] = rng.standard_normal(count).astype(np.float16).view(np.uint8).reshape(count, 2)
    return blocks


@settings(max_examples=25, deadline=None)
@given(seed=st.integers(0, 2**32 - 1), rows=st.integers(1, 5), per_row=st.integers(1, 3))
def test_dequantize_equals_the_gguf_package(seed, rows, per_row):
    rng = np.random.default_rng(seed)
    for qtype in (T.Q8_0, T.Q4_0, *K_QUANTS):
        block = gguf.GGML_QUANT_SIZES[qtype][0]
        data = valid_blocks(rng, qtype, rows * per_row).reshape(rows, -1)
        ours = dequantize_rows(data, qtype, block * per_row)
        reference = gguf.quants.dequantize(data, qtype).reshape(ours.shape)
        assert ours.tobytes() == reference.tobytes(), qtype.name
    values = rng.standard_normal((rows, 32 * per_row)).astype(np.float32)
    for qtype, stored in ((T.F32, values), (T.F16, values.astype(np.float16))):
        raw = stored.view(np.uint8)
        assert (
            dequantize_rows(raw, qtype, values.shape[1]).tobytes() == f32(gguf.quants.dequantize(raw, qtype)).tobytes()
        )
    raw = gguf.quants.quantize(values, T.BF16)
    assert dequantize_rows(raw, T.BF16, values.shape[1]).tobytes() == gguf.quants.dequantize(raw, T.BF16).tobytes()


def test_largest_change_and_what_q8_0_cannot_hold():
    x = np.random.default_rng(3).standard_normal((4, 64)).astype(np.float32)
    data = quantize_rows(x, T.Q8_0)
    back = gguf.quants.dequantize(data, T.Q8_0).reshape(x.shape)
    assert largest_change(x, data, T.Q8_0) == float(np.abs(back - x).max())
    for qtype in (T.Q8_0, T.Q4_0, T.F16, T.BF16):
        measured = quantize_measured(x, qtype)
        assert measured[1] == largest_change(x, measured[0], qtype), qtype.name
    for bad in (np.inf, np.nan, 1e38):  # a block with inf or nan is all nan; 1e38 / 127 overflows float16
        x[2, 5] = bad
        assert largest_change(x, quantize_rows(x, T.Q8_0), T.Q8_0) == np.inf
        assert quantize_measured(x, T.Q8_0)[1] == quantize_measured(x, T.Q4_0)[1] == np.inf


def test_large_calls_split_over_threads_give_the_same_bytes(monkeypatch):
    """A call cut into pieces on threads writes and measures what one pass over all rows does."""
    from engram_cli.checkpoints import gguf_quants

    monkeypatch.setattr(gguf_quants, "_PIECE_VALUES", 1024)
    monkeypatch.setattr(gguf_quants, "cpu_count", lambda: 3)
    x = (np.random.default_rng(5).standard_normal((301, 64)) * np.linspace(0.1, 9, 301)[:, None]).astype(np.float32)
    for qtype in (T.Q8_0, T.Q4_0):
        data, change = quantize_measured(x, qtype)
        assert data.tobytes() == gguf.quants.quantize(x, qtype).tobytes(), qtype.name
        back = gguf.quants.dequantize(data, qtype).reshape(x.shape)
        assert change == float(np.abs(back - x).max()), qtype.name  # the largest change is in the last piece
        assert dequantize_rows(data, qtype, 64).tobytes() == back.tobytes(), qtype.name
        y = x.copy()
        y[150, 3] = np.inf  # in the middle piece
        assert quantize_measured(y, qtype)[1] == np.inf, qtype.name


# --- round trips ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("store_dtype", "quant"), [("float32", "f32"), ("bfloat16", "bf16"), ("float32", "q8_0"), ("float32", "q4_0")]
)
def test_store_to_gguf_to_store(stores, tmp_path, projection, store_dtype, quant):
    out = tmp_path / "tables.gguf"
    report = export_gguf(stores[store_dtype], out, quant=quant)
    assert report.layout == "gguf" and report.files == ["tables.gguf"] and report.bytes == out.stat().st_size
    reader = gguf.GGUFReader(out)  # the real package reads what we wrote
    fields = reader.fields
    assert fields["general.architecture"].contents() == "deepseek41"
    assert fields[PREFIX + "layer_ids"].contents() == [1, 3]
    assert fields[PREFIX + "pad_id"].contents() == projection.canonical_pad(2)
    spec = tiny_spec(dtype=store_dtype)
    primes = [p for layer in spec.layer_ids for p in spec.head_sizes(layer)]
    assert fields[PREFIX + "primes"].contents() == primes
    tensors = {t.name: t for t in reader.tensors}
    largest = 0.0
    back = tmp_path / "back"
    imported = import_checkpoint(out, back, dtype="float32" if quant in ("q8_0", "q4_0") else None)
    assert imported.format == "gguf" and imported.complete
    assert open_tables(back).spec == spec.replace(dtype=imported.dtype)
    assert open_tables(back).projection.fingerprint() == projection.fingerprint()
    for layer in spec.layer_ids:
        tensor = tensors[tensor_name(layer)]
        assert tensor.tensor_type == gguf.GGMLQuantizationType[quant.upper()]
        assert list(tensor.shape) == [spec.dim, spec.rows(layer)]  # ggml order {head_dim, rows}
        original = table(stores[store_dtype], layer)
        values = table(back, layer)
        if quant in ("f32", "bf16"):
            assert values.dtype == original.dtype and values.tobytes() == original.tobytes()
        else:
            reference = gguf.quants.dequantize(gguf.quants.quantize(f32(original), T[quant.upper()]), T[quant.upper()])
            assert values.tobytes() == f32(reference).tobytes()
            largest = max(largest, float(np.abs(reference - original).max()))
    assert report.conversion["lossy"] == (quant in ("q8_0", "q4_0"))
    assert report.conversion["max_abs_error"] == largest


def write_model(
    path: Path,
    spec: TableSpec,
    projection: VocabProjection,
    tables: dict[int, tuple[np.ndarray, T]],
    *,
    extra: bool = True,
    split: int = 0,
    token_map: np.ndarray | None = None,
    primes: list[int] | None = None,
) -> None:
    """A V4.1-shaped GGUF written by the gguf package, as llama.cpp's converter writes one."""
    writer = gguf.GGUFWriter(path, "deepseek41", split_max_tensors=split)
    compressed = projection.compressed_size
    hashing = [spec.layer_hashing(layer, compressed) for layer in spec.layer_ids]
    writer.add_name("tiny-model")
    if extra:
        writer.add_token_list(["a", "b", "c"])
        writer.add_uint32("deepseek41.block_count", 4)
    writer.add_array(PREFIX + "layer_ids", list(spec.layer_ids))
    writer.add_uint32(PREFIX + "head_count", spec.n_head_per_ngram)
    writer.add_uint32(PREFIX + "key_length", spec.dim)
    writer.add_uint32(PREFIX + "max_ngram_size", spec.max_ngram_size)
    writer.add_key_value(
        PREFIX + "multipliers",
        [m for h in hashing for m in h["multipliers"]],
        gguf.GGUFValueType.ARRAY,
        sub_type=gguf.GGUFValueType.UINT64,
    )
    writer.add_key_value(
        PREFIX + "primes",
        primes or [p for h in hashing for p in h["head_sizes"]],
        gguf.GGUFValueType.ARRAY,
        sub_type=gguf.GGUFValueType.UINT64,
    )
    writer.add_key_value(
        PREFIX + "offsets",
        [o for h in hashing for o in h["offsets"]],
        gguf.GGUFValueType.ARRAY,
        sub_type=gguf.GGUFValueType.UINT64,
    )
    writer.add_key_value(
        PREFIX + "token_map",
        (projection.lookup if token_map is None else token_map).tolist(),
        gguf.GGUFValueType.ARRAY,
        sub_type=gguf.GGUFValueType.INT32,
    )
    writer.add_uint32(PREFIX + "pad_id", projection.canonical_pad(spec.pad_id))
    rng = np.random.default_rng(5)
    if extra:
        writer.add_tensor("token_embd.weight", rng.standard_normal((7, 32)).astype(np.float32))
    for layer, (data, qtype) in tables.items():
        if extra:
            writer.add_tensor(f"blk.{layer}.attn_norm.weight", rng.standard_normal(32).astype(np.float32))
        writer.add_tensor(tensor_name(layer), data, raw_dtype=qtype)
    if extra:
        writer.add_tensor(
            "output.weight",
            gguf.quants.quantize(rng.standard_normal((3, 64)).astype(np.float32), T.Q8_0),
            raw_dtype=T.Q8_0,
        )
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def test_a_model_gguf_with_every_quant_type(tmp_path, projection):
    """Tables in each type ggml has, the spec derived from the keys alone (no engram.spec)."""
    spec = tiny_spec(dim=256, seed=0)
    rng = np.random.default_rng(1)
    for qtype in (T.F32, T.F16, T.BF16, T.Q8_0, T.Q4_0, *K_QUANTS):
        tables = {}
        for layer in spec.layer_ids:
            rows = spec.rows(layer)
            if qtype in (T.F32, T.F16, T.BF16):
                values = rng.standard_normal((rows, spec.dim)).astype(np.float32)
                data = (
                    gguf.quants.quantize(values, qtype)
                    if qtype == T.BF16
                    else values.astype(gguf.quants.quantize(values, qtype).dtype)
                )
            else:
                data = valid_blocks(rng, qtype, rows * spec.dim // gguf.GGML_QUANT_SIZES[qtype][0]).reshape(rows, -1)
            tables[layer] = (data, qtype)
        path = tmp_path / f"model-{qtype.name}.gguf"
        write_model(path, spec, projection, tables)
        derived, own, _ = gguf_hashing(read_header(path))
        for layer in spec.layer_ids:
            assert derived.layer_hashing(layer, own.compressed_size) == spec.layer_hashing(layer, own.compressed_size)
        assert own.fingerprint() == projection.fingerprint() and derived.rows(1) == spec.rows(1)
        back = tmp_path / f"back-{qtype.name}"
        import_checkpoint(path, back, dtype="float32")
        for layer, (data, _) in tables.items():
            expected = f32(gguf.quants.dequantize(data.view(np.uint8) if qtype not in (T.F32, T.F16) else data, qtype))
            assert table(back, layer).tobytes() == expected.reshape(-1, spec.dim).tobytes(), qtype.name


def test_split_set_and_layers(tmp_path, projection, stores):
    spec = tiny_spec()
    tables = {layer: (f32(table(stores["float32"], layer)), T.F32) for layer in spec.layer_ids}
    write_model(tmp_path / "m.gguf", spec, projection, tables, split=2)
    names = sorted(p.name for p in tmp_path.glob("m-*.gguf"))
    assert len(names) > 1 and names[0].endswith("-00001-of-" + f"{len(names):05d}.gguf")
    back = tmp_path / "back"
    report = import_checkpoint(tmp_path / names[0], back, layers=[3])
    assert list(report.layers) == [3]
    assert table(back, 3).tobytes() == tables[3][0].tobytes()
    (tmp_path / names[-1]).unlink()
    with pytest.raises(EngramError, match="is missing"):
        import_checkpoint(tmp_path / names[0], tmp_path / "again")


def test_into_replaces_only_the_engram_keys_and_tensors(tmp_path, projection, stores):
    spec = tiny_spec()
    zeros = {layer: (np.zeros((spec.rows(layer), spec.dim), np.float32), T.F32) for layer in spec.layer_ids}
    model = tmp_path / "model.gguf"
    write_model(model, spec, projection, zeros)
    out = tmp_path / "model-trained.gguf"
    export_gguf(stores["float32"], out, quant="q8_0", into=model)
    before, after = gguf.GGUFReader(model), gguf.GGUFReader(out)
    raw = {name: b"".join(bytes(p) for p in field.parts) for name, field in before.fields.items()}
    kept = [name for name in before.fields if not name.startswith((PREFIX, "GGUF."))]
    assert kept and all(raw[name] == b"".join(bytes(p) for p in after.fields[name].parts) for name in kept)
    assert after.fields[PREFIX + "pad_id"].contents() == before.fields[PREFIX + "pad_id"].contents()
    old = {t.name: t for t in before.tensors}
    new = {t.name: t for t in after.tensors}
    assert list(old) == list(new)  # the model's order
    for name, tensor in old.items():
        if "engram_embd" in name:
            layer = int(name.split(".")[1])
            assert new[name].tensor_type == T.Q8_0
            expected = gguf.quants.quantize(f32(table(stores["float32"], layer)), T.Q8_0)
            assert bytes(new[name].data) == expected.tobytes()
        else:
            assert new[name].tensor_type == tensor.tensor_type and bytes(new[name].data) == bytes(tensor.data)
    other = TableSpec(**{**tiny_spec().__dict__, "layer_ids": (1, 2)})
    build_tables(other, tmp_path / "other", projection=projection)
    with pytest.raises(EngramError, match=r"layers \[1, 3\], but the store has layers \[1, 2\]"):
        export_gguf(tmp_path / "other", tmp_path / "x.gguf", into=model)


# --- errors --------------------------------------------------------------------------------------


def one_line_error(path: Path, tmp_path: Path) -> str:
    from conftest import run_engram

    done = run_engram("import", str(path), "-o", str(tmp_path / "never"))
    lines = done.stderr.strip().splitlines()
    assert done.returncode != 0 and len(lines) == 1 and lines[0].startswith("engram: error:"), done.stderr
    assert not (tmp_path / "never").exists()
    return lines[0]


def test_one_line_errors(tmp_path, projection, stores):
    spec = tiny_spec()
    tables = {layer: (f32(table(stores["float32"], layer)), T.F32) for layer in spec.layer_ids}

    plain = gguf.GGUFWriter(tmp_path / "plain.gguf", "llama")
    plain.add_tensor("token_embd.weight", np.ones((2, 32), np.float32))
    plain.write_header_to_file()
    plain.write_kv_data_to_file()
    plain.write_tensors_to_file()
    plain.close()
    assert "holds no Engram tables" in one_line_error(tmp_path / "plain.gguf", tmp_path)

    good = tmp_path / "good.gguf"
    write_model(good, spec, projection, tables, extra=False)
    cut = tmp_path / "cut.gguf"
    cut.write_bytes(good.read_bytes()[:-100])
    assert "is truncated" in one_line_error(cut, tmp_path)
    cut.write_bytes(good.read_bytes()[:300])
    assert "truncated" in one_line_error(cut, tmp_path)

    # the first table's rows enlarged in its tensor info: its size now runs into the next tensor
    data = bytearray(good.read_bytes())
    name = tensor_name(1).encode()
    at = data.index(struct.pack("<Q", len(name)) + name) + 8 + len(name) + 4 + 8
    struct.pack_into("<Q", data, at, spec.rows(1) + 5)
    bad = tmp_path / "bad-size.gguf"
    bad.write_bytes(bytes(data))
    assert "disagrees with its shape and type" in one_line_error(bad, tmp_path)

    gap = projection.lookup.copy()
    gap[gap == gap.max()] = gap.max() + 1  # canonical id max is never used
    write_model(tmp_path / "gap.gguf", spec, projection, tables, extra=False, token_map=gap)
    assert "token_map is not a projection" in one_line_error(tmp_path / "gap.gguf", tmp_path)

    primes = [p for layer in spec.layer_ids for p in spec.head_sizes(layer)]
    primes[5] += 2
    write_model(tmp_path / "primes.gguf", spec, projection, tables, extra=False, primes=primes)
    message = one_line_error(tmp_path / "primes.gguf", tmp_path)
    assert "primes of layer 3 [order 2 head 1]" in message and f"gives {primes[5] - 2:,}" in message


def test_cli_export_and_import(stores, tmp_path):
    from engram_cli.cli.commands import run_export

    from conftest import engram_json, run_engram

    out = tmp_path / "t.gguf"
    report = engram_json(
        "export", str(stores["bfloat16"]), "--for", "inference", "--layout", "gguf", "--quant", "bf16", "-o", str(out)
    )
    assert report["layout"] == "gguf" and report["dtype"] == "bf16" and report["files"] == ["t.gguf"]
    back = engram_json("import", str(out), "-o", str(tmp_path / "back"))
    assert back["format"] == "gguf" and back["dtype"] == "bfloat16" and back["conversion"]["lossy"] is False
    assert table(tmp_path / "back", 1).tobytes() == table(stores["bfloat16"], 1).tobytes()
    shown = run_engram(
        "export", str(stores["float32"]), "--for", "inference", "--layout", "gguf", "-o", str(tmp_path / "q.gguf")
    )
    assert shown.returncode == 0 and "GGUF for llama.cpp" in shown.stderr
    assert "lossy conversion float32 -> q8_0" in shown.stderr
    for options, message in [
        ({"layout": "gguf", "dtype": "float32"}, "see --quant"),
        ({"layout": "gguf", "quant": "q5_0"}, "unknown --quant"),
        ({"quant": "q8_0"}, "apply to --layout gguf"),
    ]:
        with pytest.raises(EngramError, match=message):
            run_export(str(stores["bfloat16"]), tmp_path / "x.gguf", target="inference", **options)
    with pytest.raises(EngramError, match="already exists; pass --overwrite"):
        export_gguf(stores["bfloat16"], out)
    with pytest.raises(EngramError, match="one .gguf file"):
        export_gguf(stores["bfloat16"], tmp_path / "x.safetensors")
