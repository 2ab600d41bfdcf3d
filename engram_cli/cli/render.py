"""How command results reach people and scripts: rich on stderr, JSON on stdout."""

from __future__ import annotations

import json
import sys
from typing import Any, Protocol

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn


class Report(Protocol):
    """Every command returns one: a plain data object that renders both ways."""

    def to_json(self) -> dict[str, Any]: ...

    def render(self, console: Console) -> None: ...


def stderr_console() -> Console:
    return Console(stderr=True, highlight=False)


def emit(report: Report, as_json: bool) -> None:
    report.render(stderr_console())
    if as_json:
        sys.stdout.write(json.dumps(report.to_json(), indent=2) + "\n")
        sys.stdout.flush()


def progress(*extra_columns: Any, transient: bool = False) -> Progress:
    """A progress bar on stderr, silent when stderr is not a terminal."""
    console = stderr_console()
    return Progress(
        TextColumn("[progress.description]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        *extra_columns,
        TimeElapsedColumn(),
        TimeRemainingColumn(),
        console=console,
        transient=transient,
        disable=not console.is_terminal,
    )
