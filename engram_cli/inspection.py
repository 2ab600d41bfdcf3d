"""Collision statistics of Engram tables on a corpus, size sweeps, and table health.

Everything is counted exactly on the distinct n-grams of the corpus. A window (the
projected ids x[t-n+1] .. x[t], the projected pad before a document's start, exactly
what the hasher hashes) is packed into a key of one or more uint64 words; a batch of
documents maps to the distinct keys of each order with their occurrence counts, and
these partial counts merge by key. Keys are stored through an invertible multiply,
so their top bits spread them evenly over partitions: when the counts outgrow the
memory budget they spill to disk one file per partition, and each partition merges
on its own, with bounded memory and the same exact result.

Per layer, order and head size, two passes over the distinct n-grams follow: the
first counts distinct n-grams per bucket, the second flags those in a bucket with
others. An n-gram that shares its bucket in every head with one same other n-gram is
one whose mix agrees with it modulo the lcm of the head sizes (Chinese remainder
theorem); only n-grams crowded in every head can be one, so grouping those candidates
by that residue, and by the mix itself, gives `all_heads_colliding` and `mix_colliding`
exactly.
"""

from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from rich.console import Console
from rich.table import Table

from .collisions.statistics import TOP_SHOWN, LayerStats, SweepPoint, collision_statistics, layers_json
from .corpus.base import CorpusOptions, CorpusSummary, DocBatch
from .corpus.reader import Corpus
from .dtypes import DTYPE_BYTES
from .errors import EngramError
from .helpers import human_bytes, pct, plural
from .spec import TableSpec, load_spec
from .store.health import TableHealth, table_health
from .vocab import VocabProjection, resolve_projection


@dataclass
class InspectReport:
    """What `engram inspect` found: collision statistics, the size sweep, table health."""

    source: str
    spec: TableSpec
    projection: VocabProjection
    corpus: CorpusSummary | None = None
    layers: LayerStats | None = None
    sweep: list[SweepPoint] | None = None
    tables: TableHealth | None = None
    spilled_bytes: int = 0
    seconds: float = 0.0
    plot: str | None = None

    def to_json(self) -> dict[str, Any]:
        corpus = None
        if self.corpus is not None:
            corpus = {
                **self.corpus.to_json(),
                "spilled_bytes": self.spilled_bytes,
                "seconds": self.seconds,
                "warnings": self.corpus.warnings(),
            }
        return {
            "source": self.source,
            "spec": self.spec.to_dict(),
            "projection": {
                "fingerprint": self.projection.fingerprint(),
                "vocab_size": self.projection.vocab_size,
                "compressed_size": self.projection.compressed_size,
            },
            "corpus": corpus,
            "layers": None if self.layers is None else layers_json(self.layers),
            "sweep": None if self.sweep is None else [p.to_json() for p in self.sweep],
            "tables": None if self.tables is None else self.tables.to_json(),
            "plot": self.plot,
        }

    def render(self, console: Console) -> None:
        if self.tables is not None:
            _render_tables(self.tables, console)
        if self.corpus is not None:
            _render_corpus(self, console)
        if self.layers is not None:
            _render_layers(self.spec, self.layers, console)
            if any(s.top_buckets is not None for orders in self.layers.values() for s in orders.values()):
                _render_top(self.layers, console)
        if self.sweep:
            _render_sweep(self.sweep, console)
        if self.plot:
            console.print(f"wrote {self.plot}")


def _render_corpus(report: InspectReport, console: Console) -> None:
    c = report.corpus
    assert c is not None
    text = f", {human_bytes(c.text_bytes)} of text tokenized" if c.text_bytes else ""
    spilled = f"; spilled {human_bytes(report.spilled_bytes)} to disk" if report.spilled_bytes else ""
    console.print(
        f"[bold]corpus[/]: {plural(c.files, 'file')}, {plural(c.documents, 'document')}, "
        f"{plural(c.tokens, 'token')}{text}; {report.seconds:.1f} s{spilled}"
    )
    for note in c.warnings():
        console.print(f"[yellow]warning[/]: {note}")


def _render_layers(spec: TableSpec, layers: LayerStats, console: Console) -> None:
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
    console.print(table)
    console.print(
        "per head: distinct n-grams that share their bucket (mean over heads); ideal: the same "
        "under uniform hashing; windows: share of occurrences whose n-gram collides; all heads, "
        "mix: n-grams that collide with one same n-gram in every head, or in the mix itself",
        style="dim",
    )


