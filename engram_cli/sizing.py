"""Sizing answers: from the growth of distinct n-grams in a sample to head sizes for a training run.

Extrapolation (`predict`): Heaps' law with a drifting exponent, log D = a + b log N + c (log N)**2
(c <= 0), fitted by weighted least squares to the growth points of the later three quarters of
the sample (in log tokens; weights rise linearly to the last point). Plain Heaps' law (c = 0)
keeps the local exponent d log D / d log N fixed, but on every corpus measured it falls as the
tokens grow (n-grams repeat more), so a straight line through the later points overpredicts
(+10 to +30 % at ten times the sample on real text, docs/inspect.md); the quadratic term follows
that fall and the weights favour the end, where the sample says most about what follows. Past
the quadratic's peak D stays flat. The range is the spread of three fits (this one, unweighted,
and plain Heaps' law on the later half, which overpredicts), widened by the growth points' own
relative error: a spread of models, not a confidence interval. Inside the sample the points are
interpolated (the end point is exact), and every prediction is capped at the tokens (each window
new) and at the windows the compressed vocab allows.

Head sizes for a target (`size_for_target`): with D distinct n-grams hashed uniformly into m
rows, an n-gram shares its bucket with probability 1 - (1 - 1/m)**(D - 1) (`expected_rate`), and
the occurrence-weighted expectation is the same, since where an n-gram lands does not depend on
how often it occurs. The smallest m meeting the target is solved in closed form and checked
exactly; an order's heads then get the primes the spec's prime walk gives from there (the sized
spec is the input spec with `engram_vocab_size` set to those starts, so `spec` stays the one
source of the sizes). With the all-heads target the rate is the product of the heads' rates
(independent multipliers) and the start is found by bisection on that product over the walked
primes.

A budget (`size_for_budget`): the starts that minimize the sum over orders of the expected rate
for the rows the budget pays for: the rows go out in BUDGET_STEPS equal shares, each to the
order whose rate it lowers most (the rate is convex in m past D / 2, where greedy shares are
optimal to a share; below it, where a tight budget leaves every rate near 1, greedy still spends
the whole budget), then shrunk until the walked primes fit.
"""

from __future__ import annotations

import math
import re
import textwrap
import tomllib
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, get_args

import numpy as np

from .collisions.growth import GrowthPoint, GrowthRecorder
from .collisions.reports import expected_rate
from .dtypes import DTYPE_BYTES
from .errors import EngramError, UsageError
from .output import FILE, Output, write_file
from .primes import next_prime
from .spec import MAX_HEAD_SIZE, TableSpec, spec_from_dict

Target = Literal["weighted", "all-heads"]
TARGETS: tuple[Target, ...] = get_args(Target)

# Equal shares of a table budget handed to the orders one at a time.
BUDGET_STEPS = 2000

# Bytes per value the report lists besides the spec's own dtype.
REPORT_DTYPES = {"bfloat16": 2, "float8": 1}


@dataclass(frozen=True)
class Prediction:
    """Distinct n-grams of one order predicted at `tokens` tokens, and the range of the fits.

    `exponent` is the local Heaps exponent d log D / d log N at the sample's end, `curvature` the
    quadratic term of the fit (how fast that exponent falls per log N squared).
    """

    tokens: int
    distinct: int
    low: int
    high: int
    exponent: float
    curvature: float


def _fit(x: np.ndarray, y: np.ndarray, degree: int, weights: np.ndarray | None = None) -> np.ndarray:
    """Least-squares polynomial of log D in log N (coefficients highest first); a concave
    quadratic only (else the straight line: Heaps' law)."""
    if x.size < degree + 1 or np.ptp(x) == 0:
        return np.array([0.0] * (degree - 1) + [1.0, float(y[-1] - x[-1])])
    c = np.polyfit(x, y, degree, w=weights)
    if degree == 2 and c[0] > 0:
        return np.concatenate([[0.0], np.polyfit(x, y, 1, w=weights)])
    return c


def _at(c: np.ndarray, x: float, last: float) -> float:
    """log D at log N = x: past the peak of a concave quadratic (where no n-gram would be new) D stays there."""
    if c.size == 3 and c[0] < 0:
        peak = -c[1] / (2 * c[0])
        x = min(x, max(peak, last))
    return float(np.polyval(c, x))


