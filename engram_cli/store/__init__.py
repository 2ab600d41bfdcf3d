"""Table stores: one sharded zarr v3 group holding every layer's table, and the job that fills it.

`attributes` states the store format (the group, its attributes and arrays) and writes the
attributes; `layout` plans rows into chunks, shard files and ranks; `shard_format` is the byte
format of one shard file (pure functions, no I/O); `files` reads and writes shard files, local or
fsspec; `consistency` checks what a store records against its spec and its arrays' own metadata
whenever it is opened; `tables` is the `TableStore` API; `create` makes an empty store; `writer`
is what an importer writes a store through; `build` is the build job (generation, resume, the
`complete` flag); `health` summarizes the values; `zarr_bfloat16` is the zarr data type of
bfloat16 tables.
"""

import importlib
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # what `__getattr__` loads on first use, named for type checkers and IDEs
    from .build import BuildReport, build_shard, build_tables
    from .create import create_store
    from .layout import LayerLayout, plan_layout
    from .tables import TableStore, open_tables

_LAZY = {
    "BuildReport": "build",
    "LayerLayout": "layout",
    "TableStore": "tables",
    "build_shard": "build",
    "build_tables": "build",
    "create_store": "create",
    "open_tables": "tables",
    "plan_layout": "layout",
}

__all__ = [
    "BuildReport",
    "LayerLayout",
    "TableStore",
    "build_shard",
    "build_tables",
    "create_store",
    "open_tables",
    "plan_layout",
]


def __getattr__(name: str) -> object:
    """Load a submodule on first use of one of its names, so that importing this package (for its
    light modules) does not load zarr."""
    if name in _LAZY:
        return getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
