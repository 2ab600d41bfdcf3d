"""`engram inspect` on the Python standard library's own source, against baselines in the same run.

1. Pre-tokenized ids (.bin, engram-demo-v1: 2 layers x 16 heads): the whole statistics job against
   a straightforward numpy implementation of the same numbers (np.unique per order and per head).
2. Text: the whole job against tokenizing the same files alone (same batches, same tokenizer).
3. Bounded memory: the command on 20 M random ids (nearly all n-grams distinct) with its default
   budget and with --max-memory 64 (spilling to disk), in subprocesses: peak RSS of each, and the
   same JSON numbers.

Run: .venv/bin/python benchmarks/bench_inspect.py [--text-mb 10] [--repeats 3]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import sysconfig
import tempfile
import time
from pathlib import Path

import numpy as np
from engram_cli.collisions.statistics import collision_statistics
from engram_cli.corpus.base import TEXT_BATCH_CHARS, CorpusOptions
from engram_cli.corpus.reader import Corpus
from engram_cli.corpus.sources import find_sources
from engram_cli.spec import load_spec
from engram_cli.vocab import default_projection

from common import interleaved, markdown_table

SEP = 1  # DeepSeek-V3's end-of-sentence id: never produced by tokenizing plain text


def stdlib_files() -> list[Path]:
    """The standard library's .py files, without any third-party packages installed beside them."""
    root = Path(sysconfig.get_paths()["stdlib"])
    return [
        s.path
        for s in find_sources([root], "*.py")
        if not {"site-packages", "dist-packages"} & set(s.path.relative_to(root).parts)
    ]


def first_megabytes(files: list[Path], megabytes: float) -> list[Path]:
    """The leading files that together first reach `megabytes` MB (all of them if they never do)."""
    subset, size = [], 0
    for f in files:
        if size >= megabytes * 1e6:
            break
        subset.append(f)
        size += f.stat().st_size
    return subset


def read_texts(files: list[Path]) -> list[str]:
    return [f.read_bytes().decode("utf-8", errors="replace") for f in files]


def tokenize_alone(tokenizer, files: list[Path]) -> int:
    """Read, decode and tokenize in the batches the corpus reader uses: the text baseline."""
    tokens, batch, size = 0, [], 0
    for text in read_texts(files):
        batch.append(text)
        size += len(text)
        if size >= TEXT_BATCH_CHARS:
            tokens += sum(len(e) for e in tokenizer.encode_batch_fast(batch, add_special_tokens=False))
            batch, size = [], 0
    if batch:
        tokens += sum(len(e) for e in tokenizer.encode_batch_fast(batch, add_special_tokens=False))
    return tokens


def straightforward(path: Path, spec, projection) -> dict:
    """The same per-head numbers with plain numpy: windows per document, np.unique everywhere."""
    stream = np.fromfile(path, dtype=np.uint32).astype(np.int64)
    bounds = np.flatnonzero(stream == SEP)
    docs = [d for d in np.split(stream, bounds) if d.size]
    docs = [d[1:] if d[0] == SEP else d for d in docs]
    pad = int(projection.lookup[spec.pad_id])
    context = spec.max_ngram_size - 1
    padded = np.concatenate([np.concatenate([np.full(context, pad), projection.lookup[d]]) for d in docs if d.size])
    real = np.concatenate([np.r_[np.zeros(context, bool), np.ones(d.size, bool)] for d in docs if d.size])
    where = np.flatnonzero(real)
    bits = int(projection.compressed_size - 1).bit_length()
    result = {}
    for layer in spec.layer_ids:
        mults = spec.multipliers(layer, projection.compressed_size)
        sizes = spec.head_sizes(layer)
        for n in spec.orders:
            key = np.zeros(where.size, np.uint64)
            for k in range(n):
                key |= padded[where - k].astype(np.uint64) << np.uint64(k * bits)
            grams, counts = np.unique(key, return_counts=True)
            mix = np.zeros(grams.size, np.int64)
            for k in range(n):
                mix ^= ((grams >> np.uint64(k * bits)) & np.uint64((1 << bits) - 1)).astype(np.int64) * mults[k]
            for j, size in enumerate(sizes[(n - 2) * spec.n_head_per_ngram : (n - 1) * spec.n_head_per_ngram]):
                _, inverse, load = np.unique(mix % size, return_inverse=True, return_counts=True)
                crowded = load[inverse] > 1
                result[layer, n, j] = (grams.size, int(crowded.sum()), int(counts[crowded].sum()))
    return result


def ours(path: Path, spec, projection) -> dict:
    corpus = Corpus([path], projection, CorpusOptions(bin_dtype="uint32", doc_sep=SEP), context=2)
    layers, _, _ = collision_statistics(spec, projection, corpus)
    return {
        (layer, n, j): (s.distinct, h.colliding, round(h.weighted_rate * s.occurrences))
        for layer, orders in layers.items()
        for n, s in orders.items()
        for j, h in enumerate(s.heads)
    }


