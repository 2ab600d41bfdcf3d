"""N-gram hashing: token ids to the row of every Engram head, bit-exact with the reference.

For position t and order n the reference mixes the projected ids
`x[t] * m[0] ^ x[t-1] * m[1] ^ ... ^ x[t-n+1] * m[n-1]` (int64, the projected pad
before the start of each row) and takes `mix mod p` for every head prime p of that
order. The straightforward numpy form makes a shifted copy per order and one
pass per head, and runs at 1 to 1.5 M tokens/s here; this one is a numba kernel that
projects, mixes and reduces one block of a row at a time in cache, writing the
output once. The reduction avoids 64-bit division with a float quotient and at most three
corrections (`kernels` states why that is exact); the kernel writes those steps inline. Tensors on
an accelerator, where the kernel cannot run, are hashed with plain torch ops to the same values.

Sequence positions and barrier tokens (packed sequences, image placeholders) follow the
engines' rule: for token t and shift s, the id at t-s is the projected pad when
`position[t] - s < 0` or when any of the tokens t, t-1, ..., t-s is a barrier. The kernel
keeps, per token, its reach: -1 on a barrier, else how far back it may look,
`min(position[t], k - 1 for the nearest barrier k tokens back)` capped at max_ngram_size - 1;
a shift past the reach takes the pad. The reach needs only the block's own `context` tokens
of look-back, so it is a few vectorized passes over the block, not a running scan, and the
positions are checked in the same passes. Without positions (each row one sequence from 0)
and barriers the reach never binds and the kernel skips it. The torch path computes the same
reach with a running maximum of the last barrier's index.
"""

from __future__ import annotations

import functools
import os
import sys
import threading
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from .errors import EngramError, UsageError
from .spec import TableSpec
from .vocab import VocabProjection

if TYPE_CHECKING:
    from .hash_stream import HashStream

# Tokens of one row that one thread projects and mixes in cache before reducing them.
BLOCK_TOKENS = 512
# Below this many tokens a call hashes on one thread.
PARALLEL_MIN_TOKENS = 1 << 15
_KERNEL_LOCK = threading.Lock()


def _reset_lock_in_child() -> None:
    global _KERNEL_LOCK
    _KERNEL_LOCK = threading.Lock()


os.register_at_fork(after_in_child=_reset_lock_in_child)


