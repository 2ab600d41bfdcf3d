"""The documented Python API works as a new user meets it: every Python example of README.md and
docs/python-api.md runs in a fresh interpreter of its own, in a folder holding the stores, exports
and files it names (made beforehand by the real CLI, in other processes), and what it computes is
checked by a few lines appended to it.

A fresh interpreter matters: a process that built a store had registered zarr's bfloat16 data
type as a side effect, and reads of a store made by another process failed without it.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import textwrap
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from conftest import ROOT, letters_tokenizer, run_engram
from corpus_forms import write_megatron
from model_folders import write_model
from test_docs import python_blocks

# A demo spec whose rows are 32 values per head, fp8's block: what a deepseek-v41 export needs.
T_SPEC = (ROOT / "tables" / "demo.toml").read_text().replace("n_embed_per_ngram = 64", "n_embed_per_ngram = 128")
T_SPEC = T_SPEC.replace("engram_vocab_size = [50000, 50000]", "engram_vocab_size = [5000, 5000]")


@pytest.fixture(scope="module")
def made(tmp_path_factory) -> Path:
    """The files the examples name, each made as a user makes it: stores and exports by the CLI."""
    root = tmp_path_factory.mktemp("made")
    (root / "t.toml").write_text(T_SPEC)
    for args in (
        ("build-tables", "demo", "-o", "demo.zarr"),
        ("build-tables", "t.toml", "-o", "t.zarr"),
        ("export", "demo.zarr", "--for", "inference", "-o", "demo.safetensors"),
        ("export", "t.zarr", "--for", "inference", "--layout", "deepseek-v41", "-o", "t-fp8"),
        ("compress-vocab", "embedded:deepseek-v3", "-o", "projection.safetensors"),
    ):
        run_engram(*args, check=True, cwd=root)
    letters_tokenizer().save(str(root / "tokenizer.json"))
    write_model(root / "v41-model")
    (root / "data").mkdir()
    for k, text in enumerate(["the cat sat on the mat", "a dog and a cat", "the mat is red and the cat is not"]):
        (root / "data" / f"{k}.txt").write_text(text * 20)
    ids = np.array([100, 2000, 30000, 1, 100, 2000, 5, 1, 7, 100, 2000], np.uint32)
    ids.tofile(root / "train.bin")
    (root / "tokenized").mkdir()
    table = pa.table({"input_ids": [[100, 2000, 30000, 5], [100, 2000, 7]]})
    pq.write_table(table, root / "tokenized" / "part-0.parquet")
    (root / "megatron").mkdir()
    write_megatron(root / "megatron" / "corpus_text_document", [[100, 2000, 30000], [5, 100, 2000, 30000, 9]])
    return root


def run_python(code: str, cwd: Path) -> subprocess.CompletedProcess:
    """`code` in a new interpreter: nothing imported or registered before it."""
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=cwd, timeout=600)


def test_a_fresh_process_reads_a_bf16_store_made_by_the_cli(made, tmp_path):
    """The regression: `open_tables(...).table(1)[:2]` and `.lookup` of a bf16 store failed with
    "No Zarr data type found that matches 'bfloat16'" unless a build ran in the same process, and
    so did zarr's own `open_array` after `import engram_cli`."""
    code = textwrap.dedent(
        """
        import engram_cli as engram

        store = engram.open_tables("demo.zarr")
        assert store.dtype == "bfloat16"
        head = store.table(1)[:2]
        assert head.shape == (2, store.spec.dim), head.shape
        values = store.lookup(1, [[0, 1]])
        assert values.shape == (1, 2, store.spec.dim), values.shape
        assert (values[0].astype("float32") == head.astype("float32")).all()
        print("ok")
        """
    )
    proc = run_python(code, made)
    assert proc.returncode == 0 and proc.stdout.strip() == "ok", proc.stderr
    for order in ("import engram_cli\nimport zarr", "import zarr\nimport engram_cli"):
        code = f"{order}\narray = zarr.open_array('demo.zarr/layer_1', mode='r')\nprint(array.dtype, array[:2].shape)"
        proc = run_python(code, made)
        assert proc.returncode == 0, proc.stderr
        assert proc.stdout.split()[0] == "bfloat16"


def test_import_engram_cli_loads_neither_zarr_nor_torch():
    """The registration waits for zarr: `import engram_cli` (every CLI start) stays light."""
    code = "import sys, engram_cli\nprint(sorted({m.split('.')[0] for m in sys.modules} & {'zarr', 'torch', 'numba'}))"
    proc = run_python(code, ROOT)
    assert proc.returncode == 0 and proc.stdout.strip() == "[]", proc.stdout + proc.stderr


