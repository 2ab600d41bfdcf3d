"""Corpora for `engram inspect`: files and folders read as batches of documents of token ids."""

from .base import CorpusOptions, CorpusPart, CorpusSummary, DocBatch
from .parts import split_corpus
from .reader import Corpus
from .sources import find_sources

__all__ = ["Corpus", "CorpusOptions", "CorpusPart", "CorpusSummary", "DocBatch", "find_sources", "split_corpus"]
