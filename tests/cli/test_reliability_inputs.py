"""Every valid input read whole, every broken one a line: corpus readers, `hash --positions` and
model-folder import through the real CLI, on files written by the real libraries.

One test (or one parametrized family) per class of fault: silent partial reads, valid inputs
refused, tracebacks where a line belongs, memory bounded by the work rather than by what an index
claims, and non-finite rows of an imported model folder. Each runs `engram` in a subprocess and
checks the exit status, the single `engram: error:` line or the counts in `--json`, and that no
file changed; the memory case measures the child's peak RSS.
"""

from __future__ import annotations

import bz2
import gzip
import hashlib
import io
import json
import lzma
import os
import resource
import shutil
import struct
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import zstandard

from conftest import run_engram

TEXTS = [f"document {i} says hello to the world" for i in range(3000)]


def snapshot(folder: Path) -> dict[str, str]:
    """sha256 of every file under `folder` (and "dir" for folders), by relative path."""
    return {
        str(p.relative_to(folder)): "dir" if p.is_dir() else hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(folder.rglob("*"))
    }


def refused(folder: Path, *args: str, match: str, env: dict | None = None) -> str:
    """`engram ARGS` fails with exit 1 and one `engram: error:` line holding `match`, and nothing
    under `folder` changes; the line is returned."""
    before = snapshot(folder)
    proc = run_engram(*args, env=env)
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 1, proc.stderr
    assert len(lines) == 1 and lines[0].startswith("engram: error: "), proc.stderr
    assert match in lines[0], lines[0]
    assert snapshot(folder) == before, "files were written or removed"
    return lines[0]


def corpus_json(*args: str) -> dict:
    """The `corpus` section of `engram inspect demo --corpus ... --json`, which must succeed."""
    proc = run_engram("inspect", "demo", "--corpus", *args, "--json")
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout)["corpus"]


def write_stream(path: Path, table: pa.Table, rows_per_batch: int) -> list[int]:
    """An Arrow IPC stream of `table`; the byte offsets where each record batch ends."""
    sink = io.BytesIO()
    writer = pa.ipc.new_stream(sink, table.schema)
    ends = []
    for batch in table.to_batches(max_chunksize=rows_per_batch):
        writer.write_batch(batch)
        ends.append(sink.tell())
    writer.close()
    path.write_bytes(sink.getvalue())
    return ends


# ---- 1. silent partial reads ---------------------------------------------------------------------


def test_an_arrow_stream_cut_at_a_batch_boundary_is_truncated(tmp_path):
    ends = write_stream(tmp_path / "whole.arrow", pa.table({"text": TEXTS}), 1000)
    assert corpus_json(str(tmp_path / "whole.arrow"))["documents"] == 3000
    for cut in ends[:-1]:
        (tmp_path / "cut.arrow").write_bytes((tmp_path / "whole.arrow").read_bytes()[:cut])
        refused(tmp_path, "inspect", "demo", "--corpus", str(tmp_path / "cut.arrow"), match="truncated")


def test_a_datasets_folder_with_a_cut_arrow_file_is_refused(tmp_path):
    datasets = pytest.importorskip("datasets")
    folder = tmp_path / "saved"
    datasets.Dataset.from_dict({"text": TEXTS}).save_to_disk(str(folder))
    assert corpus_json(str(folder))["documents"] == 3000
    (arrow,) = folder.glob("*.arrow")
    data = arrow.read_bytes()
    buffer = pa.BufferReader(data)
    reader = pa.ipc.open_stream(buffer)
    assert reader.read_next_batch().num_rows < 3000  # cut the stream right after its first record batch
    end = buffer.tell()
    arrow.write_bytes(data[:end])
    refused(folder, "inspect", "demo", "--corpus", str(folder), match="truncated")


LIST_LAYOUTS = {
    "list": pa.list_(pa.int32()),
    "large_list": pa.large_list(pa.int64()),
    "fixed_size_list": pa.list_(pa.int32(), 4),
    "list_view": pa.list_view(pa.int32()),
    "large_list_view": pa.large_list_view(pa.uint16()),
}


