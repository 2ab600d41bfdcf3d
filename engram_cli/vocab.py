"""The vocab projection: every tokenizer id onto a canonical id by normalized text.

Bit-exact with the reference's CompressedTokenizer: the key of an id is its
decoded text normalized (NFKC, NFD, strip accents, lowercase, collapse
whitespace, strip; a lone space survives), or its raw token string when the
decoded text is a partial UTF-8 sequence; canonical ids follow first appearance.

A projection file (`engram compress-vocab`) is a safetensors file: `lookup`, int64 (vocab_size,),
tokenizer id -> canonical id, and (when known) `tokenizer_zip`, uint8, the deflated tokenizer.json
it was made from; its metadata hold format "engram-projection", format_version "1", vocab_size,
compressed_size, the tokenizer's source and sha256, the normalizer version ("engram-nfkc-v1") and
how many ids fell back to their raw token. A projection is identified by its fingerprint, the
sha256 of its lookup's bytes.

The projection of a tokenizer a spec names (`tokenizer_projection`, `spec_projection`) is derived
once and kept in the user's cache directory as such a file, named by the first 16 hex digits of
the tokenizer.json's sha256 and the normalizer version, and used only if it records that sha256.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import sys
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np
from safetensors import SafetensorError
from safetensors.numpy import load, save
from tokenizers import Regex, Tokenizer, normalizers

from .errors import ChecksumError, EngramError, FormatError, UsageError
from .helpers import read_file_limited
from .output import write_file
from .spec import TableSpec
from .tokenizer import (
    TokenizerSource,
    load_tokenizer,
    parse_tokenizer,
    tokenizer_bytes,
    tokenizer_from_bytes,
    unzip_bytes,
    zip_bytes,
)

NORMALIZER_VERSION = "engram-nfkc-v1"
PROJECTION_FORMAT = "engram-projection"
PROJECTION_FORMAT_VERSION = "1"
MAX_PROJECTION_BYTES = 256 << 20  # a projection file: 16M int64 ids beside a zipped 128 MiB tokenizer.json
_FILE_KEYS = ("format", "format_version", "vocab_size", "compressed_size")  # derived on save
_SENTINEL = "\ue000"
_REPLACEMENT = "\ufffd"


def build_normalizer() -> normalizers.Normalizer:
    """The reference key normalizer; the sentinel keeps a lone space from being stripped."""
    return normalizers.Sequence(
        [
            normalizers.NFKC(),
            normalizers.NFD(),
            normalizers.StripAccents(),
            normalizers.Lowercase(),
            normalizers.Replace(Regex(r"[ \t\r\n]+"), " "),
            normalizers.Replace(Regex(r"^ $"), _SENTINEL),
            normalizers.Strip(),
            normalizers.Replace(_SENTINEL, " "),
        ]
    )


_ASCII_SPACE_RUN = re.compile(r"[ \t\r\n]+")
_ASCII_WHITESPACE = " \t\n\r\x0b\x0c"  # Rust's char::is_whitespace restricted to ASCII


def _ascii_key(text: str) -> str:
    """The normalizer's result for ASCII text, where NFKC, NFD and StripAccents change nothing.

    About half of a typical vocabulary is ASCII; this skips the Rust round trip for it.
    """
    collapsed = _ASCII_SPACE_RUN.sub(" ", text.lower())
    if collapsed == " ":
        return collapsed
    return collapsed.strip(_ASCII_WHITESPACE) or text


def _keys(tokenizer: Tokenizer) -> tuple[list[str], int]:
    """Key of every id, and how many ids fell back to their raw token string."""
    size = tokenizer.get_vocab_size(with_added_tokens=True)
    texts = tokenizer.decode_batch([[tid] for tid in range(size)], skip_special_tokens=False)
    normalize = build_normalizer().normalize_str
    keys, fallbacks = [], 0
    for tid, text in enumerate(texts):
        if _REPLACEMENT in text:
            fallbacks += 1
            token = tokenizer.id_to_token(tid)
            keys.append(text if token is None else token)
        elif text.isascii():
            keys.append(_ascii_key(text))
        else:
            keys.append(normalize(text) or text)
    return keys, fallbacks


def key_of(tokenizer: Tokenizer, tid: int) -> str:
    """The normalized key of one tokenizer id (its raw token when the decoded text is partial UTF-8)."""
    text = tokenizer.decode([tid], skip_special_tokens=False)
    if _REPLACEMENT in text:
        return tokenizer.id_to_token(tid) or text
    return build_normalizer().normalize_str(text) or text


def _integer_lookup(lookup: Any) -> np.ndarray:
    """A lookup as a 1-D int64 array of non-negative ids (float or negative ids refused)."""
    array = np.asarray(lookup)
    if array.ndim != 1 or array.size == 0:
        raise FormatError("a projection lookup must be a non-empty 1-D array")
    if array.dtype.kind not in "iu":
        raise FormatError(f"a projection lookup holds integer ids, not {array.dtype}")
    if array.dtype.kind == "u" and int(array.max()) > np.iinfo(np.int64).max:
        raise FormatError(f"a projection lookup holds ids up to {int(array.max()):,}, past int64")
    array = np.ascontiguousarray(array, dtype=np.int64)
    if int(array.min()) < 0:
        raise FormatError(f"a projection lookup holds negative ids ({int(array.min()):,})")
    return array


def lookup_fingerprint(lookup: np.ndarray) -> str:
    """The sha256 of an int64 lookup's bytes: a projection's identity."""
    return hashlib.sha256(np.ascontiguousarray(lookup).tobytes()).hexdigest()


def checked_lookup(lookup: Any) -> np.ndarray:
    """A projection lookup as int64, refused unless it maps onto 0..compressed_size-1 exactly.

    What every projection file, store and export holds. Every canonical id must be used and
    none may be past the vocab: a lookup with gaps or huge ids changes the multiplier bound
    (ids near 2**62 make every multiplier 1 and the hash order-insensitive).
    """
    array = _integer_lookup(lookup)
    low, high = int(array.min()), int(array.max())
    if low != 0 or high >= array.size:
        raise FormatError(
            f"a projection lookup maps {array.size:,} token ids onto canonical ids 0..n-1 "
            f"(n <= {array.size:,}); this one holds ids from {low:,} to {high:,}"
        )
    used = np.bincount(array, minlength=high + 1)
    if not used.all():
        raise FormatError(
            f"a projection lookup must use every canonical id 0..{high:,}; id {int(np.argmin(used != 0)):,} is unused"
        )
    return array


@dataclass
class VocabProjection:
    """A surjective map from tokenizer ids to canonical ids, with what made it."""

    lookup: np.ndarray
    metadata: dict[str, str] = field(default_factory=dict)
    tokenizer_json: bytes | None = None
    origin: str | None = field(default=None, compare=False)  # "projection FILE", for messages

    def __post_init__(self) -> None:
        self.lookup = _integer_lookup(self.lookup)
        self._torch_cache: dict[Any, Any] = {}

    def check_onto(self) -> None:
        """Refuse, before it is written anywhere, a lookup that files may not hold (`checked_lookup`)."""
        checked_lookup(self.lookup)

    @property
    def vocab_size(self) -> int:
        """Tokenizer ids the projection maps."""
        return int(self.lookup.size)

    @property
    def compressed_size(self) -> int:
        """Canonical ids: the largest one plus 1."""
        return int(self.lookup.max()) + 1

    def canonical_pad(self, pad_id: int) -> int:
        """The canonical id of a spec's pad_id, which must be a token id of this vocab."""
        if not 0 <= pad_id < self.vocab_size:
            raise UsageError(
                f"spec pad_id {pad_id} is not a token id of the projection's vocab (0..{self.vocab_size - 1})"
            )
        return int(self.lookup[pad_id])

    def fingerprint(self) -> str:
        """The sha256 of the lookup's bytes: what stores and exports check a projection by."""
        return lookup_fingerprint(self.lookup)

    def tokenizer(self) -> Tokenizer:
        """The tokenizer the projection was made from; an error when it carries none."""
        if self.tokenizer_json is None:
            raise EngramError("this projection carries no tokenizer; pass one that was made by `engram compress-vocab`")
        return _cached_tokenizer(self.tokenizer_json)

    def check_ids(self, ids: np.ndarray) -> None:
        """Refuse float arrays and ids past the vocab, naming the first offending position."""
        if ids.dtype.kind not in "iu":
            raise EngramError(f"token ids must be integers, got dtype {ids.dtype}")
        if ids.size and ids.max() >= self.vocab_size:
            position = tuple(int(i) for i in np.argwhere(ids >= self.vocab_size)[0])
            raise EngramError(
                f"token id {int(ids[position])} at position {list(position)} is not "
                f"below the vocab size {self.vocab_size}"
            )

    def compress(self, ids: Any) -> Any:
        """Map ids of any shape (numpy or torch); negative ids pass through unchanged."""
        torch = sys.modules.get("torch")  # a tensor means torch is loaded; numpy users need not load it
        if torch is not None and isinstance(ids, torch.Tensor):
            if ids.dtype.is_floating_point or ids.dtype.is_complex or ids.dtype == torch.bool:
                raise EngramError(f"token ids must be integers, got dtype {ids.dtype}")
            self.check_ids(ids.detach().cpu().numpy() if ids.device.type != "cpu" else ids.numpy())
            table = self._torch_cache.get(ids.device)
            if table is None:
                table = self._torch_cache[ids.device] = torch.from_numpy(self.lookup).to(ids.device)
            wide = ids.long()
            return torch.where(wide >= 0, table[wide.clamp(min=0)], wide)
        arr = np.asarray(ids)
        self.check_ids(arr)
        ints = arr.astype(np.int64, copy=False)
        return np.where(ints >= 0, self.lookup[np.maximum(ints, 0)], ints)

    def save(self, path: str | Path) -> None:
        """Write the projection file, replacing a file there (through `output.write_file`)."""
        write_file(path, self.to_bytes())

    def to_bytes(self) -> bytes:
        """The projection file's bytes (the format in the module docstring)."""
        self.check_onto()
        tensors = {"lookup": self.lookup}
        if self.tokenizer_json is not None:
            tensors["tokenizer_zip"] = np.frombuffer(zip_bytes(self.tokenizer_json), dtype=np.uint8)
        meta = {
            **self.metadata,
            "format": PROJECTION_FORMAT,
            "format_version": PROJECTION_FORMAT_VERSION,
            "vocab_size": str(self.vocab_size),
            "compressed_size": str(self.compressed_size),
        }
        return save(tensors, metadata=meta)


