"""numba kernels that quantize rows to fp8 E4M3 with E8M0 block scales, and gather them back (see `fp8`).

A module of their own so that `fp8` loads numba only on first use, and so that numba can
cache them: kernels defined inside a function capture their helpers as closure variables,
which numba's cache cannot key on. The kernels are plain (not `parallel`) numba functions that
release the GIL: callers split rows over their own threads, and no numba threading layer is
involved (the hasher owns that).
"""

from __future__ import annotations

import numba
import numpy as np
from llvmlite import ir
from numba.core import cgutils
from numba.extending import intrinsic, overload

from .fp8_format import BLOCK

u32 = np.uint32


@intrinsic
def as_float(typingctx, bits):
    """The float32 whose bits are the low 32 bits of an unsigned integer (numba widens uint32
    arithmetic to 64 bits; LLVM narrows it back once the result is cut to 32)."""

    def codegen(context, builder, signature, args):
        value = args[0]
        if value.type.width > 32:
            value = builder.trunc(value, ir.IntType(32))
        elif value.type.width < 32:
            value = builder.zext(value, ir.IntType(32))
        return builder.bitcast(value, ir.FloatType())

    return numba.types.float32(bits), codegen


@intrinsic
def as_bits(typingctx, value):
    """The bits of a float32."""

    def codegen(context, builder, signature, args):
        return builder.bitcast(args[0], ir.IntType(32))

    return numba.types.uint32(numba.types.float32), codegen


