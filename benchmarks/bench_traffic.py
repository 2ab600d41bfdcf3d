"""`engram inspect --traffic` against the same `inspect` without it: the cost of row traffic.

The corpus is `bench_inspect_scale`'s (seeded Zipf ids over the DeepSeek-V3 vocabulary, a
separator about every 2,000 tokens, spec engram-demo-v1); each run is the real command in a fresh
process, timed end to end with numba's cache warm. Runs alternate (without, with, without, ...) so
both see the same load, and the collision figures of both must be identical. Target (issue 20):
with --traffic at least 0.7x the tokens/s without (at 200 M tokens; --tokens picks the size).

    .venv/bin/python benchmarks/bench_traffic.py [--tokens 200000000] [--repeats 1] [--budget 1024] [--dask]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from engram_cli.vocab import default_projection

from bench_inspect_scale import corpus, run
from common import markdown_table


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--tokens", type=int, default=200_000_000, help="corpus size")
    parser.add_argument("--repeats", type=int, default=1, help="runs of each (medians)")
    parser.add_argument("--budget", type=int, default=1024, help="--max-memory (MiB)")
    parser.add_argument("--data", type=Path, default=None, help="where to keep the generated corpus")
    parser.add_argument("--dask", action="store_true", help="on a 2-worker LocalCluster instead")
    args = parser.parse_args()
    data = args.data or Path(tempfile.mkdtemp(prefix="engram-bench-traffic-"))
    data.mkdir(parents=True, exist_ok=True)
    path = corpus(data, args.tokens, default_projection().vocab_size)
    env = {**os.environ, "COLUMNS": "200"}
    base = ["inspect", "engram-demo-v1", "--corpus", str(path), "--bin-dtype", "uint32", "--doc-sep", "1"]
    base += ["--max-memory", str(args.budget)] + (["--dask-workers", "2"] if args.dask else [])
    tiny = data / "tiny.bin"
    np.fromfile(path, np.uint32, count=200_000).tofile(tiny)
    run(
        ["inspect", "engram-demo-v1", "--corpus", str(tiny), "--bin-dtype", "uint32", "--doc-sep", "1", "--traffic"],
        env,
    )
    variants = {
        "without --traffic": [],
        "with --traffic": ["--traffic", "--hot-rows", str(data / "hot.safetensors"), "--hot-bytes", "64MiB"],
    }
    runs: dict[str, list[dict]] = {name: [] for name in variants}
    for _ in range(args.repeats):
        for name, extra in variants.items():
            print(f"running {args.tokens:,} tokens {name} ...", flush=True)
            runs[name].append(run([*base, *extra], env))
    rows = []
    rate = {}
    for name, results in runs.items():
        wall = statistics.median(r["wall"] for r in results)
        tokens = results[0]["json"]["corpus"]["tokens"]
        rate[name] = tokens / wall
        peak = max(r["peak"] for r in results)
        rows.append(
            [name, f"{tokens / 1e6:,.0f} M", f"{wall:.1f}", f"{rate[name] / 1e6:.2f} M", f"{peak / 2**30:.2f} GiB"]
        )
    print()
    print(markdown_table(["run", "tokens", "s", "tokens/s", "peak RSS"], rows))
    same = {json.dumps(r["json"]["layers"], sort_keys=True) for rs in runs.values() for r in rs}
    ratio = rate["with --traffic"] / rate["without --traffic"]
    traffic = runs["with --traffic"][0]["json"]["traffic"]["layers"]
    for layer, stats in traffic.items():
        hits = ", ".join(
            f"{c['bytes'] >> 30} GiB: LRU {c['lru_hit_rate']:.3f} static {c['static_hit_rate']:.3f}"
            for c in stats["cache"]
        )
        print(f"layer {layer}: {stats['rows_read']:,} rows read, LRU sampled at {stats['lru_sample_rate']:.4f}; {hits}")
    print(f"\n{'ok  ' if len(same) == 1 else 'MISS'} collision figures identical with and without --traffic")
    print(f"{'ok  ' if ratio >= 0.7 else 'MISS'} tokens/s with --traffic / without = {ratio:.2f} >= 0.7")
    print(f"load average now {os.getloadavg()}")


if __name__ == "__main__":
    main()
