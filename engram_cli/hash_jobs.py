"""`engram hash`: a text's n-grams with their buckets, or a file of token ids hashed into an .npz.

A text is tokenized with the projection's tokenizer and every token's n-grams listed with the
bucket (or row) of every head. An id file (.npy, (T,) or (B, T)) is hashed piece by piece, each
piece with the max_ngram_size - 1 ids before it as context, and streamed into the archive's
`layer_<id>` entries (written beside the target, then renamed), so memory stays at one piece
however large the file.
"""

from __future__ import annotations

import time
import zipfile
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from .errors import EngramError, UsageError
from .hashing import NgramHasher, check_positions, check_rank, hash_kernel
from .helpers import paused_gc
from .output import FILE, Output
from .progress import SILENT, Progress
from .spec import TableSpec
from .vocab import VocabProjection

if TYPE_CHECKING:
    from tokenizers import Tokenizer

# Tokens per piece when `engram hash --ids` streams a large array to disk.
FILE_CHUNK_TOKENS = 1 << 19


def values_key(rows: bool) -> str:
    """The JSON key of the hashed values: "rows" (layer-table rows) or "buckets" (head-local)."""
    return "rows" if rows else "buckets"


@dataclass
class HashTextReport:
    """What `engram hash TEXT` shows: every token's n-grams and where each head looks them up."""

    spec_name: str
    projection: str
    compressed_size: int
    pad_id: int
    pad_text: str
    rows: bool
    layers: list[dict[str, Any]]
    tokens: list[dict[str, Any]]

    def to_json(self) -> dict[str, Any]:
        """The `engram hash TEXT --json` output."""
        return {
            "spec": self.spec_name,
            "projection": self.projection,
            "compressed_size": self.compressed_size,
            "pad_id": self.pad_id,
            "values": values_key(self.rows),
            "layers": self.layers,
            "tokens": self.tokens,
        }


@dataclass
class HashFileReport:
    """What `engram hash --ids` wrote: one array per layer in an .npz."""

    input: str
    output: str
    shape: list[int]
    dtype: str
    rows: bool
    layers: list[dict[str, Any]]
    seconds: float

    @property
    def tokens(self) -> int:
        """How many token ids were hashed."""
        return int(np.prod(self.shape))

    def to_json(self) -> dict[str, Any]:
        """The `engram hash --ids --json` output."""
        return {
            "input": self.input,
            "output": self.output,
            "shape": self.shape,
            "dtype": self.dtype,
            "tokens": self.tokens,
            "values": values_key(self.rows),
            "layers": self.layers,
            "seconds": self.seconds,
            "tokens_per_second": self.tokens / self.seconds if self.seconds > 0 else None,
        }


def hash_text(
    text: str,
    spec: TableSpec,
    projection: VocabProjection | None = None,
    *,
    layers: Iterable[int] | None = None,
    rows: bool = False,
    special_tokens: bool = True,
    barrier_ids: Iterable[int] | None = None,
) -> HashTextReport:
    """Tokenize with the projection's tokenizer, hash, and pair every n-gram's text with its buckets.

    Args:
        text: the text to tokenize.
        spec, projection: the hasher (default projection: the spec's own).
        layers: only these layers (default: every layer of the spec).
        rows: layer-table rows (bucket + head offset) instead of head-local buckets.
        special_tokens: let the tokenizer add its BOS and the like.
        barrier_ids: tokens no n-gram spans; a barrier's own n-grams are all pad.
    """
    hasher = NgramHasher(spec, projection)
    projection = hasher.projection
    tokenizer = projection.tokenizer()
    ids = np.array(tokenizer.encode(text, add_special_tokens=special_tokens).ids, dtype=np.int64)
    layer_ids = hasher._layer_ids(layers)
    barrier = None if barrier_ids is None else sorted(set(barrier_ids))
    values = (hasher.rows if rows else hasher.hash)(ids, layers=layer_ids, barrier_ids=barrier)
    with paused_gc():
        tokens = _token_entries(ids, values, spec, projection, tokenizer, values_key(rows), set(barrier or ()))
    layer_info = [
        {
            "layer_id": k,
            "orders": list(spec.orders),
            "multipliers": hasher.multipliers(k).tolist(),
            "head_sizes": hasher.head_sizes(k).tolist(),
            "offsets": hasher.offsets(k).tolist(),
        }
        for k in layer_ids
    ]
    return HashTextReport(
        spec_name=spec.name,
        projection=projection.fingerprint()[:12],
        compressed_size=hasher.compressed_size,
        pad_id=spec.pad_id,
        pad_text=tokenizer.decode([spec.pad_id], skip_special_tokens=False),
        rows=rows,
        layers=layer_info,
        tokens=tokens,
    )


