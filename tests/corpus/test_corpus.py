"""Reading corpora: text files and folders, jsonl, .npy and .bin give the same documents and numbers."""

from __future__ import annotations

import codecs
import json

import numpy as np
import pytest
from engram_cli.collisions.statistics import collision_statistics
from engram_cli.corpus.base import CorpusOptions
from engram_cli.corpus.reader import Corpus
from engram_cli.corpus.sources import find_sources
from engram_cli.corpus.text import decode_utf8
from engram_cli.errors import EngramError
from engram_cli.inspection import InspectReport
from engram_cli.spec import load_spec
from engram_cli.vocab import VocabProjection, compress_vocab, default_projection
from hypothesis import given, settings
from hypothesis import strategies as st

from conftest import make_byte_level_tokenizer

TEXTS = [
    "Only Alexander the Great could tame the horse Bucephalus.",
    "def main():\n    return 42  # the answer",
    "Ünïcödé text, 中文, and emoji 🙂 all tokenize.",
    "the the the the the the the",
    "x",
]
SPEC = load_spec("demo")


@pytest.fixture(scope="module")
def projection() -> VocabProjection:
    return default_projection()


def documents(corpus: Corpus) -> list[list[int]]:
    """The documents of a corpus, rebuilt from its batches (a continued document joins its part)."""
    docs: list[list[int]] = []
    for batch in corpus.batches():
        ids = batch.ids.tolist()
        starts = batch.starts.tolist()
        if not starts or starts[0] != 0:
            assert docs, "a batch continues a document nobody started"
            expected = docs[-1][max(0, len(docs[-1]) - corpus.context) :]
            assert batch.context.tolist() == expected
            docs[-1] += ids[: starts[0] if starts else len(ids)]
        for a, b in zip(starts, starts[1:] + [len(ids)]):
            docs.append(ids[a:b])
    return docs


def layer_numbers(layers) -> dict:
    return InspectReport(source="", spec=SPEC, projection=VocabProjection(np.arange(2)), layers=layers).to_json()[
        "layers"
    ]


def tokenize(projection: VocabProjection, texts: list[str]) -> list[list[int]]:
    return [e.ids for e in projection.tokenizer().encode_batch(texts, add_special_tokens=False)]


def test_every_input_kind_gives_the_same_documents_and_statistics(tmp_path, projection):
    ids = tokenize(projection, TEXTS)
    sep = 1  # DeepSeek-V3's end of sentence, not produced by plain text
    assert all(sep not in doc for doc in ids)
    folder = tmp_path / "texts"
    (folder / "nested").mkdir(parents=True)
    for i, text in enumerate(TEXTS):
        (folder / ("nested" if i % 2 else ".") / f"doc{i}.txt").write_text(text, encoding="utf-8")
    (tmp_path / "docs.jsonl").write_text(
        "".join(json.dumps({"body": t, "id": i}) + "\n" for i, t in enumerate(TEXTS)), encoding="utf-8"
    )
    (tmp_path / "lines.txt").write_text("\r\n".join(t.replace("\n", " ") for t in TEXTS) + "\n\n", encoding="utf-8")
    stream = [v for doc in ids for v in [sep] + doc] + [sep, sep]
    np.save(tmp_path / "stream.npy", np.array(stream, np.int64))
    np.array(stream, np.uint32).tofile(tmp_path / "stream.bin")
    for i, part in enumerate((ids[:2], ids[2:3], ids[3:])):  # whole documents in each file
        np.array([v for doc in part for v in doc + [sep]], np.uint32).tofile(tmp_path / f"split{i}.bin")

    line_ids = tokenize(projection, [t.replace("\n", " ") for t in TEXTS])
    cases = {
        "folder": ([folder], CorpusOptions(), ids),
        "jsonl": ([tmp_path / "docs.jsonl"], CorpusOptions(text_field="body"), ids),
        "lines": ([tmp_path / "lines.txt"], CorpusOptions(doc_per="line"), line_ids),
        "npy": ([tmp_path / "stream.npy"], CorpusOptions(doc_sep=sep), ids),
        "bin": ([tmp_path / "stream.bin"], CorpusOptions(doc_sep=sep, bin_dtype="uint32"), ids),
        "split": ([tmp_path / f"split{i}.bin" for i in range(3)], CorpusOptions(doc_sep=sep, bin_dtype="uint32"), ids),
    }
    numbers = {}
    for name, (paths, options, want) in cases.items():
        for batch_tokens in (7, 1 << 20):
            corpus = Corpus(paths, projection, options, context=2, id_batch_tokens=batch_tokens, text_batch_chars=30)
            got = documents(corpus)
            key = sorted(map(tuple, got)) if name == "folder" else got
            assert key == (sorted(map(tuple, want)) if name == "folder" else want), name
            assert corpus.summary.documents == len(want) and corpus.summary.tokens == sum(map(len, want))
            corpus = Corpus(paths, projection, options, context=2, id_batch_tokens=batch_tokens, text_batch_chars=30)
            numbers[name, batch_tokens] = layer_numbers(collision_statistics(SPEC, projection, corpus)[0])
    reference = numbers["folder", 1 << 20]
    for (name, _), value in numbers.items():
        if name != "lines":
            assert value == reference, name
    assert numbers["lines", 7] == numbers["lines", 1 << 20]


