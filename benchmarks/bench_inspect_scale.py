"""`engram inspect` at pretraining scale: throughput and peak memory of the real command, 20 M to 1 B tokens.

The corpora are generated here: seeded Zipf-distributed ids (exponent 1.07) over the DeepSeek-V3
vocabulary, a document separator (id 1) about every 2,000 tokens, written as `.bin` uint32 and
read with `--doc-sep 1`, with spec engram-demo-v1 (2 layers x 2 orders x 8 heads of ~646 K rows).
Every run is the command itself in a fresh process (`python -m engram_cli inspect ... --json`),
timed end to end, process start included, with numba's cache warm; the first call's compile time
is measured apart (the same command on a tiny corpus with an empty numba cache, minus warm).

Per run: tokens/s end to end, peak RSS (of the command, and of every Dask worker: VmHWM of each
process, polled), bytes spilled, the CPU time of the process tree, and the load average of the
machine around it. Sizes are interleaved (20 M, 200 M, 20 M, ...) so the 200 M / 20 M ratio is
measured under the same load; the Dask run (a 2-worker LocalCluster, `--max-memory` per worker)
is compared with the local run at 200 M, and every run's numbers must equal the local ones.

Targets (issue 11): peak RSS <= budget + 768 MiB at every size and with the default budget;
tokens/s at 200 M >= 0.8x at 20 M; >= 6 M tokens/s at 20 M with --max-memory 1024; Dask >= 0.8x
local at 200 M.

    .venv/bin/python benchmarks/bench_inspect_scale.py [--repeats 1] [--billion] [--data DIR] [--skip-dask]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import psutil

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from engram_cli.vocab import default_projection

from common import markdown_table

SEP = 1
ZIPF_EXPONENT = 1.07
DOC_TOKENS = 2000
SLACK = 768 << 20  # what the issue allows above the budget
GENERATE_CHUNK = 1 << 24


def generate(path: Path, tokens: int, vocab: int, seed: int = 0) -> None:
    """Zipf ranks over the vocabulary (the separator excluded) mapped to ids by a seeded
    permutation, a separator about every DOC_TOKENS tokens; written a chunk at a time."""
    rng = np.random.default_rng(seed)
    ranked = rng.permutation(np.setdiff1d(np.arange(vocab), [SEP])).astype(np.uint32)
    cdf = np.cumsum(np.arange(1, ranked.size + 1, dtype=np.float64) ** -ZIPF_EXPONENT)
    cdf /= cdf[-1]
    tmp = path.with_suffix(".partial")
    with open(tmp, "wb") as handle:
        for lo in range(0, tokens, GENERATE_CHUNK):
            n = min(GENERATE_CHUNK, tokens - lo)
            ids = ranked[np.minimum(np.searchsorted(cdf, rng.random(n)), ranked.size - 1)]
            ids[rng.random(n) < 1 / DOC_TOKENS] = SEP
            ids.tofile(handle)
    tmp.replace(path)


def corpus(data: Path, tokens: int, vocab: int) -> Path:
    path = data / f"zipf-{tokens}-s{ZIPF_EXPONENT}.bin"
    if not path.exists() or path.stat().st_size != 4 * tokens:
        started = time.perf_counter()
        generate(path, tokens, vocab)
        print(f"generated {path.name} in {time.perf_counter() - started:.0f} s", flush=True)
    return path


def hwm_bytes(pid: int) -> int | None:
    try:
        with open(f"/proc/{pid}/status") as handle:
            for line in handle:
                if line.startswith("VmHWM"):
                    return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


class Watch:
    """Peak RSS (VmHWM) of a process and of every process under it, polled until it ends."""

    def __init__(self, pid: int) -> None:
        self.root = pid
        self.peaks: dict[int, tuple[str, int]] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                procs = [psutil.Process(self.root), *psutil.Process(self.root).children(recursive=True)]
            except psutil.Error:
                procs = []
            for proc in procs:
                peak = hwm_bytes(proc.pid)
                if peak is not None:
                    try:
                        name = " ".join(proc.cmdline()[1:4])[:80]
                    except psutil.Error:
                        name = "?"
                    self.peaks[proc.pid] = (name, max(peak, self.peaks.get(proc.pid, ("", 0))[1]))
            self._stop.wait(0.1)

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()

    def workers(self) -> list[int]:
        """Peaks of the Dask workers (the processes that ran tasks: the large ones under the root)."""
        return sorted(
            (peak for pid, (name, peak) in self.peaks.items() if pid != self.root and "spawn_main" in name),
            reverse=True,
        )


def default_budget() -> int:
    """What the command takes without --max-memory: a quarter of the memory available now."""
    return int(min(8 << 30, max(256 << 20, psutil.virtual_memory().available // 4)))


def run(args: list[str], env: dict[str, str]) -> dict:
    """The command in a fresh process: its JSON, wall time, peak RSS (its own, exact from wait4
    when it has no children; Dask workers polled), CPU time of its process tree, load around it."""
    load_before = os.getloadavg()[0]
    budget = default_budget()
    cpu_before = os.times()
    with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
        started = time.perf_counter()
        proc = subprocess.Popen([sys.executable, "-m", "engram_cli", *args, "--json"], stdout=out, stderr=err, env=env)
        watch = Watch(proc.pid)
        _, status, usage = os.wait4(proc.pid, 0)
        wall = time.perf_counter() - started
        proc.returncode = os.waitstatus_to_exitcode(status)
        watch.stop()
        out.seek(0)
        err.seek(0)
        if proc.returncode != 0:
            raise SystemExit(f"engram {' '.join(args)} failed:\n{err.read().decode()[-2000:]}")
        result = json.loads(out.read())
    cpu_after = os.times()
    workers = watch.workers()
    own = watch.peaks.get(proc.pid, ("", 0))[1] if workers else usage.ru_maxrss * 1024
    return {
        "json": result,
        "wall": wall,
        "peak": own,
        "workers": workers,
        "load": (load_before, os.getloadavg()[0]),
        "cpu": (cpu_after.children_user - cpu_before.children_user)
        + (cpu_after.children_system - cpu_before.children_system),
        "default_budget": budget,
    }


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--repeats", type=int, default=1, help="runs of each size (medians)")
    parser.add_argument("--billion", action="store_true", help="also 1 B tokens (4 GB of ids)")
    parser.add_argument("--data", type=Path, default=None, help="where to keep the generated corpora")
    parser.add_argument("--spill-dir", type=Path, default=None, help="--spill-dir of the runs")
    parser.add_argument("--skip-dask", action="store_true")
    parser.add_argument("--skip-default", action="store_true", help="skip the default-budget runs")
    parser.add_argument("--budget", type=int, default=1024, help="--max-memory (MiB)")
    parser.add_argument("--sizes", default="20000000,200000000", help="corpus sizes, small then large")
    args = parser.parse_args()
    vocab = default_projection().vocab_size
    data = args.data or Path(tempfile.mkdtemp(prefix="engram-bench-scale-"))
    data.mkdir(parents=True, exist_ok=True)
    sizes = [int(v) for v in args.sizes.split(",")] + ([1_000_000_000] if args.billion else [])
    paths = {n: corpus(data, n, vocab) for n in sizes}
    env = {**os.environ, "COLUMNS": "200"}
    spill = ["--spill-dir", str(args.spill_dir)] if args.spill_dir else []

    def command(n: int, *extra: str) -> list[str]:
        base = ["inspect", "engram-demo-v1", "--corpus", str(paths[n]), "--bin-dtype", "uint32", "--doc-sep", "1"]
        return [*base, *spill, *extra]

    # numba: compile time on a fresh cache, then warm the real cache for every run below
    tiny = data / "tiny.bin"
    np.fromfile(paths[sizes[0]], np.uint32, count=1_000_000).tofile(tiny)
    tiny_args = ["inspect", "engram-demo-v1", "--corpus", str(tiny), "--bin-dtype", "uint32", "--doc-sep", "1"]
    with tempfile.TemporaryDirectory() as cache:
        cold = run(tiny_args, {**env, "NUMBA_CACHE_DIR": cache})["wall"]
        run(tiny_args, env)  # the package's own cache, warm from now on
        warm = statistics.median(run(tiny_args, {**env, "NUMBA_CACHE_DIR": cache})["wall"] for _ in range(3))
    print(f"first call: {cold:.1f} s with an empty numba cache, {warm:.1f} s warm: {cold - warm:.1f} s compiling")

    budget = ["--max-memory", str(args.budget)]
    runs: dict[str, list[dict]] = {}
    for _ in range(args.repeats):
        for n in sizes:
            print(f"running {n:,} tokens, --max-memory {args.budget} ...", flush=True)
            runs.setdefault(f"{n} local", []).append(run(command(n, *budget), env))
    if not args.skip_default:
        for n in sizes[:2]:
            print(f"running {n:,} tokens, default budget ...", flush=True)
            runs.setdefault(f"{n} default", []).append(run(command(n), env))
    if not args.skip_dask:
        n = sizes[1]
        for _ in range(args.repeats):
            print(f"running {n:,} tokens on a 2-worker LocalCluster ...", flush=True)
            runs.setdefault(f"{n} dask", []).append(run(command(n, *budget, "--dask-workers", "2"), env))
            runs.setdefault(f"{n} local (beside dask)", []).append(run(command(n, *budget), env))

    rows, checks = [], []
    tokens_s: dict[str, float] = {}
    for name, results in runs.items():
        n = int(name.split()[0])
        layers = {json.dumps(r["json"]["layers"], sort_keys=True) for r in results}
        reference = json.dumps(runs[f"{n} local"][0]["json"]["layers"], sort_keys=True)
        same = layers == {reference}
        wall = statistics.median(r["wall"] for r in results)
        tokens = results[0]["json"]["corpus"]["tokens"]
        rate = tokens / wall
        tokens_s[name] = rate
        peak = max(r["peak"] for r in results)
        workers = max((max(r["workers"], default=0) for r in results), default=0)
        allowed = min(r["default_budget"] for r in results) if "default" in name else args.budget << 20
        orders = results[0]["json"]["layers"]["1"]["orders"]
        rows.append(
            [
                name,
                f"{tokens / 1e6:,.0f} M",
                f"{orders['2']['distinct'] / 1e6:.1f} M / {orders['3']['distinct'] / 1e6:.1f} M",
                f"{wall:.1f}",
                f"{rate / 1e6:.2f} M",
                f"{statistics.median(r['cpu'] for r in results):.0f}",
                f"{peak / 2**30:.2f} GiB" + (f" (workers {workers / 2**30:.2f})" if workers else ""),
                f"{statistics.median(r['json']['corpus']['spilled_bytes'] for r in results) / 1e9:.1f} GB",
                " / ".join(f"{r['load'][0]:.1f}-{r['load'][1]:.1f}" for r in results),
                "identical" if same else "DIFFERENT",
            ]
        )
        checks.append(
            (f"{name}: peak RSS {peak / 2**20:,.0f} MiB <= {allowed >> 20:,} + 768 MiB", peak <= allowed + SLACK)
        )
        if workers:
            checks.append(
                (
                    f"{name}: each worker's peak <= {allowed >> 20:,} + 768 MiB ({workers / 2**20:,.0f} MiB)",
                    workers <= allowed + SLACK,
                )
            )
        checks.append((f"{name}: numbers identical to the local run", same))
    print()
    print(
        markdown_table(
            [
                "run",
                "tokens",
                "distinct 2-/3-grams",
                "s",
                "tokens/s",
                "CPU s",
                "peak RSS",
                "spilled",
                "load avg",
                "numbers",
            ],
            rows,
        )
    )
    small, large = f"{sizes[0]} local", f"{sizes[1]} local"
    ratio = tokens_s[large] / tokens_s[small]
    checks.append((f"tokens/s at {sizes[1]:,} / at {sizes[0]:,} = {ratio:.2f} >= 0.8", ratio >= 0.8))
    checks.append((f"tokens/s at {sizes[0]:,} = {tokens_s[small] / 1e6:.2f} M >= 6 M", tokens_s[small] >= 6e6))
    if f"{sizes[1]} dask" in tokens_s:
        dask = tokens_s[f"{sizes[1]} dask"] / tokens_s[f"{sizes[1]} local (beside dask)"]
        checks.append((f"Dask / local at {sizes[1]:,} = {dask:.2f} >= 0.8", dask >= 0.8))
    print()
    for text, ok in checks:
        print(f"{'ok  ' if ok else 'MISS'} {text}")
    machine = f"{psutil.cpu_count()} cores, {psutil.virtual_memory().total / 2**30:.0f} GiB"
    print(f"\nmachine: {machine}; load average now {os.getloadavg()}")


if __name__ == "__main__":
    main()
