"""Exact hash-collision statistics of a spec on a corpus.

`keys` packs n-gram windows into stored keys and counts them; `spill` keeps the counts within a
memory budget, spilling partitions to disk; `statistics` turns distinct n-grams into per-head
collision figures and size sweeps; `cluster` runs the counting as Dask map/reduce tasks. The
algorithm is stated where each step lives: window keys and merging in `keys`, partitions and
spilling in `spill`, the two passes and the all-heads count in `statistics`.
"""

import importlib

_LAZY = {
    "HeadStats": "statistics",
    "KeyCountStore": "spill",
    "KeyCounts": "keys",
    "OrderStats": "statistics",
    "SweepPoint": "statistics",
    "WindowKeys": "keys",
    "collision_statistics": "statistics",
}

__all__ = ["HeadStats", "KeyCountStore", "KeyCounts", "OrderStats", "SweepPoint", "WindowKeys", "collision_statistics"]


def __getattr__(name: str) -> object:
    """Load a submodule on first use of one of its names, so that importing this package (for its
    light modules) does not load numba."""
    if name in _LAZY:
        return getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
