"""How command results reach people and scripts: rich on stderr, JSON on stdout, progress bars.

Every command returns one report object from the library: plain data with `to_json()`. This
module is the only place that knows how each one looks on a terminal (`render`, one function per
report type). Numbers are never cut: a table too wide for the terminal leaves out its rightmost
columns instead (`print_table`).
"""

from __future__ import annotations

import json
import math
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any, Protocol

import numpy as np
from rich.cells import cell_len
from rich.console import Console
from rich.measure import Measurement
from rich.progress import (
    BarColumn,
    Progress,
    ProgressColumn,
    Task,
    TaskID,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)
from rich.table import Column, Table
from rich.text import Text

from ..dtypes import DTYPE_BYTES
from ..hash_jobs import values_key
from ..helpers import human_bytes, paused_gc, pct, plural
from .render_sizing import render_projection, render_sizing

if TYPE_CHECKING:
    from ..checkpoints.reports import ExportReport, ImportReport
    from ..collisions.reports import LayerStats, SweepPoint
    from ..compress import CompressReport
    from ..hash_jobs import HashFileReport, HashTextReport
    from ..inspection import InspectReport
    from ..plan import PlanReport
    from ..spec import TableSpec
    from ..store.build import BuildReport
    from ..store.health import TableHealth
    from ..store.tables import VerifyReport


class Report(Protocol):
    """What every command returns: plain data that turns into JSON."""

    def to_json(self) -> dict[str, Any]:
        """The command's `--json` output."""


def stderr_console() -> Console:
    """The console of everything meant for people: stderr, so stdout stays JSON only."""
    return Console(stderr=True, highlight=False)


def finite_json(value: Any) -> Any:
    """`value` with every non-finite float written as the string "inf", "-inf" or "nan":
    JSON has no such numbers, and a bare NaN would make the whole output unparsable."""
    if isinstance(value, float | np.floating):
        number = float(value)
        if math.isfinite(number):
            return number
        return "nan" if math.isnan(number) else ("inf" if number > 0 else "-inf")
    if isinstance(value, dict):
        return {key: finite_json(item) for key, item in value.items()}
    if isinstance(value, list | tuple):
        return [finite_json(item) for item in value]
    return value


def emit(report: Report, as_json: bool) -> None:
    """Show a command's result: rich on stderr, and with `--json` the JSON on stdout (strict
    JSON: non-finite numbers as strings, see `finite_json`).

    The cyclic collector is paused meanwhile: a large report (`hash` of a long text) is hundreds
    of thousands of containers, which every collection would traverse again."""
    with paused_gc():
        render(report, stderr_console())
        if as_json:
            sys.stdout.write(json.dumps(finite_json(report.to_json()), indent=2, allow_nan=False) + "\n")
            sys.stdout.flush()


class _RichTask:
    def __init__(self, bar: Progress, task: TaskID) -> None:
        self.bar, self.task = bar, task

    def advance(self, amount: float = 1, *, note: str | None = None) -> None:
        if note is None:
            self.bar.update(self.task, advance=amount)
        else:
            self.bar.update(self.task, advance=amount, note=note)

    def update(self, completed: float, *, note: str | None = None) -> None:
        if note is None:
            self.bar.update(self.task, completed=completed)
        else:
            self.bar.update(self.task, completed=completed, note=note)


class RichProgress:
    """The library's `Progress` drawn as rich bars on stderr (nothing when stderr is no terminal)."""

    def __init__(self, bar: Progress) -> None:
        self.bar = bar

    def task(self, description: str, total: float | None = None) -> _RichTask:
        """Add a bar for one pass of the job, counting units: `1,024/4,096`."""
        return _RichTask(self.bar, self.bar.add_task(description, total=total, note="", bytes=False))

    def byte_task(self, description: str, total: float | None = None) -> _RichTask:
        """Add a bar for a pass that counts bytes, shown in decimal units: `1.2 MB/4.1 MB`."""
        return _RichTask(self.bar, self.bar.add_task(description, total=total, note="", bytes=True))


