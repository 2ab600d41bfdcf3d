"""`engram import MODEL_DIR`: a DeepSeek-V4.1-shaped Hugging Face folder, built here with the real
safetensors library, imported and compared element by element with the engines' dequantization
float32(e4m3) * 2**(scale - 127), rounded to the store dtype."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from engram_cli import EngramError, EngramTables, NgramHasher, open_tables
from engram_cli.checkpoints.importing import import_checkpoint
from engram_cli.checkpoints.model_config import config_keys
from engram_cli.checkpoints.safetensors_export import export_inference
from engram_cli.spec import load_spec
from engram_cli.store.build import build_tables
from engram_cli.vocab import compress_vocab, load_projection

from conftest import engram_json, make_byte_level_tokenizer, run_engram
from model_folders import PIECES, SPEC, dequantized, engram_config, stored, tokenizer, write_model


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    folder = tmp_path_factory.mktemp("v41") / "DeepSeek-V4.1-Tiny"
    return folder, write_model(folder)


@pytest.mark.parametrize("dtype", [None, "float32"])
def test_import_dequantizes_exactly_and_takes_spec_and_projection_from_the_folder(tmp_path, model, dtype):
    folder, made = model
    out = tmp_path / "store.zarr"
    report = engram_json("import", str(folder), "-o", str(out), *(["--dtype", dtype] if dtype else []))
    assert report["layout"] == "deepseek-v41" and report["source_dtype"] == "float8_e4m3fn"
    assert report["dtype"] == (dtype or "bfloat16")
    store = open_tables(out)
    assert store.layer_ids == (2, 5) and store.dtype == (dtype or "bfloat16")
    for field in ("layer_ids", "max_ngram_size", "n_head_per_ngram", "engram_vocab_size", "dim", "pad_id", "seed"):
        assert getattr(store.spec, field) == getattr(SPEC, field), field
    assert store.spec.compressed_vocab_size == made["projection"].compressed_size
    assert store.projection.fingerprint() == made["projection"].fingerprint()
    for layer, (codes, exps) in made["tables"].items():
        want = dequantized(codes, exps, dtype or "bfloat16")
        got = stored(store, layer)
        assert got.dtype == want.dtype and got.shape == want.shape
        same = (got == want) | (np.isnan(got.astype(np.float32)) & np.isnan(want.astype(np.float32)))
        assert same.all(), f"layer {layer}: {int((~same).sum())} values differ"
        assert np.isinf(want.astype(np.float32)[0]).any() and (want.astype(np.float32)[0] != 0).any()


def test_only_some_layers_and_lookup_straight_from_the_folder(tmp_path, model):
    folder, made = model
    report = import_checkpoint(folder, tmp_path / "one.zarr", layers=[5])
    assert list(report.layers) == [5]
    store = open_tables(tmp_path / "one.zarr")
    assert store.layer_ids == (5,)
    np.testing.assert_array_equal(
        stored(store, 5).view(np.uint16), dequantized(*made["tables"][5], "bfloat16").view(np.uint16)
    )
    tables = EngramTables.open(folder)  # spec and projection from the folder, on first lookup
    ids = np.array([[2, 3, 4, 9, 7]])
    rows = NgramHasher(tables.hasher().spec, made["projection"]).rows(ids)
    got = tables.lookup(ids)
    for layer in SPEC.layer_ids:
        want = dequantized(*made["tables"][layer], "bfloat16")[rows[layer]]
        np.testing.assert_array_equal(got[layer].view(torch.int16).numpy().view(np.uint16), want.view(np.uint16))


def test_given_spec_and_projection_must_agree_with_the_folder(tmp_path, model, demo_spec_file):
    folder, made = model
    agreeing = tmp_path / "agree.toml"
    agreeing.write_text(
        "[engram]\nlayer_ids = [2, 5]\nmax_ngram_size = 4\nn_head_per_ngram = 2\n"
        "engram_vocab_size = [40, 50, 60]\nn_embed_per_ngram = 128\npad_id = 1\n"
    )
    made["projection"].save(tmp_path / "own.safetensors")
    compress_vocab(make_byte_level_tokenizer([*PIECES, "zz"])).save(tmp_path / "other.safetensors")
    done = engram_json(
        "import", str(folder), "-o", str(tmp_path / "ok.zarr"), "--spec", str(agreeing),
        "--projection", str(tmp_path / "own.safetensors"),
    )  # fmt: skip
    assert done["complete"]
    proc = run_engram("import", str(folder), "-o", str(tmp_path / "bad.zarr"), "--spec", str(demo_spec_file))
    assert proc.returncode == 1 and proc.stderr.count("\n") == 1, proc.stderr
    assert proc.stderr.startswith(f"engram: error: spec demo has layer_ids = [1, 3], but {folder / 'config.json'}")
    for kwargs, message in [
        (
            {"spec": load_spec("deepseek-v4.1-flash")},
            r"has layer_ids = \[1, 14\], but .*config.json has engram_layer_ids",
        ),
        (
            {"spec": load_spec(agreeing), "projection": load_projection(tmp_path / "other.safetensors")},
            "is not that of .*tokenizer.json",
        ),
    ]:
        with pytest.raises(EngramError, match=message):
            import_checkpoint(folder, tmp_path / "bad.zarr", **kwargs)
    assert not (tmp_path / "bad.zarr").exists()


def test_folders_without_a_tokenizer_or_with_a_bad_config(tmp_path):
    bare = tmp_path / "bare"
    made = write_model(bare, seed=1, with_tokenizer=False)
    proc = run_engram("import", str(bare), "-o", str(tmp_path / "a.zarr"))
    assert proc.returncode == 1 and "has no tokenizer.json: give the projection of its tokenizer" in proc.stderr
    assert f"but {bare / 'config.json'} has engram_compressed_vocab_size" in proc.stderr
    made["projection"].save(tmp_path / "p.safetensors")
    import_checkpoint(bare, tmp_path / "a.zarr", projection=load_projection(tmp_path / "p.safetensors"))
    np.testing.assert_array_equal(
        stored(open_tables(tmp_path / "a.zarr"), 2).view(np.uint16),
        dequantized(*made["tables"][2], "bfloat16").view(np.uint16),
    )
    good = engram_config(SPEC, made["projection"].compressed_size)
    for change, message in [
        ({"engram_num_embeddings": [10, 20]}, "engram_num_embeddings is [10, 20], but the prime walk"),
        ({"engram_head_dim": "64"}, "engram_head_dim must be positive integers"),
        ({"engram_max_ngram_size": 1}, "max_ngram_size"),
        ({"engram_pad_token_id": None}, "engram_pad_token_id"),
    ]:
        folder = tmp_path / f"bad-{next(iter(change))}"
        keys = {**good, **change}
        if change.get("engram_pad_token_id", 0) is None:
            del keys["engram_pad_token_id"]
        write_model(folder, config=keys)
        with pytest.raises(EngramError) as info:
            import_checkpoint(folder, tmp_path / "b.zarr")
        assert message in str(info.value) and "config.json" in str(info.value) and "\n" not in str(info.value)


def test_v41_preset_config_keys_and_rows():
    keys = config_keys(load_spec("deepseek-v4.1-flash"), 99092)
    assert keys == {
        "engram_layer_ids": [1, 14],
        "engram_vocab_size": 16_000_000,  # an int, as in the released config
        "engram_max_ngram_size": 4,
        "engram_n_heads": 8,
        "engram_head_dim": 256,
        "engram_pad_token_id": 2,
        "engram_compressed_vocab_size": 99092,
        "engram_num_embeddings": [384_006_168, 384_016_682],
    }


def test_export_writes_engram_config_and_imports_back_without_a_spec(tmp_path):
    """`export --layout deepseek-v41` writes the engram_* keys beside its index; with a tokenizer
    placed beside them the folder imports back alone, exactly."""
    tok = tokenizer()
    tok.save(str(tmp_path / "tokenizer.json"))
    spec = SPEC.replace(seed=7, tokenizer=str(tmp_path / "tokenizer.json"))
    build_tables(spec, tmp_path / "t.zarr")
    report = export_inference(tmp_path / "t.zarr", tmp_path / "ds", layout="deepseek-v41")
    assert report.to_json()["config"] == "engram_config.json"
    written = json.loads((tmp_path / "ds" / "engram_config.json").read_text())
    projection = compress_vocab(tok)
    assert written == {**engram_config(SPEC, projection.compressed_size), "engram_seed": 7}
    (tmp_path / "ds" / "tokenizer.json").write_bytes((tmp_path / "tokenizer.json").read_bytes())
    import_checkpoint(tmp_path / "ds", tmp_path / "back.zarr")
    back, original = open_tables(tmp_path / "back.zarr"), open_tables(tmp_path / "t.zarr")
    assert back.spec.seed == 7 and back.projection.fingerprint() == projection.fingerprint()
    tables = EngramTables.open(tmp_path / "ds")
    for layer in SPEC.layer_ids:
        want = tables.gather(layer, torch.arange(tables.rows(layer)))
        got = torch.from_numpy(stored(back, layer).view(np.int16)).view(torch.bfloat16)
        assert torch.equal(got, want)
        assert stored(original, layer).shape == got.shape
