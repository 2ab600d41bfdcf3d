"""fp8 E4M3 tables with one E8M0 (power-of-two) scale per 32 consecutive values of a row.

This is the layout DeepSeek-V4.1-Flash ships its Engram tables in, and what vLLM and SGLang
dequantize: value = e4m3 * 2**(e8m0 - 127). The scale of a block is the smallest power of two
that keeps the block's largest magnitude within E4M3's finite range (448), so nothing saturates;
multiplying by a power of two is exact, so the only error is E4M3's round-to-nearest-even.

The kernels are plain (not `parallel`) numba functions that release the GIL: callers split
rows over their own threads, and no numba threading layer is involved (the hasher owns that).
"""

from __future__ import annotations

import concurrent.futures
import functools
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch

from .errors import EngramError

BLOCK = 32
E4M3_MAX = 448.0
E8M0_BIAS = 127
_MIN_EXPONENT = -127  # E8M0 codes 0..254 are 2**-127 .. 2**127; 255 is NaN
_MAX_EXPONENT = 127


def check_blockable(dim: int) -> None:
    if dim % BLOCK:
        raise EngramError(f"fp8 export needs a row width that is a multiple of {BLOCK} "
                          f"(one E8M0 scale per {BLOCK} values); this table has dim {dim}")


@functools.cache
def _kernels() -> tuple[Callable[..., None], Callable[..., None], Callable[..., None]]:
    """Compile (or load from numba's cache) the quantize and dequantize kernels on first use."""
    import numba

    @numba.njit(nogil=True, cache=True, error_model="numpy")
    def quantize_rows(x, codes, scales, errors):
        """x float32 (rows, dim) -> codes uint8, scales uint8 (rows, dim/32); errors[r] = (max, sum sq).

        Per block: k = smallest exponent with amax <= 448 * 2**k (read off amax's float32 bits:
        amax = 1.f * 2**e exceeds 1.75 * 2**(e + k - e) exactly when f > 0.75). Per value, with
        y = |x| * 2**-k: below 2**-6 (E4M3 subnormals) adding and subtracting 2**14 rounds y to a
        multiple of 2**-9, nearest even; above it, adding 0x7FFFF plus the kept LSB to the float32
        bits and dropping 20 mantissa bits rounds to 3 mantissa bits, nearest even, and the
        exponent re-biases from 127 to 7 by subtracting 120 << 3.
        """
        rows, dim = x.shape
        y = np.empty(BLOCK, np.float32)
        y_bits = y.view(np.uint32)
        back = np.empty(BLOCK, np.float32)
        back_bits = back.view(np.uint32)
        small = np.empty(BLOCK, np.float32)
        word = np.empty(1, np.float32)
        word_bits = word.view(np.uint32)
        for r in range(rows):
            worst = np.float32(0.0)
            total = 0.0
            for base in range(0, dim, BLOCK):
                amax = np.float32(0.0)
                for i in range(BLOCK):
                    amax = max(amax, abs(x[r, base + i]))
                word[0] = amax
                exponent = np.int64((word_bits[0] >> 23) & 0xFF) - 127
                k = exponent - 8 + (1 if (word_bits[0] & 0x7FFFFF) > 0x600000 else 0)
                if exponent == -127 or k < -127:
                    k = -127
                k = min(k, 127)
                scales[r, base // BLOCK] = k + 127
                if k < 127:
                    word_bits[0] = np.uint32((127 - k) << 23)
                    inverse = word[0]
                    word_bits[0] = np.uint32((127 + k) << 23) if k > -127 else np.uint32(1 << 22)
                    scale = word[0]
                else:
                    word_bits[0] = np.uint32(1 << 22)  # 2**-127, a float32 subnormal
                    inverse = word[0]
                    word_bits[0] = np.uint32(254 << 23)
                    scale = word[0]
                for i in range(BLOCK):
                    y[i] = x[r, base + i] * inverse
                for i in range(BLOCK):
                    small[i] = (abs(y[i]) + np.float32(16384.0)) - np.float32(16384.0)
                for i in range(BLOCK):
                    sign = (y_bits[i] >> 24) & np.uint32(0x80)  # kept for -0.0 too, as IEEE does
                    mag = y_bits[i] & np.uint32(0x7FFFFFFF)
                    rounded = (mag + np.uint32(0x7FFFF) + ((mag >> 20) & np.uint32(1))) >> 20
                    if mag < np.uint32(0x3C800000):  # below 2**-6
                        code = np.uint32(small[i] * np.float32(512.0))
                        back[i] = small[i]
                    else:
                        code = rounded - np.uint32(960)
                        back_bits[i] = rounded << 20
                    codes[r, base + i] = code | sign
                if amax > 0:
                    inv_amax = np.float32(1.0) / amax
                    block_sum = np.float32(0.0)
                    for i in range(BLOCK):
                        error = abs(abs(x[r, base + i]) - back[i] * scale) * inv_amax
                        worst = max(worst, error)
                        block_sum += error * error
                    total += block_sum
            errors[r, 0] = worst
            errors[r, 1] = total

    @numba.njit(nogil=True, cache=True)
    def gather_float32(codes, scales, index, lut, out):
        """out[j, i] = lut[codes[index[j], i]] * 2**(scales[index[j], i // 32] - 127)."""
        dim = codes.shape[1]
        word = np.empty(1, np.float32)
        word_bits = word.view(np.uint32)
        for j in range(index.size):
            r = index[j]
            for base in range(0, dim, BLOCK):
                e = np.uint32(scales[r, base // BLOCK])
                word_bits[0] = (e << 23) if e > 0 else np.uint32(1 << 22)
                scale = word[0]
                for i in range(BLOCK):
                    out[j, base + i] = lut[codes[r, base + i]] * scale

    @numba.njit(nogil=True, cache=True)
    def gather_bfloat16(codes, scales, index, lut, out):
        """The same, written as bfloat16 bits (float32 rounded to nearest even) in one pass."""
        dim = codes.shape[1]
        word = np.empty(BLOCK, np.float32)
        word_bits = word.view(np.uint32)
        for j in range(index.size):
            r = index[j]
            for base in range(0, dim, BLOCK):
                e = np.uint32(scales[r, base // BLOCK])
                word_bits[0] = (e << 23) if e > 0 else np.uint32(1 << 22)
                scale = word[0]
                for i in range(BLOCK):
                    word[i] = lut[codes[r, base + i]] * scale
                for i in range(BLOCK):
                    bits = word_bits[i]
                    out[j, base + i] = np.uint16((bits + np.uint32(0x7FFF) + ((bits >> 16) & np.uint32(1))) >> 16)

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
        self.max_relative = max(self.max_relative, other.max_relative)
        self.sum_squares += other.sum_squares
        self.count += other.count

    @property
    def rms_relative(self) -> float:
        return (self.sum_squares / self.count) ** 0.5 if self.count else 0.0

    def to_json(self) -> dict[str, float]:
        return {"max_relative": self.max_relative, "rms_relative": self.rms_relative,
                "values": self.count}


def _split(rows: int, parts: int) -> list[tuple[int, int]]:
    step = max(1, -(-rows // max(1, parts)))
    return [(a, min(a + step, rows)) for a in range(0, rows, step)]


def quantize(values: torch.Tensor, error: QuantError | None = None,
             threads: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """Rows (n, dim) of any float dtype -> (float8_e4m3fn (n, dim), float8_e8m0fnu (n, dim/32)).

    `error` accumulates the quantization error; `threads` splits the rows between threads.
    """
    rows, dim = values.shape
    check_blockable(dim)
    x = values.detach().to(torch.float32).contiguous().numpy()
    codes = np.empty((rows, dim), np.uint8)
    scales = np.empty((rows, dim // BLOCK), np.uint8)
    errors = np.zeros((rows, 2), np.float64)
    kernel = _kernels()[0]

    def run(part: tuple[int, int]) -> None:
        a, b = part
        kernel(x[a:b], codes[a:b], scales[a:b], errors[a:b])

    parts = _split(rows, threads)
    if len(parts) > 1:
        with concurrent.futures.ThreadPoolExecutor(len(parts)) as pool:
            list(pool.map(run, parts))
    else:
        for part in parts:
            run(part)
    if error is not None and rows:
        error.merge(QuantError(float(errors[:, 0].max()), float(errors[:, 1].sum()), rows * dim))
    return (torch.from_numpy(codes).view(torch.float8_e4m3fn),
            torch.from_numpy(scales).view(torch.float8_e8m0fnu))


def dequantize(quantized: torch.Tensor, scales: torch.Tensor,
               dtype: torch.dtype = torch.bfloat16) -> torch.Tensor:
    """Inverse of `quantize` for rows of any leading shape: e4m3 * 2**(e8m0 - 127)."""
    *lead, dim = quantized.shape
    codes = quantized.reshape(-1, dim)
    index = torch.arange(codes.shape[0])
    return gather_dequantize(codes, scales.reshape(-1, dim // BLOCK), index, dtype).reshape(*lead, dim)


def gather_dequantize(quantized: torch.Tensor, scales: torch.Tensor, index: torch.Tensor,
                      dtype: torch.dtype = torch.bfloat16, threads: int = 1) -> torch.Tensor:
    """Rows `index` (1-D) of an fp8 table and its scales, dequantized, in one pass: (len, dim).

    The table may be a read-only memory map: only the gathered rows are touched.
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
