"""Streaming n-gram hashing: rows of a chunk of prefill or of one decoded token, with the context before it.

The rows of token t depend on the token and on the `context = max_ngram_size - 1` tokens before
it: their projected ids, and whether the n-gram may reach them (the rule of `hashing`: the id at
t - s is the projected pad when t - s lies before the sequence start or any of the tokens
t, t - 1, ..., t - s is a barrier). So a stream keeps, per row of the batch, the last `context`
ids and a `blocked` flag each: the token is a barrier, or it lies before the row's sequence start
(a reset marks all of them). A call hashes `[carried context | new ids]` with the hasher's own
kernel, the carried flags given to it as a barrier mask, and keeps the new tokens' rows.

Why that is exact: a sequence start acts as a barrier just before position 0 (for a token at
position p and shift s, "position - s < 0" and "a barrier among the s tokens back" are both
"s > p" when the barrier stands at -1), and a carried barrier blocks exactly as it did in the whole
sequence. A new token reaches at most `context` tokens back, all of them carried columns of its
own row, so the kernel's padding before its input and whatever a carried column's own n-grams
read never enter a kept row. The same reasoning lets the whole batch be hashed as one long row
(the (B, context + t) buffer viewed as (1, B * (context + t))): a decode step is one small
kernel call per layer, on the calling thread, not B tiny rows. The kernel's `period` (context + t)
has it read the carried columns without reducing them: at t = 1 the reduction over every head,
most of the kernel's time, is done for the new tokens only.

Buffers for the last chunk length are kept, so decode steps allocate only their results (none
with `out=`). Tensors on an accelerator take the hasher's torch path with the carried context kept
on the device (the hasher's id check reads the new ids on the host, as for `NgramHasher.rows`).
"""

from __future__ import annotations

import sys
from collections.abc import Iterable, Mapping
from typing import Any

import numpy as np

from .errors import EngramError, UsageError
from .hashing import (
    _NO_POSITIONS,
    BLOCK_TOKENS,
    PARALLEL_MIN_TOKENS,
    NgramHasher,
    _as_array,
    _as_tensor,
    _Gates,
    _launch,
    hash_kernel,
)


