"""Primality and the next prime: the steps of the reference's prime walk (`spec` skips taken primes).

`is_prime` is deterministic Miller-Rabin: below each bound in `_BASES` the listed bases
decide every n exactly (Jaeschke; Zhang and Tang; Sorenson and Webster), and the last set holds
to 3.3e24, far past int64. A gcd with the product of the primes below 256 first drops about
nine in ten candidates without any modular exponentiation, so the walk costs tens of
microseconds per head even at 2**48.
"""

from __future__ import annotations

import math

_SMALL = tuple(p for p in range(2, 256) if all(p % d for d in range(2, math.isqrt(p) + 1)))
_SMALL_PRODUCT = math.prod(_SMALL)

_BASES = (
    (2_152_302_898_747, (2, 3, 5, 7, 11)),
    (3_474_749_660_383, (2, 3, 5, 7, 11, 13)),
    (341_550_071_728_321, (2, 3, 5, 7, 11, 13, 17)),
    (3_825_123_056_546_413_051, (2, 3, 5, 7, 11, 13, 17, 19, 23)),
    (318_665_857_834_031_151_167_461, (2, 3, 5, 7, 11, 13, 17, 19, 23, 29, 31, 37)),
)
_LAST_BASES = (2, 3, 5, 7, 11, 13, 17, 19, 23, 29, 31, 37, 41)  # exact below 3.3e24


def is_prime(n: int) -> bool:
    """Whether n is prime: deterministic Miller-Rabin, exact for every int64."""
    if n < 2:
        return False
    if n <= _SMALL[-1]:
        return n in _SMALL
    if math.gcd(n, _SMALL_PRODUCT) != 1:
        return False
    bases = next((b for bound, b in _BASES if n < bound), _LAST_BASES)
    d, s = n - 1, 0
    while d % 2 == 0:
        d //= 2
        s += 1
    for a in bases:
        x = pow(a, d, n)
        if x in (1, n - 1):
            continue
        for _ in range(s - 1):
            x = x * x % n
            if x == n - 1:
                break
        else:
            return False
    return True


def next_prime(start: int) -> int:
    """Smallest prime strictly greater than `start`."""
    if start < 2:
        return 2
    candidate = max(start + 1, 3) | 1  # past 2 only odd numbers can be prime
    while not is_prime(candidate):
        candidate += 2
    return candidate
