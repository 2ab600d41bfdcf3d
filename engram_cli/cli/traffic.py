"""`engram inspect --traffic` in the CLI: its options as typed (sizes parsed, combinations checked,
one line each), and its table."""

from __future__ import annotations

from pathlib import Path

from rich.console import Console
from rich.table import Table

from ..checkpoints.safetensors_format import parse_size
from ..errors import EngramError, UsageError
from ..helpers import human_bytes, pct
from ..traffic.statistics import DEFAULT_CACHE_SIZES, TrafficOptions, TrafficReport
from .render import print_table


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
    sizes: tuple[int, ...] = DEFAULT_CACHE_SIZES
    if cache_sizes is not None:
        sizes = tuple(dict.fromkeys(_size(piece, "--cache-sizes") for piece in cache_sizes.split(",")))
    return TrafficOptions(
        cache_sizes=sizes,
        hot_rows=hot_rows is not None,
        hot_bytes=None if hot_bytes is None else _size(hot_bytes, "--hot-bytes"),
    )


def render_traffic(traffic: TrafficReport, dtype: str, console: Console) -> None:
    """Per layer: lookups, rows read, rows (and bytes) for each coverage fraction, cache hit rates."""
    table = Table(title="Row traffic per layer (rows at " + dtype + ")")
    for name in ("layer", "lookups", "rows read", "coverage", "cache", "LRU", "static", "sampled"):
        table.add_column(name, justify="left" if name in ("coverage", "cache") else "right")
    for layer, stats in traffic.layers.items():
        coverage = "\n".join(
            f"{pct(c['fraction'])}: {c['rows']:,} rows, {human_bytes(c['bytes'][dtype])}" for c in stats.coverage
        )
        table.add_row(
            str(layer),
            f"{stats.lookups:,}",
            f"{stats.rows_read:,}",
            coverage,
            "\n".join(human_bytes(c["bytes"]) for c in stats.cache),
            "\n".join(pct(c["lru_hit_rate"]) for c in stats.cache),
            "\n".join(pct(c["static_hit_rate"]) for c in stats.cache),
            pct(stats.lru_sample_rate),
        )
    print_table(console, table)
    console.print(
        "LRU: one cache per layer, lookups in corpus order (sampled: the SHARDS rate of rows tracked); "
        "static: the most read rows pinned, chosen on this corpus (an upper bound for any pinned set)"
    )
    if traffic.hot_rows_path:
        console.print(f"wrote {traffic.hot_rows_path}")
    if traffic.plot:
        console.print(f"wrote {traffic.plot}")
