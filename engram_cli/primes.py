"""Primality and the reference's walk to the next unused prime."""

from __future__ import annotations

from collections.abc import Iterable

# These bases make Miller-Rabin exact for every n < 3.3e24, far past int64.
_WITNESSES = (2, 3, 5, 7, 11, 13, 17, 19, 23, 29, 31, 37, 41)


def is_prime(n: int) -> bool:
    """Whether n is prime: deterministic Miller-Rabin, exact for every int64."""
    if n < 2:
        return False
    for p in _WITNESSES:
        if n % p == 0:
            return n == p
    d, s = n - 1, 0
    while d % 2 == 0:
        d //= 2
        s += 1
    for a in _WITNESSES:
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


def next_unused_prime(start: int, taken: Iterable[int] | set[int]) -> int:
    """Smallest prime strictly greater than `start` that is not in `taken`."""
    candidate = start + 1
    while not (is_prime(candidate) and candidate not in taken):
        candidate += 1
    return candidate
