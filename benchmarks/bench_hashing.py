"""NgramHasher against the straightforward numpy form of the same algorithm, in the same run.

    .venv/bin/python benchmarks/bench_hashing.py [--spec engram-demo-v1] [--rounds 7]

Prints a markdown table: median tokens/s of both and the median ratio of alternated
rounds, for 256 x 4096 and 1 x 4096 tokens (the data-loader batch), also on one
thread and into reused output buffers (no allocation, no page faults); the peak memory
numpy allocates in each beside input and output; and the first-call time of the kernel
in a fresh process with a cold and a warm numba cache.

Then sequence positions and barriers (256 x 4096, packed sequences of 512 tokens on average,
2% barrier tokens): the hasher with them against the same hasher without them, alternated in
the same run; the issue asks for at least 0.8x.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
import tracemalloc

import numba
import numpy as np
from engram_cli import NgramHasher, load_spec
from engram_cli.spec import TableSpec
from engram_cli.vocab import VocabProjection, default_projection


def straightforward(ids: np.ndarray, spec: TableSpec, projection: VocabProjection) -> dict[int, np.ndarray]:
    """Shifted copies, multiply-XOR per order, one `%` per head, np.stack: the reference's shape."""
    x = np.asarray(ids, dtype=np.int64)
    x = np.where(x >= 0, projection.lookup[np.maximum(x, 0)], x)
    pad = int(projection.lookup[spec.pad_id])
    length = x.shape[1]
    shifted = [x] + [
        np.pad(x, ((0, 0), (k, 0)), constant_values=pad)[:, :length] for k in range(1, spec.max_ngram_size)
    ]
    out = {}
    for layer in spec.layer_ids:
        mults = spec.multipliers(layer, projection.compressed_size)
        primes = spec.head_sizes(layer)
        heads = []
        for n in spec.orders:
            mix = shifted[0] * mults[0]
            for k in range(1, n):
                mix = np.bitwise_xor(mix, shifted[k] * mults[k])
            for j in range(spec.n_head_per_ngram):
                heads.append(mix % primes[(n - 2) * spec.n_head_per_ngram + j])
        out[layer] = np.stack(heads, axis=2)
    return out


def seconds(fn, repeats: int) -> float:
    """Median wall time of `repeats` calls."""
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return float(np.median(times))


def paired(baseline, ours, rounds: int, repeats: int) -> tuple[float, float, float]:
    """Alternate the two so that load from other processes hits both alike.

    Returns the median seconds of each and the median of the per-round ratios.
    """
    base_s, ours_s = [], []
    for _ in range(rounds):
        base_s.append(seconds(baseline, repeats))
        ours_s.append(seconds(ours, repeats))
    ratios = [b / o for b, o in zip(base_s, ours_s)]
    return float(np.median(base_s)), float(np.median(ours_s)), float(np.median(ratios))


def peak_bytes(fn) -> int:
    """Peak of numpy's traced allocations while fn runs (numpy reports its buffers to tracemalloc)."""
    tracemalloc.start()
    tracemalloc.reset_peak()
    base = tracemalloc.get_traced_memory()[0]
    result = fn()
    peak = tracemalloc.get_traced_memory()[1] - base
    del result
    tracemalloc.stop()
    return peak


def first_call_seconds(spec_name: str, cache_dir: str) -> float:
    """A fresh interpreter's first hash (import of numba, kernel compile or cache load, run)."""
    code = (
        "import time, numpy as np\n"
        "from engram_cli import NgramHasher, load_spec\n"
        "from engram_cli.vocab import default_projection\n"
        f"h = NgramHasher(load_spec({spec_name!r}), default_projection())\n"
        "t = time.perf_counter(); h.hash(np.arange(64).reshape(2, 32)); print(time.perf_counter() - t)\n"
    )
    env = {**os.environ, "NUMBA_CACHE_DIR": cache_dir}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, check=True)
    return float(out.stdout.strip().splitlines()[-1])


def packed_positions(rng: np.random.Generator, shape: tuple[int, int], mean_length: int) -> np.ndarray:
    """Positions of sequences packed into rows: 0 at each start, +1 within (lengths geometric)."""
    starts = rng.random(shape) < 1 / mean_length
    starts[:, 0] = True
    index = np.broadcast_to(np.arange(shape[1]), shape)
    last_start = np.maximum.accumulate(np.where(starts, index, 0), axis=1)
    return (index - last_start).astype(np.int64)