def _token_entries(
    ids: np.ndarray,
    values: dict[int, np.ndarray],
    spec: TableSpec,
    projection: VocabProjection,
    tokenizer: Tokenizer,
    key: str,
    barriers: set[int],
) -> list[dict[str, Any]]:
    """Every token's entry of `HashTextReport.tokens`.

    An n-gram sees back to the row's start or to just after the last barrier token, whichever is
    nearer; a barrier's own n-grams are all pad. Everything comes from whole-array conversions and
    two batched decodes, so a token costs microseconds (a decode call per n-gram and per-head
    array slicing cost milliseconds).
    """
    id_list = ids.tolist()
    orders = list(spec.orders)
    per_order = spec.n_head_per_ngram
    per_layer = [(str(k), v.tolist()) for k, v in values.items()]
    seen: list[int] = []  # per token: how many tokens its n-grams may reach, itself included
    since = -1  # index of the last barrier so far
    for t, tid in enumerate(id_list):
        if tid in barriers:
            since = t
        seen.append(0 if tid in barriers else t - since)
    windows = [id_list[t - min(n, seen[t]) + 1 : t + 1] for t in range(len(id_list)) for n in orders]
    ngram_texts = tokenizer.decode_batch(windows, skip_special_tokens=False) if windows else []
    token_texts = tokenizer.decode_batch([[tid] for tid in id_list], skip_special_tokens=False) if id_list else []
    compressed = projection.lookup[ids].tolist()
    tokens = []
    for t, tid in enumerate(id_list):
        ngrams = []
        for i, n in enumerate(orders):
            window = windows[t * len(orders) + i]
            pads = n - len(window)
            a, b = (n - 2) * per_order, (n - 1) * per_order
            ngrams.append(
                {
                    "n": n,
                    "pads": pads,
                    "ids": [spec.pad_id] * pads + window,
                    "text": ngram_texts[t * len(orders) + i],
                    key: {k: v[t][a:b] for k, v in per_layer},
                }
            )
        tokens.append(
            {"position": t, "id": tid, "compressed_id": compressed[t], "text": token_texts[t], "ngrams": ngrams}
        )
    return tokens


