"""`engram inspect` within its memory budget: one-line errors for a full or unwritable spill disk and
a budget too small, the spill folder removed on every exit (Ctrl-C too), and stale spill folders
of killed runs removed by the next run, never anything else. Real subprocesses and real signals."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import psutil
import pytest
from engram_cli.collisions.budget import minimum_memory_budget
from engram_cli.collisions.spill import MARKER, SPILL_PREFIX, SpillFolder, remove_stale_spill_folders
from engram_cli.spec import load_spec

from conftest import run_engram

SEP = 1


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    """4 M DeepSeek-V3 ids with a document separator about every 2,000: enough to spill at 16 MiB."""
    rng = np.random.default_rng(0)
    ids = rng.integers(2, 128_000, 4_000_000).astype(np.uint32)
    ids[rng.random(ids.size) < 1 / 2000] = SEP
    path = tmp_path_factory.mktemp("corpus") / "ids.bin"
    ids.tofile(path)
    return path


def inspect_args(corpus: Path, *extra: str) -> list[str]:
    return ["inspect", "demo", "--corpus", str(corpus), "--bin-dtype", "uint32", "--doc-sep", str(SEP), *extra]


def spill_folders(root: Path) -> list[Path]:
    return sorted(p for p in root.iterdir() if p.name.startswith(SPILL_PREFIX))


def one_line_error(proc: subprocess.CompletedProcess, text: str) -> None:
    assert proc.returncode == 1, proc.stderr
    assert proc.stderr.startswith("engram: error: ") and len(proc.stderr.strip().splitlines()) == 1, proc.stderr
    assert text in proc.stderr, proc.stderr


@pytest.fixture
def mounted(tmp_path):
    """Mount a small tmpfs (as root), or skip; unmounted afterwards."""
    mounts: list[Path] = []

    def mount(name: str, options: str) -> Path:
        target = tmp_path / name
        target.mkdir()
        if (
            os.geteuid() != 0
            or subprocess.run(
                ["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(target)], capture_output=True
            ).returncode
        ):
            pytest.skip("needs permission to mount a small tmpfs")
        mounts.append(target)
        return target

    yield mount
    for target in mounts:
        subprocess.run(["umount", str(target)], check=True)


def test_a_full_spill_disk_is_one_line_and_leaves_nothing(corpus, mounted):
    small = mounted("small", "size=4m")
    proc = run_engram(*inspect_args(corpus, "--max-memory", "16", "--spill-dir", str(small)))
    one_line_error(proc, "not enough disk space to spill n-gram counts")
    assert list(small.iterdir()) == []


def test_a_file_size_limit_is_one_line(corpus, tmp_path):
    """RLIMIT_FSIZE: the write fails with EFBIG (Python ignores SIGXFSZ) on any filesystem."""
    code = (
        "import resource, sys; resource.setrlimit(resource.RLIMIT_FSIZE, (1 << 20, 1 << 20)); "
        "sys.argv = ['engram'] + sys.argv[1:]; from engram_cli.cli import main; main()"
    )
    args = inspect_args(corpus, "--max-memory", "16", "--spill-dir", str(tmp_path))
    proc = subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, timeout=600)
    one_line_error(proc, "file size limit")
    assert spill_folders(tmp_path) == []


def test_an_unwritable_spill_dir_is_one_line_before_any_work(corpus, tmp_path, mounted):
    if os.geteuid() == 0:
        target = mounted("readonly", "ro,size=1m")  # root writes through permission bits
    else:
        target = tmp_path / "readonly"
        target.mkdir(mode=0o555)
    started = time.perf_counter()
    proc = run_engram(*inspect_args(corpus, "--spill-dir", str(target)))
    one_line_error(proc, f"cannot create a spill folder in {target}")
    missing = run_engram(*inspect_args(corpus, "--spill-dir", str(tmp_path / "absent")))
    one_line_error(missing, f"cannot create a spill folder in {tmp_path / 'absent'}")
    assert time.perf_counter() - started < 600


def test_a_budget_too_small_names_the_smallest_that_works(corpus, tmp_path):
    """engram-demo-v1 counts 8 heads of ~646 K rows at once (20 MiB of bucket counters): 16 MiB
    cannot work, and the message names the smallest budget that does, which then works."""
    spec = load_spec("engram-demo-v1")
    mib = -(-minimum_memory_budget(spec) // 2**20)
    args = ["inspect", "engram-demo-v1", *inspect_args(corpus)[2:]]
    proc = run_engram(*args, "--max-memory", "16")
    one_line_error(proc, "16.0 MiB is too small for engram-demo-v1")
    assert f"the smallest budget that works is {mib} MiB" in proc.stderr
    swept = run_engram(*args, "--max-memory", str(mib), "--sweep", "1,3")  # 3x the heads: more counters
    one_line_error(swept, f"the smallest budget that works is {-(-minimum_memory_budget(spec, [1, 3]) // 2**20)} MiB")
    small = tmp_path / "small.bin"
    np.fromfile(corpus, np.uint32, count=200_000).tofile(small)
    args = ["inspect", "engram-demo-v1", *inspect_args(small)[2:], "--spill-dir", str(tmp_path), "--json"]
    ok = run_engram(*args, "--max-memory", str(mib))
    assert ok.returncode == 0, ok.stderr
    data = json.loads(ok.stdout)
    assert data["corpus"]["tokens"] > 190_000 and data["corpus"]["spilled_bytes"] > 0
    assert data["layers"] == json.loads(run_engram(*args, check=True).stdout)["layers"]  # as with plenty
    assert spill_folders(tmp_path) == []


def test_a_budget_above_the_memory_available_is_one_line_before_any_work(corpus, tmp_path):
    """More than the machine has would swap or be killed rather than hold: refused, locally before
    any work, and on a cluster by the worker that would spend it (its host named)."""
    too_much = str(2 * psutil.virtual_memory().total // 2**20)
    local = run_engram(*inspect_args(corpus, "--max-memory", too_much, "--spill-dir", str(tmp_path)))
    one_line_error(local, f"a memory budget of {int(too_much):,} MiB is more than the")
    assert "of memory available now: give at most" in local.stderr and spill_folders(tmp_path) == []
    small = tmp_path / "small.bin"
    np.fromfile(corpus, np.uint32, count=10_000).tofile(small)
    args = inspect_args(small, "--max-memory", too_much, "--spill-dir", str(tmp_path), "--dask-workers", "1")
    cluster = run_engram(*args)
    one_line_error(cluster, f"available on worker host {socket.gethostname()} now")
    assert spill_folders(tmp_path) == []


def wait_for_spill(root: Path, proc: subprocess.Popen, timeout: float = 300) -> Path:
    """The spill folder of a running command once it holds spilled runs."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert proc.poll() is None, proc.communicate()[1]
        for folder in spill_folders(root):
            if any(p.name.startswith("order") for p in folder.iterdir()):
                return folder
        time.sleep(0.05)
    raise AssertionError("no spill folder appeared")


