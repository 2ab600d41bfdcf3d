"""The vocab projection against the reference algorithm, step by step, and on DeepSeek-V3."""

from __future__ import annotations

import os
import socket
import subprocess
import sys

import numpy as np
import pytest
import torch
from engram_cli import EngramError
from engram_cli.vocab import VocabProjection, compress_vocab, key_of, load_projection
from hypothesis import given, settings
from hypothesis import strategies as st
from tokenizers import Regex, normalizers

from conftest import make_byte_level_tokenizer, shipped_tokenizer


def reference_lookup(tok) -> np.ndarray:
    """The straightforward loop over ids, written from the published facts."""
    norm = normalizers.Sequence(
        [
            normalizers.NFKC(),
            normalizers.NFD(),
            normalizers.StripAccents(),
            normalizers.Lowercase(),
            normalizers.Replace(Regex(r"[ \t\r\n]+"), " "),
            normalizers.Replace(Regex(r"^ $"), "\ue000"),
            normalizers.Strip(),
            normalizers.Replace("\ue000", " "),
        ]
    )
    seen: dict[str, int] = {}
    out = []
    for tid in range(tok.get_vocab_size(with_added_tokens=True)):
        text = tok.decode([tid], skip_special_tokens=False)
        if "\ufffd" in text:
            key = tok.id_to_token(tid)
        else:
            key = norm.normalize_str(text) or text
        out.append(seen.setdefault(key, len(seen)))
    return np.array(out)


PIECES = [
    "Apple",
    " apple",
    "APPLE",  # case and leading space merge
    "ﬁ",
    "fi",  # NFKC ligature
    "Ａ",
    "a",  # full-width form
    "é",
    "e",
    "É",  # accents
    "  \t\n",
    " ",
    "\n\n",  # whitespace runs and the lone-space token
    "\u0301",  # a lone combining accent: normalizes to ""
    b"\xc3",  # a partial UTF-8 byte: decodes to U+FFFD
    b"\xe4\xb8",  # another partial sequence
]


@pytest.fixture(scope="module")
def tiny():
    return make_byte_level_tokenizer(PIECES, special=["<|pad|>", "<|EOS|>"], added=["Hello World"])


def test_each_step_of_the_key(tiny):
    keys = [key_of(tiny, i) for i in range(tiny.get_vocab_size(with_added_tokens=True))]
    assert keys[:3] == ["apple"] * 3
    assert keys[3] == keys[4] == "fi"
    assert keys[5] == keys[6] == "a"
    assert keys[7] == keys[8] == keys[9] == "e"
    assert keys[10] == keys[11] == keys[12] == " "
    assert keys[13] == "\u0301"  # empty after normalization: text itself
    assert keys[14] == "Ã" and keys[15] == "ä¸"  # raw byte-level token strings
    assert keys[16:] == ["<|pad|>", "<|eos|>", "hello world"]


def test_projection_matches_reference_loop(tiny):
    projection = compress_vocab(tiny)
    assert np.array_equal(projection.lookup, reference_lookup(tiny))
    assert projection.lookup.tolist()[:13] == [0, 0, 0, 1, 1, 2, 2, 3, 3, 3, 4, 4, 4]
    assert projection.compressed_size == len(set(projection.lookup.tolist()))
    assert projection.metadata["raw_fallbacks"] == "2"


@pytest.mark.parametrize("name", ["qwen-3", "glm-4", "deepseek-coder-7b-base-v1.5"])
def test_other_real_tokenizers_match_reference_loop(name):
    from engram_cli.tokenizer import load_tokenizer

    tok = load_tokenizer(str(shipped_tokenizer(name))).tokenizer
    projection = compress_vocab(tok)
    assert np.array_equal(projection.lookup, reference_lookup(tok))
    assert 0 < projection.compressed_size < projection.vocab_size


@pytest.mark.slow
def test_deepseek_v3_published_numbers(deepseek_v3_path):
    projection = compress_vocab(deepseek_v3_path)
    assert projection.vocab_size == 128_815
    assert projection.compressed_size == 98_627
    assert round(1 - 98_627 / 128_815, 4) == 0.2344
    assert projection.lookup[2] == 2
    counts = np.bincount(projection.lookup)
    largest = np.argsort(-counts, kind="stable")[:2]
    tok = projection.tokenizer()
    first_member = [int(np.flatnonzero(projection.lookup == c)[0]) for c in largest]
    assert [key_of(tok, m) for m in first_member] == [" ", "a"]
    assert counts[largest].tolist() == [163, 54]


def test_save_load_round_trip(tiny, tmp_path):
    projection = compress_vocab(tiny)
    path = tmp_path / "p.safetensors"
    projection.save(path)
    loaded = load_projection(path)
    assert np.array_equal(loaded.lookup, projection.lookup)
    assert loaded.metadata["normalizer_version"] == projection.metadata["normalizer_version"]
    assert loaded.tokenizer().decode([0]) == "Apple"
    assert loaded.fingerprint() == projection.fingerprint()


def test_load_refuses_other_files(tmp_path):
    bad = tmp_path / "x.safetensors"
    bad.write_bytes(b"not a safetensors file at all")
    with pytest.raises(EngramError, match="not a projection"):
        load_projection(bad)
    with pytest.raises(EngramError, match="cannot read"):
        load_projection(tmp_path / "missing.safetensors")