def _render_top(layers: LayerStats, console: Console) -> None:
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
    console.print(table)


def _render_sweep(sweep: list[SweepPoint], console: Console) -> None:
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
    console.print(table)


def _render_tables(health: TableHealth, console: Console) -> None:
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
    console.print(table)
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
    console.print(layout)


def _resolve(source: str, projection: str | Path | None) -> tuple[TableSpec, VocabProjection, Any]:
    """Spec, projection and (for a STORE) the opened store of the command's first argument."""
    path = Path(source)
    if path.is_dir():
        from .store.tables import open_tables

        store = open_tables(path, allow_incomplete=True)
        stored = store.projection
        if projection is not None:
            given = resolve_projection(projection)
            if given.fingerprint() != stored.fingerprint():
                raise EngramError(
                    f"projection {projection} does not match the one store {source} was built "
                    f"with (fingerprints {given.fingerprint()[:12]} and {stored.fingerprint()[:12]})"
                )
        return store.spec, stored, store
    return load_spec(source), resolve_projection(projection), None


def inspect(
    source: str,
    *,
    projection: str | Path | None = None,
    corpus: list[str | Path] | None = None,
    options: CorpusOptions | None = None,
    sweep: list[float] | None = None,
    plot: str | Path | None = None,
    top: int = 0,
    verify: bool = False,
    memory_budget: int | None = None,
    spill_dir: str | Path | None = None,
    show_progress: bool = True,
    scheduler: str | None = None,
    dask_workers: int | None = None,
    part_ids: int | None = None,
) -> InspectReport:
    """The whole `engram inspect` job: table health of a STORE, collision statistics on a corpus.

    With `scheduler` or `dask_workers` the corpus is counted on a Dask cluster (see
    `count_on_cluster`); the numbers are the same to the last count.
    """
    from .cli.render import progress
    from .cluster import dask_client

    spec, proj, store = _resolve(source, projection)
    if verify and store is None:
        raise EngramError("--verify needs a table store, not a spec")
    if store is None and not corpus:
        raise EngramError(
            "nothing to inspect: a spec has no tables, so give --corpus PATH for collision "
            "statistics (or pass a table store)"
        )
    if (sweep or plot or top) and not corpus:
        raise EngramError("--sweep, --plot and --top describe collisions: give --corpus PATH")
    if plot is not None:
        plot = Path(plot)
        if plot.is_dir() or not plot.parent.is_dir():
            raise EngramError(f"cannot write the plot to {plot}: give a file in an existing folder")
    report = InspectReport(source=str(source), spec=spec, projection=proj)
    bar = progress(transient=True) if show_progress else None
    with bar if bar is not None else contextlib.nullcontext():
        if store is not None:
            rows = sum(store.layout(layer).rows for layer in store.layer_ids)
            task = bar.add_task("table health", total=rows) if bar is not None else None
            report.tables = table_health(store, verify, (lambda n: bar.advance(task, n)) if bar is not None else None)
        if corpus:
            started = time.perf_counter()
            reader = Corpus(list(corpus), proj, options, context=spec.max_ngram_size - 1)
            steps = len(spec.layer_ids) * len(spec.orders) * (1 + sum(f != 1 for f in sweep or []))
            reading = bar.add_task("reading corpus (bytes)", total=max(1, reader.total_bytes)) if bar else None
            counting = bar.add_task("collision statistics", total=steps) if bar else None

            def advance(_: DocBatch | None) -> None:
                if bar is not None:
                    bar.update(reading, completed=reader.bytes_done)

            def step() -> None:
                if bar is not None:
                    bar.update(reading, completed=reader.total_bytes)
                    bar.advance(counting)

            with dask_client(scheduler, dask_workers) as client:
                layers, points, spilled = collision_statistics(
                    spec,
                    proj,
                    reader,
                    factors=sweep,
                    top=top,
                    memory_budget=memory_budget,
                    spill_dir=spill_dir,
                    on_batch=advance,
                    on_statistic=step,
                    client=client,
                    part_ids=part_ids,
                )
            report.corpus, report.layers, report.sweep = reader.summary, layers, points
            report.spilled_bytes, report.seconds = spilled, time.perf_counter() - started
    if plot is not None:
        from .cli.plot import draw_collisions

        draw_collisions(report, plot)
        report.plot = str(plot)
    return report
