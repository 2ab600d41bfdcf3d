"""A spec names its tokenizer: the projection every command and `NgramHasher(spec)` use without one,
derived once and cached by the tokenizer's sha256, and refused when its size is not the spec's."""

from __future__ import annotations

import hashlib
import json

import numpy as np
import pytest
from engram_cli import EngramError, NgramHasher, open_tables
from engram_cli.spec import TableSpec, load_spec, preset_names, spec_from_dict
from engram_cli.store.build import build_tables
from engram_cli.tokenizer import embedded_names, load_tokenizer
from engram_cli.vocab import NORMALIZER_VERSION, compress_vocab, default_projection, tokenizer_projection

from conftest import engram_json, make_byte_level_tokenizer, run_engram, shipped_tokenizer

V41_MULTIPLIERS = [76632096046245, 4839876093313, 35959672319349, 73987337458391]


def test_v41_preset_hashes_with_the_deepseek_v4_projection():
    spec = load_spec("deepseek-v4.1-flash")
    assert (spec.tokenizer, spec.compressed_vocab_size) == ("embedded:deepseek-v4", 99_092)
    hasher = NgramHasher(spec)
    assert hasher.projection.compressed_size == 99_092
    derived = compress_vocab(shipped_tokenizer("deepseek-v4"))  # from the shipped file, not the cache
    assert hasher.projection.fingerprint() == derived.fingerprint()
    assert hasher.multipliers(1).tolist() == V41_MULTIPLIERS
    assert (spec.rows(1), spec.rows(14)) == (384_006_168, 384_016_682)


@pytest.mark.parametrize("preset", sorted(set(preset_names()) - {"deepseek-v4.1-flash"}))
def test_other_presets_name_deepseek_v3(preset):
    spec = load_spec(preset)
    assert (spec.tokenizer, spec.compressed_vocab_size) == ("embedded:deepseek-v3", 98_627)
    assert NgramHasher(spec).projection.fingerprint() == default_projection().fingerprint()


def test_cli_hash_with_the_v41_preset_uses_its_tokenizer():
    data = engram_json("hash", "hello world", "--spec", "deepseek-v4.1-flash")
    assert data["compressed_size"] == 99_092
    assert data["layers"][0]["multipliers"] == V41_MULTIPLIERS
    v4 = load_tokenizer("embedded:deepseek-v4").tokenizer
    assert [t["id"] for t in data["tokens"]] == v4.encode("hello world").ids


def test_a_spec_without_a_tokenizer_keeps_the_deepseek_v3_default():
    spec = TableSpec(
        layer_ids=(1,), max_ngram_size=2, n_head_per_ngram=1, engram_vocab_size=(100,), n_embed_per_ngram=4, pad_id=2
    )
    assert spec.tokenizer is None and "tokenizer" not in spec.to_dict()["engram"]
    assert NgramHasher(spec).projection.fingerprint() == default_projection().fingerprint()


def test_projections_are_cached_by_tokenizer_sha256_and_normalizer(tmp_path, monkeypatch):
    monkeypatch.setenv("ENGRAM_CACHE_DIR", str(tmp_path))
    tokenizer_projection.cache_clear()
    try:
        data = load_tokenizer("embedded:qwen-3").json_bytes
        sha = hashlib.sha256(data).hexdigest()
        first = tokenizer_projection("embedded:qwen-3")
        cached = tmp_path / f"projection-{sha[:16]}-{NORMALIZER_VERSION}.safetensors"
        assert cached.is_file() and first.metadata["tokenizer_sha256"] == sha
        # a later process reads the file: plant one that differs and see it come back
        planted = type(first)(first.lookup[::-1].copy(), dict(first.metadata), first.tokenizer_json)
        planted.save(cached)
        tokenizer_projection.cache_clear()
        assert tokenizer_projection("embedded:qwen-3").fingerprint() == planted.fingerprint()
        # one recorded for another tokenizer (a prefix clash) is derived afresh
        planted.metadata["tokenizer_sha256"] = "0" * 64
        planted.save(cached)
        tokenizer_projection.cache_clear()
        assert tokenizer_projection("embedded:qwen-3").fingerprint() == first.fingerprint()
    finally:
        tokenizer_projection.cache_clear()