def predict(growth: Sequence[GrowthPoint], tokens: int, ceiling: int | None = None) -> Prediction:
    """The distinct n-grams of one order at `tokens` tokens, from its growth points.

    Args:
        growth: (tokens, distinct) points in increasing tokens, as inspect records them.
        tokens: the training run's tokens.
        ceiling: the most distinct n-grams there can be (the compressed vocab to the order).
    """
    if tokens < 1:
        raise UsageError(f"the tokens to predict for must be positive, got {tokens}")
    points = [p for p in growth if p.tokens > 0 and p.distinct > 0]
    if not points:
        raise EngramError("no growth points to extrapolate from (an empty corpus?)")
    x = np.log([p.tokens for p in points])
    y = np.log([p.distinct for p in points])
    cap = float(tokens if ceiling is None else min(tokens, ceiling))
    at = math.log(tokens)
    if tokens <= points[-1].tokens:  # inside the sample: between its points (the end point is exact)
        d = min(cap, math.exp(float(np.interp(at, x, y))))
        if tokens == points[-1].tokens:
            return Prediction(tokens, points[-1].distinct, points[-1].distinct, points[-1].distinct, 0.0, 0.0)
        error = GrowthRecorder.relative_error()
        return Prediction(tokens, round(d), math.floor(d * (1 - error)), math.ceil(d * (1 + error)), 0.0, 0.0)

    def guess(c: np.ndarray) -> float:
        return min(cap, math.exp(_at(c, at, float(x[-1]))))

    later = x >= x[0] + 0.25 * (x[-1] - x[0])
    weights = np.linspace(0.2, 1.0, int(later.sum()))
    central = _fit(x[later], y[later], 2, weights)
    half = x >= (x[0] + x[-1]) / 2
    guesses = [guess(central), guess(_fit(x[later], y[later], 2)), guess(_fit(x[half], y[half], 1))]
    error = GrowthRecorder.relative_error()
    distinct = guesses[0]
    low = min(guesses) * (1 - error)
    high = min(cap, max(guesses) * (1 + error))
    slope = float(np.polyval(np.polyder(central), x[-1])) if central.size > 1 else 1.0
    return Prediction(
        tokens,
        round(distinct),
        math.floor(min(low, distinct)),
        math.ceil(max(high, distinct)),
        slope,
        float(central[0]),
    )


def rows_for_rate(distinct: int, rate: float) -> int:
    """The smallest number of rows whose expected collision rate at `distinct` n-grams is at most `rate`."""
    if distinct <= 1:
        return 2
    guess = max(2, math.ceil(-1.0 / math.expm1(math.log1p(-rate) / (distinct - 1))))
    while guess > 2 and expected_rate(guess - 1, distinct) <= rate:
        guess -= 1
    while expected_rate(guess, distinct) > rate:
        guess += 1
    return guess


def walked_heads(start: int, heads: int) -> list[int]:
    """The primes an order's heads get from a minimum of `start` rows (the spec's walk, one order)."""
    sizes = []
    prime = start - 1
    for _ in range(heads):
        prime = next_prime(prime)
        sizes.append(prime)
    return sizes


def all_heads_rate(sizes: Sequence[int], distinct: int) -> float:
    """Expected share of n-grams crowded in every head (independent heads)."""
    return float(np.prod([expected_rate(m, distinct) for m in sizes]))


def start_for_target(distinct: int, rate: float, heads: int, target: Target) -> int:
    """The smallest minimum head size (`engram_vocab_size` of an order) that meets the target."""
    if target == "weighted":
        return rows_for_rate(distinct, rate)
    high = rows_for_rate(distinct, rate ** (1 / heads))  # every head of this size already meets it
    low = 2
    while low < high:  # the walked primes grow with the start, and the product falls
        mid = (low + high) // 2
        if all_heads_rate(walked_heads(mid, heads), distinct) <= rate:
            high = mid
        else:
            low = mid + 1
    return high


@dataclass
class OrderSizing:
    """The sizing of one order: predicted distinct n-grams, head rows and their expected rates."""

    order: int
    prediction: Prediction
    head_rows: list[int]
    weighted_rate: float
    all_heads_rate: float

    def to_json(self) -> dict[str, Any]:
        """One entry of `sizing.orders` in `engram inspect --json`."""
        p = self.prediction
        return {
            "predicted_distinct": p.distinct,
            "predicted_range": [p.low, p.high],
            "fit": {"exponent": p.exponent, "curvature": p.curvature},
            "head_rows": self.head_rows,
            "predicted_weighted_rate": self.weighted_rate,
            "predicted_all_heads_rate": self.all_heads_rate,
        }


