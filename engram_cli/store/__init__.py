"""Table stores: one sharded zarr v3 group holding every layer's table, and the job that fills it.

`layout` plans rows into chunks, shard files and ranks; `shard_format` is the byte format of one
shard file (pure functions, no I/O); `files` reads and writes shard files, local or fsspec;
`attributes` is what a store records about itself; `tables` is the `TableStore` API; `create`
makes an empty store; `build` generates the values; `health` summarizes them.
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
