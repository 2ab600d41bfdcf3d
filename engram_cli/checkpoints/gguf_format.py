"""The Engram keys and tensors of a DeepSeek-V4.1 GGUF (llama.cpp, ik_llama.cpp), and the spec
and projection they describe.

llama.cpp and ik_llama.cpp read, under the architecture `deepseek41`:

    deepseek41.engram.layer_ids       INT32 array   the spec's layer_ids
    deepseek41.engram.head_count      UINT32        heads of each n-gram order (n_head_per_ngram)
    deepseek41.engram.key_length      UINT32        values per head row (the spec's dim)
    deepseek41.engram.max_ngram_size  UINT32        max_ngram_size
    deepseek41.engram.multipliers     UINT64 array  layers x max_ngram_size (the hash multipliers)
    deepseek41.engram.primes          UINT64 array  layers x (max_ngram_size - 1) x heads (head sizes)
    deepseek41.engram.offsets         UINT64 array  layers x heads: each head's first row in its table
    deepseek41.engram.token_map       INT32 array   the projection: tokenizer id -> canonical id
    deepseek41.engram.pad_id          UINT32        the pad, already projected (a canonical id)
    blk.{L}.engram_embd.weight        ggml shape {key_length, rows}: row r of layer L's table, rows =
                                      the sum of its primes (Q8_0 in the published conversion)

`engram export` adds `engram.spec` (the spec as JSON) and `engram.projection` (the projection's
metadata as JSON, with its fingerprint), which the engines ignore and `engram import` uses to give
the store its spec back exactly. Without them the spec is derived: each order's smallest head
size is the first layer's first prime of that order (the prime walk from there takes the same
primes: every prime it skips was taken earlier), the seed 0, the pad the first tokenizer id that
projects onto pad_id. Either way the file's primes, offsets and multipliers must equal what
`TableSpec` derives from those sizes (`TableSpec.layer_hashing`, the one source of them): a file
whose hashing constants disagree with its own sizes is refused, naming the first difference.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
from gguf import GGUFValueType

from ..errors import EngramError, FormatError
from ..spec import TableSpec, spec_from_dict
from ..vocab import VocabProjection, checked_lookup, restore_projection
from .gguf_file import Field, Header, encode_key

ARCH = "deepseek41"
PREFIX = f"{ARCH}.engram."
SPEC_KEY = "engram.spec"
PROJECTION_KEY = "engram.projection"
TENSOR = "blk.{layer_id}.engram_embd.weight"

LAYER_IDS = PREFIX + "layer_ids"
HEAD_COUNT = PREFIX + "head_count"
KEY_LENGTH = PREFIX + "key_length"
MAX_NGRAM = PREFIX + "max_ngram_size"
MULTIPLIERS = PREFIX + "multipliers"
PRIMES = PREFIX + "primes"
OFFSETS = PREFIX + "offsets"
TOKEN_MAP = PREFIX + "token_map"
PAD_ID = PREFIX + "pad_id"

_SCALAR_KEYS = (HEAD_COUNT, KEY_LENGTH, MAX_NGRAM, PAD_ID)
_ARRAY_KEYS = {
    LAYER_IDS: GGUFValueType.INT32,
    MULTIPLIERS: GGUFValueType.UINT64,
    PRIMES: GGUFValueType.UINT64,
    OFFSETS: GGUFValueType.UINT64,
    TOKEN_MAP: GGUFValueType.INT32,
}
REQUIRED = (LAYER_IDS, HEAD_COUNT, KEY_LENGTH, MAX_NGRAM, MULTIPLIERS, PRIMES, OFFSETS, TOKEN_MAP, PAD_ID)


def is_engram_key(key: str) -> bool:
    """A key this module writes (replaced by `--into`)."""
    return key.startswith(PREFIX) or key in (SPEC_KEY, PROJECTION_KEY)


def tensor_name(layer_id: int) -> str:
    """The name of a layer's table."""
    return TENSOR.format(layer_id=layer_id)


