"""engram export (both targets) against sequential writes, and EngramTables against index_select.

Baselines measured in the same run, interleaved with ours:
  * sequential write: the store's bytes written in 32 MiB blocks to one file on the same disk,
    then fsync (our exports fsync too): the disk's own speed, and what the ratios are against;
  * the same with writeback started after each block, as the exports start it after each of
    theirs (`safetensors_io.start_writeback`): shown for reference, so the part of the exports'
    speed that comes from overlapping disk writes with their work is visible;
  * torch.index_select on the same table held in RAM: what the mmap read path is compared to,
    once its pages are resident.
Peak RSS of each export comes from a separate process, against that process's RSS right after
its imports. The table is DeepSeek-V4.1-Flash's spec (dim 256, 24 heads) scaled down.

    .venv/bin/python benchmarks/bench_export.py [--scale 0.0013] [--repeats 3] [--workdir DIR]
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from engram_cli.checkpoints.dcp_export import export_training
from engram_cli.checkpoints.safetensors_export import export_inference
from engram_cli.checkpoints.safetensors_format import start_writeback
from engram_cli.checkpoints.tables import EngramTables
from engram_cli.spec import load_spec
from engram_cli.store.build import build_tables
from engram_cli.vocab import VocabProjection

from common import markdown_table

ROOT = Path(__file__).resolve().parent.parent
BLOCK = 32 << 20


def sequential_write(path: Path, nbytes: int, writeback: bool = False) -> int:
    block = np.random.default_rng(0).integers(0, 255, BLOCK, dtype=np.uint8).tobytes()
    with open(path, "wb") as handle:
        written = 0
        while written < nbytes:
            count = handle.write(block[: min(BLOCK, nbytes - written)])
            if writeback:
                handle.flush()
                start_writeback(handle.fileno(), written, count)
            written += count
        handle.flush()
        os.fsync(handle.fileno())
    return nbytes


def clear(path: Path) -> None:
    if path.is_dir():
        shutil.rmtree(path)
    elif path.exists():
        path.unlink()


def timed_runs(candidates: dict[str, tuple[Path, Callable[[], int]]], repeats: int) -> dict[str, tuple[float, int]]:
    """Median seconds and bytes written of each candidate, interleaved, outputs removed untimed."""
    times: dict[str, list[float]] = {name: [] for name in candidates}
    sizes: dict[str, int] = {}
    for _ in range(repeats):
        for name, (target, run) in candidates.items():
            clear(target)
            os.sync()
            start = time.perf_counter()
            sizes[name] = run()
            times[name].append(time.perf_counter() - start)
    return {name: (statistics.median(values), sizes[name]) for name, values in times.items()}


def peak_rss(code: str) -> tuple[int, int]:
    """(RSS high-water mark after imports, at the end) of a fresh process running `code`.

    VmHWM, not ru_maxrss: Linux carries ru_maxrss over from the parent across fork and exec.
    """
    script = (
        "import torch, engram_cli.checkpoints.dcp_export, engram_cli.checkpoints.safetensors_export\n"
        "import engram_cli.store.build\n"
        "hwm = lambda: int(next(l for l in open('/proc/self/status') if l.startswith('VmHWM')).split()[1])\n"
        "before = hwm()\n"
        f"{code}\n"
        "print(before, hwm())\n"
    )
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True, cwd=ROOT)
    before, after = out.stdout.split()[-2:]
    return int(before) * 1024, int(after) * 1024


def rows_per_second(fn: Callable[[], object], rows: int, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return rows / statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--scale", type=float, default=0.0013, help="deepseek-v4.1-flash scaled by this")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--workdir", default=None, help="where stores and exports go (default: bench-out/)")
    args = parser.parse_args()

    work = Path(args.workdir or ROOT / "bench-out")
    work.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="export-", dir=work))
    spec = load_spec("deepseek-v4.1-flash").scaled(args.scale)
    projection = VocabProjection(np.arange(129_280) % 99_092)
    store = work / "store"
    build_tables(spec, store, projection=projection)
    store_bytes = spec.parameters * 2
    print(
        f"store: {spec.name}, {spec.total_rows:,} rows x {spec.dim}, bfloat16, {store_bytes / 1e6:.0f} MB; "
        f"{args.repeats} interleaved repeats, medians\n"
    )

    outs = {name: work / name for name in ("seq.bin", "seq-wb.bin", "dcp", "engram", "fp8")}
    candidates = {
        "sequential write + fsync (baseline)": (
            outs["seq.bin"],
            lambda: sequential_write(outs["seq.bin"], store_bytes),
        ),
        "the same, writeback started per block (reference)": (
            outs["seq-wb.bin"],
            lambda: sequential_write(outs["seq-wb.bin"], store_bytes, writeback=True),
        ),
        "export --for training (DCP, bfloat16)": (
            outs["dcp"],
            lambda: export_training(store, outs["dcp"]).bytes,
        ),
        "export --for inference (engram, bfloat16)": (
            outs["engram"],
            lambda: export_inference(store, outs["engram"]).bytes,
        ),
        "export --for inference (deepseek-v41, fp8)": (
            outs["fp8"],
            lambda: export_inference(store, outs["fp8"], layout="deepseek-v41").bytes,
        ),
    }
    results = timed_runs(candidates, args.repeats)
    base_seconds, base_bytes = results["sequential write + fsync (baseline)"]
    base_rate = base_bytes / base_seconds
    ref_seconds, ref_bytes = results["the same, writeback started per block (reference)"]
    ref_rate = ref_bytes / ref_seconds
    rows = [
        [
            name,
            f"{nbytes / 1e6:.0f}",
            f"{seconds:.2f}",
            f"{nbytes / seconds / 1e6:.0f}",
            f"{nbytes / seconds / base_rate:.2f}x",
            f"{nbytes / seconds / ref_rate:.2f}x",
        ]
        for name, (seconds, nbytes) in results.items()
    ]
    print(markdown_table(["export", "MB written", "median s", "MB/s", "vs sequential write", "vs the reference"], rows))

    rss_rows = []
    for name, code in [
        (
            "export --for training",
            f"from engram_cli.checkpoints.dcp_export import export_training; "
            f"export_training({str(store)!r}, {str(work / 'rss-dcp')!r})",
        ),
        (
            "export --for inference, fp8",
            f"from engram_cli.checkpoints.safetensors_export import export_inference; "
            f"export_inference({str(store)!r}, {str(work / 'rss-fp8')!r}, "
            "layout='deepseek-v41')",
        ),
    ]:
        before, after = peak_rss(code)
        rss_rows.append(
            [
                name,
                f"{store_bytes / 1e6:.0f}",
                f"{before / 1e6:.0f}",
                f"{after / 1e6:.0f}",
                f"{(after - before) / 1e6:.0f}",
            ]
        )
    print()
    print(markdown_table(["peak RSS", "table MB", "after imports MB", "peak MB", "added by the export MB"], rss_rows))

    layer = spec.layer_ids[0]
    engram = EngramTables.open(outs["engram"])
    fp8 = EngramTables.open(outs["fp8"], spec=spec, projection=projection)
    mapped = engram.weight(layer)
    in_ram = mapped.clone()
    float(mapped.float().sum())  # fault every page in: the comparison is for resident pages
    float(fp8.weight(layer).float().sum() + fp8.scale(layer).float().sum())
    batch, length = 8, 4096
    ids = np.random.default_rng(1).integers(0, projection.vocab_size, (batch, length))
    index = torch.from_numpy(engram.hasher().rows(ids, layers=[layer])[layer]).reshape(-1)
    count = index.numel()
    gather = {
        "torch.index_select, table in RAM (baseline)": lambda: torch.index_select(in_ram, 0, index),
        "EngramTables.gather, mmap, bfloat16": lambda: engram.gather(layer, index),
        "EngramTables.gather, mmap, fp8 -> bfloat16": lambda: fp8.gather(layer, index),
        "EngramTables.lookup (hash + gather), bfloat16": lambda: engram.lookup(ids, layers=[layer]),
    }
    repeats = max(5, args.repeats * 3)
    rates: dict[str, list[float]] = {name: [] for name in gather}
    for _ in range(repeats):
        for name, fn in gather.items():
            rates[name].append(rows_per_second(fn, count, 1))
    base = statistics.median(rates["torch.index_select, table in RAM (baseline)"])
    print()
    print(
        f"gathers of {count:,} random rows ({batch} x {length} tokens x {spec.heads_per_layer} heads) "
        f"from a {mapped.shape[0]:,} x {mapped.shape[1]} table, {repeats} interleaved repeats:\n"
    )
    print(
        markdown_table(
            ["read path", "M rows/s", "time vs index_select"],
            [
                [name, f"{statistics.median(r) / 1e6:.2f}", f"{base / statistics.median(r):.2f}x"]
                for name, r in rates.items()
            ],
        )
    )
    shutil.rmtree(work)


if __name__ == "__main__":
    main()