@dataclass(frozen=True)
class Example:
    """What an example needs in its folder, and the lines run after it that check its results."""

    inputs: tuple[str, ...]
    check: str


README = [
    Example((), "assert values.shape == (1, 4, 8, 16), values.shape\nassert store.dtype == 'bfloat16'"),
]

PYTHON_API = [
    Example((), "assert engram.EngramError and engram.TableStore"),
    Example(
        ("tokenizer.json", "v41-model"),
        "assert projection.vocab_size == 40 and projection.compressed_size < projection.vocab_size\n"
        "assert spec.compressed_vocab_size == 98627 and spec.tokenizer == 'embedded:deepseek-v3'\n"
        "assert spec_projection(spec).compressed_size == 98627",
    ),
    Example(
        (),
        "rows, buckets = hasher.rows(ids), hasher.hash(ids)\n"
        "assert sorted(rows) == [2, 15] and rows[2].shape == (1, 4, len(hasher.head_sizes(2)))\n"
        "assert all((rows[k] == buckets[k] + hasher.offsets(k)).all() for k in rows)\n"
        "assert all((buffers[k] == rows[k]).all() for k in rows)",
    ),
    Example((), "assert sorted(prefill) == sorted(whole) and fresh[sorted(fresh)[0]].shape[:2] == (2, 1)"),
    Example(
        ("demo.zarr",),
        "assert store.lookup(1, rows[1]).shape == (1, 4, 8, 16)\n"
        "assert engram.open_tables('t.zarr').partition(1) and len(engram.open_tables('t.zarr').partition(1)) == 2",
    ),
    Example(
        (),
        "import zarr\n"
        "assert (engram.open_tables('t.zarr').read_rows(3, 0, 10) == 0).all()\n"
        "start, stop = out.shard_ranges(1)[0]\n"
        "assert zarr.open_array('g.zarr/layer_1')[start:stop].astype(np.float32).any()",
    ),
    Example(
        ("demo.safetensors", "t-fp8", "t.toml", "projection.safetensors"),
        "assert out[1].shape == (1, 4, 8, 16) and (rows == out[1]).all()\n"
        "assert traffic.hits == 0 and traffic.misses == 3 * 4 * 8 and traffic.layers[3]['misses'] == 4 * 8\n"
        "assert ds.lookup(input_ids)[1].shape == (1, 4, 8, 32)",
    ),
    Example(
        ("demo.zarr", "t.zarr", "t.toml", "projection.safetensors"),
        "back = engram.open_tables('back.zarr')\n"
        "assert (back.read_rows(1, 0, 10) == engram.open_tables('demo.zarr').read_rows(1, 0, 10)).all()\n"
        "assert engram.open_tables('back-fp8.zarr').layer_ids == (1,)",
    ),
    Example(
        ("demo.zarr", "data", "train.bin", "tokenized", "megatron"),
        "assert report.to_json() and health.to_json()\n"
        "assert sorted(corpus.summary.to_json()['formats']) == ['megatron', 'parquet']",
    ),
    Example(("data",), "assert report.to_json() and report.corpus.tokens > 0"),
    Example(("demo.zarr",), "assert engram.open_tables('demo.zarr').layer_ids == (1, 3)"),
]

EXAMPLES = [("README.md", n, e) for n, e in enumerate(README)] + [
    ("docs/python-api.md", n, e) for n, e in enumerate(PYTHON_API)
]


@pytest.mark.parametrize("page", ["README.md", "docs/python-api.md"])
def test_every_python_example_has_its_check(page):
    """A new example in the docs needs an entry above, so it runs too."""
    listed = README if page == "README.md" else PYTHON_API
    assert len(python_blocks(ROOT / page)) == len(listed)


@pytest.mark.slow
@pytest.mark.parametrize("page,index,example", EXAMPLES, ids=[f"{p}[{n}]" for p, n, _ in EXAMPLES])
def test_python_example_runs_in_a_fresh_interpreter(made, tmp_path, page, index, example):
    for name in example.inputs:
        source = made / name
        if source.is_dir():
            shutil.copytree(source, tmp_path / name)
        else:
            shutil.copy(source, tmp_path / name)
    code = python_blocks(ROOT / page)[index] + "\n\n" + example.check + "\nprint('example ok')\n"
    proc = run_python(code, tmp_path)
    assert proc.returncode == 0, f"{page} example {index} failed:\n{proc.stderr[-4000:]}"
    assert proc.stdout.strip().endswith("example ok")
