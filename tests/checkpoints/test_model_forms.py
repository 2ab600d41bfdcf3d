"""Model folders in every form published code writes them, and a model's config as a SPEC.

Configs: flat with the released names, composite (the text model's keys under `text_config`, as
transformers' DeepseekV41Config saves it), and the reference inference code's own argument names
(flat, `engram_pad_id`). Weights: the released names and the `model.`, `model.language_model.` and
`language_model.model.` prefixes of transformers' save_pretrained. Each folder is written here with
the real safetensors library and a real tokenizer, imported, and compared element by element with
the engines' dequantization (`model_folders.dequantized`).
"""

from __future__ import annotations

import json
from dataclasses import make_dataclass
from pathlib import Path

import numpy as np
import pytest
import torch
from engram_cli import EngramError, EngramTables, open_tables
from engram_cli.checkpoints.importing import import_checkpoint
from engram_cli.checkpoints.model_config import spec_from_model_config
from engram_cli.spec import TableSpec, load_spec
from engram_cli.store.build import build_tables
from engram_cli.vocab import compress_vocab
from huggingface_hub.dataclasses import strict
from huggingface_hub.errors import StrictDataclassFieldValidationError
from safetensors.torch import save_file

from conftest import engram_json, run_engram
from model_folders import SPEC, dequantized, engram_config, fp8_codes, stored, tokenizer

V41_ROWS = [384_006_168, 384_016_682]
V41_TEXT = {  # the Engram keys of DeepSeek-V4.1-Flash's config.json, under its text_config
    "engram_layer_ids": [1, 14],
    "engram_num_embeddings": V41_ROWS,
    "engram_max_ngram_size": 4,
    "engram_vocab_size": 16_000_000,
    "engram_n_heads": 8,
    "engram_head_dim": 256,
    "engram_pad_token_id": 2,
    "engram_compressed_vocab_size": 99_092,
}


def config_form(form: str, keys: dict) -> dict:
    """A config.json holding the engram_* `keys` in one of the published forms."""
    if form == "flat":  # the released names at the top level of a text model's config
        return {"architectures": ["DeepseekV4ForCausalLM"], "model_type": "deepseek_v4", "hidden_size": 16, **keys}
    if form == "composite":  # transformers' DeepseekV41Config: text_config and vision_config
        return {
            "architectures": ["DeepseekV41ForConditionalGeneration"],
            "model_type": "deepseek_v41",
            "text_config": {"model_type": "deepseek_v41_text", "hidden_size": 16, **keys},
            "vision_config": {"model_type": "deepseek_v41_vision", "hidden_size": 8},
            "image_token_id": 13,
        }
    assert form == "reference"  # the reference inference code's ModelArgs names, flat
    renamed = {("engram_pad_id" if k == "engram_pad_token_id" else k): v for k, v in keys.items()}
    return {"vocab_size": 14, "dim": 16, "n_layers": 6, "n_heads": 2, "vision_n_layers": 2, "dtype": "fp8", **renamed}


