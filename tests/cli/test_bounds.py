"""Bounded work on any input, and one error line instead of a traceback, through the real CLI.

Every case runs `engram` in a subprocess and checks the exit code, that stderr is exactly one
`engram: error:` line, and that nothing in the working folder changed (every file hashed before
and after). Memory cases also measure the engram process's peak RSS from a wrapper process
(`RUSAGE_CHILDREN`) against a plain command's, so a case that read or allocated what it was
asked fails. Speed is never asserted: a refusal that is not quick runs into the timeout.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import signal
import struct
import subprocess
import sys
import time
import zipfile
import zlib
from pathlib import Path

import numpy as np
import pytest
from engram_cli.store.files import LOCK_NAME
from engram_cli.tokenizer import MAX_TOKENIZER_BYTES, embedded_tokenizer_path
from safetensors.numpy import save

from conftest import ROOT, run_engram
from measure import TIMEOUT, run_measured


@pytest.fixture(scope="module")
def baseline_peak(tmp_path_factory) -> int:
    """Peak RSS of a command that reads nothing large but imports what inspecting does (the CLI
    alone no longer loads numba, torch or zarr): a tiny corpus on the default spec."""
    folder = tmp_path_factory.mktemp("baseline")
    (folder / "tiny.txt").write_text("the quick brown fox jumps over the lazy dog")
    proc, peak = run_measured("inspect", "demo", "--corpus", "tiny.txt", cwd=folder)
    assert proc.returncode == 0, proc.stderr
    return peak


def snapshot(folder: Path) -> dict[str, str]:
    """sha256 of every file under `folder`, and every folder (as "dir"), by relative path."""
    return {
        str(p.relative_to(folder)): "dir" if p.is_dir() else hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(folder.rglob("*"))
    }


def assert_one_line_error(proc: subprocess.CompletedProcess, *needles: str, code: int = 1) -> None:
    assert proc.returncode == code, (proc.returncode, proc.stderr)
    assert proc.stderr.startswith("engram: error: ") and proc.stderr.count("\n") == 1, proc.stderr
    assert "Traceback" not in proc.stderr and proc.stderr.strip() != "engram: error:"
    for needle in needles:
        assert needle in proc.stderr, (needle, proc.stderr)


def refused(folder: Path, *args: str, needles: tuple[str, ...] = (), code: int = 1) -> subprocess.CompletedProcess:
    """Run a command that must fail in one line and leave `folder` exactly as it was."""
    before = snapshot(folder)
    proc = run_engram(*args, cwd=folder, timeout=TIMEOUT)
    assert_one_line_error(proc, *needles, code=code)
    assert snapshot(folder) == before
    return proc


# ---- zips: bombs, damage, encryption, unsupported methods ---------------------------------------

BOMB_BYTES = 1 << 30  # what the bomb unzips to: reading it whole would add 1 GiB to the peak


def deflated_zeros(size: int) -> bytes:
    """A raw deflate stream of `size` zero bytes (about 1 MB per GiB)."""
    packer = zlib.compressobj(9, zlib.DEFLATED, -15)
    block = bytes(1 << 20)
    parts = [packer.compress(block) for _ in range(size // len(block))]
    return b"".join([*parts, packer.flush()])


def zip_with(data: bytes, *, size: int, crc: int, method: int = zipfile.ZIP_DEFLATED, flags: int = 0) -> bytes:
    """A one-member zip (tokenizer.json) around an already compressed stream, headers as given:
    the way to make members that zipfile itself will not write (encrypted, deflate64, lying)."""
    name = b"tokenizer.json"
    local = struct.pack("<4s5H3I2H", b"PK\x03\x04", 20, flags, method, 0, 33, crc, len(data), size, len(name), 0)
    central = struct.pack(
        "<4s6H3I5H2I",
        b"PK\x01\x02",
        20,
        20,
        flags,
        method,
        0,
        33,
        crc,
        len(data),
        size,
        len(name),
        0,
        0,
        0,
        0,
        0,
        0,
    )
    body = local + name + data
    directory = central + name
    end = struct.pack("<4s4H2IH", b"PK\x05\x06", 0, 0, 1, 1, len(directory), len(body), 0)
    return body + directory + end


@pytest.fixture(scope="module")
def bomb_zip(tmp_path_factory) -> Path:
    """1 MB that unzips to 1 GiB of zeros, with honest headers."""
    crc = zlib.crc32(bytes(1 << 20))
    for _ in range(BOMB_BYTES // (1 << 20) - 1):
        crc = zlib.crc32(bytes(1 << 20), crc)
    path = tmp_path_factory.mktemp("bomb") / "tokenizer.json.zip"
    path.write_bytes(zip_with(deflated_zeros(BOMB_BYTES), size=BOMB_BYTES, crc=crc))
    return path


@pytest.fixture(scope="module")
def lying_bomb_zip(tmp_path_factory) -> Path:
    """The same stream under headers that claim 1 KB: only a bounded inflate stops it."""
    path = tmp_path_factory.mktemp("lying") / "tokenizer.json.zip"
    path.write_bytes(zip_with(deflated_zeros(BOMB_BYTES), size=1024, crc=0))
    return path


def test_tokenizer_zip_bomb_is_refused_before_inflating(tmp_path, bomb_zip, baseline_peak):
    before = snapshot(tmp_path)
    proc, peak = run_measured("compress-vocab", str(bomb_zip), "-o", "p.safetensors", cwd=tmp_path)
    assert_one_line_error(proc, "1.1 GB", f"{MAX_TOKENIZER_BYTES >> 20} MiB")
    assert snapshot(tmp_path) == before
    assert peak < baseline_peak + (256 << 20), (peak, baseline_peak)


def test_tokenizer_zip_with_lying_sizes_is_bounded(tmp_path, lying_bomb_zip, baseline_peak):
    before = snapshot(tmp_path)
    proc, peak = run_measured("compress-vocab", str(lying_bomb_zip), "-o", "p.safetensors", cwd=tmp_path)
    assert_one_line_error(proc, "not a valid zip file")
    assert snapshot(tmp_path) == before
    assert peak < baseline_peak + (256 << 20), (peak, baseline_peak)


def test_projection_with_a_bomb_as_its_tokenizer(tmp_path, bomb_zip, baseline_peak):
    lookup = np.arange(1000, dtype=np.int64)
    meta = {"format": "engram-projection", "format_version": "1", "vocab_size": "1000", "compressed_size": "1000"}
    tensors = {"lookup": lookup, "tokenizer_zip": np.frombuffer(bomb_zip.read_bytes(), np.uint8)}
    (tmp_path / "p.safetensors").write_bytes(save(tensors, metadata=meta))
    before = snapshot(tmp_path)
    proc, peak = run_measured("hash", "hello", "--projection", "p.safetensors", cwd=tmp_path)
    assert_one_line_error(proc, "p.safetensors: tokenizer_zip", "MiB")
    assert snapshot(tmp_path) == before
    assert peak < baseline_peak + (256 << 20), (peak, baseline_peak)


def test_projection_with_a_garbage_tokenizer_zip(tmp_path):
    meta = {"format": "engram-projection", "format_version": "1", "vocab_size": "1000", "compressed_size": "1000"}
    tensors = {"lookup": np.arange(1000, dtype=np.int64), "tokenizer_zip": np.frombuffer(b"not a zip" * 9, np.uint8)}
    (tmp_path / "p.safetensors").write_bytes(save(tensors, metadata=meta))
    refused(tmp_path, "hash", "hello", "--projection", "p.safetensors", needles=("tokenizer_zip", "not a valid zip"))
    refused(tmp_path, "build-tables", "demo", "--projection", "p.safetensors", "-o", "s.zarr", needles=("zip",))


def test_non_regular_tokenizer_file_is_read_only_up_to_the_cap(tmp_path, baseline_peak):
    before = snapshot(tmp_path)
    proc, peak = run_measured("compress-vocab", "/dev/zero", "-o", "p.safetensors", cwd=tmp_path)
    assert_one_line_error(proc, "/dev/zero", f"{MAX_TOKENIZER_BYTES >> 20} MiB")
    assert snapshot(tmp_path) == before
    assert peak < baseline_peak + MAX_TOKENIZER_BYTES + (128 << 20), (peak, baseline_peak)


def test_oversized_tokenizer_file_is_refused_by_its_size(tmp_path, baseline_peak):
    with open(tmp_path / "tokenizer.json", "wb") as f:
        f.truncate(MAX_TOKENIZER_BYTES + 1)  # sparse: costs no disk
    before = snapshot(tmp_path)
    proc, peak = run_measured("compress-vocab", "tokenizer.json", "-o", "p.safetensors", cwd=tmp_path)
    assert_one_line_error(proc, "tokenizer.json", "larger than")
    assert snapshot(tmp_path) == before
    assert peak < baseline_peak + (64 << 20), (peak, baseline_peak)


def _damaged(data: bytes) -> bytes:
    raw = bytearray(data)
    for i in range(1000, 1064):
        raw[i] ^= 0xFF
    return bytes(raw)


def _stored_member(flags: int = 0, method: int = zipfile.ZIP_STORED) -> bytes:
    data = b'{"version": "1.0"}'
    return zip_with(data, size=len(data), crc=zlib.crc32(data), method=method, flags=flags)


ZIP_CASES = {
    "corrupt": (lambda real: _damaged(real), "not a valid zip file"),
    "truncated": (lambda real: real[: len(real) // 2], "not a valid zip file"),
    "empty": (lambda real: b"", "not a valid zip file"),
    "encrypted": (lambda real: _stored_member(flags=0x1), "encrypted"),
    "deflate64": (lambda real: _stored_member(method=9), "compression method 9"),
    "no tokenizer.json": (lambda real: _zip_of("vocab.txt", b"a b c"), "holds no tokenizer.json"),
}


def _zip_of(name: str, data: bytes) -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        archive.writestr(name, data)
    return buffer.getvalue()


@pytest.mark.parametrize("case", list(ZIP_CASES))
def test_broken_tokenizer_zips(tmp_path, case):
    make, needle = ZIP_CASES[case]
    (tmp_path / "tok.zip").write_bytes(make(embedded_tokenizer_path().read_bytes()))
    refused(tmp_path, "compress-vocab", "tok.zip", "-o", "p.safetensors", needles=("tok.zip", needle))


# ---- paths no file system can hold ---------------------------------------------------------------

LONG = "n" * 300


@pytest.mark.parametrize(
    "args",
    [
        ("compress-vocab", LONG, "-o", "p.safetensors"),
        ("compress-vocab", f"{LONG}.json", "-o", "p.safetensors"),
        ("compress-vocab", "-o", f"{LONG}.safetensors"),
        ("plan", f"{LONG}.toml"),
        ("hash", "hi", "--projection", LONG),
        ("hash", "--ids", f"{LONG}.npy", "-o", "o.npz"),
        ("build-tables", "demo", "-o", f"sub/{LONG}"),
        ("export", LONG, "--for", "training", "-o", "out"),
        ("import", LONG, "-o", "out"),
        ("inspect", "demo", "--corpus", LONG),
        ("plan", "/".join(["deep"] * 1100)),  # each name fine, the whole path past PATH_MAX
    ],
    ids=lambda a: " ".join(x[:12] for x in a),
)
def test_overlong_paths(tmp_path, args):
    refused(tmp_path, *args, needles=("too long",), code=1 if args[-1].startswith("deep") else 2)


@pytest.mark.parametrize(
    "args",
    [
        ("build-tables", "demo", "-o", ""),
        ("build-tables", "demo", "-o", "", "--resume"),
        ("build-tables", "demo", "-o", "", "--overwrite"),
        ("compress-vocab", "-o", ""),
        ("export", "", "--for", "training", "-o", "out"),
        ("export", "store", "--for", "training", "-o", ""),
        ("import", "ckpt", "-o", ""),
        ("inspect", ""),
        ("plan", ""),
        ("hash", "hi", "--projection", ""),
        ("inspect", "demo", "--corpus", "c.txt", "--plot", ""),
    ],
    ids=lambda a: " ".join(x or '""' for x in a),
)
def test_empty_paths_are_not_the_current_folder(tmp_path, args):
    (tmp_path / "c.txt").write_text("some text here")
    refused(tmp_path, *args, needles=("empty path",), code=2)


def test_engram_alone_prints_the_help():
    proc = run_engram(timeout=TIMEOUT)
    assert proc.returncode == 0 and proc.stderr == "", proc.stderr
    assert "Usage: engram" in proc.stdout and "build-tables" in proc.stdout


# ---- work that must be planned, not done -------------------------------------------------------


def huge_spec(folder: Path, heads: int = 8, rows: int = 1 << 48) -> Path:
    spec = folder / "huge.toml"
    spec.write_text(
        "[engram]\nlayer_ids = [1, 2]\nmax_ngram_size = 3\n"
        f"n_head_per_ngram = {heads}\nengram_vocab_size = [{rows}, {rows}]\n"
        f"n_embed_per_ngram = {64 * heads}\npad_id = 2\n"
    )
    return spec


def test_dry_run_of_a_huge_spec_is_planned_in_closed_form(tmp_path):
    huge_spec(tmp_path)
    before = snapshot(tmp_path)
    proc = run_engram("build-tables", "huge.toml", "--dry-run", "--json", cwd=tmp_path, timeout=TIMEOUT)
    assert proc.returncode == 0, proc.stderr
    report = json.loads(proc.stdout)
    rows_per_layer = [layer["rows"] for layer in report["layers"]]
    assert all(rows > 16 << 48 for rows in rows_per_layer)
    row_bytes = 64 * 2  # dim 64, bfloat16
    shards = sum(layer["shards"] for layer in report["layers"])
    assert shards == report["total"]["shards"] and shards >= sum(rows_per_layer) * row_bytes / (128 << 20)
    assert report["total"]["bytes"] == sum(rows_per_layer) * row_bytes
    assert snapshot(tmp_path) == before


@pytest.mark.parametrize(
    "args",
    [
        ("plan", "huge.toml"),
        ("build-tables", "huge.toml", "--dry-run"),
        ("hash", "hi", "--spec", "huge.toml"),
        ("inspect", "huge.toml", "--corpus", "huge.toml"),
    ],
    ids=lambda a: a[0],
)
def test_specs_past_the_head_limit_are_refused(tmp_path, args):
    huge_spec(tmp_path, heads=2_000_000, rows=1000)
    refused(tmp_path, *args, needles=("8,000,000 heads", "at most 4,096"))


def test_sweep_past_memory_is_refused_before_reading(tmp_path):
    (tmp_path / "c.txt").write_text("the quick brown fox jumps over the lazy dog " * 50)
    plain, plain_peak = run_measured("inspect", "demo", "--corpus", "c.txt", cwd=tmp_path)
    assert plain.returncode == 0, plain.stderr
    before = snapshot(tmp_path)
    proc, peak = run_measured("inspect", "demo", "--corpus", "c.txt", "--sweep", "1,1e9", cwd=tmp_path)
    assert_one_line_error(proc, "sweep factor 1e+09", "TiB of bucket counters", "memory available")
    assert snapshot(tmp_path) == before
    assert peak < plain_peak + (64 << 20), (peak, plain_peak)  # no more than the same run without the sweep


# ---- one build at a time --------------------------------------------------------------------

HOLD = """
import fcntl, os, sys, time
fd = os.open(sys.argv[1], os.O_RDWR | os.O_CREAT, 0o644)
fcntl.flock(fd, fcntl.LOCK_EX)
print("held", flush=True)
time.sleep(600)
"""


def test_a_second_build_of_a_store_is_refused_until_the_first_dies(tmp_path):
    store = tmp_path / "tables.zarr"
    first = run_engram("build-tables", "demo", "-o", str(store), cwd=tmp_path, timeout=TIMEOUT)
    assert first.returncode == 0, first.stderr
    assert not (store / LOCK_NAME).exists()  # a finished build leaves no lock file behind
    holder = subprocess.Popen(
        [sys.executable, "-c", HOLD, str(store / LOCK_NAME)], stdout=subprocess.PIPE, text=True, cwd=ROOT
    )
    try:
        assert holder.stdout.readline().strip() == "held"
        for extra in ("--resume", "--overwrite"):
            proc = refused(tmp_path, "build-tables", "demo", "-o", str(store), extra, needles=(str(store), "another"))
            assert LOCK_NAME in proc.stderr
    finally:
        os.kill(holder.pid, signal.SIGKILL)  # as a build killed with kill -9
        holder.wait()
    resumed = run_engram("build-tables", "demo", "-o", str(store), "--resume", cwd=tmp_path, timeout=TIMEOUT)
    assert resumed.returncode == 0, resumed.stderr
    assert not (store / LOCK_NAME).exists()


def test_a_running_build_holds_the_lock(tmp_path):
    """A real build, stopped midway, refuses a second one; killed with SIGKILL, it leaves no lock."""
    spec = tmp_path / "big.toml"
    spec.write_text(  # 512 MB: it cannot finish between two looks at its folder
        "[engram]\nlayer_ids = [1]\nmax_ngram_size = 2\nn_head_per_ngram = 1\n"
        "engram_vocab_size = [16000000]\nn_embed_per_ngram = 16\npad_id = 2\n"
    )
    store = tmp_path / "big.zarr"
    build = subprocess.Popen(
        [sys.executable, "-m", "engram_cli", "build-tables", str(spec), "-o", str(store), "--workers", "1"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        cwd=tmp_path,
    )
    try:
        while build.poll() is None and not (store / LOCK_NAME).exists():
            time.sleep(0.01)
        build.send_signal(signal.SIGSTOP)
        assert build.poll() is None, "the build finished before it could be stopped"
        refused(tmp_path, "build-tables", str(spec), "-o", str(store), "--resume", needles=(str(store), "another"))
    finally:
        build.kill()
        build.wait()
    resumed = run_engram("build-tables", str(spec), "-o", str(store), "--resume", cwd=tmp_path, timeout=TIMEOUT)
    assert resumed.returncode == 0, resumed.stderr
    assert not (store / LOCK_NAME).exists()