def table_sizes(spec: TableSpec) -> dict[str, Any]:
    """Rows, parameters and bytes (the spec's dtype, bf16, fp8) of every layer and in total."""

    def sized(rows: int) -> dict[str, Any]:
        parameters = rows * spec.dim
        by_dtype = {spec.dtype: DTYPE_BYTES[spec.dtype], **REPORT_DTYPES}
        return {
            "rows": rows,
            "parameters": parameters,
            "bytes": {name: parameters * width for name, width in by_dtype.items()},
        }

    return {
        "layers": {str(layer): sized(spec.rows(layer)) for layer in spec.layer_ids},
        **sized(spec.total_rows),
    }


@dataclass
class Sizing:
    """The answer of `--train-tokens` (with `--target-rate` or `--max-table-bytes`)."""

    train_tokens: int
    orders: dict[int, OrderSizing]
    spec: TableSpec
    original: TableSpec
    target_rate: float | None = None
    target: Target = "weighted"
    max_table_bytes: int | None = None
    written: str | None = None
    plot: str | None = None
    law: str = "loglog-quadratic"
    notes: list[str] = field(default_factory=list)

    @property
    def sized(self) -> bool:
        """Whether head sizes were chosen (a target or a budget), not only distinct counts predicted."""
        return self.target_rate is not None or self.max_table_bytes is not None

    def to_json(self) -> dict[str, Any]:
        """`sizing` in `engram inspect --json`."""
        return {
            "train_tokens": self.train_tokens,
            "law": self.law,
            "target_rate": self.target_rate,
            "target": self.target,
            "max_table_bytes": self.max_table_bytes,
            "orders": {str(n): s.to_json() for n, s in self.orders.items()},
            "engram_vocab_size": list(self.spec.engram_vocab_size) if self.sized else None,
            "tables": table_sizes(self.spec) if self.sized else None,
            "spec_tables": table_sizes(self.original),
            "written": self.written,
            "plot": self.plot,
        }


def _order_sizings(
    spec: TableSpec, predictions: dict[int, Prediction], starts: dict[int, int] | None
) -> tuple[TableSpec, dict[int, OrderSizing]]:
    sized = spec
    if starts is not None:
        sized = spec.replace(engram_vocab_size=tuple(starts[n] for n in spec.orders), name=f"{spec.name}-sized")
    first = sized.head_sizes(sized.layer_ids[0])
    h = sized.n_head_per_ngram
    out = {}
    for n in spec.orders:
        heads = first[(n - 2) * h : (n - 1) * h]
        d = predictions[n].distinct
        out[n] = OrderSizing(
            n, predictions[n], heads, float(np.mean([expected_rate(m, d) for m in heads])), all_heads_rate(heads, d)
        )
    return sized, out


def _ceiling(compressed_size: int, order: int) -> int:
    return compressed_size**order


def size_for_target(
    spec: TableSpec,
    growth: dict[int, list[GrowthPoint]],
    train_tokens: int,
    compressed_size: int,
    target_rate: float | None = None,
    target: Target = "weighted",
) -> Sizing:
    """Predicted distinct n-grams at `train_tokens`, and (with `target_rate`) the head sizes that meet it.

    Args:
        spec: the spec measured; its other fields stay as they are.
        growth: the growth points of every order (`InspectReport.growth`).
        train_tokens: the training run's tokens.
        compressed_size: the projection's canonical ids (bounds the distinct n-grams).
        target_rate: the most expected share of n-grams (or occurrences) sharing a bucket, in (0, 1).
        target: "weighted" (every head) or "all-heads" (crowded in every head of the order).
    """
    if target_rate is not None and not 0 < target_rate < 1:
        raise UsageError(f"the target rate must be between 0 and 1 (exclusive), got {target_rate:g}")
    if target not in TARGETS:
        raise UsageError(f"the target must be one of {', '.join(TARGETS)}, got {target!r}")
    predictions = {n: predict(growth[n], train_tokens, _ceiling(compressed_size, n)) for n in spec.orders}
    starts = None
    if target_rate is not None:
        starts = {
            n: start_for_target(predictions[n].distinct, target_rate, spec.n_head_per_ngram, target)
            for n in spec.orders
        }
        if max(starts.values()) > MAX_HEAD_SIZE:
            raise UsageError(f"meeting a rate of {target_rate:g} takes more than 2**48 rows per head")
    sized, orders = _order_sizings(spec, predictions, starts)
    return Sizing(train_tokens, orders, sized, spec, target_rate=target_rate, target=target)


