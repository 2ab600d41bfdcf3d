"""Table stores: the Engram tables of a spec as one sharded zarr v3 group.

Layout of a store (all zarr v3, readable by any zarr v3 reader):

    STORE/zarr.json                  group; attributes["engram"] hold the format version, the
                                     spec, the projection's metadata, per layer the head sizes,
                                     offsets, multipliers, dim, chunk/shard rows and the rank
                                     partition, the init algorithm id, and `complete`
    STORE/projection                 int64 (vocab_size,): tokenizer id -> canonical id
    STORE/projection_tokenizer       uint8: the tokenizer JSON the projection came from (if any)
    STORE/layer_<id>                 (rows, dim) table of one layer, heads one after another in
                                     hashing order (row = offset of head + bucket)
    STORE/layer_<id>/c/<i>/0         shard file i: rows [i * shard_rows, (i + 1) * shard_rows)

Each layer array uses the sharding codec: inner chunks of whole rows (about 1 MiB, cheap
random row reads) with a crc32c per chunk, shard files of at most 128 MiB with a crc32c'd
index. Rank boundaries always fall on shard boundaries, so every rank reads or writes whole
shard files alone; zarr rewrites a partially written shard, so no plan ever lets two writers
share one. Shards are encoded here (the sharding format is simple and fixed) and written to a
temporary name then renamed, so a shard file is either complete or absent; `complete` flips to
true only after every shard exists, which is what `--resume` and readers rely on.
"""

from __future__ import annotations

import concurrent.futures
import resource
import shutil
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from ..cluster import absolute_store_path, run_tasks
from ..dtypes import DTYPE_BYTES, STORE_DTYPES, StoreDType
from ..errors import EngramError, OutputExistsError, UsageError
from ..helpers import cpu_count, human_bytes
from ..progress import SILENT, Progress, ProgressTask
from ..spec import TableSpec
from ..vocab import VocabProjection, default_projection
from .attributes import default_init, spec_difference
from .create import create_layer_array, create_store, store_exists, write_projection_arrays
from .files import is_url, store_path
from .layout import ShardBy, plan_layout
from .shard_format import shard_file_size
from .tables import TableStore, open_tables

if TYPE_CHECKING:
    from distributed import Client

BUFFER_BUDGET = 1 << 30  # shard buffers in flight across all build workers


def build_shard(path: str, layer_id: int, index: int) -> int:
    """Generate and write shard `index` of one layer of the store at `path`; returns bytes.

    A plain function of picklable arguments, so a cluster can run one task per shard; the
    store must exist (create it with `create_store`) and the caller marks it complete.
    """
    return open_tables(path, allow_incomplete=True, writable=True).build_shard(layer_id, index)


def _check_resumable(
    store: TableStore, spec: TableSpec, projection: VocabProjection, shards: int, shard_by: str
) -> None:
    where = store.path
    diff = spec_difference(store.attrs["spec"], spec.to_dict())
    if diff:
        raise EngramError(
            f"cannot resume {where}: it was built from a different spec ({diff}); "
            "use the same spec, or --overwrite to start again"
        )
    if store.attrs["projection"]["fingerprint"] != projection.fingerprint():
        raise EngramError(
            f"cannot resume {where}: it was built with a different projection "
            f"(lookup sha256 {store.attrs['projection']['fingerprint'][:12]}... in the "
            f"store, {projection.fingerprint()[:12]}... now); use the same "
            "--projection, or --overwrite"
        )
    if store.init != default_init(spec):
        raise EngramError(
            f"cannot resume {where}: its values come from {store.init}, not {default_init(spec)}; use --overwrite"
        )
    if (store.ranks, store.shard_by) != (shards, shard_by):
        raise EngramError(
            f"cannot resume {where}: it is laid out for {store.ranks} ranks by "
            f"{store.shard_by}, not {shards} by {shard_by}; drop --shards/--shard-by "
            "or pass the stored ones"
        )


