"""Hugging Face datasets: folders written by `save_to_disk`, Hub dataset ids, and Arrow files.

A `save_to_disk` folder of one `Dataset` holds `state.json` (its `_data_files` list the Arrow
files in order) and `dataset_info.json`; a `DatasetDict` folder holds `dataset_dict.json` (its
`splits`) and one such folder per split, picked with `--split` where there are several. A Hub
dataset id (`owner/name`) is loaded with `datasets.load_dataset` (with `--config` and `--split`),
which, offline, finds it in the local Hugging Face cache; its Arrow cache files are then read
like those of a folder. `datasets` is only imported for Hub ids.

The Arrow files themselves are read with pyarrow alone, record batch by record batch (memory
mapped when local): Arrow IPC streams, as `datasets` writes them, or Arrow IPC files. Each row is
a document, from the `--text-field` column or the `--ids-field` list column, as for Parquet.

A stream ends with its end-of-stream marker (`ff ff ff ff 00 00 00 00`, or four zero bytes in the
pre-1.0 layout) and a file with its footer. pyarrow's stream reader takes a stream that simply
stops after a record batch as complete, so the bytes after the last batch are checked to be that
marker: a stream cut at a batch boundary (a copy or download that stopped) is an error, not
fewer documents. A file without its footer does not open.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path, PurePath
from typing import Any

from ..errors import EngramError, FormatError, UsageError
from ..helpers import first_line
from .base import CorpusOptions, DocBatch
from .files import Files, Source, read_json
from .readers import IdReader, IdReading, Reader, Span, Tally, TextReader
from .records import RowBatcher, arrow_id_rows, arrow_texts, require_column
from .text import Utf8Lines

_ARROW_FILE_MAGIC = b"ARROW1"
_END_OF_STREAM = (b"\xff\xff\xff\xff\x00\x00\x00\x00", b"\x00\x00\x00\x00")


def is_dataset_folder(files: Files, folder: PurePath) -> bool:
    """Whether a folder was written by `save_to_disk` (a Dataset or a DatasetDict)."""
    if files.is_file(folder / "dataset_dict.json"):
        return True
    state = folder / "state.json"
    if not files.is_file(state):
        return False
    try:
        found = read_json(files, state)
    except FormatError:
        return False
    return isinstance(found, dict) and "_data_files" in found


def dataset_folder_sources(files: Files, folder: PurePath, split: str | None, *, from_folder: bool) -> list[Source]:
    """The Arrow files of a `save_to_disk` folder, in order; a DatasetDict's split by `split`.

    Args:
        files: the filesystem of the folder.
        folder: the folder.
        split: the split of a DatasetDict (None: its only one).
        from_folder: whether the folder was found in a folder walk.
    """
    listing = folder / "dataset_dict.json"
    if files.is_file(listing):
        splits = _json_list(read_json(files, listing), "splits", listing)
        if not all(isinstance(name, str) and name for name in splits):
            raise FormatError(f"{listing}: 'splits' must list split names (strings)")
        chosen = _choose_split(str(folder), splits, split)
        return dataset_folder_sources(files, folder / chosen, None, from_folder=from_folder)
    state_path = folder / "state.json"
    entries = _json_list(read_json(files, state_path), "_data_files", state_path)
    if not all(isinstance(entry, dict) and isinstance(entry.get("filename"), str) for entry in entries):
        raise FormatError(f"{state_path}: each of '_data_files' must be an object with a 'filename' string")
    sources = []
    for name in (entry["filename"] for entry in entries):
        path = folder / name
        if not name or not files.is_file(path):
            raise FormatError(f"{folder}: state.json lists {name}, which is not in the folder")
        sources.append(files.source(path, "hf-dataset", from_folder))
    return sources


def _json_list(found: object, key: str, path: PurePath) -> list:
    """The list under `key` of a dataset's JSON object, refused in one line when it is not one."""
    value = found.get(key) if isinstance(found, dict) else None
    if not isinstance(value, list):
        raise FormatError(f"{path}: not a datasets file ({key!r} must be a list)")
    return value


def _choose_split(where: str, splits: list[str], split: str | None) -> str:
    if split is not None:
        if split not in splits:
            raise UsageError(f"{where} has no split {split!r} (has: {', '.join(splits)})")
        return split
    if len(splits) == 1:
        return splits[0]
    raise UsageError(f"{where} holds the splits {', '.join(splits)}: choose one with --split")


