"""`engram hash TEXT`: building and showing the per-token report, against the per-token form.

    .venv/bin/python benchmarks/bench_hash_text.py [--rounds 3] [--sizes 4000,16000] [--cli 100000]

Text: the start of CPython's argparse.py (code and prose), demo spec, embedded DeepSeek-V3
projection. Baseline, measured in the same run and interleaved: the straightforward form of the
same report (one `decode` call per n-gram and per token, one numpy slice per head group) shown
as one rich Table row per token. Ours: `hash_text` (batched decodes, whole-array conversions)
and `render` (a plain aligned grid). Both include the `--json` text (json.dumps, indent 2); the
JSON is checked identical. `--cli N` also times ours alone on N characters, and the real command
on them and on one word (the start-up cost), interleaved, each in a fresh process.
"""

from __future__ import annotations

import argparse
import io
import json
import statistics
import subprocess
import sys
import sysconfig
import time
from pathlib import Path
from typing import Any

import numpy as np
from rich.console import Console
from rich.table import Table
from rich.text import Text

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from engram_cli.cli.render import render
from engram_cli.hash_jobs import hash_text
from engram_cli.hashing import NgramHasher
from engram_cli.spec import TableSpec, load_spec
from engram_cli.vocab import VocabProjection, default_projection

from common import markdown_table

ROOT = Path(__file__).resolve().parent.parent


def per_token_report(text: str, spec: TableSpec, projection: VocabProjection) -> dict[str, Any]:
    """The same JSON built token by token: a decode per n-gram, a slice per head group."""
    tokenizer = projection.tokenizer()
    ids = np.array(tokenizer.encode(text).ids, dtype=np.int64)
    hasher = NgramHasher(spec, projection)
    values = hasher.hash(ids, layers=list(spec.layer_ids))
    per_order = spec.n_head_per_ngram
    tokens = []
    for t, tid in enumerate(ids.tolist()):
        ngrams = []
        for n in spec.orders:
            first = t - n + 1
            real = ids[max(first, 0) : t + 1].tolist()
            heads = slice((n - 2) * per_order, (n - 1) * per_order)
            ngrams.append(
                {
                    "n": n,
                    "pads": max(0, -first),
                    "ids": [spec.pad_id] * max(0, -first) + real,
                    "text": tokenizer.decode(real, skip_special_tokens=False),
                    "buckets": {str(k): v[t, heads].tolist() for k, v in values.items()},
                }
            )
        tokens.append(
            {
                "position": t,
                "id": tid,
                "compressed_id": int(projection.lookup[tid]),
                "text": tokenizer.decode([tid], skip_special_tokens=False),
                "ngrams": ngrams,
            }
        )
    return {"layers": list(spec.layer_ids), "orders": list(spec.orders), "tokens": tokens}


def per_token_table(report: dict[str, Any], console: Console) -> None:
    """One rich Table per layer, one row per token."""
    for layer in report["layers"]:
        table = Table(title=f"layer {layer}")
        table.add_column("#", justify="right", overflow="fold")
        table.add_column("token", overflow="fold")
        for order in report["orders"]:
            table.add_column(f"{order}-gram", overflow="fold")
            table.add_column("buckets", overflow="fold")
        for token in report["tokens"]:
            cells: list[Any] = [str(token["position"]), Text(json.dumps(token["text"], ensure_ascii=False))]
            for ngram in token["ngrams"]:
                cell = Text("∅ " * ngram["pads"], style="dim")
                cell.append(json.dumps(ngram["text"], ensure_ascii=False))
                cells += [cell, " ".join(str(v) for v in ngram["buckets"][str(layer)])]
            table.add_row(*cells)
        console.print(table)


def baseline(text: str, spec: TableSpec, projection: VocabProjection) -> str:
    report = per_token_report(text, spec, projection)
    per_token_table(report, Console(file=io.StringIO(), width=200))
    return json.dumps(report["tokens"], indent=2)


def ours(text: str, spec: TableSpec, projection: VocabProjection) -> str:
    report = hash_text(text, spec, projection)
    render(report, Console(file=io.StringIO(), width=200))
    return json.dumps(report.to_json()["tokens"], indent=2)


def timed_ours(text: str, spec: TableSpec, projection: VocabProjection) -> float:
    start = time.perf_counter()
    ours(text, spec, projection)
    return time.perf_counter() - start


def cli_seconds(text: str) -> float:
    start = time.perf_counter()
    subprocess.run(
        [sys.executable, "-m", "engram_cli", "hash", text, "--json"],
        check=True,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        cwd=ROOT,
    )
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--sizes", default="4000,16000")
    parser.add_argument("--cli", type=int, default=100000)
    args = parser.parse_args()
    source = Path(sysconfig.get_paths()["stdlib"], "argparse.py").read_text()
    spec, projection = load_spec("demo"), default_projection()
    ours("warm up the kernel and the tokenizer", spec, projection)
    rows = []
    for size in (int(s) for s in args.sizes.split(",")):
        text = source[:size]
        tokens = len(projection.tokenizer().encode(text).ids)
        times: dict[str, list[float]] = {"baseline": [], "ours": []}
        ratios = []
        for _ in range(args.rounds):
            round_times = {}
            for name, fn in (("baseline", baseline), ("ours", ours)):
                start = time.perf_counter()
                out = fn(text, spec, projection)
                round_times[name] = time.perf_counter() - start
                times[name].append(round_times[name])
                if name == "baseline":
                    expected = out
                elif out != expected:
                    raise SystemExit(f"JSON differs at {size} characters")
            ratios.append(round_times["baseline"] / round_times["ours"])
        base, mine = statistics.median(times["baseline"]), statistics.median(times["ours"])
        rows.append(
            [
                f"{size:,} chars ({tokens:,} tokens)",
                f"{base:.2f}",
                f"{1e3 * base / tokens:.2f}",
                f"{mine:.3f}",
                f"{1e3 * mine / tokens:.3f}",
                f"**{statistics.median(ratios):.0f}x**",
                "True",
            ]
        )
    print(
        markdown_table(
            ["text", "per-token s", "ms/token", "ours s", "ms/token", "ratio", "JSON identical"],
            rows,
        )
    )
    if args.cli:
        text = source[: args.cli]
        tokens = len(projection.tokenizer().encode(text).ids)
        inside = statistics.median(timed_ours(text, spec, projection) for _ in range(args.rounds))
        word, full = [], []
        for _ in range(args.rounds):  # interleaved: machine noise hits both alike
            word.append(cli_seconds("word"))
            full.append(cli_seconds(text))
        extra = statistics.median(f - w for f, w in zip(full, word))
        print(
            f"\n{args.cli:,} characters ({tokens:,} tokens), medians of {args.rounds}: ours in process "
            f"{inside:.2f} s; `engram hash TEXT --json` in a fresh process {statistics.median(full):.2f} s, "
            f"with one word {statistics.median(word):.2f} s (start-up), so {extra:.2f} s for the text"
        )


if __name__ == "__main__":
    main()
