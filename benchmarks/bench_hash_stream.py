"""The streaming hasher's decode step (one token per row) against re-hashing each row's last window, same run.

    .venv/bin/python benchmarks/bench_hash_stream.py [--spec engram-demo-v1 --spec deepseek-v4.1-flash] [--steps 2000]

For B = 1, 64, 256 rows: `state.rows(ids)` with (B, 1) ids after a 64-token prefill, into new
arrays and into reused `out=` buffers, and with a CPU torch tensor; the baseline hashes the
last max_ngram_size tokens of every row with `NgramHasher.rows` each step (what a server without a
stream would do). Prints the CPU, then a markdown table of medians over `--steps` calls of each,
alternated call by call so that load from other processes hits all alike, the ratio of the
medians, and whether the streamed rows equal those of hashing the whole sequences at once.
"""

from __future__ import annotations

import argparse
import itertools
import os

import numpy as np
import torch
from engram_cli import NgramHasher, load_spec

from common import cpu_model, interleaved, markdown_table

PREFILL = 64


def identical(hasher: NgramHasher, ids: np.ndarray) -> bool:
    """A prefill chunk then one token at a time, against `rows` of the whole sequences."""
    state = hasher.stream(ids.shape[0])
    parts = [state.rows(ids[:, :PREFILL])] + [state.rows(ids[:, t : t + 1]) for t in range(PREFILL, ids.shape[1])]
    whole = hasher.rows(ids)
    return all(np.array_equal(np.concatenate([p[k] for p in parts], axis=1), v) for k, v in whole.items())


def decode_row(hasher: NgramHasher, batch: int, steps: int, rng: np.random.Generator) -> list[object]:
    vocab = hasher.projection.vocab_size
    window = hasher.spec.max_ngram_size
    tokens = rng.integers(0, vocab, size=(batch, PREFILL + 256))
    same = identical(hasher, tokens[:, : PREFILL + 32])
    columns = itertools.cycle([np.ascontiguousarray(tokens[:, t : t + 1]) for t in range(PREFILL, tokens.shape[1])])
    fresh, reused, tensor = (hasher.stream(batch) for _ in range(3))
    for state in (fresh, reused, tensor):
        state.rows(tokens[:, :PREFILL])
    heads = {k: v.shape[-1] for k, v in hasher.rows(tokens[:, :1]).items()}
    out = {k: np.empty((batch, 1, h), np.int64) for k, h in heads.items()}
    recent = np.ascontiguousarray(tokens[:, PREFILL - window : PREFILL])

    def baseline() -> object:
        recent[:, :-1] = recent[:, 1:]
        recent[:, -1:] = next(columns)
        return {k: v[:, -1] for k, v in hasher.rows(recent).items()}

    medians = interleaved(
        {
            "baseline": baseline,
            "stream": lambda: fresh.rows(next(columns)),
            "out": lambda: reused.rows(next(columns), out=out),
            "torch": lambda: tensor.rows(torch.from_numpy(next(columns))),
        },
        steps,
    )
    us = {k: v * 1e6 for k, v in medians.items()}
    return [
        hasher.spec.name,
        batch,
        f"{us['baseline']:.1f}",
        f"{us['stream']:.1f}",
        f"**{us['baseline'] / us['stream']:.1f}x**",
        f"{us['out']:.1f}",
        f"{us['torch']:.1f}",
        f"{batch / us['stream']:.2f} M",
        same,
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--spec", action="append", help="spec presets (default: engram-demo-v1, deepseek-v4.1-flash)")
    parser.add_argument("--steps", type=int, default=2000, help="decode steps timed per candidate")
    args = parser.parse_args()
    names = args.spec or ["engram-demo-v1", "deepseek-v4.1-flash"]
    rng = np.random.default_rng(0)
    print(
        f"cpu: {cpu_model()}; cpus {os.cpu_count()}; torch threads {torch.get_num_threads()}; "
        f"load average {' '.join(f'{v:.2f}' for v in os.getloadavg())}\n"
    )
    rows = []
    for name in names:
        hasher = NgramHasher(load_spec(name))
        hasher.stream(1).rows(np.zeros((1, 1), np.int64))  # load the kernel before timing
        spec = hasher.spec
        print(
            f"{name}: {len(spec.layer_ids)} layers x {spec.heads_per_layer} heads, max_ngram_size {spec.max_ngram_size}"
        )
        rows += [decode_row(hasher, batch, args.steps, rng) for batch in (1, 64, 256)]
    print()
    print(
        markdown_table(
            [
                "spec",
                "B",
                "baseline µs",
                "stream µs",
                "speed-up",
                "stream `out=` µs",
                "stream torch µs",
                "stream tokens/s",
                "identical",
            ],
            rows,
        )
    )
    print(f"\nload average at the end: {' '.join(f'{v:.2f}' for v in os.getloadavg())}")


if __name__ == "__main__":
    main()
