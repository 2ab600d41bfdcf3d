"""Splitting a corpus for Dask: parts of similar size, in input order, that tasks read alone."""

from __future__ import annotations

from ..errors import EngramError
from .base import ID_BATCH_TOKENS, CorpusPart
from .ids import open_ids
from .reader import Corpus
from .sources import Source


def split_corpus(corpus: Corpus, parts: int, min_ids: int = ID_BATCH_TOKENS) -> list[CorpusPart]:
    """Cut a corpus into about `parts` pieces of similar size, in input order: text files in
    groups, each pre-tokenized file in ranges of at least `min_ids` ids (rows of a 2-D array).

    Args:
        corpus: the corpus to split (not one cut at --max-tokens, which reads in order).
        parts: about how many pieces.
        min_ids: the smallest id range of a pre-tokenized file one piece holds.
    """
    options, sources = corpus.options, corpus.sources
    if options.max_tokens is not None:
        raise EngramError(
            "--max-tokens reads the inputs in order and cannot be split over a cluster; "
            "drop it, or run without --scheduler/--dask-workers"
        )
    texts = [s for s in sources if s.kind in ("text", "jsonl")]
    total = sum(s.path.stat().st_size for s in sources) or 1
    target = max(1, total // max(1, parts))
    pieces: list[CorpusPart] = []
    group: list[Source] = []
    size = 0
    for source in texts:
        group.append(source)
        size += source.path.stat().st_size
        if size >= target:
            pieces.append(CorpusPart(tuple(group)))
            group, size = [], 0
    if group:
        pieces.append(CorpusPart(tuple(group)))
    for source in sources:
        if source.kind not in ("npy", "bin"):
            continue
        array = open_ids(source.path, source.kind, options.bin_dtype)
        count = array.shape[0]
        width = array.shape[1] if array.ndim == 2 else 1
        unit_bytes = max(1, source.path.stat().st_size // max(1, count))
        step = max(1, -(-min_ids // max(1, width)), target // unit_bytes)
        pieces += [CorpusPart((source,), (lo, min(lo + step, count))) for lo in range(0, count, step)]
        if count == 0:
            pieces.append(CorpusPart((source,), (0, 0)))
    return pieces