@settings(max_examples=40, deadline=None)
@given(
    st.lists(st.lists(st.integers(2, 60), max_size=12), min_size=1, max_size=10), st.integers(1, 9), st.integers(1, 3)
)
def test_streams_split_at_separators_in_any_chunking(tmp_path_factory, docs, chunk, context):
    path = tmp_path_factory.mktemp("s") / "s.bin"
    sep = 1
    np.array([v for doc in docs for v in doc + [sep]], np.uint16).tofile(path)
    corpus = Corpus(
        [path], VocabProjection(np.arange(61)), CorpusOptions(doc_sep=sep), context=context, id_batch_tokens=chunk
    )
    assert documents(corpus) == [d for d in docs if d]
    plain = Corpus([path], VocabProjection(np.arange(61)), context=context, id_batch_tokens=chunk)
    assert documents(plain) == [[v for doc in docs for v in doc + [sep]]]


def test_rows_of_a_2d_npy_are_documents(tmp_path):
    rows = np.arange(60, dtype=np.uint16).reshape(6, 10) % 40  # 49 is free for the separator
    np.save(tmp_path / "rows.npy", rows)
    corpus = Corpus([tmp_path / "rows.npy"], VocabProjection(np.arange(50)), context=2, id_batch_tokens=25)
    assert documents(corpus) == rows.tolist()
    np.array([v for row in rows.tolist() for v in row + [49]], np.uint16).tofile(tmp_path / "rows.bin")
    spec = SPEC.replace(pad_id=3, compressed_vocab_size=None)  # with a toy projection
    stats = [
        collision_statistics(
            spec,
            VocabProjection(np.arange(50)),
            Corpus([tmp_path / name], VocabProjection(np.arange(50)), CorpusOptions(doc_sep=sep), context=2),
        )[0]
        for name, sep in (("rows.npy", None), ("rows.bin", 49))
    ]
    assert layer_numbers(stats[0]) == layer_numbers(stats[1])


def count_invalid(data: bytes) -> int:
    """Invalid UTF-8 sequences as Python's decoder finds them, counted by an error handler."""
    found = []

    def handler(error: UnicodeDecodeError):
        found.append(error.start)
        return "\ufffd", error.end

    codecs.register_error("engram-test-count", handler)
    data.decode("utf-8", errors="engram-test-count")
    return len(found)


@given(st.binary(max_size=200))
def test_invalid_utf8_is_replaced_and_counted(data):
    text, bad = decode_utf8(data)
    assert text == data.decode("utf-8", errors="replace") and bad == count_invalid(data)


def test_invalid_utf8_binary_files_hidden_files_and_glob(tmp_path, projection):
    folder = tmp_path / "c"
    (folder / ".git").mkdir(parents=True)
    (folder / ".git" / "config.txt").write_text("hidden, not read")
    (folder / "a.py").write_bytes(b"print('caf\xe9')\n# \xef\xbf\xbd is a real U+FFFD\n")
    (folder / "b.py").write_bytes(b"fine = 'ok'\n")
    (folder / "blob.pyc").write_bytes(b"\x00\x01binary")
    (folder / "notes.md").write_text("# notes\n")
    corpus = Corpus([folder], projection, context=2)
    docs = documents(corpus)
    summary = corpus.summary
    assert (summary.files, summary.skipped_binary, summary.invalid_utf8, summary.invalid_utf8_files) == (3, 1, 1, 1)
    assert len(docs) == 3 and summary.text_bytes == sum(
        (folder / n).stat().st_size for n in ("a.py", "b.py", "notes.md")
    )
    assert any("replaced 1 invalid UTF-8 sequences in 1 file" in w for w in summary.warnings())
    only_py = Corpus([folder], projection, CorpusOptions(glob="*.py"), context=2)
    assert len(documents(only_py)) == 2 and only_py.summary.skipped_binary == 0
    assert [s.path.name for s in find_sources([folder])] == ["a.py", "b.py", "blob.pyc", "notes.md"]
    explicit = Corpus([folder / "blob.pyc"], projection, context=2)
    assert len(documents(explicit)) == 1  # a file named on the command line is read as text


