"""engram: build the memory tables of Engram-style language models."""

from .errors import EngramError
from .spec import InitSpec, TableSpec, load_spec
from .vocab import VocabProjection, compress_vocab, default_projection, load_projection

__all__ = [
    "EngramError", "InitSpec", "TableSpec", "VocabProjection", "compress_vocab",
    "default_projection", "load_projection", "load_spec",
]
