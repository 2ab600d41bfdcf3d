"""engram: build the memory tables of Engram-style language models."""

import importlib
from typing import TYPE_CHECKING

from .errors import EngramError
from .hashing import NgramHasher
from .spec import InitSpec, TableSpec, load_spec
from .store.zarr_registration import register_when_zarr_loads
from .vocab import VocabProjection, compress_vocab, default_projection, load_projection

if TYPE_CHECKING:  # what `__getattr__` loads on first use, named for type checkers and IDEs
    from .checkpoints.tables import EngramTables
    from .collisions.options import CountOptions
    from .collisions.statistics import collision_statistics
    from .corpus.base import CorpusOptions, DocBatch
    from .corpus.reader import Corpus
    from .inspection import inspect
    from .store.build import build_shard, build_tables
    from .store.create import create_store
    from .store.tables import TableStore, open_tables

# A bf16 store needs zarr's "bfloat16" data type, in engram's reads and in a user's own
# `zarr.open_array`: registered when zarr loads, without importing zarr here.
register_when_zarr_loads()

__all__ = [
    "Corpus",
    "CorpusOptions",
    "CountOptions",
    "DocBatch",
    "EngramError",
    "EngramTables",
    "InitSpec",
    "NgramHasher",
    "TableSpec",
    "TableStore",
    "VocabProjection",
    "build_shard",
    "build_tables",
    "collision_statistics",
    "compress_vocab",
    "create_store",
    "default_projection",
    "inspect",
    "load_projection",
    "load_spec",
    "open_tables",
    "spec_from_model_config",
]

_LAZY = {
    "TableStore": "store",
    "build_tables": "store",
    "open_tables": "store",
    "create_store": "store",
    "build_shard": "store",
    "EngramTables": "checkpoints",
    "spec_from_model_config": "checkpoints",
    "collision_statistics": "collisions",
    "CountOptions": "collisions",
    "inspect": "inspection",
    "Corpus": "corpus",
    "CorpusOptions": "corpus",
    "DocBatch": "corpus",
}


def __getattr__(name: str) -> object:
    """Stores, checkpoints and statistics pull in zarr, numba and torch: load them on first use,
    not on every CLI start."""
    if name in _LAZY:
        return getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
    raise AttributeError(f"module 'engram_cli' has no attribute {name!r}")
