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
def _kernels() -> tuple[Callable[..., tuple[float, float]], Callable[..., None], Callable[..., None]]:
    """Compile (or load from numba's cache) the quantize and dequantize kernels on first use."""
    import numba
    from llvmlite import ir
    from numba.extending import intrinsic, overload

    u32 = np.uint32

    @intrinsic
    def as_float(typingctx, bits):
        """The float32 whose bits are the low 32 bits of an integer (numba widens uint32 math)."""
        def codegen(context, builder, signature, args):
            value = args[0]
            if value.type.width > 32:
                value = builder.trunc(value, ir.IntType(32))
            return builder.bitcast(value, ir.FloatType())
        return numba.types.float32(bits), codegen

    @intrinsic
    def as_bits(typingctx, value):
        def codegen(context, builder, signature, args):
            return builder.bitcast(args[0], ir.IntType(32))
        return numba.types.uint32(numba.types.float32), codegen

    def float_bits(value):
        """float32 bits of one input value: uint32 (float32) or uint16 (bfloat16)."""

    @overload(float_bits, inline="always")
    def _float_bits(value):
        if value == numba.types.uint16:
            return lambda value: u32(value) << u32(16)
        return lambda value: u32(value)

    @numba.njit(nogil=True, cache=True, error_model="numpy", boundscheck=False)
    def quantize_rows(x, codes, scales):
        """x float32 or bfloat16 bits (rows, dim) -> codes uint8, scales uint8 (rows, dim/32), and
        (max, sum of squares) of the errors relative to their block's amax.

        Per block: k = smallest exponent with amax <= 448 * 2**k, read off amax's float32 bits
        (amax = 1.f * 2**e exceeds 1.75 * 2**e exactly when f > 0.75); for finite values the
        integer max of the magnitude bits is amax's bits. Per value, y = |x| * 2**-k (exact):
        adding and subtracting c = 2**(e + 20), e being y's exponent but at least -6 (E4M3's
        subnormals are multiples of 2**-9), rounds y to 3 mantissa bits, nearest even, in the
        FPU's own rounding. The code is then the rounded value's bits re-biased from 127 to 7
        (or, below 2**-6, the value in units of 2**-9), with x's sign. Branch-free and 32-bit
        wide, so it vectorizes. A row holding inf or nan, or a block whose amax is a float32
        subnormal (its relative error overflows), takes `quantize_row_exactly`.
        """
        rows, dim = x.shape
        blocks = dim // BLOCK
        tops = np.empty(blocks, np.uint32)
        inverses = np.empty(blocks, np.float32)
        steps = np.empty(blocks, np.float32)
        inv_amaxes = np.empty(blocks, np.float32)
        sums = np.empty(BLOCK, np.float32)
        totals = np.zeros(BLOCK, np.float64)
        worsts = np.zeros(BLOCK, np.uint32)
        slow_worst = np.float32(0.0)
        slow_total = 0.0
        for r in range(rows):
            xr = x[r]
            cr = codes[r]
            sr = scales[r]
            plain = True
            for b in range(blocks):
                base = np.uint64(b * BLOCK)
                top = u32(0)
                for i in range(BLOCK):
                    top = max(top, float_bits(xr[base + np.uint64(i)]) & u32(0x7FFFFFFF))
                tops[b] = top
                plain &= (top < u32(0x7F800000)) & ((top >= u32(0x800000)) | (top == u32(0)))
            if not plain:
                worst, total = quantize_row_exactly(xr, cr, sr)
                if worst != worst or worst > slow_worst:  # nan sticks, as numpy's max keeps it
                    slow_worst = worst
                slow_total += total
                continue
            for b in range(blocks):
                top = tops[b]
                exponent = np.int64(top >> u32(23))
                k = exponent - 135 + ((top & u32(0x7FFFFF)) > u32(0x600000))
                k = -127 if exponent == 0 else max(k, -127)
                sr[b] = k + 127
                inverses[b] = as_float(u32((127 - k) << 23))
                steps[b] = as_float(u32((127 + k) << 23)) if k > -127 else as_float(u32(1 << 22))
                inv_amaxes[b] = np.float32(1.0) / as_float(top) if top != 0 else np.float32(0.0)
            sums[:] = 0.0
            for b in range(blocks):
                base = np.uint64(b * BLOCK)
                inverse, step, inv_amax = inverses[b], steps[b], inv_amaxes[b]
                for i in range(BLOCK):
                    bits = float_bits(xr[base + np.uint64(i)])
                    magnitude = as_float(bits & u32(0x7FFFFFFF))
                    y = magnitude * inverse
                    c = as_float(max(as_bits(y) & u32(0x7F800000), u32(0x3C800000)) + u32(20 << 23))
                    rounded = (y + c) - c
                    rounded_bits = as_bits(rounded)
                    code = (u32(rounded * np.float32(512.0)) if rounded_bits < u32(0x3C800000)
                            else (rounded_bits >> u32(20)) - u32(960))
                    cr[base + np.uint64(i)] = np.uint8(code | ((bits >> u32(24)) & u32(0x80)))
                    error = abs(magnitude - rounded * step) * inv_amax
                    sums[i] += error * error
                    worsts[i] = max(worsts[i], as_bits(error))
            for i in range(BLOCK):
                totals[i] += sums[i]
        worst = np.float32(0.0)
        for i in range(BLOCK):
            worst = max(worst, as_float(worsts[i]))
        if slow_worst != slow_worst or slow_worst > worst:
            worst = slow_worst
        return worst, totals.sum() + slow_total

    @numba.njit(nogil=True, cache=True, error_model="numpy", boundscheck=False)
    def quantize_row_exactly(xr, cr, sr):
        """One row, value by value, rounding in integer arithmetic: the same codes as
        `quantize_rows` where that applies, and a defined result where it does not."""
        y = np.empty(BLOCK, np.float32)
        back = np.empty(BLOCK, np.float32)
        worst = np.float32(0.0)
        total = 0.0
        for blk in range(xr.shape[0] // BLOCK):
            base = blk * BLOCK
            amax = np.float32(0.0)
            for i in range(BLOCK):
                amax = max(amax, abs(as_float(float_bits(xr[base + i]))))
            top = as_bits(amax)
            exponent = np.int64(top >> u32(23)) - 127
            k = exponent - 8 + (1 if (top & u32(0x7FFFFF)) > u32(0x600000) else 0)
            if exponent == -127 or k < -127:
                k = -127
            k = min(k, 127)
            sr[blk] = k + 127
            if k < 127:
                inverse = as_float(u32((127 - k) << 23))
                scale = as_float(u32((127 + k) << 23)) if k > -127 else as_float(u32(1 << 22))
            else:
                inverse = as_float(u32(1 << 22))  # 2**-127, a float32 subnormal
                scale = as_float(u32(254 << 23))
            for i in range(BLOCK):
                y[i] = as_float(float_bits(xr[base + i])) * inverse
                bits = as_bits(y[i])
                sign = (bits >> u32(24)) & u32(0x80)  # kept for -0.0 too, as IEEE does
                mag = bits & u32(0x7FFFFFFF)
                rounded = (mag + u32(0x7FFFF) + ((mag >> u32(20)) & u32(1))) >> u32(20)
                if mag < u32(0x3C800000):  # below 2**-6: E4M3 subnormals, multiples of 2**-9
                    small = (abs(y[i]) + np.float32(16384.0)) - np.float32(16384.0)
                    code = u32(small * np.float32(512.0))
                    back[i] = small
                else:
                    code = rounded - u32(960)
                    back[i] = as_float(rounded << u32(20))
                cr[base + i] = np.uint8(code | sign)
            if amax > 0:
                inv_amax = np.float32(1.0) / amax
                block_sum = np.float32(0.0)
                for i in range(BLOCK):
                    error = abs(abs(as_float(float_bits(xr[base + i]))) - back[i] * scale) * inv_amax
                    worst = max(worst, error)
                    block_sum += error * error
                total += block_sum
        return worst, total

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


def _float_bits(values: torch.Tensor) -> np.ndarray:
    """The rows as float32 (uint32) or bfloat16 (uint16) bits, without a float32 copy of bfloat16."""
    values = values.detach()
    if values.dtype == torch.bfloat16:
        return values.contiguous().view(torch.int16).numpy().view(np.uint16)
    return values.to(torch.float32).contiguous().view(torch.int32).numpy().view(np.uint32)


def quantize(values: torch.Tensor, error: QuantError | None = None,
             threads: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """Rows (n, dim) of any float dtype -> (float8_e4m3fn (n, dim), float8_e8m0fnu (n, dim/32)).

    `error` accumulates the quantization error; `threads` splits the rows between threads.
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