def engram_keys(spec: TableSpec, projection: VocabProjection) -> list[bytes]:
    """The encoded Engram keys of a spec and projection, in the order above (then engram's own)."""
    compressed = projection.compressed_size
    hashing = [spec.layer_hashing(layer, compressed) for layer in spec.layer_ids]
    projection_meta = {**projection.metadata, "fingerprint": projection.fingerprint()}
    u32, u64, i32 = GGUFValueType.UINT32, GGUFValueType.UINT64, GGUFValueType.INT32
    array = GGUFValueType.ARRAY
    return [
        encode_key(LAYER_IDS, array, list(spec.layer_ids), i32),
        encode_key(HEAD_COUNT, u32, spec.n_head_per_ngram),
        encode_key(KEY_LENGTH, u32, spec.dim),
        encode_key(MAX_NGRAM, u32, spec.max_ngram_size),
        encode_key(MULTIPLIERS, array, [m for h in hashing for m in h["multipliers"]], u64),
        encode_key(PRIMES, array, [p for h in hashing for p in h["head_sizes"]], u64),
        encode_key(OFFSETS, array, [o for h in hashing for o in h["offsets"]], u64),
        encode_key(TOKEN_MAP, array, projection.lookup, i32),
        encode_key(PAD_ID, u32, projection.canonical_pad(spec.pad_id)),
        encode_key(SPEC_KEY, GGUFValueType.STRING, json.dumps(spec.to_dict(), sort_keys=True)),
        encode_key(PROJECTION_KEY, GGUFValueType.STRING, json.dumps(projection_meta, sort_keys=True)),
    ]


def _field(header: Header, key: str) -> Any:
    field: Field | None = header.fields.get(key)
    if field is None:
        raise FormatError(f"{header.path} has no {key} (not a GGUF with Engram tables; it needs {', '.join(REQUIRED)})")
    if key in _ARRAY_KEYS:
        if field.kind != GGUFValueType.ARRAY or field.item_kind not in (
            GGUFValueType.INT32,
            GGUFValueType.UINT32,
            GGUFValueType.INT64,
            GGUFValueType.UINT64,
        ):
            raise FormatError(f"{header.path}: {key} must be an integer array, not {field.kind.name}")
        return np.asarray(field.value)
    if isinstance(field.value, bool) or not isinstance(field.value, int):
        raise FormatError(f"{header.path}: {key} must be an integer, not {field.kind.name}")
    return field.value


def has_engram_keys(header: Header) -> bool:
    """Whether a GGUF describes Engram tables at all."""
    return any(key.startswith(PREFIX) for key in header.fields)


def gguf_hashing(header: Header, given: TableSpec | None = None) -> tuple[TableSpec, VocabProjection, str | None]:
    """The spec, projection and recorded store dtype of a GGUF's Engram keys, checked against
    what engram derives from them (naming the first difference).

    Args:
        header: the file's (or split set's) header.
        given: a spec to use instead of the one recorded or derived (it must hash alike).
    """
    where = str(header.path)
    if not has_engram_keys(header):
        raise FormatError(f"{where} has no {PREFIX}* keys: it holds no Engram tables")
    values = {key: _field(header, key) for key in REQUIRED}
    token_map = values[TOKEN_MAP]
    recorded = _recorded_json(header, PROJECTION_KEY)
    try:
        if recorded is not None and "fingerprint" in recorded:
            projection = restore_projection(token_map.astype(np.int64), None, recorded, where)
        else:
            projection = VocabProjection(checked_lookup(token_map))
    except FormatError as exc:
        raise FormatError(f"{where}: {TOKEN_MAP} is not a projection: {exc}") from None
    pad = values[PAD_ID]
    if not 0 <= pad < projection.compressed_size:
        raise FormatError(f"{where}: {PAD_ID} is {pad}, not a canonical id (0..{projection.compressed_size - 1:,})")
    spec_json = _recorded_json(header, SPEC_KEY)
    store_dtype: str | None = None
    if given is not None:
        spec, what = given, "the spec given"
    elif spec_json is not None:
        try:
            spec = spec_from_dict(spec_json, Path(header.path).stem)
        except (EngramError, TypeError, KeyError) as exc:
            raise FormatError(f"{where}: {SPEC_KEY} is not a spec: {exc}") from None
        spec, what, store_dtype = spec, SPEC_KEY, spec.dtype
    else:
        spec, what = _derived_spec(header, values, projection), "the spec its sizes describe"
    if not 0 <= spec.pad_id < projection.vocab_size or int(projection.lookup[spec.pad_id]) != pad:
        raise FormatError(f"{where}: {what} has pad_id {spec.pad_id}, which does not project onto {PAD_ID} {pad}")
    check_hashing(spec, projection.compressed_size, values, where)
    return spec, projection, store_dtype


