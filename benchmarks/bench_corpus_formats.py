"""Reading is not the bottleneck: `engram inspect` on the same documents in each corpus format.

1. Pre-tokenized: the same ids as a 1-D `.npy` stream cut at `--doc-sep` (the baseline), as a
   Parquet list-of-ids column, and as a Megatron `.bin` + `.idx` pair; the whole statistics job
   (read, count, every statistic) and reading alone, tokens/s against the `.npy` baseline.
2. Text: the same documents as plain `.txt` files (the baseline), as a Parquet text column and
   as `.jsonl.zst`; the whole job (read, decompress, tokenize, count, every statistic).
3. Memory: a fresh process reads every batch of random ids in each pre-tokenized form, at each
   size of `--memory-tokens`; its peak RSS stays flat as the files grow: reading holds batches,
   not files.

The documents are the Python standard library's `.py` files (site-packages excluded), one per
file; the ids case repeats their token ids up to `--ids-tokens`. Every form must give the same
numbers, which the benchmark checks before timing.

Run: .venv/bin/python benchmarks/bench_corpus_formats.py [--text-mb 4] [--ids-tokens 12000000]
     [--memory-tokens 10000000,120000000] [--repeats 5] [--parts ids,text,memory]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import zstandard
from engram_cli.collisions.statistics import collision_statistics
from engram_cli.corpus.base import CorpusOptions
from engram_cli.corpus.reader import Corpus
from engram_cli.inspection import InspectReport
from engram_cli.spec import load_spec
from engram_cli.vocab import default_projection

from bench_inspect import SEP, first_megabytes, read_texts, stdlib_files
from common import interleaved, markdown_table

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
from corpus_forms import megatron_index, write_megatron

# Read every batch of one corpus in a fresh process; print its peak RSS (VmHWM, Linux) in KiB.
_READ_ALL = (
    "import sys; from engram_cli.corpus.base import CorpusOptions; from engram_cli.corpus.reader import Corpus; "
    "from engram_cli.vocab import VocabProjection; import numpy as np; "
    "ids = sys.argv[2] or None; corpus = Corpus([sys.argv[1]], VocabProjection(np.arange(1 << 17)), "
    "CorpusOptions(ids_field=ids, doc_sep=int(sys.argv[3]) if sys.argv[3] else None), context=2); "
    "n = sum(b.tokens for b in corpus.batches()); "
    "print(n, [l for l in open('/proc/self/status') if l.startswith('VmHWM')][0].split()[1])"
)


def memory_forms(root: Path, tokens: int) -> dict[str, tuple[Path, str, str, int]]:
    """Random documents of about 2,000 ids as .npy, Parquet and Megatron, written from numpy."""
    rng = np.random.default_rng(1)
    lengths = rng.integers(1, 4000, size=tokens // 2000 + 1)
    values = rng.integers(2, 1 << 17, size=int(lengths.sum()), dtype=np.int32)
    offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int32)
    stream = np.insert(values, offsets[1:], SEP)
    np.save(root / "big.npy", stream)
    column = pa.ListArray.from_arrays(pa.array(offsets), pa.array(values))
    pq.write_table(pa.table({"input_ids": column}), root / "big.parquet", row_group_size=4096)
    values.tofile(root / "big.bin")
    (root / "big.idx").write_bytes(megatron_index(lengths.tolist(), list(range(lengths.size + 1)), np.dtype("int32")))
    size = {name: (root / name).stat().st_size for name in ("big.npy", "big.parquet", "big.bin", "big.idx")}
    return {
        ".npy, --doc-sep": (root / "big.npy", "", str(SEP), size["big.npy"]),
        "Parquet list<int32> column": (root / "big.parquet", "input_ids", "", size["big.parquet"]),
        "Megatron .bin + .idx": (root / "big", "", "", size["big.bin"] + size["big.idx"]),
    }


def peak_rss(path: Path, ids_field: str, doc_sep: str) -> tuple[int, int]:
    proc = subprocess.run(
        [sys.executable, "-c", _READ_ALL, str(path), ids_field, doc_sep], capture_output=True, text=True, check=True
    )
    tokens, kib = proc.stdout.split()
    return int(tokens), int(kib) * 1024


def numbers(spec, projection, layers) -> dict:
    return InspectReport(source="", spec=spec, projection=projection, layers=layers).to_json()["layers"]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--text-mb", type=float, default=6.0, help="MB of stdlib source for the text case")
    parser.add_argument("--ids-tokens", type=int, default=12_000_000, help="token ids in the pre-tokenized case")
    parser.add_argument("--memory-tokens", default="10000000,120000000", help="random ids in the memory case")
    parser.add_argument("--parts", default="ids,text,memory", help="which of the three cases to run")
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    spec = load_spec("engram-demo-v1")
    projection = default_projection()
    subset = first_megabytes(stdlib_files(), args.text_mb)
    size = sum(f.stat().st_size for f in subset)
    texts = [t for t in read_texts(subset) if t]

    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        encodings = projection.tokenizer().encode_batch_fast(texts, add_special_tokens=False)
        base_docs = [e.ids for e in encodings if len(e)]
        docs, tokens = [], 0
        while tokens < args.ids_tokens:
            for doc in base_docs:
                docs.append(doc)
                tokens += len(doc)
                if tokens >= args.ids_tokens:
                    break
        np.save(root / "ids.npy", np.array([v for d in docs for v in [*d, SEP]], np.int32))
        pq.write_table(pa.table({"input_ids": pa.array(docs, pa.list_(pa.int32()))}), root / "ids.parquet")
        write_megatron(root / "ids", docs, dtype="int32", piece=1 << 30)
        id_forms = {
            ".npy, --doc-sep (baseline)": ([root / "ids.npy"], CorpusOptions(doc_sep=SEP)),
            "Parquet list<int32> column": ([root / "ids.parquet"], CorpusOptions(ids_field="input_ids")),
            "Megatron .bin + .idx": ([root / "ids"], CorpusOptions()),
        }

        (root / "txt").mkdir()
        for i, text in enumerate(texts):
            (root / "txt" / f"{i:05d}.txt").write_text(text, encoding="utf-8")
        pq.write_table(pa.table({"text": texts}), root / "text.parquet")
        lines = "".join(json.dumps({"text": t}) + "\n" for t in texts).encode()
        (root / "text.jsonl.zst").write_bytes(zstandard.ZstdCompressor(level=3).compress(lines))
        text_forms = {
            ".txt files (baseline)": ([root / "txt"], CorpusOptions()),
            "Parquet text column": ([root / "text.parquet"], CorpusOptions()),
            ".jsonl.zst": ([root / "text.jsonl.zst"], CorpusOptions()),
        }

        def job(paths, options):
            return lambda: collision_statistics(spec, projection, Corpus(paths, projection, options, context=2))[0]

        def read_only(paths, options):
            return lambda: sum(b.tokens for b in Corpus(paths, projection, options, context=2).batches())

        cases = [("pre-tokenized", id_forms, tokens), ("text", text_forms, None)]
        for title, forms, count in [c for c, part in zip(cases, ("ids", "text")) if part in args.parts]:
            reference = None
            for name, (paths, options) in forms.items():
                got = numbers(spec, projection, job(paths, options)())
                reference = reference or got
                assert got == reference, name
            if count is None:
                paths, options = next(iter(forms.values()))
                corpus = Corpus(paths, projection, options, context=2)
                count = sum(b.tokens for b in corpus.batches())
                detail = f"{len(texts):,} stdlib files, {size / 1e6:.1f} MB, {count:,} tokens"
            else:
                detail = f"{len(docs):,} documents, {count:,} tokens"
            medians = interleaved({name: job(*form) for name, form in forms.items()}, args.repeats)
            base = next(iter(medians.values()))
            rows = [[name, f"{t:.2f}", f"{count / t / 1e6:.2f}", f"{base / t:.2f}x"] for name, t in medians.items()]
            if title == "pre-tokenized":
                reads = interleaved({name: read_only(*form) for name, form in forms.items()}, args.repeats)
                read_base = next(iter(reads.values()))
                for row, t in zip(rows, reads.values()):
                    row += [f"{count / t / 1e6:.0f}", f"{read_base / t:.2f}x"]
            header = ["inspect " + title, "median s", "M tokens/s", "speed vs baseline"]
            if title == "pre-tokenized":
                header += ["reading alone, M tokens/s", "vs baseline"]
            print(f"\n{title.capitalize()}: {detail}, engram-demo-v1, identical numbers in every form\n")
            print(markdown_table(header, rows))

        if "memory" not in args.parts:
            return
        rows = []
        for tokens in (int(t) for t in args.memory_tokens.split(",")):
            for name, (path, ids_field, doc_sep, size) in memory_forms(root, tokens).items():
                count, peak = peak_rss(path, ids_field, doc_sep)
                rows.append([name, f"{size / 1e6:.0f} MB", f"{count:,}", f"{peak / 1e6:.0f} MB"])
        print("\nMemory: reading every batch of random ids, in a fresh process\n")
        print(markdown_table(["input", "on disk", "tokens read", "peak RSS"], rows))


if __name__ == "__main__":
    main()