@functools.cache
def hash_kernel(parallel: bool = True) -> Callable[..., None]:
    """Compile (or load from numba's on-disk cache) the hashing kernel, once per process and variant.

    numba's default OpenMP layer kills a forked child that hashes after its parent
    did (a torch DataLoader does exactly that); the workqueue layer is fork-safe,
    and the lock around each launch makes it thread-safe. An explicit
    NUMBA_THREADING_LAYER from the user wins. The serial variant (`parallel=False`, the
    same code looping with `range`) is for small calls: entering a parallel region costs
    about 0.1 ms even on one thread, far more than hashing one decoded token takes.
    `period` > 0 writes only the tokens at index `context` or more within each `period` tokens of
    a row (the rest are read as left context, their output left as it was): the streaming state
    (`hash_stream`) hashes its rows as one row of `[carried | new]` pieces. 0 writes every token.
    """
    import numba

    if "NUMBA_THREADING_LAYER" not in os.environ:
        numba.config.THREADING_LAYER = "workqueue"  # type: ignore[attr-defined]
    from .kernels import FLOAT_REDUCTION_MIN_PRIME as min_float_prime

    signature = (
        "void(int64[:, ::1], int64[::1], int64, int64[::1], int64[::1], float64[::1], "
        "int64[::1], int64[:, :, ::1], int64, int64[:, ::1], boolean[:, ::1], boolean[::1], int64[::1], int64)"
    )

    # a different closure value also gives the two variants different keys in numba's cache
    tasks = numba.prange if parallel else range

    @numba.njit(signature, parallel=parallel, nogil=True, cache=True)
    def hash_layer(
        ids, lookup, pad, mults, primes, inv_primes, offsets, out, block, positions, barrier, barrier_vocab, bad, period
    ):
        n_rows, length = ids.shape
        order_max = mults.size
        heads = primes.size
        per_order = heads // (order_max - 1)
        context = order_max - 1
        blocks_per_row = (length + block - 1) // block
        has_positions = positions.shape[0] > 0
        has_barrier = barrier.shape[0] > 0
        has_barrier_ids = barrier_vocab.size > 0
        gated = has_positions or has_barrier or has_barrier_ids
        for task in tasks(n_rows * blocks_per_row):
            # Inner loops index views with their own counters only: an index that numba
            # cannot prove non-negative gets a wraparound fix-up that stops vectorization.
            b = task // blocks_per_row
            t0 = (task - b * blocks_per_row) * block
            width = min(block, length - t0)
            x = np.empty(width + context, np.int64)
            pads = max(0, context - t0)
            for i in range(pads):
                x[i] = pad
            src = ids[b, t0 - context + pads : t0 + width]
            known = x[pads:]
            # blocked[j]: token t0 - context + j is a barrier (none before the row's start).
            blocked = np.zeros(width + context if gated else 0, np.bool_)
            mine = blocked[pads:]
            if has_barrier_ids:  # looked up in the same pass as the projection
                for i in range(src.size):
                    v = src[i]
                    if v >= 0:
                        known[i] = lookup[v]
                        mine[i] = barrier_vocab[v]
                    else:
                        known[i] = v
            else:
                for i in range(src.size):
                    v = src[i]
                    known[i] = lookup[v] if v >= 0 else v
            reach = np.empty(width if gated else 0, np.int64)
            bad[task] = -1
            if gated:
                if has_barrier:
                    given = barrier[b, t0 - context + pads : t0 + width]
                    for i in range(given.size):
                        mine[i] |= given[i]
                if has_positions:
                    own = positions[b, t0 : t0 + width]
                    for i in range(width):
                        reach[i] = min(own[i], context)
                    wrong = 0
                    if t0 == 0:
                        wrong += own[0] != 0
                    first = 1 if t0 == 0 else 0
                    later = positions[b, t0 + first : t0 + width]
                    before = positions[b, t0 + first - 1 : t0 + width - 1]
                    for i in range(later.size):
                        wrong += (later[i] != 0) & (later[i] != before[i] + 1)
                    if wrong:
                        for t in range(t0, t0 + width):
                            if positions[b, t] != 0 and (t == 0 or positions[b, t] != positions[b, t - 1] + 1):
                                bad[task] = t
                                break
                else:
                    for i in range(width):
                        reach[i] = min(t0 + i, context)
                for k in range(1, context + 1):  # a barrier k tokens back stops the reach short of it
                    back = blocked[context - k : context - k + width]
                    for i in range(width):
                        reach[i] = min(reach[i], k - 1) if back[i] else reach[i]
                here = blocked[context:]
                for i in range(width):
                    reach[i] = -1 if here[i] else reach[i]
            mix = np.empty(width, np.int64)
            current = x[context:]
            m0 = mults[0]
            if gated:
                for i in range(width):
                    mix[i] = (current[i] if reach[i] >= 0 else pad) * m0
            else:
                for i in range(width):
                    mix[i] = current[i] * m0
            dest = out[b, t0 : t0 + width]
            for n in range(1, order_max):
                m = mults[n]
                earlier = x[context - n : context - n + width]
                if gated:
                    for i in range(width):
                        mix[i] ^= (earlier[i] if reach[i] >= n else pad) * m
                else:
                    for i in range(width):
                        mix[i] ^= earlier[i] * m
                first = (n - 1) * per_order
                order_primes = primes[first : first + per_order]
                order_inv = inv_primes[first : first + per_order]
                order_offsets = offsets[first : first + per_order]
                if order_primes.min() < min_float_prime:
                    for i in range(width):
                        if period and (t0 + i) % period < context:
                            continue
                        row = dest[i, first : first + per_order]
                        for j in range(per_order):
                            row[j] = mix[i] % order_primes[j] + order_offsets[j]
                    continue
                for i in range(width):
                    if period and (t0 + i) % period < context:
                        continue
                    value = mix[i]
                    approx = np.float64(value)
                    row = dest[i, first : first + per_order]
                    for j in range(per_order):
                        p = order_primes[j]
                        r = value - np.int64(approx * order_inv[j]) * p
                        r += p & (r >> 63)
                        r += p & (r >> 63)
                        r -= p & ~((r - p) >> 63)
                        row[j] = r + order_offsets[j]

    return hash_layer


