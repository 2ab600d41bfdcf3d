"""Quantities typed on the command line: token counts (`2e12`, `2T`, `500B`), rates (`0.05`,
`5%`) and byte sizes (`200GB`, `1.5TiB`), each refused in one line when it is not one."""

from __future__ import annotations

import math
import re

from ..errors import UsageError

# Suffixes of counts (decimal, as token counts are written: 2T tokens, 500B tokens).
_COUNT_SUFFIXES = {"": 1, "K": 10**3, "M": 10**6, "B": 10**9, "G": 10**9, "T": 10**12}

# Byte units: decimal (GB) and binary (GiB); a bare number is bytes.
_BYTE_UNITS = {
    "": 1,
    "B": 1,
    **{f"{p}B": 1000**i for i, p in enumerate("KMGTP", 1)},
    **{f"{p}IB": 1024**i for i, p in enumerate("KMGTP", 1)},
}

_NUMBER = re.compile(
    r"^\s*([0-9][0-9_,]*(?:\.[0-9]*)?(?:[eE][+-]?[0-9]+)?|\.[0-9]+(?:[eE][+-]?[0-9]+)?)\s*([A-Za-z%]*)\s*$"
)


def _split(text: str, option: str, what: str) -> tuple[float, str]:
    match = _NUMBER.match(text)
    if not match:
        raise UsageError(f"{option} takes {what}, got {text!r}")
    value = float(match.group(1).replace(",", "").replace("_", ""))
    if not math.isfinite(value):
        raise UsageError(f"{option} takes {what}, got {text!r}")
    return value, match.group(2).upper()


def parse_count(text: str, option: str = "--train-tokens") -> int:
    """A positive count of tokens: 2000000000000, 2e12, 2T, 500B, 1.5M."""
    what = "a positive number of tokens (2e12, 2T, 500B)"
    value, suffix = _split(text, option, what)
    if suffix not in _COUNT_SUFFIXES:
        raise UsageError(f"{option} takes {what}, got {text!r}")
    count = round(value * _COUNT_SUFFIXES[suffix])
    if count < 1:
        raise UsageError(f"{option} must be positive, got {text!r}")
    return count


def parse_rate(text: str, option: str = "--target-rate") -> float:
    """A rate strictly between 0 and 1: 0.05 or 5%."""
    what = "a rate between 0 and 1 (0.05 or 5%)"
    value, suffix = _split(text, option, what)
    if suffix not in ("", "%"):
        raise UsageError(f"{option} takes {what}, got {text!r}")
    rate = value / 100 if suffix == "%" else value
    if not 0 < rate < 1:
        raise UsageError(f"{option} must be between 0 and 1 (exclusive), got {text!r}")
    return rate


def parse_bytes(text: str, option: str = "--max-table-bytes") -> int:
    """A positive byte size: 200GB, 1.5TiB, 5e11."""
    what = "a positive size in bytes (200GB, 1.5TiB)"
    value, unit = _split(text, option, what)
    if unit not in _BYTE_UNITS:
        raise UsageError(f"{option} takes {what}, got {text!r}")
    size = round(value * _BYTE_UNITS[unit])
    if size < 1:
        raise UsageError(f"{option} must be positive, got {text!r}")
    return size
