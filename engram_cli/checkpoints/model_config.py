"""DeepSeek-V4.1's Engram config keys: a spec from a model folder's config.json, and back.

A Hugging Face folder of DeepSeek-V4.1 describes its Engram tables with `engram_*` keys in
`config.json`; `engram export --layout deepseek-v41` writes the same keys to `engram_config.json`
beside its index, to merge into a model's `config.json`. They map onto a spec as:

    engram_layer_ids              layer_ids
    engram_max_ngram_size         max_ngram_size
    engram_n_heads                n_head_per_ngram (heads of each n-gram order)
    engram_head_dim               n_embed_per_ngram / n_head_per_ngram
    engram_vocab_size             engram_vocab_size (one per order 2..max, or one for all)
    engram_pad_token_id           pad_id
    engram_compressed_vocab_size  compressed_vocab_size
    engram_num_embeddings         rows of each layer's table, in layer_ids order (checked, derived)
    engram_seed                   seed (optional, 0 when absent; written only when not 0)

The folder's `tokenizer.json`, when there is one, is the spec's tokenizer.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from ..errors import EngramError, FormatError, UsageError
from ..spec import TableSpec
from ..vocab import VocabProjection, tokenizer_projection

MODEL_CONFIG = "config.json"


ENGRAM_CONFIG = "engram_config.json"


REQUIRED_KEYS = (
    "engram_layer_ids",
    "engram_vocab_size",
    "engram_max_ngram_size",
    "engram_n_heads",
    "engram_head_dim",
    "engram_pad_token_id",
    "engram_compressed_vocab_size",
    "engram_num_embeddings",
)


def config_keys(spec: TableSpec, compressed_size: int) -> dict[str, Any]:
    """The `engram_*` keys of a spec whose projection has `compressed_size` canonical ids."""
    keys: dict[str, Any] = {
        "engram_layer_ids": list(spec.layer_ids),
        "engram_vocab_size": list(spec.engram_vocab_size),
        "engram_max_ngram_size": spec.max_ngram_size,
        "engram_n_heads": spec.n_head_per_ngram,
        "engram_head_dim": spec.dim,
        "engram_pad_token_id": spec.pad_id,
        "engram_compressed_vocab_size": compressed_size,
        "engram_num_embeddings": [spec.rows(layer) for layer in spec.layer_ids],
    }
    if spec.seed:
        keys["engram_seed"] = spec.seed
    return keys


def find_model_config(folder: Path) -> Path | None:
    """The file of a folder that holds `engram_*` keys: its config.json, else an engram_config.json."""
    if not folder.is_dir():
        return None
    for name in (MODEL_CONFIG, ENGRAM_CONFIG):
        path = folder / name
        if path.is_file() and any(key.startswith("engram_") for key in _read(path)):
            return path
    return None


def _read(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise FormatError(f"cannot read {path} as JSON: {exc}") from None
    if not isinstance(data, dict):
        raise FormatError(f"{path} is not a JSON object")
    return data


def spec_from_config(path: Path, tokenizer: str | None = None) -> TableSpec:
    """The spec a model's config describes, its table rows checked against `engram_num_embeddings`."""
    data = _read(path)
    missing = [key for key in REQUIRED_KEYS if key not in data]
    if missing:
        raise FormatError(f"{path} has no {missing[0]} (the Engram config needs {', '.join(REQUIRED_KEYS)})")
    order_count = data["engram_max_ngram_size"] - 1 if isinstance(data["engram_max_ngram_size"], int) else 0
    sizes = data["engram_vocab_size"]
    sizes = [sizes] * max(order_count, 1) if isinstance(sizes, int) else sizes
    heads, head_dim = data["engram_n_heads"], data["engram_head_dim"]
    if not all(isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in (heads, head_dim)):
        raise FormatError(
            f"{path}: engram_n_heads and engram_head_dim must be positive integers, got {heads!r}, {head_dim!r}"
        )
    try:
        spec = TableSpec(
            layer_ids=tuple(data["engram_layer_ids"]),
            max_ngram_size=data["engram_max_ngram_size"],
            n_head_per_ngram=heads,
            engram_vocab_size=tuple(sizes),
            n_embed_per_ngram=heads * head_dim,
            pad_id=data["engram_pad_token_id"],
            seed=data.get("engram_seed", 0),
            name=path.parent.name or "model",
            tokenizer=tokenizer,
            compressed_vocab_size=data["engram_compressed_vocab_size"],
        )
    except (EngramError, TypeError) as exc:
        raise FormatError(f"{path}: {exc}") from None
    rows = data["engram_num_embeddings"]
    derived = [spec.rows(layer) for layer in spec.layer_ids]
    if rows != derived and rows != sum(derived):
        raise FormatError(
            f"{path}: engram_num_embeddings is {rows!r}, but the prime walk of its engram_vocab_size gives "
            f"{derived} rows per layer ({sum(derived):,} in all)"
        )
    return spec