def hub_sources(dataset_id: str, split: str | None, config: str | None) -> list[Source]:
    """The Arrow cache files of a Hub dataset, loaded (or, offline, found in the cache) by `datasets`.

    Args:
        dataset_id: `owner/name`.
        split: the split (None: the only one).
        config: the configuration, `load_dataset`'s `name` (None: the default).
    """
    try:
        import datasets
    except ImportError as exc:
        if exc.name != "datasets":
            raise UsageError(f"cannot read Hub dataset {dataset_id}: importing datasets failed ({exc})") from None
        raise UsageError(
            f"no such corpus file or folder: {dataset_id}; to read it as a Hub dataset id, "
            "install the datasets package (pip install datasets)"
        ) from None
    from ..tokenizer import hub_offline

    offline = "offline (HF_HUB_OFFLINE)" if datasets.config.HF_HUB_OFFLINE else hub_offline()
    verbosity = datasets.utils.logging.get_verbosity()
    was_offline = datasets.config.HF_HUB_OFFLINE
    progress = datasets.are_progress_bars_disabled()
    datasets.utils.logging.set_verbosity_error()
    datasets.disable_progress_bars()
    datasets.config.HF_HUB_OFFLINE = bool(offline)  # read by load_dataset at call time: use the cache alone
    try:
        loaded = datasets.load_dataset(dataset_id, name=config, split=split)
    except Exception as exc:  # datasets raises many kinds for missing, gated or uncached datasets
        reason = first_line(exc)
        if offline:
            raise EngramError(
                f"no such corpus file or folder: {dataset_id}, nor a Hub dataset in the local Hugging Face "
                f"cache ({reason}); the Hub cannot be used: {offline}"
            ) from None
        raise EngramError(f"cannot load Hub dataset {dataset_id}: {reason}") from None
    finally:
        datasets.config.HF_HUB_OFFLINE = was_offline
        datasets.utils.logging.set_verbosity(verbosity)
        if not progress:
            datasets.enable_progress_bars()
    if isinstance(loaded, dict):
        chosen = _choose_split(f"Hub dataset {dataset_id}", list(loaded), None)
        loaded = loaded[chosen]
    names = [entry["filename"] for entry in loaded.cache_files]
    if not names:
        raise EngramError(f"Hub dataset {dataset_id} has no cache files to read")
    local = Files()
    return [local.source(Path(name), "hf-dataset", False) for name in names]


class _ArrowFile:
    """The record batches of one Arrow IPC stream or file, and its chosen column."""

    def __init__(self, source: Source, options: CorpusOptions) -> None:
        import pyarrow as pa

        self.source = source
        self._errors = (pa.ArrowException, OSError, ValueError)
        try:
            handle = pa.memory_map(str(source.path)) if source.fs is None else pa.PythonFile(source.open(), mode="r")
            head = handle.read(len(_ARROW_FILE_MAGIC))
            handle.seek(0)
            self._handle, self._stream = handle, head != _ARROW_FILE_MAGIC
            if head == _ARROW_FILE_MAGIC:
                file_reader = pa.ipc.open_file(handle)
                self.schema = file_reader.schema
                self._batches: Any = (file_reader.get_batch(i) for i in range(file_reader.num_record_batches))
            else:
                stream_reader = pa.ipc.open_stream(handle)
                self.schema = stream_reader.schema
                self._batches = iter(stream_reader)
        except self._errors as exc:
            raise FormatError(f"{source}: not a readable Arrow file ({first_line(exc, os_words=True)})") from None
        self.field = require_column(source, self.schema.names, options)

    def columns(self, tally: Tally) -> Iterator[tuple[int, Any]]:
        """(first row, column array) of each record batch, counting progress."""
        row, done = 0, 0
        try:
            last_end = self._handle.tell()
            for batch in self._batches:
                last_end = self._handle.tell()
                yield row, batch.column(self.field)
                row += batch.num_rows
                step = min(batch.nbytes, self.source.size - done)
                tally.advance(step)
                done += step
            if self._stream:
                self._check_end(last_end, row)
        except self._errors as exc:
            why = first_line(exc, os_words=True)
            raise FormatError(f"{self.source}: cannot read record batch at row {row} ({why})") from None
        tally.advance(self.source.size - done)

    def _check_end(self, last_end: int, rows: int) -> None:
        """Refuse a stream whose bytes after its last record batch are not the end-of-stream marker."""
        self._handle.seek(last_end)
        rest = self._handle.read(len(_END_OF_STREAM[0]) + 1)
        if rest not in _END_OF_STREAM:
            raise FormatError(
                f"{self.source}: the Arrow stream stops after {rows:,} rows without its end-of-stream "
                "marker; the file is truncated"
            )


class _ArrowReader(Reader):
    """What the text and id readers of an Arrow file share: the file, opened once."""

    def __init__(self, source: Source, options: CorpusOptions) -> None:
        super().__init__(source, options)
        self.arrow = _ArrowFile(source, options)


class ArrowTextReader(_ArrowReader, TextReader):
    def texts(self, tally: Tally, span: Span | None = None) -> Iterator[str]:
        lines = Utf8Lines(tally)
        for _, column in self.arrow.columns(tally):
            yield from arrow_texts(column, self.source, self.arrow.field, lines)


class ArrowIdReader(_ArrowReader, IdReader):
    def batches(self, tally: Tally, reading: IdReading, span: Span | None = None) -> Iterator[DocBatch]:
        rows = RowBatcher(reading.batch_tokens)
        for first_row, column in self.arrow.columns(tally):
            ids, lengths = arrow_id_rows(column, self.source, self.arrow.field, first_row, reading.vocab_size)
            yield from rows.add(ids, lengths)
        yield from rows.finish()


def make_reader(source: Source, options: CorpusOptions) -> Reader:
    """Ids from `--ids-field`, else text from `--text-field`."""
    return ArrowIdReader(source, options) if options.ids_field is not None else ArrowTextReader(source, options)
