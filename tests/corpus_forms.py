"""The same documents in every corpus format, each written by the real library of its format.

Used by the corpus tests and by benchmarks/bench_corpus_formats.py. A form is the `--corpus`
inputs plus the options that read them; every form of the same documents must give the same
statistics.
"""

from __future__ import annotations

import bz2
import gzip
import json
import lzma
import struct
from pathlib import Path

import numpy as np

MEGATRON_CODES = {np.dtype("uint8"): 1, np.dtype("int8"): 2, np.dtype("int16"): 3, np.dtype("int32"): 4,
                  np.dtype("int64"): 5, np.dtype("uint16"): 8}  # fmt: skip


def megatron_index(
    lengths: list[int], doc_index: list[int], dtype: np.dtype, pointers: list[int] | None = None
) -> bytes:
    """An MMIDIDX index, laid out field by field as the format defines it."""
    lengths_a = np.asarray(lengths, dtype="<i4")
    if pointers is None:
        pointers = list((np.cumsum(lengths_a, dtype=np.int64) - lengths_a) * dtype.itemsize)
    header = b"MMIDIDX\x00\x00" + struct.pack("<Q", 1) + struct.pack("<B", MEGATRON_CODES[np.dtype(dtype)])
    header += struct.pack("<Q", len(lengths)) + struct.pack("<Q", len(doc_index))
    body = lengths_a.tobytes() + np.asarray(pointers, dtype="<i8").tobytes() + np.asarray(doc_index, "<i8").tobytes()
    return header + body


def write_megatron(prefix: Path, docs: list[list[int]], dtype: str = "int32", piece: int = 7) -> None:
    """PREFIX.bin + PREFIX.idx: each document as sequences of at most `piece` ids, an empty
    document after the first, as Megatron's builder lays them out (end_document per document)."""
    lengths: list[int] = []
    doc_index = [0]
    data = []
    for k, doc in enumerate(docs):
        for lo in range(0, len(doc), piece):
            lengths.append(len(doc[lo : lo + piece]))
            data += doc[lo : lo + piece]
        doc_index.append(len(lengths))
        if k == 0:
            doc_index.append(len(lengths))  # an empty document
    np.asarray(data, dtype=np.dtype(dtype).newbyteorder("<")).tofile(f"{prefix}.bin")
    Path(f"{prefix}.idx").write_bytes(megatron_index(lengths, doc_index, np.dtype(dtype)))


def jsonl_bytes(texts: list[str], field: str = "text") -> bytes:
    return "".join(json.dumps({"id": i, field: t}) + "\n" for i, t in enumerate(texts)).encode()


def text_forms(root: Path, texts: list[str]) -> dict[str, list[str]]:
    """Name -> `engram inspect` arguments of every text form of `texts` (one document each)."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    import zstandard

    root.mkdir(parents=True, exist_ok=True)
    folder = root / "txt"
    folder.mkdir(exist_ok=True)
    for i, text in enumerate(texts):
        (folder / f"doc{i:05d}.txt").write_text(text, encoding="utf-8")
    lines = jsonl_bytes(texts, "body")
    (root / "docs.jsonl").write_bytes(lines)
    (root / "docs.jsonl.gz").write_bytes(gzip.compress(lines))
    (root / "docs.jsonl.zst").write_bytes(zstandard.ZstdCompressor(level=3).compress(lines))
    (root / "docs.json.xz").write_bytes(lzma.compress(json.dumps([{"body": t} for t in texts], indent=1).encode()))
    (root / "lines.json.bz2").write_bytes(bz2.compress(lines))
    (root / "gzipped.jsonl").write_bytes(gzip.compress(lines))  # compressed, under a plain name
    pq.write_table(pa.table({"id": list(range(len(texts))), "text": texts}), root / "docs.parquet", row_group_size=7)
    return {
        "txt": [str(folder)],
        "jsonl": [str(root / "docs.jsonl"), "--text-field", "body"],
        "jsonl.gz": [str(root / "docs.jsonl.gz"), "--text-field", "body"],
        "jsonl.zst": [str(root / "docs.jsonl.zst"), "--text-field", "body"],
        "json-array.xz": [str(root / "docs.json.xz"), "--text-field", "body"],
        "json-lines.bz2": [str(root / "lines.json.bz2"), "--text-field", "body"],
        "gzip-magic": [str(root / "gzipped.jsonl"), "--text-field", "body"],
        "parquet": [str(root / "docs.parquet")],
        "file-url": [f"file://{root / 'docs.parquet'}"],
    }


def id_forms(root: Path, docs: list[list[int]], sep: int) -> dict[str, list[str]]:
    """Name -> `engram inspect` arguments of every pre-tokenized form of `docs`."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    root.mkdir(parents=True, exist_ok=True)
    stream = np.array([v for doc in docs for v in [*doc, sep]], np.int32)
    np.save(root / "stream.npy", stream)
    ids = pa.array(docs, pa.list_(pa.int32()))
    pq.write_table(pa.table({"input_ids": ids, "n": [len(d) for d in docs]}), root / "ids.parquet", row_group_size=5)
    write_megatron(root / "mega", docs)
    (root / "ids.jsonl").write_text("".join(json.dumps({"input_ids": d}) + "\n" for d in docs))
    return {
        "npy": [str(root / "stream.npy"), "--doc-sep", str(sep)],
        "parquet-ids": [str(root / "ids.parquet"), "--ids-field", "input_ids"],
        "megatron": [str(root / "mega")],
        "megatron-bin": [str(root / "mega.bin")],
        "jsonl-ids": [str(root / "ids.jsonl"), "--ids-field", "input_ids"],
    }


def dataset_forms(root: Path, texts: list[str], docs: list[list[int]]) -> dict[str, list[str]]:
    """`datasets.save_to_disk` folders: a Dataset (two Arrow shards) and a DatasetDict."""
    import datasets

    table = datasets.Dataset.from_dict({"text": texts, "input_ids": docs})
    table.save_to_disk(str(root / "hf-dataset"), num_shards=2)
    other = datasets.Dataset.from_dict({"text": ["another split"], "input_ids": [[5, 6]]})
    datasets.DatasetDict({"train": table, "test": other}).save_to_disk(str(root / "hf-dict"))
    return {
        "hf-dataset": [str(root / "hf-dataset")],
        "hf-dict": [str(root / "hf-dict"), "--split", "train"],
        "hf-dataset-ids": [str(root / "hf-dataset"), "--ids-field", "input_ids"],
    }


def hub_cache(home: Path, dataset_id: str, texts: list[str]) -> None:
    """A Hub dataset as `datasets` leaves it in the cache under HF_HOME after a download: the
    Parquet builder prepares it, then it sits under the owner___name folder a Hub load uses."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    from datasets.packaged_modules.parquet.parquet import Parquet

    owner, name = dataset_id.split("/")
    source = home / "download" / "train.parquet"
    source.parent.mkdir(parents=True)
    pq.write_table(pa.table({"text": texts}), source)
    cache = home / "datasets"
    builder = Parquet(
        cache_dir=str(cache),
        dataset_name=name,
        config_name="default",
        config_id="default",
        data_files={"train": str(source)},
        hash="0123abcd",
    )
    builder.download_and_prepare()
    (cache / name).rename(cache / f"{owner}___{name}")