def test_max_tokens_cuts_the_corpus(tmp_path):
    np.arange(100, dtype=np.uint16).tofile(tmp_path / "a.bin")
    corpus = Corpus(
        [tmp_path / "a.bin"],
        VocabProjection(np.arange(100)),
        CorpusOptions(max_tokens=42),
        context=2,
        id_batch_tokens=10,
    )
    assert documents(corpus) == [list(range(42))]
    assert corpus.summary.truncated and corpus.summary.tokens == 42
    exact = Corpus([tmp_path / "a.bin"], VocabProjection(np.arange(100)), CorpusOptions(max_tokens=100), context=2)
    assert documents(exact) == [list(range(100))] and not exact.summary.truncated


def test_tokenizer_truncation_in_the_json_is_switched_off(tmp_path):
    tok = make_byte_level_tokenizer(list("abcdefgh "))
    tok.enable_truncation(3)
    projection = compress_vocab(tok)
    (tmp_path / "t.txt").write_text("abcdefgh abcdefgh")
    corpus = Corpus([tmp_path / "t.txt"], projection, context=2)
    assert corpus.summary.tokens == 0 and sum(map(len, documents(corpus))) == 17


def test_bad_inputs_are_one_line_errors(tmp_path, projection):
    small = VocabProjection(np.arange(10))
    cases = []
    np.save(tmp_path / "big.npy", np.array([1, 2, 3, 10, 4]))
    cases.append(([tmp_path / "big.npy"], small, CorpusOptions(), r"big.npy: token id 10 at position 3 is not below"))
    np.save(tmp_path / "neg.npy", np.array([[1, 2], [3, -4]], np.int16))
    cases.append(
        ([tmp_path / "neg.npy"], small, CorpusOptions(), r"neg.npy: token id -4 at position \[1, 1\] is negative")
    )
    np.array([5, 0, 0, 12, 5], np.uint16).tofile(tmp_path / "sep.bin")
    cases.append(([tmp_path / "sep.bin"], small, CorpusOptions(doc_sep=0), r"sep.bin: token id 12 at position 3 "))
    np.save(tmp_path / "float.npy", np.array([1.0, 2.0]))
    cases.append(([tmp_path / "float.npy"], small, CorpusOptions(), "must be integers, got dtype float64"))
    np.save(tmp_path / "cube.npy", np.zeros((2, 2, 2), np.int32))
    cases.append(([tmp_path / "cube.npy"], small, CorpusOptions(), r"shape \(T,\) or \(B, T\)"))
    (tmp_path / "odd.bin").write_bytes(b"\x00" * 7)
    cases.append(
        ([tmp_path / "odd.bin"], small, CorpusOptions(bin_dtype="uint32"), "7 bytes is not a whole number of uint32")
    )
    (tmp_path / "junk.npy").write_bytes(b"not numpy")
    cases.append(([tmp_path / "junk.npy"], small, CorpusOptions(), "not a readable .npy file"))
    (tmp_path / "bad.jsonl").write_text('{"text": "a"}\n{"text": \n')
    cases.append(([tmp_path / "bad.jsonl"], projection, CorpusOptions(), r"bad.jsonl:2: not valid JSON"))
    (tmp_path / "field.jsonl").write_text('{"text": "a"}\n\n{"content": "b", "id": 1}\n')
    cases.append(
        (
            [tmp_path / "field.jsonl"],
            projection,
            CorpusOptions(),
            r"field.jsonl:3: no 'text' field \(has: content, id\)",
        )
    )
    (tmp_path / "null.jsonl").write_text('{"text": null}\n')
    cases.append(([tmp_path / "null.jsonl"], projection, CorpusOptions(), "field 'text' is NoneType, not a string"))
    (tmp_path / "t.txt").write_text("hello")
    cases.append(([tmp_path / "t.txt"], small, CorpusOptions(), "carries no tokenizer"))
    cases.append(([tmp_path / "missing"], small, CorpusOptions(), "no such corpus file or folder"))
    for paths, proj, options, message in cases:
        with pytest.raises(EngramError, match=message):
            list(Corpus(paths, proj, options, context=2).batches())
    for bad in (dict(doc_per="page"), dict(bin_dtype="int8"), dict(doc_sep=-1), dict(max_tokens=0)):
        with pytest.raises(EngramError):
            CorpusOptions(**bad)
    with pytest.raises(EngramError, match="no corpus given"):
        Corpus([], small)


