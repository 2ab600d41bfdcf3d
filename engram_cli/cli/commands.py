"""What each command does between parsing and rendering: option checks, resolution, the job.

Options arrive as the user typed them (preset names, file paths, a scheduler address); here they
become the typed objects the library takes (`TableSpec`, `VocabProjection`, a Dask client, rich
progress bars), and combinations that only make sense on the command line are checked with
messages that name the flags. What the library checks itself (a projection against its spec,
the inputs `inspect` needs) is left to it, so each check runs once.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from pathlib import Path

from ..checkpoints.keys import ExportLayout, GgufQuant
from ..checkpoints.model_config import is_model_config
from ..checkpoints.reports import ExportReport, ExportTarget, ImportReport
from ..collisions.options import CountOptions
from ..corpus.base import CorpusOptions
from ..dtypes import InferenceDType, StoreDType
from ..errors import EngramError, UsageError
from ..hash_jobs import HashFileReport, HashTextReport, hash_ids_file, hash_text
from ..inspection import InspectReport, inspect
from ..output import PLOT, Output
from ..sizing import SizingRequest, Target
from ..spec import load_spec, spec_text
from ..store.build import BuildReport, build_tables
from ..store.layout import ShardBy
from ..store.tables import open_tables
from ..traffic.statistics import TrafficOptions
from ..vocab import load_projection
from .cluster import dask_client
from .quantities import parse_bytes, parse_count, parse_rate
from .render import progress_bars, stderr_console


def run_hash(
    text: str | None,
    *,
    spec: str | Path = "demo",
    projection: str | Path | None = None,
    ids: str | Path | None = None,
    output: str | Path | None = None,
    layers: Iterable[int] | None = None,
    rows: bool = False,
    special_tokens: bool = True,
    overwrite: bool = False,
    positions: str | Path | None = None,
    barrier_ids: Iterable[int] | None = None,
) -> HashTextReport | HashFileReport:
    """`engram hash`: TEXT shows its n-grams; --ids FILE.npy -o OUT.npz writes arrays.

    Args:
        text: TEXT; ids, output: --ids and -o (exactly one of TEXT and --ids).
        spec, projection: --spec (a file or preset name) and --projection (a file; default: embedded).
        layers, rows, special_tokens, overwrite: --layer, --rows, --special-tokens and --overwrite.
    """
    if (text is None) == (ids is None):
        raise UsageError(
            "give either TEXT to tokenize or --ids FILE.npy, not both"
            if text is not None
            else "give TEXT to tokenize, or --ids FILE.npy with -o OUT.npz"
        )
    if ids is not None and output is None:
        raise UsageError("--ids needs -o OUT.npz, the archive to write one array per layer into")
    if text is not None and output is not None:
        raise UsageError("-o is for --ids; TEXT is shown, not written (use --json for scripts)")
    if text is not None and positions is not None:
        raise UsageError("--positions is for --ids; TEXT is one sequence")
    table_spec = load_spec(spec)
    vocab = None if projection is None else load_projection(projection)  # checked against the spec by the hasher
    chosen = None if not layers else list(layers)
    barrier = None if not barrier_ids else list(barrier_ids)
    if ids is not None:
        assert output is not None
        with progress_bars() as bars:
            return hash_ids_file(
                ids,
                output,
                table_spec,
                vocab,
                layers=chosen,
                rows=rows,
                overwrite=overwrite,
                positions=positions,
                barrier_ids=barrier,
                progress=bars,
            )
    assert text is not None
    return hash_text(
        text, table_spec, vocab, layers=chosen, rows=rows, special_tokens=special_tokens, barrier_ids=barrier
    )


def run_build(
    spec: str,
    output: str | None,
    *,
    projection: Path | None,
    shards: int | None,
    shard_by: ShardBy | None,
    workers: int | None,
    dtype: StoreDType | None,
    resume: bool,
    overwrite: bool,
    dry_run: bool,
    scheduler: str | None,
    dask_workers: int | None,
) -> BuildReport:
    """`engram build-tables`: the spec and projection by name, the cluster, progress bars.

    Args:
        spec, output, projection: SPEC (a file or preset name), -o and --projection.
        shards, shard_by, workers, dtype: --shards, --shard-by, --workers and --dtype.
        resume, overwrite, dry_run: --resume, --overwrite and --dry-run.
        scheduler, dask_workers: where the shards are built (`cluster.dask_client`).
    """
    if resume and overwrite:
        raise UsageError("--resume and --overwrite exclude each other")
    table_spec = load_spec(spec)
    vocab = None if projection is None else load_projection(projection)  # checked against the spec by build_tables
    with dask_client(scheduler, dask_workers) as client, progress_bars() as bars:
        try:
            return build_tables(
                table_spec,
                output,
                projection=vocab,
                shards=shards,
                shard_by=shard_by,
                workers=workers,
                dtype=dtype,
                resume=resume,
                overwrite=overwrite,
                dry_run=dry_run,
                client=client,
                progress=bars,
            )
        except KeyboardInterrupt:
            stderr_console().print(
                f"interrupted: {output} is incomplete; run the same command with --resume to finish it"
            )
            raise


def _size_option(text: str, option: str) -> int:
    """A size option ("1GiB", "500MB", a byte count) as bytes, or a one-line error naming it."""
    from ..checkpoints.safetensors_format import parse_size

    try:
        return parse_size(text.strip())
    except EngramError as exc:
        raise UsageError(f"{option}: {exc}") from None


def run_export(
    store: str,
    output: Path,
    *,
    target: ExportTarget,
    shards: int | None = None,
    key_template: str | None = None,
    per_head: bool = False,
    dtype: InferenceDType | None = None,
    layout: ExportLayout | None = None,
    max_shard_size: str | None = None,
    quant: GgufQuant | None = None,
    into: Path | None = None,
    overwrite: bool = False,
    scheduler: str | None = None,
    dask_workers: int | None = None,
    hot_rows: Path | None = None,
    hot_bytes: str | None = None,
) -> ExportReport:
    """`engram export`: which options go with which target, then one of the two exports.

    Args:
        store, output: STORE and -o; target: --for, "training" or "inference".
        shards, key_template, per_head, dtype: --shards, --key-template, --per-head and --dtype.
        layout, max_shard_size: --layout and --max-shard-size (inference only).
        quant, into: --quant and --into (--layout gguf only).
        overwrite: --overwrite.
        scheduler, dask_workers: where an inference export runs (`cluster.dask_client`).
        hot_rows, hot_bytes: --hot-rows and --hot-bytes (a hot tier, safetensors layouts only).
    """
    if (hot_rows is not None or hot_bytes is not None) and (target == "training" or layout == "gguf"):
        raise UsageError(
            "--hot-rows and --hot-bytes add a hot tier to --for inference of the engram or deepseek-v41 layout"
        )
    if target == "training":
        if layout is not None or max_shard_size is not None:
            raise UsageError("--layout and --max-shard-size apply to --for inference")
        if scheduler or dask_workers:
            raise UsageError(
                "--scheduler and --dask-workers apply to --for inference; "
                "a training export is written by DCP's own writer"
            )
        from ..checkpoints.dcp_export import export_training  # torch: loaded for this command only

        with progress_bars() as bars:
            return export_training(
                store,
                output,
                shards=shards,
                key_template=key_template,
                per_head=per_head,
                dtype=dtype,
                overwrite=overwrite,
                progress=bars,
            )
    if shards is not None or per_head:
        raise UsageError("--shards and --per-head apply to --for training")
    if layout == "gguf":
        if dtype is not None or max_shard_size is not None or key_template is not None:
            raise UsageError("--dtype, --max-shard-size and --key-template do not apply to --layout gguf (see --quant)")
        if scheduler or dask_workers:
            raise UsageError(
                "--scheduler and --dask-workers do not apply to --layout gguf (one file, written in order)"
            )
        from ..checkpoints.gguf_export import export_gguf

        with progress_bars() as bars:
            return export_gguf(store, output, quant=quant or "q8_0", into=into, overwrite=overwrite, progress=bars)
    if quant is not None or into is not None:
        raise UsageError("--quant and --into apply to --layout gguf")
    from ..checkpoints.safetensors_export import export_inference

    with dask_client(scheduler, dask_workers) as client, progress_bars() as bars:
        return export_inference(
            store,
            output,
            dtype=dtype,
            layout=layout or "engram",
            max_shard_size=max_shard_size or "5GB",
            key_template=key_template,
            overwrite=overwrite,
            client=client,
            progress=bars,
            hot_rows=hot_rows,
            hot_bytes=None if hot_bytes is None else _size_option(hot_bytes, "--hot-bytes"),
        )


def run_import(
    checkpoint: Path,
    output: Path,
    *,
    trust_pickle: bool,
    spec: str | None,
    projection: Path | None,
    key_template: str | None,
    layers: list[int] | None,
    dtype: StoreDType | None,
    shards: int | None,
    shard_by: ShardBy | None,
    overwrite: bool,
    allow_nonfinite: bool = False,
) -> ImportReport:
    """`engram import`: --spec and --projection by name, progress bars.

    Args:
        checkpoint, output, trust_pickle: CHECKPOINT, -o and --trust-pickle.
        spec, projection, key_template: --spec (a file or preset name), --projection and --key-template.
        layers, dtype, shards, shard_by, overwrite: --layer, --dtype, --shards, --shard-by, --overwrite.
        allow_nonfinite: --allow-nonfinite.
    """
    from ..checkpoints.importing import import_checkpoint  # torch: for this command only

    with progress_bars() as bars:
        return import_checkpoint(
            checkpoint,
            output,
            trust_pickle=trust_pickle,
            spec=None if spec is None else load_spec(spec),
            projection=None if projection is None else load_projection(projection),
            key_template=key_template,
            layers=layers,
            dtype=dtype,
            shards=shards,
            shard_by=shard_by,
            overwrite=overwrite,
            allow_nonfinite=allow_nonfinite,
            progress=bars,
        )


def run_inspect(
    source: str,
    *,
    projection: Path | None,
    corpus: list[str] | None,
    options: CorpusOptions,
    sweep: str | None,
    plot: Path | None,
    top: int,
    verify: bool,
    max_memory_mib: int | None,
    spill_dir: Path | None,
    scheduler: str | None,
    dask_workers: int | None,
    barrier_ids: list[int] | None = None,
    traffic: TrafficOptions | None = None,
    hot_rows: Path | None = None,
    sizing: SizingRequest | None = None,
) -> InspectReport:
    """`engram inspect`: a store folder or a spec name, the corpus options, the plot file.

    Args:
        source: SOURCE, a store folder, or a spec: a file, a preset name or a model's config.
        projection, corpus, options: --projection, --corpus and the corpus reading options.
        sweep, plot, top, verify: --sweep (as typed, "1,2,5"), --plot, --top and --verify.
        max_memory_mib, spill_dir: --max-memory (MiB) and --spill-dir.
        scheduler, dask_workers: where the corpus is counted (`cluster.dask_client`).
        traffic, hot_rows: --traffic and its options (`cli.traffic.traffic_options`), --hot-rows.
        sizing: what to size (`sizing_request`), or None.
    """
    if hot_rows is not None and (hot_rows.is_dir() or not hot_rows.parent.is_dir()):
        raise UsageError(f"cannot write the hot rows to {hot_rows}: give a file in an existing folder")
    if plot is not None:
        if not corpus:
            raise UsageError("--sweep, --plot and --top describe collisions: give --corpus PATH")
        Output(plot, PLOT, overwrite=True)  # refused before the corpus is read
    is_store = Path(source).is_dir() and not is_model_config(source)  # a model folder is a spec
    target = open_tables(source, allow_incomplete=True) if is_store else load_spec(source)
    vocab = None if projection is None else load_projection(projection)  # checked against the target by inspect
    with dask_client(scheduler, dask_workers) as client, progress_bars(transient=True) as bars:
        report = inspect(
            target,
            projection=vocab,
            corpus=corpus,
            options=options,
            sweep=parse_factors(sweep) if sweep else None,
            top=top,
            verify=verify,
            barrier_ids=barrier_ids or None,
            sizing=sizing,
            counting=CountOptions(
                memory_budget=max_memory_mib << 20 if max_memory_mib else None,
                spill_dir=spill_dir,
                client=client,
                progress=bars,
            ),
            traffic=traffic,
        )
    report.source = source
    if hot_rows is not None and report.traffic is not None and report.traffic.hot is not None:
        report.traffic.hot.write(hot_rows)
        report.traffic.hot_rows_path = str(hot_rows)
    if plot is not None:
        from .plot import draw_collisions

        draw_collisions(report, plot)
        report.plot = str(plot)
        if report.traffic is not None:
            from .traffic_plot import draw_traffic, traffic_plot_path

            draw_traffic(report.traffic, report.spec.name, report.spec.dtype, traffic_plot_path(plot))
            report.traffic.plot = str(traffic_plot_path(plot))
        if report.sizing is not None:
            from .plot import draw_sizing

            sized = plot.with_name(f"{plot.stem}-sizing.png")
            draw_sizing(report, sized)
            report.sizing.plot = str(sized)
    return report


def parse_factors(text: str) -> list[float]:
    """`--sweep 1,2,5,10` as positive factors, in the order given, without repeats."""
    factors: list[float] = []
    for piece in text.split(","):
        try:
            value = float(piece)
        except ValueError:
            raise UsageError(f"--sweep takes comma-separated positive numbers, got {piece.strip()!r}") from None
        if not math.isfinite(value) or value <= 0:
            raise UsageError(f"--sweep factors must be positive, got {piece.strip()!r}")
        if value not in factors:
            factors.append(value)
    return factors


def sizing_request(
    source: str,
    train_tokens: str | None,
    target_rate: str | None,
    target: Target,
    max_table_bytes: str | None,
    write_spec: Path | None,
    overwrite: bool,
) -> SizingRequest | None:
    """The sizing options of `engram inspect` as a `SizingRequest` (None without --train-tokens).

    Args:
        source: SOURCE (a spec file or preset keeps its text in a written spec).
        train_tokens, target_rate, target, max_table_bytes, write_spec, overwrite: the options as typed.
    """
    if train_tokens is None:
        if target_rate is not None or max_table_bytes is not None or write_spec is not None:
            raise UsageError("--target-rate, --max-table-bytes and --write-spec need --train-tokens N")
        return None
    if target_rate is not None and max_table_bytes is not None:
        raise UsageError("give --target-rate or --max-table-bytes, not both")
    if write_spec is not None and target_rate is None and max_table_bytes is None:
        raise UsageError("--write-spec needs --target-rate or --max-table-bytes")
    return SizingRequest(
        train_tokens=parse_count(train_tokens),
        target_rate=None if target_rate is None else parse_rate(target_rate),
        target=target,
        max_table_bytes=None if max_table_bytes is None else parse_bytes(max_table_bytes, "--max-table-bytes"),
        write_spec=write_spec,
        spec_source=None if Path(source).is_dir() else spec_text(source),
        overwrite=overwrite,
    )
