"""N-gram hashing: token ids to the row of every Engram head, bit-exact with the reference.

For position t and order n the reference mixes the projected ids
`x[t] * m[0] ^ x[t-1] * m[1] ^ ... ^ x[t-n+1] * m[n-1]` (int64, the projected pad
before the start of each row) and takes `mix mod p` for every head prime p of that
order. The straightforward numpy form makes a shifted copy per order and one
pass per head, and runs at 1 to 1.5 M tokens/s here; this one is a numba kernel that
projects, mixes and reduces one block of a row at a time in cache, writing the
output once.

The reduction avoids 64-bit division. Three roundings of relative error 2**-53
put float(mix) * (1/p) within 3 * 2**10 / p < 0.375 of mix / p when p >= 2**13, so
its truncation q lies in floor(mix / p) - 1 .. floor(mix / p) + 2 and `mix - q*p`
needs at most two corrections up and one down to land in [0, p): numpy's
floor-mod, negative mixes included. Smaller primes (toy specs) take the exact `%`.
"""

from __future__ import annotations

import numba
import numpy as np

# Below this the float quotient can be off by more than 2, so the kernel uses the exact `%`.
FLOAT_REDUCTION_MIN_PRIME = 1 << 13


@numba.njit(nogil=True, cache=True)
def bucket(mix, fmix, size, inverse):
    """mix mod size (floor-mod, as numpy and the hasher take it).

    From 2**13 up the float quotient trunc(mix * (1/size)) is within 2 of the true one, so
    a few branch-free corrections replace a 64-bit division; below, the exact `%`.
    """
    if size < FLOAT_REDUCTION_MIN_PRIME:
        return mix % size
    r = mix - np.int64(fmix * inverse) * size
    r += size & (r >> 63)
    r += size & (r >> 63)
    r -= size & ~((r - size) >> 63)
    return r