class _CountColumn(ProgressColumn):
    """Done out of total: bytes in human units for a byte task, a plain count for any other."""

    def render(self, task: Task) -> Text:
        if not task.fields.get("bytes"):
            total = "?" if task.total is None else f"{int(task.total):,}"
            return Text(f"{int(task.completed):,}/{total}", style="progress.download")
        total = "?" if task.total is None else human_bytes(task.total)
        return Text(f"{human_bytes(task.completed)}/{total}", style="progress.download")


@contextmanager
def progress_bars(*, show: bool = True, transient: bool = False) -> Iterator[RichProgress]:
    """Bars with the count, a free note (a rate), elapsed time and ETA, live for the block."""
    console = stderr_console()
    bar = Progress(
        TextColumn("[progress.description]{task.description}"),
        BarColumn(),
        _CountColumn(),
        TextColumn("{task.fields[note]}"),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
        console=console,
        transient=transient,
        disable=not (show and console.is_terminal),
    )
    with bar:
        yield RichProgress(bar)


def print_table(console: Console, table: Table) -> None:
    """Print a table without ever cutting a number: no cell wraps or ends in an ellipsis, and
    when the table is wider than the terminal its rightmost columns are left out, with a note."""

    def width(column: Column) -> int:
        cells = [column.header, *column.cells]
        return max(Measurement.get(console, console.options, cell).maximum for cell in cells) + 2  # padding

    for column in table.columns:
        column.no_wrap = True
    widths = [width(column) for column in table.columns]
    dropped = []
    while len(widths) > 1 and sum(widths) + len(widths) + 1 > console.width:  # + the borders
        widths.pop()
        dropped.append(str(table.columns.pop().header))
    console.print(table)
    _note_dropped(console, dropped[::-1])


_RENDERERS: dict[str, Callable[[Any, Console], None]] = {}


def renders(name: str) -> Callable[[Callable[[Any, Console], None]], Callable[[Any, Console], None]]:
    """Register the renderer of the report class `name`: by name, so that starting the CLI does
    not import every report's module (and with them torch, zarr and numba)."""

    def register(function: Callable[[Any, Console], None]) -> Callable[[Any, Console], None]:
        _RENDERERS[name] = function
        return function

    return register


def render(report: Report, console: Console) -> None:
    """Draw a command's report on the console with the renderer registered for its class."""
    try:
        renderer = _RENDERERS[type(report).__name__]
    except KeyError:
        raise TypeError(f"no rendering for {type(report).__name__}") from None
    renderer(report, console)


@renders("CompressReport")
def render_compress_report(report: CompressReport, console: Console) -> None:
    console.print(
        f"[bold]{report.source}[/]: {report.vocab_size:,} ids -> "
        f"{report.compressed_size:,} canonical ids "
        f"([green]{report.reduction:.2%}[/] fewer); "
        f"{report.raw_fallbacks:,} ids keyed by their raw token (partial UTF-8)"
    )
    table = Table(title=f"{len(report.top_groups)} largest merge groups")
    for column in ("canonical id", "key", "ids", "examples"):
        table.add_column(column)
    for group in report.top_groups:
        table.add_row(
            str(group["canonical_id"]),
            repr(group["key"]),
            str(group["size"]),
            " ".join(repr(e) for e in group["examples"]),
        )
    print_table(console, table)
    console.print(f"wrote {report.output}")


@renders("PlanReport")
def render_plan_report(report: PlanReport, console: Console) -> None:
    spec = report.spec
    table = Table(
        title=f"{spec.name}: {len(spec.layer_ids)} layers, orders 2..{spec.max_ngram_size}, "
        f"{spec.n_head_per_ngram} heads per order, {spec.dim} dims per head"
    )
    for column in ("layer", "rows", "parameters", *DTYPE_BYTES):
        table.add_column(column, justify="right")
    for layer in spec.layer_ids:
        info = report.layer(layer)
        table.add_row(
            str(layer),
            f"{info['rows']:,}",
            f"{info['parameters']:,}",
            *(human_bytes(b) for b in info["bytes"].values()),
        )
    table.add_row(
        "total",
        f"{spec.total_rows:,}",
        f"{spec.parameters:,}",
        *(human_bytes(spec.parameters * s) for s in DTYPE_BYTES.values()),
        style="bold",
    )
    print_table(console, table)


