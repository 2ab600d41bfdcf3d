"""N-gram hashing: token ids to the row of every Engram head, bit-exact with the reference.

For position t and order n the reference mixes the projected ids
`x[t] * m[0] ^ x[t-1] * m[1] ^ ... ^ x[t-n+1] * m[n-1]` (int64, the projected pad
before the start of each row) and takes `mix mod p` for every head prime p of that
order. The straightforward numpy form makes a shifted copy per order and one
pass per head, and runs at about 1 M tokens/s; this one is a numba kernel that
projects, mixes and reduces one block of a row at a time in cache, writing the
output once.

The reduction avoids 64-bit division: q = trunc(float(mix) * (1/p)) is within
2 of floor(mix / p) whenever p >= 2**13 (three roundings of relative error
2**-53 on |mix| < 2**63), so `mix - q*p` needs at most two corrections up and one
down to land in [0, p): numpy's floor-mod, negative mixes included. Smaller
primes (toy specs) take the exact `%`.
"""

from __future__ import annotations

import functools
import json
import os
import sys
import tempfile
import threading
import time
import zipfile
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from rich.console import Console
from rich.table import Table
from rich.text import Text

from .errors import EngramError
from .spec import TableSpec, load_spec
from .vocab import VocabProjection, resolve_projection

# Below this the float quotient can be off by more than 2, so the kernel uses the exact `%`.
FLOAT_REDUCTION_MIN_PRIME = 1 << 13
# Tokens of one row that one thread projects, mixes and reduces in cache before writing out.
BLOCK_TOKENS = 512
# Tokens per piece when `engram hash --ids` streams a large array to disk.
FILE_CHUNK_TOKENS = 1 << 19

_KERNEL_LOCK = threading.Lock()


def _reset_lock_in_child() -> None:
    global _KERNEL_LOCK
    _KERNEL_LOCK = threading.Lock()


os.register_at_fork(after_in_child=_reset_lock_in_child)


