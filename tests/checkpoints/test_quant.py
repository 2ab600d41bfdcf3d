"""fp8 E4M3 block quantization against a brute-force definition written here from the formats."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from engram_cli.checkpoints.fp8 import QuantError, dequantize, gather_dequantize, quantize
from engram_cli.checkpoints.fp8_format import BLOCK
from engram_cli.errors import EngramError
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays


def e4m3_value(code: int) -> float:
    """OCP E4M3 (fn): bias 7, no infinities, S.1111.111 is NaN, max 448."""
    sign = -1.0 if code & 0x80 else 1.0
    exponent, mantissa = (code >> 3) & 0xF, code & 0x7
    if exponent == 0:
        return sign * mantissa / 8 * 2.0**-6
    return sign * (1 + mantissa / 8) * 2.0 ** (exponent - 7)


POSITIVE = [(code, e4m3_value(code)) for code in range(0x7F)]  # 0x7F is NaN


def brute_e4m3(y: float) -> int:
    """Nearest finite E4M3 code, ties to the even code, sign kept (as IEEE rounding does)."""
    magnitude = abs(y)
    best = min(POSITIVE, key=lambda cv: (abs(cv[1] - magnitude), cv[0] & 1))
    return best[0] | (0x80 if math.copysign(1.0, y) < 0 else 0)


def brute_exponent(amax: float) -> int:
    for k in range(-127, 128):
        if amax <= 448.0 * 2.0**k:
            return k
    raise AssertionError("no E8M0 scale holds this block")


def brute_quantize(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    rows, dim = x.shape
    codes = np.zeros((rows, dim), dtype=np.uint8)
    scales = np.zeros((rows, dim // BLOCK), dtype=np.uint8)
    for r in range(rows):
        for b in range(dim // BLOCK):
            block = [float(v) for v in x[r, b * BLOCK : (b + 1) * BLOCK]]
            k = brute_exponent(max(abs(v) for v in block))
            scales[r, b] = k + 127
            for i, v in enumerate(block):
                codes[r, b * BLOCK + i] = brute_e4m3(v * 2.0**-k)
    return codes, scales


finite32 = st.floats(width=32, allow_nan=False, allow_infinity=False)
wide_blocks = st.integers(1, 3).flatmap(
    lambda rows: st.sampled_from([BLOCK, 2 * BLOCK]).flatmap(
        lambda dim: arrays(np.float32, (rows, dim), elements=finite32)
    )
)


def scaled_normals(seed: int, rows: int, dim: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((rows, dim)) * np.exp2(rng.integers(-40, 40, (rows, 1)))
    return x.astype(np.float32)


@settings(max_examples=60, deadline=None)
@given(wide_blocks)
def test_quantize_matches_brute_force_on_any_floats(x):
    codes, scales = quantize(torch.from_numpy(x))
    expected_codes, expected_scales = brute_quantize(x)
    assert np.array_equal(scales.view(torch.uint8).numpy(), expected_scales)
    assert np.array_equal(codes.view(torch.uint8).numpy(), expected_codes)


@settings(max_examples=25, deadline=None)
@given(st.integers(0, 2**32 - 1))
def test_quantize_matches_brute_force_on_table_like_rows(seed):
    x = scaled_normals(seed, 2, 64)
    x[0, :BLOCK] = 0.0  # an all-zero block takes the smallest scale
    codes, scales = quantize(torch.from_numpy(x))
    expected_codes, expected_scales = brute_quantize(x)
    assert np.array_equal(scales.view(torch.uint8).numpy(), expected_scales)
    assert np.array_equal(codes.view(torch.uint8).numpy(), expected_codes)


@settings(max_examples=25, deadline=None)
@given(st.integers(0, 2**32 - 1), st.sampled_from([torch.bfloat16, torch.float16]))
def test_half_precision_rows_quantize_as_their_float32_values(seed, dtype):
    x = torch.from_numpy(scaled_normals(seed, 3, 96)).clamp(-6e4, 6e4).to(dtype)
    codes, scales = quantize(x, threads=2)
    expected_codes, expected_scales = brute_quantize(x.float().numpy())
    assert np.array_equal(scales.view(torch.uint8).numpy(), expected_scales)
    assert np.array_equal(codes.view(torch.uint8).numpy(), expected_codes)


def test_subnormal_blocks_and_finite_blocks_beside_inf_or_nan_match_brute_force():
    rng = np.random.default_rng(7)
    x = rng.standard_normal((4, 4 * BLOCK)).astype(np.float32)
    x[0, :BLOCK] *= np.float32(2.0**-140)  # one block of float32 subnormals in a normal row
    x[1] *= np.float32(2.0**-131)  # a row of them
    x[2, BLOCK : 2 * BLOCK] = 0.0
    x[2, BLOCK + 3] = -np.float32(2.0**-149)  # the smallest subnormal, alone in a block of zeros
    x[3, 5], x[3, BLOCK + 7] = np.inf, np.nan  # the row's other blocks are still exact
    codes, scales = quantize(torch.from_numpy(x))
    codes, scales = codes.view(torch.uint8).numpy(), scales.view(torch.uint8).numpy()
    finite = x.copy()
    finite[3, : 2 * BLOCK] = 0.0
    expected_codes, expected_scales = brute_quantize(finite)
    assert np.array_equal(scales[:3], expected_scales[:3])
    assert np.array_equal(codes[:3], expected_codes[:3])
    assert np.array_equal(scales[3, 2:], expected_scales[3, 2:])
    assert np.array_equal(codes[3, 2 * BLOCK :], expected_codes[3, 2 * BLOCK :])


@settings(max_examples=40, deadline=None)
@given(st.integers(0, 2**32 - 1), st.sampled_from([torch.float32, torch.bfloat16, torch.float16]))
def test_error_bounds_and_no_saturation(seed, dtype):
    x = torch.from_numpy(scaled_normals(seed, 8, 128)).clamp(-6e4, 6e4).to(dtype)
    error = QuantError()
    codes, scales = quantize(x, error, threads=3)
    blocks = x.float().reshape(8, -1, BLOCK)
    amax = blocks.abs().amax(-1)
    scale = scales.float()
    # no value saturates: the block max lands in [224, 448] after scaling (unless the block is 0)
    scaled_max = codes.float().reshape(blocks.shape).abs().amax(-1)
    assert bool(((amax == 0) | ((scaled_max >= 224) & (scaled_max <= 448))).all())
    assert bool((amax <= 448 * scale).all()) and bool(((amax == 0) | (amax > 224 * scale)).all())
    # each value is off by at most half a step of E4M3 (3 mantissa bits): |v| / 16 <= amax / 16
    back = dequantize(codes, scales, torch.float32).reshape(blocks.shape)
    assert bool(((blocks - back).abs() <= blocks.abs() / 16 + 2.0**-10 * scale.unsqueeze(-1)).all())
    relative = ((blocks - back).abs() / amax.clamp_min(1e-45).unsqueeze(-1)).where(amax.unsqueeze(-1) > 0, 0.0)
    assert error.max_relative == pytest.approx(float(relative.max()), rel=1e-5)
    assert error.rms_relative == pytest.approx(float(relative.double().square().mean().sqrt()), rel=1e-5)
    assert error.count == x.numel()
    assert 0 < error.rms_relative < error.max_relative <= 1 / 16


def test_representable_values_round_trip_exactly():
    codes = torch.arange(0, 0x7F, dtype=torch.uint8)
    values = codes.view(torch.float8_e4m3fn).float()
    row = torch.cat([values, -values[50:51]]).reshape(1, 4 * BLOCK)  # every finite magnitude
    for shift in (-100, -3, 0, 5, 100):
        x = torch.ldexp(row, torch.tensor(shift))
        q, s = quantize(x)
        assert torch.equal(dequantize(q, s, torch.float32), x)


def test_dequantize_any_leading_shape():
    x = torch.from_numpy(scaled_normals(1, 6, 64))
    q, s = quantize(x)
    reference = q.float() * s.float().repeat_interleave(BLOCK, dim=1)
    assert torch.equal(dequantize(q, s, torch.float32), reference)
    assert torch.equal(dequantize(q, s).view(torch.int16), reference.to(torch.bfloat16).view(torch.int16))
    rows = torch.tensor([5, 0, 5, 2])
    assert torch.equal(
        gather_dequantize(q, s, rows, threads=3).view(torch.int16), reference[rows].to(torch.bfloat16).view(torch.int16)
    )
    flat = dequantize(q, s)
    assert flat.dtype == torch.bfloat16
    assert torch.equal(dequantize(q.reshape(2, 3, 64), s.reshape(2, 3, 2)), flat.reshape(2, 3, 64))


def test_width_must_be_a_multiple_of_the_block():
    with pytest.raises(EngramError, match="multiple of 32"):
        quantize(torch.zeros(2, 48))
