"""Progress and the numbers reports print: a byte pass shows units and ends at 100 % when it
ends (also when --max-tokens stops it early), a Progress without `byte_task` still works, and
the fp8 kernels are compiled before an export or import starts its clock."""

from __future__ import annotations

import io

import numpy as np
import torch
from engram_cli import CorpusOptions, collision_statistics, default_projection, load_spec
from engram_cli.checkpoints import fp8_kernels
from engram_cli.checkpoints.fp8 import dequantize, quantize, warm_dequantize, warm_quantize
from engram_cli.cli.render import RichProgress, _CountColumn
from engram_cli.corpus import Corpus
from rich.console import Console
from rich.progress import Progress


class Passes:
    """A Progress that keeps each task's total, units done and kind (bytes or plain units)."""

    def __init__(self, *, with_bytes: bool) -> None:
        self.tasks: list[dict] = []
        if with_bytes:
            self.byte_task = lambda description, total=None: self._start(description, total, True)

    def task(self, description, total=None):
        return self._start(description, total, False)

    def _start(self, description, total, is_bytes):
        record = {"description": description, "total": total, "done": 0, "bytes": is_bytes}
        self.tasks.append(record)

        class Task:
            def advance(self, amount=1, *, note=None):
                record["done"] += amount

            def update(self, completed, *, note=None):
                record["done"] = completed

        return Task()


def test_count_column_shows_bytes_in_units_and_counts_with_separators():
    bars = Progress(console=Console(file=io.StringIO(), force_terminal=True))
    progress = RichProgress(bars)
    progress.byte_task("counting n-grams", 4_102_633).update(4_092_009)
    progress.task("export", 1_234_567).update(1_000)
    column = _CountColumn()
    reading, export = bars.tasks
    assert column.render(reading).plain == "4.1 MB/4.1 MB"
    assert column.render(export).plain == "1,000/1,234,567"


def test_the_byte_pass_of_counting_ends_at_its_total(tmp_path):
    """The reading pass ends with its task at 100 %, in bytes, however far the reader's own count
    got (--max-tokens may stop it early); a Progress without `byte_task` gets a plain task."""
    folder = tmp_path / "corpus"
    folder.mkdir()
    for k in range(400):
        (folder / f"{k:03}.txt").write_text(f"document {k}: the cat sat on the mat and the dog sat on the log. " * 40)
    size = sum(f.stat().st_size for f in folder.iterdir())
    spec, projection = load_spec("demo"), default_projection()
    for with_bytes in (True, False):
        progress = Passes(with_bytes=with_bytes)
        corpus = Corpus([folder], projection, CorpusOptions(max_tokens=500))
        collision_statistics(spec, projection, corpus, progress=progress)
        reading = next(t for t in progress.tasks if t["description"] == "counting n-grams")
        assert reading["bytes"] is with_bytes
        assert reading["total"] == size
        assert reading["done"] == reading["total"]


def test_warm_up_compiles_the_signatures_exports_and_imports_use():
    """After `warm_quantize(dtype)`, quantizing rows of that dtype compiles nothing more (the
    export's clock starts after the warm-up); the same for `warm_dequantize` and an import."""
    rng = np.random.default_rng(0)
    for dtype in (torch.bfloat16, torch.float32, torch.float16):
        warm_quantize(dtype)
        compiled = len(fp8_kernels.quantize_rows.signatures)
        codes, scales = quantize(torch.from_numpy(rng.standard_normal((300, 64), dtype=np.float32)).to(dtype))
        assert len(fp8_kernels.quantize_rows.signatures) == compiled
    warm_dequantize()
    compiled = len(fp8_kernels.gather_float32.signatures)
    dequantize(codes[7:200], scales[7:200], torch.float32)
    assert len(fp8_kernels.gather_float32.signatures) == compiled
