"""`EngramTables`: the read path of an inference export, from token ids to table rows.

The tables (either layout, `layouts`) are memory-mapped, so a table larger than RAM opens and
only the rows gathered are read; ids are hashed with the export's own metadata (or a given spec
and projection) and rows gathered straight from the mapped files, fp8 rows dequantized to
bfloat16 in the same pass. The tables live in host memory: ids on an accelerator are gathered on
the host and the values go back to the ids' device. An export with a hot tier (`hot_tier`) has it
loaded into memory at open: its rows are gathered from there, the rest from the mapped tables,
with the same values either way; `traffic()` counts the hits and misses.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from ..errors import EngramError, FormatError
from ..spec import TableSpec, spec_from_dict
from ..vocab import VocabProjection
from .fp8 import gather_dequantize
from .fp8_format import BLOCK
from .hot_tier import TIER_FILE, LayerTier, TierTraffic, is_tier_tensor, tier_key
from .keys import LOOKUP_KEY, TOKENIZER_ZIP_KEY, meta_keys
from .layouts import SAFETENSORS_FORMAT, Table, check_table_names, deepseek_tables, stored_projection, tensor_filter
from .metadata import check_given, check_meta_tensors
from .model_config import model_hashing
from .safetensors_format import MappedTensors, open_set

if TYPE_CHECKING:
    from ..hashing import NgramHasher

_GATHER_THREADS = 2
_PARALLEL_VALUES = 1 << 20  # fp8 gathers at least this large dequantize on all gather threads


class EngramTables:
    """Memory-mapped Engram tables of an inference export, either layout.

    `lookup(input_ids)` hashes with the tables' own metadata (or the spec and projection given to
    `open`, which a deepseek-v41 shard set needs) and gathers rows straight from the mapped
    files: the host-offload read path. fp8 rows come back dequantized to bfloat16.
    """

    def __init__(
        self,
        path: Path,
        mapped: MappedTensors,
        tables: dict[int, Table],
        layout: str,
        spec: TableSpec | None,
        projection: VocabProjection | None,
    ) -> None:
        self.path = path
        self.layout = layout
        self.metadata = mapped.found.metadata
        self.spec = spec
        self.projection = projection
        self._mapped = mapped
        self._tables = tables
        self._weights = {layer: mapped.tensor(t.weight) for layer, t in tables.items()}
        self._scales = {layer: mapped.tensor(t.scale) for layer, t in tables.items() if t.scale}
        self._hasher: NgramHasher | None = None
        self._tier: dict[int, LayerTier] = {}
        self._traffic = {layer: [0, 0] for layer in tables}  # layer -> [hits, misses]
        for layer, scale in self._scales.items():
            rows, dim = self._weights[layer].shape
            if tuple(scale.shape) != (rows, dim // BLOCK) or dim % BLOCK:
                raise EngramError(
                    f"{path}: layer {layer} has scales of shape {tuple(scale.shape)} for a "
                    f"{rows} x {dim} table; expected one per {BLOCK} values, ({rows}, {dim // BLOCK})"
                )

    @classmethod
    def open(
        cls, path: str | Path, spec: TableSpec | None = None, projection: VocabProjection | None = None
    ) -> EngramTables:
        """Open a .safetensors file, an index json, or a folder holding either.

        Args:
            path: the export.
            spec: the spec of the tables (default: the export's own; required for deepseek-v41).
            projection: the vocab projection (likewise).
        """
        path = Path(path)
        found = open_set(path, tensor_filter(path))
        mapped = MappedTensors(found)
        metadata = found.metadata
        if metadata.get("format") == SAFETENSORS_FORMAT:
            try:
                tables = {
                    int(k): Table(int(k), str(v["weight"]), None if v["scale"] is None else str(v["scale"]))
                    for k, v in json.loads(metadata["tables"]).items()
                }
                stored_spec = spec_from_dict(json.loads(metadata["spec"]))
                projection_meta = json.loads(metadata.get("projection", "{}"))
                fingerprint = projection_meta.get("fingerprint")
            except (KeyError, ValueError, TypeError, AttributeError, EngramError):
                raise FormatError(f"{path}: the engram metadata in its header is damaged") from None
            check_given(stored_spec, fingerprint, spec, projection, str(path))
            layout = metadata.get("layout", "engram")
            spec = stored_spec
            check_table_names(tables.values(), spec.layer_ids, str(path))
            needed = [t.weight for t in tables.values()] + [t.scale for t in tables.values() if t.scale]
            needed.append(LOOKUP_KEY)
        else:
            tables = deepseek_tables(found.tensors, path)
            layout = "deepseek-v41"
            needed = [name for t in tables.values() for name in (t.weight, t.scale) if name is not None]
        missing = [name for name in needed if name not in found.tensors]
        if missing:
            raise FormatError(f"{path} lacks tensor {missing[0]!r} (an incomplete shard set?)")
        _check_table_tensors(found, tables, path)
        if layout != "deepseek-v41":
            _check_metadata_tensors(found, path)
            projection = stored_projection(found.tensors, mapped, projection_meta, str(path))
            present = {
                name: mapped.tensor(name).numpy()
                for layer in tables
                for name in meta_keys(layer).values()
                if name in found.tensors
            }
            check_meta_tensors(present, stored_spec, projection.compressed_size, str(path))
        opened = cls(path, mapped, tables, layout, spec, projection)
        if spec is not None:
            opened._check_spec(spec)
        opened._load_tier(found.tensors, mapped)
        return opened

    def _load_tier(self, tensors: dict[str, Any], mapped: MappedTensors) -> None:
        """Copy the hot tier into memory: the export's own tier tensors, or (deepseek-v41) those of
        the tier file beside the index."""
        if self.layout == "deepseek-v41":
            folder = self.path if self.path.is_dir() else self.path.parent
            if not (folder / TIER_FILE).is_file():
                return
            tier_set = open_set(folder / TIER_FILE)
            tensors, mapped = tier_set.tensors, MappedTensors(tier_set)
        names = {name for name in tensors if is_tier_tensor(name)}
        for layer, table in self._tables.items():
            if tier_key(layer, "rows") not in names:
                continue
            wanted = [tier_key(layer, part) for part in ("rows", "slots", "weight")]
            wanted += [tier_key(layer, "scale")] if table.scale else []
            missing = [name for name in wanted if name not in names]
            if missing:
                raise FormatError(f"{self.path}: the hot tier lacks tensor {missing[0]!r}")
            self._tier[layer] = LayerTier.load(
                mapped.tensor, layer, self.rows(layer), self.dim, table.scale is not None, str(self.path)
            )

    @property
    def hot_tier(self) -> dict[int, int]:
        """The rows of each layer's hot tier ({} for an export without one)."""
        return {layer: int(tier.sorted_rows.shape[0]) for layer, tier in sorted(self._tier.items())}

    def traffic(self) -> TierTraffic:
        """Rows gathered since open: from the hot tier (hits) and from the mapped tables (misses)."""
        layers = {layer: {"hits": h, "misses": m} for layer, (h, m) in sorted(self._traffic.items())}
        return TierTraffic(
            hits=sum(c["hits"] for c in layers.values()),
            misses=sum(c["misses"] for c in layers.values()),
            layers=layers,
        )

    @property
    def layer_ids(self) -> tuple[int, ...]:
        """The layers the export holds."""
        return tuple(sorted(self._tables))

    @property
    def dim(self) -> int:
        """The width of a table row."""
        return int(next(iter(self._weights.values())).shape[1])

    def rows(self, layer_id: int) -> int:
        """The rows of one layer's table."""
        return int(self.weight(layer_id).shape[0])

    @property
    def quantized(self) -> bool:
        """Whether the tables are fp8 with E8M0 scales."""
        return bool(self._scales)

    def weight(self, layer_id: int) -> torch.Tensor:
        """The mapped table of a layer (fp8 codes when quantized); read-only."""
        try:
            return self._weights[int(layer_id)]
        except KeyError:
            raise EngramError(f"layer {layer_id} is not in {self.path} (layers: {list(self.layer_ids)})") from None

    def scale(self, layer_id: int) -> torch.Tensor | None:
        """The mapped E8M0 scales of a layer's table, or None when it is not fp8."""
        self.weight(layer_id)
        return self._scales.get(int(layer_id))

    def gather(self, layer_id: int, rows: Any) -> torch.Tensor:
        """Rows of a layer's table for an index tensor of any shape -> (*shape, dim).

        The tables live in host memory: indices on an accelerator are gathered on the host and
        the values go back to the indices' device.
        """
        device = rows.device if isinstance(rows, torch.Tensor) else torch.device("cpu")
        index = torch.as_tensor(rows, dtype=torch.int64).cpu()
        weight = self.weight(layer_id)
        flat = index.reshape(-1)
        if flat.numel() and (int(flat.min()) < 0 or int(flat.max()) >= weight.shape[0]):
            raise EngramError(f"row indices must lie in [0, {weight.shape[0]}) for layer {layer_id}")
        scale = self._scales.get(int(layer_id))
        tier = self._tier.get(int(layer_id))
        threads = _GATHER_THREADS if flat.numel() * weight.shape[1] >= _PARALLEL_VALUES else 1
        if tier is not None:
            picked, hits = tier.gather(flat.contiguous(), weight, scale, threads=threads)
        elif scale is None:
            picked, hits = weight.index_select(0, flat), 0
        else:
            picked, hits = gather_dequantize(weight, scale, flat, threads=threads), 0
        counts = self._traffic[int(layer_id)]
        counts[0] += hits
        counts[1] += flat.numel() - hits
        return picked.reshape(*index.shape, weight.shape[1]).to(device)

    def with_hashing(self, spec: TableSpec, projection: VocabProjection) -> EngramTables:
        """These tables hashed with `spec` and `projection` (which a deepseek-v41 set lacks), once
        every table's shape is checked against the spec."""
        self._check_spec(spec)
        self.spec, self.projection, self._hasher = spec, projection, None
        return self

    def hasher(self) -> NgramHasher:
        """The hasher of the tables. A deepseek-v41 set opened without a spec takes it from the
        `engram_*` keys of its folder's config (see `model_hashing`); without a projection, the
        folder's tokenizer's or the spec's tokenizer's is used."""
        if self.spec is None:
            folder = self.path if self.path.is_dir() else self.path.parent
            self.with_hashing(*model_hashing(folder, None, self.projection))
        assert self.spec is not None
        if self._hasher is None:
            from ..hashing import NgramHasher

            self._hasher = NgramHasher(self.spec, self.projection)
            self.projection = self._hasher.projection
        return self._hasher

    def lookup(self, input_ids: Any, layers: Iterable[int] | None = None) -> dict[int, torch.Tensor]:
        """{layer_id: (B, T, heads, dim)} for token ids (B, T) (or (T, heads, dim) for 1-D ids)."""
        chosen = list(self.layer_ids if layers is None else layers)
        rows = self.hasher().rows(input_ids, layers=chosen)  # on the ids' device, as the ids
        return {layer: self.gather(layer, torch.as_tensor(r)) for layer, r in rows.items()}

    def _check_spec(self, spec: TableSpec) -> None:
        for layer_id in self.layer_ids:
            if layer_id not in spec.layer_ids:
                raise EngramError(
                    f"{self.path} holds layer {layer_id}, which spec {spec.name} does not have "
                    f"(layer_ids = {list(spec.layer_ids)})"
                )
            rows, dim = self.weight(layer_id).shape
            if (rows, dim) != (spec.rows(layer_id), spec.dim):
                raise EngramError(
                    f"layer {layer_id} of {self.path} is {rows:,} x {dim} but spec {spec.name} "
                    f"says {spec.rows(layer_id):,} x {spec.dim}"
                )


_TABLE_DTYPES = {"F32", "BF16", "F16", "F8_E4M3"}


def _check_table_tensors(found: Any, tables: dict[int, Table], path: Path) -> None:
    """Refuse tables the header points at tensors that cannot be tables: not 2-D, not a float
    table dtype, fp8 without E8M0 scales (or scales on a non-fp8 table)."""
    for layer, table in tables.items():
        weight = found.tensors[table.weight]
        if len(weight.shape) != 2 or weight.dtype not in _TABLE_DTYPES:
            raise FormatError(
                f"{path}: the table of layer {layer} is {table.weight!r}, a {weight.dtype} tensor of shape "
                f"{list(weight.shape)}; a table is 2-D of {', '.join(sorted(_TABLE_DTYPES))}"
            )
        fp8 = weight.dtype == "F8_E4M3"
        if fp8 != (table.scale is not None):
            raise FormatError(f"{path}: layer {layer} has {'no ' if fp8 else ''}scales for a {weight.dtype} table")
        if table.scale is not None:
            scale = found.tensors[table.scale]
            if len(scale.shape) != 2 or scale.dtype != "F8_E8M0":
                raise FormatError(
                    f"{path}: the scales of layer {layer} are {table.scale!r}, a {scale.dtype} tensor of shape "
                    f"{list(scale.shape)}; scales are 2-D F8_E8M0"
                )


def _check_metadata_tensors(found: Any, path: Path) -> None:
    """Refuse hashing metadata tensors of the wrong type or rank."""
    for name, dtype in ((LOOKUP_KEY, "I64"), (TOKENIZER_ZIP_KEY, "U8")):
        entry = found.tensors.get(name)
        if entry is not None and (entry.dtype != dtype or len(entry.shape) != 1):
            raise FormatError(f"{path}: {name} is {entry.dtype} {list(entry.shape)}, not a 1-D {dtype} tensor")
    for name, entry in found.tensors.items():
        if name.startswith("engram.layers.") and (entry.dtype != "I64" or len(entry.shape) != 1):
            raise FormatError(f"{path}: {name} is {entry.dtype} {list(entry.shape)}, not a 1-D I64 tensor")