_COMPARED = (
    ("layer_ids", "engram_layer_ids"),
    ("max_ngram_size", "engram_max_ngram_size"),
    ("n_head_per_ngram", "engram_n_heads"),
    ("dim", "engram_head_dim"),
    ("engram_vocab_size", "engram_vocab_size"),
    ("pad_id", "engram_pad_token_id"),
    ("seed", "engram_seed"),
)


def check_spec_agrees(given: TableSpec, described: TableSpec, path: Path) -> None:
    """Refuse a spec that hashes differently from the one a model's config describes.

    Args:
        given: the spec given by the user.
        described: the spec of the config's `engram_*` keys.
        path: the config file, for the message.
    """
    for field, key in _COMPARED:
        mine, theirs = getattr(given, field), getattr(described, field)
        if mine != theirs:
            raise UsageError(f"spec {given.name} has {field} = {_show(mine)}, but {path} has {key} = {_show(theirs)}")
    if given.compressed_vocab_size not in (None, described.compressed_vocab_size):
        raise UsageError(
            f"spec {given.name} has compressed_vocab_size = {given.compressed_vocab_size:,}, but {path} has "
            f"engram_compressed_vocab_size = {described.compressed_vocab_size:,}"
        )


def check_projection_agrees(given: VocabProjection, own: VocabProjection, where: str) -> None:
    """Refuse a projection other than the one of the folder's own tokenizer.

    Args:
        given: the projection given by the user.
        own: the projection of the folder's tokenizer.json.
        where: that tokenizer.json, for the message.
    """
    if given.fingerprint() != own.fingerprint():
        raise UsageError(
            f"the projection given ({given.compressed_size:,} canonical ids, lookup sha256 "
            f"{given.fingerprint()[:12]}) is not that of {where} ({own.compressed_size:,} canonical ids, "
            f"{own.fingerprint()[:12]})"
        )


def _show(value: Any) -> str:
    return json.dumps(list(value) if isinstance(value, tuple) else value)


def model_hashing(
    folder: Path, spec: TableSpec | None, projection: VocabProjection | None
) -> tuple[TableSpec, VocabProjection]:
    """The spec and projection of a deepseek-v41 folder, which holds no hashing tensors.

    The spec comes from the folder's `engram_*` config keys (config.json, or engram_config.json
    from `engram export`), the projection from its tokenizer.json; a `spec` or `projection` given
    serves a folder without them, and must agree with them where the folder has its own.

    Args:
        folder: the model folder (or the folder of an index or file).
        spec: the spec given, if any.
        projection: the projection given, if any.
    """
    config = find_model_config(folder)
    own_tokenizer = folder / "tokenizer.json"
    tokenizer = str(own_tokenizer) if own_tokenizer.is_file() else None
    described = None
    if config is not None:
        described = spec_from_config(config, tokenizer)
        if spec is not None:
            check_spec_agrees(spec, described, config)
    spec = spec or described
    if spec is None:
        raise UsageError(
            f"{folder} is in the deepseek-v41 layout and has no config.json with engram_* keys: "
            "give its spec (e.g. deepseek-v4.1-flash)"
        )
    own = None if tokenizer is None else tokenizer_projection(tokenizer)
    if projection is not None and own is not None:
        check_projection_agrees(projection, own, str(own_tokenizer))
    projection = projection or own or tokenizer_projection(spec.tokenizer)
    wanted = described.compressed_vocab_size if described is not None else spec.compressed_vocab_size
    if wanted is not None and projection.compressed_size != wanted:
        where = f"{config} has engram_compressed_vocab_size" if described is not None else f"spec {spec.name} has"
        hint = (
            "" if tokenizer is not None else f"; {folder} has no tokenizer.json: give the projection of its tokenizer"
        )
        raise UsageError(
            f"the projection has {projection.compressed_size:,} canonical ids, but {where} {wanted:,}{hint}"
        )
    return spec, projection
