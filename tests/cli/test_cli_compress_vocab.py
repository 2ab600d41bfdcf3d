"""`engram compress-vocab` as a user runs it: outputs, JSON, and one-line errors that write nothing."""

from __future__ import annotations

import json

import numpy as np
from engram_cli.vocab import load_projection

from conftest import make_byte_level_tokenizer, run_engram


def test_json_report_and_file(tmp_path):
    tok = make_byte_level_tokenizer(["Apple", " apple", "Cat", "cat", b"\xc3"], special=["<s>"])
    tok.save(str(tmp_path / "tokenizer.json"))
    out = tmp_path / "p.safetensors"
    proc = run_engram("compress-vocab", str(tmp_path), "-o", str(out), "--json", "--top", "2")
    assert proc.returncode == 0, proc.stderr
    report = json.loads(proc.stdout)
    assert report["vocab_size"] == 6 and report["compressed_size"] == 4
    assert abs(report["reduction"] - (1 - 4 / 6)) < 1e-12
    assert report["output"] == str(out)
    assert [g["size"] for g in report["top_groups"]] == [2, 2]
    assert report["top_groups"][0]["key"] == "apple"
    assert np.array_equal(load_projection(out).lookup, [0, 0, 1, 1, 2, 3])
    assert "canonical ids" in proc.stderr


def errors_for(tmp_path, *args):
    proc = run_engram("compress-vocab", *args)
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode != 0
    assert len(lines) == 1 and lines[0].startswith("engram: error:"), proc.stderr
    return lines[0]


def test_bad_inputs_write_nothing(tmp_path):
    out = tmp_path / "out.safetensors"
    (tmp_path / "corrupt.json").write_text("{not json")
    (tmp_path / "other.json").write_text(json.dumps({"hello": "world"}))
    (tmp_path / "empty").mkdir()
    assert "no such tokenizer" in errors_for(tmp_path, str(tmp_path / "missing.json"), "-o", str(out))
    assert "not a valid tokenizer" in errors_for(tmp_path, str(tmp_path / "corrupt.json"), "-o", str(out))
    assert "not a valid tokenizer" in errors_for(tmp_path, str(tmp_path / "other.json"), "-o", str(out))
    assert "without a tokenizer.json" in errors_for(tmp_path, str(tmp_path / "empty"), "-o", str(out))
    assert not out.exists()
    assert "does not exist" in errors_for(tmp_path, "-o", str(tmp_path / "no" / "dir" / "p.st"))
    assert "cannot write" in errors_for(tmp_path, "-o", "/proc/engram-test.safetensors")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["corrupt.json", "empty", "other.json"]


def test_existing_output_needs_overwrite(tmp_path):
    tok = make_byte_level_tokenizer(["a", "A"])
    tok.save(str(tmp_path / "tokenizer.json"))
    out = tmp_path / "p.safetensors"
    out.write_bytes(b"keep me")
    assert "--overwrite" in errors_for(tmp_path, str(tmp_path / "tokenizer.json"), "-o", str(out))
    assert out.read_bytes() == b"keep me"
    proc = run_engram("compress-vocab", str(tmp_path / "tokenizer.json"), "-o", str(out), "--overwrite")
    assert proc.returncode == 0 and load_projection(out).compressed_size == 1


def test_offline_hub_repo_is_one_line(tmp_path):
    message = errors_for(tmp_path, "someone/some-model", "-o", str(tmp_path / "p.st"))
    assert "someone/some-model" in message


def test_usage_errors_are_one_line():
    for args in (["compress-vocab"], ["bogus"], ["plan", "demo", "--nope"]):
        proc = run_engram(*args)
        assert proc.returncode == 2
        assert len(proc.stderr.strip().splitlines()) == 1 and "Traceback" not in proc.stderr
