"""The `engram` command: each command parses options, calls one library function, renders it."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Optional

import typer

from .errors import EngramError
from .report import emit

app = typer.Typer(
    name="engram",
    help="Build, convert and inspect the memory tables of Engram-style language models.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)

JSON_OPTION = typer.Option(False, "--json", help="Print the result as JSON on stdout.")
SPEC_HELP = "A TOML table spec, or a preset name from tables/ (demo, engram-27b, ...)."
PROJECTION_HELP = "A projection file from `engram compress-vocab` (default: embedded DeepSeek-V3)."


@app.command("compress-vocab")
def compress_vocab_command(
    tokenizer: Optional[str] = typer.Argument(
        None, help="tokenizer.json, a folder holding one, or a Hub repo id (default: embedded DeepSeek-V3)."),
    output: Path = typer.Option(..., "-o", "--output", help="Projection file to write (.safetensors)."),
    top: int = typer.Option(10, "--top", min=0, help="How many of the largest merge groups to show."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace an existing output file."),
    as_json: bool = JSON_OPTION,
) -> None:
    """Derive the vocab projection (normalized text -> canonical id) of a tokenizer."""
    from .vocab import write_projection

    emit(write_projection(tokenizer, output, overwrite=overwrite, top=top), as_json)


@app.command("plan")
def plan_command(
    spec: str = typer.Argument(..., help=SPEC_HELP),
    as_json: bool = JSON_OPTION,
) -> None:
    """Show rows, parameters and bytes of a spec, per layer and in total."""
    from .spec import PlanReport, load_spec

    emit(PlanReport(load_spec(spec)), as_json)


def main() -> None:
    """Run the CLI with every user mistake, usage errors included, as one line on stderr."""
    command = typer.main.get_command(app)
    try:
        code = command.main(prog_name="engram", standalone_mode=False)
        sys.exit(code if isinstance(code, int) else 0)
    except typer.Exit as exc:
        sys.exit(exc.exit_code)
    except typer.Abort:
        sys.stderr.write("engram: interrupted\n")
        sys.exit(130)
    except typer.TyperException as exc:  # click's usage errors, as typer vendors them
        message = exc.format_message() if hasattr(exc, "format_message") else str(exc)
        sys.stderr.write(f"engram: error: {message}\n")
        sys.exit(getattr(exc, "exit_code", 2))
    except EngramError as exc:
        sys.stderr.write(f"engram: error: {exc}\n")
        sys.exit(1)
    except KeyboardInterrupt:
        sys.stderr.write("engram: interrupted\n")
        sys.exit(130)
