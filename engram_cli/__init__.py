"""engram: build the memory tables of Engram-style language models."""

from .errors import EngramError
from .hashing import NgramHasher
from .spec import InitSpec, TableSpec, load_spec
from .vocab import VocabProjection, compress_vocab, default_projection, load_projection

__all__ = [
    "EngramError", "InitSpec", "NgramHasher", "TableSpec", "VocabProjection", "compress_vocab",
    "default_projection", "load_projection", "load_spec", "TableStore", "build_tables", "open_tables",
    "EngramTables",
]

_LAZY = {"TableStore": "store", "build_tables": "store", "open_tables": "store",
         "EngramTables": "inference"}


def __getattr__(name: str) -> object:
    """Stores and inference tables pull in zarr, numba and torch: load them on first use, not
    on every CLI start."""
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
    raise AttributeError(f"module 'engram_cli' has no attribute {name!r}")
