"""Counter-based table initializer: every value is a pure function of its coordinates.

Algorithm "engram-ctr-v1" (recorded in every store; a change of any bit below gets a new id):

* `mix(z)` is the SplitMix64 finalizer: `z ^= z >> 30; z *= 0xBF58476D1CE4E5B9; z ^= z >> 27;
  z *= 0x94D049BB133111EB; z ^= z >> 31`, all modulo 2**64. `G = 0x9E3779B97F4A7C15`.
* Layer key: `K = mix(mix(seed + G) + (layer_id + 1) * G)`.
* Word `n` of a layer: `w(n) = mix(K + (n + 1) * G)`, SplitMix64's n-th output from state K.
  Table row `r` is the row inside the layer table (offset of its head + bucket), so a value
  depends on (seed, layer, head, bucket, column) and on nothing else: not on shards, workers,
  block sizes or where a resumed build restarted.
* normal(std): columns 2p and 2p+1 of row r share `w = w(r * ceil(dim / 2) + p)`;
  with `hi = w >> 32`, `lo = w & 0xFFFFFFFF` (Box-Muller):
  `radius = sqrt(-2 ln((2 hi + 1) / 2**33)) * std`, `theta = 2 pi (lo + 0.5) / 2**32`,
  column 2p gets `radius * cos(theta)`, column 2p+1 `radius * sin(theta)` (an odd last column
  keeps only the cosine).
* uniform(bound): column c of row r uses `w = w(r * dim + c)`:
  `bound * (2 ((w >> 11) + 0.5) / 2**53 - 1)`, inside [-bound, bound].
* zeros: 0.
* Everything is evaluated in float64 with IEEE +, -, *, / and sqrt only (no fused
  multiply-add, no libm): ln by the atanh series on a mantissa in [sqrt(1/2), sqrt(2)),
  sin and cos by Taylor polynomials on [0, pi/4] after an exact octant reduction of `lo`.
  The float64 result is rounded to float32 (nearest even), then to the table dtype
  (nearest even; bfloat16 keeps the upper 16 bits of the rounded float32).

The tests restate this definition in plain Python and compare bit for bit.
"""

from __future__ import annotations

import math

import numba
import numpy as np

from .dtypes import numpy_dtype
from .spec import TableSpec

INIT_ALGORITHM = "engram-ctr-v1"
_U = np.uint64
_MASK = (1 << 64) - 1
GAMMA = 0x9E3779B97F4A7C15
_MUL1 = 0xBF58476D1CE4E5B9
_MUL2 = 0x94D049BB133111EB
_G = _U(GAMMA)
_M1 = _U(_MUL1)
_M2 = _U(_MUL2)
_LN2_HI = 6.93147180369123816490e-01  # ln 2 split so that e * LN2_HI is exact
_LN2_LO = 1.90821492927058770002e-10
_SQRT2 = 1.4142135623730951
_QUARTER_STEP = (math.pi / 2) / 2**30  # one unit of the 30 low bits of `lo`, in radians
_BLOCK_ROWS_BYTES = 1 << 20  # float32 scratch per kernel call: stays in L2
_KERNEL = dict(nogil=True, error_model="numpy", cache=True)


NORMAL, UNIFORM = 0, 1


def mix64(z: int) -> int:
    """SplitMix64's finalizer on a Python int (the kernels inline the same steps)."""
    z &= _MASK
    z = ((z ^ (z >> 30)) * _MUL1) & _MASK
    z = ((z ^ (z >> 27)) * _MUL2) & _MASK
    return z ^ (z >> 31)


def layer_key(seed: int, layer_id: int) -> int:
    """The 64-bit stream key of one layer's table."""
    return mix64(mix64(seed + GAMMA) + (layer_id + 1) * GAMMA)


@numba.njit(inline="always")
def _mix(z):
    z = (z ^ (z >> _U(30))) * _M1
    z = (z ^ (z >> _U(27))) * _M2
    return z ^ (z >> _U(31))