def gated_table(hasher: NgramHasher, projection: VocabProjection, rng: np.random.Generator, rounds: int) -> str:
    """The hasher with positions and barriers against itself without them, 256 x 4096."""
    shape = (256, 4096)
    ids = rng.integers(0, projection.vocab_size, size=shape).astype(np.int32)
    positions = packed_positions(rng, shape, 512)
    mask = rng.random(shape) < 0.02
    barrier_ids = rng.choice(projection.vocab_size, size=max(1, projection.vocab_size // 50), replace=False)
    ids[mask] = barrier_ids[0]  # as many barrier tokens among the ids as in the mask
    same = hasher.hash(ids, positions=np.broadcast_to(np.arange(shape[1]), shape).copy(), barrier_ids=[])
    identical = all(np.array_equal(v, hasher.hash(ids)[k]) for k, v in same.items())
    cases = {
        "positions": {"positions": positions},
        "barrier mask": {"barrier": mask},
        "barrier ids": {"barrier_ids": barrier_ids.tolist()},
        "positions + barrier mask": {"positions": positions, "barrier": mask},
        "positions + barrier ids": {"positions": positions, "barrier_ids": barrier_ids.tolist()},
    }
    lines = [
        f"Positions and barriers, 256 x 4096 ({len(barrier_ids):,} barrier ids, {mask.mean():.1%} barrier tokens, "
        f"{int((positions == 0).sum()):,} sequences); plain = the same hasher without them, same run; "
        f"default positions give identical output: {identical}",
        "",
        "| given | plain tok/s | with them tok/s | speed vs plain |",
        "|---|---|---|---|",
    ]
    for label, kwargs in cases.items():
        plain, gated, ratio = paired(lambda: hasher.hash(ids), lambda: hasher.hash(ids, **kwargs), rounds, 3)
        lines.append(
            f"| {label} | {ids.size / plain / 1e6:.1f} M | {ids.size / gated / 1e6:.1f} M | **{ratio:.2f}x** |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--spec", default="engram-demo-v1")
    parser.add_argument("--rounds", type=int, default=7, help="alternations of baseline and ours")
    args = parser.parse_args()

    spec = load_spec(args.spec)
    projection = default_projection()
    hasher = NgramHasher(spec, projection)
    rng = np.random.default_rng(0)
    threads = numba.get_num_threads()
    print(
        f"spec {spec.name}: {len(spec.layer_ids)} layers x {spec.heads_per_layer} heads; "
        f"numba threads {threads}; cpus {os.cpu_count()}; "
        f"load average {' '.join(f'{v:.2f}' for v in os.getloadavg())}\n"
    )

    rows = []
    for shape, rounds, repeats in (((256, 4096), args.rounds, 1), ((1, 4096), args.rounds, 30)):
        ids = rng.integers(0, projection.vocab_size, size=shape).astype(np.int32)
        expected, got = straightforward(ids, spec, projection), hasher.hash(ids)
        identical = all(np.array_equal(expected[k], got[k]) for k in spec.layer_ids)
        base, ours, ratio = paired(
            lambda: straightforward(ids, spec, projection), lambda: hasher.hash(ids), rounds, repeats
        )
        buffers = {k: np.empty_like(v) for k, v in got.items()}
        _, reused, reused_ratio = paired(
            lambda: straightforward(ids, spec, projection), lambda: hasher.hash(ids, out=buffers), rounds, repeats
        )
        numba.set_num_threads(1)
        one = seconds(lambda: hasher.hash(ids), rounds * repeats)
        numba.set_num_threads(threads)
        rows.append(
            {
                "label": f"{shape[0]} x {shape[1]}",
                "tokens": ids.size,
                "base": base,
                "ours": ours,
                "one": one,
                "ratio": ratio,
                "identical": identical,
                "reused": reused,
                "reused_ratio": reused_ratio,
                "out_mb": sum(v.nbytes for v in got.values()) / 2**20,
                "in_mb": ids.nbytes / 2**20,
                "base_peak_mb": peak_bytes(lambda: straightforward(ids, spec, projection)) / 2**20,
                "ours_peak_mb": peak_bytes(lambda: hasher.hash(ids)) / 2**20,
            }
        )

    print(
        "| tokens | numpy tok/s | NgramHasher tok/s | ratio | 1 thread | into reused `out=` "
        "| identical | input | output | numpy peak | NgramHasher peak |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        n = r["tokens"]
        print(
            f"| {r['label']} | {n / r['base'] / 1e6:.2f} M | {n / r['ours'] / 1e6:.1f} M | "
            f"**{r['ratio']:.1f}x** | {n / r['one'] / 1e6:.1f} M | "
            f"{n / r['reused'] / 1e6:.1f} M ({r['reused_ratio']:.1f}x) | {r['identical']} | "
            f"{r['in_mb']:.2f} MiB | {r['out_mb']:.2f} MiB | {r['base_peak_mb']:.2f} MiB | "
            f"{r['ours_peak_mb']:.2f} MiB |"
        )
    print(f"\nload average at the end: {' '.join(f'{v:.2f}' for v in os.getloadavg())}")

    print()
    print(gated_table(hasher, projection, rng, args.rounds))

    with tempfile.TemporaryDirectory() as cold:
        compile_s = first_call_seconds(args.spec, cold)
        cached_s = first_call_seconds(args.spec, cold)
    print(
        f"\nfirst call in a fresh process: {compile_s:.2f} s with a cold numba cache "
        f"(compile), {cached_s:.2f} s with it warm"
    )


if __name__ == "__main__":
    main()
