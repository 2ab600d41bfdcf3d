"""What recording the growth of distinct n-grams adds to counting: the same collision statistics
with and without a `GrowthRecorder`, interleaved runs in one process (issue 19: at most 15 %).

Seeded Zipf ids (exponent 1.07) over 128 K ids in batches of 1 M tokens, a document every 2,000
tokens, spec engram-demo-v1 over an identity projection, `--max-memory`-like budget 1 GiB.

    .venv/bin/python benchmarks/bench_sizing_overhead.py [--tokens 20000000] [--repeats 2]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from engram_cli.collisions.growth import GrowthRecorder
from engram_cli.collisions.options import CountOptions
from engram_cli.collisions.statistics import collision_statistics
from engram_cli.corpus.base import DocBatch
from engram_cli.spec import load_spec
from engram_cli.vocab import VocabProjection

VOCAB = 128_000


def batches(tokens: int, seed: int = 0) -> list[DocBatch]:
    rng = np.random.default_rng(seed)
    weights = 1.0 / np.arange(1, VOCAB + 1) ** 1.07
    cdf = np.cumsum(weights / weights.sum())
    out = []
    for lo in range(0, tokens, 1 << 20):
        n = min(1 << 20, tokens - lo)
        ids = np.minimum(np.searchsorted(cdf, rng.random(n)), VOCAB - 1).astype(np.int64)
        out.append(DocBatch(ids, np.arange(0, n, 2000, dtype=np.int64)))
    return out


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--tokens", type=int, default=20_000_000)
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args()
    spec = load_spec("engram-demo-v1").replace(compressed_vocab_size=None, tokenizer=None)
    projection = VocabProjection(np.arange(VOCAB, dtype=np.int64))
    data = batches(args.tokens)
    collision_statistics(spec, projection, data[:2], memory_budget=1 << 30)  # compile
    times: dict[str, list[float]] = {"without": [], "with": []}
    cpu: dict[str, list[float]] = {"without": [], "with": []}
    for _ in range(args.repeats):
        for name in ("without", "with"):
            growth = GrowthRecorder() if name == "with" else None
            started, cpu_started = time.perf_counter(), time.process_time()
            collision_statistics(spec, projection, data, counting=CountOptions(memory_budget=1 << 30, growth=growth))
            times[name].append(time.perf_counter() - started)
            cpu[name].append(time.process_time() - cpu_started)
            print(f"{name} growth: {times[name][-1]:.2f} s, {cpu[name][-1]:.2f} s CPU", flush=True)
    for what, values in (("wall", times), ("CPU", cpu)):
        best = {name: min(v) for name, v in values.items()}
        print(
            f"{args.tokens:,} tokens, best {what}: {best['without']:.2f} s without growth, "
            f"{best['with']:.2f} s with: {best['with'] / best['without']:.3f}x"
        )


if __name__ == "__main__":
    main()
