"""`engram compress-vocab`: derive a tokenizer's vocab projection, write it, report what merged.

The projection itself (the normalization and the file format) is defined in `vocab`; this module
checks the output first, writes the file atomically, and reports the sizes and the largest merge
groups with a few decoded members.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from .output import FILE, Output
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
        """The share of tokenizer ids that merged away: 1 - compressed / vocab size."""
        return 1.0 - self.compressed_size / self.vocab_size

    def to_json(self) -> dict[str, Any]:
        """The `engram compress-vocab --json` output."""
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
    """The k canonical ids that merge the most tokenizer ids, with a few decoded members.

    Args:
        projection: the projection (it must carry its tokenizer).
        k: how many groups.
        examples: decoded members shown per group.
    """
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
    """The whole `engram compress-vocab` job: check the target, derive, write atomically, report.

    Args:
        tokenizer: a tokenizer.json, a folder holding one, a Hub repo id, or None for the embedded
            DeepSeek-V3 tokenizer.
        output: the projection file to write (.safetensors).
        overwrite: replace an existing file.
        top: how many of the largest merge groups to report.
    """
    output = Path(output)
    target = Output(output, FILE, overwrite=overwrite)
    source = load_tokenizer(tokenizer)
    projection = compress_vocab(source)
    with target.writing() as tmp:
        tmp.write_bytes(projection.to_bytes())
    return CompressReport(
        output=str(output),
        source=source.source,
        tokenizer_sha256=source.sha256,
        vocab_size=projection.vocab_size,
        compressed_size=projection.compressed_size,
        raw_fallbacks=int(projection.metadata["raw_fallbacks"]),
        top_groups=top_groups(projection, top),
    )