def _recorded_json(header: Header, key: str) -> dict[str, Any] | None:
    text = header.value(key)
    if text is None:
        return None
    try:
        data = json.loads(text) if isinstance(text, str) else None
    except json.JSONDecodeError:
        data = None
    if not isinstance(data, dict):
        raise FormatError(f"{header.path}: {key} is not a JSON object")
    return data


def _derived_spec(header: Header, values: dict[str, Any], projection: VocabProjection) -> TableSpec:
    """The spec a file's sizes describe (see the module docstring for the choices)."""
    layers, heads, orders = values[LAYER_IDS], values[HEAD_COUNT], values[MAX_NGRAM] - 1
    primes = values[PRIMES]
    if layers.size == 0 or heads < 1 or orders < 1 or primes.size != layers.size * orders * heads:
        raise FormatError(
            f"{header.path}: {PRIMES} has {primes.size:,} entries, but {LAYER_IDS} ({layers.size}), "
            f"{MAX_NGRAM} ({values[MAX_NGRAM]}) and {HEAD_COUNT} ({heads}) make "
            f"{layers.size * max(orders, 0) * heads:,}"
        )
    pad_ids = np.flatnonzero(projection.lookup == values[PAD_ID])
    try:
        return TableSpec(
            layer_ids=tuple(int(x) for x in layers),
            max_ngram_size=values[MAX_NGRAM],
            n_head_per_ngram=heads,
            engram_vocab_size=tuple(int(primes[order * heads]) for order in range(orders)),
            n_embed_per_ngram=heads * values[KEY_LENGTH],
            pad_id=int(pad_ids[0]),
            name=Path(header.path).stem,
            compressed_vocab_size=projection.compressed_size,
        )
    except EngramError as exc:
        raise FormatError(f"{header.path}: its Engram keys describe no valid spec: {exc}") from None


def check_hashing(spec: TableSpec, compressed: int, values: dict[str, Any], where: str) -> None:
    """Refuse a file whose sizes or hashing constants differ from what `spec` derives, naming the first."""
    for key, expected in (
        (LAYER_IDS, list(spec.layer_ids)),
        (HEAD_COUNT, spec.n_head_per_ngram),
        (KEY_LENGTH, spec.dim),
        (MAX_NGRAM, spec.max_ngram_size),
    ):
        found = values[key].tolist() if isinstance(values[key], np.ndarray) else values[key]
        if found != expected:
            raise FormatError(f"{where}: {key} is {found}, but the spec has {expected}")
    heads = spec.heads_per_layer
    for key, part, width in (
        (PRIMES, "head_sizes", heads),
        (OFFSETS, "offsets", heads),
        (MULTIPLIERS, "multipliers", spec.max_ngram_size),
    ):
        found = values[key]
        if found.size != len(spec.layer_ids) * width:
            raise FormatError(
                f"{where}: {key} has {found.size:,} entries; {len(spec.layer_ids)} layers of {width} make "
                f"{len(spec.layer_ids) * width:,}"
            )
        for index, layer in enumerate(spec.layer_ids):
            derived = spec.layer_hashing(layer, compressed)[part]
            for position, (have, want) in enumerate(
                zip(found[index * width : (index + 1) * width].tolist(), derived, strict=True)
            ):
                if have != want:
                    raise FormatError(
                        f"{where}: {key} of layer {layer} [{_place(key, position, spec)}] is {have:,}, "
                        f"but {_why(key)} gives {want:,}"
                    )


def _place(key: str, position: int, spec: TableSpec) -> str:
    if key == MULTIPLIERS:
        return f"position {position}"
    order, head = divmod(position, spec.n_head_per_ngram)
    return f"order {order + 2} head {head}"


def _why(key: str) -> str:
    return {
        PRIMES: "the prime walk of its sizes",
        OFFSETS: "the sum of the primes before it",
        MULTIPLIERS: "the spec's seed and the projection's size",
    }[key]