@numba.njit(inline="always")
def _neg2ln(hi):
    """-2 ln((2 hi + 1) / 2**33) from exact power-of-two scaling and the atanh series."""
    x = np.float64(hi) * 2.0 + 1.0
    e = 0.0
    b = x >= 4294967296.0
    x = x * 2.3283064365386963e-10 if b else x
    e = e + 32.0 if b else e
    b = x >= 65536.0
    x = x * 1.52587890625e-05 if b else x
    e = e + 16.0 if b else e
    b = x >= 256.0
    x = x * 0.00390625 if b else x
    e = e + 8.0 if b else e
    b = x >= 16.0
    x = x * 0.0625 if b else x
    e = e + 4.0 if b else e
    b = x >= 4.0
    x = x * 0.25 if b else x
    e = e + 2.0 if b else e
    b = x >= 2.0
    x = x * 0.5 if b else x
    e = e + 1.0 if b else e
    b = x > _SQRT2
    x = x * 0.5 if b else x
    e = e + 1.0 if b else e
    s = (x - 1.0) / (x + 1.0)
    s2 = s * s
    p = 1.0 / 19.0
    p = p * s2 + 1.0 / 17.0
    p = p * s2 + 1.0 / 15.0
    p = p * s2 + 1.0 / 13.0
    p = p * s2 + 1.0 / 11.0
    p = p * s2 + 1.0 / 9.0
    p = p * s2 + 1.0 / 7.0
    p = p * s2 + 1.0 / 5.0
    p = p * s2 + 1.0 / 3.0
    ln_m = 2.0 * s + 2.0 * s * s2 * p
    k = e - 33.0
    return -2.0 * (k * _LN2_HI + (k * _LN2_LO + ln_m))


@numba.njit(inline="always")
def _sincos(t):
    """sin and cos of t in [0, pi/4] by Taylor polynomials (error below 1e-16)."""
    t2 = t * t
    ps = 1.0 / 1307674368000.0
    ps = -1.0 / 6227020800.0 + t2 * ps
    ps = 1.0 / 39916800.0 + t2 * ps
    ps = -1.0 / 362880.0 + t2 * ps
    ps = 1.0 / 5040.0 + t2 * ps
    ps = -1.0 / 120.0 + t2 * ps
    ps = 1.0 / 6.0 + t2 * ps
    sin = t - t * t2 * ps
    pc = 1.0 / 20922789888000.0
    pc = -1.0 / 87178291200.0 + t2 * pc
    pc = 1.0 / 479001600.0 + t2 * pc
    pc = -1.0 / 3628800.0 + t2 * pc
    pc = 1.0 / 40320.0 + t2 * pc
    pc = -1.0 / 720.0 + t2 * pc
    pc = 1.0 / 24.0 + t2 * pc
    pc = -0.5 + t2 * pc
    cos = 1.0 + t2 * pc
    return sin, cos


@numba.njit(inline="always")
def _box_muller(w, std):
    """(radius cos theta, radius sin theta) of one 64-bit word, octant-reduced exactly."""
    hi = w >> _U(32)
    lo = w & _U(0xFFFFFFFF)
    radius = math.sqrt(_neg2ln(hi)) * std
    quadrant = lo >> _U(30)
    f = lo & _U(0x3FFFFFFF)
    upper = f >= _U(0x20000000)
    g = _U(0x3FFFFFFF) - f if upper else f
    s0, c0 = _sincos((np.float64(g) + 0.5) * _QUARTER_STEP)
    s = c0 if upper else s0
    c = s0 if upper else c0
    odd = (quadrant & _U(1)) == _U(1)
    cos = s if odd else c
    sin = c if odd else s
    cos = -cos if (quadrant == _U(1)) | (quadrant == _U(2)) else cos
    sin = -sin if quadrant >= _U(2) else sin
    return radius * cos, radius * sin


@numba.njit(**_KERNEL)
def _normal_f32(key, row0, std, out):
    nrows, dim = out.shape
    half = dim // 2
    pairs = (dim + 1) // 2
    for i in range(nrows):
        base = key + (_U(row0 + i) * _U(pairs) + _U(1)) * _G
        row = out[i]
        for p in range(half):
            a, b = _box_muller(_mix(base + _U(p) * _G), std)
            row[2 * p] = np.float32(a)
            row[2 * p + 1] = np.float32(b)
        if dim % 2:
            a, b = _box_muller(_mix(base + _U(half) * _G), std)
            row[dim - 1] = np.float32(a)