class _Scratch:
    """Kernel input and output for one chunk length: [context | new] ids and flags, per-layer rows.

    The first `context` columns hold the carried context between calls (numpy streams).
    """

    def __init__(self, batch_size: int, width: int) -> None:
        self.width = width
        self.ids = np.zeros((batch_size, width), np.int64)
        self.blocked = np.zeros((batch_size, width), np.bool_)
        self.flat_ids = self.ids.reshape(1, -1)  # one long row: see the module docstring
        self.flat_blocked = self.blocked.reshape(1, -1)
        self.out: dict[int, np.ndarray] = {}  # per layer, (B, width, heads)
        self.launch: dict[int, tuple[Any, ...]] = {}  # per layer, the kernel's arguments
        self.bad = np.empty(-(-self.ids.size // BLOCK_TOKENS), np.int64)


class HashStream:
    """Per-row left context of a batch of token streams; `rows` hashes the next chunk of each row.

    Made by `NgramHasher.stream(batch_size)`. Every row starts a new sequence; `reset(row)`
    starts another one in that row (a new request in a serving slot), `reset()` in all rows.
    """

    def __init__(self, hasher: NgramHasher, batch_size: int, barrier_ids: Iterable[int] | None = None) -> None:
        if isinstance(batch_size, bool) or not isinstance(batch_size, (int, np.integer)) or batch_size < 1:
            raise UsageError(f"batch_size must be a positive integer, got {batch_size!r}")
        self.hasher = hasher
        self.batch_size = int(batch_size)
        self.context = hasher.spec.max_ngram_size - 1
        self._barrier_vocab = hasher.barrier_vocab(barrier_ids)
        self._all_layers = hasher._layer_ids(None)
        self._scratch = _Scratch(self.batch_size, self.context)
        # the carried context: raw ids and blocked flags, views of the scratch or tensors on the last call's device
        self._ids: Any = self._scratch.ids
        self._blocked: Any = self._scratch.blocked
        self._blocked[:] = True  # every row starts a sequence

    def reset(self, row: int | None = None) -> None:
        """Start a new sequence in `row` (in every row when None): no n-gram reaches back past it."""
        if row is None:
            self._blocked[:] = True
            return
        if isinstance(row, bool) or not isinstance(row, (int, np.integer)) or not 0 <= row < self.batch_size:
            raise UsageError(f"row must be an integer in [0, {self.batch_size}), got {row!r}")
        self._blocked[int(row)] = True

    def rows(
        self,
        input_ids: Any,
        layers: Iterable[int] | None = None,
        *,
        barrier: Any = None,
        out: Mapping[int, Any] | None = None,
    ) -> dict[int, Any]:
        """Table rows of the next `t` tokens of every row, as `NgramHasher.rows` gives them for the whole sequence.

        Args:
            input_ids: (batch_size, t) token ids, numpy or torch, t >= 0.
            layers: only these layers.
            barrier: a boolean mask of the ids' shape: tokens no n-gram may span (with the stream's
                `barrier_ids`, either makes a barrier).
            out: caller-owned int64 buffers {layer_id: (batch_size, t, heads)}, as for `NgramHasher.rows`.
        Returns:
            {layer_id: int64 (batch_size, t, heads)}, numpy in numpy out, torch in torch out.
        """
        layer_ids = self._all_layers if layers is None else self.hasher._layer_ids(layers)
        torch = sys.modules.get("torch")
        if torch is not None and isinstance(input_ids, torch.Tensor):
            if input_ids.dtype.is_floating_point or input_ids.dtype.is_complex or input_ids.dtype == torch.bool:
                raise EngramError(f"token ids must be integers, got dtype {input_ids.dtype}")
            self._check_shape(tuple(input_ids.shape))
            if input_ids.device.type != "cpu":
                return self._rows_torch(input_ids, layer_ids, barrier, out)
            buffers = self.hasher._buffers(out, layer_ids, tuple(input_ids.shape), input_ids.device)
            arrays = None if buffers is None else {k: v.numpy() for k, v in buffers.items()}
            mask = None if barrier is None else _as_array(barrier, "barrier", tuple(input_ids.shape))
            result = self._rows_numpy(input_ids.detach().numpy(), layer_ids, mask, arrays)
            return buffers or {k: torch.from_numpy(v) for k, v in result.items()}
        try:
            array = np.asarray(input_ids)
        except (OverflowError, ValueError, TypeError) as exc:
            raise EngramError(f"token ids must be an integer array: {exc}") from None
        self._check_shape(array.shape)
        buffers = self.hasher._buffers(out, layer_ids, array.shape, None)
        mask = None if barrier is None else _as_array(barrier, "barrier", array.shape)
        return self._rows_numpy(array, layer_ids, mask, buffers)

    def _check_shape(self, shape: tuple[int, ...]) -> None:
        if len(shape) != 2 or shape[0] != self.batch_size:
            raise EngramError(
                f"a stream of batch_size {self.batch_size} takes ids of shape ({self.batch_size}, t), got {shape}"
            )

    def _rows_numpy(
        self,
        ids: np.ndarray,
        layer_ids: list[int],
        barrier: np.ndarray | None,
        buffers: Mapping[int, np.ndarray] | None,
    ) -> dict[int, np.ndarray]:
        hasher, context = self.hasher, self.context
        hasher.projection.check_ids(ids)
        if barrier is not None and barrier.dtype != np.bool_:
            raise UsageError(f"barrier must be a boolean mask, got dtype {barrier.dtype}")
        length = ids.shape[1]
        scratch = self._scratch
        if scratch.width != context + length:
            scratch = _Scratch(self.batch_size, context + length)
        if scratch is not self._scratch or not isinstance(self._ids, np.ndarray):
            torch = sys.modules.get("torch")
            carried = self._ids, self._blocked
            if torch is not None and isinstance(self._ids, torch.Tensor):  # the last call was on an accelerator
                carried = self._ids.cpu().numpy(), self._blocked.cpu().numpy()
            scratch.ids[:, :context], scratch.blocked[:, :context] = carried
            self._scratch, self._ids, self._blocked = scratch, scratch.ids[:, :context], scratch.blocked[:, :context]
        scratch.ids[:, context:] = ids
        scratch.blocked[:, context:] = False if barrier is None else barrier
        small = scratch.ids.size < PARALLEL_MIN_TOKENS
        result = {}
        for layer_id in layer_ids:
            launch = scratch.launch.get(layer_id)
            if launch is None:
                launch = scratch.launch[layer_id] = self._launch_args(scratch, layer_id)
            if small:  # a decode step: the serial kernel straight, no position to check
                hash_kernel(parallel=False)(*launch)
            else:
                gates = _Gates(_NO_POSITIONS, scratch.flat_blocked, self._barrier_vocab, False)
                _launch(*launch[:8], gates=gates, period=scratch.width)
            full = scratch.out[layer_id]
            if buffers is None:
                result[layer_id] = full[:, context:].copy()
            else:
                np.copyto(buffers[layer_id], full[:, context:])
        # the last `context` columns become the carried ones (numpy copies overlapping parts safely); the
        # kernel finds barrier ids among the carried ids again
        scratch.ids[:, :context] = scratch.ids[:, length:]
        scratch.blocked[:, :context] = scratch.blocked[:, length:]
        return result if buffers is None else dict(buffers)

    def _launch_args(self, scratch: _Scratch, layer_id: int) -> tuple[Any, ...]:
        """The kernel's arguments for one layer over the scratch viewed as one row, its output allocated."""
        hasher = self.hasher
        layer = hasher._layer(layer_id)
        full = scratch.out[layer_id] = np.empty(scratch.ids.shape + (layer.primes.size,), np.int64)
        return (
            scratch.flat_ids,
            hasher.projection.lookup,
            hasher.pad,
            layer.multipliers,
            layer.primes,
            layer.inv_primes,
            layer.offsets,
            full.reshape(1, scratch.ids.size, -1),
            BLOCK_TOKENS,
            _NO_POSITIONS,
            scratch.flat_blocked,
            self._barrier_vocab,
            scratch.bad,
            scratch.width,  # the carried columns are read, not reduced
        )

    def _rows_torch(
        self, ids: Any, layer_ids: list[int], barrier: Any, out: Mapping[int, Any] | None
    ) -> dict[int, Any]:
        """Tensors on an accelerator: the same [context | new] hash through the hasher's torch path."""
        import torch

        device = ids.device
        shape = tuple(ids.shape)
        buffers = self.hasher._buffers(out, layer_ids, shape, device)
        mask = _as_tensor(barrier, "barrier", shape, device)
        if not isinstance(self._ids, torch.Tensor) or self._ids.device != device:
            self._ids = torch.as_tensor(self._ids).to(device)
            self._blocked = torch.as_tensor(self._blocked).to(device)
        wide = torch.cat([self._ids, ids.long()], dim=1)
        blocked = torch.cat([self._blocked, torch.zeros_like(ids, dtype=torch.bool) if mask is None else mask], dim=1)
        if self._barrier_vocab.size:
            vocab = torch.from_numpy(self._barrier_vocab).to(device)
            blocked = blocked | ((wide >= 0) & vocab[wide.clamp(min=0)])
        full = self.hasher.rows(wide, layer_ids, barrier=blocked)
        result = {}
        for layer_id in layer_ids:
            kept = full[layer_id][:, self.context :]
            if buffers is None:
                result[layer_id] = kept.contiguous()
            else:
                buffers[layer_id].copy_(kept)
        self._ids = wide[:, shape[1] :].clone()
        self._blocked = blocked[:, shape[1] :].clone()
        return result if buffers is None else buffers
