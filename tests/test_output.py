"""The one way outputs are written (`engram_cli.output`): what may be replaced, the folder checks,
the temporary beside the target, the swap into place, cleanup on every exit, stale temporaries.

The mechanism is exercised directly on real files and folders, and every writer of the CLI is
run in a subprocess into a folder it may not write, which it must refuse before writing anything.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from engram_cli.checkpoints.output import EXPORT
from engram_cli.errors import EngramError, OutputExistsError, ResourceError, UsageError
from engram_cli.output import FILE, PLOT, TMP_PREFIX, Output, temporary_name
from engram_cli.spec import TableSpec
from engram_cli.store.build import build_tables
from engram_cli.store.writer import STORE
from engram_cli.vocab import compress_vocab, load_projection

from conftest import letters_tokenizer, run_engram

SPEC = TableSpec(
    layer_ids=(1,),
    max_ngram_size=2,
    n_head_per_ngram=1,
    engram_vocab_size=(50,),
    n_embed_per_ngram=32,
    pad_id=2,
    seed=3,
    dtype="bfloat16",
    name="tiny",
)


def contents(folder: Path) -> dict[str, bytes | None]:
    """Every entry under `folder` -> its bytes (None for a folder)."""
    return {str(p.relative_to(folder)): None if p.is_dir() else p.read_bytes() for p in sorted(folder.rglob("*"))}


def old_export(folder: Path) -> Path:
    folder.mkdir()
    (folder / "model.safetensors").write_bytes(b"old")
    return folder


@pytest.mark.parametrize("failure", [RuntimeError("writer failed"), KeyboardInterrupt()])
@pytest.mark.parametrize("folder", [False, True])
def test_a_failing_writer_leaves_the_target_as_it_was_and_nothing_else(tmp_path, failure, folder):
    target = old_export(tmp_path / "out") if folder else tmp_path / "out.safetensors"
    if not folder:
        target.write_bytes(b"old")
    before = contents(tmp_path)
    with pytest.raises(type(failure)):
        with Output(target, EXPORT, overwrite=True).writing(folder=folder) as tmp:
            (tmp / "model.safetensors" if folder else tmp).write_bytes(b"half")
            raise failure
    assert contents(tmp_path) == before


def test_a_finished_output_replaces_the_old_one_whole(tmp_path):
    target = old_export(tmp_path / "out")
    (target / ".metadata").write_bytes(b"old too")
    with Output(target, EXPORT, overwrite=True).writing(folder=True) as tmp:
        (tmp / "model.safetensors").write_bytes(b"new")
        assert contents(tmp_path)["out/model.safetensors"] == b"old"  # not in place before the end
    assert contents(tmp_path) == {"out": None, "out/model.safetensors": b"new"}
    file = tmp_path / "p.safetensors"
    for data in (b"first", b"second"):
        with Output(file, FILE, overwrite=True).writing() as tmp:
            tmp.write_bytes(data)
    assert file.read_bytes() == b"second" and not list(tmp_path.glob(f"{TMP_PREFIX}*"))


def test_one_file_of_a_temporary_folder_can_be_the_output(tmp_path):
    with Output(tmp_path / "t.safetensors", EXPORT).writing(folder=True, entry="t.safetensors") as tmp:
        (tmp / "t.safetensors").write_bytes(b"tables")
    assert contents(tmp_path) == {"t.safetensors": b"tables"}


def test_what_may_be_replaced(tmp_path):
    (tmp_path / "folder").mkdir()
    (tmp_path / "file").write_bytes(b"mine")
    with pytest.raises(EngramError, match="is a directory; give a file path"):
        Output(tmp_path / "folder", FILE, overwrite=True)
    with pytest.raises(OutputExistsError, match="exists; pass --overwrite"):
        Output(tmp_path / "file", FILE)
    Output(tmp_path / "file", FILE, overwrite=True)
    with pytest.raises(OutputExistsError, match="already exists; pass --overwrite"):
        Output(old_export(tmp_path / "export"), EXPORT)
    Output(tmp_path / "export", EXPORT, overwrite=True)
    with pytest.raises(UsageError, match="a file that is not a safetensors export"):
        Output(tmp_path / "file", EXPORT, overwrite=True)
    (tmp_path / "export" / "notes.txt").write_text("keep")
    with pytest.raises(UsageError, match="'notes.txt', which no export writes"):
        Output(tmp_path / "export", EXPORT, overwrite=True)
    (tmp_path / "link").symlink_to(tmp_path / "folder")
    with pytest.raises(UsageError, match="symbolic link"):
        Output(tmp_path / "link", EXPORT, overwrite=True)
    with pytest.raises(UsageError, match="not an engram table store"):
        Output(tmp_path / "export", STORE, overwrite=True)
    with pytest.raises(UsageError, match="cannot write the plot"):
        Output(tmp_path / "folder", PLOT)
    Output(tmp_path / "file", PLOT)  # a plot replaces a file without being asked
    with pytest.raises(EngramError, match="output folder .* does not exist"):
        Output(tmp_path / "absent" / "out", EXPORT)


def test_a_target_that_changed_meanwhile_is_not_replaced(tmp_path):
    target = old_export(tmp_path / "out")
    with pytest.raises(UsageError, match="'results.csv', which no export writes"):
        with Output(target, EXPORT, overwrite=True).writing(folder=True) as tmp:
            (tmp / "model.safetensors").write_bytes(b"new")
            (target / "results.csv").write_text("a user's file, written while the export ran")
    assert contents(tmp_path) == {
        "out": None,
        "out/model.safetensors": b"old",
        "out/results.csv": b"a user's file, written while the export ran",
    }


def test_outputs_inside_a_store_are_refused(tmp_path):
    store = tmp_path / "store"
    build_tables(SPEC, store, projection=compress_vocab(letters_tokenizer()))
    for kind in (STORE, EXPORT):
        with pytest.raises(UsageError, match="inside the table store"):
            Output(store / "new", kind)
    with pytest.raises(OutputExistsError):
        Output(store, STORE)
    Output(store, STORE, overwrite=True)


def test_stale_temporaries_of_a_dead_run_go_and_those_of_a_live_run_stay(tmp_path):
    make = (
        "import sys; from pathlib import Path; from engram_cli.output import temporary_name; "
        "p = temporary_name(Path(sys.argv[1])); p.mkdir(); (p / 'part').write_bytes(bytes(10)); print(p)"
    )
    dead = subprocess.run(
        [sys.executable, "-c", make, str(tmp_path / "out")], capture_output=True, text=True, check=True
    ).stdout.strip()
    live = temporary_name(tmp_path / "other")  # this process's: alive
    live.write_bytes(b"in use")
    assert Path(dead).is_dir()
    with Output(tmp_path / "new.bin", FILE).writing() as tmp:
        assert not Path(dead).exists() and live.read_bytes() == b"in use"
        tmp.write_bytes(b"x")
    assert live.read_bytes() == b"in use"


def test_more_than_the_disk_holds_is_refused_before_anything_is_written(tmp_path):
    with pytest.raises(ResourceError, match="not enough disk space"):
        with Output(tmp_path / "out", EXPORT).writing(1 << 62, folder=True):
            raise AssertionError("the writer must not run")
    assert contents(tmp_path) == {}


@pytest.fixture
def read_only(tmp_path):
    """A folder no writer may write: mode 555, and immutable where even root can write (as root
    is in containers); skipped where neither holds."""
    folder = tmp_path / "read-only"
    folder.mkdir()
    folder.chmod(0o555)
    immutable = False
    if os.access(folder, os.W_OK):
        immutable = subprocess.run(["chattr", "+i", str(folder)], capture_output=True).returncode == 0
        if not immutable:
            pytest.skip("running as root, and chattr +i is not available to make a folder read-only")
    yield folder
    if immutable:
        subprocess.run(["chattr", "-i", str(folder)], check=True)
    folder.chmod(0o755)


def test_every_writer_refuses_a_folder_it_may_not_write(tmp_path, read_only):
    projection = compress_vocab(letters_tokenizer())
    made = tmp_path / "made"
    made.mkdir()
    build_tables(SPEC, made / "store", projection=projection)
    projection.save(made / "projection.safetensors")
    letters_tokenizer().save(str(made / "tokenizer.json"))
    run_engram("export", str(made / "store"), "--for", "inference", "-o", str(made / "t.safetensors"), check=True)
    np.save(made / "ids.npy", np.arange(20) % 10)
    spec = made / "tiny.toml"
    lines = ["[engram]"] + [f"{k} = {json.dumps(v)}" for k, v in SPEC.to_dict()["engram"].items()]
    spec.write_text(
        "\n".join([*lines, "[table]", 'dtype = "bfloat16"', 'init = { distribution = "normal", std = 1.0 }\n'])
    )
    runs = {
        "import": ["import", str(made / "t.safetensors"), "-o", str(read_only / "s")],
        "export training": ["export", str(made / "store"), "--for", "training", "-o", str(read_only / "c")],
        "export inference": ["export", str(made / "store"), "--for", "inference", "-o", str(read_only / "t")],
        "compress-vocab": ["compress-vocab", str(made / "tokenizer.json"), "-o", str(read_only / "p.safetensors")],
        "hash": [
            "hash",
            "--ids",
            str(made / "ids.npy"),
            "-o",
            str(read_only / "h.npz"),
            "--spec",
            str(spec),
            "--projection",
            str(made / "projection.safetensors"),
        ],
        "build-tables": [
            "build-tables",
            str(spec),
            "-o",
            str(read_only / "b"),
            "--projection",
            str(made / "projection.safetensors"),
        ],
    }
    for name, args in runs.items():
        proc = run_engram(*args)
        lines = proc.stderr.strip().splitlines()
        assert proc.returncode == 1, (name, proc.stderr)
        assert lines == [f"engram: error: output folder {read_only} is not writable"], (name, proc.stderr)
    assert list(read_only.iterdir()) == []
    with pytest.raises(EngramError, match="is not writable"):
        Output(read_only / "plot.png", PLOT)


def test_a_projection_is_saved_through_the_same_mechanism(tmp_path):
    projection = compress_vocab(letters_tokenizer())
    path = tmp_path / "p.safetensors"
    projection.save(path)
    projection.save(path)  # replaces its own file
    assert contents(tmp_path).keys() == {"p.safetensors"}
    assert load_projection(path).fingerprint() == projection.fingerprint()