def test_a_projection_of_another_size_is_one_line_error_naming_both(tmp_path, projection_file):
    spec = load_spec("deepseek-v4.1-flash")
    with pytest.raises(EngramError, match=r"has 98,627 canonical ids, but spec deepseek-v4.1-flash says .* = 99,092"):
        NgramHasher(spec, default_projection())
    default_projection().save(tmp_path / "v3.safetensors")
    for command in (
        ["hash", "x", "--spec", "deepseek-v4.1-flash", "--projection", str(tmp_path / "v3.safetensors")],
        ["build-tables", "demo", "--projection", str(projection_file), "-o", str(tmp_path / "t.zarr")],
    ):
        proc = run_engram(*command)
        assert proc.returncode == 1 and proc.stderr.count("\n") == 1, proc.stderr
        assert "canonical ids, but spec" in proc.stderr and "compressed_vocab_size = " in proc.stderr
    assert "98,627" in proc.stderr and "has 5 canonical ids" in proc.stderr
    assert not (tmp_path / "t.zarr").exists()


@pytest.fixture(scope="module")
def projection():
    return compress_vocab(make_byte_level_tokenizer(["a", "b", "c", "d", "e"]))


def test_a_store_whose_projection_is_not_its_specs_size_is_refused(tmp_path, projection):
    spec = spec_from_dict({"engram": {**TINY, "compressed_vocab_size": projection.compressed_size}})
    build_tables(spec, tmp_path / "t.zarr", projection=projection)
    meta = tmp_path / "t.zarr" / "zarr.json"
    doc = json.loads(meta.read_text())
    doc["attributes"]["engram"]["spec"]["engram"]["compressed_vocab_size"] = 6
    meta.write_text(json.dumps(doc))
    with pytest.raises(
        EngramError, match=r"projection .*has 5 canonical ids, but spec custom says compressed_vocab_size = 6"
    ):
        open_tables(tmp_path / "t.zarr").projection  # noqa: B018


TINY = {
    "layer_ids": [1],
    "max_ngram_size": 2,
    "n_head_per_ngram": 1,
    "engram_vocab_size": [50],
    "n_embed_per_ngram": 4,
    "pad_id": 0,
}


def test_build_tables_without_a_projection_uses_the_specs_tokenizer(tmp_path):
    spec = spec_from_dict({"engram": {**TINY, "tokenizer": "embedded:deepseek-v4", "compressed_vocab_size": 99_092}})
    build_tables(spec, tmp_path / "t.zarr")
    store = open_tables(tmp_path / "t.zarr")
    assert store.projection.compressed_size == 99_092
    assert store.spec.tokenizer == "embedded:deepseek-v4"
    assert store.hasher().multipliers(1).tolist() == spec.multipliers(1, 99_092).tolist()


def test_spec_fields_round_trip_and_bad_values_are_named(tmp_path):
    spec = load_spec("deepseek-v4.1-flash")
    assert spec_from_dict(spec.to_dict()) == spec
    for change, field in [
        ({"tokenizer": ""}, "spec field tokenizer"),
        ({"tokenizer": 3}, "spec field tokenizer"),
        ({"compressed_vocab_size": 0}, "spec field compressed_vocab_size"),
        ({"compressed_vocab_size": "99092"}, "spec field compressed_vocab_size"),
    ]:
        with pytest.raises(EngramError, match=field):
            spec_from_dict({"engram": {**TINY, **change}})


def test_a_tokenizer_path_is_relative_to_the_spec_file(tmp_path):
    folder = tmp_path / "specs"
    folder.mkdir()
    tok = make_byte_level_tokenizer(["a", "b", "ab", "c"])
    tok.save(str(folder / "tok.json"))
    lines = "\n".join(f"{k} = {json.dumps(v)}" for k, v in TINY.items())
    (folder / "mine.toml").write_text(f'[engram]\n{lines}\ntokenizer = "tok.json"\ncompressed_vocab_size = 4\n')
    data = engram_json("hash", "abc", "--spec", str(folder / "mine.toml"), cwd=tmp_path)
    assert data["compressed_size"] == 4 and [t["id"] for t in data["tokens"]] == tok.encode("abc").ids
    expected = NgramHasher(load_spec(folder / "mine.toml"), compress_vocab(tok)).hash(np.array(tok.encode("abc").ids))
    assert [t["ngrams"][0]["buckets"]["1"] for t in data["tokens"]] == expected[1].tolist()


def test_compress_vocab_takes_embedded_names(tmp_path):
    assert {"deepseek-v3", "deepseek-v4", "qwen-3"} <= set(embedded_names())
    out = tmp_path / "q.safetensors"
    report = engram_json("compress-vocab", "embedded:qwen-3", "-o", str(out))
    assert report["source"] == "embedded:qwen-3"
    assert report["compressed_size"] == compress_vocab(shipped_tokenizer("qwen-3")).compressed_size
    proc = run_engram("compress-vocab", "embedded:nope", "-o", str(out), "--overwrite")
    assert proc.returncode == 1 and "no embedded tokenizer named 'nope'" in proc.stderr and "deepseek-v4" in proc.stderr
