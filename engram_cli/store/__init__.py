"""Table stores: one sharded zarr v3 group holding every layer's table, and the job that fills it.

`attributes` states the store format (the group, its attributes and arrays) and writes the
attributes; `layout` plans rows into chunks, shard files and ranks; `shard_format` is the byte
format of one shard file (pure functions, no I/O); `files` reads and writes shard files, local or
fsspec; `tables` is the `TableStore` API; `create` makes an empty store; `build` is the build job
(generation, resume, the `complete` flag); `health` summarizes the values; `zarr_bfloat16` is the
zarr data type of bfloat16 tables.
"""

from .build import BuildReport, build_shard, build_tables
from .create import create_store
from .layout import LayerLayout, plan_layout
from .tables import TableStore, open_tables

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
