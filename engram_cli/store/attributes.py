"""Table stores: the Engram tables of a spec as one sharded zarr v3 group.

Layout of a store (all zarr v3, readable by any zarr v3 reader):

    STORE/zarr.json                  group; attributes["engram"] hold the format version, the
                                     spec, the projection's metadata, per layer the head sizes,
                                     offsets, multipliers, dim, chunk/shard rows and the rank
                                     partition, the init algorithm id, and `complete`
    STORE/projection                 int64 (vocab_size,): tokenizer id -> canonical id
    STORE/projection_tokenizer       uint8: the tokenizer JSON the projection came from (if any)
    STORE/layer_<id>                 (rows, dim) table of one layer, heads one after another in
                                     hashing order (row = offset of head + bucket)
    STORE/layer_<id>/c/<i>/0         shard file i: rows [i * shard_rows, (i + 1) * shard_rows)

Each layer array uses the sharding codec: inner chunks of whole rows (about 1 MiB, cheap
random row reads) with a crc32c per chunk, shard files of at most 128 MiB with a crc32c'd
index. Rank boundaries always fall on shard boundaries, so every rank reads or writes whole
shard files alone; zarr rewrites a partially written shard, so no plan ever lets two writers
share one. Shards are encoded here (the sharding format is simple and fixed) and written to a
temporary name then renamed, so a shard file is either complete or absent; `complete` flips to
true only after every shard exists, which is what `--resume` and readers rely on.
"""

from __future__ import annotations

from typing import Any

from ..init import INIT_ALGORITHM
from ..spec import TableSpec
from ..vocab import VocabProjection
from .layout import LayerLayout

STORE_FORMAT = "engram-tables"  # attributes["engram"]["format"] of a table store
STORE_FORMAT_VERSION = 1
ATTRS_KEY = "engram"
PROJECTION_ARRAY = "projection"
TOKENIZER_ARRAY = "projection_tokenizer"


def store_attrs(
    spec: TableSpec,
    projection: VocabProjection,
    layouts: dict[int, LayerLayout],
    ranks: int,
    shard_by: str,
    init: dict[str, Any],
) -> dict[str, Any]:
    layers = {}
    for layer, layout in layouts.items():
        layers[str(layer)] = {
            **layout.to_json(),
            "head_sizes": spec.head_sizes(layer),
            "offsets": spec.offsets(layer),
            "multipliers": [int(m) for m in spec.multipliers(layer, projection.compressed_size)],
        }
    return {
        "format": STORE_FORMAT,
        "format_version": STORE_FORMAT_VERSION,
        "complete": False,
        "spec": spec.to_dict(),
        "dtype": spec.dtype,
        "init": init,
        "projection": {
            "array": PROJECTION_ARRAY,
            "tokenizer_array": TOKENIZER_ARRAY if projection.tokenizer_json is not None else None,
            "vocab_size": projection.vocab_size,
            "compressed_size": projection.compressed_size,
            "fingerprint": projection.fingerprint(),
            "metadata": dict(projection.metadata),
        },
        "hashing": {
            "max_ngram_size": spec.max_ngram_size,
            "n_head_per_ngram": spec.n_head_per_ngram,
            "pad_id": spec.pad_id,
            "dim": spec.dim,
        },
        "sharding": {"ranks": ranks, "shard_by": shard_by},
        "layers": layers,
    }


def default_init(spec: TableSpec) -> dict[str, Any]:
    return {"algorithm": INIT_ALGORITHM, **spec.init.to_dict()}


def spec_difference(stored: dict[str, Any], wanted: dict[str, Any], prefix: str = "") -> str | None:
    for key in sorted(set(stored) | set(wanted)):
        if key == "name" and not prefix:
            continue
        a, b = stored.get(key), wanted.get(key)
        if isinstance(a, dict) and isinstance(b, dict):
            found = spec_difference(a, b, f"{prefix}{key}.")
            if found:
                return found
        elif a != b:
            return f"{prefix}{key} is {a!r} in the store but {b!r} now"
    return None
