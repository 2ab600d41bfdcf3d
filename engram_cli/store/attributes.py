"""The table store format: one zarr v3 group (readable by any zarr v3 reader) and what it records.

    STORE/zarr.json                  group; attributes["engram"] as below
    STORE/projection                 int64 (vocab_size,): tokenizer id -> canonical id
    STORE/projection_tokenizer       uint8: the tokenizer JSON the projection came from (if any)
    STORE/layer_<id>                 (rows, dim) table of one layer, heads one after another in
                                     hashing order (row = offset of head + bucket)
    STORE/layer_<id>/c/<i>/0         shard file i: rows [i * shard_rows, (i + 1) * shard_rows)

attributes["engram"] hold the format ("engram-tables") and its version (`STORE_FORMAT_VERSION`),
the spec, the table dtype, the projection's metadata (its array names, vocab and compressed sizes,
the sha256 fingerprint of its lookup), the hashing parameters (max_ngram_size, n_head_per_ngram,
pad_id, dim), the sharding (ranks, shard_by), per layer the head sizes, offsets, multipliers,
dim, chunk/shard rows and the rank partition, the init (the algorithm id and distribution that
generated the values, or "imported" with its source), and `complete`. A store imported from
some layers of a model also lists them under `stored_layers`.

Each layer array uses the sharding codec: inner chunks of whole rows (about 1 MiB, cheap
random row reads) with a crc32c per chunk, shard files of at most 128 MiB with a crc32c'd
index; its data type is the table dtype's zarr v3 name ("bfloat16" from `zarr_bfloat16`), fill
value 0, dimension names (row, column), and the array attribute `engram_layer_id`. The projection
arrays are one zstd-compressed chunk each. `layout` says how rows are cut into chunks, shards and
ranks, `shard_format` what the bytes of a shard file are, and `build` when `complete` flips to
true.
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
    """The attributes["engram"] of a new store, `complete` false.

    Args:
        spec: the tables' spec; its multipliers are drawn for the projection's compressed size.
        projection: the vocab projection the store holds.
        layouts: the plan of every layer the store holds (`layout.plan_layout`).
        ranks: the rank count the layouts were planned for.
        shard_by: "rows" or "heads", as planned.
        init: where the values come from (`default_init`, or an importer's record).
    """
    layers = {}
    for layer, layout in layouts.items():
        layers[str(layer)] = {**layout.to_json(), **spec.layer_hashing(layer, projection.compressed_size)}
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
    """The init record of generated tables: the generator's algorithm id and the spec's distribution."""
    return {"algorithm": INIT_ALGORITHM, **spec.init.to_dict()}


def spec_difference(
    stored: dict[str, Any], wanted: dict[str, Any], prefix: str = "", labels: tuple[str, str] = ("in the store", "now")
) -> str | None:
    """The first difference between two spec dicts, as "key is X in the store but Y now", or None.

    The spec's name is ignored: renaming a spec file does not change the tables it describes.

    Args:
        stored: the spec dict a store recorded.
        wanted: the spec dict of this run.
        prefix: the dotted path of these dicts inside the spec (for nested sections).
        labels: where each side comes from, for the wording ("in the store", "now").
    """
    for key in sorted(set(stored) | set(wanted)):
        if key == "name" and not prefix:
            continue
        a, b = stored.get(key), wanted.get(key)
        if isinstance(a, dict) and isinstance(b, dict):
            found = spec_difference(a, b, f"{prefix}{key}.", labels)
            if found:
                return found
        elif a != b:
            return f"{prefix}{key} is {a!r} {labels[0]} but {b!r} {labels[1]}"
    return None
