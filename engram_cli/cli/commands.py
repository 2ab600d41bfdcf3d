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

import math
from collections.abc import Iterable
from pathlib import Path

from ..errors import EngramError
from ..hash_jobs import HashFileReport, HashTextReport, hash_ids_file, hash_text
from ..spec import load_spec
from ..vocab import resolve_projection


def run_hash(
    text: str | None,
    *,
    spec: str | Path = "demo",
    projection: str | Path | None = None,
    ids: str | Path | None = None,
    output: str | Path | None = None,
    layers: Iterable[int] | None = None,
    rows: bool = False,
    special_tokens: bool = True,
    overwrite: bool = False,
) -> HashTextReport | HashFileReport:
    """The whole `engram hash` job: TEXT shows its n-grams; --ids FILE.npy -o OUT.npz writes arrays."""
    if (text is None) == (ids is None):
        raise EngramError(
            "give either TEXT to tokenize or --ids FILE.npy, not both"
            if text is not None
            else "give TEXT to tokenize, or --ids FILE.npy with -o OUT.npz"
        )
    if ids is not None and output is None:
        raise EngramError("--ids needs -o OUT.npz, the archive to write one array per layer into")
    if text is not None and output is not None:
        raise EngramError("-o is for --ids; TEXT is shown, not written (use --json for scripts)")
    table_spec = load_spec(spec)
    vocab = resolve_projection(projection)
    layers = None if not layers else list(layers)
    if ids is not None:
        return hash_ids_file(ids, output, table_spec, vocab, layers=layers, rows=rows, overwrite=overwrite)
    return hash_text(text, table_spec, vocab, layers=layers, rows=rows, special_tokens=special_tokens)


def parse_factors(text: str) -> list[float]:
    """`--sweep 1,2,5,10` as positive factors, in the order given, without repeats."""
    factors: list[float] = []
    for piece in text.split(","):
        try:
            value = float(piece)
        except ValueError:
            raise EngramError(f"--sweep takes comma-separated positive numbers, got {piece.strip()!r}") from None
        if not math.isfinite(value) or value <= 0:
            raise EngramError(f"--sweep factors must be positive, got {piece.strip()!r}")
        if value not in factors:
            factors.append(value)
    return factors
