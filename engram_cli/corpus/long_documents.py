"""Long documents tokenized in pieces that give the ids of the whole, in bounded memory.

Tokenizing one 20 MB line at once makes the Rust tokenizer hold an `Encoding` (ids, offsets,
token strings, word ids, ...) for millions of tokens: gigabytes. A document longer than
`PIECE_CHARS` is cut instead, each cut at a pre-token boundary: BPE merges never cross a
pre-token boundary, so the pieces' ids, concatenated, are the whole document's. The boundary is
found by the tokenizer's own pre-tokenizer on a window around the target position, and taken
from the window's middle, far from its edges, where the window agrees with the whole text; a
cut never falls inside the text of an added (special) token. Only when a window holds no such
boundary (one pre-token of thousands of characters) is the cut made where the target falls,
which may then differ from the whole document's tokenization inside that one pre-token.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from tokenizers import Tokenizer

PIECE_CHARS = 1 << 20  # a document longer than this many characters is tokenized in pieces
_WINDOW = 4096  # characters on each side of a target cut handed to the pre-tokenizer
_MARGIN = 1024  # a boundary this close to a window edge might depend on text outside it


def added_tokens(tokenizer: Tokenizer) -> list[str]:
    """The added (special) tokens a cut must not fall inside: read once per tokenizer, not per
    document, as a tokenizer may hold hundreds."""
    return [t.content for t in tokenizer.get_added_tokens_decoder().values() if len(t.content) > 1]


def pieces(
    tokenizer: Tokenizer, text: str, piece_chars: int = PIECE_CHARS, added: list[str] | None = None
) -> Iterator[str]:
    """`text` itself when short; otherwise consecutive pieces of about `piece_chars` characters
    whose tokenizations, concatenated, are the tokenization of `text`. `added` is
    `added_tokens(tokenizer)`, looked up here when not given."""
    if len(text) <= piece_chars:  # most documents: nothing to cut, nothing to look up
        yield text
        return
    if added is None:
        added = added_tokens(tokenizer)
    start = 0
    while len(text) - start > piece_chars:
        cut = _boundary(tokenizer, text, start + piece_chars, added)
        yield text[start:cut]
        start = cut
    yield text[start:]


def _boundary(tokenizer: Tokenizer, text: str, target: int, added: list[str]) -> int:
    lo, hi = max(0, target - _WINDOW), min(len(text), target + _WINDOW)
    window = text[lo:hi]
    if tokenizer.pre_tokenizer is not None:
        starts = [lo + begin for _, (begin, _end) in tokenizer.pre_tokenizer.pre_tokenize_str(window)]
    else:  # no pre-tokenizer: whitespace is the only boundary a model without one can rely on
        starts = [lo + i for i, char in enumerate(window) if char.isspace()]
    usable = [
        s for s in starts if lo < s < hi and (s - lo >= _MARGIN or lo == 0) and (hi - s >= _MARGIN or hi == len(text))
    ]
    for cut in sorted(usable, key=lambda s: abs(s - target)):
        if not any(token in text[max(0, cut - len(token) + 1) : cut + len(token) - 1] for token in added):
            return cut
    return target
