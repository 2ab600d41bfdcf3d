"""Corpora for `engram inspect`: files and folders read as batches of documents of token ids.

`sources` finds the input files and their kind; `text` and `ids` read text and pre-tokenized ids;
`reader` is `Corpus`, which yields `DocBatch`es and states how reading overlaps tokenizing;
`parts` splits a corpus for Dask; `base` holds the shared types (`CorpusOptions`, `DocBatch`,
`CorpusSummary`, `CorpusPart`).
"""

from .base import CorpusOptions, CorpusPart, CorpusSummary, DocBatch
from .parts import split_corpus
from .reader import Corpus
from .readers import IdReader, IdReading, Reader, Tally, TextReader, open_reader
from .sources import Source, find_sources

__all__ = [
    "Corpus",
    "CorpusOptions",
    "CorpusPart",
    "CorpusSummary",
    "DocBatch",
    "IdReader",
    "IdReading",
    "Reader",
    "Source",
    "Tally",
    "TextReader",
    "find_sources",
    "open_reader",
    "split_corpus",
]