@pytest.mark.parametrize("container", ["parquet", "arrow"])
@pytest.mark.parametrize("layout", list(LIST_LAYOUTS))
def test_every_list_layout_of_an_ids_column_reads_every_row(tmp_path, layout, container):
    rows = [[(7 * r + k) % 200 + 3 for k in range(4)] for r in range(500)]
    table = pa.table({"ids": pa.array(rows, type=LIST_LAYOUTS[layout])})
    path = tmp_path / f"ids.{container}"
    if container == "parquet":
        pq.write_table(table, path, row_group_size=170)
    else:
        write_stream(path, table, 70)
    got = corpus_json(str(path), "--ids-field", "ids")
    assert (got["documents"], got["tokens"]) == (500, 2000)


def test_a_list_view_whose_rows_lie_anywhere_in_its_values_is_read_row_by_row(tmp_path):
    views = pa.ListViewArray.from_arrays(
        pa.array([4, 0, 8, 0], pa.int32()), pa.array([4, 4, 3, 2], pa.int32()), pa.array(range(3, 15), pa.int32())
    )
    write_stream(tmp_path / "views.arrow", pa.table({"ids": views}), 2)
    got = corpus_json(str(tmp_path / "views.arrow"), "--ids-field", "ids")
    assert (got["documents"], got["tokens"]) == (4, 13)


STREAMS = {"xz": lzma.compress, "bz2": bz2.compress, "zst": lambda data: zstandard.ZstdCompressor().compress(data)}


