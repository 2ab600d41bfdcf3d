"""N-grams that collide in every head, counted exactly; the n-grams of the fullest buckets.

An n-gram that shares its bucket in every head with one same other n-gram is one whose mix
agrees with it modulo the lcm of the head sizes (Chinese remainder theorem); only n-grams crowded
in every head can be one, so grouping those candidates by that residue, and by the mix itself,
gives `all_heads_colliding` and `mix_colliding` exactly. When the lcm is at least 2**63 it exceeds
every mix and the two counts are the same. Candidates are held in a bounded buffer, else spilled
into files by a hash of the residue, so equal residues meet in one file, and each file is counted
alone (split again by more bits of the hash when it outgrows the buffer).
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

import numba
import numpy as np

from .keys import KEY_MUL_U64, KeyCounts, KeyLayout, unpack_windows
from .spill import SpillFolder

if TYPE_CHECKING:
    from .decoder import NgramDecoder

# At most this many n-grams of a crowded bucket are listed by --top (in JSON; fewer on screen).
TOP_NGRAMS = 8


# Every mix is below this (an int64): a modulus at least as large leaves the mix itself as residue.
MAX_MIX = 1 << 63


# Candidate mixes spill into this many files by a hash of their residue.
CANDIDATE_PART_BITS = 8


@numba.njit(nogil=True, cache=True)
def _compress_into(values, flags, out, at):
    """values[flags] copied into out from index `at`; returns the index after the last."""
    for i in range(values.size):
        if flags[i]:
            out[at] = values[i]
            at += 1
    return at


@numba.njit(nogil=True, cache=True)
def _fullest(loads, k):
    """The k fullest buckets holding more than one n-gram, by load then bucket index: all those
    above the k-th largest load, then the first of those at it. Returns (buckets, loads)."""
    hist = np.bincount(loads)
    above = 0  # buckets with a load above v
    v = hist.size - 1
    while v >= 2 and above + hist[v] < k:
        above += hist[v]
        v -= 1
    edge = max(v, 2)  # the load at which only the first buckets are taken
    at_edge = k - above if v >= 2 else hist[2] if hist.size > 2 else 0
    out = np.empty(above + at_edge, np.int64)
    n = 0
    for b in range(loads.size):
        load = loads[b]
        if load > edge or (load == edge and at_edge > 0):
            if load == edge:
                at_edge -= 1
            out[n] = b
            n += 1
    out = out[:n]
    return out, loads[out].astype(np.int64)


@numba.njit(nogil=True, cache=True)
def _count_shared_sorted(values):
    """How many of the sorted `values` equal a neighbour."""
    shared = 0
    i = 0
    n = values.size
    while i < n:
        j = i + 1
        while j < n and values[j] == values[i]:
            j += 1
        if j - i > 1:
            shared += j - i
        i = j
    return shared


@numba.njit(nogil=True, cache=True)
def _group_by_hash(values, residues, shift, bits, out, edges):
    """values into out grouped by bits of a hash of their residue (a counting sort)."""
    groups = 1 << bits
    mask = np.uint64(groups - 1)
    edges[:] = 0
    for i in range(values.size):
        group = np.int64(((np.uint64(residues[i]) * KEY_MUL_U64) >> np.uint64(shift)) & mask)
        edges[group + 1] += 1
    for g in range(groups):
        edges[g + 1] += edges[g]
    fill = edges[:groups].copy()
    for i in range(values.size):
        group = np.int64(((np.uint64(residues[i]) * KEY_MUL_U64) >> np.uint64(shift)) & mask)
        out[fill[group]] = values[i]
        fill[group] += 1


class CandidateSet:
    """Mixes of n-grams crowded in every head, counted for equal values (and equal residues
    modulo `modulus`). Held in one buffer of `limit` bytes, sorted in place at the end; past
    it, spilled into files by a hash of the residue, so equal residues (and equal mixes) always
    meet in one file, and each file is counted alone (split again if it outgrows the limit)."""

    def __init__(self, name: str, modulus: int | None, limit: int, folder: SpillFolder) -> None:
        self.name = name
        self.modulus = modulus if modulus is not None and modulus < MAX_MIX else None
        # a residue copy is sorted beside the values when there is a modulus
        self.capacity = max(1, limit // (8 if self.modulus is None else 16))
        self.folder = folder
        self._buffer: np.ndarray | None = None
        self._fill = 0
        self._files: list[Path] = []

    def residue(self, mix: np.ndarray) -> np.ndarray:
        """What equal candidates share: the mix modulo the lcm (or the mix itself)."""
        return mix if self.modulus is None else mix % np.int64(self.modulus)

    def add(self, mix: np.ndarray, flags: np.ndarray) -> None:
        """Add the mixes whose flag is set."""
        n = int(np.count_nonzero(flags))
        if not n:
            return
        if self._fill + n > self.capacity:
            self._spill_buffer()
        if n > self.capacity:
            self._spill(mix[flags], 0, self._files_at(0, ""))
            return
        if self._buffer is None:
            self._buffer = np.empty(self.capacity, np.int64)
        self._fill = int(_compress_into(mix, flags, self._buffer, self._fill))

    def _spill_buffer(self) -> None:
        if self._buffer is not None and self._fill:
            step = 1 << 20
            files = self._files_at(0, "")
            for lo in range(0, self._fill, step):
                self._spill(self._buffer[lo : min(lo + step, self._fill)], 0, files)
        self._fill = 0

    def _files_at(self, level: int, prefix: str) -> list[Path]:
        if level == 0:
            if not self._files:
                self._files = [self.folder.path / f"{self.name}-{g:04d}" for g in range(1 << CANDIDATE_PART_BITS)]
            return self._files
        return [Path(f"{prefix}.{g:04d}") for g in range(1 << CANDIDATE_PART_BITS)]

    def _spill(self, values: np.ndarray, level: int, files: list[Path]) -> None:
        shift = 64 - CANDIDATE_PART_BITS * (level + 1)
        out = np.empty_like(values)
        edges = np.zeros((1 << CANDIDATE_PART_BITS) + 1, np.int64)
        _group_by_hash(values, self.residue(values), shift, CANDIDATE_PART_BITS, out, edges)
        bounds = edges.tolist()
        for g, (a, b) in enumerate(zip(bounds[:-1], bounds[1:])):
            if b > a:
                self.folder.append(files[g], out[a:b])

    def counts(self) -> tuple[int, int]:
        """(n-grams sharing their mix, n-grams sharing their residue) among the candidates."""
        if not self._files:
            values = np.zeros(0, np.int64) if self._buffer is None else self._buffer[: self._fill]
            result = self._shared(values)
        else:
            self._spill_buffer()
            self._buffer = None
            result = self._count_files(self._files, 0)
        self._buffer, self._fill = None, 0
        return result

    def _count_files(self, files: list[Path], level: int) -> tuple[int, int]:
        by_mix = by_residue = 0
        for path in files:
            if not path.exists():
                continue
            if path.stat().st_size // 8 > self.capacity and CANDIDATE_PART_BITS * (level + 2) <= 64:
                sub = self._files_at(level + 1, str(path))
                with open(path, "rb") as handle:
                    while True:
                        values = np.fromfile(handle, dtype=np.int64, count=min(self.capacity, 1 << 20))
                        if not values.size:
                            break
                        self._spill(values, level + 1, sub)
                path.unlink()
                m, r = self._count_files(sub, level + 1)
            else:
                m, r = self._shared(np.fromfile(path, dtype=np.int64))
                path.unlink()
            by_mix += m
            by_residue += r
        return by_mix, by_residue

    def _shared(self, values: np.ndarray) -> tuple[int, int]:
        """Sorts `values` in place."""
        by_residue = 0
        if self.modulus is not None:
            residues = values % np.int64(self.modulus)
            residues.sort()
            by_residue = int(_count_shared_sorted(residues))
            del residues
        values.sort()
        by_mix = int(_count_shared_sorted(values))
        return by_mix, by_mix if self.modulus is None else by_residue


class TopMembers:
    """The most frequent n-grams of the fullest buckets of one layer's heads, kept as the
    distinct n-grams stream past in key order: at most TOP_NGRAMS per bucket, by count then key."""

    def __init__(self, chosen: list[tuple[int, int, int]], sizes: list[int], words: int) -> None:
        self.chosen = chosen  # (load, head, bucket)
        self.sizes = sizes
        self.members: dict[tuple[int, int], KeyCounts] = {(h, b): KeyCounts.empty(words) for _, h, b in chosen}
        self._wanted = {
            h: np.array(sorted(b for _, hh, b in chosen if hh == h), np.int64) for h in {h for _, h, _ in chosen}
        }

    def add(self, part: KeyCounts, mix: np.ndarray) -> None:
        """Keep the n-grams of `part` (with their mixes) that fall in a chosen bucket."""
        for h, wanted in self._wanted.items():
            buckets = mix % np.int64(self.sizes[h])
            hit = np.flatnonzero(np.isin(buckets, wanted))
            if not hit.size:
                continue
            for b in np.unique(buckets[hit]).tolist():
                rows = hit[buckets[hit] == b]
                old = self.members[(h, b)]
                keys = np.concatenate([old.keys, part.keys[rows]])
                counts = np.concatenate([old.counts, part.counts[rows]])
                keep = np.argsort(-counts, kind="stable")[:TOP_NGRAMS]
                self.members[(h, b)] = KeyCounts(keys[keep], counts[keep])

    def buckets(self, layout: KeyLayout, decoder: NgramDecoder) -> list[dict[str, Any]]:
        """The chosen buckets as `top_buckets` lists them, n-grams decoded."""
        result = []
        for load, h, b in self.chosen:
            found = self.members[(h, b)]
            windows = np.empty((found.rows, layout.order), np.int64)
            unpack_windows(
                np.ascontiguousarray(found.keys), layout.order, layout.bits, layout.per_word, layout.mask, windows
            )
            result.append(
                {
                    "head": h,
                    "size": self.sizes[h],
                    "bucket": b,
                    "load": load,
                    "ngrams": [decoder.ngram(w[::-1], int(c)) for w, c in zip(windows, found.counts)],
                }
            )
        return result


def choose_top(loads: np.ndarray, sizes: list[int], offsets: list[int], top: int) -> list[tuple[int, int, int]]:
    """The `top` fullest buckets over all heads of an item: (load, head, bucket), by load, head, bucket.

    Args:
        loads: the item's bucket counters, head after head.
        sizes: the head sizes.
        offsets: where each head starts in `loads`.
        top: how many buckets.
    """
    chosen: list[tuple[int, int, int]] = []
    for h, (size, off) in enumerate(zip(sizes, offsets)):
        buckets, head_loads = _fullest(loads[off : off + size], top)
        chosen += [(int(load), h, int(b)) for b, load in zip(buckets.tolist(), head_loads.tolist())]
    return sorted(chosen, key=lambda t: (-t[0], t[1], t[2]))[:top]
