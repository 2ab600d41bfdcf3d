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
  F8_E8M0 (rows, dim / 32), in shards with a `model.safetensors.index.json`; no hashing metadata
  (the header says only format "pt"), so reading one back takes a spec and a projection.

Both keep the row = offset(head) + bucket order of the store, so a row index from the hasher
reads the file directly. A reader tells them apart by the header's `format`.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, get_args

from ..errors import EngramError
from ..vocab import VocabProjection, restore_projection
from .keys import DEEPSEEK_SCALE, LOOKUP_KEY, TOKENIZER_ZIP_KEY
from .safetensors_format import MappedTensors

Layout = Literal["engram", "deepseek-v41"]
LAYOUTS: tuple[str, ...] = get_args(Layout)
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


def deepseek_tables(tensors: dict[str, Any], path: Path) -> dict[int, Table]:
    """The layers of a deepseek-v41 export, found by their tensor names; an error when there are none."""
    import re

    pattern = re.compile(r"^layers\.(\d+)\.engram\.embed\.weight$")
    tables = {}
    for name in tensors:
        match = pattern.match(name)
        if match:
            layer_id = int(match.group(1))
            tables[layer_id] = Table(layer_id, name, DEEPSEEK_SCALE.format(layer_id=layer_id))
    if not tables:
        raise EngramError(
            f"{path} holds no Engram tables (neither an engram export nor "
            "layers.N.engram.embed.weight of the deepseek-v41 layout)"
        )
    return tables
