"""A hot tier chosen on one half of a corpus, serving the other half: its hit rate and lookup time.

The corpus is Zipf-distributed DeepSeek-V3 ids (exponent 1.1), split into two halves by
document. Row counts of each half come from `NgramHasher.rows`, counted exactly here:

  * predicted: the static top-k hit rate of the first half on itself (the k rows it read most
    serve that share of its lookups): what `inspect --traffic`'s `static_hit_rate` says for the
    tier's bytes;
  * served: the same k rows (the tier an export gets from the first half's hotness file) serving
    the second half, measured by `EngramTables.traffic()` over real lookups, and checked against
    the second half's counts;
  * oracle: the second half's own top-k (the best any tier of k rows could do on it).

Lookup time: `EngramTables.lookup` of the second half in (B, T) batches, the tiered export against
the same export without a tier, in the same run, with the main file in the page cache (after a
warm-up pass) and evicted (`posix_fadvise(DONTNEED)` on every file of both exports before each
pass, with the tables reopened so that no old mapping holds the pages); medians of interleaved
repeats. The spec is a one-layer table of about 200 MB at bfloat16.

    .venv/bin/python benchmarks/bench_hot_tier.py [--tokens 200000] [--tier-mib 8] [--repeats 3]
"""

from __future__ import annotations

import argparse
import gc
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from engram_cli.checkpoints.safetensors_export import export_inference
from engram_cli.checkpoints.tables import EngramTables
from engram_cli.hot_rows import HotRows, spec_fingerprint
from engram_cli.spec import TableSpec
from engram_cli.store.build import build_tables
from engram_cli.store.tables import open_tables

from common import cpu_model, markdown_table

SEQ = 512  # tokens a document
BATCH = 4  # documents a lookup


def spec() -> TableSpec:
    return TableSpec(
        layer_ids=(1,),
        max_ngram_size=3,
        n_head_per_ngram=4,
        engram_vocab_size=(100000, 100000),
        n_embed_per_ngram=512,
        pad_id=2,
        seed=0,
        dtype="bfloat16",
        name="bench-hot-tier",
    )


def row_counts(store: Path, docs: np.ndarray) -> np.ndarray:
    """Lookups of every row of layer 1 by the documents `docs` (N, SEQ), counted exactly."""
    tables = open_tables(store)
    counts = np.zeros(tables.spec.rows(1), np.int64)
    for start in range(0, len(docs), 64):
        rows = np.asarray(tables.hasher().rows(docs[start : start + 64], layers=[1])[1]).reshape(-1)
        counts += np.bincount(rows, minlength=counts.size)
    return counts