@lru_cache(maxsize=4)
def _cached_tokenizer(json_bytes: bytes) -> Tokenizer:
    return tokenizer_from_bytes(json_bytes)


def compress_vocab(tokenizer: Tokenizer | TokenizerSource | str | Path | None = None) -> VocabProjection:
    """Derive the projection of a tokenizer (object, file, folder, Hub id, or None: the default)."""
    if isinstance(tokenizer, Tokenizer):
        text = tokenizer.to_str().encode("utf-8")
        tokenizer = TokenizerSource(tokenizer, text, "in-memory")
    elif not isinstance(tokenizer, TokenizerSource):
        tokenizer = load_tokenizer(None if tokenizer is None else str(tokenizer))
    keys, fallbacks = _keys(tokenizer.tokenizer)
    if not keys:
        raise EngramError(f"{tokenizer.source} has an empty vocabulary")
    canonical: dict[str, int] = {}
    lookup = np.fromiter((canonical.setdefault(k, len(canonical)) for k in keys), dtype=np.int64, count=len(keys))
    metadata = {
        "tokenizer_source": tokenizer.source,
        "tokenizer_sha256": tokenizer.sha256,
        "normalizer_version": NORMALIZER_VERSION,
        "raw_fallbacks": str(fallbacks),
    }
    return VocabProjection(lookup, metadata, tokenizer.json_bytes)