def start(corpus: Path, root: Path) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "engram_cli", *inspect_args(corpus, "--max-memory", "16", "--spill-dir", str(root))],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_ctrl_c_removes_the_spill_folder(corpus, tmp_path, sig):
    proc = start(corpus, tmp_path)
    folder = wait_for_spill(tmp_path, proc)
    proc.send_signal(sig)
    _, stderr = proc.communicate(timeout=300)
    assert proc.returncode == 130 and stderr.strip().endswith("engram: interrupted"), stderr
    assert "Traceback" not in stderr
    assert not folder.exists() and spill_folders(tmp_path) == []


def test_after_kill_9_the_next_run_removes_the_stale_folder_and_nothing_else(corpus, tmp_path):
    proc = start(corpus, tmp_path)
    stale = wait_for_spill(tmp_path, proc)
    proc.kill()
    proc.wait(timeout=60)
    assert stale.exists() and (stale / MARKER).is_file()  # nothing runs after kill -9
    marker = json.loads((stale / MARKER).read_text())
    assert marker["pid"] == proc.pid and marker["host"] == socket.gethostname()

    # what must stay: a live owner (this test), another host's, no marker, not engram's name, a file
    me = psutil.Process()
    kept = {
        "live": {"engram": "spill", "host": socket.gethostname(), "pid": me.pid, "started": me.create_time()},
        "other-host": {"engram": "spill", "host": socket.gethostname() + "-elsewhere", "pid": proc.pid, "started": 1.0},
        "foreign-marker": {"host": socket.gethostname(), "pid": proc.pid, "started": 1.0},
    }
    for name, owner in kept.items():
        folder = tmp_path / f"{SPILL_PREFIX}{name}"
        folder.mkdir()
        (folder / MARKER).write_text(json.dumps(owner))
    (tmp_path / f"{SPILL_PREFIX}no-marker").mkdir()
    (tmp_path / "engram-other-data").mkdir()
    (tmp_path / f"{SPILL_PREFIX}a-file").write_text("not a folder")
    reused = tmp_path / f"{SPILL_PREFIX}pid-reused"  # the pid lives, but it is another process now
    reused.mkdir()
    (reused / MARKER).write_text(
        json.dumps({"engram": "spill", "host": socket.gethostname(), "pid": me.pid, "started": 1.0})
    )

    small = tmp_path / "small.bin"
    np.fromfile(corpus, np.uint32, count=100_000).tofile(small)
    run_engram(
        "inspect", "demo", "--corpus", str(small), "--bin-dtype", "uint32", "--spill-dir", str(tmp_path), check=True
    )
    left = {p.name for p in tmp_path.iterdir()}
    assert stale.name not in left and f"{SPILL_PREFIX}pid-reused" not in left
    assert {f"{SPILL_PREFIX}{n}" for n in [*kept, "no-marker", "a-file"]} | {"engram-other-data", "small.bin"} == left


def test_a_spill_folder_removes_itself_and_refuses_a_missing_root(tmp_path):
    with SpillFolder(tmp_path) as folder:
        assert folder.path.parent == tmp_path and (folder.path / MARKER).is_file()
        folder.append(folder.path / "x", np.arange(10))
        assert folder.written == 80
    assert list(tmp_path.iterdir()) == []
    assert remove_stale_spill_folders(tmp_path / "absent") == []
