"""The fp8 table format: E4M3 values with one E8M0 (power-of-two) scale per 32 consecutive values of a row.

This is the layout DeepSeek-V4.1-Flash ships its Engram tables in, and what vLLM and SGLang
dequantize: value = e4m3 * 2**(e8m0 - 127). The scale of a block is the smallest power of two
that keeps the block's largest magnitude within E4M3's finite range (448), so nothing saturates;
multiplying by a power of two is exact, so the only error is E4M3's round-to-nearest-even.
E8M0 codes 0..254 are 2**-127 .. 2**127 (255 is NaN). A (rows, dim) table has (rows, dim / 32)
scales, so dim must be a multiple of 32.
"""

from __future__ import annotations

from ..errors import EngramError

BLOCK = 32
E4M3_MAX = 448.0
E8M0_BIAS = 127
_MIN_EXPONENT = -127  # E8M0 codes 0..254 are 2**-127 .. 2**127; 255 is NaN
_MAX_EXPONENT = 127


def check_blockable(dim: int) -> None:
    """Refuse, in one line, a row width that is not a whole number of 32-value blocks."""
    if dim % BLOCK:
        raise EngramError(
            f"fp8 export needs a row width that is a multiple of {BLOCK} "
            f"(one E8M0 scale per {BLOCK} values); this table has dim {dim}"
        )