def _table_bytes(spec: TableSpec) -> int:
    return spec.parameters * DTYPE_BYTES[spec.dtype]


def _rate(rows: float, distinct: int) -> float:
    """`expected_rate` of a real number of rows (the budget's search runs between primes)."""
    return float(-math.expm1((distinct - 1) * math.log1p(-1.0 / rows))) if distinct > 1 else 0.0


def _split_budget(distinct: dict[int, int], rows: int, steps: int = BUDGET_STEPS) -> dict[int, int]:
    """Minimum head sizes per order, summing to at most `rows`, that minimize the summed expected
    rate: the rows in `steps` equal shares, each to the order whose rate it lowers most (greedy)."""
    share = max(1.0, rows / steps)
    sizes = {n: 2.0 for n in distinct}
    left = float(rows - 2 * len(sizes))
    while left >= share:
        gain = {n: _rate(m, distinct[n]) - _rate(m + share, distinct[n]) for n, m in sizes.items()}
        best = max(gain, key=lambda n: gain[n])
        sizes[best] += share
        left -= share
    return {n: max(2, min(MAX_HEAD_SIZE, math.floor(m))) for n, m in sizes.items()}


def size_for_budget(
    spec: TableSpec,
    growth: dict[int, list[GrowthPoint]],
    train_tokens: int,
    compressed_size: int,
    max_table_bytes: int,
) -> Sizing:
    """The head sizes whose tables fit `max_table_bytes` (at the spec's dtype) with the least
    predicted weighted rate summed over orders.

    Args:
        spec, growth, train_tokens, compressed_size: as for `size_for_target`.
        max_table_bytes: the bytes all layers' tables may take.
    """
    predictions = {n: predict(growth[n], train_tokens, _ceiling(compressed_size, n)) for n in spec.orders}
    smallest = spec.replace(engram_vocab_size=tuple(2 for _ in spec.orders))
    if _table_bytes(smallest) > max_table_bytes:
        raise UsageError(
            f"a budget of {max_table_bytes:,} bytes is below the smallest tables of spec {spec.name} "
            f"({_table_bytes(smallest):,} bytes)"
        )

    per_start = len(spec.layer_ids) * spec.n_head_per_ngram * spec.dim * DTYPE_BYTES[spec.dtype]
    rows = max_table_bytes // per_start
    while True:  # the walked primes lie above the starts: shrink until the tables fit
        split = _split_budget({n: predictions[n].distinct for n in spec.orders}, rows)
        candidate = spec.replace(engram_vocab_size=tuple(split[n] for n in spec.orders))
        if _table_bytes(candidate) <= max_table_bytes or rows <= 2 * len(split):
            break
        rows = int(rows * 0.995)
    sized, orders = _order_sizings(spec, predictions, split)
    return Sizing(train_tokens, orders, sized, spec, max_table_bytes=max_table_bytes)


_VOCAB_LINE = re.compile(r"^(\s*engram_vocab_size\s*=\s*)\[[^\]]*\]", re.MULTILINE)


def spec_text(spec: TableSpec, source_text: str | None, comment: str) -> str:
    """The TOML of `spec`: `source_text` (the input spec's file) with its `engram_vocab_size`
    replaced, every other line kept, or, without a source, the spec's fields written out; a
    `comment` on top. Checked to read back as `spec`."""
    sizes = "[" + ", ".join(str(v) for v in spec.engram_vocab_size) + "]"
    head = "".join(f"# {line}\n" for line in comment.splitlines())
    text = None
    if source_text is not None and len(_VOCAB_LINE.findall(source_text)) == 1:
        text = head + _VOCAB_LINE.sub(lambda m: m.group(1) + sizes, source_text)
    if text is None or not _same(text, spec):
        text = head + _toml(spec.to_dict())
    if not _same(text, spec):
        raise EngramError("the sized spec does not read back as itself; this is a bug")
    return text


def _same(text: str, spec: TableSpec) -> bool:
    try:
        back = spec_from_dict(tomllib.loads(text), name=spec.name)
    except (tomllib.TOMLDecodeError, EngramError):
        return False
    return back.replace(tokenizer=spec.tokenizer, name=spec.name) == spec


