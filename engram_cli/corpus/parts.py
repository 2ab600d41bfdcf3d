"""Cutting a corpus into parts that cluster tasks read alone.

Each reader says how its file splits (`Reader.spans`): ranges of ids of `.npy`, `.bin` and
Megatron streams (rows of a 2-D `.npy`), row groups of Parquet. Files that do not split (text,
JSON, Arrow) are grouped whole, in input order, into parts of about the target size.
"""

from __future__ import annotations

from ..errors import EngramError
from .base import ID_BATCH_TOKENS, CorpusPart
from .files import Source
from .reader import Corpus
from .readers import open_reader


def split_corpus(corpus: Corpus, parts: int, min_ids: int = ID_BATCH_TOKENS) -> list[CorpusPart]:
    """Cut a corpus into about `parts` pieces of similar size, in input order: whole files in
    groups, each splittable file in spans of at least `min_ids` ids (rows of a 2-D array).

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
    total = corpus.total_bytes or 1
    target = max(1, total // max(1, parts))
    pieces: list[CorpusPart] = []
    spanned: list[CorpusPart] = []
    group: list[Source] = []
    size = 0
    for source in sources:
        spans = open_reader(source, options).spans(target, min_ids)
        if spans is not None:
            spanned += [CorpusPart((source,), span) for span in spans]
            continue
        group.append(source)
        size += source.size
        if size >= target:
            pieces.append(CorpusPart(tuple(group)))
            group, size = [], 0
    if group:
        pieces.append(CorpusPart(tuple(group)))
    return pieces + spanned
