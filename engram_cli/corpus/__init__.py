"""Corpora for `engram inspect`: files and folders read as batches of documents of token ids.

`files` is a `Source` (one input file and its kind) and the file system behind it (local or fsspec);
`sources` finds the input files (local paths, URLs, `datasets` folders, Hub ids); `readers` is the
one interface every input kind is read through (`TextReader`, `IdReader`), with one module per kind:
`text`, `jsonl` (JSON lines and arrays), `npy`, `bin`, `parquet`, `hf` (Hugging Face datasets and
Arrow files) and `megatron`; `compressed` decompresses gzip, zstd, xz and bz2 streams, `records`
turns Arrow and JSON records into documents, `ids` reads id arrays and cuts streams. `reader` is
`Corpus`, which yields `DocBatch`es and states how reading overlaps tokenizing; `parts` splits a
corpus for Dask; `base` holds the shared types (`CorpusOptions`, `DocBatch`, `CorpusSummary`,
`CorpusPart`).
"""

import importlib

_LAZY = {
    "Corpus": "reader",
    "CorpusOptions": "base",
    "CorpusPart": "base",
    "CorpusSummary": "base",
    "DocBatch": "base",
    "IdReader": "readers",
    "IdReading": "readers",
    "Reader": "readers",
    "Source": "files",
    "Tally": "readers",
    "TextReader": "readers",
    "find_sources": "sources",
    "open_reader": "readers",
    "split_corpus": "parts",
}

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


def __getattr__(name: str) -> object:
    """Load a submodule on first use of one of its names, so that the CLI can read the option
    choices in `base` without loading every reader."""
    if name in _LAZY:
        return getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
