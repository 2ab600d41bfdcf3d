"""Exact hash-collision statistics of a spec on a corpus.

`keys` packs n-gram windows into stored keys and sorts them into runs of distinct keys and
counts; `spill` keeps the counts within a memory budget (runs on disk, merged one key range at a
time); `statistics` turns distinct n-grams into per-head collision figures and size sweeps, its
bucket counters in the same budget; `cluster` runs the counting and merging as Dask map/reduce
tasks. The algorithm is stated where each step lives.
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
