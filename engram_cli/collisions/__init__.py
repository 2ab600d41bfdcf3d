"""Exact hash-collision statistics of a spec on a corpus.

`keys` packs n-gram windows into stored keys; `sorting` sorts them into runs of distinct keys
and counts; `counting` counts a corpus into such runs within the memory budget, spilling them to
the folder `spill` owns; `options` is how a count runs (`CountOptions`: memory, spill folder,
fan-in, a cluster, progress); `runs` reads runs back and merges them one key range at a time;
`statistics` runs the per-head passes over the distinct n-grams, planned by `budget`, with the
n-grams crowded in every head counted by `candidates`, and returns the figures of `reports`
(`decoder` gives the text of listed n-grams); `cluster` runs the counting and merging as Dask
map/reduce tasks. The algorithm is stated where each step lives.
"""

import importlib
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # what `__getattr__` loads on first use, named for type checkers and IDEs
    from .counting import KeyCountStore
    from .keys import KeyCounts, WindowKeys
    from .options import CountOptions
    from .reports import HeadStats, OrderStats, SweepPoint
    from .statistics import collision_statistics

_LAZY = {
    "CountOptions": "options",
    "HeadStats": "reports",
    "KeyCountStore": "counting",
    "KeyCounts": "keys",
    "OrderStats": "reports",
    "SweepPoint": "reports",
    "WindowKeys": "keys",
    "collision_statistics": "statistics",
}

__all__ = [
    "CountOptions",
    "HeadStats",
    "KeyCountStore",
    "KeyCounts",
    "OrderStats",
    "SweepPoint",
    "WindowKeys",
    "collision_statistics",
]


def __getattr__(name: str) -> object:
    """Load a submodule on first use of one of its names, so that importing this package (for its
    light modules) does not load numba."""
    if name in _LAZY:
        return getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
