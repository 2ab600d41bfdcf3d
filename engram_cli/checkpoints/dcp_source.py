"""A DCP checkpoint read back as a `TableSource`, row window by row window, for `engram import`.

An engram export describes itself (`dcp_format`: the spec, the projection, the tables and the
sharding under `engram.*`); a checkpoint some framework wrote carries no such metadata, so
`--spec`, `--projection` and the key template then say what it holds, and every tensor's shape
is checked against them. An import reads windows of whole store shards aligned to the saved
pieces (`read_windows`), so each piece is loaded about once. DCP metadata is a pickle: it is only
read with `trust_pickle`.
"""

from __future__ import annotations

import json
import string
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch

from ..dtypes import INFERENCE_DTYPES, from_torch, torch_dtype
from ..errors import EngramError, FormatError, UsageError
from ..spec import TableSpec, spec_from_dict
from ..vocab import VocabProjection
from .dcp_format import DCP_FORMAT, check_pieces, load_windows, read_metadata, recorded_tables
from .keys import (
    DEFAULT_KEY_TEMPLATE,
    LOOKUP_KEY,
    META_KEY,
    TOKENIZER_ZIP_KEY,
    check_distinct_keys,
    check_key_template,
    head_key,
    meta_keys,
    piece_names,
)
from .metadata import check_given, check_meta_tensors
from .sources import LayerSource, Sharding, TableSource

_SMALL_LIMIT = 1 << 30  # elements of a metadata tensor (lookup, tokenizer zip) read whole


