"""Hostile input and faults through the real CLI: one line on stderr, a non-zero exit, and nothing
written or removed where it failed.

Every test runs `engram` in a subprocess and hashes every file of the destination and of the
folder around it before and after. Stores and checkpoints are made by the library itself, then
damaged or edited the way a user, a bad disk or a hostile file would.
"""

from __future__ import annotations

import hashlib
import json
import os
import resource
import shutil
import struct
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import zarr
from engram_cli.checkpoints.dcp_export import export_training
from engram_cli.checkpoints.safetensors_export import export_inference
from engram_cli.spec import TableSpec
from engram_cli.store.build import build_tables
from engram_cli.store.create import create_store
from engram_cli.vocab import VocabProjection, compress_vocab
from safetensors.numpy import save_file

from conftest import letters_tokenizer, run_engram


def spec_toml(spec: TableSpec, path: Path, **changes) -> Path:
    """A spec file for the CLI: `spec`'s fields, with `changes` to [engram] or table.init."""
    engram = spec.to_dict()["engram"] | {k: v for k, v in changes.items() if k != "init"}
    init = changes.get("init", '{ distribution = "normal", std = 1.0 }')
    lines = ["[engram]"] + [f"{k} = {json.dumps(v)}" for k, v in engram.items()]
    lines += ["[table]", 'dtype = "bfloat16"', f"init = {init}"]
    path.write_text("\n".join(lines) + "\n")
    return path


def snapshot(*folders: Path) -> dict[str, str]:
    """Every file and folder under `folders` (hidden ones too) -> its sha256 ("dir" for folders)."""
    found = {}
    for folder in folders:
        for root, dirs, files in os.walk(folder):
            for name in dirs:
                found[os.path.join(root, name)] = "dir"
            for name in files:
                path = os.path.join(root, name)
                found[path] = "link" if os.path.islink(path) else hashlib.sha256(Path(path).read_bytes()).hexdigest()
    return found


def refused(*args: str, match: str, code: int = 1, watch: Path, env: dict | None = None) -> str:
    """Run engram, which must fail with one `engram: error:` line matching `match` and leave
    every file under `watch` (the destination's folder) as it was; the error line is returned."""
    before = snapshot(watch)
    proc = run_engram(*args) if env is None else _run_limited(args, **env)
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == code, proc.stderr
    assert len(lines) == 1 and lines[0].startswith("engram: error: "), proc.stderr
    assert match in lines[0], lines[0]
    assert snapshot(watch) == before, "files were written or removed"
    return lines[0]


def _run_limited(args: tuple[str, ...], file_limit: int) -> subprocess.CompletedProcess:
    """engram with a file size limit: every write past `file_limit` bytes fails with EFBIG, as
    on a full disk (Python ignores SIGXFSZ, so the write returns the error)."""

    def limit() -> None:
        resource.setrlimit(resource.RLIMIT_FSIZE, (file_limit, file_limit))

    env = {**os.environ, "COLUMNS": "200"}
    return subprocess.run(
        [sys.executable, "-m", "engram_cli", *args], capture_output=True, text=True, env=env, preexec_fn=limit
    )


@pytest.fixture(scope="module")
def projection() -> VocabProjection:
    return compress_vocab(letters_tokenizer())


@pytest.fixture(scope="module")
def made(tmp_path_factory, projection, tiny_spec) -> dict[str, Path]:
    """A store, its exports in every format, a projection file and a spec file, made once."""
    root = tmp_path_factory.mktemp("made")
    build_tables(tiny_spec, root / "store", projection=projection)
    export_training(root / "store", root / "dcp")
    export_inference(root / "store", root / "tables.safetensors")
    export_inference(root / "store", root / "v41", layout="deepseek-v41")  # also compiles the fp8 kernels
    projection.save(root / "projection.safetensors")
    spec_toml(tiny_spec, root / "tiny.toml")
    return {name: root / name for name in ("store", "dcp", "tables.safetensors", "v41", "projection.safetensors")} | {
        "spec": root / "tiny.toml"
    }


def copy(source: Path, target: Path) -> Path:
    (shutil.copytree if source.is_dir() else shutil.copy)(source, target)
    return target


