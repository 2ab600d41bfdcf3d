"""Exact hash-collision statistics of a spec on a corpus.

`keys` packs n-gram windows into stored keys and counts them; `spill` keeps the counts within a
memory budget, spilling partitions to disk; `statistics` turns distinct n-grams into per-head
collision figures and size sweeps; `cluster` runs the counting as Dask map/reduce tasks. The
algorithm is stated where each step lives: window keys and merging in `keys`, partitions and
spilling in `spill`, the two passes and the all-heads count in `statistics`.
"""

from .keys import KeyCounts, WindowKeys
from .spill import KeyCountStore
from .statistics import HeadStats, OrderStats, SweepPoint, collision_statistics

__all__ = ["HeadStats", "KeyCountStore", "KeyCounts", "OrderStats", "SweepPoint", "WindowKeys", "collision_statistics"]
