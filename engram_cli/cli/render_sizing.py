"""The rich report of `engram inspect`'s sizing: what the statistics were computed with, the
growth of distinct n-grams, the predicted counts at the training run's tokens and the sized heads."""

from __future__ import annotations

from typing import TYPE_CHECKING

from rich.console import Console
from rich.table import Table

from ..helpers import human_bytes, pct

if TYPE_CHECKING:
    from ..inspection import InspectReport
    from ..sizing import Sizing


def render_projection(report: InspectReport, console: Console) -> None:
    """The tokenizer and projection the statistics were computed with."""
    p = report.projection
    tokenizer = p.metadata.get("tokenizer_source") or "unknown tokenizer"
    console.print(
        f"[bold]counted with[/]: {tokenizer}; projection {p.compressed_size:,} canonical ids "
        f"(of {p.vocab_size:,}), fingerprint {p.fingerprint()[:12]}"
    )


def render_sizing(report: InspectReport, console: Console) -> None:
    """Growth, predicted distinct n-grams and, with a target or budget, the sized tables."""
    from .render import print_table

    sizing = report.sizing
    assert sizing is not None
    growth = report.growth or {}
    title = f"Distinct n-grams at {sizing.train_tokens:,} training tokens ({sizing.law} fit to the growth)"
    table = Table(title=title)
    for column in ("n", "sample tokens", "sample distinct", "predicted", "range", "head rows", "weighted", "all heads"):
        table.add_column(column, justify="right")
    for n, order in sizing.orders.items():
        last = growth[n][-1] if growth.get(n) else None
        p = order.prediction
        table.add_row(
            str(n),
            f"{last.tokens:,}" if last else "-",
            f"{last.distinct:,}" if last else "-",
            f"{p.distinct:,}",
            f"{p.low:,} .. {p.high:,}",
            ", ".join(f"{m:,}" for m in order.head_rows),
            pct(order.weighted_rate),
            pct(order.all_heads_rate),
        )
    print_table(console, table)
    if sizing.sized:
        _render_tables(sizing, console)
    if sizing.plot:
        console.print(f"wrote {sizing.plot}")


def _render_tables(sizing: Sizing, console: Console) -> None:
    from ..sizing import table_sizes
    from .render import print_table

    aim = (
        f"target {sizing.target} rate {pct(sizing.target_rate)}"
        if sizing.target_rate is not None
        else f"budget {human_bytes(sizing.max_table_bytes or 0)}"
    )
    table = Table(title=f"Tables for {aim}: sized beside spec {sizing.original.name}")
    sized, own = table_sizes(sizing.spec), table_sizes(sizing.original)
    dtypes = list(sized["bytes"])
    for column in ("layer", "rows", "parameters", *dtypes, f"spec {sizing.spec.dtype}"):
        table.add_column(column, justify="right")
    rows = [(layer, sized["layers"][layer], own["layers"][layer]) for layer in sized["layers"]]
    rows.append(("total", sized, own))
    for name, new, old in rows:
        table.add_row(
            str(name),
            f"{new['rows']:,}",
            f"{new['parameters']:,}",
            *(human_bytes(new["bytes"][d]) for d in dtypes),
            human_bytes(old["bytes"][sizing.spec.dtype]),
        )
    print_table(console, table)
    console.print(f"engram_vocab_size = {list(sizing.spec.engram_vocab_size)}")
    if sizing.written:
        console.print(f"wrote {sizing.written}")
