"""ggml's tensor types for Engram tables: numba kernels that quantize and dequantize rows.

A ggml row of `n` values is `n / block_size` blocks of `type_size` bytes (`GGML_QUANT_SIZES`).
Quantizing writes what the `gguf` package's `quants.quantize` writes for the same float32 values,
bit for bit (which is ggml's reference `quantize_row_*_ref`):

* Q8_0 (32 values, 34 bytes): d = max|x| / 127 as float16, then 32 int8 `round(x / d)` with the
  float32 reciprocal 1/d, rounded half away from zero.
* Q4_0 (32 values, 18 bytes): d = x[argmax|x|] / -8 as float16, then `min(15, trunc(x / d + 8.5))`
  as nibbles: values 0..15 in the low nibbles, 16..31 in the high ones.
* F16 (IEEE half, round to nearest even, as numpy's float16 cast), BF16 (the upper 16 bits of
  float32 rounded to nearest even, NaN forced quiet), F32.

Dequantizing follows ggml's `dequantize_row_*` for F32, F16, BF16, Q8_0, Q4_0 and the K-quants
(256 values per super-block) Q2_K, Q3_K, Q4_K, Q5_K and Q6_K, with the same float32 products in the
same order, so the values equal the `gguf` package's `quants.dequantize` (the tests' reference).
Every kernel is one serial pass over its blocks that releases the GIL; a large call is cut into
one piece of rows per CPU, run on threads (numba's own parallel loops stall whenever one of their
workers waits for a busy CPU, and here made the kernels several times slower). The Q8_0 kernels
run over the flat bytes, so their inner loops vectorize. The numpy versions in the `gguf` package
make a temporary per step and are many times slower. The Q8_0 and Q4_0 kernels
also measure, in the same pass, the largest change they made to a value (what an export reports),
inf when a value is or became inf or nan.
"""

from __future__ import annotations

from collections.abc import Callable

import numba
import numpy as np
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

from ..helpers import cpu_count, in_parallel, row_blocks
from .keys import GgufQuant

QK = 32  # values per Q8_0 / Q4_0 block
_PIECE_VALUES = 1 << 19  # a call with more values is split over the CPUs, on threads
QK_K = 256  # values per K-quant super-block

# the types engram writes (by --quant name) and reads
WRITE_TYPES: dict[GgufQuant, GGMLQuantizationType] = {  # the choices of --quant
    "q8_0": GGMLQuantizationType.Q8_0,
    "q4_0": GGMLQuantizationType.Q4_0,
    "bf16": GGMLQuantizationType.BF16,
    "f16": GGMLQuantizationType.F16,
    "f32": GGMLQuantizationType.F32,
}
READ_TYPES: tuple[GGMLQuantizationType, ...] = (
    GGMLQuantizationType.F32,
    GGMLQuantizationType.F16,
    GGMLQuantizationType.BF16,
    GGMLQuantizationType.Q8_0,
    GGMLQuantizationType.Q4_0,
    GGMLQuantizationType.Q2_K,
    GGMLQuantizationType.Q3_K,
    GGMLQuantizationType.Q4_K,
    GGMLQuantizationType.Q5_K,
    GGMLQuantizationType.Q6_K,
)

# float16 bits -> float32, for every half (exact: each half is a float32)
_HALF = np.arange(1 << 16, dtype=np.uint32).astype(np.uint16).view(np.float16).astype(np.float32)


def row_bytes(qtype: GGMLQuantizationType, values: int) -> int:
    """Bytes of a row of `values` values of type `qtype` (a whole number of blocks)."""
    block, size = GGML_QUANT_SIZES[qtype]
    return values // block * size


def fits_blocks(qtype: GGMLQuantizationType, values: int) -> bool:
    """Whether a row of `values` values is a whole number of `qtype` blocks."""
    return values % GGML_QUANT_SIZES[qtype][0] == 0


