"""Table specs: the single source of truth for head sizes, offsets and multipliers.

A spec is a small TOML file that uses the reference EngramConfig's own field
names, so users can copy their training config into it unchanged. Two optional
fields tie it to its vocab projection, from which every multiplier derives:
`tokenizer` (`embedded:NAME`, a tokenizer.json or folder, or a Hub id; default the
embedded DeepSeek-V3 tokenizer) and `compressed_vocab_size`, which any projection
used with the spec must have.
"""

from __future__ import annotations

import dataclasses
import functools
import importlib.resources
import itertools
import math
import tomllib
from dataclasses import dataclass, field
from importlib.resources.abc import Traversable
from pathlib import Path
from typing import Any

import ml_dtypes
import numpy as np

from .dtypes import DTYPE_BYTES, numpy_dtype
from .errors import EngramError, ResourceError, UsageError
from .helpers import plural
from .primes import next_prime

DISTRIBUTIONS = ("normal", "uniform", "zeros")
INT64_MAX = np.iinfo(np.int64).max
MAX_HEAD_SIZE = 1 << 48  # rows of one head: far past any table; offsets and float reductions stay exact
MAX_HEADS = 4096  # heads of all layers together: the prime walk then takes well under a second
_ENGRAM_KEYS = {
    "layer_ids",
    "max_ngram_size",
    "n_head_per_ngram",
    "engram_vocab_size",
    "n_embed_per_ngram",
    "pad_id",
    "seed",
    "tokenizer",
    "compressed_vocab_size",
}


_OPTIONAL_KEYS = {"seed", "tokenizer", "compressed_vocab_size"}


_TABLE_KEYS = {"dtype", "init"}


@dataclass(frozen=True)
class InitSpec:
    """How table values are drawn: normal(std), uniform(-bound, bound) or zeros."""

    distribution: str = "normal"
    std: float = 1.0
    bound: float = 1.0

    def to_dict(self) -> dict[str, Any]:
        """The TOML/JSON form: the distribution and its one parameter."""
        if self.distribution == "normal":
            return {"distribution": "normal", "std": self.std}
        if self.distribution == "uniform":
            return {"distribution": "uniform", "bound": self.bound}
        return {"distribution": "zeros"}