def hot_order(counts: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Rows read, most read first, ties by row id: a hotness file's order."""
    read = np.flatnonzero(counts)
    order = np.lexsort((read, -counts[read]))
    return read[order].astype(np.int64), counts[read][order].astype(np.int64)


def evict(paths: list[Path]) -> None:
    for path in paths:
        fd = os.open(path, os.O_RDONLY)
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def open_export(path: Path, store: Path) -> EngramTables:
    tables = open_tables(store)
    return EngramTables.open(path, spec=tables.spec, projection=tables.projection)


def look_up(opened: EngramTables, docs: np.ndarray) -> EngramTables:
    for start in range(0, len(docs), BATCH):
        opened.lookup(torch.from_numpy(docs[start : start + BATCH]))
    return opened


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=200_000, help="corpus tokens, both halves")
    parser.add_argument("--tier-mib", type=float, default=8.0, help="the tier's MiB (the table is about 200 MB)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--workdir", type=Path, default=None)
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="bench-hot-tier-", dir=args.workdir))
    store = work / "tables.zarr"
    build_tables(spec(), store)
    tables = open_tables(store)
    vocab = tables.projection.vocab_size
    rng = np.random.default_rng(0)
    docs = (rng.zipf(1.1, (args.tokens // SEQ, SEQ)) % vocab).astype(np.int64)
    first, second = docs[: len(docs) // 2], docs[len(docs) // 2 :]

    counts_a, counts_b = row_counts(store, first), row_counts(store, second)
    rows_a, lookups_a = hot_order(counts_a)
    rows_b, _ = hot_order(counts_b)
    row_bytes = tables.spec.dim * 2
    k = int(args.tier_mib * (1 << 20)) // row_bytes
    hot = work / "hot.safetensors"
    HotRows(
        spec_name=tables.spec.name,
        spec_fingerprint=spec_fingerprint(tables.spec),
        projection_fingerprint=tables.projection.fingerprint(),
        corpus_tokens=int(first.size),
        rows={1: rows_a},
        lookups={1: lookups_a},
        total_lookups={1: int(counts_a.sum())},
        row_bytes={1: row_bytes},
    ).write(hot)
    plain, tiered = work / "plain", work / "tiered"
    export_inference(store, plain)
    report = export_inference(store, tiered, hot_rows=hot, hot_bytes=int(args.tier_mib * (1 << 20)))
    assert report.hot_tier is not None and report.hot_tier[1]["rows"] == min(k, rows_a.size)

    predicted = counts_a[rows_a[:k]].sum() / counts_a.sum()
    counted = counts_b[rows_a[:k]].sum() / counts_b.sum()
    oracle = counts_b[rows_b[:k]].sum() / counts_b.sum()
    served = look_up(open_export(tiered, store), second).traffic()
    assert served.hits == counts_b[rows_a[:k]].sum() and served.misses == counts_b.sum() - served.hits
    table_bytes = tables.spec.rows(1) * row_bytes
    print(
        f"{cpu_model()}, {os.cpu_count()} logical CPUs; table {table_bytes / 1e6:.0f} MB bf16 "
        f"({tables.spec.rows(1):,} rows of {row_bytes} B), tier {k:,} rows = {k * row_bytes / 1e6:.1f} MB "
        f"({k * row_bytes / table_bytes:.1%} of the table); corpus {docs.size:,} Zipf(1.1) tokens, halves of "
        f"{first.size:,}; {counts_b.sum():,} lookups served\n"
    )
    print(
        markdown_table(
            ["tier chosen on", "serving", "hit rate"],
            [
                ["first half (predicted: static top-k on itself)", "first half", f"{predicted:.1%}"],
                ["first half (the export's tier)", "second half", f"{served.hit_rate:.1%} (counted {counted:.1%})"],
                ["second half (oracle top-k)", "second half", f"{oracle:.1%}"],
            ],
        )
    )

    files = sorted(plain.glob("*.safetensors")) + sorted(tiered.glob("*.safetensors"))
    times: dict[str, list[float]] = {}
    opened: EngramTables | None = None
    for _ in range(args.repeats):
        for cache in ("in page cache", "evicted"):
            for name, path in (("no tier", plain), ("tier", tiered)):
                opened = None
                gc.collect()  # no old mapping of the files is left to hold their pages
                if cache == "evicted":
                    evict(files)
                opened = open_export(path, store)
                if cache != "evicted":
                    look_up(opened, second)  # every page this pass reads, resident
                start = time.perf_counter()
                look_up(opened, second)
                times.setdefault(f"{cache}|{name}", []).append(time.perf_counter() - start)
    rows_out = []
    tokens = second.size
    for cache in ("in page cache", "evicted"):
        base = statistics.median(times[f"{cache}|no tier"])
        tier = statistics.median(times[f"{cache}|tier"])
        rows_out.append(
            [
                cache,
                f"{base:.3f} s ({tokens / base / 1e3:.0f} k tokens/s)",
                f"{tier:.3f} s ({tokens / tier / 1e3:.0f} k tokens/s)",
                f"{base / tier:.2f}x",
            ]
        )
    print()
    print(
        markdown_table(
            [f"main file, lookups of {tokens:,} tokens in ({BATCH}, {SEQ}) batches", "no tier", "tier", "speed-up"],
            rows_out,
        )
    )
    print(f"\nmedians of {args.repeats} interleaved repeats; the open (and the tier's copy into memory) not timed")


if __name__ == "__main__":
    main()