@numba.njit(cache=True, inline="always")
def _half_bits(bits: np.uint32) -> np.uint16:  # pragma: no cover - compiled
    """float32 bits -> float16 bits, rounded to nearest even (numpy's cast, NaN payloads kept)."""
    sign = (bits >> 16) & 0x8000
    a = bits & 0x7FFFFFFF
    if a >= 0x7F800000:
        if a == 0x7F800000:
            return np.uint16(sign | 0x7C00)
        h = 0x7C00 + ((a & 0x7FFFFF) >> 13)
        if h == 0x7C00:
            h += 1
        return np.uint16(sign | h)
    if a < 0x38800000:  # below 2**-14: a subnormal half, or zero
        if a < 0x33000000:
            return np.uint16(sign)
        e = a >> 23
        m = (a & 0x7FFFFF) | 0x800000
        shift = 126 - e
        h = m >> shift
        rem = m & ((np.uint32(1) << shift) - 1)
        half = np.uint32(1) << (shift - 1)
        if rem > half or (rem == half and (h & 1) == 1):
            h += 1
        return np.uint16(sign | h)
    h = (a - 0x38000000) >> 13
    rem = a & 0x1FFF
    if rem > 0x1000 or (rem == 0x1000 and (h & 1) == 1):
        h += 1
    if h >= 0x7C00:
        h = np.uint32(0x7C00)
    return np.uint16(sign | h)


@numba.njit(cache=True, inline="always")
def _bf16_bits(bits: np.uint32) -> np.uint16:  # pragma: no cover - compiled
    """float32 bits -> bfloat16 bits as ggml_compute_fp32_to_bf16: NaN quiet, else nearest even."""
    if (bits & 0x7FFFFFFF) > 0x7F800000:
        return np.uint16(((bits & 0xFFFF0000) | (64 << 16)) >> 16)
    return np.uint16((np.uint64(bits) + 0x7FFF + ((bits >> 16) & 1)) >> 16)


@numba.njit(cache=True, inline="always")
def _worse(worst: np.float32, stored: np.float32, value: np.float32) -> np.float32:  # pragma: no cover
    """The larger of `worst` and the change storing `value` as `stored` made; branch-free, and a
    nan or inf change makes it nan (`change > worst` is false for nan, so nan stays)."""
    change = abs(stored - value)
    return change if change > worst else worst + change * np.float32(0)


