"""Corpora as pretraining teams keep them: every format, written by its own library from the same
documents, gives the same `engram inspect` numbers; broken files are one-line errors."""

from __future__ import annotations

import gzip
import importlib.util
import json
import re
import struct
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import fsspec
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import zstandard
from engram_cli.corpus import jsonl as jsonl_module
from engram_cli.corpus.base import CorpusOptions
from engram_cli.corpus.parts import split_corpus
from engram_cli.corpus.reader import Corpus
from engram_cli.errors import EngramError
from engram_cli.vocab import VocabProjection, default_projection
from hypothesis import given, settings
from hypothesis import strategies as st

from conftest import run_engram
from corpus_forms import dataset_forms, hub_cache, id_forms, megatron_index, text_forms, write_megatron

SEP = 1  # DeepSeek-V3's end of sentence: plain text never tokenizes to it
WORDS = (
    "the horse could tame only great Alexander Bucephalus return def main 42 中文 🙂 naïve".split()  # noqa: SIM905
)


def make_texts() -> list[str]:
    rng = np.random.default_rng(12)
    texts = [
        "Only Alexander the Great could tame the horse Bucephalus.",
        "def main():\n    return 42  # the answer",
        "Ünïcödé text, 中文, and emoji 🙂 all tokenize.",
        'quotes " and \\ backslashes, [brackets], {braces}',
    ]
    texts += [" ".join(rng.choice(WORDS, size=int(rng.integers(1, 40)))) for _ in range(40)]
    return texts


@pytest.fixture(scope="module")
def projection() -> VocabProjection:
    return default_projection()


@pytest.fixture(scope="module")
def texts() -> list[str]:
    return make_texts()


@pytest.fixture(scope="module")
def docs(projection, texts) -> list[list[int]]:
    ids = [e.ids for e in projection.tokenizer().encode_batch(texts, add_special_tokens=False)]
    assert all(SEP not in d for d in ids) and all(ids)
    return ids


def inspect_json(args: list[str], env: dict[str, str] | None = None) -> dict:
    proc = run_engram("inspect", "demo", "--corpus", *args, "--json", env=env)
    assert proc.returncode == 0, f"{args}: {proc.stderr}"
    return json.loads(proc.stdout)


def numbers(report: dict) -> dict:
    corpus = report["corpus"]
    return {"documents": corpus["documents"], "tokens": corpus["tokens"], "layers": report["layers"]}


# Forms read by the CLI in a subprocess; the others are read in process by the same `inspect`.
CLI_FORMS = ("txt", "jsonl.zst", "json-array.xz", "parquet", "npy", "parquet-ids", "megatron", "hf-dataset", "hub-id")


def in_process(args: list[str]) -> dict:
    """`engram inspect demo --corpus ARGS --json`, called as a library."""
    from engram_cli.inspection import inspect
    from engram_cli.spec import load_spec

    flags = {"--text-field": "text_field", "--ids-field": "ids_field", "--split": "split", "--doc-sep": "doc_sep"}
    paths, options, rest = [], {}, iter(args)
    for arg in rest:
        if arg in flags:
            value = next(rest)
            options[flags[arg]] = int(value) if arg == "--doc-sep" else value
        else:
            paths.append(arg)
    return inspect(load_spec("demo"), corpus=paths, options=CorpusOptions(**options)).to_json()


