"""`engram inspect --traffic` options as typed: sizes parsed, combinations checked, one line each."""

from __future__ import annotations

from pathlib import Path

from ..checkpoints.safetensors_format import parse_size
from ..errors import EngramError, UsageError
from ..traffic.statistics import DEFAULT_CACHE_SIZES, TrafficOptions


def _size(text: str, option: str) -> int:
    try:
        return parse_size(text.strip())
    except EngramError as exc:
        raise UsageError(f"{option}: {exc}") from None


def traffic_options(
    traffic: bool, cache_sizes: str | None, hot_rows: Path | None, hot_bytes: str | None
) -> TrafficOptions | None:
    """The `TrafficOptions` of --traffic, --cache-sizes 1GiB,8GiB, --hot-rows and --hot-bytes (None
    without --traffic; its options without it are refused)."""
    if not traffic:
        given = [name for name, value in (("--cache-sizes", cache_sizes), ("--hot-rows", hot_rows)) if value]
        given += ["--hot-bytes"] if hot_bytes is not None else []
        if given:
            raise UsageError(f"{', '.join(given)} describe row traffic: add --traffic")
        return None
    if hot_bytes is not None and hot_rows is None:
        raise UsageError("--hot-bytes cuts the hot-rows file: add --hot-rows OUT.safetensors")
    sizes = DEFAULT_CACHE_SIZES
    if cache_sizes is not None:
        sizes = tuple(dict.fromkeys(_size(piece, "--cache-sizes") for piece in cache_sizes.split(",")))
    return TrafficOptions(
        cache_sizes=sizes,
        hot_rows=hot_rows is not None,
        hot_bytes=None if hot_bytes is None else _size(hot_bytes, "--hot-bytes"),
    )