# VmHWM (Linux) is the peak RSS of this process image; ru_maxrss would also count the parent's
# memory at fork time.
_MEASURED = (
    "import atexit, sys; atexit.register(lambda: sys.stderr.write('\\npeak-rss ' + "
    "[l for l in open('/proc/self/status') if l.startswith('VmHWM')][0].split()[1] + '\\n')); "
    "sys.argv = ['engram'] + sys.argv[1:]; from engram_cli.cli import main; main()"
)


def peak_rss_run(args: list[str]) -> tuple[dict, int, float]:
    """Run the command in a fresh process: its JSON, its peak resident memory in bytes, seconds."""
    started = time.perf_counter()
    proc = subprocess.run(
        [sys.executable, "-c", _MEASURED, *args, "--json"], capture_output=True, text=True, check=True
    )
    seconds = time.perf_counter() - started
    peak = int(proc.stderr.rsplit("peak-rss ", 1)[1].split()[0])
    return json.loads(proc.stdout), peak * 1024, seconds


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--text-mb", type=float, default=10.0, help="MB of stdlib source for the text case")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--random-tokens", type=int, default=20_000_000, help="ids in the memory case")
    args = parser.parse_args()
    spec = load_spec("engram-demo-v1")
    projection = default_projection()
    tokenizer = projection.tokenizer()
    files = stdlib_files()
    with tempfile.TemporaryDirectory() as tmp:
        ids = Path(tmp) / "stdlib.bin"
        encodings = tokenizer.encode_batch_fast(read_texts(files), add_special_tokens=False)
        tokens = sum(len(e) for e in encodings)
        with open(ids, "wb") as handle:
            for e in encodings:
                np.array([*e.ids, SEP], np.uint32).tofile(handle)
        del encodings

        assert ours(ids, spec, projection) == straightforward(ids, spec, projection)
        medians = interleaved(
            {
                "straightforward numpy": lambda: straightforward(ids, spec, projection),
                "engram (collision_statistics)": lambda: ours(ids, spec, projection),
            },
            args.repeats,
        )
        base = medians["straightforward numpy"]
        print(f"\nPre-tokenized: {len(files):,} stdlib files, {tokens:,} tokens, engram-demo-v1\n")
        print(
            markdown_table(
                ["pre-tokenized .bin", "median s", "M tokens/s", "speed vs numpy"],
                [[name, f"{t:.2f}", f"{tokens / t / 1e6:.1f}", f"{base / t:.2f}x"] for name, t in medians.items()],
            )
        )

        subset = first_megabytes(files, args.text_mb)
        size = sum(f.stat().st_size for f in subset)
        text_tokens = tokenize_alone(tokenizer, subset)
        medians = interleaved(
            {
                "tokenize alone": lambda: tokenize_alone(tokenizer, subset),
                "engram (read, tokenize, statistics)": lambda: collision_statistics(
                    spec, projection, Corpus(subset, projection, context=2)
                ),
            },
            args.repeats,
        )
        base = medians["tokenize alone"]
        print(f"\nText: {len(subset):,} stdlib files, {size / 1e6:.1f} MB, {text_tokens:,} tokens\n")
        print(
            markdown_table(
                ["text", "median s", "M tokens/s", "time vs tokenizing"],
                [[name, f"{t:.2f}", f"{text_tokens / t / 1e6:.2f}", f"{t / base:.2f}x"] for name, t in medians.items()],
            )
        )

        # Distinct n-grams are what the counts hold: uniform random ids make nearly every one distinct.
        rng = np.random.default_rng(0)
        synthetic = Path(tmp) / "random.bin"
        stream = rng.integers(2, projection.vocab_size, args.random_tokens, dtype=np.uint32)
        stream[rng.choice(stream.size, 1000, replace=False)] = SEP
        stream.tofile(synthetic)
        command = [
            "inspect",
            "engram-demo-v1",
            "--corpus",
            str(synthetic),
            "--bin-dtype",
            "uint32",
            "--doc-sep",
            str(SEP),
        ]
        free, free_peak, free_s = peak_rss_run(command)
        bounded, bounded_peak, bounded_s = peak_rss_run([*command, "--max-memory", "64"])
        assert bounded["layers"] == free["layers"]
        distinct = sum(o["distinct"] for o in free["layers"][str(spec.layer_ids[0])]["orders"].values())
        print(
            f"\nMemory: {args.random_tokens:,} uniform random ids ({distinct:,} distinct 2- and 3-grams), "
            "as a command\n"
        )
        print(
            markdown_table(
                ["n-gram counts held in memory", "spilled to disk", "peak RSS", "s", "numbers"],
                [
                    [
                        "default (a quarter of free memory)",
                        f"{free['corpus']['spilled_bytes'] / 1e6:.0f} MB",
                        f"{free_peak / 1e9:.2f} GB",
                        f"{free_s:.1f}",
                        "-",
                    ],
                    [
                        "--max-memory 64 (MiB)",
                        f"{bounded['corpus']['spilled_bytes'] / 1e6:.0f} MB",
                        f"{bounded_peak / 1e9:.2f} GB",
                        f"{bounded_s:.1f}",
                        "identical",
                    ],
                ],
            )
        )


if __name__ == "__main__":
    main()
