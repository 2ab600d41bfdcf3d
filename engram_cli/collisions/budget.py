"""The memory budget of collision statistics, planned before any corpus is read.

The budget bounds what grows: n-gram counts (the raw-key buffers and runs), bucket counters and
collision candidates; the rest goes to the spill folder. Bucket counters are sized by the table,
not the corpus (4 bytes a row of every head counted at once, 8 past 2**31 n-grams), with one bit
per bucket of every head of the order; layers and sweep sizes whose counters do not fit together
take a pass each (`MemoryPlan`), and a budget below the counters of one layer at one size is
refused with the smallest that works (`minimum_memory_budget`). The default budget is a quarter
of the memory available, raised to that minimum; what is available respects the process's own
address-space limit (`ulimit -v`) and cgroup memory limit, not only the machine's free memory,
and an allocation that fails anyway is one line naming the budget to give (`out_of_memory`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np

from ..errors import ResourceError
from ..helpers import available_memory, gibibytes, memory_limits, plural
from ..spec import TableSpec
from ..vocab import VocabProjection

if TYPE_CHECKING:
    from .candidates import CandidateSet, TopMembers

# Memory left to stream keys and to hold collision candidates beyond the bucket counters: the
# least that still makes progress (one key range of a few rows at a time).
MIN_WORKING_BYTES = 4096


# Keys in memory at once while streaming (more only means bigger reads, not faster passes).
STREAMING_BYTES = 256 << 20


@dataclass
class SizeItem:
    """One layer at one set of head sizes (the spec's or a sweep point's) of one order: its
    bucket counters while counted, then its figures."""

    layer: int
    factor: float
    sizes: list[int]
    multipliers: np.ndarray
    loads: np.ndarray | None = None
    heads: list[dict[str, Any]] = field(default_factory=list)
    bitmap: np.ndarray | None = None
    byte_offsets: np.ndarray | None = None
    colliding: np.ndarray | None = None
    weighted: np.ndarray | None = None
    residues: CandidateSet | None = None
    all_heads: int = 0
    top: TopMembers | None = None

    @property
    def rows(self) -> int:
        """Buckets of all heads of the item."""
        return int(sum(self.sizes))

    @property
    def modulus(self) -> int:
        """The lcm of the head sizes: n-grams in one bucket in every head share their mix modulo it."""
        return math.lcm(*self.sizes)

    def counter_bytes(self, itemsize: int) -> int:
        """Bytes of the item's bucket counters of `itemsize` bytes each."""
        return self.rows * itemsize

    @property
    def bitmap_bytes(self) -> int:
        """Bytes of one bit per bucket (which buckets are crowded)."""
        return sum(-(-s // 8) for s in self.sizes)


def counter_itemsize(distinct_bound: int) -> int:
    """Bytes of a bucket counter: int32 unless a bucket could hold 2**31 n-grams."""
    return 4 if distinct_bound < 2**31 else 8


@dataclass
class MemoryPlan:
    """How one order's statistics share the memory budget: bucket counters of a group of layers
    and sizes at a time, key ranges streamed, collision candidates held."""

    groups: list[list[SizeItem]]
    counters: int  # bytes of the largest group's counters
    streaming: int  # bytes of key ranges in memory while counting loads
    candidates: int  # bytes of candidates held before spilling

    @staticmethod
    def of(items: list[SizeItem], available: int, itemsize: int) -> MemoryPlan | None:
        """Groups of items whose counters fit, or None when one item's counters alone leave less
        than MIN_WORKING_BYTES of `available`.

        Args:
            items: every layer and size of one order.
            available: bytes of the budget not held by counts still in memory.
            itemsize: bytes of one bucket counter.
        """
        bitmaps = sum(item.bitmap_bytes for item in items)
        room = available - bitmaps
        largest = max(item.counter_bytes(itemsize) for item in items)
        if largest + MIN_WORKING_BYTES > room:
            return None
        cap = max(largest, room // 2)
        groups: list[list[SizeItem]] = [[]]
        used = 0
        for item in items:
            size = item.counter_bytes(itemsize)
            if groups[-1] and used + size > cap:
                groups.append([])
                used = 0
            groups[-1].append(item)
            used += size
        counters = max(sum(i.counter_bytes(itemsize) for i in g) for g in groups)
        rest = room - counters
        streaming = min(rest // 2, STREAMING_BYTES)
        return MemoryPlan(groups, counters, streaming, rest - streaming)


def order_items(spec: TableSpec, projection: VocabProjection, order: int, factors: list[float]) -> list[SizeItem]:
    """The items of one order: every layer at the spec's sizes, then at every other sweep size.

    Args:
        spec: the tables.
        projection: the spec's projection (its compressed size draws the multipliers).
        order: the n-gram order.
        factors: the sweep factors.
    """
    span = slice((order - 2) * spec.n_head_per_ngram, (order - 1) * spec.n_head_per_ngram)
    items = []
    for factor in [1.0, *[f for f in factors if f != 1]]:
        scaled = spec if factor == 1 else spec.scaled(factor)
        for layer in spec.layer_ids:
            items.append(
                SizeItem(
                    layer,
                    factor,
                    scaled.head_sizes(layer)[span],
                    spec.multipliers(layer, projection.compressed_size),
                )
            )
    return items


def _order_needs(spec: TableSpec, factors: list[float]) -> list[tuple[int, SizeItem, int]]:
    """Per order: the item with the most bucket counters and the bytes of every item's bitmaps."""
    needs = []
    for order in spec.orders:
        items = order_items(spec, _NO_PROJECTION, order, factors)
        largest = max(items, key=lambda item: item.rows)
        needs.append((order, largest, sum(item.bitmap_bytes for item in items)))
    return needs


def _largest_need(spec: TableSpec, factors: list[float] | None) -> tuple[int, SizeItem, int]:
    """The order whose counters and bitmaps take the most: what sets the smallest budget."""
    return max(_order_needs(spec, factors or []), key=lambda need: need[1].counter_bytes(4) + need[2])


def minimum_memory_budget(spec: TableSpec, factors: list[float] | None = None) -> int:
    """The smallest memory budget `collision_statistics` works in: the bucket counters of the
    largest layer and head sizes of an order (4 bytes a row), one bit per row of every head of
    that order, and MIN_WORKING_BYTES to stream keys through (any less and no key range fits)."""
    _, largest, bitmaps = _largest_need(spec, factors)
    return largest.counter_bytes(4) + bitmaps + MIN_WORKING_BYTES


class _NoProjection:
    """Sizes only: `order_items` without multipliers (for budget planning before a projection)."""

    compressed_size = 2


_NO_PROJECTION: Any = _NoProjection()


def check_counter_memory(
    spec: TableSpec, factors: list[float] | None, memory_budget: int | None = None, *, local: bool = True
) -> int:
    """The memory budget statistics of `spec` (and the sweep) run in, checked before any work.

    A budget given is refused below `minimum_memory_budget` (with the smallest that works) and,
    for a run on this machine, above the memory available now (it would swap or be killed, not
    hold); the default, a quarter of the memory available, is raised to that minimum, refused
    only when the minimum exceeds what the machine has available.

    Args:
        spec: the tables whose head sizes are measured.
        factors: the sweep factors.
        memory_budget: bytes, or None for the default.
        local: whether the budget is spent here (False on a cluster: it is each worker's).
    """
    smallest = minimum_memory_budget(spec, factors)
    if memory_budget is not None:
        if memory_budget < smallest:
            raise too_small(memory_budget, spec, factors)
        if local:
            check_available(memory_budget, "")
        return memory_budget
    available = available_memory()
    if smallest > available:
        raise ResourceError(
            f"collision statistics of {spec.name} need {_what_takes_it(spec, factors)}: at least "
            f"{gibibytes(smallest)}, with {gibibytes(available)} of memory available: use smaller head sizes "
            "or sweep factors"
        )
    return max(default_memory_budget(), smallest)


def check_available(budget: int, where: str) -> None:
    """Refuse a budget above the memory available now on this machine (`where` names it in the
    message): it would swap or be killed rather than hold."""
    available = available_memory()
    if budget > available:
        raise ResourceError(
            f"a memory budget of {budget / 2**20:,.0f} MiB is more than the {gibibytes(available)} of memory "
            f"available{where} now: give at most {available // 2**20:,} MiB, or none for a quarter of it"
        )


def _what_takes_it(spec: TableSpec, factors: list[float] | None) -> str:
    """The counters and bitmaps that set the smallest budget, in words (sizes rounded up to MiB)."""
    order, largest, bitmaps = _largest_need(spec, factors)
    at = "the spec's head sizes" if largest.factor == 1 else f"sweep factor {largest.factor:g}"
    return (
        f"{gibibytes(largest.counter_bytes(4))} of bucket counters at {at} for the {order}-grams of layer "
        f"{largest.layer} ({plural(len(largest.sizes), 'head')} of {min(largest.sizes):,} to {max(largest.sizes):,} "
        f"rows, 4 bytes a row) and {gibibytes(bitmaps)} for one bit a row of every head of the order"
    )


def too_small(budget: int, spec: TableSpec, factors: list[float] | None) -> ResourceError:
    """The one-line error of a budget below `minimum_memory_budget`, naming what takes it.

    Args:
        budget: the bytes given.
        spec: the tables.
        factors: the sweep factors.
    """
    smallest = minimum_memory_budget(spec, factors)
    return ResourceError(
        f"a memory budget of {budget / 2**20:.1f} MiB is too small for {spec.name}: it needs "
        f"{_what_takes_it(spec, factors)}; the smallest budget that works is {-(-smallest // 2**20)} MiB"
    )


def default_memory_budget() -> int:
    """A quarter of the memory available now, at most 8 GiB: at least 256 MiB when only the
    machine's free memory bounds it, the quarter itself under an address-space or cgroup limit
    (what else the process maps, thread stacks and allocator arenas, counts against those)."""
    available = available_memory()
    floor = 0 if memory_limits() else 256 << 20
    return int(min(8 << 30, max(floor, available // 4)))


def out_of_memory(budget: int, spec: TableSpec, factors: list[float] | None) -> ResourceError:
    """The one-line error of an allocation that failed within a budget: the budget it ran
    under, the limits the process is held to, and the budget to give instead.

    Args:
        budget: the bytes the work ran under.
        spec: the tables.
        factors: the sweep factors.
    """
    smallest = minimum_memory_budget(spec, factors)
    limits = "; ".join(words for words, _ in memory_limits()) or "no limit set on this process"
    mib = 2**20
    if budget <= smallest:
        advice = f"{spec.name} needs at least {-(-smallest // mib):,} MiB: raise the limit or free memory"
    else:
        advice = f"give a smaller memory budget, at most {max(-(-smallest // mib), budget // 2 // mib):,} MiB"
    return ResourceError(f"out of memory with a memory budget of {budget // mib:,} MiB ({limits}): {advice}")