def _pieces(rows: int, length: int, chunk_tokens: int) -> Iterator[tuple[int, int, int, int]]:
    """(b0, b1, t0, t1) pieces of about chunk_tokens tokens, in the output's C order."""
    if length <= chunk_tokens:
        step = max(1, chunk_tokens // max(length, 1))
        for b0 in range(0, rows, step):
            yield b0, min(rows, b0 + step), 0, length
    else:
        for b in range(rows):
            for t0 in range(0, length, chunk_tokens):
                yield b, b + 1, t0, min(length, t0 + chunk_tokens)


def _load_ids(path: Path, what: str = "token ids") -> np.ndarray:
    if not path.is_file():
        raise EngramError(f"no such {'token-id' if what == 'token ids' else what} file: {path}")
    try:
        ids = np.load(path, mmap_mode="r", allow_pickle=False)
    except (ValueError, OSError, EOFError) as exc:
        raise EngramError(f"{path} is not a readable .npy array: {exc}") from None
    if not isinstance(ids, np.ndarray):
        raise EngramError(f"{path} is an .npz archive; give one .npy array of {what}")
    return ids


def hash_ids_file(
    ids_path: str | Path,
    output: str | Path,
    spec: TableSpec,
    projection: VocabProjection | None = None,
    *,
    layers: Iterable[int] | None = None,
    rows: bool = False,
    overwrite: bool = False,
    chunk_tokens: int = FILE_CHUNK_TOKENS,
    positions: str | Path | None = None,
    barrier_ids: Iterable[int] | None = None,
    progress: Progress = SILENT,
) -> HashFileReport:
    """Hash a .npy of token ids into an .npz with one array `layer_<id>` per layer.

    The output is streamed piece by piece into the archive (written beside the
    target, then renamed), so memory stays at one piece however large the file.

    Args:
        ids_path: the .npy of token ids, (T,) or (B, T).
        output: the .npz to write.
        spec, projection: the hasher (default projection: the spec's own).
        layers: only these layers (default: every layer of the spec).
        rows: layer-table rows (bucket + head offset) instead of head-local buckets.
        overwrite: replace an existing output.
        chunk_tokens: about how many tokens one piece holds.
        positions: a .npy of the ids' shape, 0 at each sequence start and +1 within it (several
            sequences per row; see `NgramHasher.hash`); checked whole before anything is written.
        barrier_ids: tokens no n-gram spans; a barrier's own n-grams are all pad.
        progress: receives a task advancing by pieces hashed.
    """
    hasher = NgramHasher(spec, projection)
    ids_path, output = Path(ids_path), Path(output)
    target = Output(output, FILE, overwrite=overwrite)
    ids = _load_ids(ids_path)
    check_rank(ids.shape)
    hasher.projection.check_ids(ids)
    layer_ids = hasher._layer_ids(layers)
    barrier = None if barrier_ids is None else list(barrier_ids)
    hasher.barrier_vocab(barrier)  # refuse bad ids before anything is written
    batch = ids.reshape(1, -1) if ids.ndim == 1 else ids
    places = None
    if positions is not None:
        places = _load_ids(Path(positions), "positions")
        if places.shape != ids.shape:
            raise UsageError(f"positions {positions} have shape {places.shape}, the token ids {ids.shape}")
        if places.dtype.kind not in "iu":
            raise UsageError(f"positions must be integers, got dtype {places.dtype}")
        check_positions(places)
        places = places.reshape(batch.shape)
    n_rows, length = batch.shape
    context = spec.max_ngram_size - 1
    pieces = list(_pieces(n_rows, length, max(1, chunk_tokens)))
    summary = []
    hash_kernel()  # compiling or loading it is not hashing time
    start = time.perf_counter()
    task = progress.task("hashing", len(pieces) * len(layer_ids))
    with target.writing() as tmp, zipfile.ZipFile(tmp, "x", zipfile.ZIP_STORED, allowZip64=True) as archive:
        for layer_id in layer_ids:
            shape = ids.shape + (hasher.head_sizes(layer_id).size,)
            low, high = None, None
            with archive.open(f"layer_{layer_id}.npy", "w", force_zip64=True) as entry:
                np.lib.format.write_array_header_2_0(entry, {"descr": "<i8", "fortran_order": False, "shape": shape})
                for b0, b1, t0, t1 in pieces:
                    first = max(0, t0 - context)
                    piece = np.asarray(batch[b0:b1, first:t1])
                    # A piece starts mid-row: its positions, capped by the index in the piece, are
                    # valid and still reach back as far as the tokens it hashes need.
                    # Any integer dtype: uint64 and int64 would promote to float64 together.
                    local = (
                        None
                        if places is None
                        else np.minimum(places[b0:b1, first:t1].astype(np.int64), np.arange(t1 - first))
                    )
                    out = (hasher.rows if rows else hasher.hash)(
                        piece, layers=[layer_id], positions=local, barrier_ids=barrier
                    )[layer_id]
                    out = np.ascontiguousarray(out[:, t0 - first :])
                    if out.size:
                        low = int(out.min()) if low is None else min(low, int(out.min()))
                        high = int(out.max()) if high is None else max(high, int(out.max()))
                        entry.write(out.astype("<i8", copy=False).data.cast("B"))
                    task.advance()
            summary.append(
                {"layer_id": layer_id, "key": f"layer_{layer_id}", "shape": list(shape), "min": low, "max": high}
            )
    return HashFileReport(
        input=str(ids_path),
        output=str(output),
        shape=list(ids.shape),
        dtype=str(ids.dtype),
        rows=rows,
        layers=summary,
        seconds=time.perf_counter() - start,
    )
