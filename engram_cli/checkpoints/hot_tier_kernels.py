"""The numba kernel of a tiered gather (see `hot_tier`): each row from the tier or the main table.

One pass over the ids: a row is looked up by binary search in the tier's sorted row ids (the
tier's `slots` give its place), then its bytes are copied from the tier when it is there, else
from the memory-mapped table; no masks or intermediate index arrays, so a gather costs one
`index_select` plus the search. A module of its own so that numba loads only on first use; the
kernel releases the GIL.
"""

from __future__ import annotations

import numba
import numpy as np


@numba.njit(nogil=True, cache=True)
def gather_tiered(
    sorted_rows: np.ndarray, slots: np.ndarray, tier: np.ndarray, main: np.ndarray, ids: np.ndarray, out: np.ndarray
) -> int:
    """out[i] = the bytes of row ids[i]: tier[slot] when the tier holds it, else main[ids[i]];
    returns how many came from the tier."""
    k = sorted_rows.size
    hits = 0
    for i in range(ids.size):
        row = ids[i]
        lo, hi = 0, k
        while lo < hi:
            mid = (lo + hi) >> 1
            if sorted_rows[mid] < row:
                lo = mid + 1
            else:
                hi = mid
        if lo < k and sorted_rows[lo] == row:
            out[i, :] = tier[slots[lo], :]
            hits += 1
        else:
            out[i, :] = main[row, :]
    return hits
