"""DeepSeek-V4.1's Engram config keys: a spec from a model folder's config.json, and back.

A Hugging Face folder of DeepSeek-V4.1 describes its Engram tables with `engram_*` keys in
`config.json`; `engram export --layout deepseek-v41` writes the same keys to `engram_config.json`
beside its index, to merge into a model's `config.json`. They map onto a spec as:

    engram_layer_ids              layer_ids
    engram_max_ngram_size         max_ngram_size
    engram_n_heads                n_head_per_ngram (heads of each n-gram order)
    engram_head_dim               n_embed_per_ngram / n_head_per_ngram
    engram_vocab_size             engram_vocab_size (one for all orders 2..max, or one per order)
    engram_pad_token_id           pad_id (also read as engram_pad_id)
    engram_compressed_vocab_size  compressed_vocab_size
    engram_num_embeddings         rows of each layer's table, in layer_ids order (checked, derived)
    engram_seed                   seed (optional, 0 when absent; written only when not 0)

The keys come in the forms published code writes: at the top level of a text model's config (the
released config and DeepSeek's reference inference code, whose config.json holds its own
argument names, `engram_pad_id` among them), or under `text_config` of a composite
(vision-language) config, as transformers' `DeepseekV41Config` saves it. The pad key is
`engram_pad_token_id` in the released config and vLLM, `engram_pad_id` in transformers' config
class and the reference code; either is read, and two that disagree are refused. What is written
(`config_keys`) is the released config's keys with its types: `engram_vocab_size` a single int
when every order has the same size, as the released config and transformers' strict config type
it (a list only for a spec whose orders differ, which those configs cannot express).

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


TOKENIZER = "tokenizer.json"


TEXT_CONFIG = "text_config"  # a composite config's text model


PAD_KEYS = ("engram_pad_token_id", "engram_pad_id")  # the released config's name first, then the alias


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
    """The `engram_*` keys of a spec whose projection has `compressed_size` canonical ids, with
    the released config's names and types."""
    sizes = spec.engram_vocab_size
    keys: dict[str, Any] = {
        "engram_layer_ids": list(spec.layer_ids),
        "engram_vocab_size": sizes[0] if len(set(sizes)) == 1 else list(sizes),
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


def engram_keys(data: dict[str, Any], path: Path) -> dict[str, Any]:
    """The `engram_*` keys of a parsed config, wherever the published forms keep them (top level,
    or a composite's `text_config`), with the pad key under its released name.

    Args:
        data: the parsed config.json.
        path: the file, for messages.
    """
    found: dict[str, Any] = {}
    where: dict[str, str] = {}
    text = data.get(TEXT_CONFIG)
    places = [("the top level", data)] + ([(TEXT_CONFIG, text)] if isinstance(text, dict) else [])
    for place, keys in places:
        for key, value in keys.items():
            if not key.startswith("engram_"):
                continue
            if key in found and found[key] != value:
                raise FormatError(
                    f"{path} has {key} = {_show(found[key])} at {where[key]} but {_show(value)} in {place}"
                )
            found[key], where[key] = value, place
    pads = [(key, found.pop(key)) for key in PAD_KEYS if key in found]
    if len(pads) == 2 and pads[0][1] != pads[1][1]:
        (name, value), (alias, other) = pads
        raise FormatError(f"{path} has {name} = {_show(value)} but {alias} = {_show(other)}: two pad ids for one model")
    if pads:
        found[PAD_KEYS[0]] = pads[0][1]
    return found


def find_model_config(folder: Path) -> Path | None:
    """The file of a folder that holds `engram_*` keys: its config.json, else an engram_config.json."""
    if not folder.is_dir():
        return None
    for name in (MODEL_CONFIG, ENGRAM_CONFIG):
        path = folder / name
        if path.is_file() and engram_keys(_read(path), path):
            return path
    return None


def is_model_config(path: str | Path) -> bool:
    """Whether a SPEC argument names a model's config: a .json file, or a folder holding a
    config.json or engram_config.json (a table store holds neither)."""
    path = Path(path)
    if path.is_dir():
        return any((path / name).is_file() for name in (MODEL_CONFIG, ENGRAM_CONFIG))
    return path.suffix == ".json" and path.is_file()


def spec_from_model_config(path: str | Path) -> TableSpec:
    """The spec a model's config describes, with the tokenizer.json beside it as its tokenizer.

    Args:
        path: a model folder (its config.json, else the engram_config.json of an export), or a
            config.json file itself.
    """
    path = Path(path)
    config = find_model_config(path) if path.is_dir() else path
    if config is None:
        raise UsageError(
            f"{path} is a folder without a {MODEL_CONFIG} or {ENGRAM_CONFIG} holding engram_* keys; "
            "a spec is a TOML file, a preset name, or a model folder or its config.json"
        )
    if not config.is_file():
        raise UsageError(f"no such config file: {config}")
    tokenizer = config.parent / TOKENIZER
    return spec_from_config(config, str(tokenizer) if tokenizer.is_file() else None)


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
    data = engram_keys(_read(path), path)
    missing = [key for key in REQUIRED_KEYS if key not in data]
    if missing:
        also = f" (or {PAD_KEYS[1]})" if missing[0] == PAD_KEYS[0] else ""
        raise FormatError(f"{path} has no {missing[0]}{also} (the Engram config needs {', '.join(REQUIRED_KEYS)})")
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
            raise UsageError(
                f"spec {given.name} has {field} = {_show(mine)}, but {path} has {key} = {_show(theirs)}; "
                "drop --spec (the folder describes its own)"
            )
    if given.compressed_vocab_size not in (None, described.compressed_vocab_size):
        raise UsageError(
            f"spec {given.name} has compressed_vocab_size = {given.compressed_vocab_size:,}, but {path} has "
            f"engram_compressed_vocab_size = {described.compressed_vocab_size:,}; "
            "drop --spec (the folder describes its own)"
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
            f"{own.fingerprint()[:12]}); drop --projection (the folder's tokenizer.json gives its own)"
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
    own_tokenizer = folder / TOKENIZER
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
            "give its spec with --spec (e.g. deepseek-v4.1-flash)"
        )
    own = None if tokenizer is None else tokenizer_projection(tokenizer)
    if projection is not None and own is not None:
        check_projection_agrees(projection, own, str(own_tokenizer))
    if projection is not None:
        which = "the projection given (--projection)"
    elif own is not None:
        which = f"the projection of {own_tokenizer}"
    else:
        which = f"the projection of {spec.tokenizer or 'embedded:deepseek-v3'}"
    projection = projection or own or tokenizer_projection(spec.tokenizer)
    wanted = described.compressed_vocab_size if described is not None else spec.compressed_vocab_size
    if wanted is not None and projection.compressed_size != wanted:
        where = f"{config} has engram_compressed_vocab_size" if described is not None else f"spec {spec.name} has"
        fix = "give the projection of the model's tokenizer with --projection"
        if tokenizer is None:
            fix = f"{folder} has no {TOKENIZER}: give the projection of its tokenizer with --projection"
        raise UsageError(f"{which} has {projection.compressed_size:,} canonical ids, but {where} {wanted:,}; {fix}")
    return spec, projection
