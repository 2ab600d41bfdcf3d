"""The package as users install it: a non-editable wheel finds its presets and runs."""

from __future__ import annotations

import os
import subprocess
import sys
import zipfile

import pytest

from conftest import ROOT

pytestmark = pytest.mark.slow


def test_wheel_holds_the_presets_and_every_package(wheel):
    names = set(zipfile.ZipFile(wheel).namelist())
    presets = {p.name for p in (ROOT / "tables").glob("*.toml")}
    assert presets and {f"engram_cli/presets/{name}" for name in presets} <= names
    packages = {p.parent.relative_to(ROOT).as_posix() for p in (ROOT / "engram_cli").rglob("__init__.py")}
    assert {f"{pkg}/__init__.py" for pkg in packages} <= names
    assert not any(name.startswith("tables/") for name in names)


def test_installed_wheel_finds_its_presets_away_from_the_checkout(wheel, tmp_path):
    """Installed into a folder of its own and run from elsewhere, so neither the checkout nor the
    editable install can serve the presets."""
    target = tmp_path / "site"
    subprocess.run(
        [sys.executable, "-m", "pip", "install", "--no-deps", "-q", "--target", str(target), str(wheel)],
        check=True,
        capture_output=True,
        timeout=600,
    )
    script = (
        "import engram_cli, engram_cli.spec as s, sys; "
        "assert engram_cli.__file__.startswith(sys.argv[1]), engram_cli.__file__; "
        "print(s.preset_names()); print(s.load_spec('engram-27b').parameters)"
    )
    env = {**os.environ, "PYTHONPATH": str(target)}
    proc = subprocess.run(
        [sys.executable, "-c", script, str(target)], capture_output=True, text=True, env=env, cwd=tmp_path, timeout=120
    )
    assert proc.returncode == 0, proc.stderr
    names, parameters = proc.stdout.splitlines()
    assert "engram-27b" in names and "deepseek-v4.1-flash" in names
    from engram_cli.spec import load_spec

    assert int(parameters) == load_spec("engram-27b").parameters


def test_cli_and_package_start_without_torch_zarr_or_numba():
    """Every command starts by importing the CLI: the heavy libraries load only when a command's
    work needs them, so `engram --help` or `engram plan` cost a fraction of a second."""
    script = (
        "import sys, engram_cli, engram_cli.cli, engram_cli.store, engram_cli.checkpoints, engram_cli.collisions; "
        "print(sorted(m for m in ('torch', 'zarr', 'numba', 'distributed') if m in sys.modules))"
    )
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "[]"