# ---- long documents: tokenized in pieces, the same ids, bounded memory -----------------------


def long_text(seed: int, chars: int) -> str:
    """Source code, CJK, emoji, runs of spaces and special-token text, shuffled in blocks."""
    import random
    import sysconfig
    from pathlib import Path

    stdlib = Path(sysconfig.get_paths()["stdlib"])
    blocks = [p.read_text(errors="replace")[:3000] for p in sorted(stdlib.glob("*.py"))[:40]]
    blocks += ["日本語のテキストと漢字", "emoji 😀😀👍🏽", "<｜begin▁of▁sentence｜>", "   \t  \n\n  ", "1234567890" * 5]
    rng = random.Random(seed)
    out, size = [], 0
    while size < chars:
        out.append(rng.choice(blocks))
        size += len(out[-1])
    return "".join(out)[:chars]


@pytest.mark.parametrize("piece_chars", [1500, 7000])
def test_a_long_document_tokenizes_in_pieces_to_the_ids_of_the_whole(projection, piece_chars):
    from engram_cli.corpus.long_documents import pieces

    tokenizer = projection.tokenizer()
    text = long_text(piece_chars, 120_000)
    parts = list(pieces(tokenizer, text, piece_chars))
    assert len(parts) > 10 and "".join(parts) == text
    whole = tokenizer.encode(text, add_special_tokens=False).ids
    assert [i for part in parts for i in tokenizer.encode(part, add_special_tokens=False).ids] == whole


def test_batches_that_end_inside_a_long_document_carry_its_context(tmp_path, projection):
    lines = [long_text(1, 30_000), "short one", long_text(2, 9_000), "", long_text(3, 400)]
    lines = [line.replace("\n", " ").replace("\r", " ") for line in lines]  # one document per line
    path = tmp_path / "docs.txt"
    path.write_text("\n".join(lines), encoding="utf-8")
    expected = [d for d in tokenize(projection, lines) if d]
    options = CorpusOptions(doc_per="line")
    for piece_chars, batch_chars in [(1000, 2500), (4000, 1000), (10**7, 10**7)]:
        corpus = Corpus([path], projection, options, context=3, text_batch_chars=batch_chars, piece_chars=piece_chars)
        assert documents(corpus) == expected
        assert corpus.summary.documents == len(expected)


@pytest.mark.slow
def test_a_20_mb_line_is_read_in_bounded_memory(tmp_path):
    """One 20 MB document used to peak at 2-3 GB inside the tokenizer; now it costs little more
    than a corpus of short documents of the same size."""
    import random
    import subprocess
    import sys

    rng = random.Random(0)
    words = [f"{w}{n}" for w in ("alpha", "beta", "gamma", "delta", "theta") for n in range(300)]
    one = tmp_path / "one.txt"
    one.write_text(" ".join(rng.choice(words) for _ in range(2_500_000)), encoding="utf-8")
    many = tmp_path / "many.txt"
    text = one.read_text(encoding="utf-8")
    many.write_text("\n".join(text[i : i + 2000] for i in range(0, len(text), 2000)), encoding="utf-8")
    peak = (
        "import resource, subprocess, sys; subprocess.run(sys.argv[1:], check=True, capture_output=True); "
        "print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)"
    )

    def peak_kib(path) -> int:
        command = [sys.executable, "-m", "engram_cli", "inspect", "demo", "--corpus", str(path), "--doc-per", "line"]
        return int(
            subprocess.run(
                [sys.executable, "-c", peak, *command], capture_output=True, text=True, check=True, timeout=900
            ).stdout
        )

    assert peak_kib(one) < peak_kib(many) + (600 << 10)
