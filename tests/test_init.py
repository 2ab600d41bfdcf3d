"""The counter-based initializer against a plain-Python statement of engram-ctr-v1."""

from __future__ import annotations

import math
import struct

import ml_dtypes
import numpy as np
import pytest
from engram_cli import init as init_module
from engram_cli.errors import EngramError
from engram_cli.init import INIT_ALGORITHM, fill_rows, generate_rows, layer_key
from engram_cli.spec import InitSpec, load_spec
from hypothesis import given, settings
from hypothesis import strategies as st

M64 = (1 << 64) - 1
G = 0x9E3779B97F4A7C15


def splitmix(z: int) -> int:
    z &= M64
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & M64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & M64
    return z ^ (z >> 31)


def brute_key(seed: int, layer: int) -> int:
    return splitmix(splitmix(seed + G) + (layer + 1) * G)


def brute_neg2ln(hi: int) -> float:
    x = float(2 * hi + 1)
    e = 0.0
    # Same exact power-of-two scaling steps as the kernel (the order matters for bit identity).
    for shift in (32, 16, 8, 4, 2, 1):
        if x >= 2.0**shift:
            x *= 2.0**-shift
            e += shift
    if x > 1.4142135623730951:
        x *= 0.5
        e += 1.0
    s = (x - 1.0) / (x + 1.0)
    s2 = s * s
    p = 1.0 / 19.0
    for k in (17, 15, 13, 11, 9, 7, 5, 3):
        p = p * s2 + 1.0 / k
    ln_m = 2.0 * s + 2.0 * s * s2 * p
    k = e - 33.0
    return -2.0 * (k * 6.93147180369123816490e-01 + (k * 1.90821492927058770002e-10 + ln_m))


def brute_sincos(t: float) -> tuple[float, float]:
    t2 = t * t
    ps = 1.0 / math.factorial(15)
    for k, sign in ((13, -1), (11, 1), (9, -1), (7, 1), (5, -1), (3, 1)):
        ps = sign / math.factorial(k) + t2 * ps
    pc = 1.0 / math.factorial(16)
    for k, sign in ((14, -1), (12, 1), (10, -1), (8, 1), (6, -1), (4, 1)):
        pc = sign / math.factorial(k) + t2 * pc
    pc = -0.5 + t2 * pc
    return t - t * t2 * ps, 1.0 + t2 * pc


def brute_pair(w: int, std: float) -> tuple[float, float]:
    hi, lo = w >> 32, w & 0xFFFFFFFF
    radius = math.sqrt(brute_neg2ln(hi)) * std
    quadrant, f = lo >> 30, lo & 0x3FFFFFFF
    upper = f >= 1 << 29
    s, c = brute_sincos(((((1 << 30) - 1 - f) if upper else f) + 0.5) * ((math.pi / 2) / 2**30))
    if upper:
        s, c = c, s
    cos, sin = [(c, s), (-s, c), (-c, -s), (s, -c)][quadrant]
    return radius * cos, radius * sin


def f32(x: float) -> float:
    return struct.unpack("<f", struct.pack("<f", x))[0]


def brute_row(spec, layer: int, row: int) -> list[float]:
    """float32 values of one row, bit-exact per the documented algorithm."""
    dim, key, init = spec.dim, brute_key(spec.seed, layer), spec.init
    if init.distribution == "zeros":
        return [0.0] * dim
    if init.distribution == "uniform":
        out = []
        for c in range(dim):
            k = splitmix(key + (row * dim + c + 1) * G) >> 11
            out.append(f32(init.bound * (float(2 * k + 1 - 2**53) * 2.0**-53)))
        return out
    pairs = (dim + 1) // 2
    out = []
    for p in range(pairs):
        out += brute_pair(splitmix(key + (row * pairs + p + 1) * G), init.std)
    return [f32(v) for v in out[:dim]]


def bf16_bits(x: float) -> int:
    bits = struct.unpack("<I", struct.pack("<f", x))[0]
    return ((bits + 0x7FFF + ((bits >> 16) & 1)) >> 16) & 0xFFFF


def small_spec(dim: int, seed: int = 0, init: InitSpec = InitSpec()):
    return load_spec("demo").replace(n_head_per_ngram=1, n_embed_per_ngram=dim, seed=seed, init=init)


inits = st.one_of(
    st.builds(InitSpec, distribution=st.just("normal"), std=st.floats(0.001, 10)),
    st.builds(InitSpec, distribution=st.just("uniform"), bound=st.floats(0.001, 10)),
    st.just(InitSpec(distribution="zeros")),
)


@settings(max_examples=60, deadline=None)
@given(
    dim=st.integers(1, 9),
    seed=st.integers(0, 2**40),
    layer=st.sampled_from([1, 3]),
    row=st.integers(0, 100_000 - 4),
    init=inits,
)
def test_kernels_match_plain_python_bit_for_bit(dim, seed, layer, row, init):
    spec = small_spec(dim, seed, init)
    rows = generate_rows(spec, layer, row, row + 3, "float32")
    for i in range(3):
        expected = np.array(brute_row(spec, layer, row + i), dtype=np.float32)
        assert rows[i].view(np.uint32).tolist() == expected.view(np.uint32).tolist()
    bf = generate_rows(spec, layer, row, row + 3, "bfloat16")
    assert bf.view(np.uint16).tolist() == [[bf16_bits(v) for v in brute_row(spec, layer, row + i)] for i in range(3)]
    half = generate_rows(spec, layer, row, row + 3, "float16")
    assert half.view(np.uint16).tolist() == rows.astype(np.float16).view(np.uint16).tolist()