def load_projection(path: str | Path) -> VocabProjection:
    """Read a projection file made by `engram compress-vocab`; a one-line error for anything else."""
    path = Path(path)
    try:
        data = read_file_limited(path, MAX_PROJECTION_BYTES, f"projection {path}")
    except OSError as exc:
        raise EngramError(f"cannot read projection {path}: {exc.strerror or exc}") from None
    try:
        tensors = load(data)
        header_len = int.from_bytes(data[:8], "little")
        metadata = json.loads(data[8 : 8 + header_len]).get("__metadata__", {})
    except (SafetensorError, ValueError, json.JSONDecodeError):
        raise EngramError(
            f"{path} is not a projection file (expected safetensors from `engram compress-vocab`)"
        ) from None
    if not isinstance(metadata, dict) or metadata.get("format") != PROJECTION_FORMAT or "lookup" not in tensors:
        raise FormatError(f"{path} is not a projection file made by `engram compress-vocab`")
    lookup = tensors["lookup"]
    if lookup.dtype != np.int64:
        raise FormatError(f"{path}: the projection lookup must be int64, not {lookup.dtype}")
    zipped = tensors.get("tokenizer_zip")
    if zipped is not None and (zipped.dtype != np.uint8 or zipped.ndim != 1):
        raise FormatError(f"{path}: tokenizer_zip must be a 1-D uint8 array of zip bytes")
    try:
        lookup = checked_lookup(lookup)
    except FormatError as exc:
        raise FormatError(f"{path}: {exc}") from None
    for key, actual in (("vocab_size", lookup.size), ("compressed_size", int(lookup.max()) + 1)):
        if key in metadata and metadata[key] != str(actual):
            raise FormatError(f"{path} says {key} {metadata[key]} but its lookup has {actual:,}")
    tokenizer_json = None if zipped is None else unzip_bytes(zipped.tobytes(), f"{path}: tokenizer_zip")
    own = {k: v for k, v in metadata.items() if k not in _FILE_KEYS}
    return VocabProjection(lookup, own, tokenizer_json, origin=f"projection {path}")


