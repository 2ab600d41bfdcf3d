"""What an opened table store's metadata must agree on, checked before anything is trusted.

The spec recorded in the group attributes is the single source of truth: the table dtype, every
layer's rows, head sizes, offsets and multipliers, and the hashing fields are derived from it and
must equal what the attributes say beside it. The layout (chunk and shard rows, rank partition)
is a choice, so it is checked for sense instead: whole chunks per shard, bounded chunk and shard
bytes, ranks that own whole shards and cover every row once. Each layer's own `zarr.json` (shape,
data type, chunk grid, codecs) must then describe exactly what the attributes say, since shard
bytes are decoded by it; and the projection arrays must have the recorded vocab size. Every
check is cheap (no table data is read); each failure is a one-line FormatError naming the
contradiction.
"""

from __future__ import annotations

import json
from typing import Any

from ..dtypes import DTYPE_BYTES, STORE_DTYPES
from ..errors import EngramError, FormatError
from ..init import INIT_ALGORITHM
from ..spec import TableSpec, spec_from_dict
from .attributes import PROJECTION_ARRAY, TOKENIZER_ARRAY, default_init
from .layout import CHUNK_BYTES, MIN_CHUNK_BYTES, SHARD_BY, SHARD_BYTES, LayerLayout, layer_array_name

_CRC_CODECS = [{"name": "bytes", "configuration": {"endian": "little"}}, {"name": "crc32c"}]


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _require(condition: bool, where: str, message: str) -> None:
    if not condition:
        raise FormatError(f"{where}: {message}")


def checked_attrs(attrs: dict[str, Any], where: str) -> tuple[TableSpec, dict[int, LayerLayout]]:
    """The spec and layer layouts of a store's "engram" attributes, refused (FormatError) when
    any recorded value contradicts the spec or the layout makes no sense."""
    try:
        raw_spec = attrs["spec"]
        spec = spec_from_dict(raw_spec, name=str(raw_spec.get("name", "custom")))
    except (KeyError, TypeError, AttributeError) as exc:
        raise FormatError(f"{where}: the store's attributes have no readable spec ({exc!r})") from None
    except EngramError as exc:
        raise FormatError(f"{where}: the spec the store records is invalid ({exc})") from None
    dtype: Any = attrs.get("dtype")
    _require(dtype in STORE_DTYPES, where, f"dtype {dtype!r} is not a table dtype ({', '.join(STORE_DTYPES)})")
    _require(dtype == spec.dtype, where, f"dtype is {dtype!r} but the recorded spec says {spec.dtype!r}")
    _require(isinstance(attrs.get("complete"), bool), where, "`complete` must be true or false")
    hashing = {
        "max_ngram_size": spec.max_ngram_size,
        "n_head_per_ngram": spec.n_head_per_ngram,
        "pad_id": spec.pad_id,
        "dim": spec.dim,
    }
    recorded: Any = attrs.get("hashing")
    _require(isinstance(recorded, dict), where, "the hashing attributes are missing")
    for key, value in hashing.items():
        _require(
            recorded.get(key) == value, where, f"hashing.{key} is {recorded.get(key)!r} but the spec gives {value}"
        )
    projection: Any = attrs.get("projection")
    _require(isinstance(projection, dict), where, "the projection attributes are missing")
    vocab: Any = projection.get("vocab_size")
    compressed: Any = projection.get("compressed_size")
    _require(
        _is_int(vocab) and _is_int(compressed) and 1 <= compressed <= vocab,
        where,
        f"projection sizes vocab_size {vocab!r} and compressed_size {compressed!r} are not 1 <= compressed <= vocab",
    )
    _require(spec.pad_id < vocab, where, f"the spec's pad_id {spec.pad_id} is not below the vocab size {vocab}")
    spec.check_compressed_size(compressed, f"{where}: the recorded projection", FormatError)
    _require(isinstance(projection.get("fingerprint"), str), where, "the projection fingerprint is missing")
    _require(projection.get("array") == PROJECTION_ARRAY, where, f"the projection array must be {PROJECTION_ARRAY!r}")
    _require(
        projection.get("tokenizer_array") in (None, TOKENIZER_ARRAY),
        where,
        f"the tokenizer array must be {TOKENIZER_ARRAY!r} or absent",
    )
    init: Any = attrs.get("init")
    _require(isinstance(init, dict), where, "the init attributes are missing")
    if init.get("algorithm") == INIT_ALGORITHM:
        _require(
            init == default_init(spec),
            where,
            f"init is {init} but the recorded spec draws its values as {default_init(spec)}",
        )
    sharding: Any = attrs.get("sharding")
    _require(isinstance(sharding, dict), where, "the sharding attributes are missing")
    ranks: Any = sharding.get("ranks")
    _require(_is_int(ranks) and ranks >= 1, where, f"sharding.ranks must be a positive integer, got {ranks!r}")
    _require(sharding.get("shard_by") in SHARD_BY, where, f"sharding.shard_by {sharding.get('shard_by')!r} is unknown")
    stored: Any = attrs.get("stored_layers", list(spec.layer_ids))
    _require(
        isinstance(stored, list)
        and len(stored) > 0
        and all(_is_int(x) and x in spec.layer_ids for x in stored)
        and len(set(stored)) == len(stored),
        where,
        f"stored_layers {stored!r} are not distinct layers of the spec ({list(spec.layer_ids)})",
    )
    layers: Any = attrs.get("layers")
    _require(isinstance(layers, dict), where, "the per-layer attributes are missing")
    layouts = {}
    for layer in stored:
        info: Any = layers.get(str(layer))
        _require(isinstance(info, dict), where, f"layer {layer} has no attributes")
        layouts[layer] = _checked_layer(info, spec, layer, dtype, ranks, compressed, f"{where}: layer {layer}")
    return spec, layouts