def write_folder(folder: Path, form: str, prefixes: tuple[str, ...] = ("",), seed: int = 0) -> dict:
    """A one-file model: Engram tables (fp8 with E8M0 scales) under each of `prefixes` beside
    other weights, config.json in `form`, tokenizer.json."""
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    tok = tokenizer()
    tok.save(str(folder / "tokenizer.json"))
    projection = compress_vocab(tok)
    tables, tensors = {}, {}
    for layer in SPEC.layer_ids:
        rows = SPEC.rows(layer)
        tables[layer] = (fp8_codes(rng, (rows, SPEC.dim)), rng.integers(0, 255, size=(rows, SPEC.dim // 32)))
        weight = torch.from_numpy(tables[layer][0]).view(torch.float8_e4m3fn)
        scale = torch.from_numpy(tables[layer][1].astype(np.uint8)).view(torch.float8_e8m0fnu)
        for prefix in prefixes:
            tensors[f"{prefix}layers.{layer}.engram.embed.weight"] = weight.clone()
            tensors[f"{prefix}layers.{layer}.engram.embed.scale"] = scale.clone()
            tensors[f"{prefix}layers.{layer}.attn.wkv.weight"] = torch.randn(4, 4).bfloat16()
    tensors["model.visual.blocks.0.attn.qkv.weight"] = torch.randn(4, 4)
    save_file(tensors, str(folder / "model.safetensors"), metadata={"format": "pt"})
    keys = engram_config(SPEC, projection.compressed_size)
    (folder / "config.json").write_text(json.dumps(config_form(form, keys), indent=2))
    return {"tables": tables, "projection": projection}


def same_hashing(spec: TableSpec, want: TableSpec) -> None:
    for field in ("layer_ids", "max_ngram_size", "n_head_per_ngram", "engram_vocab_size", "dim", "pad_id", "seed"):
        assert getattr(spec, field) == getattr(want, field), field


@pytest.mark.parametrize("form", ["flat", "composite", "reference"])
def test_each_config_form_describes_the_same_spec(tmp_path, form):
    made = write_folder(tmp_path / f"DeepSeek-{form}", form)
    for path in (tmp_path / f"DeepSeek-{form}", tmp_path / f"DeepSeek-{form}" / "config.json"):
        spec = spec_from_model_config(path)
        same_hashing(spec, SPEC)
        assert spec.compressed_vocab_size == made["projection"].compressed_size
        assert spec.tokenizer == str(tmp_path / f"DeepSeek-{form}" / "tokenizer.json")
        assert spec.name == f"DeepSeek-{form}"


@pytest.mark.parametrize(
    ("form", "prefix"),
    [
        ("flat", "model."),
        ("composite", "model.language_model."),
        ("reference", ""),
        ("composite", "language_model.model."),
    ],
)
def test_import_reads_every_config_form_and_weight_prefix_exactly(tmp_path, form, prefix):
    folder = tmp_path / "model"
    made = write_folder(folder, form, (prefix,))
    report = import_checkpoint(folder, tmp_path / "store.zarr", dtype="float32")
    assert report.layout == "deepseek-v41" and sorted(report.layers) == list(SPEC.layer_ids)
    store = open_tables(tmp_path / "store.zarr")
    same_hashing(store.spec, SPEC)
    assert store.projection.fingerprint() == made["projection"].fingerprint()
    for layer, (codes, exps) in made["tables"].items():
        want = dequantized(codes, exps, "float32")
        got = stored(store, layer)
        same = (got == want) | (np.isnan(got) & np.isnan(want))
        assert same.all(), f"layer {layer}: {int((~same).sum())} values differ"
    tables = EngramTables.open(folder)  # the read path finds the same tables under the prefix
    assert tables.layer_ids == SPEC.layer_ids
    assert tables.weight(2).shape == (SPEC.rows(2), SPEC.dim)


def test_two_candidate_tables_for_one_layer_are_refused(tmp_path):
    folder = tmp_path / "both"
    write_folder(folder, "flat", ("", "model."))
    proc = run_engram("import", str(folder), "-o", str(tmp_path / "x.zarr"))
    assert proc.returncode == 1 and proc.stderr.count("\n") == 1, proc.stderr
    assert "two tables for Engram layer 2: 'layers.2.engram.embed.weight' and 'model.layers.2" in proc.stderr
    assert not (tmp_path / "x.zarr").exists()


def test_pad_keys_are_read_in_either_name_and_two_that_differ_are_refused(tmp_path):
    keys = engram_config(SPEC, 12)
    both_equal = {**keys, "engram_pad_id": keys["engram_pad_token_id"]}
    (tmp_path / "equal").mkdir()
    (tmp_path / "equal" / "config.json").write_text(json.dumps(config_form("composite", both_equal)))
    assert spec_from_model_config(tmp_path / "equal").pad_id == SPEC.pad_id
    cases = {
        "differ": (
            config_form("flat", {**keys, "engram_pad_id": 5}),
            "has engram_pad_token_id = 1 but engram_pad_id = 5",
        ),
        "split": (
            {**config_form("composite", keys), "engram_pad_id": 5},
            "has engram_pad_token_id = 1 but engram_pad_id = 5",
        ),
        "levels": (
            {**config_form("composite", keys), "engram_head_dim": 32},
            "has engram_head_dim = 32 at the top level but 64 in text_config",
        ),
    }
    for name, (config, message) in cases.items():
        (tmp_path / name).mkdir()
        (tmp_path / name / "config.json").write_text(json.dumps(config))
        proc = run_engram("plan", str(tmp_path / name))
        assert proc.returncode == 1 and proc.stderr.count("\n") == 1, proc.stderr
        assert message in proc.stderr, proc.stderr


# The engram_* fields of the released config, typed as transformers' strict config types them: a
# key of another type, or one it does not know, fails to load. (Made with real types, not the
# strings that this module's `from __future__ import annotations` would leave, which go unchecked.)
ReleasedEngramKeys = strict(
    make_dataclass(
        "ReleasedEngramKeys",
        [
            ("engram_layer_ids", list[int]),
            ("engram_num_embeddings", list[int]),
            ("engram_max_ngram_size", int),
            ("engram_vocab_size", int),
            ("engram_n_heads", int),
            ("engram_head_dim", int),
            ("engram_pad_token_id", int),
            ("engram_compressed_vocab_size", int),
        ],
    )
)


def test_export_carries_its_tokenizer_and_config_and_imports_back_with_nothing_else(tmp_path):
    tok = tokenizer()
    tok.save(str(tmp_path / "tokenizer.json"))
    spec = SPEC.replace(engram_vocab_size=(50, 50, 50), tokenizer=str(tmp_path / "tokenizer.json"))
    build_tables(spec, tmp_path / "t.zarr")
    out = tmp_path / "ds"
    engram_json("export", str(tmp_path / "t.zarr"), "--for", "inference", "--layout", "deepseek-v41", "-o", str(out))
    assert (out / "tokenizer.json").read_bytes() == (tmp_path / "tokenizer.json").read_bytes()
    written = json.loads((out / "engram_config.json").read_text())
    loaded = ReleasedEngramKeys(**written)  # the released keys, each of the released type
    assert loaded.engram_vocab_size == 50 and type(written["engram_vocab_size"]) is int
    assert written["engram_num_embeddings"] == [spec.rows(layer) for layer in spec.layer_ids]
    with pytest.raises(StrictDataclassFieldValidationError, match="engram_vocab_size"):
        ReleasedEngramKeys(**{**written, "engram_vocab_size": [50, 50, 50]})  # the old list form fails
    report = engram_json("import", str(out), "-o", str(tmp_path / "back.zarr"))
    assert report["layout"] == "deepseek-v41"
    back, original = open_tables(tmp_path / "back.zarr"), open_tables(tmp_path / "t.zarr")
    same_hashing(back.spec, spec)
    assert back.projection.fingerprint() == original.projection.fingerprint()
    tables = EngramTables.open(out)
    for layer in spec.layer_ids:
        want = tables.gather(layer, torch.arange(tables.rows(layer)))
        got = torch.from_numpy(stored(back, layer).view(np.int16)).view(torch.bfloat16)
        assert torch.equal(got, want)
    (out / "tokenizer.json").unlink()  # without it the error says what to give
    proc = run_engram("import", str(out), "-o", str(tmp_path / "again.zarr"))
    assert proc.returncode == 1 and proc.stderr.count("\n") == 1 and "--projection" in proc.stderr, proc.stderr


def test_a_model_folder_is_a_spec_for_plan_hash_build_tables_and_inspect(tmp_path):
    folder = tmp_path / "Tiny-V41"
    made = write_folder(folder, "composite")
    (folder / "model.safetensors").unlink()  # a spec needs only the config and the tokenizer
    toml = tmp_path / "same.toml"
    toml.write_text(
        "[engram]\nlayer_ids = [2, 5]\nmax_ngram_size = 4\nn_head_per_ngram = 2\n"
        "engram_vocab_size = [40, 50, 60]\nn_embed_per_ngram = 128\npad_id = 1\n"
        f"tokenizer = {json.dumps(str(folder / 'tokenizer.json'))}\n"
    )
    for spec_arg in (str(folder), str(folder / "config.json")):
        plan = engram_json("plan", spec_arg)
        assert [plan["layers"][str(layer)]["rows"] for layer in SPEC.layer_ids] == [SPEC.rows(2), SPEC.rows(5)]
        assert plan["spec"]["engram"]["compressed_vocab_size"] == made["projection"].compressed_size
    hashed = engram_json("hash", "ab abc xy", "--spec", str(folder))
    assert hashed["spec"] == "Tiny-V41"
    assert hashed["layers"] == engram_json("hash", "ab abc xy", "--spec", str(toml))["layers"]
    built = engram_json("build-tables", str(folder), "-o", str(tmp_path / "s.zarr"))
    assert built["complete"]
    store = open_tables(tmp_path / "s.zarr")
    same_hashing(store.spec, SPEC)
    assert store.projection.fingerprint() == made["projection"].fingerprint()
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("ab abc xy ab abc\n" * 20)
    inspected = engram_json("inspect", str(folder), "--corpus", str(corpus))
    assert inspected["source"] == str(folder)
    proc = run_engram("inspect", str(folder))  # a model folder is a spec, not a store
    assert proc.returncode == 1 and "a spec has no tables" in proc.stderr, proc.stderr
    proc = run_engram("plan", str(tmp_path / "s.zarr"))  # a folder with no config is no spec
    assert proc.returncode == 1 and proc.stderr.count("\n") == 1 and "engram_* keys" in proc.stderr, proc.stderr


def test_v41_config_gives_the_released_rows(tmp_path):
    folder = tmp_path / "DeepSeek-V4.1-Flash"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps(config_form("composite", V41_TEXT)))
    for spec_arg in (folder, folder / "config.json"):
        plan = engram_json("plan", str(spec_arg))
        assert [plan["layers"][layer]["rows"] for layer in ("1", "14")] == V41_ROWS
    spec = load_spec(folder)
    preset = load_spec("deepseek-v4.1-flash")
    same_hashing(spec, preset)
    assert spec.parameters == preset.parameters == 196_613_849_600
    wrong = {**V41_TEXT, "engram_num_embeddings": [384_006_168, 384_016_683]}
    (folder / "config.json").write_text(json.dumps(config_form("reference", wrong)))
    with pytest.raises(EngramError, match="engram_num_embeddings is .* but the prime walk"):
        load_spec(folder)
