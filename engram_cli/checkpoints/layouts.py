"""The two layouts of an inference export: safetensors that an engine memory-maps.

* `engram` (default): each layer's table under the Hugging Face-style parameter name (the
  training key template), its E8M0 scales beside it when fp8, and everything the hasher needs
  (spec, per-layer head sizes, offsets and multipliers, the projection lookup and its tokenizer),
  so an engine needs nothing else. The hashing tensors are named as in a training checkpoint
  (`metadata`); the header's `__metadata__` holds format "engram-tables", format_version "1",
  layout, dtype, and as JSON strings the spec, the projection's metadata with its fingerprint,
  the tables (layer -> weight and scale names) and the sharding of the store it came from. One
  `model.safetensors` (or the file named) when it fits the shard size, else shards and an index.
* `deepseek-v41`: exactly DeepSeek-V4.1-Flash's tensors, which vLLM and SGLang load:
  `layers.{L}.engram.embed.weight` F8_E4M3 (rows, dim) and `layers.{L}.engram.embed.scale`
  F8_E8M0 (rows, dim / 32), in shards with a `model.safetensors.index.json` (read back also
  under the `model.` and `model.language_model.` prefixes of a model saved by transformers,
  `keys.DEEPSEEK_PREFIXES`); no hashing tensors
  (the header says only format "pt"). `engram export` writes `engram_config.json` beside the
  index (the `engram_*` keys of a model's config.json, see `model_config`) and the projection's
  tokenizer.json, from which reading one back finds its spec and projection; a model's own folder of this
  layout also holds every other weight, and only the files with Engram tensors are opened.

Both keep the row = offset(head) + bucket order of the store, so a row index from the hasher
reads the file directly. A reader tells them apart by the header's `format`.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, get_args

from ..errors import EngramError, FormatError
from ..vocab import VocabProjection, restore_projection
from .keys import (
    DEEPSEEK_PREFIXES,
    DEEPSEEK_SCALE,
    LOOKUP_KEY,
    TOKENIZER_ZIP_KEY,
    Layout,
    check_distinct_keys,
    metadata_keys,
)
from .safetensors_format import INDEX_NAME, MappedTensors

LAYOUTS: tuple[Layout, ...] = get_args(Layout)
# The metadata of an engram-layout safetensors export. The same name as the table store's format
# (store/attributes.py) for files already written; the version is a string because safetensors
# metadata values are strings.
SAFETENSORS_FORMAT = "engram-tables"
SAFETENSORS_FORMAT_VERSION = "1"


@dataclass(frozen=True)
class Table:
    """Where one layer's table is in an export: its weight tensor and, when fp8, its scale tensor."""

    layer_id: int
    weight: str
    scale: str | None


def check_table_names(tables: Iterable[Table], layer_ids: Iterable[int], where: str) -> None:
    """Refuse tables and scales of an engram-layout export that would share a name, or take the
    name of a hashing tensor of `layer_ids` (one would replace the other in the file)."""
    tables = list(tables)
    names = {f"layer {t.layer_id} table": t.weight for t in tables}
    names.update({f"layer {t.layer_id} scales": t.scale for t in tables if t.scale})
    check_distinct_keys(names, metadata_keys(layer_ids), where)


def stored_projection(
    tensors: dict[str, Any], mapped: MappedTensors, metadata: dict[str, str], where: str
) -> VocabProjection:
    """The projection an engram-layout export carries, checked against its recorded fingerprint.

    Args:
        tensors: the tensors found in the export's headers.
        mapped: their memory maps.
        metadata: the projection's recorded metadata (with its fingerprint).
        where: the export, for messages.
    """
    zipped = tensors.get(TOKENIZER_ZIP_KEY)
    return restore_projection(
        mapped.tensor(LOOKUP_KEY).numpy().copy(),
        None if zipped is None else mapped.tensor(TOKENIZER_ZIP_KEY).numpy().tobytes(),
        metadata,
        where,
    )


_PREFIX = "|".join(re.escape(prefix) for prefix in DEEPSEEK_PREFIXES)
_DEEPSEEK_TENSOR = re.compile(rf"^({_PREFIX})layers\.(\d+)\.engram\.embed\.(weight|scale)$")


def is_deepseek_tensor(name: str) -> bool:
    """An Engram table or its scales under DeepSeek-V4.1's names, with any prefix a model's writer
    adds (a model holds many other weights)."""
    return _DEEPSEEK_TENSOR.match(name) is not None


def tensor_filter(path: Path) -> Callable[[str], bool] | None:
    """Which tensors of `path` to open: all of an engram export or a lone file; of a model's
    shard set (an index not written by engram) only the deepseek-v41 Engram tensors."""
    index = path / INDEX_NAME if path.is_dir() else path
    if not index.name.endswith(".json") or not index.is_file():
        return None
    try:
        metadata = json.loads(index.read_text()).get("metadata") or {}
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, AttributeError):
        return None  # open_set words the error
    return None if isinstance(metadata, dict) and metadata.get("format") == SAFETENSORS_FORMAT else is_deepseek_tensor


def deepseek_tables(tensors: dict[str, Any], path: Path) -> dict[int, Table]:
    """The layers of a deepseek-v41 set, found by their tensor names under any of the prefixes
    (`keys.DEEPSEEK_PREFIXES`); the scales sit under the weight's own prefix. An error when there
    are none, or when one layer has two candidate tables (under two prefixes)."""
    tables: dict[int, Table] = {}
    for name in sorted(tensors):
        match = _DEEPSEEK_TENSOR.match(name)
        if match is None or match.group(3) != "weight":
            continue
        layer_id = int(match.group(2))
        if layer_id in tables:
            raise FormatError(
                f"{path} has two tables for Engram layer {layer_id}: {tables[layer_id].weight!r} and {name!r}"
            )
        tables[layer_id] = Table(layer_id, name, match.group(1) + DEEPSEEK_SCALE.format(layer_id=layer_id))
    if not tables:
        raise EngramError(
            f"{path} holds no Engram tables (neither an engram export nor "
            "layers.N.engram.embed.weight of the deepseek-v41 layout)"
        )
    return tables