@settings(max_examples=60, deadline=None)
@given(
    lookup=st.lists(st.integers(0, 50), min_size=1, max_size=40),
    shape=st.sampled_from([(6,), (2, 3), (3, 2, 1)]),
    data=st.data(),
    dtype=st.sampled_from([np.int32, np.int64, np.uint16, np.uint32, np.int16]),
)
def test_compress_numpy_and_torch_agree_with_elementwise_map(lookup, shape, data, dtype):
    projection = VocabProjection(np.array(lookup))
    v = len(lookup)
    low = 0 if np.dtype(dtype).kind == "u" else -3
    flat = data.draw(st.lists(st.integers(low, v - 1), min_size=int(np.prod(shape)), max_size=int(np.prod(shape))))
    ids = np.array(flat, dtype=dtype).reshape(shape)
    expected = np.array([lookup[i] if i >= 0 else i for i in flat], dtype=np.int64).reshape(shape)
    assert np.array_equal(projection.compress(ids), expected)
    if dtype != np.uint32:
        out = projection.compress(torch.from_numpy(ids))
        assert isinstance(out, torch.Tensor)
        assert torch.equal(out, torch.from_numpy(expected))


def test_compress_refuses_out_of_range_and_floats():
    projection = VocabProjection(np.arange(10) // 2)
    with pytest.raises(EngramError, match=r"token id 12 at position \[1, 0\]"):
        projection.compress(np.array([[1, 2], [12, 3]]))
    with pytest.raises(EngramError, match="integers"):
        projection.compress(np.array([1.0, 2.0]))
    with pytest.raises(EngramError, match="integers"):
        projection.compress(torch.tensor([1.0]))
    with pytest.raises(EngramError, match="position"):
        projection.compress(torch.tensor([0, 10]))


@settings(max_examples=400, deadline=None)
@given(st.text(alphabet=st.characters(max_codepoint=127), max_size=12))
def test_ascii_fast_path_equals_the_normalizer(text):
    from engram_cli.vocab import _ascii_key, build_normalizer

    assert _ascii_key(text) == (build_normalizer().normalize_str(text) or text)


def test_embedded_tokenizer_zip_is_reproducible(tiny):
    """Exports embed the zipped tokenizer: the same tokenizer must give the same bytes later."""
    import time as _time

    from engram_cli.tokenizer import unzip_bytes, zip_bytes

    data = tiny.to_str().encode()
    first = zip_bytes(data)
    _time.sleep(2.1)  # a zip entry stamped with the clock would now differ
    assert zip_bytes(data) == first and unzip_bytes(first) == data


def test_saved_file_has_ordinary_permissions(tiny, tmp_path):
    import os

    umask = os.umask(0o022)
    try:
        compress_vocab(tiny).save(tmp_path / "p.safetensors")
    finally:
        os.umask(umask)
    assert (tmp_path / "p.safetensors").stat().st_mode & 0o777 == 0o644


# ---- Hub repos: huggingface_hub's own settings decide ------------------------------------------


def _compress_hub(env: dict[str, str], tmp_path) -> str:
    full = {k: v for k, v in os.environ.items() if not k.upper().endswith("_PROXY")}
    full.update({"HF_HOME": str(tmp_path / "hf"), **env})
    proc = subprocess.run(
        [sys.executable, "-m", "engram_cli", "compress-vocab", "someorg/no-such-repo", "-o", str(tmp_path / "p.st")],
        capture_output=True,
        text=True,
        env=full,
        timeout=120,
    )
    assert proc.returncode == 1 and proc.stderr.count("\n") == 1, proc.stderr
    return proc.stderr


def test_hub_offline_follows_huggingface_hub_parsing_and_endpoint(tmp_path):
    closed = _free_port()
    endpoint = f"http://127.0.0.1:{closed}"
    # "0" means online: the endpoint is tried (and found closed), not skipped as offline.
    online = _compress_hub({"HF_HUB_OFFLINE": "0", "HF_ENDPOINT": endpoint}, tmp_path)
    assert f"{endpoint} cannot be reached" in online and "HF_HUB_OFFLINE" not in online
    offline = _compress_hub({"HF_HUB_OFFLINE": "1", "HF_ENDPOINT": endpoint}, tmp_path)
    assert "offline (HF_HUB_OFFLINE)" in offline


def test_hub_reachability_goes_through_the_configured_proxy(monkeypatch):
    from engram_cli.tokenizer import _reachable

    with socket.socket() as proxy:
        proxy.bind(("127.0.0.1", 0))
        proxy.listen()
        for var in ("https_proxy", "HTTPS_PROXY", "no_proxy", "NO_PROXY", "all_proxy", "ALL_PROXY"):
            monkeypatch.delenv(var, raising=False)
        closed = f"https://127.0.0.1:{_free_port()}"
        assert not _reachable(closed)
        monkeypatch.setenv("https_proxy", f"http://127.0.0.1:{proxy.getsockname()[1]}")
        monkeypatch.setenv("no_proxy", "")
        assert _reachable(closed)  # through the listening proxy
        monkeypatch.setenv("no_proxy", "127.0.0.1")
        assert not _reachable(closed)  # bypassed: straight to the closed port


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]