def _open_for_resume(
    path: str, spec: TableSpec, projection: VocabProjection, shards: int | None, shard_by: str | None
) -> TableStore:
    """The existing store, once it is shown to be the same build (nothing is written)."""
    store = open_tables(path, allow_incomplete=True)
    shards = store.ranks if shards is None else shards
    shard_by = store.shard_by if shard_by is None else shard_by
    _check_resumable(store, spec, projection, shards, shard_by)
    expected = plan_layout(spec, shards, shard_by)
    if {k: v.to_json() for k, v in expected.items()} != {k: v.to_json() for k, v in store.layouts.items()}:
        raise EngramError(
            f"cannot resume {path}: its shard layout differs from what this engram "
            "plans for the same spec; use --overwrite"
        )
    return store


def _repair_for_resume(path: str, spec: TableSpec, projection: VocabProjection) -> TableStore:
    """Reopen for writing, recreating the metadata a build killed early never wrote, and drop
    the temporary files of shards that were being written when it died."""
    store = open_tables(path, allow_incomplete=True, writable=True)
    for layout in store.layouts.values():
        try:
            ok = store._group[layout.array].shape == (layout.rows, layout.dim)  # type: ignore[union-attr]
        except (KeyError, ValueError, OSError):
            ok = False
        if not ok:
            create_layer_array(store._group, spec.dtype, layout)
        store._files.remove_partials(layout.array)
    try:
        store.projection  # noqa: B018 - reading it checks the fingerprint
    except EngramError:
        write_projection_arrays(store._group, projection)
    return open_tables(path, allow_incomplete=True, writable=True)


@dataclass
class BuildReport:
    """What `engram build-tables` planned and did."""

    store: str
    spec_name: str
    dtype: str
    ranks: int
    shard_by: str
    layers: list[dict[str, Any]]
    parameters: int
    bytes: int
    files: int
    init: dict[str, Any]
    dry_run: bool = False
    action: str = "create"
    workers: int = 1
    shards_in_flight: int = 1
    shards_total: int = 0
    shards_written: int = 0
    shards_kept: int = 0
    shards_repaired: int = 0
    bytes_written: int = 0
    seconds: float = 0.0
    peak_rss_bytes: int = 0
    complete: bool = False

    @property
    def parameters_per_second(self) -> float:
        built = self.shards_written + self.shards_repaired
        if not self.seconds or not built:
            return 0.0
        return self.bytes_written / DTYPE_BYTES[self.dtype] / self.seconds

    def to_json(self) -> dict[str, Any]:
        return {
            "store": self.store,
            "spec": self.spec_name,
            "dtype": self.dtype,
            "dry_run": self.dry_run,
            "action": self.action,
            "complete": self.complete,
            "ranks": self.ranks,
            "shard_by": self.shard_by,
            "init": self.init,
            "layers": self.layers,
            "total": {
                "parameters": self.parameters,
                "bytes": self.bytes,
                "shards": self.shards_total,
                "files": self.files,
            },
            "shards_written": self.shards_written,
            "shards_kept": self.shards_kept,
            "shards_repaired": self.shards_repaired,
            "bytes_written": self.bytes_written,
            "workers": self.workers,
            "shards_in_flight": self.shards_in_flight,
            "seconds": round(self.seconds, 3),
            "parameters_per_second": round(self.parameters_per_second),
            "bytes_per_second": round(self.bytes_written / self.seconds) if self.seconds else 0,
            "peak_rss_bytes": self.peak_rss_bytes,
        }