def edit_attrs(store: Path, change) -> None:
    meta = json.loads((store / "zarr.json").read_text())
    change(meta["attributes"]["engram"])
    (store / "zarr.json").write_text(json.dumps(meta))


# ---- data loss: --overwrite replaces only an engram table store ------------------------------------------


def _foreign_targets(work: Path, store: Path) -> list[tuple[Path, str]]:
    """Paths --overwrite must refuse, and what the error says about each."""
    mixed = work / "mixed"  # the user's files beside a zarr.json
    mixed.mkdir()
    (mixed / "zarr.json").write_text('{"zarr_format": 3, "node_type": "group", "attributes": {}}')
    (mixed / "thesis.tex").write_text("years of work")
    foreign = work / "foreign.zarr"  # somebody else's zarr dataset
    zarr.create_group(str(foreign), attributes={"project": "weather"}).create_array("t", shape=(4,), dtype="int8")
    cluttered = copy(store, work / "cluttered")  # an engram store that also holds a file of the user's
    (cluttered / "notes.txt").write_text("keep me")
    base = copy(store, work / "base")
    link = work / "link"
    link.symlink_to(base)
    return [
        (mixed, "not an engram table store"),
        (foreign, "not an engram table store"),
        (cluttered, "'notes.txt', which is not part of it"),
        (base / "layer_1", "inside the table store"),
        (base / "projection", "inside the table store"),
        (base / "new", "inside the table store"),
        (link, "symbolic link"),
    ]


def test_overwrite_never_replaces_what_is_not_a_store(made, tmp_path):
    for target, message in _foreign_targets(tmp_path, made["store"]):
        refused(
            "build-tables", str(made["spec"]), "-o", str(target), "--overwrite",
            "--projection", str(made["projection.safetensors"]), match=message, watch=tmp_path,
        )  # fmt: skip
        refused(
            "import", str(made["tables.safetensors"]), "-o", str(target), "--overwrite", match=message, watch=tmp_path
        )


def test_export_overwrite_never_replaces_a_foreign_folder(made, tmp_path):
    mixed = tmp_path / "mixed"
    mixed.mkdir()
    (mixed / ".metadata").write_bytes(b"looks like a checkpoint")
    (mixed / "model.safetensors").write_bytes(b"looks like an export")
    (mixed / "results.csv").write_text("a,b\n1,2\n")
    for target in ("training", "inference"):
        refused(
            "export", str(made["store"]), "--for", target, "-o", str(mixed), "--overwrite",
            match="'results.csv', which no export writes", watch=tmp_path,
        )  # fmt: skip
    copy(made["store"], tmp_path / "base")
    refused(
        "export", str(made["store"]), "--for", "training", "-o", str(tmp_path / "base" / "ckpt"),
        match="inside the table store", watch=tmp_path,
    )  # fmt: skip


