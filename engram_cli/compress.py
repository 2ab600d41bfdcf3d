"""The vocab projection: every tokenizer id onto a canonical id by normalized text.

Bit-exact with the reference's CompressedTokenizer: the key of an id is its
decoded text normalized (NFKC, NFD, strip accents, lowercase, collapse
whitespace, strip; a lone space survives), or its raw token string when the
decoded text is a partial UTF-8 sequence; canonical ids follow first appearance.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from .helpers import check_output_file
from .tokenizer import load_tokenizer
from .vocab import VocabProjection, compress_vocab, key_of


@dataclass
class CompressReport:
    """What `engram compress-vocab` did: sizes, the largest merge groups, the file written."""

    output: str
    source: str
    tokenizer_sha256: str
    vocab_size: int
    compressed_size: int
    raw_fallbacks: int
    top_groups: list[dict[str, Any]]

    @property
    def reduction(self) -> float:
        return 1.0 - self.compressed_size / self.vocab_size

    def to_json(self) -> dict[str, Any]:
        return {
            "output": self.output,
            "source": self.source,
            "tokenizer_sha256": self.tokenizer_sha256,
            "vocab_size": self.vocab_size,
            "compressed_size": self.compressed_size,
            "reduction": self.reduction,
            "raw_fallbacks": self.raw_fallbacks,
            "top_groups": self.top_groups,
        }


def top_groups(projection: VocabProjection, k: int, examples: int = 6) -> list[dict[str, Any]]:
    """The k canonical ids that merge the most tokenizer ids, with a few decoded members."""
    counts = np.bincount(projection.lookup)
    order = np.argsort(-counts, kind="stable")[: max(k, 0)]
    tokenizer = projection.tokenizer()
    groups = []
    for cid in order:
        members = np.flatnonzero(projection.lookup == cid)
        groups.append(
            {
                "canonical_id": int(cid),
                "key": key_of(tokenizer, int(members[0])),
                "size": int(counts[cid]),
                "examples": [tokenizer.decode([int(m)], skip_special_tokens=False) for m in members[:examples]],
            }
        )
    return groups


def write_projection(
    tokenizer: str | None, output: str | Path, *, overwrite: bool = False, top: int = 10
) -> CompressReport:
    """The whole `engram compress-vocab` job: check the target, derive, write atomically, report."""
    output = Path(output)
    check_output_file(output, overwrite)
    source = load_tokenizer(tokenizer)
    projection = compress_vocab(source)
    projection.save(output)
    return CompressReport(
        output=str(output),
        source=source.source,
        tokenizer_sha256=source.sha256,
        vocab_size=projection.vocab_size,
        compressed_size=projection.compressed_size,
        raw_fallbacks=int(projection.metadata["raw_fallbacks"]),
        top_groups=top_groups(projection, top),
    )
