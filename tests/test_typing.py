"""The public API as a user's type checker sees it: the lazily loaded names are the real classes.

The package `__init__`s load stores, checkpoints and statistics on first use through a module
`__getattr__`, which a type checker reads as `object`; their `TYPE_CHECKING` imports name the real
objects. mypy runs here on a small user script, as a user's would.
"""

from __future__ import annotations

import re
import subprocess
import sys

import pytest

from conftest import ROOT

pytestmark = pytest.mark.slow

USER_SCRIPT = """\
import engram_cli
import engram_cli.checkpoints
import engram_cli.collisions
import engram_cli.store

reveal_type(engram_cli.TableStore)
reveal_type(engram_cli.open_tables)
reveal_type(engram_cli.build_tables)
reveal_type(engram_cli.inspect)
reveal_type(engram_cli.collision_statistics)
reveal_type(engram_cli.EngramTables)
reveal_type(engram_cli.Corpus)
reveal_type(engram_cli.store.create_store)
reveal_type(engram_cli.checkpoints.import_checkpoint)
reveal_type(engram_cli.collisions.KeyCountStore)
reveal_type(engram_cli.CountOptions)
reveal_type(engram_cli.open_tables("demo.zarr"))
"""

# What each line above must reveal: the class itself, or the function's return type.
EXPECTED = [
    "-> engram_cli.store.tables.TableStore",
    "-> engram_cli.store.tables.TableStore",
    "-> engram_cli.store.build.BuildReport",
    "-> engram_cli.inspection.InspectReport",
    "engram_cli.collisions.reports.SweepPoint",
    "-> engram_cli.checkpoints.tables.EngramTables",
    "-> engram_cli.corpus.reader.Corpus",
    "-> engram_cli.store.tables.TableStore",
    "-> engram_cli.checkpoints.reports.ImportReport",
    "-> engram_cli.collisions.counting.KeyCountStore",
    "-> engram_cli.collisions.options.CountOptions",
    "engram_cli.store.tables.TableStore",
]

# engram_cli is read in full; the third-party libraries behind it are skipped (their names read as
# Any), which keeps the run to seconds and does not change what engram_cli's own names are.
MYPY_CONFIG = """\
[mypy]
ignore_missing_imports = true
follow_imports = silent
[mypy-torch.*,zarr.*,numba.*,distributed.*,dask.*,numpy.*,pyarrow.*,datasets.*,tokenizers.*,rich.*,typer.*,fsspec.*]
follow_imports = skip
"""


def test_user_type_checker_sees_the_lazy_names_as_the_real_objects(tmp_path):
    (tmp_path / "user.py").write_text(USER_SCRIPT)
    (tmp_path / "mypy.ini").write_text(MYPY_CONFIG)
    proc = subprocess.run(
        [sys.executable, "-m", "mypy", "--config-file", "mypy.ini", "--cache-dir", str(tmp_path / "cache"), "user.py"],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        env={"MYPYPATH": str(ROOT), "PATH": "/usr/bin:/bin"},
        timeout=600,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    revealed = re.findall(r'^user\.py:\d+: note: Revealed type is "(.*)"$', proc.stdout, re.MULTILINE)
    assert len(revealed) == len(EXPECTED), proc.stdout
    for line, (seen, wanted) in enumerate(zip(revealed, EXPECTED, strict=True)):
        assert "builtins.object" not in seen and wanted in seen, (line, seen)