def test_every_form_of_the_same_documents_gives_the_same_statistics(tmp_path, texts, docs):
    forms = {
        **text_forms(tmp_path / "text", texts),
        **id_forms(tmp_path / "ids", docs, SEP),
        **dataset_forms(tmp_path / "hf", texts, docs),
    }
    hub_cache(tmp_path / "home", "someone/tiny-corpus", texts)
    forms["hub-id"] = ["someone/tiny-corpus", "--split", "train"]
    env = {"HF_HOME": str(tmp_path / "home"), "HF_HUB_OFFLINE": "1"}
    with ThreadPoolExecutor(2) as pool:
        cli = dict(zip(CLI_FORMS, pool.map(lambda name: inspect_json(forms[name], env), CLI_FORMS)))
    reports = {name: cli[name] if name in cli else in_process(args) for name, args in forms.items()}
    reference = numbers(reports["txt"])
    assert reference["documents"] == len(texts) and reference["tokens"] == sum(map(len, docs))
    expected_format = {
        "txt": "text", "jsonl": "jsonl", "jsonl.gz": "jsonl", "jsonl.zst": "jsonl", "json-array.xz": "json",
        "json-lines.bz2": "json", "gzip-magic": "jsonl", "parquet": "parquet", "file-url": "parquet",
        "npy": "npy", "parquet-ids": "parquet", "megatron": "megatron", "megatron-bin": "megatron",
        "jsonl-ids": "jsonl", "hf-dataset": "hf-dataset", "hf-dict": "hf-dataset", "hf-dataset-ids": "hf-dataset",
        "hub-id": "hf-dataset",
    }  # fmt: skip
    assert set(reports) == set(expected_format)
    for name, report in reports.items():
        assert numbers(report) == reference, name
        formats = report["corpus"]["formats"]
        assert list(formats) == [expected_format[name]], name
        counts = formats[expected_format[name]]
        assert (counts["documents"], counts["tokens"]) == (len(texts), reference["tokens"]), name
        assert counts["files"] == report["corpus"]["files"], name
    assert reports["hf-dataset"]["corpus"]["files"] == 2  # save_to_disk wrote two Arrow shards
    assert not reports["parquet-ids"]["corpus"]["tokenized"] and reports["parquet"]["corpus"]["tokenized"]


def test_a_mixed_folder_counts_documents_and_tokens_per_format(tmp_path, texts, docs):
    import datasets

    folder = tmp_path / "mixed"
    (folder / "nested").mkdir(parents=True)
    (folder / "a.txt").write_text(texts[0])
    (folder / "b.jsonl.zst").write_bytes(
        zstandard.ZstdCompressor().compress("".join(json.dumps({"text": t}) + "\n" for t in texts[1:4]).encode())
    )
    pq.write_table(pa.table({"text": texts[4:10]}), folder / "nested" / "c.parquet", row_group_size=2)
    write_megatron(folder / "nested" / "d", docs[10:15])
    np.save(folder / "e.npy", np.array([v for d in docs[15:17] for v in [*d, SEP]], np.int64))
    datasets.Dataset.from_dict({"text": texts[17:20]}).save_to_disk(str(folder / "nested" / "f"))
    report = inspect_json([str(folder), "--doc-sep", str(SEP)])
    corpus = report["corpus"]

    def count(lo: int, hi: int, files: int) -> dict:
        return {"files": files, "documents": hi - lo, "tokens": sum(map(len, docs[lo:hi]))}

    assert corpus["formats"] == {
        "text": count(0, 1, 1),
        "jsonl": count(1, 4, 1),
        "parquet": count(4, 10, 1),
        "megatron": count(10, 15, 1),
        "npy": count(15, 17, 1),
        "hf-dataset": count(17, 20, 1),
    }
    assert (corpus["files"], corpus["documents"], corpus["tokens"]) == (6, 20, sum(map(len, docs[:20])))
    proc = run_engram("inspect", "demo", "--corpus", str(folder / "a.txt"), "--corpus", str(folder / "nested" / "d"))
    assert proc.returncode == 0 and "megatron: 1 file, 5 documents" in " ".join(proc.stderr.split())


def _cut_footer(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[:-20])


