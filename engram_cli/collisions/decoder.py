"""Canonical ids back to text, for the n-grams `--top` lists.

A canonical id stands for every tokenizer id whose normalized text it is; the first of them (the
lowest raw id) is decoded. Without a tokenizer an id is shown as `#<id>`.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import numpy as np

from ..errors import EngramError
from ..vocab import VocabProjection

if TYPE_CHECKING:
    from tokenizers import Tokenizer


class NgramDecoder:
    """Canonical ids back to text, through the first tokenizer id of each canonical id."""

    def __init__(self, projection: VocabProjection) -> None:
        lookup = projection.lookup
        self._first = np.full(projection.compressed_size, -1, np.int64)
        canonical, first = np.unique(lookup, return_index=True)  # the first raw id of each canonical id
        self._first[canonical] = first
        self._tokenizer: Tokenizer | None
        try:
            self._tokenizer = projection.tokenizer()
        except EngramError:
            self._tokenizer = None
        self._cache: dict[int, str] = {}

    def token(self, canonical: int) -> str:
        """The text of one canonical id (`#<id>` when the projection carries no tokenizer)."""
        if canonical not in self._cache:
            raw = int(self._first[canonical])
            self._cache[canonical] = (
                f"#{canonical}" if self._tokenizer is None else self._tokenizer.decode([raw], skip_special_tokens=False)
            )
        return self._cache[canonical]

    def ngram(self, window: np.ndarray, count: int) -> dict[str, Any]:
        """An n-gram's ids, tokens, text and occurrence count, as `--top` lists them."""
        tokens = [self.token(int(c)) for c in window]
        return {"ids": [int(c) for c in window], "tokens": tokens, "text": "".join(tokens), "count": count}