@renders("HashTextReport")
def render_hash_text_report(report: HashTextReport, console: Console) -> None:
    kind = values_key(report.rows)
    console.print(
        f"[bold]{len(report.tokens)}[/] tokens, spec [bold]{report.spec_name}[/], projection "
        f"{report.projection} ({report.compressed_size:,} canonical ids); "
        f"∅ = pad {report.pad_text!r} (id {report.pad_id})"
    )
    quote = json.JSONEncoder(ensure_ascii=False).encode
    texts = [  # the same in every layer's table: position, token, then each n-gram
        [str(token["position"]), quote(token["text"])]
        + ["∅ " * ngram["pads"] + quote(ngram["text"]) for ngram in token["ngrams"]]
        for token in report.tokens
    ]
    for layer in report.layers:
        layer_id = str(layer["layer_id"])
        sizes = ", ".join(f"{p:,}" for p in layer["head_sizes"])
        console.print(f"[bold]layer {layer_id}[/]: {kind} per head (head sizes {sizes})")
        headers = ["#", "token"]
        for order in layer["orders"]:
            headers += [f"{order}-gram", kind]
        rows = []
        for token, text in zip(report.tokens, texts):
            cells = text[:2]
            for ngram, ngram_text in zip(token["ngrams"], text[2:]):
                cells += [ngram_text, " ".join(map(str, ngram[kind][layer_id]))]
            rows.append(cells)
        print_grid(console, headers, rows)


def print_grid(console: Console, headers: list[str], rows: list[list[str]]) -> None:
    """`print_table`'s rules (no cell wraps, rightmost columns left out with a note when the
    terminal is too narrow) for tables of a row per token, written straight to the console's
    file as plain aligned text: a rich Table costs milliseconds a row, this microseconds. The
    first column is right-aligned, the others left-aligned."""
    widths = [max([_cells(header)] + [_cells(row[i]) for row in rows]) for i, header in enumerate(headers)]
    shown = len(widths)
    while shown > 1 and sum(widths[:shown]) + 2 * (shown - 1) > console.width:
        shown -= 1

    def line(cells: list[str]) -> str:
        padded = [" " * (widths[0] - _cells(cells[0])) + cells[0]]
        padded += [cell + " " * (width - _cells(cell)) for cell, width in zip(cells[1:shown], widths[1:shown])]
        return "  ".join(padded).rstrip()

    lines = [line(headers), "  ".join("─" * width for width in widths[:shown])]
    lines += (line(row) for row in rows)
    console.file.write("\n".join(lines) + "\n")
    console.file.flush()
    _note_dropped(console, headers[shown:])


def _cells(text: str) -> int:
    """Terminal cells a text takes (wide characters count two)."""
    return len(text) if text.isascii() else cell_len(text)


def _note_dropped(console: Console, names: list[str]) -> None:
    if names:
        console.print(
            f"[dim]({', '.join(names)}: not shown at {console.width} columns; widen the terminal or use --json)[/]"
        )


@renders("HashFileReport")
def render_hash_file_report(report: HashFileReport, console: Console) -> None:
    rate = f", {report.tokens / report.seconds / 1e6:.1f} M tokens/s" if report.seconds > 0 else ""
    console.print(
        f"hashed {report.tokens:,} tokens {tuple(report.shape)} ({report.dtype}) of {report.input} "
        f"in {report.seconds:.2f} s{rate}"
    )
    table = Table()
    for column in ("layer", "array", "shape", "heads", values_key(report.rows) + " range"):
        table.add_column(column)
    for layer in report.layers:
        span = "empty" if layer["min"] is None else f"{layer['min']:,} .. {layer['max']:,}"
        table.add_row(str(layer["layer_id"]), layer["key"], str(tuple(layer["shape"])), str(layer["shape"][-1]), span)
    print_table(console, table)
    console.print(f"wrote {report.output}")