def _value(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, str):
        return '"' + v.replace("\\", "\\\\").replace('"', '\\"') + '"'
    if isinstance(v, list):
        return "[" + ", ".join(_value(x) for x in v) + "]"
    if isinstance(v, dict):
        return "{ " + ", ".join(f"{k} = {_value(x)}" for k, x in v.items()) + " }"
    return repr(v)


def _toml(data: dict[str, Any]) -> str:
    lines = [f"{k} = {_value(v)}" for k, v in data.items() if not isinstance(v, dict)]
    for table, values in data.items():
        if isinstance(values, dict):
            lines += ["", f"[{table}]", *(f"{k} = {_value(v)}" for k, v in values.items())]
    return "\n".join(lines) + "\n"


def write_spec(sizing: Sizing, path: Path, source_text: str | None, comment: str, overwrite: bool = False) -> None:
    """Write the sized spec to `path` (atomically; an existing file only with `overwrite`).

    Args:
        sizing: a sizing with head sizes chosen.
        path: the TOML file to write.
        source_text: the input spec's TOML, kept but for `engram_vocab_size` (None: written anew).
        comment: what the sizes came from (corpus, tokens, target), on top of the file.
        overwrite: replace an existing file.
    """
    if not sizing.sized:
        raise UsageError("writing a spec needs a target rate or a table budget")
    write_file(path, spec_text(sizing.spec, source_text, comment).encode("utf-8"), FILE, overwrite=overwrite)
    sizing.written = str(path)


@dataclass(frozen=True)
class SizingRequest:
    """What `inspect` is asked to size: the training run's tokens, a target or a budget, a spec to write.

    Attributes:
        train_tokens: the tokens the tables will see in training.
        target_rate: the most expected collision rate (0 < R < 1), or None.
        target: what the rate counts: "weighted" (each head, occurrence-weighted) or "all-heads".
        max_table_bytes: a budget for all tables (at the spec's dtype) instead of a target.
        write_spec: write the sized spec here; `spec_source` is the input spec's TOML to keep.
        overwrite: replace an existing `write_spec` file.
    """

    train_tokens: int
    target_rate: float | None = None
    target: Target = "weighted"
    max_table_bytes: int | None = None
    write_spec: Path | None = None
    spec_source: str | None = None
    overwrite: bool = False

    def check(self) -> None:
        """Refuse bad values before any counting."""
        if self.train_tokens < 1:
            raise UsageError(f"the training tokens must be positive, got {self.train_tokens}")
        if self.target_rate is not None and not 0 < self.target_rate < 1:
            raise UsageError(f"the target rate must be between 0 and 1 (exclusive), got {self.target_rate:g}")
        if self.target not in TARGETS:
            raise UsageError(f"the target must be one of {', '.join(TARGETS)}, got {self.target!r}")
        if self.target_rate is not None and self.max_table_bytes is not None:
            raise UsageError("give a target rate or a table budget, not both")
        if self.max_table_bytes is not None and self.max_table_bytes < 1:
            raise UsageError(f"the table budget must be positive, got {self.max_table_bytes}")
        if self.write_spec is not None:
            if self.target_rate is None and self.max_table_bytes is None:
                raise UsageError("writing a spec needs a target rate or a table budget")
            Output(self.write_spec, FILE, overwrite=self.overwrite)  # refused before the corpus is read

    def size(
        self, spec: TableSpec, growth: dict[int, list[GrowthPoint]], compressed_size: int, corpus_note: str = ""
    ) -> Sizing:
        """The sizing of `spec` from its growth points, and the spec written where asked.

        Args:
            spec: the spec measured.
            growth: growth points per order.
            compressed_size: the projection's canonical ids.
            corpus_note: what was counted, for the written spec's comment.
        """
        if self.max_table_bytes is not None:
            sizing = size_for_budget(spec, growth, self.train_tokens, compressed_size, self.max_table_bytes)
            aim = f"a budget of {self.max_table_bytes:,} bytes"
        else:
            sizing = size_for_target(spec, growth, self.train_tokens, compressed_size, self.target_rate, self.target)
            aim = f"a {self.target} collision rate of at most {self.target_rate:g}" if self.target_rate else ""
        if self.write_spec is not None:
            comment = textwrap.fill(
                f"Written by `engram inspect`: spec {spec.name} with its head sizes (engram_vocab_size) for "
                f"{aim} at {self.train_tokens:,} training tokens, predicted from {corpus_note or 'a corpus'}.",
                width=98,
            )
            write_spec(sizing, self.write_spec, self.spec_source, comment, self.overwrite)
        return sizing