def test_corrupt_and_truncated_files_are_one_line_errors(tmp_path, texts, docs):
    """The CLI, in a subprocess: exit 1, one `engram: error:` line naming the file, no traceback."""
    lines = "".join(json.dumps({"text": t}) + "\n" for t in texts).encode()
    cases: list[tuple[list[str], str, dict[str, str] | None]] = []
    pq.write_table(pa.table({"text": texts}), tmp_path / "cut.parquet")
    _cut_footer(tmp_path / "cut.parquet")
    cases.append(([str(tmp_path / "cut.parquet")], r"cut.parquet: not a readable Parquet file", None))
    frame = bytearray(zstandard.ZstdCompressor().compress(lines))
    frame[len(frame) // 2 : len(frame) // 2 + 8] = b"\xff" * 8
    (tmp_path / "bad.jsonl.zst").write_bytes(bytes(frame))
    cases.append(([str(tmp_path / "bad.jsonl.zst")], r"bad.jsonl.zst: corrupt or truncated zstd data", None))
    write_megatron(tmp_path / "over", docs[:6])
    idx = bytearray((tmp_path / "over.idx").read_bytes())
    count = struct.unpack_from("<Q", idx, 18)[0]
    struct.pack_into("<q", idx, 34 + 4 * count + 8 * 2, 10**9)  # the third sequence points past the .bin
    (tmp_path / "over.idx").write_bytes(bytes(idx))
    cases.append(([str(tmp_path / "over")], r"over.idx: sequence 1 .* does not end where the next one starts", None))
    write_megatron(tmp_path / "short", docs[:6])
    (tmp_path / "short.bin").write_bytes((tmp_path / "short.bin").read_bytes()[:-8])
    cases.append(([str(tmp_path / "short.bin")], r"short.idx: its sequences end at byte .* but short.bin holds", None))
    offline = {"HF_HOME": str(tmp_path / "empty-home"), "HF_HUB_OFFLINE": "1"}
    cases.append(
        (
            ["nobody/nothing-here"],
            r"nor a Hub dataset in the local Hugging Face cache .*; the Hub cannot be used: offline",
            offline,
        )
    )
    for url, package in (("s3://bucket/corpus/", "s3fs"), ("gs://bucket/corpus/", "gcsfs")):
        if importlib.util.find_spec(package) is None:
            cases.append(([url], rf"reading \w+:// URLs needs the {package} package: pip install {package}", None))

    def run(case):
        args, _, env = case
        return run_engram("inspect", "demo", "--corpus", *args, env=env)

    with ThreadPoolExecutor(2) as pool:
        results = list(pool.map(run, cases))
    for (args, pattern, _), proc in zip(cases, results):
        assert proc.returncode == 1, (args, proc.stderr)
        message = proc.stderr.strip()
        assert "Traceback" not in message and "\n" not in message, (args, message)
        assert message.startswith("engram: error: ") and re.search(pattern, message), (args, message)


def test_broken_and_wrong_inputs_are_one_line_errors(tmp_path, projection, texts, docs):
    """The same errors through the library: the message the CLI prints as its one line."""
    lines = "".join(json.dumps({"text": t}) + "\n" for t in texts).encode()
    small = VocabProjection(np.arange(10))
    cases: list[tuple[list, VocabProjection, CorpusOptions, str]] = []
    (tmp_path / "short.jsonl.zst").write_bytes(zstandard.ZstdCompressor().compress(lines)[:-9])
    cases.append(
        (
            [tmp_path / "short.jsonl.zst"],
            projection,
            CorpusOptions(),
            r"short.jsonl.zst: corrupt or truncated zstd data \(the input ends inside a zstd frame\)",
        )
    )
    (tmp_path / "short.jsonl.gz").write_bytes(gzip.compress(lines)[:-30])
    cases.append(
        ([tmp_path / "short.jsonl.gz"], projection, CorpusOptions(), r"short.jsonl.gz: corrupt or truncated gzip data")
    )
    (tmp_path / "plain.jsonl.gz").write_bytes(lines)
    cases.append(
        (
            [tmp_path / "plain.jsonl.gz"],
            projection,
            CorpusOptions(),
            r"the name says gzip, but the file is not compressed",
        )
    )
    write_megatron(tmp_path / "grown", docs[:3])
    (tmp_path / "grown.idx").write_bytes((tmp_path / "grown.idx").read_bytes() + b"\0" * 5)
    cases.append(([tmp_path / "grown"], projection, CorpusOptions(), r"grown.idx: .* bytes, but its header counts"))
    (tmp_path / "lone.idx").write_bytes(megatron_index([2], [0, 1], np.dtype("int32")))
    cases.append(
        (
            [tmp_path / "lone.idx"],
            projection,
            CorpusOptions(),
            r"lone.idx: a Megatron index without its data file lone.bin",
        )
    )
    np.zeros(4, "<f4").tofile(tmp_path / "float.bin")
    float_idx = bytearray(megatron_index([4], [0, 1], np.dtype("int32")))
    float_idx[17] = 7
    (tmp_path / "float.idx").write_bytes(bytes(float_idx))
    cases.append(
        ([tmp_path / "float"], projection, CorpusOptions(), r"float.idx: dtype code 7 \(float32\) is not token ids")
    )
    (tmp_path / "legacy.bin").write_bytes(b"")
    (tmp_path / "legacy.idx").write_bytes(b"TNTIDX\x00\x00" + b"\0" * 40)
    cases.append(
        ([tmp_path / "legacy"], projection, CorpusOptions(), r"legacy.idx: a legacy Megatron 'lazy'/'cached' index")
    )
    pq.write_table(
        pa.table({"input_ids": pa.array([[5, 6], [7, 200_000, 8]], pa.list_(pa.int64()))}), tmp_path / "v.parquet"
    )
    cases.append(
        (
            [tmp_path / "v.parquet"],
            projection,
            CorpusOptions(ids_field="input_ids"),
            r"v.parquet: token id 200000 at position \[1, 1\] is not below the projection's vocab size",
        )
    )
    write_megatron(tmp_path / "vocab", [[5, 6, 7], [8, 300_000]])
    cases.append(
        ([tmp_path / "vocab"], projection, CorpusOptions(), r"vocab.bin: token id 300000 at position 4 is not below")
    )
    pq.write_table(pa.table({"content": ["a"], "id": [1]}), tmp_path / "col.parquet")
    cases.append(
        (
            [tmp_path / "col.parquet"],
            projection,
            CorpusOptions(),
            r"col.parquet: no 'text' column \(has: content, id\); choose the column with --text-field",
        )
    )
    pq.write_table(pa.table({"text": [[1, 2]]}), tmp_path / "kind.parquet")
    cases.append(
        (
            [tmp_path / "kind.parquet"],
            projection,
            CorpusOptions(),
            r"column 'text' holds list<element: int64>, not text",
        )
    )
    (tmp_path / "ids.jsonl").write_text('{"ids": [1, 2]}\n{"ids": [3, 12]}\n')
    cases.append(
        ([tmp_path / "ids.jsonl"], small, CorpusOptions(ids_field="ids"), r"ids.jsonl:2: token id 12 at position 1")
    )
    (tmp_path / "floats.jsonl").write_text('{"ids": [1, 2.5]}\n')
    cases.append(
        (
            [tmp_path / "floats.jsonl"],
            small,
            CorpusOptions(ids_field="ids"),
            r"floats.jsonl:1: field 'ids' is not a list of integer token ids",
        )
    )
    pq.write_table(pa.table({"ids": pa.array([[1, None]], pa.list_(pa.int64()))}), tmp_path / "null.parquet")
    cases.append(
        (
            [tmp_path / "null.parquet"],
            small,
            CorpusOptions(ids_field="ids"),
            r"null.parquet: column 'ids' holds null token ids",
        )
    )
    (tmp_path / "trail.json").write_text('[{"text": "a"}] x')
    cases.append(
        ([tmp_path / "trail.json"], projection, CorpusOptions(), r"trail.json: text after the end of the JSON array")
    )
    (tmp_path / "open.json").write_text('[{"text": "a"}, ')
    cases.append(
        ([tmp_path / "open.json"], projection, CorpusOptions(), r"open.json: the JSON array ends before its closing")
    )
    (tmp_path / "broken.json").write_text('[{"text": "a"}, {"text": 1 2}]')
    cases.append(([tmp_path / "broken.json"], projection, CorpusOptions(), r"broken.json\[1\]: not valid JSON"))
    (tmp_path / "x.npy.gz").write_bytes(gzip.compress(b"x"))
    cases.append(([tmp_path / "x.npy.gz"], small, CorpusOptions(), r"compressed .npy files are not read"))
    import datasets

    datasets.DatasetDict(
        {"train": datasets.Dataset.from_dict({"text": ["a"]}), "test": datasets.Dataset.from_dict({"text": ["b"]})}
    ).save_to_disk(str(tmp_path / "dict"))
    cases.append(
        (
            [tmp_path / "dict"],
            projection,
            CorpusOptions(),
            r"dict holds the splits train, test: choose one with --split",
        )
    )
    cases.append(
        ([tmp_path / "dict"], projection, CorpusOptions(split="dev"), r"dict has no split 'dev' \(has: train, test\)")
    )
    for paths, proj, options, pattern in cases:
        with pytest.raises(EngramError, match=pattern) as caught:
            list(Corpus(paths, proj, options, context=2).batches())
        assert "\n" not in str(caught.value)


def stitched(corpora: list[Corpus]) -> list[list[int]]:
    """Documents read by one or more corpora in turn: a batch that continues a document joins it."""
    out: list[list[int]] = []
    for corpus in corpora:
        for batch in corpus.batches():
            ids, starts = batch.ids.tolist(), batch.starts.tolist()
            if not starts or starts[0] != 0:
                assert out and batch.context.tolist() == out[-1][max(0, len(out[-1]) - corpus.context) :]
                out[-1] += ids[: starts[0] if starts else len(ids)]
            out += [ids[a:b] for a, b in zip(starts, [*starts[1:], len(ids)])]
    return out


def test_memory_and_file_urls_read_through_fsspec(tmp_path, projection, texts, docs):
    fs = fsspec.filesystem("memory")
    root = "/engram-test-corpus"
    try:
        with fs.open(f"{root}/ids/stream.npy", "wb") as f:
            np.save(f, np.array([v for d in docs for v in [*d, SEP]], np.int32))
        local = tmp_path / "m"
        write_megatron(local, docs)
        fs.pipe(f"{root}/mega/m.bin", (local.with_suffix(".bin")).read_bytes())
        fs.pipe(f"{root}/mega/m.idx", (local.with_suffix(".idx")).read_bytes())
        with fs.open(f"{root}/ids/ids.parquet", "wb") as f:
            pq.write_table(pa.table({"input_ids": docs}), f, row_group_size=4)
        lines = "".join(json.dumps({"text": t}) + "\n" for t in texts).encode()
        fs.pipe(f"{root}/text/docs.jsonl.zst", zstandard.ZstdCompressor().compress(lines))
        fs.pipe(f"{root}/text/.hidden.txt", b"not read")
        cases = {
            "npy": ([f"memory://{root}/ids/stream.npy"], CorpusOptions(doc_sep=SEP)),
            "megatron": ([f"memory://{root}/mega/m"], CorpusOptions()),
            "megatron-folder": ([f"memory://{root}/mega"], CorpusOptions()),
            "parquet": ([f"memory://{root}/ids/ids.parquet"], CorpusOptions(ids_field="input_ids")),
            "jsonl.zst": ([f"memory://{root}/text"], CorpusOptions()),
            "file-url": ([f"file://{local}.bin"], CorpusOptions()),
        }
        for name, (paths, options) in cases.items():
            corpus = Corpus(paths, projection, options, context=2, id_batch_tokens=50, text_batch_chars=100)
            assert stitched([corpus]) == docs, name
            assert corpus.summary.files == 1 and corpus.summary.documents == len(docs), name
        with pytest.raises(EngramError, match="no such corpus file or folder: memory://"):
            Corpus([f"memory://{root}/missing.txt"], projection)
    finally:
        fs.rm(root, recursive=True)


def test_parts_for_a_cluster_cover_every_document_once(tmp_path, projection, texts, docs):
    write_megatron(tmp_path / "mega", docs, piece=5)
    pq.write_table(pa.table({"input_ids": docs}), tmp_path / "ids.parquet", row_group_size=3)
    pq.write_table(pa.table({"text": texts}), tmp_path / "texts.parquet", row_group_size=6)
    lines = "".join(json.dumps({"text": t}) + "\n" for t in texts).encode()
    (tmp_path / "docs.jsonl.gz").write_bytes(gzip.compress(lines))
    for paths, options in (
        ([tmp_path / "mega"], CorpusOptions()),
        ([tmp_path / "ids.parquet"], CorpusOptions(ids_field="input_ids")),
        ([tmp_path / "texts.parquet", tmp_path / "docs.jsonl.gz"], CorpusOptions()),
    ):
        whole = Corpus(paths, projection, options, context=2, id_batch_tokens=64)
        expected = stitched([whole])
        parts = split_corpus(Corpus(paths, projection, options, context=2), parts=5, min_ids=40)
        assert len(parts) > 2, paths
        readers = [Corpus(paths, projection, options, context=2, id_batch_tokens=64, part=p) for p in parts]
        assert stitched(readers) == expected, paths
        total = Corpus(paths, projection, options)
        for reader in readers:
            total.add_summary(reader.summary)
        assert total.summary.to_json() | {"inputs": None} == whole.summary.to_json() | {"inputs": None}


@settings(max_examples=40, deadline=None)
@given(
    docs=st.lists(st.lists(st.integers(0, 99), max_size=15), min_size=1, max_size=12),
    piece=st.integers(1, 6),
    chunk=st.integers(1, 9),
    cut=st.floats(0, 1),
    context=st.integers(1, 3),
    dtype=st.sampled_from(["uint16", "int32", "int64", "uint8"]),
)
def test_megatron_documents_in_any_chunking_and_span(tmp_path_factory, docs, piece, chunk, cut, context, dtype):
    """Documents from the index (empty ones skipped) whatever the chunk size and wherever a
    span starts: a span inside a document carries its left context."""
    from engram_cli.corpus.base import CorpusPart
    from engram_cli.corpus.sources import find_sources

    prefix = tmp_path_factory.mktemp("m") / "d"
    write_megatron(prefix, docs, dtype=dtype, piece=piece)
    projection = VocabProjection(np.arange(100))
    [source] = find_sources([prefix])
    tokens = sum(map(len, docs))
    middle = int(cut * tokens)
    corpora = [
        Corpus([prefix], projection, context=context, id_batch_tokens=chunk, part=CorpusPart((source,), span))
        for span in ((0, middle), (middle, tokens))
    ]
    assert stitched(corpora) == [d for d in docs if d]


@settings(max_examples=60, deadline=None)
@given(
    records=st.lists(st.fixed_dictionaries({"text": st.text(max_size=30), "n": st.integers(-5, 5)}), max_size=12),
    window=st.integers(1, 40),
    indent=st.sampled_from([None, 0, 2]),
)
def test_json_arrays_parse_element_by_element_like_json_loads(tmp_path_factory, records, window, indent):
    path = tmp_path_factory.mktemp("j") / "a.json"
    path.write_text(json.dumps(records, indent=indent, ensure_ascii=False), encoding="utf-8")
    previous = jsonl_module.ARRAY_CHARS
    jsonl_module.ARRAY_CHARS = window
    try:
        from engram_cli.corpus.jsonl import _JsonRecords
        from engram_cli.corpus.sources import find_sources

        [source] = find_sources([path])

        class Tally:
            def count(self, name, amount=1):
                pass

            def advance(self, nbytes):
                pass

        got = [record for _, record in _JsonRecords(source, CorpusOptions()).records(Tally())]
    finally:
        jsonl_module.ARRAY_CHARS = previous
    assert got == records


def test_compressed_files_in_folders_are_read_or_skipped_as_binary(tmp_path, projection):
    """In a folder, a compressed text is read through its decompressor and a compressed binary
    file (a gzipped .npy) is skipped as binary after decompression, not refused."""
    folder = tmp_path / "c"
    folder.mkdir()
    (folder / "notes.txt.xz").write_bytes(__import__("lzma").compress(b"the horse"))
    buffer = __import__("io").BytesIO()
    np.save(buffer, np.arange(5))
    (folder / "ids.npy.gz").write_bytes(gzip.compress(buffer.getvalue()))
    corpus = Corpus([folder], projection, context=2)
    docs = stitched([corpus])
    assert docs == [projection.tokenizer().encode("the horse", add_special_tokens=False).ids]
    assert (corpus.summary.files, corpus.summary.skipped_binary) == (1, 1)
    assert corpus.summary.formats == {"text": {"files": 1, "documents": 1, "tokens": len(docs[0])}}
