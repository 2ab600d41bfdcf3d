"""fp8 E4M3 tables with one E8M0 (power-of-two) scale per 32 consecutive values of a row.

This is the layout DeepSeek-V4.1-Flash ships its Engram tables in, and what vLLM and SGLang
dequantize: value = e4m3 * 2**(e8m0 - 127). The scale of a block is the smallest power of two
that keeps the block's largest magnitude within E4M3's finite range (448), so nothing saturates;
dividing by a power of two is exact, so the only error is E4M3's round-to-nearest-even.
"""

from __future__ import annotations

from dataclasses import dataclass

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


def block_exponents(amax: torch.Tensor) -> torch.Tensor:
    """Smallest k with amax <= 448 * 2**k, clamped to E8M0's range (int32).

    float64 makes the quotient exact enough: a float32 amax that is not exactly 448 * 2**k
    differs from it by at least 2**-24 relative, far more than float64's rounding.
    """
    mantissa, exponent = torch.frexp(amax.double() / E4M3_MAX)
    k = exponent - (mantissa == 0.5).to(exponent.dtype)
    k = torch.where(amax > 0, k, torch.full_like(k, _MIN_EXPONENT))
    return k.clamp(_MIN_EXPONENT, _MAX_EXPONENT).to(torch.int32)


def quantize(values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Rows (n, dim) of any float dtype -> (float8_e4m3fn (n, dim), float8_e8m0fnu (n, dim/32))."""
    rows, dim = values.shape
    check_blockable(dim)
    blocks = values.float().reshape(rows, dim // BLOCK, BLOCK)
    k = block_exponents(blocks.abs().amax(dim=-1))
    inverse = torch.ldexp(torch.ones_like(k, dtype=torch.float32), -k).unsqueeze(-1)
    quantized = (blocks * inverse).to(torch.float8_e4m3fn).reshape(rows, dim)
    scales = (k + E8M0_BIAS).to(torch.uint8).view(torch.float8_e8m0fnu)
    return quantized, scales


def dequantize(quantized: torch.Tensor, scales: torch.Tensor,
               dtype: torch.dtype = torch.bfloat16) -> torch.Tensor:
    """Inverse of `quantize` for rows of any leading shape: e4m3 * 2**(e8m0 - 127)."""
    *lead, dim = quantized.shape
    blocks = quantized.float().reshape(*lead, dim // BLOCK, BLOCK)
    return (blocks * scales.float().unsqueeze(-1)).reshape(*lead, dim).to(dtype)


@dataclass
class QuantError:
    """Running error of a quantized export, each value's error relative to its block's amax.

    Blocks whose amax is 0 quantize exactly and count as zero error.
    """

    max_relative: float = 0.0
    sum_squares: float = 0.0
    count: int = 0

    def add(self, original: torch.Tensor, quantized: torch.Tensor, scales: torch.Tensor) -> None:
        rows, dim = original.shape
        blocks = original.float().reshape(rows, dim // BLOCK, BLOCK)
        error = (blocks - dequantize(quantized, scales, torch.float32).reshape(blocks.shape)).abs()
        amax = blocks.abs().amax(dim=-1, keepdim=True)
        relative = torch.where(amax > 0, error / torch.where(amax > 0, amax, 1.0), 0.0)
        if relative.numel():
            self.max_relative = max(self.max_relative, float(relative.max()))
        self.sum_squares += float(relative.double().square().sum())
        self.count += relative.numel()

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