@intrinsic
def block_top(typingctx, row, start):
    """The largest magnitude of row[start:start + 32] as float32 bits (sign cleared): one vector
    load and an unsigned max reduction, which numba's widened integers keep LLVM from finding.

    `row` is a 1-D C-contiguous uint16 (bfloat16) or uint32 (float32) array of bits; `typingctx`
    is numba's typing context, passed to every intrinsic.
    """
    if not (
        isinstance(row, numba.types.Array)
        and row.ndim == 1
        and row.layout == "C"
        and row.dtype in (numba.types.uint16, numba.types.uint32)
    ):
        return None
    width = row.dtype.bitwidth

    def codegen(context, builder, signature, args):
        data = context.make_array(signature.args[0])(context, builder, value=args[0]).data
        lane = ir.IntType(width)
        vector = ir.VectorType(lane, BLOCK)
        values = builder.load(builder.bitcast(builder.gep(data, [args[1]]), vector.as_pointer()), align=width // 8)
        magnitudes = builder.and_(values, ir.Constant(vector, [(1 << (width - 1)) - 1] * BLOCK))
        reduce = cgutils.get_or_insert_function(
            builder.module, ir.FunctionType(lane, [vector]), f"llvm.vector.reduce.umax.v{BLOCK}i{width}"
        )
        top = builder.call(reduce, [magnitudes])
        if width == 16:  # bfloat16: the float32 bits are the bfloat16 bits shifted up
            top = builder.shl(builder.zext(top, ir.IntType(32)), ir.Constant(ir.IntType(32), 16))
        return top

    return numba.types.uint32(row, numba.types.intp), codegen


def float_bits(value):
    """float32 bits of one input value: uint32 (float32) or uint16 (bfloat16); numba only."""
    raise NotImplementedError


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
    subnormal (its relative error overflows), takes `quantize_row_exactly`. Squared errors
    add up in 32 lanes, so the sum rounds a little differently from a sequential one.
    """
    rows, dim = x.shape
    blocks = dim // BLOCK
    flat_x, flat_codes, flat_scales = x.reshape(-1), codes.reshape(-1), scales.reshape(-1)
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
        # flat arrays and unsigned indices: no row views to reference-count, and no
        # negative-index test, which would turn the vector loads and stores into gathers
        row = np.uint64(r * dim)
        plain = True
        for b in range(blocks):
            top = block_top(flat_x, r * dim + b * BLOCK)
            tops[b] = top
            plain &= (top < u32(0x7F800000)) & ((top >= u32(0x800000)) | (top == u32(0)))
        if not plain:
            worst, total = quantize_row_exactly(x[r], codes[r], scales[r])
            if worst != worst or worst > slow_worst:  # nan sticks, as numpy's max keeps it
                slow_worst = worst
            slow_total += total
            continue
        for b in range(blocks):
            top = tops[b]
            exponent = np.int64(top >> u32(23))
            k = exponent - 135 + ((top & u32(0x7FFFFF)) > u32(0x600000))
            k = -127 if exponent == 0 else max(k, -127)
            flat_scales[r * blocks + b] = k + 127
            inverses[b] = as_float(u32((127 - k) << 23))
            steps[b] = as_float(u32((127 + k) << 23)) if k > -127 else as_float(u32(1 << 22))
            inv_amaxes[b] = np.float32(1.0) / as_float(top) if top != 0 else np.float32(0.0)
        sums[:] = 0.0
        for b in range(blocks):
            base = row + np.uint64(b * BLOCK)
            inverse, step, inv_amax = inverses[b], steps[b], inv_amaxes[b]
            for i in range(BLOCK):
                bits = float_bits(flat_x[base + np.uint64(i)])
                magnitude = as_float(bits & u32(0x7FFFFFFF))
                y = magnitude * inverse
                c = as_float(max(as_bits(y) & u32(0x7F800000), u32(0x3C800000)) + u32(20 << 23))
                rounded = (y + c) - c
                rounded_bits = as_bits(rounded)
                code = (
                    u32(rounded * np.float32(512.0))
                    if rounded_bits < u32(0x3C800000)
                    else (rounded_bits >> u32(20)) - u32(960)
                )
                flat_codes[base + np.uint64(i)] = np.uint8(code | ((bits >> u32(24)) & u32(0x80)))
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
    `quantize_rows` where that applies, and a defined result where it does not.

    `xr` is the row's float bits, `cr` and `sr` receive its codes and scales; returns (max, sum of
    squares) of the relative errors.
    """
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
            y = as_float(float_bits(xr[base + i])) * inverse
            bits = as_bits(y)
            sign = (bits >> u32(24)) & u32(0x80)  # kept for -0.0 too, as IEEE does
            mag = bits & u32(0x7FFFFFFF)
            rounded = (mag + u32(0x7FFFF) + ((mag >> u32(20)) & u32(1))) >> u32(20)
            if mag < u32(0x3C800000):  # below 2**-6: E4M3 subnormals, multiples of 2**-9
                small = (abs(y) + np.float32(16384.0)) - np.float32(16384.0)
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


@numba.njit(inline="always")
def block_scale(code):
    """2**(code - 127) for an E8M0 code, built from its bits (code 0 is the subnormal 2**-127)."""
    e = np.uint32(code)
    return as_float((e << 23) if e > 0 else np.uint32(1 << 22))


@numba.njit(nogil=True, cache=True)
def gather_float32(codes, scales, index, lut, out):
    """out[j, i] = lut[codes[index[j], i]] * 2**(scales[index[j], i // 32] - 127)."""
    dim = codes.shape[1]
    for j in range(index.size):
        r = index[j]
        for base in range(0, dim, BLOCK):
            scale = block_scale(scales[r, base // BLOCK])
            for i in range(BLOCK):
                out[j, base + i] = lut[codes[r, base + i]] * scale


@numba.njit(nogil=True, cache=True)
def gather_bfloat16(codes, scales, index, lut, out):
    """The same as `gather_float32`, written as bfloat16 bits (float32 rounded to nearest even) in one pass.

    out[j, i] is the bfloat16 of lut[codes[index[j], i]] * 2**(scales[index[j], i // 32] - 127).
    """
    dim = codes.shape[1]
    word = np.empty(BLOCK, np.float32)
    word_bits = word.view(np.uint32)
    for j in range(index.size):
        r = index[j]
        for base in range(0, dim, BLOCK):
            scale = block_scale(scales[r, base // BLOCK])
            for i in range(BLOCK):
                word[i] = lut[codes[r, base + i]] * scale
            for i in range(BLOCK):
                bits = word_bits[i]
                out[j, base + i] = np.uint16((bits + np.uint32(0x7FFF) + ((bits >> 16) & np.uint32(1))) >> 16)
