"""build-tables: bfloat16 parameters per second and peak memory, against two baselines.

Baselines measured in the same run, interleaved with ours:
  * torch normal_: `torch.empty(n).normal_()` on all cores (float32, nothing written): the
    speed a user's own init loop could at best reach before converting and writing;
  * naive zarr loop: torch normal_ per shard, cast to bfloat16, `array[a:b] = x` into a zarr
    array with the same sharding and checksums (what a generate-then-write script does).
Ours is `build_tables` on the same spec, writing a complete store. Peak RSS comes from a
separate `engram build-tables` process. `--full` also builds the engram-27b preset once
(5.8 B parameters, 11.6 GB) and reports its time and peak RSS, then deletes it.

    .venv/bin/python benchmarks/bench_build.py [--scale 0.25] [--repeats 3] [--full]
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import zarr
from zarr.codecs import Crc32cCodec

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from engram_cli.spec import load_spec
from engram_cli.store.build import build_tables
from engram_cli.store.layout import plan_layout
from engram_cli.store.zarr_bfloat16 import BFloat16
from engram_cli.vocab import VocabProjection

from common import interleaved, markdown_table

ROOT = Path(__file__).resolve().parent.parent
TORCH_BLOCK = 1 << 26


def torch_normal(parameters: int) -> None:
    block = torch.empty(min(parameters, TORCH_BLOCK))
    done = 0
    while done < parameters:
        block.normal_()
        done += block.numel()


def naive_zarr(spec, path: Path) -> None:
    group = zarr.open_group(str(path), mode="w")
    for layer, layout in plan_layout(spec).items():
        array = group.create_array(
            f"layer_{layer}",
            shape=(layout.rows, layout.dim),
            dtype=BFloat16(),
            chunks=(layout.chunk_rows, layout.dim),
            shards=(layout.shard_rows, layout.dim),
            compressors=[Crc32cCodec()],
            fill_value=0.0,
        )
        for start, stop in layout.shard_ranges():
            values = torch.empty(stop - start, layout.dim).normal_().to(torch.bfloat16)
            array[start:stop] = values.view(torch.int16).numpy().view(BFloat16().to_native_dtype())


def cli_build(spec: str, out: Path, *extra: str) -> dict:
    proc = subprocess.run(
        [sys.executable, "-m", "engram_cli", "build-tables", spec, "-o", str(out), "--overwrite", "--json", *extra],
        capture_output=True,
        text=True,
        cwd=ROOT,
        check=True,
    )
    return json.loads(proc.stdout)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--scale", type=float, default=0.25, help="engram-demo-v1 scaled by this")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--full", action="store_true", help="also build engram-27b once")
    parser.add_argument("--workdir", default=None, help="where stores go (default: a temp dir)")
    args = parser.parse_args()

    spec = load_spec("engram-demo-v1").scaled(args.scale)
    projection = VocabProjection(np.arange(129280) % 1000, {}, None)
    work = Path(args.workdir or tempfile.mkdtemp(prefix="bench-build-"))
    work.mkdir(parents=True, exist_ok=True)
    ours_path, naive_path = work / "ours.zarr", work / "naive.zarr"
    params = spec.parameters
    build_tables(spec, ours_path, projection=projection, overwrite=True)  # compile
    medians = interleaved(
        {
            "torch normal_ (no write)": lambda: torch_normal(params),
            "naive zarr loop": lambda: naive_zarr(spec, naive_path),
            "engram build-tables": lambda: build_tables(spec, ours_path, projection=projection, overwrite=True),
        },
        args.repeats,
    )
    spec_file = work / "bench.toml"
    spec_file.write_text(_toml(spec))
    rss = cli_build(str(spec_file), work / "rss.zarr")["peak_rss_bytes"]
    base = params / medians["torch normal_ (no write)"]
    rows = []
    for name, seconds in medians.items():
        rate = params / seconds
        rows.append(
            [
                name,
                f"{seconds:.2f}",
                f"{rate / 1e6:.0f}",
                f"{rate / base:.2f}x",
                f"{rss / 2**30:.2f} GiB" if name == "engram build-tables" else "",
            ]
        )
    print(
        f"{spec.name}: {params:,} bfloat16 parameters ({params * 2 / 1e9:.2f} GB), "
        f"{args.repeats} interleaved repeats, {torch.get_num_threads()} torch threads\n"
    )
    print(markdown_table(["method", "median s", "M params/s", "vs torch normal_", "peak RSS"], rows))

    if args.full:
        torch_rate = TORCH_BLOCK * 4 / min(_timed(lambda: torch_normal(TORCH_BLOCK * 4)) for _ in range(3))
        started = time.perf_counter()
        result = cli_build("engram-27b", work / "engram-27b.zarr")
        wall = time.perf_counter() - started
        rate = result["parameters_per_second"]
        print(
            f"\nengram-27b: {result['total']['parameters']:,} parameters, "
            f"{result['total']['bytes'] / 1e9:.1f} GB in {result['seconds']:.0f} s "
            f"({wall:.0f} s with start-up), {rate / 1e6:.0f} M params/s "
            f"({rate / torch_rate:.2f}x torch normal_ at {torch_rate / 1e6:.0f} M/s), "
            f"peak RSS {result['peak_rss_bytes'] / 2**30:.2f} GiB"
        )
        shutil.rmtree(work / "engram-27b.zarr")
    if args.workdir is None:
        shutil.rmtree(work)


def _timed(fn) -> float:
    started = time.perf_counter()
    fn()
    return time.perf_counter() - started


def _toml(spec) -> str:
    e = spec.to_dict()["engram"]
    return (
        f"[engram]\nlayer_ids = {e['layer_ids']}\nmax_ngram_size = {e['max_ngram_size']}\n"
        f"n_head_per_ngram = {e['n_head_per_ngram']}\nengram_vocab_size = {e['engram_vocab_size']}\n"
        f"n_embed_per_ngram = {e['n_embed_per_ngram']}\npad_id = {e['pad_id']}\nseed = {e['seed']}\n"
        f'[table]\ndtype = "bfloat16"\n'
    )


if __name__ == "__main__":
    main()