def test_failed_import_leaves_the_destination_as_it_was(made, tmp_path):
    """A truncated .distcp, with and without --overwrite: the old store stays, nothing new appears."""
    ckpt = copy(made["dcp"], tmp_path / "src" / "ckpt")
    largest = max(ckpt.glob("*.distcp"), key=lambda p: p.stat().st_size)
    largest.write_bytes(largest.read_bytes()[: largest.stat().st_size // 2])
    work = tmp_path / "work"
    old = copy(made["store"], work / "old")
    for dest, extra in ((old, ["--overwrite"]), (work / "new", [])):
        refused("import", str(ckpt), "-o", str(dest), "--trust-pickle", *extra, match="truncated", watch=work)


def test_incomplete_import_is_not_sent_to_build_tables(made, tmp_path):
    imported = tmp_path / "imported"
    run_engram("import", str(made["tables.safetensors"]), "-o", str(imported), check=True)
    edit_attrs(imported, lambda attrs: attrs.update(complete=False))
    next(p for p in (imported / "layer_3" / "c").rglob("*") if p.is_file()).unlink()
    line = refused(
        "export", str(imported), "--for", "training", "-o", str(tmp_path / "x"), match="import", watch=tmp_path
    )
    assert "--resume" not in line and "build-tables" not in line


# ---- silent corruption -------------------------------------------------------------------------------------


def test_flipped_checkpoint_bytes_are_a_checksum_error(made, tmp_path):
    work = tmp_path / "work"
    old = copy(made["store"], work / "old")
    for name in ("__0_0.distcp", "__1_0.distcp"):
        ckpt = copy(made["dcp"], tmp_path / f"flipped-{name}")
        data = bytearray((ckpt / name).read_bytes())
        middle = len(data) // 2
        data[middle : middle + 64] = bytes(b ^ 0x5A for b in data[middle : middle + 64])
        (ckpt / name).write_bytes(bytes(data))
        line = refused(
            "import", str(ckpt), "-o", str(old), "--overwrite", "--trust-pickle", match="damaged", watch=work
        )
        assert name in line


@pytest.mark.parametrize("target", ["training", "inference"])
@pytest.mark.parametrize(
    ("template", "message"),
    [
        ("engram.layers.{layer_id}.offsets", "the name of engram's own metadata"),
        ("engram.meta{layer_id}", ""),
        ("w.{layer_id:>999999999}", "has a format spec"),
        ("w.{layer_id!r}", "format spec or conversion"),
        ("w.{layer_id[0]}", "unknown field"),
    ],
)
def test_key_templates_cannot_collide_or_pad(made, tmp_path, target, template, message):
    if template == "engram.meta{layer_id}":  # no collision: a plain name is fine
        run_engram(
            "export", str(made["store"]), "--for", target, "-o", str(tmp_path / "out"), "--key-template", template,
            check=True,
        )  # fmt: skip
        return
    refused(
        "export", str(made["store"]), "--for", target, "-o", str(tmp_path / "out"), "--key-template", template,
        match=message, watch=tmp_path,
    )  # fmt: skip


def test_import_refuses_a_spec_or_projection_that_contradicts_the_checkpoint(made, tmp_path, projection, tiny_spec):
    other_seed = spec_toml(tiny_spec, tmp_path / "seed.toml", seed=8)
    other = tmp_path / "other.safetensors"
    VocabProjection(projection.lookup[::-1].copy()).save(other)
    for checkpoint, extra in ((made["tables.safetensors"], []), (made["dcp"], ["--trust-pickle"])):
        refused(
            "import", str(checkpoint), "-o", str(tmp_path / "out"), "--spec", str(other_seed), *extra,
            match="engram.seed is 7 in the spec the checkpoint records but 8 in --spec", watch=tmp_path,
        )  # fmt: skip
        refused(
            "import", str(checkpoint), "-o", str(tmp_path / "out"), "--projection", str(other), *extra,
            match="records its own projection", watch=tmp_path,
        )  # fmt: skip


def _store_holding(
    path: Path, spec: TableSpec, projection: VocabProjection, values: dict[tuple[int, int], float]
) -> Path:
    """A float32 store of `spec` whose tables are 1.0 except `values` at (layer, row)."""
    store = create_store(path, spec, projection, dtype="float32")
    for layer in store.layer_ids:
        table = np.ones((store.layout(layer).rows, spec.dim), np.float32)
        for (at_layer, row), value in values.items():
            if at_layer == layer:
                table[row, 5] = value
        store.write_rows(layer, 0, table)
    store.mark_complete()
    return path


def test_values_that_cannot_be_represented_are_refused(projection, tmp_path, tiny_spec):
    large = _store_holding(tmp_path / "large", tiny_spec, projection, {(3, 17): 1e5})
    work = tmp_path / "work"
    work.mkdir()
    refused(
        "export", str(large), "--for", "inference", "--dtype", "float16", "-o", str(work / "f16"),
        match="layer 3 rows 0-", watch=work,
    )  # fmt: skip
    refused(
        "export", str(large), "--for", "training", "--dtype", "float16", "-o", str(work / "f16"),
        match="outside the range of float16", watch=work,
    )  # fmt: skip
    for value in (float("inf"), float("nan")):
        odd = _store_holding(tmp_path / f"odd-{value}", tiny_spec, projection, {(1, 40): value})
        refused(
            "export", str(odd), "--for", "inference", "--dtype", "float8_e4m3fn", "-o", str(work / "fp8"), "--json",
            match="row 40", watch=work,
        )  # fmt: skip
    odd = _store_holding(tmp_path / "health", tiny_spec, projection, {(1, 40): float("inf"), (3, 2): float("nan")})
    shown = run_engram("inspect", str(odd), "--json", check=True).stdout
    report = json.loads(shown, parse_constant=lambda name: pytest.fail(f"bare {name} in --json output"))
    heads = report["tables"]["layers"]
    assert heads["1"]["heads"][0]["nonfinite"] == 1 and heads["3"]["heads"][0]["nonfinite"] == 1


def test_json_has_no_bare_non_finite_numbers():
    from engram_cli.cli.render import finite_json

    shown = json.dumps(finite_json({"a": [1.5, float("inf"), -float("inf")], "b": np.float32("nan"), "c": 2}))
    assert json.loads(shown) == {"a": [1.5, "inf", "-inf"], "b": "nan", "c": 2}


def _projection_file(path: Path, lookup: np.ndarray) -> Path:
    save_file({"lookup": lookup}, str(path), metadata={"format": "engram-projection", "format_version": "1"})
    return path


@pytest.mark.parametrize(
    ("lookup", "message"),
    [
        (np.array([0, 1, -1, 2] * 10, np.int64), "negative ids (-1)"),
        (np.array([0, 1, 2, 1 << 62] * 10, np.int64), "4,611,686,018,427,387,904"),
        (np.array([0, 1, 3, 3] * 10, np.int64), "id 2 is unused"),
        (np.arange(40, dtype=np.float64), "must be int64"),
        (np.arange(40, dtype=np.int32), "must be int64"),
    ],
)
def test_projection_files_must_map_onto_canonical_ids(tmp_path, lookup, message, tiny_spec):
    bad = _projection_file(tmp_path / "bad.safetensors", lookup)
    spec = spec_toml(tiny_spec, tmp_path / "tiny.toml")
    refused(
        "build-tables", str(spec), "-o", str(tmp_path / "out"), "--projection", str(bad), match=message, watch=tmp_path
    )


def test_spec_pad_id_must_be_a_token_of_the_vocab(made, tmp_path, tiny_spec):
    spec = spec_toml(tiny_spec, tmp_path / "pad.toml", pad_id=5000)
    refused(
        "build-tables", str(spec), "-o", str(tmp_path / "out"), "--projection", str(made["projection.safetensors"]),
        match="pad_id 5000 is not a token id", watch=tmp_path,
    )  # fmt: skip
    refused(
        "build-tables", str(spec_toml(tiny_spec, tmp_path / "inf.toml", init="{ distribution = 'normal', std = inf }")),
        "-o", str(tmp_path / "out"), match="table.init.std", watch=tmp_path,
    )  # fmt: skip


# ---- lying files ---------------------------------------------------------------------------------------------


def _layer_json(store: Path, change) -> None:
    path = store / "layer_1" / "zarr.json"
    meta = json.loads(path.read_text())
    change(meta)
    path.write_text(json.dumps(meta))


STORE_LIES = {
    "dtype": (lambda s: edit_attrs(s, lambda a: a.update(dtype="float16")), "dtype is 'float16'"),
    "dtype and spec": (
        lambda s: edit_attrs(s, lambda a: (a.update(dtype="float16"), a["spec"]["table"].update(dtype="float16"))),
        'data_type is "bfloat16"',
    ),
    "rows": (lambda s: edit_attrs(s, lambda a: a["layers"]["1"].update(rows=10**15)), "rows is 1000000000000000"),
    "chunk_rows": (lambda s: edit_attrs(s, lambda a: a["layers"]["3"].update(chunk_rows=0)), "chunk_rows 0"),
    "ranks": (lambda s: edit_attrs(s, lambda a: a["sharding"].update(ranks=1.5)), "sharding.ranks"),
    "head sizes": (lambda s: edit_attrs(s, lambda a: a["layers"]["1"]["head_sizes"].reverse()), "head_sizes"),
    "multipliers": (
        lambda s: edit_attrs(s, lambda a: a["layers"]["3"]["multipliers"].__setitem__(0, 3)),
        "multipliers",
    ),
    "seed": (lambda s: edit_attrs(s, lambda a: a["spec"]["engram"].update(seed=8)), "multipliers"),
    "vocab": (
        lambda s: edit_attrs(s, lambda a: a["projection"].update(vocab_size=10)),
        "vocab_size 10 and compressed_size",
    ),
    "layer shape": (lambda s: _layer_json(s, lambda m: m.update(shape=[5, 64])), "shape is [5, 64]"),
    "layer chunks": (
        lambda s: _layer_json(s, lambda m: m["codecs"][0]["configuration"].update(chunk_shape=[7, 64])),
        "codecs",
    ),
    "layer json": (lambda s: (s / "layer_1" / "zarr.json").write_text("{not json"), "is not valid JSON"),
}


@pytest.mark.parametrize("lie", sorted(STORE_LIES))
def test_store_metadata_that_contradicts_itself_is_refused(made, tmp_path, lie):
    edit, message = STORE_LIES[lie]
    store = copy(made["store"], tmp_path / "store")
    edit(store)
    refused("inspect", str(store), "--verify", match=message, watch=tmp_path)


def _safetensors(path: Path, header: dict, data: bytes) -> Path:
    text = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(text)) + text + data)
    return path


