"""The command line follows the habits of uv, ruff and click: `--version`; help that lists every
choice, writes arguments as `SPEC`, shows no `<bool>` on flags and marks what is required; usage
errors (a missing required option or argument, a value outside an option's choices, an unknown
option) exit 2 with one `engram: error:` line, in every command."""

from __future__ import annotations

import re
from concurrent.futures import ThreadPoolExecutor
from importlib.metadata import version
from typing import get_args

import pytest
import typer
from engram_cli.checkpoints.keys import ExportLayout, GgufQuant
from engram_cli.checkpoints.reports import ExportTarget
from engram_cli.cli.app import app
from engram_cli.corpus.base import BinDType, DocPer
from engram_cli.dtypes import InferenceDType, StoreDType
from engram_cli.store.layout import ShardBy
from typer.testing import CliRunner

from conftest import run_engram

COMMANDS = sorted(typer.main.get_command(app).commands)  # type: ignore[attr-defined]

# Every choice option and the Literal its values come from.
CHOICES = {
    "build-tables": {"--dtype": StoreDType, "--shard-by": ShardBy},
    "export": {"--for": ExportTarget, "--dtype": InferenceDType, "--layout": ExportLayout, "--quant": GgufQuant},
    "import": {"--dtype": StoreDType, "--shard-by": ShardBy},
    "inspect": {"--doc-per": DocPer, "--bin-dtype": BinDType},
}


def help_text(*args: str) -> str:
    result = CliRunner().invoke(app, [*args, "--help"], env={"COLUMNS": "300"})
    assert result.exit_code == 0, result.output
    return result.output


def test_version_prints_the_package_version():
    proc = run_engram("--version")
    assert proc.returncode == 0 and proc.stdout == f"engram {version('engram-cli')}\n", proc.stderr


@pytest.mark.parametrize("command", COMMANDS)
def test_help_lists_choices_marks_required_and_names_arguments(command):
    text = help_text(command)
    assert "<bool>" not in text
    usage = next(line for line in text.splitlines() if "Usage:" in line)
    params = typer.main.get_command(app).commands[command].params  # type: ignore[attr-defined]
    for param in params:
        if param.param_type_name == "argument":
            name = param.name.upper()
            assert (name if param.required else f"[{name}]") in usage.split(), usage
            assert "{" not in usage
        elif param.required:
            row = next(line for line in text.splitlines() if f" {param.opts[-1]} " in line)
            assert "*" in row, row
    for option, literal in CHOICES.get(command, {}).items():
        row = next(line for line in text.splitlines() if re.search(rf"\s{option}\s", line))
        assert f"<{'|'.join(get_args(literal))}>" in row, row


def test_group_help_has_no_bool_placeholder():
    text = help_text()
    assert "<bool>" not in text and "--version" in text


USAGE_ERRORS = [
    ("compress-vocab",),  # missing -o
    ("compress-vocab", "embedded:deepseek-v3", "-o", "p.safetensors", "--top", "-1"),
    ("plan",),  # missing SPEC
    ("plan", "demo", "--bogus"),
    ("hash", "hello", "--layer", "one"),
    ("build-tables", "demo"),  # missing -o (required unless --dry-run)
    ("build-tables", "demo", "-o", "t.zarr", "--dtype", "float8"),
    ("build-tables", "demo", "-o", "t.zarr", "--shard-by", "cols"),
    ("export", "t.zarr", "-o", "out"),  # missing --for
    ("export", "t.zarr", "--for", "infer", "-o", "out"),
    ("export", "t.zarr", "--for", "inference"),  # missing -o
    ("export", "t.zarr", "--for", "inference", "-o", "out", "--layout", "deepseek"),
    ("export", "t.zarr", "--for", "inference", "-o", "out", "--dtype", "int8"),
    ("import", "ckpt"),  # missing -o
    ("import", "ckpt", "-o", "back.zarr", "--dtype", "float8_e4m3fn"),
    ("import", "ckpt", "-o", "back.zarr", "--shard-by", "cols"),
    ("inspect",),  # missing SOURCE
    ("inspect", "demo", "--corpus", "x.txt", "--doc-per", "paragraph"),
    ("inspect", "demo", "--corpus", "x.bin", "--bin-dtype", "int8"),
]


def test_every_command_has_a_usage_error_case():
    assert {case[0] for case in USAGE_ERRORS} == set(COMMANDS)


def test_usage_errors_exit_2_with_one_line(tmp_path):
    with ThreadPoolExecutor(2) as pool:
        results = list(pool.map(lambda args: run_engram(*args, cwd=tmp_path), USAGE_ERRORS))
    for args, proc in zip(USAGE_ERRORS, results):
        lines = proc.stderr.strip().splitlines()
        assert proc.returncode == 2, (args, proc.stderr)
        assert len(lines) == 1 and lines[0].startswith("engram: error: "), (args, proc.stderr)
        assert "Traceback" not in proc.stderr and "Value error" not in proc.stderr
    assert not list(tmp_path.iterdir()), "a usage error wrote something"