@renders("BuildReport")
def render_build_report(report: BuildReport, console: Console) -> None:
    where = f" -> {report.store}" if report.store else ""
    table = Table(
        title=f"{'plan: ' if report.dry_run else ''}{report.spec_name}{where}, {report.dtype}, "
        f"{report.ranks} rank{'s' if report.ranks != 1 else ''} by {report.shard_by}"
    )
    for column in ("layer", "rows", "parameters", "size", "chunk rows", "shard rows", "shards"):
        table.add_column(column, justify="right")
    for layer in report.layers:
        table.add_row(
            str(layer["layer"]),
            f"{layer['rows']:,}",
            f"{layer['parameters']:,}",
            human_bytes(layer["bytes"]),
            f"{layer['chunk_rows']:,}",
            f"{layer['shard_rows']:,}",
            str(layer["shards"]),
        )
    table.add_row(
        "total", "", f"{report.parameters:,}", human_bytes(report.bytes), "", "", str(report.shards_total), style="bold"
    )
    print_table(console, table)
    if report.ranks > 1:
        first = report.layers[0]
        spans = [f"rank {r}: rows {a:,}-{b - 1:,}" for r, (a, b) in enumerate(first["partition"])]
        shown = spans if len(spans) <= 4 else spans[:2] + ["..."] + spans[-1:]
        console.print(f"layer {first['layer']} partition: " + "; ".join(shown))
    if report.dry_run:
        target = "" if not where else f"{report.action} {report.store}: "
        console.print(
            f"would {target}write {report.files} files, {human_bytes(report.bytes)}; "
            f"init {report.init['algorithm']}; nothing written"
        )
        return
    rate = human_bytes(report.bytes_written / report.seconds) + "/s" if report.seconds else "-"
    console.print(
        f"{report.action}: wrote {report.shards_written} shards, rewrote "
        f"{report.shards_repaired} bad ones, kept {report.shards_kept} good ones; "
        f"{human_bytes(report.bytes_written)} in {report.seconds:.1f} s ({rate}, "
        f"{report.parameters_per_second / 1e6:.0f} M parameters/s, {report.workers} workers); "
        f"peak RSS {human_bytes(report.peak_rss_bytes)}; "
        f"{'[green]complete[/]' if report.complete else '[red]incomplete[/]'}"
    )


@renders("VerifyReport")
def render_verify_report(report: VerifyReport, console: Console) -> None:
    console.print(
        f"{report.path}: {report.shards} shards, {human_bytes(report.bytes)} read, "
        f"every crc32c checksum matches ({report.seconds:.1f} s)"
    )


@renders("ExportReport")
def render_export_report(report: ExportReport, console: Console) -> None:
    rate = f"{human_bytes(report.bytes / report.seconds)}/s" if report.seconds else "-"
    what = (
        f"DCP checkpoint, {plural(report.shards or 0, 'row piece')} per tensor"
        + (", one tensor per head" if report.per_head else "")
        if report.target == "training"
        else "GGUF for llama.cpp"
        if report.layout == "gguf"
        else f"safetensors, {report.layout} layout"
    )
    console.print(
        f"exported {report.store} -> {report.output} ({what}): {plural(len(report.layers), 'layer')}, "
        f"{report.dtype}, {plural(len(report.files), 'file')}, {human_bytes(report.bytes)} in "
        f"{report.seconds:.1f} s ({rate})"
    )
    render_conversion(console, report.conversion)
    if report.quantization:
        q = report.quantization
        console.print(
            f"fp8 E4M3 with E8M0 scales per 32 values: error relative to the block max "
            f"{q['max_relative']:.4f} max, {q['rms_relative']:.4f} RMS"
        )
    if report.hot_tier is not None:
        tiers = ", ".join(
            f"layer {layer} {tier['rows']:,} rows ({human_bytes(tier['bytes'])})"
            for layer, tier in report.hot_tier.items()
        )
        console.print(f"hot tier: {tiers or 'no rows'}")


