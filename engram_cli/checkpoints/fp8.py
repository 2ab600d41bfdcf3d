"""Quantize and dequantize tables in the fp8 format of `fp8_format`, as torch tensors.

Thin wrappers around the numba kernels of `fp8_kernels` (compiled or loaded from numba's cache on
first use) that split rows over the caller's threads, and `QuantError`, the running error an fp8
export reports: each value's error relative to its block's largest magnitude.
"""

from __future__ import annotations

import concurrent.futures
import functools
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch

from ..errors import UsageError
from .fp8_format import BLOCK, check_blockable


@functools.cache
def _kernels() -> tuple[Callable[..., tuple[float, float]], Callable[..., None], Callable[..., None]]:
    """Compile (or load from numba's cache) the quantize and dequantize kernels on first use."""
    from .fp8_kernels import gather_bfloat16, gather_float32, quantize_rows

    return quantize_rows, gather_float32, gather_bfloat16


_E4M3_LUT = torch.arange(256, dtype=torch.int32).to(torch.uint8).view(torch.float8_e4m3fn).float().numpy()


@dataclass
class QuantError:
    """Running error of a quantized export, each value's error relative to its block's amax.

    Blocks whose amax is 0 quantize exactly and count as zero error.
    """

    max_relative: float = 0.0
    sum_squares: float = 0.0
    count: int = 0

    def merge(self, other: QuantError) -> None:
        """Add the error of another block run to this one."""
        self.max_relative = max(self.max_relative, other.max_relative)
        self.sum_squares += other.sum_squares
        self.count += other.count

    @property
    def rms_relative(self) -> float:
        """The root mean square of the relative errors so far."""
        return (self.sum_squares / self.count) ** 0.5 if self.count else 0.0

    def to_json(self) -> dict[str, float]:
        """The `quantization` section of `engram export --json`."""
        return {"max_relative": self.max_relative, "rms_relative": self.rms_relative, "values": self.count}


def _split(rows: int, parts: int) -> list[tuple[int, int]]:
    step = max(1, -(-rows // max(1, parts)))
    return [(a, min(a + step, rows)) for a in range(0, rows, step)]


def _float_bits(values: torch.Tensor) -> np.ndarray:
    """The rows as float32 (uint32) or bfloat16 (uint16) bits, without a float32 copy of bfloat16."""
    values = values.detach()
    if values.dtype == torch.bfloat16:
        return values.contiguous().view(torch.int16).numpy().view(np.uint16)
    return values.to(torch.float32).contiguous().view(torch.int32).numpy().view(np.uint32)


def check_quantizable(values: torch.Tensor, where: str, first_row: int = 0) -> None:
    """Refuse rows holding inf or nan for an fp8 export: E4M3 has no inf, and a block's scale
    comes from its largest magnitude, so one such value would wreck its whole block. The error
    names `where` and the first row, counted from `first_row`."""
    finite = torch.isfinite(values)
    if not bool(finite.all()):
        row = first_row + int((~finite).any(dim=1).nonzero()[0, 0])
        raise UsageError(
            f"{where}: {int((~finite).sum()):,} values are inf or nan (the first in row {row:,}); "
            "fp8 E4M3 with block scales cannot hold them"
        )


def quantize(
    values: torch.Tensor, error: QuantError | None = None, threads: int = 1
) -> tuple[torch.Tensor, torch.Tensor]:
    """Rows (n, dim) of any float dtype -> (float8_e4m3fn (n, dim), float8_e8m0fnu (n, dim/32)).

    Args:
        values: the rows to quantize.
        error: accumulates the quantization error.
        threads: splits the rows between threads.
    """
    rows, dim = values.shape
    check_blockable(dim)
    x = _float_bits(values)
    codes = np.empty((rows, dim), np.uint8)
    scales = np.empty((rows, dim // BLOCK), np.uint8)
    kernel = _kernels()[0]

    def run(part: tuple[int, int]) -> tuple[float, float]:
        a, b = part
        return kernel(x[a:b], codes[a:b], scales[a:b])

    parts = _split(rows, threads)
    if len(parts) > 1:
        with concurrent.futures.ThreadPoolExecutor(len(parts)) as pool:
            results = list(pool.map(run, parts))
    else:
        results = [run(part) for part in parts]
    if error is not None and rows:
        worst = np.max([w for w, _ in results])  # a nan (from a nan input) stays visible
        error.merge(QuantError(float(worst), float(sum(t for _, t in results)), rows * dim))
    return (torch.from_numpy(codes).view(torch.float8_e4m3fn), torch.from_numpy(scales).view(torch.float8_e8m0fnu))


def warm_quantize(dtype: torch.dtype) -> None:
    """Compile (or load from numba's cache) `quantize`'s kernel for rows of `dtype` now, on one
    block, so that a report's throughput times the export, not numba: a first fp8 export reported
    7.9 MB/s against 57 MB/s once the kernel was cached."""
    quantize(torch.zeros((1, BLOCK), dtype=dtype))


def warm_dequantize() -> None:
    """Compile (or load) the float32 dequantize kernel now, for the same reason as `warm_quantize`."""
    codes = torch.zeros((1, BLOCK), dtype=torch.uint8).view(torch.float8_e4m3fn)
    scales = torch.full((1, 1), 127, dtype=torch.uint8).view(torch.float8_e8m0fnu)
    dequantize(codes, scales, torch.float32)


def dequantize(quantized: torch.Tensor, scales: torch.Tensor, dtype: torch.dtype = torch.bfloat16) -> torch.Tensor:
    """Inverse of `quantize` for rows of any leading shape: e4m3 * 2**(e8m0 - 127).

    Args:
        quantized: the E4M3 codes, (..., dim).
        scales: their E8M0 scales, (..., dim / 32).
        dtype: the result's dtype (bfloat16 rounds to nearest even).
    """
    *lead, dim = quantized.shape
    codes = quantized.reshape(-1, dim)
    index = torch.arange(codes.shape[0])
    return gather_dequantize(codes, scales.reshape(-1, dim // BLOCK), index, dtype).reshape(*lead, dim)


def gather_dequantize(
    quantized: torch.Tensor,
    scales: torch.Tensor,
    index: torch.Tensor,
    dtype: torch.dtype = torch.bfloat16,
    threads: int = 1,
) -> torch.Tensor:
    """Rows `index` (1-D) of an fp8 table and its scales, dequantized, in one pass: (len, dim).

    The table may be a read-only memory map: only the gathered rows are touched.

    Args:
        quantized: the (rows, dim) E4M3 table.
        scales: its (rows, dim / 32) E8M0 scales.
        index: the rows to gather.
        dtype: the result's dtype (bfloat16 rounds to nearest even).
        threads: splits the gathered rows between threads.
    """
    dim = quantized.shape[1]
    codes = quantized.view(torch.uint8).numpy()
    exps = scales.view(torch.uint8).numpy()
    rows = index.to(torch.int64).contiguous().numpy()
    bf16 = dtype == torch.bfloat16
    out = np.empty((rows.size, dim), np.uint16 if bf16 else np.float32)
    kernel = _kernels()[2 if bf16 else 1]

    def run(part: tuple[int, int]) -> None:
        a, b = part
        kernel(codes, exps, rows[a:b], _E4M3_LUT, out[a:b])

    parts = _split(rows.size, threads)
    if len(parts) > 1:
        with concurrent.futures.ThreadPoolExecutor(len(parts)) as pool:
            list(pool.map(run, parts))
    else:
        for part in parts:
            run(part)
    result = torch.from_numpy(out)
    return result.view(torch.bfloat16) if bf16 else result.to(dtype)
