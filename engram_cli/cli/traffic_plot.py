"""The `engram inspect --traffic --plot` picture of row traffic, drawn beside the collision plot.

One curve per layer: the fraction of lookups a cache of the most read rows serves, against its
bytes at the store dtype on a log axis, with the `--cache-sizes` marked. Matplotlib's Agg canvas
directly, as `plot`.
"""

from __future__ import annotations

from pathlib import Path

from matplotlib.figure import Figure

from ..helpers import human_bytes
from ..traffic.statistics import TrafficReport
from .plot import _COLORS, _save


def traffic_plot_path(plot: Path) -> Path:
    """Where the traffic figure goes beside `--plot PATH`: PATH's stem + ".traffic.png"."""
    return plot.with_name(plot.stem + ".traffic.png")


def draw_traffic(traffic: TrafficReport, spec_name: str, dtype: str, path: Path) -> None:
    """Coverage curves per layer, cache sizes marked, to a PNG at `path`."""
    fig = Figure(figsize=(8, 5), dpi=110, layout="constrained")
    ax = fig.subplots()
    for i, (layer, curve) in enumerate(sorted(traffic.curves.items())):
        if not curve:
            continue
        held, served = zip(*[(1, 0.0), *curve])
        ax.plot(held, served, color=_COLORS[i % len(_COLORS)], label=f"layer {layer}")
    sizes = [c["bytes"] for c in next(iter(traffic.layers.values())).cache] if traffic.layers else []
    for size in sizes:
        ax.axvline(size, color="0.5", linestyle=":", linewidth=1)
        ax.annotate(human_bytes(size), (size, 0.02), rotation=90, fontsize=8, color="0.35", ha="right")
    ax.set_xscale("log")
    ax.set_ylim(0, 1.01)
    ax.set_xlabel(f"cache bytes (most read rows first, {dtype})")
    ax.set_ylabel("fraction of lookups served")
    ax.grid(True, which="major", alpha=0.3)
    ax.legend(loc="lower right")
    ax.set_title(f"engram inspect --traffic: {spec_name}, coverage per layer")
    _save(fig, path)