@renders("ImportReport")
def render_import_report(report: ImportReport, console: Console) -> None:
    console.print(
        f"imported {report.checkpoint} ({report.format}, {report.layout}) -> {report.store}: "
        f"layers {', '.join(map(str, report.layers))}, {report.source_dtype} -> {report.dtype}, "
        f"{human_bytes(report.bytes)} in {report.seconds:.1f} s"
    )
    render_conversion(console, report.conversion)
    for note in report.notes:
        console.print(f"[yellow]{note}[/]")


@renders("InspectReport")
def render_inspect_report(report: InspectReport, console: Console) -> None:
    if report.tables is not None:
        render_tables(report.tables, console)
    if report.corpus is not None:
        render_corpus(report, console)
        render_projection(report, console)
    if report.layers is not None:
        render_layers(report.spec, report.layers, console)
        if any(s.top_buckets is not None for orders in report.layers.values() for s in orders.values()):
            render_top(report.layers, console)
    if report.sweep:
        render_sweep(report.sweep, console)
    if report.traffic is not None:
        from .traffic import render_traffic

        render_traffic(report.traffic, report.spec.dtype, console)
    if report.sizing is not None:
        render_sizing(report, console)
    if report.plot:
        console.print(f"wrote {report.plot}")


def render_corpus(report: InspectReport, console: Console) -> None:
    """What was read of the corpus, and warnings about what was replaced or skipped."""
    c = report.corpus
    assert c is not None
    text = f", {human_bytes(c.text_bytes)} of text tokenized" if c.text_bytes else ""
    spilled = f"; spilled {human_bytes(report.spilled_bytes)} to disk" if report.spilled_bytes else ""
    formats = "; ".join(
        f"{name}: {plural(f['files'], 'file')}, {plural(f['documents'], 'document')}, {plural(f['tokens'], 'token')}"
        for name, f in sorted(c.formats.items())
    )
    console.print(
        f"[bold]corpus[/]: {plural(c.files, 'file')}, {plural(c.documents, 'document')}, "
        f"{plural(c.tokens, 'token')}{text}; {report.seconds:.1f} s{spilled}" + (f" ({formats})" if formats else "")
    )
    for note in c.warnings():
        console.print(f"[yellow]warning[/]: {note}")


def render_layers(spec: TableSpec, layers: LayerStats, console: Console) -> None:
    """Collisions at the head sizes of `spec`, per layer and order of `layers`, on `console`, with a legend."""
    table = Table(title=f"Collisions at the head sizes of {spec.name}")
    for column in ("layer", "n", "distinct", "per head", "ideal", "windows", "max load", "all heads", "mix"):
        table.add_column(column, justify="right")
    for layer, orders in layers.items():
        for n, s in orders.items():
            table.add_row(
                str(layer),
                str(n),
                f"{s.distinct:,}",
                pct(s.mean("collision_rate")),
                pct(s.mean("expected_rate")),
                pct(s.mean("weighted_rate")),
                str(max(h.max_load for h in s.heads)),
                f"{s.all_heads_colliding:,}",
                f"{s.mix_colliding:,}",
            )
    print_table(console, table)
    console.print(
        "per head: distinct n-grams that share their bucket (mean over heads); ideal: the same "
        "under uniform hashing; windows: share of occurrences whose n-gram collides; all heads, "
        "mix: n-grams that collide with one same n-gram in every head, or in the mix itself",
        style="dim",
    )


# N-grams shown per crowded bucket on screen (`--json` lists up to candidates.TOP_NGRAMS).
TOP_SHOWN = 4