def restore_projection(
    lookup: np.ndarray, tokenizer_zip: bytes | None, recorded: dict[str, str], where: str
) -> VocabProjection:
    """The projection an export carries, refused if its lookup no longer matches the
    fingerprint recorded beside it (a damaged or edited file would hash to other rows).

    Args:
        lookup: the stored lookup.
        tokenizer_zip: the stored deflated tokenizer.json, if any.
        recorded: the metadata recorded beside it, with its fingerprint.
        where: the file, for messages.
    """
    metadata = {k: v for k, v in recorded.items() if k != "fingerprint"}
    array = np.asarray(lookup)
    if array.dtype != np.int64 or array.ndim != 1:
        raise FormatError(f"{where}: the projection lookup must be 1-D int64, not {array.dtype} {list(array.shape)}")
    array = np.ascontiguousarray(array)
    if "fingerprint" in recorded and lookup_fingerprint(array) != recorded["fingerprint"]:
        raise ChecksumError(f"{where}: the projection lookup does not match its recorded fingerprint")
    try:
        checked = checked_lookup(array)
    except FormatError as exc:
        raise FormatError(f"{where}: {exc}") from None
    tokenizer_json = (
        None if tokenizer_zip is None else unzip_bytes(tokenizer_zip, f"{where}: the projection's tokenizer zip")
    )
    return VocabProjection(checked, metadata, tokenizer_json)


def _cache_dir() -> Path:
    root = os.environ.get("ENGRAM_CACHE_DIR") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "engram"
    )
    return Path(root)


@lru_cache(maxsize=8)
def tokenizer_projection(tokenizer: str | None = None) -> VocabProjection:
    """The projection of a tokenizer source (`embedded:NAME`, a path, a Hub id; None: the embedded
    DeepSeek-V3), derived once and cached under the user's cache directory, keyed by the sha256
    of the tokenizer's JSON and the normalizer version: a later call only reads the file."""
    data, name = tokenizer_bytes(tokenizer)
    sha256 = hashlib.sha256(data).hexdigest()
    cached = _cache_dir() / f"projection-{sha256[:16]}-{NORMALIZER_VERSION}.safetensors"
    if cached.is_file():
        try:
            projection = load_projection(cached)
        except EngramError:
            pass
        else:
            if projection.metadata.get("tokenizer_sha256") == sha256:
                return projection
    projection = compress_vocab(TokenizerSource(parse_tokenizer(data, name), data, name))
    try:
        cached.parent.mkdir(parents=True, exist_ok=True)
        projection.save(cached)
    except (OSError, EngramError):
        pass  # a read-only home only costs the recomputation next time
    return projection


def default_projection() -> VocabProjection:
    """The embedded DeepSeek-V3 projection, derived once and cached on disk."""
    return tokenizer_projection(None)


def spec_projection(spec: TableSpec) -> VocabProjection:
    """The projection of the tokenizer a spec names (the embedded DeepSeek-V3 one if it names none)."""
    projection = tokenizer_projection(spec.tokenizer)
    spec.check_compressed_size(
        projection.compressed_size, f"the projection of {spec.tokenizer or 'embedded:deepseek-v3'}"
    )
    return projection


def projection_for(spec: TableSpec, projection: VocabProjection | None = None) -> VocabProjection:
    """The projection given, checked against the spec's `compressed_vocab_size`, or the spec's own.

    The one check of a spec and its projection where they enter the library (`build_tables`,
    `NgramHasher`, `inspect`); the CLI passes the file it loaded, whose name the message gives.
    """
    if projection is None:
        return spec_projection(spec)
    spec.check_compressed_size(projection.compressed_size, projection.origin or "the projection")
    return projection