@settings(max_examples=30, deadline=None)
@given(w=st.integers(0, M64))
def test_box_muller_polynomials_agree_with_libm(w):
    """The kernels' ln/sin/cos are accurate to float64 rounding, not just self-consistent."""
    a, b = brute_pair(w, 1.0)
    hi, lo = w >> 32, w & 0xFFFFFFFF
    radius = math.sqrt(-2.0 * math.log((2 * hi + 1) / 2**33))
    theta = 2 * math.pi * (lo + 0.5) / 2**32
    assert a == pytest.approx(radius * math.cos(theta), rel=1e-12, abs=1e-12)
    assert b == pytest.approx(radius * math.sin(theta), rel=1e-12, abs=1e-12)


def test_layer_key_is_splitmix_of_seed_and_layer():
    assert layer_key(7, 3) == brute_key(7, 3)
    assert len({layer_key(s, layer) for s in range(20) for layer in range(20)}) == 400


@settings(max_examples=25, deadline=None)
@given(start=st.integers(0, 5000), length=st.integers(0, 3000), block_bytes=st.sampled_from([64, 4096, 1 << 20]))
def test_values_do_not_depend_on_ranges_or_block_size(start, length, block_bytes):
    spec = small_spec(10)
    whole = generate_rows(spec, 1, 0, 8000)
    saved = init_module._BLOCK_ROWS_BYTES
    init_module._BLOCK_ROWS_BYTES = block_bytes
    try:
        part = generate_rows(spec, 1, start, start + length)
    finally:
        init_module._BLOCK_ROWS_BYTES = saved
    assert part.view(np.uint16).tobytes() == whole[start : start + length].view(np.uint16).tobytes()


def test_normal_statistics():
    spec = small_spec(64, init=InitSpec("normal", std=0.02))
    x = generate_rows(spec, 1, 0, 40_000, "float32").astype(np.float64)
    n = x.size
    assert abs(x.mean()) < 5 * 0.02 / math.sqrt(n)
    assert x.std() == pytest.approx(0.02, rel=5 * math.sqrt(2 / n))
    z = x.ravel() / 0.02
    assert np.mean(z**4) == pytest.approx(3.0, abs=0.05)  # Gaussian kurtosis
    # Kolmogorov-Smirnov distance to the normal CDF.
    z = np.sort(z[:200_000])
    cdf = 0.5 * (1 + np.vectorize(math.erf)(z / math.sqrt(2)))
    grid = np.arange(1, z.size + 1) / z.size
    assert np.max(np.abs(cdf - grid)) < 1.63 / math.sqrt(z.size)  # 1% level
    # Neighbours in a row, in a column and across pairs are uncorrelated.
    for a, b in ((x[:, 0], x[:, 1]), (x[:-1, 5], x[1:, 5]), (x[:, 2], x[:, 3])):
        assert abs(np.corrcoef(a, b)[0, 1]) < 5 / math.sqrt(a.size)


def test_uniform_statistics_and_bound():
    spec = small_spec(33, init=InitSpec("uniform", bound=0.5))
    x = generate_rows(spec, 3, 100, 30_100, "float32").astype(np.float64)
    assert np.abs(x).max() <= 0.5
    assert x.min() < -0.499 and x.max() > 0.499
    assert abs(x.mean()) < 5 * 0.5 / math.sqrt(3 * x.size)
    assert x.var() == pytest.approx(0.25 / 3, rel=0.01)
    counts, _ = np.histogram(x, bins=20, range=(-0.5, 0.5))
    expected = x.size / 20
    assert ((counts - expected) ** 2 / expected).sum() < 43.8  # chi-square, 19 dof, 0.1%


def test_zeros_and_dtypes():
    spec = small_spec(8, init=InitSpec("zeros"))
    for dtype in ("float32", "float16", "bfloat16"):
        assert not generate_rows(spec, 1, 0, 100, dtype).astype(np.float32).any()
    normal = small_spec(8)
    assert generate_rows(normal, 1, 0, 10, "bfloat16").dtype == np.dtype(ml_dtypes.bfloat16)


def test_seed_and_layer_change_every_value():
    a = generate_rows(small_spec(16, seed=0), 1, 0, 1000, "float32")
    b = generate_rows(small_spec(16, seed=1), 1, 0, 1000, "float32")
    c = generate_rows(small_spec(16, seed=0), 3, 0, 1000, "float32")
    assert (a != b).mean() > 0.99 and (a != c).mean() > 0.99


def test_fill_rows_refuses_bad_buffers_and_layers():
    spec = small_spec(8)
    with pytest.raises(ValueError):
        fill_rows(spec, 1, 0, np.empty((4, 7), np.float32))
    with pytest.raises(ValueError):
        fill_rows(spec, 1, 0, np.empty((4, 8), np.int32))
    with pytest.raises(EngramError, match="layer 2 is not in the spec"):
        generate_rows(spec, 2, 0, 4)
    assert INIT_ALGORITHM == "engram-ctr-v1"
