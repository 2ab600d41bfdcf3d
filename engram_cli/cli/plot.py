"""The `engram inspect --plot` picture: collision rate against table size, and bucket loads.

Drawn with matplotlib's Agg canvas directly (no pyplot, no display, no global state).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from matplotlib.figure import Figure

from ..collisions.reports import LayerStats
from ..dtypes import DTYPE_BYTES
from ..errors import EngramError
from ..helpers import human_bytes
from ..inspection import InspectReport
from ..output import PLOT, Output
from ..spec import TableSpec

_COLORS = ("#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#ff7f0e", "#8c564b", "#e377c2")


def _mean_rates(layers: LayerStats, order: int) -> tuple[float, float, int]:
    """Measured and ideal collision rate (mean over layers and heads), and the distinct count."""
    stats = [orders[order] for orders in layers.values()]
    measured = float(np.mean([s.mean("collision_rate") for s in stats]))
    ideal = float(np.mean([s.mean("expected_rate") for s in stats]))
    return measured, ideal, stats[0].distinct


def _ideal_curve(sizes: np.ndarray, distinct: int) -> np.ndarray:
    return -np.expm1((distinct - 1) * np.log1p(-1.0 / sizes))


def draw_collisions(report: InspectReport, path: str | Path) -> None:
    """Draw the figure of `collision_figure` to a PNG at `path` (written beside it, then renamed)."""
    _save(collision_figure(report), Path(path))


def collision_figure(report: InspectReport) -> Figure:
    """Left: collision rate per order against the size factor (measured points, ideal curve).
    Right: how many buckets hold k distinct n-grams at the spec's sizes, with the Poisson
    expectation of ideal hashing."""
    layers = report.layers
    if layers is None:
        raise EngramError("--plot needs collision statistics: give --corpus PATH")
    spec = report.spec
    orders = list(spec.orders)
    points = report.sweep or []
    factors = sorted({p.factor for p in points} | {1.0})
    by_factor = {p.factor: p.layers for p in points}
    by_factor[1.0] = layers

    fig = Figure(figsize=(13, 5.2), dpi=110, layout="constrained")
    rate_ax, load_ax = fig.subplots(1, 2, width_ratios=(1.15, 1))
    lo, hi = min(factors) / 1.6, max(factors) * 1.6
    grid = np.geomspace(lo, hi, 200)
    for i, n in enumerate(orders):
        color = _COLORS[i % len(_COLORS)]
        base_size = float(
            np.mean(
                spec.head_sizes(spec.layer_ids[0])[(n - 2) * spec.n_head_per_ngram : (n - 1) * spec.n_head_per_ngram]
            )
        )
        measured = [_mean_rates(by_factor[f], n) for f in factors]
        distinct = measured[0][2]
        rate_ax.plot(grid, 100 * _ideal_curve(base_size * grid, distinct), "--", color=color, alpha=0.55, linewidth=1.2)
        rate_ax.plot(
            factors,
            [100 * m for m, _, _ in measured],
            "o-",
            color=color,
            linewidth=2,
            label=f"{n}-grams: {distinct:,} distinct",
        )
        for f, (m, _, _) in zip(factors, measured):
            rate_ax.annotate(
                f"{100 * m:.1f}%",
                (f, 100 * m),
                textcoords="offset points",
                xytext=(6, 5) if i % 2 else (-8, -13),
                ha="left" if i % 2 else "right",
                fontsize=8,
                color=color,
            )
    rate_ax.plot([], [], "--", color="gray", label="ideal uniform hashing")
    rate_ax.set_xscale("log")
    rate_ax.set_xticks(factors, [_factor_label(f, spec) for f in factors], fontsize=8)
    rate_ax.minorticks_off()
    rate_ax.set_xlim(lo, hi)
    rate_ax.set_ylim(0, 104)
    rate_ax.set_xlabel("head sizes scaled by (table size at the spec's dtype)")
    rate_ax.set_ylabel("distinct n-grams sharing their bucket, per head (%)")
    rate_ax.set_title("Collision rate against table size", fontsize=11)
    rate_ax.grid(True, which="major", alpha=0.3)
    # Below the axes, not inside: no value label can sit under it, whatever the rates.
    rate_ax.legend(fontsize=8, loc="upper center", bbox_to_anchor=(0.5, -0.16), ncol=2, frameon=False)

    width = 0.8 / len(orders)
    top_load = 0
    for i, n in enumerate(orders):
        color = _COLORS[i % len(_COLORS)]
        heads = [h for orders_ in layers.values() for h in orders_[n].heads]
        histogram: dict[int, int] = {}
        for h in heads:
            for load, count in h.load_histogram.items():
                histogram[load] = histogram.get(load, 0) + count
        loads = np.array(sorted(histogram))
        counts = np.array([histogram[k] for k in loads], np.float64) / len(heads)
        top_load = max(top_load, int(loads.max()))
        shift = (i - (len(orders) - 1) / 2) * width
        load_ax.bar(
            loads + shift,
            counts,
            width=width,
            color=color,
            alpha=0.8,
            label=f"{n}-grams (mean over {len(heads)} heads)",
        )
        lam = layers[next(iter(layers))][n].distinct / float(np.mean([h.size for h in heads]))
        k = np.arange(0, int(loads.max()) + 1)
        poisson = np.exp(k * np.log(lam) - lam - _log_factorial(k)) if lam > 0 else (k == 0).astype(float)
        load_ax.plot(
            k + shift,
            poisson * float(np.mean([h.size for h in heads])),
            "_",
            color="black",
            markersize=7,
            markeredgewidth=1.5,
            label="ideal hashing (Poisson)" if i == 0 else None,
        )
    load_ax.set_yscale("log")
    load_ax.set_ylim(bottom=0.5)
    load_ax.set_xlabel("distinct n-grams in a bucket (load)")
    load_ax.set_ylabel("buckets per head")
    load_ax.set_title(f"Bucket loads at the sizes of {spec.name}", fontsize=11)
    load_ax.set_xticks(range(0, top_load + 1, max(1, (top_load + 1) // 12)))
    load_ax.grid(True, axis="y", alpha=0.3)
    load_ax.legend(fontsize=8)

    corpus = report.corpus
    what = f"{corpus.tokens:,} tokens, {corpus.documents:,} documents" if corpus else ""
    fig.suptitle(
        f"engram inspect: {spec.name} ({len(spec.layer_ids)} layers x {spec.heads_per_layer} heads) on {what}",
        fontsize=12,
    )
    return fig


def _factor_label(factor: float, spec: TableSpec) -> str:
    scaled = spec if factor == 1 else spec.scaled(factor)
    return f"{factor:g}x\n{human_bytes(scaled.parameters * DTYPE_BYTES[scaled.dtype])}"


def _log_factorial(k: np.ndarray) -> np.ndarray:
    from math import lgamma

    return np.array([lgamma(v + 1) for v in k])


def _save(fig: Figure, path: Path) -> None:
    """Write next to the target and rename (`output`), so a reader never sees half a PNG."""
    with Output(path, PLOT, overwrite=True).writing() as tmp, open(tmp, "wb") as handle:
        fig.savefig(handle, format="png")


def draw_sizing(report: InspectReport, path: str | Path) -> None:
    """Draw the figure of `sizing_figure` to a PNG at `path`."""
    _save(sizing_figure(report), Path(path))


def sizing_figure(report: InspectReport) -> Figure:
    """Expected collision rate of each order against the bytes of its heads (all layers): at the
    training run's predicted distinct n-grams (solid, the all-heads rate dotted) beside the
    sample's (dashed), the target as a horizontal line and the sized heads marked. The legend sits
    outside the axes, so no label covers a curve or another label."""
    sizing = report.sizing
    if sizing is None:
        raise EngramError("the sizing plot needs --train-tokens")
    spec = sizing.original
    growth = report.growth or {}
    heads = spec.n_head_per_ngram
    per_row = len(spec.layer_ids) * heads * spec.dim * DTYPE_BYTES[spec.dtype]
    fig = Figure(figsize=(11, 5.4), dpi=110, layout="constrained")
    ax = fig.add_subplot()
    for i, (n, order) in enumerate(sizing.orders.items()):
        color = _COLORS[i % len(_COLORS)]
        predicted = order.prediction.distinct
        sample = growth[n][-1].distinct if growth.get(n) else predicted
        rows = np.geomspace(max(2.0, min(sample, predicted) / 100), max(predicted, sample) * 100, 240)
        at_run = _ideal_curve(rows, predicted)
        ax.plot(rows * per_row, at_run, "-", color=color, label=f"n={n}: at {sizing.train_tokens:,} tokens")
        ax.plot(rows * per_row, at_run**heads, ":", color=color, label=f"n={n}: all {heads} heads of the order")
        ax.plot(rows * per_row, _ideal_curve(rows, sample), "--", color=color, alpha=0.6, label=f"n={n}: the sample")
        if sizing.sized:
            size = order.head_rows[0]
            ax.plot(
                [size * per_row],
                [order.weighted_rate],
                "o",
                color=color,
                markersize=8,
                label=f"n={n}: sized, {size:,} rows/head, {human_bytes(size * per_row)}",
            )
    if sizing.target_rate is not None:
        ax.axhline(
            sizing.target_rate, color="black", linewidth=1, label=f"target {sizing.target_rate:.2%} ({sizing.target})"
        )
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_ylim(1e-5, 1.2)
    ax.set_xlabel(f"bytes of one order's heads, all layers ({spec.dtype})")
    ax.set_ylabel("expected share of n-grams sharing a bucket")
    ax.grid(True, which="major", alpha=0.3)
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0), borderaxespad=0)
    ax.set_title(
        f"{spec.name}: {len(spec.layer_ids)} layers x {heads} heads per order, sized for "
        f"{sizing.train_tokens:,} training tokens",
        fontsize=11,
    )
    return fig