@numba.njit(**_KERNEL)
def _uniform_f32(key, row0, bound, out):
    nrows, dim = out.shape
    for i in range(nrows):
        base = key + (_U(row0 + i) * _U(dim) + _U(1)) * _G
        row = out[i]
        for c in range(dim):
            k = _mix(base + _U(c) * _G) >> _U(11)
            centered = np.float64(np.int64(k) * 2 + 1 - 9007199254740992) * 1.1102230246251565e-16
            row[c] = np.float32(bound * centered)


@numba.njit(**_KERNEL)
def _fill_f32(dist, key, row0, param, out):
    if dist == 0:
        _normal_f32(key, row0, param, out)
    else:
        _uniform_f32(key, row0, param, out)


@numba.njit(**_KERNEL)
def _fill_bf16(dist, key, row0, param, block_rows, out):
    """Generate float32 in small blocks, round each to bfloat16 bits (nearest even)."""
    nrows, dim = out.shape
    scratch = np.empty((block_rows, dim), np.float32)
    for start in range(0, nrows, block_rows):
        n = min(block_rows, nrows - start)
        block = scratch[:n]
        _fill_f32(dist, key, row0 + start, param, block)
        bits = block.view(np.uint32)
        dest = out[start : start + n]
        for i in range(n):
            for c in range(dim):
                v = bits[i, c]
                dest[i, c] = np.uint16((v + np.uint32(0x7FFF) + ((v >> np.uint32(16)) & np.uint32(1))) >> np.uint32(16))


def _block_rows(dim: int) -> int:
    return max(1, _BLOCK_ROWS_BYTES // (4 * dim))


def fill_rows(spec: TableSpec, layer_id: int, start: int, out: np.ndarray) -> None:
    """Write rows [start, start + len(out)) of a layer table into `out` (its dtype decides the
    rounding: float32, float16 or ml_dtypes.bfloat16), without allocating a float32 copy.

    Args:
        spec: the tables (seed, width and init distribution).
        layer_id: the layer.
        start: the table row of out[0].
        out: a C-contiguous (rows, dim) array, filled.
    """
    if out.ndim != 2 or out.shape[1] != spec.dim or not out.flags.c_contiguous:
        raise ValueError(f"out must be a C-contiguous (rows, {spec.dim}) array, got {out.shape}")
    if out.dtype == numpy_dtype("bfloat16"):
        target = "bfloat16"
    elif out.dtype in (np.float32, np.float16):
        target = out.dtype.name
    else:
        raise ValueError(f"cannot initialize an array of dtype {out.dtype}")
    init = spec.init
    if init.distribution == "zeros" or out.size == 0:
        out.view(np.uint8).fill(0)
        return
    dist = NORMAL if init.distribution == "normal" else UNIFORM
    param = float(init.std if dist == NORMAL else init.bound)
    key = _U(layer_key(spec.seed, layer_id))
    if target == "float32":
        _fill_f32(dist, key, start, param, out)
    elif target == "bfloat16":
        _fill_bf16(dist, key, start, param, _block_rows(spec.dim), out.view(np.uint16))
    else:
        block = _block_rows(spec.dim)
        scratch = np.empty((block, spec.dim), np.float32)
        for lo in range(0, out.shape[0], block):
            n = min(block, out.shape[0] - lo)
            _fill_f32(dist, key, start + lo, param, scratch[:n])
            np.copyto(out[lo : lo + n], scratch[:n], casting="unsafe")


def generate_rows(spec: TableSpec, layer_id: int, start: int, stop: int, dtype: str | None = None) -> np.ndarray:
    """Rows [start, stop) of a layer table as a new array in `dtype` (default: the spec's).

    Args:
        spec: the tables (seed, width and init distribution).
        layer_id: the layer.
        start, stop: the table rows.
        dtype: the table dtype of the result.
    """
    spec.head_sizes(layer_id)  # validates the layer id
    out = np.empty((max(0, stop - start), spec.dim), dtype=numpy_dtype(dtype or spec.dtype))
    fill_rows(spec, layer_id, start, out)
    return out
