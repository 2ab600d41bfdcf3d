"""The numba integer kernels that hashing and collision statistics share: the bucket modulo.

Every head takes `mix mod p` of the int64 mix (numpy's floor-mod, negative mixes included). The
reduction avoids 64-bit division. Three roundings of relative error 2**-53 put float(mix) * (1/p)
within 3 * 2**10 / p < 0.375 of mix / p when p >= 2**13, so its truncation q lies in
floor(mix / p) - 1 .. floor(mix / p) + 2 and `mix - q*p` needs at most two corrections up and one
down to land in [0, p). Smaller primes (toy specs) take the exact `%`. The hashing kernel writes
the same steps inline, the statistics call `bucket`: calling a shared branch-free `float_bucket`
from the parallel hashing kernel measured 5-8% slower (256 x 4096 ids into reused buffers,
alternated 6 times against the inline form, with numba's `inline="always"` too).
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

    Args:
        mix: the int64 mix.
        fmix: the same mix as float64 (converted once for all heads).
        size: the head size p.
        inverse: 1.0 / size.
    """
    if size < FLOAT_REDUCTION_MIN_PRIME:
        return mix % size
    r = mix - np.int64(fmix * inverse) * size
    r += size & (r >> 63)
    r += size & (r >> 63)
    r -= size & ~((r - size) >> 63)
    return r


@numba.njit(nogil=True, cache=True)
def buckets(mix, size, out):
    """`bucket` of every mix into `out`: a loop the compiler vectorizes (the size test is hoisted).

    Args:
        mix: int64 mixes.
        size: the head size.
        out: int64 buckets, filled.
    """
    inverse = 1.0 / size
    for i in range(mix.size):
        out[i] = bucket(mix[i], np.float64(mix[i]), size, inverse)