@numba.njit(cache=True, nogil=True)
def _quantize_q8_0(x: np.ndarray, out: np.ndarray, half: np.ndarray) -> np.float32:  # pragma: no cover
    """Flat float32 values -> flat Q8_0 bytes; returns the largest change (`_worse`). The block's
    max|x| is a tree over 32 lanes (nan counts as 0, as a skipped value) and the change is kept
    per lane, so both inner loops are branch-free and vectorize; max is order-free, so the bytes
    and the change are those of a value-by-value pass."""
    cell = np.empty(1, dtype=np.float32)
    cell_bits = cell.view(np.uint32)
    lanes = np.zeros(QK, dtype=np.float32)
    mx = np.empty(QK, dtype=np.float32)
    for b in range(x.size // QK):
        i = b * QK
        for j in range(QK):
            v = abs(x[i + j])
            mx[j] = v if v > 0 else np.float32(0.0)
        k = QK // 2
        while k > 0:
            for j in range(k):
                mx[j] = mx[j + k] if mx[j + k] > mx[j] else mx[j]
            k //= 2
        d = mx[0] / np.float32(127)
        inv = np.float32(0.0) if d == 0 else np.float32(1.0) / d
        cell[0] = d
        h = _half_bits(cell_bits[0])
        dh = half[h]
        o = b * 34
        out[o] = np.uint8(h & 0xFF)
        out[o + 1] = np.uint8(h >> 8)
        for j in range(QK):
            xv = x[i + j]
            v = xv * inv
            a = abs(v)
            fl = np.floor(a)
            q = np.int32(np.copysign(fl + np.floor(np.float32(2) * (a - fl)), v)) & 0xFF  # half away from 0
            out[o + 2 + j] = np.uint8(q)
            lanes[j] = _worse(lanes[j], np.float32(np.int8(q)) * dh, xv)
    worst = np.float32(0.0)
    for j in range(QK):
        worst = _worse(worst, lanes[j], np.float32(0.0))
    return worst


@numba.njit(cache=True, nogil=True)
def _quantize_q4_0(x: np.ndarray, out: np.ndarray, half: np.ndarray, err: np.ndarray) -> None:  # pragma: no cover
    rows, n = x.shape
    nb = n // QK
    cell = np.empty(1, dtype=np.float32)
    cell_bits = cell.view(np.uint32)
    for r in range(rows):
        worst = np.float32(0.0)
        for b in range(nb):
            vmax = x[r, b * QK]  # the first of the largest magnitudes, as argmax picks it
            amax = abs(vmax)
            for j in range(1, QK):
                v = x[r, b * QK + j]
                if abs(v) > amax:
                    amax = abs(v)
                    vmax = v
            d = vmax / np.float32(-8)
            inv = np.float32(0.0) if d == 0 else np.float32(1.0) / d
            cell[0] = d
            h = _half_bits(cell_bits[0])
            dh = half[h]
            o = b * 18
            out[r, o] = np.uint8(h & 0xFF)
            out[r, o + 1] = np.uint8(h >> 8)
            for j in range(QK // 2):
                lo = min(15, max(0, int(np.trunc(x[r, b * QK + j] * inv + np.float32(8.5)))))
                hi = min(15, max(0, int(np.trunc(x[r, b * QK + j + QK // 2] * inv + np.float32(8.5)))))
                out[r, o + 2 + j] = np.uint8(lo | (hi << 4))
                worst = _worse(worst, dh * np.float32(lo - 8), x[r, b * QK + j])
                worst = _worse(worst, dh * np.float32(hi - 8), x[r, b * QK + j + QK // 2])
        err[r] = worst


@numba.njit(cache=True, nogil=True)
def _to_half(x: np.ndarray, out: np.ndarray, brain: bool) -> None:  # pragma: no cover - compiled
    rows, n = x.shape
    for r in range(rows):
        bits = x[r].view(np.uint32)
        for j in range(n):
            out[r, j] = _bf16_bits(bits[j]) if brain else _half_bits(bits[j])


def _in_pieces(rows: int, values: int, work: Callable[[tuple[int, int]], float]) -> list[float]:
    """work((begin, end)) over `rows` rows of `values` values each: one piece per CPU on threads
    when there are more than `_PIECE_VALUES` values, else one call."""
    pieces = min(cpu_count(), rows * values // _PIECE_VALUES)
    if pieces <= 1:
        return [work((0, rows))]
    return list(in_parallel(row_blocks(rows, -(-rows // pieces)), work, pieces))


def quantize_rows(values: np.ndarray, qtype: GGMLQuantizationType) -> np.ndarray:
    """Rows of float32 values as the bytes of `qtype` rows, (rows, row_bytes) uint8."""
    return quantize_measured(values, qtype)[0]


def quantize_measured(values: np.ndarray, qtype: GGMLQuantizationType) -> tuple[np.ndarray, float]:
    """`quantize_rows`, and the largest change it made to a value (inf when a value is or became
    inf or nan: a Q8_0/Q4_0 block with one is all nan, as is one whose scale overflows float16);
    for Q8_0 and Q4_0 measured in the same pass."""
    x = np.ascontiguousarray(values, dtype=np.float32)
    rows, n = x.shape
    if qtype == GGMLQuantizationType.F32:
        return x.view(np.uint8), 0.0
    if qtype in (GGMLQuantizationType.F16, GGMLQuantizationType.BF16):
        half = np.empty((rows, n), dtype=np.uint16)
        _to_half(x, half, qtype == GGMLQuantizationType.BF16)
        return half.view(np.uint8), largest_change(x, half.view(np.uint8), qtype)
    if qtype not in (GGMLQuantizationType.Q8_0, GGMLQuantizationType.Q4_0):
        raise ValueError(f"engram does not write {qtype.name}")
    out = np.empty((rows, row_bytes(qtype, n)), dtype=np.uint8)

    def piece(part: tuple[int, int]) -> float:
        a, b = part
        if qtype == GGMLQuantizationType.Q8_0:
            return float(_quantize_q8_0(x[a:b].reshape(-1), out[a:b].reshape(-1), _HALF))
        err = np.zeros(b - a, dtype=np.float32)
        _quantize_q4_0(x[a:b], out[a:b], _HALF, err)
        return float(err.max()) if b > a else 0.0

    changes = _in_pieces(rows, n, piece)
    worst = max(changes) if all(np.isfinite(changes)) else float("inf")
    return out, worst if np.isfinite(worst) else float("inf")


@numba.njit(cache=True, inline="always")
def _half_at(row: np.ndarray, o: int, half: np.ndarray) -> np.float32:  # pragma: no cover - compiled
    return half[np.int64(row[o]) | (np.int64(row[o + 1]) << 8)]


@numba.njit(cache=True, nogil=True)
def _dequantize(kind: int, src: np.ndarray, out: np.ndarray, half: np.ndarray) -> None:  # pragma: no cover
    rows, n = out.shape
    for r in range(rows):
        row = src[r]
        y = out[r]
        if kind == 0:  # F32
            y[:] = row.view(np.float32)
        elif kind == 1:  # F16
            for j in range(n):
                y[j] = _half_at(row, 2 * j, half)
        elif kind == 30:  # BF16
            bits = y.view(np.uint32)
            for j in range(n):
                bits[j] = (np.uint32(row[2 * j]) << 16) | (np.uint32(row[2 * j + 1]) << 24)
        elif kind == 8:  # Q8_0
            for b in range(n // QK):
                o = b * 34
                d = _half_at(row, o, half)
                for j in range(QK):
                    y[b * QK + j] = np.float32(np.int8(row[o + 2 + j])) * d
        elif kind == 2:  # Q4_0
            for b in range(n // QK):
                o = b * 18
                d = _half_at(row, o, half)
                for j in range(QK // 2):
                    q = row[o + 2 + j]
                    y[b * QK + j] = d * np.float32(np.int32(q & 0xF) - 8)
                    y[b * QK + j + QK // 2] = d * np.float32(np.int32(q >> 4) - 8)
        elif kind == 10:  # Q2_K: scales[16], qs[64], d, dmin
            for b in range(n // QK_K):
                o = b * 84
                d = _half_at(row, o + 80, half)
                dmin = _half_at(row, o + 82, half)
                for e in range(QK_K):
                    sc = row[o + e // 16]
                    dl = d * np.float32(sc & 0xF)
                    ml = dmin * np.float32(sc >> 4)
                    q = (row[o + 16 + (e // 128) * 32 + e % 32] >> (2 * ((e // 32) % 4))) & 3
                    y[b * QK_K + e] = dl * np.float32(q) - ml
        elif kind == 11:  # Q3_K: hmask[32], qs[64], scales[12], d
            for b in range(n // QK_K):
                o = b * 110
                d = _half_at(row, o + 108, half)
                for g in range(16):
                    lo = (row[o + 96 + g % 8] >> (4 * (g // 8))) & 0xF
                    hi = (row[o + 104 + g % 4] >> (2 * (g // 4))) & 3
                    dl = d * np.float32(np.int32(lo | (hi << 4)) - 32)
                    for k in range(16):
                        e = g * 16 + k
                        ql = (row[o + 32 + (e // 128) * 32 + e % 32] >> (2 * ((e // 32) % 4))) & 3
                        qh = (row[o + e % 32] >> (e // 32)) & 1
                        y[b * QK_K + e] = dl * np.float32(np.int32(ql) - (np.int32(qh ^ 1) << 2))
        elif kind == 12 or kind == 13:  # Q4_K / Q5_K: d, dmin, scales[12], (qh[32],) qs[128]
            size = 144 if kind == 12 else 176
            qs_at = 16 if kind == 12 else 48
            for b in range(n // QK_K):
                o = b * size
                d = _half_at(row, o, half)
                dmin = _half_at(row, o + 2, half)
                for g in range(8):
                    if g < 4:
                        sc = row[o + 4 + g] & 0x3F
                        m = row[o + 8 + g] & 0x3F
                    else:
                        sc = (row[o + 12 + g - 4] & 0xF) | ((row[o + 4 + g - 4] >> 2) & 0x30)
                        m = (row[o + 12 + g - 4] >> 4) | ((row[o + 8 + g - 4] >> 2) & 0x30)
                    dd = d * np.float32(sc)
                    dm = dmin * np.float32(m)
                    for k in range(32):
                        q = (row[o + qs_at + (g // 2) * 32 + k] >> (4 * (g % 2))) & 0xF
                        if kind == 13:
                            q |= ((row[o + 16 + k] >> g) & 1) << 4
                        y[b * QK_K + g * 32 + k] = dd * np.float32(q) - dm
        elif kind == 14:  # Q6_K: ql[128], qh[64], scales[16] int8, d
            for b in range(n // QK_K):
                o = b * 210
                d = _half_at(row, o + 208, half)
                for g in range(16):
                    dl = d * np.float32(np.int8(row[o + 192 + g]))
                    for k in range(16):
                        e = g * 16 + k
                        i = e // 128
                        ql = (row[o + i * 64 + e % 64] >> (4 * ((e // 64) % 2))) & 0xF
                        qh = (row[o + 128 + i * 32 + e % 32] >> (2 * ((e // 32) % 4))) & 3
                        y[b * QK_K + e] = dl * np.float32(np.int32(ql | (qh << 4)) - 32)


@numba.njit(cache=True, nogil=True)
def _dequantize_q8_0(src: np.ndarray, y: np.ndarray, half: np.ndarray) -> None:  # pragma: no cover
    """Flat Q8_0 bytes -> flat float32: `_dequantize`'s Q8_0 products, with a vectorizing inner loop."""
    for b in range(y.size // QK):
        o = b * 34
        d = _half_at(src, o, half)
        for j in range(QK):
            y[b * QK + j] = np.float32(np.int8(src[o + 2 + j])) * d


def dequantize_rows(data: np.ndarray, qtype: GGMLQuantizationType, values: int) -> np.ndarray:
    """`qtype` rows, (rows, row_bytes) uint8, as float32 (rows, values)."""
    if qtype not in READ_TYPES:
        raise ValueError(f"engram does not read {qtype.name}")
    src = np.ascontiguousarray(data, dtype=np.uint8).reshape(-1, row_bytes(qtype, values))
    out = np.empty((src.shape[0], values), dtype=np.float32)

    def piece(part: tuple[int, int]) -> float:
        a, b = part
        if qtype == GGMLQuantizationType.Q8_0:
            _dequantize_q8_0(src[a:b].reshape(-1), out[a:b].reshape(-1), _HALF)
        else:
            _dequantize(int(qtype), src[a:b], out[a:b], _HALF)
        return 0.0

    _in_pieces(len(src), values, piece)
    return out


@numba.njit(cache=True, nogil=True)
def _largest_difference(x: np.ndarray, y: np.ndarray) -> float:  # pragma: no cover - compiled
    rows, n = x.shape
    best = np.zeros(rows, dtype=np.float32)
    for r in range(rows):
        m = np.float32(0.0)
        for j in range(n):
            d = abs(y[r, j] - x[r, j])
            if not np.isfinite(d):
                m = np.float32(np.inf)
            elif d > m:
                m = d
        best[r] = m
    return float(best.max()) if rows else 0.0


def largest_change(values: np.ndarray, data: np.ndarray, qtype: GGMLQuantizationType) -> float:
    """The largest change that storing float32 `values` as `data` (`qtype` rows) made to a value;
    inf when a value is or became inf or nan (a block with one is all nan, or its scale overflowed)."""
    x = np.ascontiguousarray(values, dtype=np.float32)
    return _largest_difference(x, dequantize_rows(data, qtype, x.shape[1]))