def _launch(ids: np.ndarray, *args: Any, gates: _Gates, period: int = 0) -> None:
    """Run the kernel; small batches with its serial variant on the calling thread. A bad position is refused.

    Waking the worker threads costs more than a data-loader batch takes to hash, and on
    a busy machine a sleeping worker can take milliseconds to get a core. The serial variant
    uses no threading layer, so it needs no lock. `period`: as `hash_kernel` states (0: every token).
    """
    blocks_per_row = -(-ids.shape[1] // BLOCK_TOKENS)
    bad = np.empty(ids.shape[0] * blocks_per_row, np.int64)
    launch = (*args, BLOCK_TOKENS, gates.positions, gates.barrier, gates.barrier_vocab, bad, period)
    if ids.size >= PARALLEL_MIN_TOKENS:
        with _KERNEL_LOCK:
            hash_kernel()(ids, *launch)
    else:
        hash_kernel(parallel=False)(ids, *launch)
    found = np.flatnonzero(bad >= 0)
    if found.size:  # tasks run in row-major order: the first task with one holds the first index
        row = int(found[0]) // blocks_per_row
        raise_bad_position(gates.positions, row, int(bad[found[0]]), gates.one_dimensional)


def raise_bad_position(positions: np.ndarray, row: int, col: int, one_dimensional: bool) -> None:
    """The one-line error for the first position that neither starts a sequence nor follows its predecessor.

    Args:
        positions: the positions, (B, T).
        row, col: the offending index.
        one_dimensional: the caller gave 1-D ids: name the index as one number.
    """

    def at(c: int) -> str:
        return f"positions[{c}]" if one_dimensional else f"positions[{row}, {c}]"

    value = f"{at(col)} = {int(positions[row, col])}"
    if col == 0:
        raise UsageError(f"{value} does not start a sequence (0), as the first position of a row must")
    raise UsageError(
        f"{value} neither starts a sequence (0) nor follows {at(col - 1)} = {int(positions[row, col - 1])} by one"
    )


@dataclass(frozen=True)
class _Layer:
    multipliers: np.ndarray
    primes: np.ndarray
    inv_primes: np.ndarray
    offsets: np.ndarray
    zeros: np.ndarray


_NO_POSITIONS = np.zeros((0, 0), np.int64)


_NO_BARRIER = np.zeros((0, 0), np.bool_)


_NO_BARRIER_IDS = np.zeros(0, np.bool_)


@dataclass(frozen=True)
class _Gates:
    """Positions (B, T) int64, a barrier mask (B, T) and a barrier-id mask over the vocab, each
    empty when not given; what the kernel takes to stop n-grams at sequence starts and barriers."""

    positions: np.ndarray
    barrier: np.ndarray
    barrier_vocab: np.ndarray
    one_dimensional: bool


class NgramHasher:
    """Token ids to head-local buckets (`hash`) or layer-table rows (`rows`), per layer.

    numpy in, numpy out; torch in, torch out on the same device. A 1-D input is
    one sequence and gives (T, heads); a 2-D input (B, T) gives (B, T, heads),
    heads order-major as the reference stacks them. Without a projection the
    spec's own is used (that of the tokenizer it names, cached on disk).
    """

    def __init__(self, spec: TableSpec, projection: VocabProjection | None = None) -> None:
        from .vocab import projection_for

        projection = projection_for(spec, projection)
        self.spec = spec
        self.projection = projection
        self.compressed_size = projection.compressed_size
        self.pad = projection.canonical_pad(spec.pad_id)
        self._layers: dict[int, _Layer] = {}

    def multipliers(self, layer_id: int) -> np.ndarray:
        """The layer's int64 multipliers, one per position of the longest n-gram (a copy)."""
        return self._layer(layer_id).multipliers.copy()

    def offsets(self, layer_id: int) -> np.ndarray:
        """The first row of every head in the layer table (a copy)."""
        return self._layer(layer_id).offsets.copy()

    def head_sizes(self, layer_id: int) -> np.ndarray:
        """The prime size of every head of the layer, order-major (a copy)."""
        return self._layer(layer_id).primes.copy()

    def hash(
        self,
        input_ids: Any,
        layers: Iterable[int] | None = None,
        *,
        positions: Any = None,
        barrier: Any = None,
        barrier_ids: Iterable[int] | None = None,
        out: Mapping[int, Any] | None = None,
    ) -> dict[int, Any]:
        """Head-local bucket of every head, per layer (all layers of the spec by default).

        `out` ({layer_id: int64 array or tensor of the output's shape}) receives the
        result instead of new arrays: a data loader that reuses (pinned) buffers skips
        the allocation and its page faults.

        Args:
            input_ids: token ids, (T,) or (B, T), numpy or torch.
            layers: only these layers.
            positions: the ids' shape, 0 at each sequence start and +1 within it, so several
                sequences may share a row (default: each row one sequence from 0). A position that
                neither is 0 nor follows its predecessor by one is an error naming its index.
            barrier: a boolean mask of the ids' shape: tokens no n-gram may span, whose own
                n-grams are all pad.
            barrier_ids: the same given as token ids (not with `barrier`).
            out: caller-owned output buffers, per layer.
        """
        return self._run(input_ids, layers, False, out, positions, barrier, barrier_ids)

    def rows(
        self,
        input_ids: Any,
        layers: Iterable[int] | None = None,
        *,
        positions: Any = None,
        barrier: Any = None,
        barrier_ids: Iterable[int] | None = None,
        out: Mapping[int, Any] | None = None,
    ) -> dict[int, Any]:
        """The same buckets plus each head's offset: the row index into the layer's table.

        Args:
            input_ids: token ids, (T,) or (B, T), numpy or torch.
            layers: only these layers.
            positions, barrier, barrier_ids: sequence starts and barrier tokens (as for `hash`).
            out: caller-owned output buffers, per layer (as for `hash`).
        """
        return self._run(input_ids, layers, True, out, positions, barrier, barrier_ids)

    def stream(self, batch_size: int, *, barrier_ids: Iterable[int] | None = None) -> HashStream:
        """A streaming state for serving: `state.rows(ids)` hashes a batch chunk by chunk (one decoded
        token, or a piece of prefill) with each row's left context, equal to `rows` of the whole sequences.

        Args:
            batch_size: rows of the batch (serving slots); `state.reset(row)` starts a new sequence in one.
            barrier_ids: token ids no n-gram may span, for the whole stream (`state.rows` takes a mask too).
        """
        from .hash_stream import HashStream

        return HashStream(self, batch_size, barrier_ids)

    def _layer(self, layer_id: int) -> _Layer:
        layer_id = int(layer_id)
        cached = self._layers.get(layer_id)
        if cached is None:
            primes = np.array(self.spec.head_sizes(layer_id), dtype=np.int64)
            cached = self._layers[layer_id] = _Layer(
                multipliers=self.spec.multipliers(layer_id, self.compressed_size),
                primes=primes,
                inv_primes=1.0 / primes.astype(np.float64),
                offsets=np.array(self.spec.offsets(layer_id), dtype=np.int64),
                zeros=np.zeros(primes.size, dtype=np.int64),
            )
        return cached

    def _layer_ids(self, layers: Iterable[int] | None) -> list[int]:
        chosen = list(dict.fromkeys(self.spec.layer_ids if layers is None else layers))  # each layer once
        for layer_id in chosen:
            self._layer(layer_id)
        return [int(layer_id) for layer_id in chosen]

    def barrier_vocab(self, barrier_ids: Iterable[int] | None) -> np.ndarray:
        """A boolean mask over the vocab of the barrier token ids (empty when none are given)."""
        if barrier_ids is None:
            return _NO_BARRIER_IDS
        try:
            chosen = np.asarray(list(barrier_ids))
        except TypeError:
            raise UsageError("barrier_ids must be a list of token ids") from None
        if chosen.size == 0:
            return _NO_BARRIER_IDS
        if chosen.dtype.kind not in "iu":
            raise UsageError(f"barrier ids must be integers, got {chosen.tolist()!r}")
        outside = chosen[(chosen < 0) | (chosen >= self.projection.vocab_size)]
        if outside.size:
            raise UsageError(
                f"barrier id {int(outside[0])} is not a token id below the vocab size {self.projection.vocab_size}"
            )
        mask = np.zeros(self.projection.vocab_size, np.bool_)
        mask[chosen] = True
        return mask

    def _run(
        self,
        input_ids: Any,
        layers: Iterable[int] | None,
        with_offsets: bool,
        out: Mapping[int, Any] | None,
        positions: Any,
        barrier: Any,
        barrier_ids: Iterable[int] | None,
    ) -> dict[int, Any]:
        layer_ids = self._layer_ids(layers)
        if barrier is not None and barrier_ids is not None:
            raise UsageError("give barrier (a mask) or barrier_ids (token ids), not both")
        barrier_vocab = self.barrier_vocab(barrier_ids)
        torch = sys.modules.get("torch")
        if torch is not None and isinstance(input_ids, torch.Tensor):
            if input_ids.dtype.is_floating_point or input_ids.dtype.is_complex or input_ids.dtype == torch.bool:
                raise EngramError(f"token ids must be integers, got dtype {input_ids.dtype}")
            shape = tuple(input_ids.shape)
            check_rank(shape)
            buffers = self._buffers(out, layer_ids, shape, input_ids.device)
            if input_ids.device.type != "cpu":
                return self._run_torch(
                    input_ids,
                    layer_ids,
                    with_offsets,
                    buffers,
                    positions=_as_tensor(positions, "positions", shape, input_ids.device),
                    barrier=_as_tensor(barrier, "barrier", shape, input_ids.device),
                    barrier_vocab=barrier_vocab,
                )
            gates = self._gates(shape, positions, barrier, barrier_vocab)
            arrays = None if buffers is None else {k: v.numpy() for k, v in buffers.items()}
            result = self._run_numpy(input_ids.detach().numpy(), layer_ids, with_offsets, arrays, gates)
            return buffers or {k: torch.from_numpy(v) for k, v in result.items()}
        try:
            array = np.asarray(input_ids)
        except (OverflowError, ValueError, TypeError) as exc:
            raise EngramError(f"token ids must be an integer array: {exc}") from None
        check_rank(array.shape)
        gates = self._gates(array.shape, positions, barrier, barrier_vocab)
        return self._run_numpy(array, layer_ids, with_offsets, self._buffers(out, layer_ids, array.shape, None), gates)

    def _gates(self, shape: tuple[int, ...], positions: Any, barrier: Any, barrier_vocab: np.ndarray) -> _Gates:
        """Positions and barrier mask as the kernel takes them: (B, T) int64 and bool, C order."""
        batch = (1, shape[0]) if len(shape) == 1 else shape
        gate_positions, gate_barrier = _NO_POSITIONS, _NO_BARRIER
        if positions is not None:
            array = _as_array(positions, "positions", shape)
            if array.dtype.kind not in "iu":
                raise UsageError(f"positions must be integers, got dtype {array.dtype}")
            if array.dtype.kind == "u" and array.dtype.itemsize == 8 and array.size and int(array.max()) >= 1 << 63:
                raise UsageError(
                    f"positions ({array.dtype}) hold values past the int64 range, up to {int(array.max())}"
                )
            # the kernel takes writable arrays, as for the ids: a read-only map is copied
            gate_positions = np.require(array.reshape(batch), dtype=np.int64, requirements=["C", "W"])
        if barrier is not None:
            array = _as_array(barrier, "barrier", shape)
            if array.dtype != np.bool_:
                raise UsageError(f"barrier must be a boolean mask, got dtype {array.dtype}")
            gate_barrier = np.require(array.reshape(batch), requirements=["C", "W"])
        return _Gates(gate_positions, gate_barrier, barrier_vocab, len(shape) == 1)

    def _buffers(
        self, out: Mapping[int, Any] | None, layer_ids: list[int], shape: tuple[int, ...], device: Any
    ) -> dict[int, Any] | None:
        """Check caller-given outputs: int64, C-contiguous, the output's shape, the input's kind."""
        if out is None:
            return None
        torch = sys.modules.get("torch")
        buffers = {}
        for layer_id in layer_ids:
            if layer_id not in out:
                raise EngramError(f"out has no array for layer {layer_id}")
            buffer = out[layer_id]
            want = shape + (self._layer(layer_id).primes.size,)
            if device is None:
                ok = (
                    isinstance(buffer, np.ndarray)
                    and buffer.dtype == np.int64
                    and buffer.flags.c_contiguous
                    and buffer.flags.writeable
                )
            else:
                assert torch is not None  # the input was a tensor
                ok = (
                    isinstance(buffer, torch.Tensor)
                    and buffer.dtype == torch.int64
                    and buffer.is_contiguous()
                    and buffer.device == device
                )
            if not ok or tuple(buffer.shape) != want:
                kind = "a writable numpy" if device is None else f"a torch ({device})"
                raise EngramError(
                    f"out[{layer_id}] must be {kind} C-contiguous int64 array of shape "
                    f"{want}, got {type(buffer).__name__} {getattr(buffer, 'dtype', '')} "
                    f"{tuple(getattr(buffer, 'shape', ()))}"
                )
            buffers[layer_id] = buffer
        return buffers

    def _run_numpy(
        self,
        ids: np.ndarray,
        layer_ids: list[int],
        with_offsets: bool,
        buffers: dict[int, np.ndarray] | None,
        gates: _Gates,
    ) -> dict[int, np.ndarray]:
        self.projection.check_ids(ids)
        batch = np.require(
            ids.reshape(1, -1) if ids.ndim == 1 else ids, dtype=np.int64, requirements=["C", "W"]
        )  # the kernel takes writable arrays; a read-only map is copied
        result = {}
        for layer_id in layer_ids:
            layer = self._layer(layer_id)
            shape = batch.shape + (layer.primes.size,)
            if buffers is None:
                out = np.empty(shape, dtype=np.int64)
            else:
                out = buffers[layer_id].reshape(shape)
                if np.may_share_memory(out, batch):
                    raise EngramError(f"out[{layer_id}] overlaps the token ids it is computed from")
            if out.size:
                _launch(
                    batch,
                    self.projection.lookup,
                    self.pad,
                    layer.multipliers,
                    layer.primes,
                    layer.inv_primes,
                    layer.offsets if with_offsets else layer.zeros,
                    out,
                    gates=gates,
                )
            result[layer_id] = out[0] if ids.ndim == 1 else out
        return result if buffers is None else buffers

    def _run_torch(
        self,
        ids: Any,
        layer_ids: list[int],
        with_offsets: bool,
        buffers: dict[int, Any] | None,
        positions: Any = None,
        barrier: Any = None,
        barrier_vocab: np.ndarray = _NO_BARRIER_IDS,
    ) -> dict[int, Any]:
        """Plain torch ops for tensors on an accelerator, where the numba kernel cannot run."""
        import torch

        batch = self.projection.compress(ids)
        batch = batch.reshape(1, -1) if ids.ndim == 1 else batch
        rows, length = batch.shape
        context = self.spec.max_ngram_size - 1
        padded = torch.cat([batch.new_full((rows, context), self.pad), batch], dim=1)
        reach = self._torch_reach(ids.reshape(rows, length), positions, barrier, barrier_vocab, ids.ndim == 1)
        result = {}
        for layer_id in layer_ids:
            layer = self._layer(layer_id)
            mults = [int(m) for m in layer.multipliers]
            per_order = self.spec.n_head_per_ngram
            shape = (rows, length, layer.primes.size)
            out = batch.new_empty(shape) if buffers is None else buffers[layer_id].view(shape)
            current = batch if reach is None else torch.where(reach >= 0, batch, self.pad)
            mix = current * mults[0]
            for n in range(1, len(mults)):
                earlier = padded[:, context - n : context - n + length]
                if reach is not None:
                    earlier = torch.where(reach >= n, earlier, self.pad)
                mix = mix ^ (earlier * mults[n])
                for h in range((n - 1) * per_order, n * per_order):
                    bucket = torch.remainder(mix, int(layer.primes[h]))
                    out[..., h] = bucket + int(layer.offsets[h]) if with_offsets else bucket
            result[layer_id] = out[0] if ids.ndim == 1 else out
        return result if buffers is None else buffers

    def _torch_reach(
        self, ids: Any, positions: Any, barrier: Any, barrier_vocab: np.ndarray, one_dimensional: bool
    ) -> Any:
        """Per token, how far back its n-grams may reach (-1 on a barrier); None when nothing gates.

        A token not a barrier reaches min(position, tokens since the last barrier): the last
        barrier's index is a running maximum, so this is a few whole-tensor ops.
        """
        import torch

        if positions is None and barrier is None and barrier_vocab.size == 0:
            return None
        rows, length = ids.shape
        index = torch.arange(length, device=ids.device).expand(rows, length)
        if positions is None:
            positions = index
        else:
            positions = positions.reshape(rows, length).long()
            before = torch.cat([positions.new_full((rows, 1), -1), positions[:, :-1]], dim=1)
            wrong = (positions != 0) & (positions != before + 1)
            if bool(wrong.any()):
                row, col = (int(v) for v in wrong.nonzero()[0])
                raise_bad_position(positions.cpu().numpy(), row, col, one_dimensional)
        blocked = torch.zeros((rows, length), dtype=torch.bool, device=ids.device)
        if barrier is not None:
            blocked = barrier.reshape(rows, length)
        if barrier_vocab.size:
            mask = torch.from_numpy(barrier_vocab).to(ids.device)
            wide = ids.long()
            blocked = blocked | ((wide >= 0) & mask[wide.clamp(min=0)])
        last = torch.where(blocked, index, -1).cummax(dim=1).values
        reach = torch.minimum(positions, index - last - 1)
        return torch.where(blocked, -1, reach)


def _as_array(value: Any, name: str, shape: tuple[int, ...]) -> np.ndarray:
    torch = sys.modules.get("torch")
    if torch is not None and isinstance(value, torch.Tensor):
        value = value.detach().cpu().numpy()
    try:
        array = np.asarray(value)
    except (OverflowError, ValueError, TypeError) as exc:
        raise UsageError(f"{name} must be an array of the token ids' shape: {exc}") from None
    if array.shape != tuple(shape):
        raise UsageError(f"{name} must have the token ids' shape {tuple(shape)}, got {array.shape}")
    return array


def _as_tensor(value: Any, name: str, shape: tuple[int, ...], device: Any) -> Any:
    """Positions or a barrier mask beside ids on an accelerator, checked like the numpy ones."""
    import torch

    if value is None:
        return None
    tensor = value if isinstance(value, torch.Tensor) else torch.as_tensor(_as_array(value, name, shape))
    if tuple(tensor.shape) != tuple(shape):
        raise UsageError(f"{name} must have the token ids' shape {tuple(shape)}, got {tuple(tensor.shape)}")
    if name == "barrier" and tensor.dtype != torch.bool:
        raise UsageError(f"barrier must be a boolean mask, got dtype {tensor.dtype}")
    if name == "positions" and (
        tensor.dtype.is_floating_point or tensor.dtype.is_complex or tensor.dtype == torch.bool
    ):
        raise UsageError(f"positions must be integers, got dtype {tensor.dtype}")
    return tensor.to(device)


def check_positions(positions: np.ndarray, rows_per_pass: int = 1 << 20) -> None:
    """Refuse, naming the first index, a position that neither starts a sequence (0) nor follows
    its predecessor by one; reads a memory-mapped array a few rows at a time."""
    batch = positions.reshape(1, -1) if positions.ndim == 1 else positions
    step = max(1, rows_per_pass // max(1, batch.shape[1]))
    for b0 in range(0, batch.shape[0], step):
        part = np.asarray(batch[b0 : b0 + step], dtype=np.int64)
        wrong = part != 0
        wrong[:, 1:] &= part[:, 1:] != part[:, :-1] + 1
        if wrong.any():
            row, col = (int(v) for v in np.argwhere(wrong)[0])
            raise_bad_position(batch, b0 + row, col, positions.ndim == 1)


def check_rank(shape: tuple[int, ...]) -> None:
    """Refuse token ids that are neither one sequence (1-D) nor a batch (2-D)."""
    if len(shape) not in (1, 2):
        raise EngramError(f"token ids must be 1-D (one sequence) or 2-D (batch, time), got shape {tuple(shape)}")
