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
"""

from __future__ import annotations

import functools
import os
import sys
import threading
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

from .errors import EngramError
from .kernels import FLOAT_REDUCTION_MIN_PRIME
from .spec import TableSpec
from .vocab import VocabProjection

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
def hash_kernel() -> Callable[..., None]:
    """Compile (or load from numba's on-disk cache) the hashing kernel, once per process.

    numba's default OpenMP layer kills a forked child that hashes after its parent
    did (a torch DataLoader does exactly that); the workqueue layer is fork-safe,
    and the lock around each launch makes it thread-safe. An explicit
    NUMBA_THREADING_LAYER from the user wins.
    """
    import numba

    if "NUMBA_THREADING_LAYER" not in os.environ:
        numba.config.THREADING_LAYER = "workqueue"  # type: ignore[attr-defined]
    min_float_prime = FLOAT_REDUCTION_MIN_PRIME

    signature = (
        "void(int64[:, ::1], int64[::1], int64, int64[::1], int64[::1], float64[::1], "
        "int64[::1], int64[:, :, ::1], int64)"
    )

    @numba.njit(signature, parallel=True, nogil=True, cache=True)
    def hash_layer(ids, lookup, pad, mults, primes, inv_primes, offsets, out, block):
        n_rows, length = ids.shape
        order_max = mults.size
        heads = primes.size
        per_order = heads // (order_max - 1)
        context = order_max - 1
        blocks_per_row = (length + block - 1) // block
        for task in numba.prange(n_rows * blocks_per_row):
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
            for i in range(src.size):
                v = src[i]
                known[i] = lookup[v] if v >= 0 else v
            mix = np.empty(width, np.int64)
            current = x[context:]
            m0 = mults[0]
            for i in range(width):
                mix[i] = current[i] * m0
            dest = out[b, t0 : t0 + width]
            for n in range(1, order_max):
                m = mults[n]
                earlier = x[context - n : context - n + width]
                for i in range(width):
                    mix[i] ^= earlier[i] * m
                first = (n - 1) * per_order
                order_primes = primes[first : first + per_order]
                order_inv = inv_primes[first : first + per_order]
                order_offsets = offsets[first : first + per_order]
                if order_primes.min() < min_float_prime:
                    for i in range(width):
                        row = dest[i, first : first + per_order]
                        for j in range(per_order):
                            row[j] = mix[i] % order_primes[j] + order_offsets[j]
                    continue
                for i in range(width):
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


def _launch(ids: np.ndarray, *args: Any) -> None:
    """Run the kernel; small batches on the calling thread alone.

    Waking the worker threads costs more than a data-loader batch takes to hash, and on
    a busy machine a sleeping worker can take milliseconds to get a core.
    """
    import numba

    kernel = hash_kernel()
    with _KERNEL_LOCK:
        if ids.size >= PARALLEL_MIN_TOKENS:
            kernel(ids, *args, BLOCK_TOKENS)
            return
        threads = numba.get_num_threads()
        numba.set_num_threads(1)
        try:
            kernel(ids, *args, BLOCK_TOKENS)
        finally:
            numba.set_num_threads(threads)


@dataclass(frozen=True)
class _Layer:
    multipliers: np.ndarray
    primes: np.ndarray
    inv_primes: np.ndarray
    offsets: np.ndarray
    zeros: np.ndarray


class NgramHasher:
    """Token ids to head-local buckets (`hash`) or layer-table rows (`rows`), per layer.

    numpy in, numpy out; torch in, torch out on the same device. A 1-D input is
    one sequence and gives (T, heads); a 2-D input (B, T) gives (B, T, heads),
    heads order-major as the reference stacks them.
    """

    def __init__(self, spec: TableSpec, projection: VocabProjection) -> None:
        self.spec = spec
        self.projection = projection
        self.compressed_size = projection.compressed_size
        if spec.pad_id >= projection.vocab_size:
            raise EngramError(
                f"spec pad_id {spec.pad_id} is not below the projection's vocab size {projection.vocab_size}"
            )
        self.pad = int(projection.lookup[spec.pad_id])
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
        self, input_ids: Any, layers: Iterable[int] | None = None, *, out: Mapping[int, Any] | None = None
    ) -> dict[int, Any]:
        """Head-local bucket of every head, per layer (all layers of the spec by default).

        `out` ({layer_id: int64 array or tensor of the output's shape}) receives the
        result instead of new arrays: a data loader that reuses (pinned) buffers skips
        the allocation and its page faults.

        Args:
            input_ids: token ids, (T,) or (B, T), numpy or torch.
            layers: only these layers.
            out: caller-owned output buffers, per layer.
        """
        return self._run(input_ids, layers, with_offsets=False, out=out)

    def rows(
        self, input_ids: Any, layers: Iterable[int] | None = None, *, out: Mapping[int, Any] | None = None
    ) -> dict[int, Any]:
        """The same buckets plus each head's offset: the row index into the layer's table.

        Args:
            input_ids: token ids, (T,) or (B, T), numpy or torch.
            layers: only these layers.
            out: caller-owned output buffers, per layer (as for `hash`).
        """
        return self._run(input_ids, layers, with_offsets=True, out=out)

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
        chosen = list(self.spec.layer_ids if layers is None else layers)
        for layer_id in chosen:
            self._layer(layer_id)
        return [int(layer_id) for layer_id in chosen]

    def _run(
        self, input_ids: Any, layers: Iterable[int] | None, with_offsets: bool, out: Mapping[int, Any] | None
    ) -> dict[int, Any]:
        layer_ids = self._layer_ids(layers)
        torch = sys.modules.get("torch")
        if torch is not None and isinstance(input_ids, torch.Tensor):
            if input_ids.dtype.is_floating_point or input_ids.dtype.is_complex or input_ids.dtype == torch.bool:
                raise EngramError(f"token ids must be integers, got dtype {input_ids.dtype}")
            check_rank(tuple(input_ids.shape))
            buffers = self._buffers(out, layer_ids, tuple(input_ids.shape), input_ids.device)
            if input_ids.device.type != "cpu":
                return self._run_torch(input_ids, layer_ids, with_offsets, buffers)
            arrays = None if buffers is None else {k: v.numpy() for k, v in buffers.items()}
            result = self._run_numpy(input_ids.detach().numpy(), layer_ids, with_offsets, arrays)
            return buffers or {k: torch.from_numpy(v) for k, v in result.items()}
        try:
            array = np.asarray(input_ids)
        except (OverflowError, ValueError, TypeError) as exc:
            raise EngramError(f"token ids must be an integer array: {exc}") from None
        check_rank(array.shape)
        return self._run_numpy(array, layer_ids, with_offsets, self._buffers(out, layer_ids, array.shape, None))

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
        self, ids: np.ndarray, layer_ids: list[int], with_offsets: bool, buffers: dict[int, np.ndarray] | None
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
                )
            result[layer_id] = out[0] if ids.ndim == 1 else out
        return result if buffers is None else buffers

    def _run_torch(
        self, ids: Any, layer_ids: list[int], with_offsets: bool, buffers: dict[int, Any] | None
    ) -> dict[int, Any]:
        """Plain torch ops for tensors on an accelerator, where the numba kernel cannot run."""
        import torch

        batch = self.projection.compress(ids)
        batch = batch.reshape(1, -1) if ids.ndim == 1 else batch
        rows, length = batch.shape
        context = self.spec.max_ngram_size - 1
        padded = torch.cat([batch.new_full((rows, context), self.pad), batch], dim=1)
        result = {}
        for layer_id in layer_ids:
            layer = self._layer(layer_id)
            mults = [int(m) for m in layer.multipliers]
            per_order = self.spec.n_head_per_ngram
            shape = (rows, length, layer.primes.size)
            out = batch.new_empty(shape) if buffers is None else buffers[layer_id].view(shape)
            mix = batch * mults[0]
            for n in range(1, len(mults)):
                mix = mix ^ (padded[:, context - n : context - n + length] * mults[n])
                for h in range((n - 1) * per_order, n * per_order):
                    bucket = torch.remainder(mix, int(layer.primes[h]))
                    out[..., h] = bucket + int(layer.offsets[h]) if with_offsets else bucket
            result[layer_id] = out[0] if ids.ndim == 1 else out
        return result if buffers is None else buffers


def check_rank(shape: tuple[int, ...]) -> None:
    """Refuse token ids that are neither one sequence (1-D) nor a batch (2-D)."""
    if len(shape) not in (1, 2):
        raise EngramError(f"token ids must be 1-D (one sequence) or 2-D (batch, time), got shape {tuple(shape)}")
