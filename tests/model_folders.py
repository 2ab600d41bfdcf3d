"""A DeepSeek-V4.1-shaped Hugging Face model folder, written with the real safetensors library
(fp8 tables with E8M0 scales, config.json, tokenizer.json), and the engines' dequantization to
compare an import with: shared by the model-folder, model-form and reliability tests."""

from __future__ import annotations

import json
from pathlib import Path

import ml_dtypes
import numpy as np
import torch
from engram_cli.spec import TableSpec
from engram_cli.vocab import compress_vocab
from safetensors.torch import save_file

from conftest import make_byte_level_tokenizer

SPEC = TableSpec(
    layer_ids=(2, 5),
    max_ngram_size=4,
    n_head_per_ngram=2,
    engram_vocab_size=(40, 50, 60),
    n_embed_per_ngram=128,  # 64 per head: two E8M0 scales per row
    pad_id=1,
)
PIECES = ["<pad0>", "<pad>", "a", "b", "c", "A", "B", " a", "ab", "abc", "x", "y", " ", "xy"]


def tokenizer():
    return make_byte_level_tokenizer(PIECES)


def engram_config(spec: TableSpec, compressed: int) -> dict:
    """The engram_* keys written out by hand, as a model's config.json holds them."""
    return {
        "engram_layer_ids": list(spec.layer_ids),
        "engram_vocab_size": list(spec.engram_vocab_size),
        "engram_max_ngram_size": spec.max_ngram_size,
        "engram_n_heads": spec.n_head_per_ngram,
        "engram_head_dim": spec.dim,
        "engram_pad_token_id": spec.pad_id,
        "engram_compressed_vocab_size": compressed,
        "engram_num_embeddings": [spec.rows(layer) for layer in spec.layer_ids],
    }


def fp8_codes(rng: np.random.Generator, shape: tuple[int, ...]) -> np.ndarray:
    """Every finite E4M3 code (0x7F and 0xFF are NaN), both signs, subnormals included."""
    codes = rng.integers(0, 256, size=shape).astype(np.uint8)
    codes[(codes & 0x7F) == 0x7F] ^= 0x01
    return codes


def write_model(folder: Path, seed: int = 0, *, config: dict | None = None, with_tokenizer: bool = True) -> dict:
    """A V4.1-shaped folder: config.json, tokenizer.json, four shards with an index. The Engram
    tables sit beside unrelated weights (one of a dtype engram does not know), a layer's weight
    and scale in different files, and the two files without Engram tensors are not there at all."""
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    tok = tokenizer()
    if with_tokenizer:
        tok.save(str(folder / "tokenizer.json"))
    projection = compress_vocab(tok)
    engram = {}
    for layer in SPEC.layer_ids:
        rows = SPEC.rows(layer)
        engram[layer] = (fp8_codes(rng, (rows, SPEC.dim)), rng.integers(0, 255, size=(rows, SPEC.dim // 32)))
        engram[layer][1][0, :] = [0, 254]  # the smallest and largest finite scales
    as_fp8 = lambda codes: torch.from_numpy(codes).view(torch.float8_e4m3fn)
    as_e8m0 = lambda exps: torch.from_numpy(exps.astype(np.uint8)).view(torch.float8_e8m0fnu)
    files = {
        "model-00001-of-00004.safetensors": {
            "embed.weight": torch.randn(len(PIECES), 16),
            "layers.2.attn.wkv.weight": torch.randn(16, 16).bfloat16(),
        },
        "model-00002-of-00004.safetensors": {
            "layers.2.engram.embed.weight": as_fp8(engram[2][0]),
            "layers.2.ffn.experts.0.w1.weight": as_fp8(fp8_codes(rng, (32, 32))),
            "layers.2.ffn.experts.0.w1.scale": as_e8m0(rng.integers(100, 140, size=(32, 1))),
            "layers.2.attn.q_weight": torch.randint(0, 9, (8, 8), dtype=torch.int32).to(torch.uint32),
        },
        "model-00003-of-00004.safetensors": {
            "layers.2.engram.embed.scale": as_e8m0(engram[2][1]),
            "layers.5.engram.embed.weight": as_fp8(engram[5][0]),
            "layers.5.engram.embed.scale": as_e8m0(engram[5][1]),
            "layers.5.engram.gate.weight": torch.randn(4, 16).bfloat16(),
            "layers.5.attn.wkv.weight": torch.randn(16, 16).to(torch.uint16),
        },
        "model-00004-of-00004.safetensors": {"head.weight": torch.randn(len(PIECES), 16)},
    }
    weight_map = {}
    for name, tensors in files.items():
        save_file(tensors, str(folder / name), metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(tensors, name))
    (folder / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {"total_size": 12345}, "weight_map": weight_map}, indent=2)
    )
    (folder / "model-00001-of-00004.safetensors").unlink()  # the rest of the model may be absent
    (folder / "model-00004-of-00004.safetensors").write_bytes(b"not safetensors at all")  # nor read
    keys = engram_config(SPEC, projection.compressed_size) if config is None else config
    (folder / "config.json").write_text(
        json.dumps({"architectures": ["DeepseekV4ForCausalLM"], "hidden_size": 16, "num_hidden_layers": 6, **keys})
    )
    return {"tables": engram, "projection": projection}


def dequantized(codes: np.ndarray, exps: np.ndarray, dtype: str) -> np.ndarray:
    """The engines' formula, one element at a time in numpy: float32(e4m3) * 2**(e - 127), rounded."""
    values = codes.view(ml_dtypes.float8_e4m3fn).astype(np.float32)
    scales = np.ldexp(np.float32(1), exps.astype(np.int32) - 127).astype(np.float32)
    with np.errstate(over="ignore"):  # the largest scales overflow to inf, as in the engines
        product = values * np.repeat(scales, 32, axis=1)
    assert product.dtype == np.float32
    return product if dtype == "float32" else product.astype(ml_dtypes.bfloat16)


def stored(store, layer: int) -> np.ndarray:
    return np.asarray(store.read_rows(layer, 0, store.layout(layer).rows))