def render_top(layers: LayerStats, console: Console) -> None:
    """The most crowded buckets and their n-grams (`--top`)."""
    rows = [(layer, n, b) for layer, orders in layers.items() for n, s in orders.items() for b in (s.top_buckets or [])]
    if not rows:
        console.print("--top: no bucket holds more than one distinct n-gram")
        return
    table = Table(title="Most crowded buckets (n-gram x occurrences)")
    for column in ("layer", "n", "head", "bucket", "load"):
        table.add_column(column, justify="right")
    table.add_column("n-grams")
    for layer, n, b in rows:
        shown = ", ".join(f"{''.join(g['tokens'])!r} x{g['count']:,}" for g in b["ngrams"][:TOP_SHOWN])
        more = b["load"] - min(len(b["ngrams"]), TOP_SHOWN)
        table.add_row(
            str(layer),
            str(n),
            str(b["head"]),
            f"{b['bucket']:,}",
            str(b["load"]),
            shown + (f", +{more} more" if more > 0 else ""),
        )
    print_table(console, table)


def render_sweep(sweep: list[SweepPoint], console: Console) -> None:
    """Collisions at every sweep factor, per order (means over layers and heads)."""
    table = Table(title="Size sweep: every head size scaled (means over layers and heads)")
    for column in ("n", "factor", "head size", "tables", "per head", "ideal", "windows", "all heads"):
        table.add_column(column, justify="right")
    orders = sorted({n for p in sweep for o in p.layers.values() for n in o})
    for n in orders:
        for point in sweep:
            stats = [o[n] for o in point.layers.values()]
            sizes = [h.size for s in stats for h in s.heads]
            table.add_row(
                str(n),
                f"{point.factor:g}x",
                f"{int(np.mean(sizes)):,}",
                human_bytes(point.spec.parameters * DTYPE_BYTES[point.spec.dtype]),
                pct(np.mean([s.mean("collision_rate") for s in stats])),
                pct(np.mean([s.mean("expected_rate") for s in stats])),
                pct(np.mean([s.mean("weighted_rate") for s in stats])),
                f"{sum(s.all_heads_colliding for s in stats):,}",
            )
        table.add_section()
    print_table(console, table)


def render_tables(health: TableHealth, console: Console) -> None:
    """Table health per head, and the layout and shards of every layer."""
    console.print(
        f"[bold]tables[/]: {health.store} ({health.dtype}, {'complete' if health.complete else '[red]incomplete[/]'})"
    )
    if health.verify is not None:
        console.print(
            f"verified {health.verify['shards']} shards, {human_bytes(health.verify['bytes'])}: every checksum matches"
        )
    table = Table(title="Table health per head")
    for column in ("layer", "order", "head", "rows", "mean", "std", "max |x|", "non-finite"):
        table.add_column(column, justify="right")
    for layer, info in health.layers.items():
        for h in info["heads"]:
            bad = h["nonfinite"]
            mean, std = ("-", "-") if h["mean"] is None else (f"{h['mean']:+.4f}", f"{h['std']:.4f}")
            rows = f"{h['size']:,}" if not h["unread_rows"] else f"{h['size'] - h['unread_rows']:,}/{h['size']:,}"
            table.add_row(
                str(layer),
                str(h["order"]),
                str(h["head"]),
                rows,
                mean,
                std,
                f"{h['max_abs']:.4f}",
                f"[red]{bad:,}[/]" if bad else "0",
            )
    print_table(console, table)
    layout = Table(title="Table layout")
    for column in ("layer", "rows", "dim", "on disk", "shards", "shard rows", "ranks", "missing"):
        layout.add_column(column, justify="right")
    for layer, info in health.layers.items():
        plan = info["shard_plan"]
        missing = len(info["missing_shards"])
        layout.add_row(
            str(layer),
            f"{info['rows']:,}",
            str(info["dim"]),
            human_bytes(info["bytes_on_disk"]),
            str(plan["shards"]),
            f"{plan['shard_rows']:,}",
            str(len(plan["partition"])),
            f"[red]{missing}[/]" if missing else "0",
        )
    print_table(console, layout)


def render_conversion(console: Console, conversion: dict[str, Any]) -> None:
    """Announce a lossy dtype change of an export or import, with its largest change."""
    if conversion["lossy"]:
        console.print(
            f"[yellow]lossy conversion {conversion['from']} -> {conversion['to']}[/]: "
            f"largest change {conversion['max_abs_error']:.3g}"
        )