class DcpSource(TableSource):
    """A DCP checkpoint read back row window by row window (never a whole table at once)."""

    format = "dcp"
    layout = "dcp"

    def __init__(
        self,
        path: Path,
        *,
        trust_pickle: bool,
        spec: TableSpec | None,
        projection: VocabProjection | None,
        key_template: str | None,
        layers: Iterable[int] | None,
    ) -> None:
        from torch.distributed.checkpoint.metadata import TensorStorageMetadata

        self.path = path
        metadata = read_metadata(path, trust_pickle)
        entries = metadata.state_dict_metadata
        self.entries = entries
        self._metadata = metadata
        meta = self._load_meta()
        if meta is not None:
            try:
                stored_spec = spec_from_dict(meta["spec"])
                recorded = meta["projection"]
                fingerprint = recorded.get("fingerprint")
            except (KeyError, TypeError, AttributeError, EngramError) as exc:
                raise FormatError(f"{path}: the spec or projection in {META_KEY} is damaged ({exc})") from None
            check_given(stored_spec, fingerprint, spec, projection, str(path))
            spec = stored_spec
            projection = self._stored_projection(entries, recorded)
            tables = recorded_tables(meta, spec, str(path))
            self.sharding = Sharding.recorded(meta.get("sharding"), str(path))
            self.store_dtype = meta.get("store_dtype")
        else:
            if spec is None:
                raise UsageError(
                    f"{path} carries no engram hashing metadata (not made by `engram export`): "
                    "pass --spec (and --projection, unless the spec's tokenizer is the model's)"
                )
            if projection is None:
                from ..vocab import spec_projection

                projection = spec_projection(spec)
            template = key_template or DEFAULT_KEY_TEMPLATE
            fields = {f for _, f, _, _ in string.Formatter().parse(template) if f}
            names = check_key_template(template, per_head=bool(fields & {"head", "order", "order_head"}))
            tables = {}
            for layer_id in spec.layer_ids:
                if len(names) == 1:
                    tables[layer_id] = [(template.format(layer_id=layer_id), 0, spec.rows(layer_id))]
                    continue
                tables[layer_id] = []
                for head, (offset, size) in enumerate(zip(spec.offsets(layer_id), spec.head_sizes(layer_id))):
                    key = head_key(template, layer_id, head, spec.n_head_per_ngram)
                    tables[layer_id].append((key, offset, offset + size))
            check_distinct_keys(
                piece_names((layer, key, a, b) for layer, parts in tables.items() for key, a, b in parts),
                (),
                f"key template {template!r}",
            )
            tables = {k: v for k, v in tables.items() if any(key in entries for key, _, _ in v)}
            if not tables:
                raise UsageError(
                    f"{path} has no tensor named like {template!r} (keys: "
                    f"{', '.join(sorted(entries)[:4])}, ...); pass --key-template"
                )
            self.store_dtype = None
        chosen = tuple(sorted(tables)) if layers is None else tuple(int(x) for x in layers)
        for layer_id in chosen:
            if layer_id not in tables:
                raise UsageError(f"{path} holds no table for layer {layer_id} (layers: {sorted(tables)})")
            for key, start, stop in tables[layer_id]:
                entry = entries.get(key)
                if not isinstance(entry, TensorStorageMetadata):
                    raise FormatError(f"{path} lacks tensor {key!r} of layer {layer_id}")
                if tuple(entry.size) != (stop - start, spec.dim):
                    raise FormatError(
                        f"{key} in {path} is {tuple(entry.size)} but spec {spec.name} needs {(stop - start, spec.dim)}"
                    )
        check_pieces(path, metadata, [key for layer in chosen for key, _, _ in tables[layer]])
        super().__init__(spec, projection, chosen)
        self.tables = tables
        dtypes = {entries[key].properties.dtype for layer in chosen for key, _, _ in tables[layer]}
        names = [from_torch(d).name for d in dtypes if str(d).removeprefix("torch.") in INFERENCE_DTYPES]
        if len(dtypes) != 1 or not names:
            raise FormatError(f"{path}: tables of dtype {', '.join(map(str, dtypes))} cannot go into a store")
        self.dtype = names[0]
        if meta is not None:
            present = [name for layer in chosen for name in meta_keys(layer).values() if name in entries]
            check_meta_tensors(self._load_small(present), spec, projection.compressed_size, str(path))

    def _load_meta(self) -> dict[str, Any] | None:
        if META_KEY not in self.entries:
            return None
        raw = self._load_small([META_KEY])[META_KEY]
        try:
            meta = json.loads(raw.numpy().tobytes())
        except (UnicodeDecodeError, json.JSONDecodeError):
            meta = None
        if not isinstance(meta, dict) or meta.get("format") != DCP_FORMAT:
            raise FormatError(f"{self.path}: {META_KEY} is not the metadata `engram export` writes")
        return meta

    def _load_small(self, keys: list[str]) -> dict[str, torch.Tensor]:
        from torch.distributed.checkpoint.metadata import TensorStorageMetadata

        for key in keys:
            entry = self.entries[key]
            if not isinstance(entry, TensorStorageMetadata) or len(entry.size) != 1 or entry.size[0] > _SMALL_LIMIT:
                raise FormatError(f"{self.path}: {key} is not the small 1-D tensor engram writes there")
        check_pieces(self.path, self._metadata, keys)
        buffers = {k: torch.empty(tuple(self.entries[k].size), dtype=self.entries[k].properties.dtype) for k in keys}
        load_windows(self.path, {k: (0, v) for k, v in buffers.items()})
        return buffers

    def _stored_projection(self, entries: dict[str, Any], recorded: dict[str, Any]) -> VocabProjection:
        from ..vocab import restore_projection

        if LOOKUP_KEY not in entries:
            raise FormatError(f"{self.path} records engram metadata but lacks {LOOKUP_KEY}")
        keys: list[str] = [k for k in (LOOKUP_KEY, TOKENIZER_ZIP_KEY) if k in entries]
        loaded = self._load_small(keys)
        zipped = loaded.get(TOKENIZER_ZIP_KEY)
        if zipped is not None and zipped.dtype != torch.uint8:
            raise FormatError(f"{self.path}: {TOKENIZER_ZIP_KEY} must hold uint8 zip bytes")
        return restore_projection(
            loaded[LOOKUP_KEY].numpy(),
            None if zipped is None else zipped.numpy().tobytes(),
            recorded,
            str(self.path),
        )

    def read_windows(self, layer_id: int, shards: list[tuple[int, int]]) -> list[tuple[int, int]]:
        """Runs of whole store shards aligned to the saved pieces (`read_windows`)."""
        return read_windows(shards, self.boundaries(layer_id))

    def boundaries(self, layer_id: int) -> list[int]:
        """Layer rows where a saved piece ends: reads aligned to them load each piece once."""
        ends = set()
        for key, start, _ in self.tables[layer_id]:
            for chunk in self.entries[key].chunks:
                ends.add(start + chunk.offsets[0] + chunk.sizes[0])
        return sorted(ends)

    def layer(self, layer_id: int) -> LayerSource:
        """The reader of one layer's table: each read loads just its rows through DCP's resharding reads."""
        spec = self.spec
        parts = self.tables[layer_id]
        target = torch_dtype(self.dtype)

        def read(begin: int, end: int) -> torch.Tensor:
            out = torch.empty((end - begin, spec.dim), dtype=target)
            windows = {}
            for key, start, stop in parts:
                lo, hi = max(begin, start), min(end, stop)
                if lo < hi:
                    windows[key] = (lo - start, out[lo - begin : hi - begin])
            load_windows(self.path, windows)
            return out

        return LayerSource(layer_id, spec.rows(layer_id), spec.dim, read)


def read_windows(shards: list[tuple[int, int]], boundaries: list[int]) -> list[tuple[int, int]]:
    """Runs of whole store shards, each ending at the first shard end at or past the end of the
    source piece it starts in: every source piece is then loaded about once, and a window holds
    at most one piece plus a shard."""
    windows, i = [], 0
    while i < len(shards):
        begin = shards[i][0]
        piece_end = next((b for b in boundaries if b > begin), shards[-1][1])
        j = i
        while j < len(shards) - 1 and shards[j][1] < piece_end:
            j += 1
        windows.append((begin, shards[j][1]))
        i = j + 1
    return windows
