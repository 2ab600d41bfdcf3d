"""Dask scale-out overhead: a 2-worker LocalCluster against the local path, in one run.

build-tables: the same spec built locally (all cores, threads) and as one Dask task per shard
on a LocalCluster of 2 single-threaded worker processes; the cluster is started once, before
the timings (its start-up, about 1.5 s, is reported apart). inspect: the same corpus of
pre-tokenized ids counted locally and mapped/merged on the same cluster. Medians of
interleaved repeats; the ratio is cluster throughput over local throughput.

    .venv/bin/python benchmarks/bench_cluster.py [--scale 0.25] [--repeats 3]
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from distributed import Client, LocalCluster

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from engram_cli.corpus.base import CorpusOptions
from engram_cli.inspection import inspect
from engram_cli.spec import load_spec
from engram_cli.store.build import build_tables
from engram_cli.vocab import VocabProjection

from common import interleaved, markdown_table


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--scale", type=float, default=0.25, help="fraction of the engram-demo-v1 head sizes to build")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--tokens", type=int, default=8_000_000, help="ids in the inspect corpus")
    args = parser.parse_args()
    spec = load_spec("engram-demo-v1").scaled(args.scale)
    projection = VocabProjection(np.arange(128_815) % 98_627)
    root = Path(tempfile.mkdtemp(prefix="engram-bench-cluster-"))
    started = time.perf_counter()
    cluster = LocalCluster(n_workers=2, threads_per_worker=1, processes=True, dashboard_address=None)
    client = Client(cluster)
    startup = time.perf_counter() - started
    try:

        def build(target: str, **kw) -> None:
            shutil.rmtree(root / target, ignore_errors=True)
            build_tables(spec, root / target, projection=projection, **kw)

        build("warm", client=client)  # numba caches and imports on workers
        medians = interleaved(
            {
                "local (threads)": lambda: build("local"),
                "Dask LocalCluster, 2 workers": lambda: build("dask", client=client),
            },
            repeats=args.repeats,
        )
        base = medians["local (threads)"]
        rows = [
            [name, f"{t:.2f}", f"{spec.parameters / t / 1e6:.0f}", f"{base / t:.2f}x"] for name, t in medians.items()
        ]
        print(
            f"build-tables, {spec.name}, {spec.parameters:,} bf16 parameters; "
            f"cluster start-up {startup:.1f} s (not in the times)"
        )
        print(markdown_table(["build", "median s", "M params/s", "throughput vs local"], rows))

        tokens = args.tokens
        rng = np.random.default_rng(0)
        ids = np.minimum(rng.zipf(1.2, size=tokens), 128_000).astype(np.uint32)  # a word-like skew
        ids.tofile(root / "corpus.bin")
        demo = load_spec("engram-demo-v1")
        options = CorpusOptions(bin_dtype="uint32", doc_sep=1)

        def count(**kw) -> None:
            inspect(
                demo,
                projection=projection,
                corpus=[root / "corpus.bin"],
                options=options,
                **kw,
            )

        count(client=client)  # warm the workers
        medians = interleaved(
            {
                "local (threads)": lambda: count(),
                "Dask LocalCluster, 2 workers": lambda: count(client=client),
            },
            repeats=args.repeats,
        )
        base = medians["local (threads)"]
        rows = [[name, f"{t:.2f}", f"{tokens / t / 1e6:.1f}", f"{base / t:.2f}x"] for name, t in medians.items()]
        print(f"\ninspect, {demo.name}, {tokens:,} pre-tokenized ids (.bin, uint32)")
        print(markdown_table(["inspect", "median s", "M tokens/s", "throughput vs local"], rows))
    finally:
        client.close()
        cluster.close()
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