def _lying_safetensors(folder: Path, made: dict[str, Path]) -> dict[str, tuple[Path, str, bool]]:
    """name -> (file, error text, whether the safetensors library itself refuses it)."""
    eight = {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}
    cases = {
        "overlap": ({"a": eight, "b": {"dtype": "F32", "shape": [2], "data_offsets": [4, 12]}}, 12, "overlaps"),
        "size": ({"a": {"dtype": "F32", "shape": [2, 2, 2], "data_offsets": [0, 8]}}, 8, "for 32 bytes"),
        "float shape": ({"a": {"dtype": "F32", "shape": [2.0], "data_offsets": [0, 8]}}, 8, "non-negative integers"),
        "negative shape": ({"a": {"dtype": "F32", "shape": [-2], "data_offsets": [0, 8]}}, 8, "non-negative integers"),
        "short": ({"a": eight}, 4, "truncated"),
    }
    found = {}
    for name, (header, size, message) in cases.items():
        found[name] = (_safetensors(folder / f"{name}.safetensors", header, bytes(size)), message, True)
    # an engram export whose metadata points layer 1's table at the 1-D projection lookup
    source = made["tables.safetensors"]
    raw = source.read_bytes()
    length = struct.unpack("<Q", raw[:8])[0]
    header = json.loads(raw[8 : 8 + length])
    tables = json.loads(header["__metadata__"]["tables"])
    tables["1"]["weight"] = "engram.projection.lookup"
    header["__metadata__"]["tables"] = json.dumps(tables)
    found["table at lookup"] = (
        _safetensors(folder / "at-lookup.safetensors", header, raw[8 + length :]),
        "the name of engram's own metadata",
        False,
    )
    tables["1"]["weight"] = weight = "model.layers.1.engram.multi_head_embedding.embedding.weight"
    header["__metadata__"]["tables"] = json.dumps(tables)
    rows, dim = header[weight]["shape"]
    for name, shape in (("1-D", [rows * dim]), ("3-D", [rows, dim // 2, 2])):  # the same bytes, another shape
        header[weight]["shape"] = shape
        found[f"{name} table"] = (_safetensors(folder / f"{name}.safetensors", header, raw[8 + length :]), "2-D", False)
    for name, target in (("parent", "../elsewhere/x.safetensors"), ("absolute", "/etc/passwd")):
        shard = copy(made["v41"], folder / f"index-{name}")
        index = json.loads((shard / "model.safetensors.index.json").read_text())
        index["weight_map"][next(iter(index["weight_map"]))] = target
        (shard / "model.safetensors.index.json").write_text(json.dumps(index))
        found[f"index {name}"] = (shard / "model.safetensors.index.json", "not a file name in its folder", False)
    return found


def test_safetensors_headers_the_library_refuses_are_refused(made, tmp_path):
    from safetensors import safe_open

    (tmp_path / "in").mkdir()
    work = tmp_path / "work"
    work.mkdir()
    for name, (path, message, library_refuses) in _lying_safetensors(tmp_path / "in", made).items():
        if library_refuses:
            with pytest.raises(Exception):  # noqa: B017 - whatever the library raises: it refuses
                with safe_open(str(path), framework="numpy"):
                    pass
        extra = ["--spec", str(made["spec"]), "--projection", str(made["projection.safetensors"])]
        refused(
            "import", str(path), "-o", str(work / "out"), *(extra if "index" in name else []), match=message, watch=work
        )


def _edit_dcp_metadata(ckpt: Path, change) -> Path:
    """Change a checkpoint's .metadata as DCP itself reads and writes it (a pickle)."""
    import pickle

    from torch.distributed.checkpoint import FileSystemReader

    metadata = FileSystemReader(ckpt).read_metadata()
    change(metadata)
    with open(ckpt / ".metadata", "wb") as handle:
        pickle.dump(metadata, handle)
    return ckpt


def _table_chunks(metadata) -> list:
    return metadata.state_dict_metadata["model.layers.3.engram.multi_head_embedding.embedding.weight"].chunks


def _move_outside(metadata) -> None:
    index = next(i for i in metadata.storage_data if i.fqn.startswith("model.layers.3"))
    metadata.storage_data[index].relative_path = "../elsewhere.distcp"


def test_dcp_metadata_that_does_not_add_up_is_refused(made, tmp_path):
    work = tmp_path / "work"
    work.mkdir()
    for name, change, message in (
        ("uncovered", lambda m: _table_chunks(m).clear(), "leave part of it uncovered"),
        ("outside", _move_outside, "outside the checkpoint folder"),
    ):
        ckpt = _edit_dcp_metadata(copy(made["dcp"], tmp_path / name), change)
        refused("import", str(ckpt), "-o", str(work / "out"), "--trust-pickle", match=message, watch=work)


# ---- one line, not a traceback -------------------------------------------------------------------------------


def test_missing_checkpoint_file_is_one_line(made, tmp_path):
    ckpt = copy(made["dcp"], tmp_path / "ckpt")
    (ckpt / "__0_0.distcp").unlink()
    refused(
        "import",
        str(ckpt),
        "-o",
        str(tmp_path / "out"),
        "--trust-pickle",
        match="__0_0.distcp is missing",
        watch=tmp_path,
    )


@pytest.mark.parametrize(
    ("target", "extra"),
    [("training", []), ("inference", []), ("inference", ["--layout", "deepseek-v41"])],
)
def test_full_disk_export_is_one_line_and_cleans_up(made, tmp_path, target, extra):
    output = tmp_path / ("out.safetensors" if target == "inference" and not extra else "out")
    refused(
        "export", str(made["store"]), "--for", target, "-o", str(output), *extra,
        match="cannot write", code=1, watch=tmp_path, env={"file_limit": 64 << 10},
    )  # fmt: skip


def test_repeated_layer_is_written_once(made, tmp_path):
    np.save(tmp_path / "ids.npy", np.arange(30) % 20)
    out = tmp_path / "rows.npz"
    run_engram(
        "hash", "--ids", str(tmp_path / "ids.npy"), "-o", str(out), "--spec", str(made["spec"]),
        "--projection", str(made["projection.safetensors"]), "--layer", "1", "--layer", "1", check=True,
    )  # fmt: skip
    with np.load(out) as archive:
        assert archive.files == ["layer_1"]


def test_only_stale_temporaries_of_engram_are_removed(made, tmp_path):
    """A killed export's temporary folder goes on the next run; a live one, another machine's,
    and the user's own hidden files stay."""
    make = (
        "import sys; from pathlib import Path; from engram_cli.output import temporary_name; "
        "p = temporary_name(Path(sys.argv[1])); p.mkdir(); (p / 'part').write_bytes(bytes(1000)); print(p)"
    )
    dead = Path(subprocess.run([sys.executable, "-c", make, str(tmp_path / "out")], capture_output=True, text=True,
                               check=True).stdout.strip())  # fmt: skip
    from engram_cli.output import temporary_name

    live = temporary_name(tmp_path / "other")  # this test process: alive
    live.mkdir()
    foreign = tmp_path / (dead.name[: -len("00000000-1-abcdabcd")] + "00000000-1-abcdabcd")
    foreign.mkdir()  # another machine's tag
    mine = tmp_path / ".tmp-user-notes"
    mine.write_text("mine")
    assert dead.is_dir()
    run_engram("export", str(made["store"]), "--for", "training", "-o", str(tmp_path / "out"), check=True)
    assert not dead.exists()
    assert live.is_dir() and foreign.is_dir() and mine.read_text() == "mine"
