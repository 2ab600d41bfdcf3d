"""Finding the input files of a corpus: local paths, fsspec URLs, dataset folders and Hub ids.

Every input becomes a list of `Source`s, each one file (or, for a Megatron indexed dataset, one
`PREFIX.bin` + `PREFIX.idx` pair) with the kind of reader that reads it. Folders are walked
recursively in sorted order, hidden entries skipped; a folder that cannot be listed or a file in
it that cannot be read is an error naming it (or, when asked, skipped and counted), never silence.
The kind comes from the name: after a compression suffix (`.gz`, `.zst`, `.zstd`, `.xz`,
`.bz2`) is set aside, `.jsonl`/`.ndjson` are JSON lines, `.json` JSON lines or an array, `.npy`
and `.bin` token ids (a `.bin` beside a `.idx` is a Megatron pair), `.parquet`/`.pq` Parquet,
`.arrow` Arrow IPC; anything else is text. A folder written by Hugging Face `datasets`'
`save_to_disk` is read as its Arrow files, and a missing path of the form `owner/name` as a Hub
dataset id (see `hf.py`).

A URL (`s3://`, `gs://`, `hf://`, `https://`, `memory://`, ...) is opened with fsspec; `file://`
URLs are plain local paths. A missing path of the form `owner/name` is tried as a Hub dataset id.
"""

from __future__ import annotations

import fnmatch
import re
from pathlib import Path, PurePath

from ..errors import EngramError, FormatError, UsageError
from ..helpers import first_line
from .files import Files, Source, filesystem, kind_of
from .hf import dataset_folder_sources, hub_sources, is_dataset_folder
from .megatron import MAGIC as MEGATRON_MAGIC

# A Hub dataset id, `owner/name`, as the Hub allows them.
_HUB_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*/[A-Za-z0-9][A-Za-z0-9_.-]*$")


def find_sources(
    paths: list[str | Path],
    glob: str | None = None,
    *,
    split: str | None = None,
    config: str | None = None,
    unreadable: list[str] | None = None,
) -> list[Source]:
    """Every input file, folders walked recursively in sorted order (hidden entries skipped).

    Args:
        paths: files, folders, Megatron prefixes, URLs and Hub dataset ids.
        glob: in folders, only files whose name matches.
        split: the split of a Hugging Face DatasetDict folder or Hub dataset.
        config: the configuration of a Hub dataset.
        unreadable: where the local folders and files found in folders that cannot be read are
            listed and skipped (None: each is an error).
    """
    sources: list[Source] = []
    for raw in paths:
        text = str(raw)
        if "://" in text and not text.lower().startswith("file://"):
            fs, inner = filesystem(text)
            files = Files(fs)
            path = files.path(inner)
            try:
                sources += _find(files, path, text, glob, split, unreadable=unreadable)
            except EngramError:
                raise
            except Exception as exc:  # each backend raises its own errors for missing keys, denied access, ...
                raise EngramError(f"cannot read {text}: {first_line(exc, os_words=True)}") from None
            continue
        if text.lower().startswith("file://"):
            text = filesystem(text)[1]
        sources += _find(Files(), Path(text), text, glob, split, config=config, unreadable=unreadable)
    return sources


def _find(
    files: Files,
    path: PurePath,
    raw: str,
    glob: str | None,
    split: str | None,
    config: str | None = None,
    unreadable: list[str] | None = None,
) -> list[Source]:
    if files.is_dir(path):
        if is_dataset_folder(files, path):
            return dataset_folder_sources(files, path, split, from_folder=False)
        return _walk(files, path, glob, split, unreadable)
    if files.is_file(path):
        if glob and not fnmatch.fnmatch(path.name, glob):
            raise UsageError(f"--corpus {raw} does not match --glob {glob!r}")
        if path.suffix.lower() in (".bin", ".idx"):
            pair = _megatron_pair(files, path.with_suffix(""), explicit=True)
            if pair is not None:
                return [pair]
        return [files.source(path, kind_of(path.name), False)]
    if files.exists(path):
        raise UsageError(f"corpus input {raw} is neither a file nor a folder")
    pair = _megatron_pair(files, path, explicit=False)
    if pair is not None:
        return [pair]
    if files.fs is None and _HUB_ID.match(raw):
        return hub_sources(raw, split, config)
    raise UsageError(f"no such corpus file or folder: {raw}")


def _megatron_pair(files: Files, prefix: PurePath, explicit: bool) -> Source | None:
    """PREFIX.bin + PREFIX.idx as one source; an explicit `.idx` without its `.bin` is an error."""
    bin_path, idx_path = prefix.with_name(prefix.name + ".bin"), prefix.with_name(prefix.name + ".idx")
    has_bin, has_idx = files.is_file(bin_path), files.is_file(idx_path)
    if has_bin and has_idx:
        return files.source(bin_path, "megatron", False, files.size(bin_path) + files.size(idx_path))
    if explicit and has_idx and not has_bin:
        raise FormatError(f"{idx_path}: a Megatron index without its data file {bin_path.name}")
    return None


def _walk(
    files: Files, root: PurePath, glob: str | None, split: str | None, unreadable: list[str] | None
) -> list[Source]:
    found = files.walk(root, unreadable)
    folders = sorted(
        {p.parent for p, _ in found if p.name in ("state.json", "dataset_dict.json")},
        key=lambda p: len(p.parts),
    )
    datasets: list[PurePath] = []
    for folder in folders:
        if not any(_within(folder, d) for d in datasets) and is_dataset_folder(files, folder):
            datasets.append(folder)
    sizes = dict(found)
    sources: list[Source] = []
    done: set[PurePath] = set()
    for path, size in found:
        owner = next((d for d in datasets if _within(path, d)), None)
        if owner is not None:
            if owner not in done:
                done.add(owner)
                inside = dataset_folder_sources(files, owner, split, from_folder=True)
                if not glob or any(fnmatch.fnmatch(s.name, glob) for s in inside):
                    sources += inside
            continue
        if glob and not fnmatch.fnmatch(path.name, glob):
            continue
        suffix = path.suffix.lower()
        if suffix in (".bin", ".idx"):
            other = path.with_suffix(".idx" if suffix == ".bin" else ".bin")
            if other in sizes:
                if suffix == ".bin":
                    sources.append(files.source(path, "megatron", True, size + sizes[other]))
                continue
            if suffix == ".idx" and files.head(path, len(MEGATRON_MAGIC)) == MEGATRON_MAGIC:
                raise FormatError(f"{path}: a Megatron index without its data file {other.name}")
        sources.append(files.source(path, kind_of(path.name, explicit=False), True, size))
    return sources


def _within(path: PurePath, folder: PurePath) -> bool:
    return path == folder or folder in path.parents
