"""GGUF export and import against baselines measured in the same run, with peak memory.

The store is the demo spec with 64 values per head row and its head sizes scaled by `--scale`
(float32 tables, 205 MB at 1). Export
(`engram export --layout gguf --quant q8_0`, streamed) runs against the `gguf` package's own way
(the whole table read, `gguf.quants.quantize`, `GGUFWriter` writing the file) and against a plain
sequential write of as many bytes (8 MiB writes, fsync); import (`engram import` of that GGUF into
a store) and reading its tables alone (`GgufSource`, dequantized to float32) against a plain
sequential read of the file (from the page cache, as it was just written), and against writing
the float32 values such a read returns (fresh blocks, no decoding: the floor of any dequantizing
read). Candidates are interleaved, medians of
`--repeats`. Peak RSS (VmHWM of a fresh process) of the export and the import shows that memory
does not grow with the tables (rows are streamed).

    .venv/bin/python benchmarks/bench_gguf.py [--scale 1] [--repeats 3] [--workdir DIR]
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import gguf
import numpy as np
from engram_cli.checkpoints.gguf_export import export_gguf
from engram_cli.checkpoints.gguf_format import tensor_name
from engram_cli.checkpoints.gguf_source import GgufSource
from engram_cli.checkpoints.importing import import_checkpoint
from engram_cli.spec import load_spec
from engram_cli.store.build import build_tables
from engram_cli.store.tables import open_tables

from common import cpu_model, interleaved, markdown_table

ROOT = Path(__file__).resolve().parent.parent
_CHUNK = 8 << 20
_ROWS = 1 << 15  # rows per read, as an import's store shard


def package_export(store: Path, out: Path) -> None:
    """The gguf package's way: each whole table quantized by `gguf.quants`, written by GGUFWriter."""
    tables = open_tables(store)
    writer = gguf.GGUFWriter(out, "deepseek41")
    for layer in tables.layer_ids:
        values = np.asarray(tables.read_rows(layer, 0, tables.spec.rows(layer)), dtype=np.float32)
        writer.add_tensor(
            tensor_name(layer),
            gguf.quants.quantize(values, gguf.GGMLQuantizationType.Q8_0),
            raw_dtype=gguf.GGMLQuantizationType.Q8_0,
        )
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    out.unlink()


def plain_write(out: Path, size: int) -> None:
    block = np.ones(_CHUNK, dtype=np.uint8).tobytes()
    with out.open("wb") as handle:
        for start in range(0, size, _CHUNK):
            handle.write(block[: min(_CHUNK, size - start)])
        handle.flush()
        os.fsync(handle.fileno())
    out.unlink()


def plain_read(path: Path) -> None:
    with path.open("rb", buffering=0) as handle:
        while handle.read(_CHUNK):
            pass


def plain_fill(rows: int, dim: int) -> None:
    """The float32 values a dequantizing read returns, written as fresh blocks of `_ROWS` rows
    from values in cache: the memory traffic any import must make, with no decoding."""
    values = np.ones((_ROWS, dim), dtype=np.float32)
    for begin in range(0, rows, _ROWS):
        n = min(_ROWS, rows - begin)
        np.empty((n, dim), dtype=np.float32)[:] = values[:n]


def peak_rss(code: str) -> tuple[int, int]:
    """(RSS high-water mark after imports, at the end) of a fresh process running `code` (VmHWM)."""
    script = (
        "import torch, gguf, engram_cli.checkpoints.gguf_export, engram_cli.checkpoints.importing\n"
        "hwm = lambda: int(next(l for l in open('/proc/self/status') if l.startswith('VmHWM')).split()[1])\n"
        "before = hwm()\n"
        f"{code}\n"
        "print(before, hwm())\n"
    )
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True, env=env)
    before, after = done.stdout.split()[-2:]
    return int(before) * 1024, int(after) * 1024


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--scale", type=float, default=1.0)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--workdir", type=Path, default=None)
    args = parser.parse_args()
    root = Path(tempfile.mkdtemp(prefix="bench-gguf-", dir=args.workdir))
    try:
        spec = load_spec("demo").scaled(args.scale).replace(dtype="float32", n_embed_per_ngram=256)  # 64 per head
        store = root / "store.zarr"
        build_tables(spec, store)
        table_bytes = spec.parameters * 4
        tables = root / "tables.gguf"
        export_gguf(store, tables, quant="q8_0")  # also compiles the kernels
        size = tables.stat().st_size
        count = iter(range(1 << 30))

        def ours() -> None:
            out = root / f"ours-{next(count)}.gguf"
            export_gguf(store, out, quant="q8_0")
            out.unlink()

        def imported() -> None:
            out = root / f"back-{next(count)}"
            import_checkpoint(tables, out)
            shutil.rmtree(out)

        exports = interleaved(
            {
                "plain sequential write of the output bytes (baseline)": lambda: plain_write(root / "plain", size),
                "gguf package: quants.quantize + GGUFWriter": lambda: package_export(store, root / "package.gguf"),
                "engram export --layout gguf --quant q8_0": ours,
            },
            args.repeats,
        )

        def read_tables() -> None:
            source = GgufSource(tables, None, None, None)
            for layer in source.layer_ids:
                reader = source.layer(layer)
                for begin in range(0, reader.rows, _ROWS):
                    reader.read(begin, min(begin + _ROWS, reader.rows))

        imports = interleaved(
            {
                "plain sequential read of the GGUF (baseline)": lambda: plain_read(tables),
                "plain write of the float32 values in blocks (memory floor)": lambda: plain_fill(
                    sum(spec.rows(layer) for layer in spec.layer_ids), spec.dim
                ),
                "GGUF tables read and dequantized (GgufSource)": read_tables,
                "engram import (read, dequantize, write the float32 store)": imported,
            },
            args.repeats,
        )
        print(
            f"{cpu_model()}, {os.cpu_count()} logical CPUs; tables {table_bytes / 1e6:.0f} MB float32, "
            f"GGUF {size / 1e6:.0f} MB (Q8_0)\n"
        )
        ours_s = exports["engram export --layout gguf --quant q8_0"]
        rows = [[name, f"{s:.3f}", f"{size / 1e6 / s:.0f}", f"{s / ours_s:.2f}x"] for name, s in exports.items()]
        print(markdown_table(["export", "median s", "output MB/s", "time vs engram"], rows))
        print()
        ours_i = imports["engram import (read, dequantize, write the float32 store)"]
        rows = [[name, f"{s:.3f}", f"{size / 1e6 / s:.0f}", f"{s / ours_i:.2f}x"] for name, s in imports.items()]
        print(markdown_table(["import", "median s", "GGUF MB/s", "time vs engram"], rows))
        rss_rows = []
        for name, code in [
            (
                "export q8_0",
                f"engram_cli.checkpoints.gguf_export.export_gguf({str(store)!r}, {str(root / 'rss.gguf')!r})",
            ),
            ("import", f"engram_cli.checkpoints.importing.import_checkpoint({str(tables)!r}, {str(root / 'rss')!r})"),
        ]:
            before, after = peak_rss(code)
            rss_rows.append(
                [
                    name,
                    f"{table_bytes / 1e6:.0f}",
                    f"{before / 1e6:.0f}",
                    f"{after / 1e6:.0f}",
                    f"{(after - before) / 1e6:.0f}",
                ]
            )
        print()
        print(markdown_table(["peak RSS", "tables MB (f32)", "after imports MB", "peak MB", "added MB"], rss_rows))
    finally:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