@pytest.mark.parametrize("suffix", list(STREAMS))
def test_concatenated_streams_are_read_whole_and_a_corrupt_one_is_an_error(tmp_path, suffix):
    compress = STREAMS[suffix]
    part = "".join(t + "\n" for t in TEXTS[:50]).encode()
    good = tmp_path / f"two.txt.{suffix}"
    good.write_bytes(compress(part) + compress(part))
    assert corpus_json(str(good), "--doc-per", "line")["documents"] == 100
    broken = bytearray(compress(part))
    broken[len(broken) // 2] ^= 0xFF
    bad = tmp_path / f"bad.txt.{suffix}"
    bad.write_bytes(compress(part) + bytes(broken))
    refused(tmp_path, "inspect", "demo", "--corpus", str(bad), "--doc-per", "line", match=str(bad))
    junk = tmp_path / f"junk.txt.{suffix}"
    junk.write_bytes(compress(part) + b"trailing bytes that are no stream")
    refused(tmp_path, "inspect", "demo", "--corpus", str(junk), "--doc-per", "line", match=str(junk))


DROP_DAC = ["--inh-caps=-dac_override,-dac_read_search", "--bounding-set=-dac_override,-dac_read_search"]


def _without_override(args: list[str], folder: Path) -> subprocess.CompletedProcess:
    """engram ARGS with permission bits enforced even as root (no capability to override them)."""
    env = {**os.environ, "COLUMNS": "200"}
    command = [sys.executable, "-m", "engram_cli", *args]
    if os.geteuid() == 0:
        command = [shutil.which("setpriv") or "setpriv", *DROP_DAC, *command]
    return subprocess.run(command, capture_output=True, text=True, env=env, cwd=folder, timeout=600)


def test_an_unreadable_folder_is_an_error_or_skipped_and_counted(tmp_path):
    if os.geteuid() == 0 and (
        shutil.which("setpriv") is None
        or subprocess.run(["setpriv", *DROP_DAC, "true"], capture_output=True).returncode
    ):
        pytest.skip("running as root without setpriv able to drop the capabilities that override permissions")
    corpus = tmp_path / "corpus"
    (corpus / "open").mkdir(parents=True)
    (corpus / "shut").mkdir()
    (corpus / "open" / "a.txt").write_text("hello world")
    (corpus / "shut" / "b.txt").write_text("never read")
    (corpus / "c.txt").write_text("not readable either")
    if os.geteuid() == 0:  # owned by another user, so that root without overrides is "other"
        os.chown(corpus / "shut", 65534, 65534)
        os.chown(corpus / "c.txt", 65534, 65534)
    (corpus / "shut").chmod(0o700)
    (corpus / "c.txt").chmod(0o600)
    try:
        before = snapshot(corpus / "open")
        proc = _without_override(["inspect", "demo", "--corpus", str(corpus)], tmp_path)
        lines = proc.stderr.strip().splitlines()
        assert proc.returncode == 1 and len(lines) == 1 and lines[0].startswith("engram: error: "), proc.stderr
        assert "cannot read" in lines[0] and ("shut" in lines[0] or "c.txt" in lines[0]), lines[0]
        proc = _without_override(["inspect", "demo", "--corpus", str(corpus), "--skip-unreadable", "--json"], tmp_path)
        assert proc.returncode == 0, proc.stderr
        read = json.loads(proc.stdout)["corpus"]
        assert (read["files"], read["skipped_unreadable"]) == (1, 2)
        assert snapshot(corpus / "open") == before
    finally:
        (corpus / "shut").chmod(0o755)
        (corpus / "c.txt").chmod(0o644)


# ---- 2. valid inputs refused ---------------------------------------------------------------------

TEXT_TYPES = {
    "string": lambda a: a,
    "large_string": lambda a: a.cast(pa.large_string()),
    "string_view": lambda a: a.cast(pa.string_view()),
    "binary_view": lambda a: a.cast(pa.binary_view()),
    "dictionary": lambda a: a.dictionary_encode(),
}


@pytest.fixture(scope="module")
def low_cardinality(tmp_path_factory) -> tuple[list[str], dict]:
    """Texts of few distinct values, as dictionary columns hold, and their counts as JSON lines."""
    texts = [TEXTS[i % 7] for i in range(300)]
    path = tmp_path_factory.mktemp("plain") / "plain.jsonl"
    path.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    return texts, corpus_json(str(path))


@pytest.mark.parametrize("container", ["parquet", "arrow"])
@pytest.mark.parametrize("kind", list(TEXT_TYPES))
def test_every_text_column_type_reads_the_same_documents(tmp_path, kind, container, low_cardinality):
    texts, want = low_cardinality
    table = pa.table({"text": TEXT_TYPES[kind](pa.array(texts))})
    path = tmp_path / f"texts.{container}"
    if container == "parquet":
        pq.write_table(table, path)
    else:
        write_stream(path, table, 64)
    got = corpus_json(str(path))
    assert (got["documents"], got["tokens"]) == (want["documents"], want["tokens"])
    assert got["text_bytes"] == sum(len(t.encode()) for t in texts)


def test_a_zstd_file_that_begins_with_a_skippable_frame(tmp_path):
    data = "".join(t + "\n" for t in TEXTS[:40]).encode()
    skippable = struct.pack("<II", 0x184D2A5E, 5) + b"meta!"
    path = tmp_path / "framed.txt.zst"
    path.write_bytes(skippable + zstandard.ZstdCompressor().compress(data) + skippable)
    assert corpus_json(str(path), "--doc-per", "line")["documents"] == 40
    (tmp_path / "framed.txt").write_bytes(path.read_bytes())  # found by its magic bytes alone
    assert corpus_json(str(tmp_path / "framed.txt"), "--doc-per", "line")["documents"] == 40


@pytest.mark.parametrize("dtype", ["uint64", "uint8", "int16", "uint32", ">i8"])
def test_positions_of_every_integer_dtype(tmp_path, dtype):
    ids = np.arange(3, 27, dtype=np.int64).reshape(2, 12)
    positions = np.concatenate([np.arange(5), np.arange(7)])[None].repeat(2, axis=0)
    np.save(tmp_path / "ids.npy", ids)
    np.save(tmp_path / "want.npy", positions.astype(np.int64))
    np.save(tmp_path / "pos.npy", positions.astype(dtype))
    for name in ("want", "pos"):
        proc = run_engram("hash", "--ids", str(tmp_path / "ids.npy"), "--positions", str(tmp_path / f"{name}.npy"),
                          "-o", str(tmp_path / f"{name}.npz"))  # fmt: skip
        assert proc.returncode == 0, proc.stderr
    want, got = np.load(tmp_path / "want.npz"), np.load(tmp_path / "pos.npz")
    assert set(want) == set(got) and all((want[k] == got[k]).all() for k in want)


def test_positions_that_are_not_integers_are_refused_by_their_dtype(tmp_path):
    np.save(tmp_path / "ids.npy", np.arange(3, 15, dtype=np.int64))
    np.save(tmp_path / "pos.npy", np.arange(12, dtype=np.float32))
    refused(tmp_path, "hash", "--ids", str(tmp_path / "ids.npy"), "--positions", str(tmp_path / "pos.npy"),
            "-o", str(tmp_path / "out.npz"), match="float32")  # fmt: skip


# ---- 3. tracebacks where a line belongs ----------------------------------------------------------


@pytest.mark.parametrize("container", ["parquet", "arrow"])
def test_invalid_utf8_in_a_string_column_is_replaced_and_counted(tmp_path, container):
    raw = pa.array([b"hello \xff world", b"fine text", b"\xc3"], pa.binary())
    column = pa.Array.from_buffers(pa.string(), len(raw), raw.buffers())  # as writers that skip the check do
    path = tmp_path / f"bad.{container}"
    if container == "parquet":
        pq.write_table(pa.table({"text": column}), path)
    else:
        write_stream(path, pa.table({"text": column}), 2)
    got = corpus_json(str(path))
    assert (got["documents"], got["invalid_utf8"], got["invalid_utf8_files"]) == (3, 2, 1)


HUGE = "9" * 5000


def test_json_integers_past_pythons_digit_limit(tmp_path):
    (tmp_path / "unused.jsonl").write_text(json.dumps({"text": "hello world"})[:-1] + f', "n": {HUGE}}}\n')
    (tmp_path / "array.json").write_text(f'[{{"text": "hello world", "n": -{HUGE}}}]')
    assert corpus_json(str(tmp_path / "unused.jsonl"))["documents"] == 1
    assert corpus_json(str(tmp_path / "array.json"))["documents"] == 1
    (tmp_path / "ids.jsonl").write_text(f'{{"ids": [5, {HUGE}]}}\n')
    refused(tmp_path, "inspect", "demo", "--corpus", str(tmp_path / "ids.jsonl"), "--ids-field", "ids",
            match="ids.jsonl:1")  # fmt: skip


def test_lone_surrogates_in_a_json_text_field_are_replaced_and_counted(tmp_path):
    (tmp_path / "s.jsonl").write_text('{"text": "a \\ud800 b \\udfff c \\ud83d\\ude00"}\n{"text": "plain"}\n')
    got = corpus_json(str(tmp_path / "s.jsonl"))
    assert (got["documents"], got["invalid_utf8"], got["invalid_utf8_files"]) == (2, 2, 1)


DATASET_DAMAGE = {
    "splits a string": ("dataset_dict.json", {"splits": "train"}),
    "dict a list": ("dataset_dict.json", ["train"]),
    "split names not strings": ("dataset_dict.json", {"splits": [1, None]}),
    "state a list": ("train/state.json", ["_data_files"]),
    "state a string": ("train/state.json", "_data_files"),
    "data files an object": ("train/state.json", {"_data_files": {"filename": "x.arrow"}}),
    "file name a number": ("train/state.json", {"_data_files": [{"filename": 3}]}),
    "entry a string": ("train/state.json", {"_data_files": ["data-00000-of-00001.arrow"]}),
}


def test_datasets_json_of_the_wrong_shape_is_one_line(tmp_path):
    datasets = pytest.importorskip("datasets")
    good = tmp_path / "good"
    datasets.DatasetDict({"train": datasets.Dataset.from_dict({"text": TEXTS[:20]})}).save_to_disk(str(good))
    assert corpus_json(str(good))["documents"] == 20
    for number, (relative, value) in enumerate(DATASET_DAMAGE.values()):
        folder = tmp_path / f"damaged{number}"
        shutil.copytree(good, folder)
        (folder / relative).write_text(json.dumps(value))
        refused(folder, "inspect", "demo", "--corpus", str(folder), match=relative.split("/")[-1])


def test_the_memory_budget_respects_the_address_space_limit(tmp_path):
    (tmp_path / "t.txt").write_text("the quick brown fox jumps over the lazy dog")
    limit = 3 << 30

    def limited() -> None:
        resource.setrlimit(resource.RLIMIT_AS, (limit, limit))

    before = snapshot(tmp_path)
    proc = subprocess.run(
        [sys.executable, "-m", "engram_cli", "inspect", "demo", "--corpus", "t.txt", "--max-memory", "4096"],
        capture_output=True, text=True, cwd=tmp_path, preexec_fn=limited, timeout=600,
        env={**os.environ, "COLUMNS": "200"},
    )  # fmt: skip
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 1 and len(lines) == 1 and lines[0].startswith("engram: error: "), proc.stderr
    assert "4,096 MiB" in lines[0] and "give at most" in lines[0], lines[0]
    assert snapshot(tmp_path) == before


# ---- 4. memory bounded by the work, not by what an index claims ----------------------------------


def _megatron_of_empty_documents(prefix: Path, documents: int) -> None:
    """PREFIX.bin of 5 ids in one sequence, and an index of `documents` documents, all empty but the last."""
    doc_index = np.zeros(documents + 1, "<i8")
    doc_index[-1] = 1
    header = b"MMIDIDX\x00\x00" + struct.pack("<QBQQ", 1, 4, 1, documents + 1)
    body = np.array([5], "<i4").tobytes() + np.array([0], "<i8").tobytes() + doc_index.tobytes()
    Path(f"{prefix}.idx").write_bytes(header + body)
    np.array([11, 12, 13, 14, 15], "<i4").tofile(f"{prefix}.bin")


def test_a_megatron_index_of_millions_of_empty_documents_stays_in_memory(tmp_path):
    from measure import run_measured

    peaks = {}
    for documents in (2, 4_000_000):  # the second index's document indices alone are 32 MB
        _megatron_of_empty_documents(tmp_path / f"m{documents}", documents)
        proc, peaks[documents] = run_measured(
            "inspect", "demo", "--corpus", f"m{documents}", "--max-memory", "64", "--json", cwd=tmp_path
        )
        assert proc.returncode == 0, proc.stderr
        assert json.loads(proc.stdout)["corpus"]["tokens"] == 5
    assert peaks[4_000_000] < peaks[2] + (16 << 20), {k: v >> 20 for k, v in peaks.items()}


# ---- 5. non-finite rows of an imported model folder ----------------------------------------------


def test_a_model_folder_with_nan_scales_is_refused_or_counted(tmp_path):
    import torch
    from safetensors.torch import load_file, save_file

    from model_folders import write_model

    folder = tmp_path / "model"
    write_model(folder)
    index = json.loads((folder / "model.safetensors.index.json").read_text())
    shard = folder / index["weight_map"]["layers.5.engram.embed.scale"]
    tensors = load_file(str(shard))
    scale = tensors["layers.5.engram.embed.scale"].view(torch.uint8).clone()
    scale[[3, 9]] = 255  # NaN in the OCP MX specification: rows 3 and 9 become all NaN
    scale[4, 0] = 255  # one block of row 4: a row with some non-finite values
    tensors["layers.5.engram.embed.scale"] = scale.view(torch.float8_e8m0fnu)
    save_file(tensors, str(shard), metadata={"format": "pt"})

    line = refused(tmp_path, "import", str(folder), "-o", str(tmp_path / "store.zarr"), match="layer 5: row 3")
    assert "--allow-nonfinite" in line
    proc = run_engram("import", str(folder), "-o", str(tmp_path / "store.zarr"), "--allow-nonfinite", "--json")
    assert proc.returncode == 0, proc.stderr
    layers = json.loads(proc.stdout)["layers"]
    assert layers["5"]["all_nonfinite_rows"] == 2 and layers["5"]["nonfinite_rows"] >= 3
    assert layers["2"]["all_nonfinite_rows"] == 0 and set(layers["2"]) >= {"rows", "nonfinite_rows"}


def test_gzip_members_stay_read_whole(tmp_path):
    """Multi-member gzip, read whole before, still is (the streams reader is not used for it)."""
    part = "".join(t + "\n" for t in TEXTS[:30]).encode()
    (tmp_path / "two.txt.gz").write_bytes(gzip.compress(part) + gzip.compress(part))
    assert corpus_json(str(tmp_path / "two.txt.gz"), "--doc-per", "line")["documents"] == 60