@dataclass(frozen=True)
class TableSpec:
    """The tables of an Engram model: layers, orders, heads, head sizes, width, pad id and seed.

    The fields are the reference EngramConfig's, plus the table dtype, the init distribution and a
    name; head sizes (the reference's prime walk), offsets and multipliers follow from them.
    """

    layer_ids: tuple[int, ...]
    max_ngram_size: int
    n_head_per_ngram: int
    engram_vocab_size: tuple[int, ...]
    n_embed_per_ngram: int
    pad_id: int
    seed: int = 0
    dtype: str = "bfloat16"
    init: InitSpec = field(default_factory=InitSpec)
    name: str = "custom"
    tokenizer: str | None = None  # None: the embedded DeepSeek-V3 tokenizer
    compressed_vocab_size: int | None = None  # None: whatever the projection has

    def __post_init__(self) -> None:
        _validate(self)

    @property
    def orders(self) -> range:
        """The n-gram orders: 2 .. max_ngram_size."""
        return range(2, self.max_ngram_size + 1)

    @property
    def heads_per_layer(self) -> int:
        """Heads of one layer: n_head_per_ngram for every order."""
        return (self.max_ngram_size - 1) * self.n_head_per_ngram

    @property
    def dim(self) -> int:
        """Embedding width of one head: the reference splits n_embed_per_ngram evenly."""
        return self.n_embed_per_ngram // self.n_head_per_ngram

    def head_sizes(self, layer_id: int) -> list[int]:
        """Prime size of every head of a layer, order-major then head."""
        return list(self._all_head_sizes()[self._index(layer_id)])

    def offsets(self, layer_id: int) -> list[int]:
        """First row of every head in the layer table (prefix sums of head sizes)."""
        return [0, *itertools.accumulate(self.head_sizes(layer_id)[:-1])]

    def rows(self, layer_id: int) -> int:
        """Rows of one layer's table: the sum of its head sizes."""
        return sum(self.head_sizes(layer_id))

    @property
    def total_rows(self) -> int:
        """Rows of every layer's table together."""
        return sum(self.rows(layer) for layer in self.layer_ids)

    @property
    def parameters(self) -> int:
        """Values in all the tables: total rows times the head width."""
        return self.total_rows * self.dim

    def multipliers(self, layer_id: int, compressed_size: int) -> np.ndarray:
        """Odd int64 multipliers of a layer, drawn as the reference draws them.

        The bound keeps `id * multiplier` below int64 max for every id below
        `compressed_size`, so the multiply-XOR mix never overflows.
        """
        self._index(layer_id)
        if compressed_size < 1:
            raise EngramError(f"compressed vocab size must be positive, got {compressed_size}")
        rng = np.random.default_rng(self.seed + 10007 * layer_id)
        bound = max(1, (int(INT64_MAX) // compressed_size) // 2)
        r = rng.integers(0, bound, size=self.max_ngram_size, dtype=np.int64)
        return r * 2 + 1

    def layer_hashing(self, layer_id: int, compressed_size: int) -> dict[str, list[int]]:
        """What the hasher needs of one layer (head sizes, offsets, multipliers), as a store's
        attributes and a checkpoint's metadata tensors record it, so both derive it alike."""
        return {
            "head_sizes": self.head_sizes(layer_id),
            "offsets": self.offsets(layer_id),
            "multipliers": [int(m) for m in self.multipliers(layer_id, compressed_size)],
        }

    def scaled(self, factor: float) -> TableSpec:
        """The same spec with every order's minimum head size scaled (for size sweeps)."""
        scaled = [v * factor for v in self.engram_vocab_size]
        if not all(0 < v <= MAX_HEAD_SIZE for v in scaled):
            raise EngramError(f"scaling head sizes by {factor:g} leaves 1..2**48 rows per head")
        sizes = tuple(max(2, round(v)) for v in scaled)
        return dataclasses.replace(self, engram_vocab_size=sizes, name=f"{self.name}x{factor:g}")

    def replace(self, **changes: Any) -> TableSpec:
        """The same spec with some fields changed (validated again)."""
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        """TOML-shaped dict; `spec_from_dict(spec.to_dict())` gives the spec back."""
        return {
            "name": self.name,
            "engram": {
                "layer_ids": list(self.layer_ids),
                "max_ngram_size": self.max_ngram_size,
                "n_head_per_ngram": self.n_head_per_ngram,
                "engram_vocab_size": list(self.engram_vocab_size),
                "n_embed_per_ngram": self.n_embed_per_ngram,
                "pad_id": self.pad_id,
                "seed": self.seed,
                **({} if self.tokenizer is None else {"tokenizer": self.tokenizer}),
                **({} if self.compressed_vocab_size is None else {"compressed_vocab_size": self.compressed_vocab_size}),
            },
            "table": {"dtype": self.dtype, "init": self.init.to_dict()},
        }

    def check_compressed_size(self, compressed_size: int, what: str, error: type[EngramError] = UsageError) -> None:
        """Refuse a projection of another size than the spec names: every multiplier derives from it.

        Args:
            compressed_size: the projection's canonical ids.
            what: the projection, for the message ("projection p.safetensors").
            error: the error class to raise (a store that contradicts itself is a FormatError).
        """
        if self.compressed_vocab_size is not None and compressed_size != self.compressed_vocab_size:
            raise error(
                f"{what} has {compressed_size:,} canonical ids, but spec {self.name} says "
                f"compressed_vocab_size = {self.compressed_vocab_size:,}"
            )

    def _index(self, layer_id: int) -> int:
        try:
            return self.layer_ids.index(int(layer_id))
        except ValueError:
            raise EngramError(f"layer {layer_id} is not in the spec (layer_ids = {list(self.layer_ids)})") from None

    def _all_head_sizes(self) -> tuple[tuple[int, ...], ...]:
        return _walk_primes(self.layer_ids, self.max_ngram_size, self.n_head_per_ngram, self.engram_vocab_size)


@functools.lru_cache(maxsize=64)
def _walk_primes(
    layer_ids: tuple[int, ...], max_ngram_size: int, n_head: int, vocab_sizes: tuple[int, ...]
) -> tuple[tuple[int, ...], ...]:
    """The reference's prime walk: layers, then orders, then heads, never reusing a prime.

    Every walk from one start passes the primes earlier walks took; each prime's successor is
    found once and remembered, so skipping taken primes costs a lookup, not a primality test.
    """
    taken: set[int] = set()
    successor: dict[int, int] = {}

    def after(prime: int) -> int:
        if prime not in successor:
            successor[prime] = next_prime(prime)
        return successor[prime]

    per_layer = []
    for _layer in layer_ids:
        sizes = []
        for n in range(2, max_ngram_size + 1):
            start = vocab_sizes[n - 2] - 1
            for _head in range(n_head):
                prime = after(start)
                while prime in taken:
                    prime = after(prime)
                taken.add(prime)
                sizes.append(prime)
                start = prime
        per_layer.append(tuple(sizes))
    return tuple(per_layer)


def _fail(field_name: str, message: str) -> None:
    raise EngramError(f"spec field {field_name}: {message}")


def _is_int(value: Any) -> bool:
    return isinstance(value, int | np.integer) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


def _validate(spec: TableSpec) -> None:
    if not _is_int(spec.max_ngram_size) or spec.max_ngram_size < 2:
        _fail("max_ngram_size", f"must be an integer >= 2, got {spec.max_ngram_size!r}")
    if not _is_int(spec.n_head_per_ngram) or spec.n_head_per_ngram < 1:
        _fail("n_head_per_ngram", f"must be a positive integer, got {spec.n_head_per_ngram!r}")
    if not spec.layer_ids or not all(_is_int(v) and v >= 0 for v in spec.layer_ids):
        _fail("layer_ids", f"must be a non-empty list of non-negative integers, got {list(spec.layer_ids)!r}")
    if len(set(spec.layer_ids)) != len(spec.layer_ids):
        _fail("layer_ids", f"has duplicate layer ids: {list(spec.layer_ids)}")
    orders = spec.max_ngram_size - 1
    heads = len(spec.layer_ids) * orders * spec.n_head_per_ngram
    if heads > MAX_HEADS:
        raise ResourceError(
            f"spec has {heads:,} heads ({plural(len(spec.layer_ids), 'layer')} x {plural(orders, 'order')} x "
            f"{spec.n_head_per_ngram:,} per order); engram plans at most {MAX_HEADS:,} heads"
        )
    if len(spec.engram_vocab_size) != orders:
        _fail(
            "engram_vocab_size",
            f"needs one size per order 2..{spec.max_ngram_size} ({orders} values), got {len(spec.engram_vocab_size)}",
        )
    if not all(_is_int(v) and 0 < v <= MAX_HEAD_SIZE for v in spec.engram_vocab_size):
        _fail("engram_vocab_size", f"sizes must be integers from 1 to 2**48, got {list(spec.engram_vocab_size)!r}")
    if not _is_int(spec.n_embed_per_ngram) or spec.n_embed_per_ngram < 1:
        _fail("n_embed_per_ngram", f"must be a positive integer, got {spec.n_embed_per_ngram!r}")
    if spec.n_embed_per_ngram % spec.n_head_per_ngram:
        _fail(
            "n_embed_per_ngram",
            f"{spec.n_embed_per_ngram} is not divisible by n_head_per_ngram = {spec.n_head_per_ngram}",
        )
    if not _is_int(spec.pad_id) or spec.pad_id < 0:
        _fail("pad_id", f"must be a non-negative token id, got {spec.pad_id!r}")
    if not _is_int(spec.seed) or spec.seed < 0:
        _fail("seed", f"must be a non-negative integer, got {spec.seed!r}")
    if spec.tokenizer is not None and (not isinstance(spec.tokenizer, str) or not spec.tokenizer.strip()):
        _fail("tokenizer", f"must be embedded:NAME, a tokenizer path or a Hub id, got {spec.tokenizer!r}")
    if spec.compressed_vocab_size is not None and (
        not _is_int(spec.compressed_vocab_size) or spec.compressed_vocab_size < 1
    ):
        _fail("compressed_vocab_size", f"must be a positive integer, got {spec.compressed_vocab_size!r}")
    if spec.dtype not in DTYPE_BYTES:
        _fail("table.dtype", f"unknown dtype {spec.dtype!r}; allowed: {', '.join(DTYPE_BYTES)}")
    init = spec.init
    if init.distribution not in DISTRIBUTIONS:
        _fail(
            "table.init.distribution",
            f"unknown distribution {init.distribution!r}; allowed: {', '.join(DISTRIBUTIONS)}",
        )
    # The largest |value| the init can draw must stay finite in the table dtype: a uniform value
    # is at most `bound`, a normal one (30-bit Box-Muller) below 6.5 std.
    largest = float(ml_dtypes.finfo(numpy_dtype(spec.dtype)).max)
    for name, value, reach in (("std", init.std, 6.5), ("bound", init.bound, 1.0)):
        if not (_is_number(value) and 0 < value <= largest / reach):
            _fail(
                f"table.init.{name}",
                f"must be a positive finite number up to {largest / reach:.4g} for {spec.dtype}, got {value!r}",
            )


def _init_from_dict(raw: Any) -> InitSpec:
    if not isinstance(raw, dict):
        _fail("table.init", 'must be a table such as { distribution = "normal", std = 1.0 }')
    allowed = {"normal": {"std"}, "uniform": {"bound"}, "zeros": set()}
    dist = raw.get("distribution", "normal")
    if dist not in allowed:
        _fail("table.init.distribution", f"unknown distribution {dist!r}; allowed: {', '.join(allowed)}")
    extra = set(raw) - {"distribution"} - allowed[dist]
    if extra:
        _fail(
            f"table.init.{sorted(extra)[0]}",
            f"not a parameter of {dist}; allowed: {', '.join(sorted(allowed[dist])) or 'none'}",
        )
    return InitSpec(distribution=dist, std=raw.get("std", 1.0), bound=raw.get("bound", 1.0))


def spec_from_dict(raw: dict[str, Any], name: str = "custom") -> TableSpec:
    """Build a spec from the TOML layout, with a one-line error for every wrong field."""
    unknown = set(raw) - {"engram", "table", "name"}
    if unknown:
        _fail(sorted(unknown)[0], "unknown section; allowed: [engram], [table]")
    engram = raw.get("engram")
    if not isinstance(engram, dict):
        raise EngramError("spec has no [engram] section")
    table = raw.get("table", {})
    if not isinstance(table, dict):
        _fail("table", "must be a TOML table")
    for section, keys, allowed in (("engram", engram, _ENGRAM_KEYS), ("table", table, _TABLE_KEYS)):
        extra = set(keys) - allowed
        if extra:
            _fail(f"{section}.{sorted(extra)[0]}", f"unknown key; allowed: {', '.join(sorted(allowed))}")
    missing = _ENGRAM_KEYS - _OPTIONAL_KEYS - set(engram)
    if missing:
        _fail(f"engram.{sorted(missing)[0]}", "is required")
    for list_key in ("layer_ids", "engram_vocab_size"):
        if not isinstance(engram[list_key], list):
            _fail(list_key, f"must be a list, got {engram[list_key]!r}")
    return TableSpec(
        layer_ids=tuple(engram["layer_ids"]),
        max_ngram_size=engram["max_ngram_size"],
        n_head_per_ngram=engram["n_head_per_ngram"],
        engram_vocab_size=tuple(engram["engram_vocab_size"]),
        n_embed_per_ngram=engram["n_embed_per_ngram"],
        pad_id=engram["pad_id"],
        seed=engram.get("seed", 0),
        dtype=table.get("dtype", "bfloat16"),
        init=_init_from_dict(table.get("init", {"distribution": "normal", "std": 1.0})),
        name=str(raw.get("name", name)),
        tokenizer=engram.get("tokenizer"),
        compressed_vocab_size=engram.get("compressed_vocab_size"),
    )


def _presets() -> Traversable:
    """The preset folder: `tables/` of the repository, installed as the package data `engram_cli.presets`.

    A source checkout imported directly (the repository on `sys.path`, as pytest does) has no such
    package: there `tables/` beside the package folder is the same folder.
    """
    try:
        return importlib.resources.files("engram_cli.presets")
    except ModuleNotFoundError:
        return Path(__file__).resolve().parent.parent / "tables"


def preset_names() -> list[str]:
    """The names of the preset specs shipped in `tables/`."""
    return sorted(p.name.removesuffix(".toml") for p in _presets().iterdir() if p.name.endswith(".toml"))


def load_spec(path_or_preset: str | Path) -> TableSpec:
    """Read a spec from a TOML file, a preset name in `tables/` (`engram-27b`), or a model's
    config: a folder with a config.json (or engram_config.json) holding `engram_*` keys, or such a
    .json file (`checkpoints.model_config.spec_from_model_config`)."""
    path = Path(path_or_preset)
    if path.exists() and (path.is_dir() or path.suffix == ".json"):
        from .checkpoints.model_config import spec_from_model_config

        return spec_from_model_config(path)
    if not path.exists():
        if path.suffix != ".toml" and str(path_or_preset) in preset_names():
            preset = _presets() / f"{path_or_preset}.toml"
            return spec_from_dict(tomllib.loads(preset.read_text(encoding="utf-8")), name=str(path_or_preset))
        raise EngramError(
            f"no spec file or preset named {str(path_or_preset)!r} (presets: {', '.join(preset_names())})"
        )
    try:
        raw = tomllib.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError) as exc:
        raise EngramError(f"cannot read spec {path}: {exc}") from None
    except tomllib.TOMLDecodeError as exc:
        raise EngramError(f"spec {path} is not valid TOML: {exc}") from None
    spec = spec_from_dict(raw, name=path.stem)
    if spec.tokenizer is not None and not spec.tokenizer.startswith("embedded:"):
        beside = path.parent / spec.tokenizer
        if not Path(spec.tokenizer).is_absolute() and beside.exists():  # a path is relative to the spec file
            spec = spec.replace(tokenizer=str(beside.resolve()))
    return spec


def spec_text(path_or_preset: str | Path) -> str | None:
    """The TOML text of a spec file or preset (None when it names neither), to keep its lines and
    comments where a changed copy is written."""
    path = Path(path_or_preset)
    if path.is_file():
        return path.read_text(encoding="utf-8")
    if path.suffix != ".toml" and str(path_or_preset) in preset_names():
        return (_presets() / f"{path_or_preset}.toml").read_text(encoding="utf-8")
    return None