@functools.cache
def _kernel() -> Callable[..., None]:
    """Compile (or load from numba's on-disk cache) the hashing kernel on first use.

    numba's default OpenMP layer kills a forked child that hashes after its parent
    did (a torch DataLoader does exactly that); the workqueue layer is fork-safe,
    and the lock around each launch makes it thread-safe. An explicit
    NUMBA_THREADING_LAYER from the user wins.
    """
    import numba

    if "NUMBA_THREADING_LAYER" not in os.environ:
        numba.config.THREADING_LAYER = "workqueue"
    min_float_prime = FLOAT_REDUCTION_MIN_PRIME

    @numba.njit(parallel=True, nogil=True, cache=True)
    def hash_layer(ids, lookup, pad, mults, primes, inv_primes, offsets, out, block):
        n_rows, length = ids.shape
        order_max = mults.size
        heads = primes.size
        per_order = heads // (order_max - 1)
        context = order_max - 1
        blocks_per_row = (length + block - 1) // block
        for task in numba.prange(n_rows * blocks_per_row):
            b = task // blocks_per_row
            t0 = (task - b * blocks_per_row) * block
            width = min(block, length - t0)
            x = np.empty(width + context, np.int64)
            for i in range(width + context):
                t = t0 - context + i
                if t < 0:
                    x[i] = pad
                else:
                    v = ids[b, t]
                    x[i] = lookup[v] if v >= 0 else v
            mix = np.empty(width, np.int64)
            fmix = np.empty(width, np.float64)
            tile = np.empty((heads, width), np.int64)
            m0 = mults[0]
            for i in range(width):
                mix[i] = x[context + i] * m0
            for n in range(1, order_max):
                m = mults[n]
                for i in range(width):
                    mix[i] ^= x[context + i - n] * m
                for i in range(width):
                    fmix[i] = np.float64(mix[i])
                for h in range((n - 1) * per_order, n * per_order):
                    p = primes[h]
                    off = offsets[h]
                    row = tile[h]
                    if p < min_float_prime:
                        for i in range(width):
                            row[i] = mix[i] % p + off
                    else:
                        inv = inv_primes[h]
                        for i in range(width):
                            r = mix[i] - np.int64(fmix[i] * inv) * p
                            r += p & (r >> 63)
                            r += p & (r >> 63)
                            r -= p & ~((r - p) >> 63)
                            row[i] = r + off
            dest = out[b]
            for i in range(width):
                for h in range(heads):
                    dest[t0 + i, h] = tile[h, i]

    return hash_layer


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
            raise EngramError(f"spec pad_id {spec.pad_id} is not below the projection's vocab size "
                              f"{projection.vocab_size}")
        self.pad = int(projection.lookup[spec.pad_id])
        self._layers: dict[int, _Layer] = {}

    def multipliers(self, layer_id: int) -> np.ndarray:
        return self._layer(layer_id).multipliers.copy()

    def offsets(self, layer_id: int) -> np.ndarray:
        return self._layer(layer_id).offsets.copy()

    def head_sizes(self, layer_id: int) -> np.ndarray:
        return self._layer(layer_id).primes.copy()

    def hash(self, input_ids: Any, layers: Iterable[int] | None = None) -> dict[int, Any]:
        """Head-local bucket of every head, per layer (all layers of the spec by default)."""
        return self._run(input_ids, layers, with_offsets=False)

    def rows(self, input_ids: Any, layers: Iterable[int] | None = None) -> dict[int, Any]:
        """The same buckets plus each head's offset: the row index into the layer's table."""
        return self._run(input_ids, layers, with_offsets=True)

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

    def _run(self, input_ids: Any, layers: Iterable[int] | None, with_offsets: bool) -> dict[int, Any]:
        layer_ids = self._layer_ids(layers)
        torch = sys.modules.get("torch")
        if torch is not None and isinstance(input_ids, torch.Tensor):
            if input_ids.dtype.is_floating_point or input_ids.dtype.is_complex or input_ids.dtype == torch.bool:
                raise EngramError(f"token ids must be integers, got dtype {input_ids.dtype}")
            if input_ids.device.type != "cpu":
                return self._run_torch(input_ids, layer_ids, with_offsets)
            result = self._run_numpy(input_ids.detach().numpy(), layer_ids, with_offsets)
            return {k: torch.from_numpy(v) for k, v in result.items()}
        try:
            array = np.asarray(input_ids)
        except (OverflowError, ValueError, TypeError) as exc:
            raise EngramError(f"token ids must be an integer array: {exc}") from None
        return self._run_numpy(array, layer_ids, with_offsets)

    def _run_numpy(self, ids: np.ndarray, layer_ids: list[int], with_offsets: bool) -> dict[int, np.ndarray]:
        _check_rank(ids.shape)
        self.projection.check_ids(ids)
        batch = np.ascontiguousarray(ids.reshape(1, -1) if ids.ndim == 1 else ids, dtype=np.int64)
        result = {}
        for layer_id in layer_ids:
            layer = self._layer(layer_id)
            out = np.empty(batch.shape + (layer.primes.size,), dtype=np.int64)
            if out.size:
                offsets = layer.offsets if with_offsets else layer.zeros
                kernel = _kernel()
                with _KERNEL_LOCK:
                    kernel(batch, self.projection.lookup, self.pad, layer.multipliers, layer.primes,
                           layer.inv_primes, offsets, out, BLOCK_TOKENS)
            result[layer_id] = out[0] if ids.ndim == 1 else out
        return result

    def _run_torch(self, ids: Any, layer_ids: list[int], with_offsets: bool) -> dict[int, Any]:
        """Plain torch ops for tensors on an accelerator, where the numba kernel cannot run."""
        import torch

        _check_rank(tuple(ids.shape))
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
            out = batch.new_empty((rows, length, layer.primes.size))
            mix = batch * mults[0]
            for n in range(1, len(mults)):
                mix = mix ^ (padded[:, context - n:context - n + length] * mults[n])
                for h in range((n - 1) * per_order, n * per_order):
                    bucket = torch.remainder(mix, int(layer.primes[h]))
                    out[..., h] = bucket + int(layer.offsets[h]) if with_offsets else bucket
            result[layer_id] = out[0] if ids.ndim == 1 else out
        return result


def _check_rank(shape: tuple[int, ...]) -> None:
    if len(shape) not in (1, 2):
        raise EngramError(f"token ids must be 1-D (one sequence) or 2-D (batch, time), got shape "
                          f"{tuple(shape)}")