def _checked_layer(
    info: dict[str, Any], spec: TableSpec, layer: int, dtype: str, ranks: int, compressed: int, where: str
) -> LayerLayout:
    rows, dim = spec.rows(layer), spec.dim
    derived: dict[str, Any] = {
        "rows": rows,
        "dim": spec.dim,
        **spec.layer_hashing(layer, compressed),
        "array": layer_array_name(layer),
    }
    for key, value in derived.items():
        found = info.get(key)
        if found != value:
            shown = found if not isinstance(found, list) else f"{found[:4]}{'...' if len(found) > 4 else ''}"
            raise FormatError(f"{where}: {key} is {shown!r} but the recorded spec gives {_short(value)}")
    row_bytes = dim * DTYPE_BYTES[dtype]
    chunk: Any = info.get("chunk_rows")
    shard: Any = info.get("shard_rows")
    _require(_is_int(chunk) and 1 <= chunk <= rows, where, f"chunk_rows {chunk!r} is not from 1 to the {rows:,} rows")
    _require(
        _is_int(shard) and shard >= chunk and shard % chunk == 0,
        where,
        f"shard_rows {shard!r} is not a whole number of {chunk}-row chunks",
    )
    _require(
        chunk * row_bytes <= max(CHUNK_BYTES, row_bytes) and shard * row_bytes <= max(SHARD_BYTES, chunk * row_bytes),
        where,
        f"chunks of {chunk:,} rows or shards of {shard:,} rows are larger than any layout engram writes",
    )
    shards = -(-rows // shard)
    _require(
        shards <= ranks + -(-rows * row_bytes // MIN_CHUNK_BYTES),
        where,
        f"shards of {shard:,} rows are smaller than any layout engram writes",
    )
    _require(info.get("shards", shards) == shards, where, f"shards is {info.get('shards')!r}, not {shards}")
    partition = info.get("partition")
    try:
        pairs = tuple((int(a), int(b)) for a, b in partition) if isinstance(partition, list) else ()
        whole = all(_is_int(a) and _is_int(b) for a, b in partition)  # type: ignore[union-attr]
    except (TypeError, ValueError):
        pairs, whole = (), False
    bounds = [a for a, _ in pairs] + [rows]
    _require(
        whole
        and len(pairs) == ranks
        and bounds[0] == 0
        and all(b == bounds[i + 1] for i, (_, b) in enumerate(pairs))
        and all(a <= b for a, b in pairs)
        and all(a % shard == 0 or a == rows for a, _ in pairs),
        where,
        f"partition {_short(partition)} does not give {ranks} ranks whole shards covering rows 0-{rows - 1:,}",
    )
    return LayerLayout(layer, rows, dim, chunk, shard, pairs, DTYPE_BYTES[dtype])


def _short(value: Any) -> str:
    if isinstance(value, list) and len(value) > 4:
        return f"{value[:4]!r}... ({len(value)} values)"
    return repr(value)


def expected_array(layout: LayerLayout, dtype: str) -> dict[str, Any]:
    """The fields of a layer's zarr.json that decide how its shard bytes are read."""
    return {
        "zarr_format": 3,
        "node_type": "array",
        "shape": [layout.rows, layout.dim],
        "data_type": dtype,
        "chunk_grid": {"name": "regular", "configuration": {"chunk_shape": [layout.shard_rows, layout.dim]}},
        "chunk_key_encoding": {"name": "default", "configuration": {"separator": "/"}},
        "codecs": [
            {
                "name": "sharding_indexed",
                "configuration": {
                    "chunk_shape": [layout.chunk_rows, layout.dim],
                    "codecs": _CRC_CODECS,
                    "index_codecs": _CRC_CODECS,
                    "index_location": "end",
                },
            }
        ],
    }


def parse_node(raw: bytes, where: str) -> dict[str, Any]:
    """A zarr.json's content, or a FormatError saying it is not JSON."""
    try:
        node = json.loads(raw)
    except (UnicodeDecodeError, ValueError):
        raise FormatError(f"{where} is not valid JSON; the store is damaged") from None
    if not isinstance(node, dict):
        raise FormatError(f"{where} is not a zarr metadata object; the store is damaged")
    return node


def check_array(node: dict[str, Any], layout: LayerLayout, dtype: str, where: str) -> None:
    """Refuse a layer's zarr.json that describes another array than the attributes do."""
    for key, value in expected_array(layout, dtype).items():
        if node.get(key) != value:
            raise FormatError(
                f"{where} says {key} is {json.dumps(node.get(key))} but the store's attributes "
                f"give {json.dumps(value)}; the store is damaged"
            )
    if node.get("storage_transformers"):
        raise FormatError(f"{where} has storage transformers, which engram never writes; the store is damaged")


def check_vector(node: dict[str, Any], length: int | None, dtype: str, where: str) -> None:
    """Refuse a projection array's zarr.json of another type or length than recorded."""
    shape = node.get("shape")
    ok = (
        node.get("node_type") == "array"
        and node.get("data_type") == dtype
        and isinstance(shape, list)
        and len(shape) == 1
        and (length is None or shape[0] == length)
    )
    if not ok:
        wanted = f"({length},)" if length is not None else "1-D"
        raise FormatError(
            f"{where} describes a {node.get('data_type')} array of shape {shape}, not {dtype} {wanted}; "
            "the store is damaged"
        )