def _peak_rss() -> int:
    """Peak resident memory of this process image. Linux's VmHWM, because ru_maxrss also
    counts the parent's memory at the fork that started us (it survives exec)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def _tree_bytes(path: str) -> int:
    return sum(p.stat().st_size for p in Path(path).rglob("*") if p.is_file())


def _check_free_space(path: str, needed: int, reclaimed: int = 0) -> None:
    """Refuse up front a build the disk cannot hold (`reclaimed`: what --overwrite deletes)."""
    if is_url(path):
        return
    probe = Path(path).absolute()
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    try:
        free = shutil.disk_usage(probe).free + reclaimed
    except OSError:
        return
    if needed > free:
        raise EngramError(
            f"not enough disk space for {path}: needs {human_bytes(needed)}, {human_bytes(free)} free on {probe}"
        )


def build_tables(
    spec: TableSpec,
    output: str | Path | None,
    *,
    projection: VocabProjection | None = None,
    shards: int | None = None,
    shard_by: ShardBy | None = None,
    workers: int | None = None,
    dtype: StoreDType | None = None,
    resume: bool = False,
    overwrite: bool = False,
    dry_run: bool = False,
    client: Client | None = None,
    progress: Progress = SILENT,
) -> BuildReport:
    """The whole `engram build-tables` job: plan, create or resume, fill every shard, mark complete.

    Args:
        spec: the tables to build; `dtype` overrides its table dtype.
        output: the store folder or URL; None only for a dry run.
        projection: the vocab projection (default: the embedded DeepSeek-V3 one).
        shards, shard_by: the rank partition; default 1 and "rows", or the store's own on resume.
        workers: threads generating values (default: all cores).
        resume: finish an interrupted build; overwrite: replace an existing store.
        dry_run: plan only, write nothing.
        client: a Dask client; every shard is then one task that generates and writes that file.
        progress: receives a task advancing by rows written.

    The bytes of the result depend only on the spec, the projection and the layout (shards and
    shard_by); not on workers, interruptions or resumes.
    """
    if output is None and not dry_run:
        raise UsageError("no output store given: the table store to write")
    if resume and overwrite:
        raise UsageError("resume and overwrite exclude each other")
    if workers is not None and workers < 1:
        raise UsageError(f"workers must be a positive integer, got {workers}")
    if dtype is not None:
        if dtype not in STORE_DTYPES:
            raise UsageError(f"dtype must be one of {', '.join(STORE_DTYPES)}, got {dtype!r}")
        spec = spec.replace(dtype=dtype)
    projection = projection or default_projection()
    output = None if output is None else store_path(output)
    action, existing = "plan", None
    if output is not None:
        exists = store_exists(output)
        if exists and not (resume or overwrite):
            raise OutputExistsError(
                f"{output} already exists; pass --resume to finish an interrupted build or --overwrite to replace it"
            )
        action = "resume" if exists and resume else ("overwrite" if exists else "create")
        if action == "resume":
            existing = _open_for_resume(output, spec, projection, shards, shard_by)
            shards, shard_by = existing.ranks, existing.shard_by  # type: ignore[assignment]  # a checked store
    shards, shard_by = shards or 1, shard_by or "rows"
    layouts = plan_layout(spec, shards, shard_by)
    shard_count = sum(lay.shards for lay in layouts.values())
    total_bytes = sum(shard_file_size(lay, i) for lay in layouts.values() for i in range(lay.shards))
    report = BuildReport(
        store=output or "",
        spec_name=spec.name,
        dtype=spec.dtype,
        ranks=shards,
        shard_by=shard_by,
        layers=[
            {
                "layer": lay.layer_id,
                "parameters": lay.rows * lay.dim,
                "bytes": lay.rows * lay.dim * DTYPE_BYTES[spec.dtype],
                **lay.to_json(),
            }
            for lay in layouts.values()
        ],
        parameters=spec.parameters,
        bytes=spec.parameters * DTYPE_BYTES[spec.dtype],
        files=shard_count + 1 + len(layouts) + 2 * (1 + (projection.tokenizer_json is not None)),
        init=default_init(spec),
        dry_run=dry_run,
        action=action,
        shards_total=shard_count,
    )
    limit = max(1, BUFFER_BUDGET // max(lay.shard_rows * lay.dim * DTYPE_BYTES[spec.dtype] for lay in layouts.values()))
    report.workers = workers or cpu_count()
    report.shards_in_flight = min(report.workers, limit, shard_count)
    if output is not None:
        if existing is not None:
            needed = sum(shard_file_size(existing.layout(layer), i) for layer, i in existing.missing_shards())
        else:
            needed = total_bytes
        reclaimed = _tree_bytes(output) if action == "overwrite" and not is_url(output) else 0
        _check_free_space(output, needed, reclaimed)
    if dry_run or output is None:
        return report

    started = time.perf_counter()
    if action == "resume":
        store = _repair_for_resume(output, spec, projection)
    else:
        store = create_store(output, spec, projection, shards=shards, shard_by=shard_by, overwrite=overwrite)
    task = progress.task(f"{report.action} {Path(store.path).name}", sum(lay.rows for lay in store.layouts.values()))
    if client is None:
        _fill(store, report, task)
    else:
        _fill_on_cluster(client, store, report, task)
    store.mark_complete()
    report.complete = True
    report.seconds = time.perf_counter() - started
    report.peak_rss_bytes = _peak_rss()
    return report


def _fill(store: TableStore, report: BuildReport, task: ProgressTask) -> None:
    """Run every shard through `ensure_shard`: a few shard threads, each with one reusable
    buffer, hand the generation to `report.workers` threads and write the result."""
    jobs = [(layer, i) for layer, lay in store.layouts.items() for i in range(lay.shards)]
    local = threading.local()
    started = time.perf_counter()

    def run(job: tuple[int, int]) -> tuple[int, str, int]:
        layer, index = job
        if not hasattr(local, "buffer"):
            local.buffer = np.empty(0, dtype=np.uint8)
        layout = store.layout(layer)
        need = layout.shard_rows * layout.dim * DTYPE_BYTES[store.dtype]
        if local.buffer.nbytes < need:
            local.buffer = np.empty(need, dtype=np.uint8)
        outcome, nbytes = store.ensure_shard(layer, index, local.buffer, compute)
        start, stop = layout.shard_range(index)
        return stop - start, outcome, nbytes

    compute = concurrent.futures.ThreadPoolExecutor(max_workers=report.workers, thread_name_prefix="engram-generate")
    pool = concurrent.futures.ThreadPoolExecutor(max_workers=report.shards_in_flight, thread_name_prefix="engram-shard")
    try:
        futures = [pool.submit(run, job) for job in jobs]
        for future in concurrent.futures.as_completed(futures):
            _count_shard(report, task, started, *future.result())
    except BaseException:
        pool.shutdown(wait=True, cancel_futures=True)
        compute.shutdown(wait=True, cancel_futures=True)
        raise
    pool.shutdown(wait=True)
    compute.shutdown(wait=True)


def _count_shard(report: BuildReport, task: ProgressTask, started: float, rows: int, outcome: str, nbytes: int) -> None:
    report.bytes_written += nbytes
    if outcome == "kept":
        report.shards_kept += 1
    elif outcome == "repaired":
        report.shards_repaired += 1
    else:
        report.shards_written += 1
    elapsed = time.perf_counter() - started
    task.advance(rows, note=f"{report.bytes_written / elapsed / 1e9:.2f} GB/s" if elapsed else None)


def ensure_shard_task(path: str, layer_id: int, index: int) -> tuple[int, str, int]:
    """One Dask task: keep a good shard file or (re)build it; (rows, outcome, bytes written).

    The shard is generated in pieces on all of the worker's cores (the kernels release the GIL),
    so the last shards of a build do not leave cores idle."""
    store = open_tables(path, allow_incomplete=True, writable=True)
    with concurrent.futures.ThreadPoolExecutor(cpu_count(), thread_name_prefix="engram-generate") as pool:
        outcome, nbytes = store.ensure_shard(layer_id, index, pool=pool)
    start, stop = store.layout(layer_id).shard_range(index)
    return stop - start, outcome, nbytes


def _fill_on_cluster(client: Client, store: TableStore, report: BuildReport, task: ProgressTask) -> None:
    """One task per shard file, so no two workers ever write the same shard; only the
    (rows, outcome, bytes) of each task come back to the client."""
    jobs = [
        (f"layer{layer}-shard{i}", (absolute_store_path(store.path), layer, i))
        for layer, lay in store.layouts.items()
        for i in range(lay.shards)
    ]
    report.workers = sum(client.nthreads().values())
    report.shards_in_flight = min(report.workers, len(jobs))
    started = time.perf_counter()
    run_tasks(
        client, ensure_shard_task, jobs, on_done=lambda _name, result: _count_shard(report, task, started, *result)
    )
