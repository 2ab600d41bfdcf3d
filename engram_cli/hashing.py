"""N-gram hashing: token ids to the row of every Engram head, bit-exact with the reference.

For position t and order n the reference mixes the projected ids
`x[t] * m[0] ^ x[t-1] * m[1] ^ ... ^ x[t-n+1] * m[n-1]` (int64, the projected pad
before the start of each row) and takes `mix mod p` for every head prime p of that
order. The straightforward numpy form makes a shifted copy per order and one
pass per head, and runs at 1 to 1.5 M tokens/s here; this one is a numba kernel that
projects, mixes and reduces one block of a row at a time in cache, writing the
output once.

The reduction avoids 64-bit division. Three roundings of relative error 2**-53
put float(mix) * (1/p) within 3 * 2**10 / p < 0.375 of mix / p when p >= 2**13, so
its truncation q lies in floor(mix / p) - 1 .. floor(mix / p) + 2 and `mix - q*p`
needs at most two corrections up and one down to land in [0, p): numpy's
floor-mod, negative mixes included. Smaller primes (toy specs) take the exact `%`.
"""

from __future__ import annotations

import functools
import json
import os
import secrets
import sys
import threading
import time
import zipfile
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from rich.console import Console
from rich.table import Table
from rich.text import Text

from .errors import EngramError
from .spec import TableSpec, load_spec
from .vocab import VocabProjection, check_output_file, resolve_projection

# Below this the float quotient can be off by more than 2, so the kernel uses the exact `%`.
FLOAT_REDUCTION_MIN_PRIME = 1 << 13
# Tokens of one row that one thread projects and mixes in cache before reducing them.
BLOCK_TOKENS = 512
# Below this many tokens a call hashes on one thread.
PARALLEL_MIN_TOKENS = 1 << 15
# Tokens per piece when `engram hash --ids` streams a large array to disk.
FILE_CHUNK_TOKENS = 1 << 19

_KERNEL_LOCK = threading.Lock()


def _reset_lock_in_child() -> None:
    global _KERNEL_LOCK
    _KERNEL_LOCK = threading.Lock()


os.register_at_fork(after_in_child=_reset_lock_in_child)


@functools.cache
def _kernel() -> Callable[..., None]:
    """Compile (or load from numba's on-disk cache) the hashing kernel, once per process.

    numba's default OpenMP layer kills a forked child that hashes after its parent
    did (a torch DataLoader does exactly that); the workqueue layer is fork-safe,
    and the lock around each launch makes it thread-safe. An explicit
    NUMBA_THREADING_LAYER from the user wins.
    """
    import numba

    if "NUMBA_THREADING_LAYER" not in os.environ:
        numba.config.THREADING_LAYER = "workqueue"
    min_float_prime = FLOAT_REDUCTION_MIN_PRIME

    signature = "void(int64[:, ::1], int64[::1], int64, int64[::1], int64[::1], float64[::1], " \
                "int64[::1], int64[:, :, ::1], int64)"

    @numba.njit(signature, parallel=True, nogil=True, cache=True)
    def hash_layer(ids, lookup, pad, mults, primes, inv_primes, offsets, out, block):
        n_rows, length = ids.shape
        order_max = mults.size
        heads = primes.size
        per_order = heads // (order_max - 1)
        context = order_max - 1
        blocks_per_row = (length + block - 1) // block
        for task in numba.prange(n_rows * blocks_per_row):
            # Inner loops index views with their own counters only: an index that numba
            # cannot prove non-negative gets a wraparound fix-up that stops vectorization.
            b = task // blocks_per_row
            t0 = (task - b * blocks_per_row) * block
            width = min(block, length - t0)
            x = np.empty(width + context, np.int64)
            pads = max(0, context - t0)
            for i in range(pads):
                x[i] = pad
            src = ids[b, t0 - context + pads:t0 + width]
            known = x[pads:]
            for i in range(src.size):
                v = src[i]
                known[i] = lookup[v] if v >= 0 else v
            mix = np.empty(width, np.int64)
            current = x[context:]
            m0 = mults[0]
            for i in range(width):
                mix[i] = current[i] * m0
            dest = out[b, t0:t0 + width]
            for n in range(1, order_max):
                m = mults[n]
                earlier = x[context - n:context - n + width]
                for i in range(width):
                    mix[i] ^= earlier[i] * m
                first = (n - 1) * per_order
                order_primes = primes[first:first + per_order]
                order_inv = inv_primes[first:first + per_order]
                order_offsets = offsets[first:first + per_order]
                if order_primes.min() < min_float_prime:
                    for i in range(width):
                        row = dest[i, first:first + per_order]
                        for j in range(per_order):
                            row[j] = mix[i] % order_primes[j] + order_offsets[j]
                    continue
                for i in range(width):
                    value = mix[i]
                    approx = np.float64(value)
                    row = dest[i, first:first + per_order]
                    for j in range(per_order):
                        p = order_primes[j]
                        r = value - np.int64(approx * order_inv[j]) * p
                        r += p & (r >> 63)
                        r += p & (r >> 63)
                        r -= p & ~((r - p) >> 63)
                        row[j] = r + order_offsets[j]

    return hash_layer


def _launch(ids: np.ndarray, *args: Any) -> None:
    """Run the kernel; small batches on the calling thread alone.

    Waking the worker threads costs more than a data-loader batch takes to hash, and on
    a busy machine a sleeping worker can take milliseconds to get a core.
    """
    import numba

    kernel = _kernel()
    with _KERNEL_LOCK:
        if ids.size >= PARALLEL_MIN_TOKENS:
            kernel(ids, *args, BLOCK_TOKENS)
            return
        threads = numba.get_num_threads()
        numba.set_num_threads(1)
        try:
            kernel(ids, *args, BLOCK_TOKENS)
        finally:
            numba.set_num_threads(threads)


@dataclass(frozen=True)
class _Layer:
    multipliers: np.ndarray
    primes: np.ndarray
    inv_primes: np.ndarray
    offsets: np.ndarray
    zeros: np.ndarray


class NgramHasher:
    """Token ids to head-local buckets (`hash`) or layer-table rows (`rows`), per layer.

    numpy in, numpy out; torch in, torch out on the same device. A 1-D input is
    one sequence and gives (T, heads); a 2-D input (B, T) gives (B, T, heads),
    heads order-major as the reference stacks them.
    """

    def __init__(self, spec: TableSpec, projection: VocabProjection) -> None:
        self.spec = spec
        self.projection = projection
        self.compressed_size = projection.compressed_size
        if spec.pad_id >= projection.vocab_size:
            raise EngramError(f"spec pad_id {spec.pad_id} is not below the projection's vocab size "
                              f"{projection.vocab_size}")
        self.pad = int(projection.lookup[spec.pad_id])
        self._layers: dict[int, _Layer] = {}

    def multipliers(self, layer_id: int) -> np.ndarray:
        return self._layer(layer_id).multipliers.copy()

    def offsets(self, layer_id: int) -> np.ndarray:
        return self._layer(layer_id).offsets.copy()

    def head_sizes(self, layer_id: int) -> np.ndarray:
        return self._layer(layer_id).primes.copy()

    def hash(self, input_ids: Any, layers: Iterable[int] | None = None, *,
             out: Mapping[int, Any] | None = None) -> dict[int, Any]:
        """Head-local bucket of every head, per layer (all layers of the spec by default).

        `out` ({layer_id: int64 array or tensor of the output's shape}) receives the
        result instead of new arrays: a data loader that reuses (pinned) buffers skips
        the allocation and its page faults.
        """
        return self._run(input_ids, layers, with_offsets=False, out=out)

    def rows(self, input_ids: Any, layers: Iterable[int] | None = None, *,
             out: Mapping[int, Any] | None = None) -> dict[int, Any]:
        """The same buckets plus each head's offset: the row index into the layer's table."""
        return self._run(input_ids, layers, with_offsets=True, out=out)

    def _layer(self, layer_id: int) -> _Layer:
        layer_id = int(layer_id)
        cached = self._layers.get(layer_id)
        if cached is None:
            primes = np.array(self.spec.head_sizes(layer_id), dtype=np.int64)
            cached = self._layers[layer_id] = _Layer(
                multipliers=self.spec.multipliers(layer_id, self.compressed_size),
                primes=primes,
                inv_primes=1.0 / primes.astype(np.float64),
                offsets=np.array(self.spec.offsets(layer_id), dtype=np.int64),
                zeros=np.zeros(primes.size, dtype=np.int64),
            )
        return cached

    def _layer_ids(self, layers: Iterable[int] | None) -> list[int]:
        chosen = list(self.spec.layer_ids if layers is None else layers)
        for layer_id in chosen:
            self._layer(layer_id)
        return [int(layer_id) for layer_id in chosen]

    def _run(self, input_ids: Any, layers: Iterable[int] | None, with_offsets: bool,
             out: Mapping[int, Any] | None) -> dict[int, Any]:
        layer_ids = self._layer_ids(layers)
        torch = sys.modules.get("torch")
        if torch is not None and isinstance(input_ids, torch.Tensor):
            if input_ids.dtype.is_floating_point or input_ids.dtype.is_complex or input_ids.dtype == torch.bool:
                raise EngramError(f"token ids must be integers, got dtype {input_ids.dtype}")
            _check_rank(tuple(input_ids.shape))
            buffers = self._buffers(out, layer_ids, tuple(input_ids.shape), input_ids.device)
            if input_ids.device.type != "cpu":
                return self._run_torch(input_ids, layer_ids, with_offsets, buffers)
            arrays = None if buffers is None else {k: v.numpy() for k, v in buffers.items()}
            result = self._run_numpy(input_ids.detach().numpy(), layer_ids, with_offsets, arrays)
            return buffers or {k: torch.from_numpy(v) for k, v in result.items()}
        try:
            array = np.asarray(input_ids)
        except (OverflowError, ValueError, TypeError) as exc:
            raise EngramError(f"token ids must be an integer array: {exc}") from None
        _check_rank(array.shape)
        return self._run_numpy(array, layer_ids, with_offsets,
                               self._buffers(out, layer_ids, array.shape, None))

    def _buffers(self, out: Mapping[int, Any] | None, layer_ids: list[int], shape: tuple[int, ...],
                 device: Any) -> dict[int, Any] | None:
        """Check caller-given outputs: int64, C-contiguous, the output's shape, the input's kind."""
        if out is None:
            return None
        torch = sys.modules.get("torch")
        buffers = {}
        for layer_id in layer_ids:
            if layer_id not in out:
                raise EngramError(f"out has no array for layer {layer_id}")
            buffer = out[layer_id]
            want = shape + (self._layer(layer_id).primes.size,)
            if device is None:
                ok = (isinstance(buffer, np.ndarray) and buffer.dtype == np.int64
                      and buffer.flags.c_contiguous and buffer.flags.writeable)
            else:
                ok = (isinstance(buffer, torch.Tensor) and buffer.dtype == torch.int64
                      and buffer.is_contiguous() and buffer.device == device)
            if not ok or tuple(buffer.shape) != want:
                kind = "a writable numpy" if device is None else f"a torch ({device})"
                raise EngramError(f"out[{layer_id}] must be {kind} C-contiguous int64 array of shape "
                                  f"{want}, got {type(buffer).__name__} {getattr(buffer, 'dtype', '')} "
                                  f"{tuple(getattr(buffer, 'shape', ()))}")
            buffers[layer_id] = buffer
        return buffers

    def _run_numpy(self, ids: np.ndarray, layer_ids: list[int], with_offsets: bool,
                   buffers: dict[int, np.ndarray] | None) -> dict[int, np.ndarray]:
        self.projection.check_ids(ids)
        batch = np.require(ids.reshape(1, -1) if ids.ndim == 1 else ids, dtype=np.int64,
                           requirements="CW")  # the kernel takes writable arrays; a read-only map is copied
        result = {}
        for layer_id in layer_ids:
            layer = self._layer(layer_id)
            shape = batch.shape + (layer.primes.size,)
            if buffers is None:
                out = np.empty(shape, dtype=np.int64)
            else:
                out = buffers[layer_id].reshape(shape)
                if np.may_share_memory(out, batch):
                    raise EngramError(f"out[{layer_id}] overlaps the token ids it is computed from")
            if out.size:
                _launch(batch, self.projection.lookup, self.pad, layer.multipliers, layer.primes,
                        layer.inv_primes, layer.offsets if with_offsets else layer.zeros, out)
            result[layer_id] = out[0] if ids.ndim == 1 else out
        return result if buffers is None else buffers

    def _run_torch(self, ids: Any, layer_ids: list[int], with_offsets: bool,
                   buffers: dict[int, Any] | None) -> dict[int, Any]:
        """Plain torch ops for tensors on an accelerator, where the numba kernel cannot run."""
        import torch

        batch = self.projection.compress(ids)
        batch = batch.reshape(1, -1) if ids.ndim == 1 else batch
        rows, length = batch.shape
        context = self.spec.max_ngram_size - 1
        padded = torch.cat([batch.new_full((rows, context), self.pad), batch], dim=1)
        result = {}
        for layer_id in layer_ids:
            layer = self._layer(layer_id)
            mults = [int(m) for m in layer.multipliers]
            per_order = self.spec.n_head_per_ngram
            shape = (rows, length, layer.primes.size)
            out = batch.new_empty(shape) if buffers is None else buffers[layer_id].view(shape)
            mix = batch * mults[0]
            for n in range(1, len(mults)):
                mix = mix ^ (padded[:, context - n:context - n + length] * mults[n])
                for h in range((n - 1) * per_order, n * per_order):
                    bucket = torch.remainder(mix, int(layer.primes[h]))
                    out[..., h] = bucket + int(layer.offsets[h]) if with_offsets else bucket
            result[layer_id] = out[0] if ids.ndim == 1 else out
        return result if buffers is None else buffers


def _check_rank(shape: tuple[int, ...]) -> None:
    if len(shape) not in (1, 2):
        raise EngramError(f"token ids must be 1-D (one sequence) or 2-D (batch, time), got shape "
                          f"{tuple(shape)}")


def _values_key(rows: bool) -> str:
    return "rows" if rows else "buckets"


@dataclass
class HashTextReport:
    """What `engram hash TEXT` shows: every token's n-grams and where each head looks them up."""

    spec_name: str
    projection: str
    compressed_size: int
    pad_id: int
    pad_text: str
    rows: bool
    layers: list[dict[str, Any]]
    tokens: list[dict[str, Any]]

    def to_json(self) -> dict[str, Any]:
        return {
            "spec": self.spec_name, "projection": self.projection,
            "compressed_size": self.compressed_size, "pad_id": self.pad_id,
            "values": _values_key(self.rows), "layers": self.layers, "tokens": self.tokens,
        }

    def render(self, console: Console) -> None:
        kind = _values_key(self.rows)
        console.print(f"[bold]{len(self.tokens)}[/] tokens, spec [bold]{self.spec_name}[/], projection "
                      f"{self.projection} ({self.compressed_size:,} canonical ids); "
                      f"∅ = pad {self.pad_text!r} (id {self.pad_id})")
        for layer in self.layers:
            layer_id = str(layer["layer_id"])
            table = Table(title=f"layer {layer_id}: {kind} per head "
                                f"(head sizes {', '.join(f'{p:,}' for p in layer['head_sizes'])})")
            table.add_column("#", justify="right")
            table.add_column("token")
            for order in layer["orders"]:
                table.add_column(f"{order}-gram")
                table.add_column(kind)
            for token in self.tokens:
                cells: list[Any] = [str(token["position"]), Text(json.dumps(token["text"], ensure_ascii=False))]
                for ngram in token["ngrams"]:
                    cell = Text("∅ " * ngram["pads"], style="dim")
                    cell.append(json.dumps(ngram["text"], ensure_ascii=False))
                    cells += [cell, " ".join(str(v) for v in ngram[kind][layer_id])]
                table.add_row(*cells)
            console.print(table)


@dataclass
class HashFileReport:
    """What `engram hash --ids` wrote: one array per layer in an .npz."""

    input: str
    output: str
    shape: list[int]
    dtype: str
    rows: bool
    layers: list[dict[str, Any]]
    seconds: float

    @property
    def tokens(self) -> int:
        return int(np.prod(self.shape))

    def to_json(self) -> dict[str, Any]:
        return {
            "input": self.input, "output": self.output, "shape": self.shape, "dtype": self.dtype,
            "tokens": self.tokens, "values": _values_key(self.rows), "layers": self.layers,
            "seconds": self.seconds,
            "tokens_per_second": self.tokens / self.seconds if self.seconds > 0 else None,
        }

    def render(self, console: Console) -> None:
        rate = f", {self.tokens / self.seconds / 1e6:.1f} M tokens/s" if self.seconds > 0 else ""
        console.print(f"hashed {self.tokens:,} tokens {tuple(self.shape)} ({self.dtype}) of {self.input} "
                      f"in {self.seconds:.2f} s{rate}")
        table = Table()
        for column in ("layer", "array", "shape", "heads", _values_key(self.rows) + " range"):
            table.add_column(column)
        for layer in self.layers:
            span = "empty" if layer["min"] is None else f"{layer['min']:,} .. {layer['max']:,}"
            table.add_row(str(layer["layer_id"]), layer["key"], str(tuple(layer["shape"])),
                          str(layer["shape"][-1]), span)
        console.print(table)
        console.print(f"wrote {self.output}")


def hash_text(text: str, spec: TableSpec, projection: VocabProjection, *,
              layers: Iterable[int] | None = None, rows: bool = False,
              special_tokens: bool = True) -> HashTextReport:
    """Tokenize with the projection's tokenizer, hash, and pair every n-gram's text with its buckets."""
    tokenizer = projection.tokenizer()
    ids = np.array(tokenizer.encode(text, add_special_tokens=special_tokens).ids, dtype=np.int64)
    hasher = NgramHasher(spec, projection)
    layer_ids = hasher._layer_ids(layers)
    values = (hasher.rows if rows else hasher.hash)(ids, layers=layer_ids)
    per_order = spec.n_head_per_ngram
    tokens = []
    for t, tid in enumerate(ids.tolist()):
        ngrams = []
        for n in spec.orders:
            first = t - n + 1
            real = ids[max(first, 0):t + 1].tolist()
            heads = slice((n - 2) * per_order, (n - 1) * per_order)
            ngrams.append({
                "n": n, "pads": max(0, -first), "ids": [spec.pad_id] * max(0, -first) + real,
                "text": tokenizer.decode(real, skip_special_tokens=False),
                _values_key(rows): {str(k): v[t, heads].tolist() for k, v in values.items()},
            })
        tokens.append({"position": t, "id": tid, "compressed_id": int(projection.lookup[tid]),
                       "text": tokenizer.decode([tid], skip_special_tokens=False), "ngrams": ngrams})
    layer_info = [{
        "layer_id": k, "orders": list(spec.orders), "multipliers": hasher.multipliers(k).tolist(),
        "head_sizes": hasher.head_sizes(k).tolist(), "offsets": hasher.offsets(k).tolist(),
    } for k in layer_ids]
    return HashTextReport(
        spec_name=spec.name, projection=projection.fingerprint()[:12],
        compressed_size=hasher.compressed_size, pad_id=spec.pad_id,
        pad_text=tokenizer.decode([spec.pad_id], skip_special_tokens=False),
        rows=rows, layers=layer_info, tokens=tokens,
    )


def _pieces(rows: int, length: int, chunk_tokens: int) -> Iterator[tuple[int, int, int, int]]:
    """(b0, b1, t0, t1) pieces of about chunk_tokens tokens, in the output's C order."""
    if length <= chunk_tokens:
        step = max(1, chunk_tokens // max(length, 1))
        for b0 in range(0, rows, step):
            yield b0, min(rows, b0 + step), 0, length
    else:
        for b in range(rows):
            for t0 in range(0, length, chunk_tokens):
                yield b, b + 1, t0, min(length, t0 + chunk_tokens)


def _load_ids(path: Path) -> np.ndarray:
    if not path.is_file():
        raise EngramError(f"no such token-id file: {path}")
    try:
        ids = np.load(path, mmap_mode="r", allow_pickle=False)
    except (ValueError, OSError, EOFError) as exc:
        raise EngramError(f"{path} is not a readable .npy array: {exc}") from None
    if not isinstance(ids, np.ndarray):
        raise EngramError(f"{path} is an .npz archive; give one .npy array of token ids")
    return ids


def hash_ids_file(ids_path: str | Path, output: str | Path, spec: TableSpec,
                  projection: VocabProjection, *, layers: Iterable[int] | None = None,
                  rows: bool = False, overwrite: bool = False,
                  chunk_tokens: int = FILE_CHUNK_TOKENS) -> HashFileReport:
    """Hash a .npy of token ids into an .npz with one array `layer_<id>` per layer.

    The output is streamed piece by piece into the archive (written beside the
    target, then renamed), so memory stays at one piece however large the file.
    """
    from .report import progress

    ids_path, output = Path(ids_path), Path(output)
    check_output_file(output, overwrite)
    ids = _load_ids(ids_path)
    _check_rank(ids.shape)
    projection.check_ids(ids)
    hasher = NgramHasher(spec, projection)
    layer_ids = hasher._layer_ids(layers)
    batch = ids.reshape(1, -1) if ids.ndim == 1 else ids
    n_rows, length = batch.shape
    context = spec.max_ngram_size - 1
    pieces = list(_pieces(n_rows, length, max(1, chunk_tokens)))
    tmp = output.with_name(f".{output.name}.{secrets.token_hex(6)}.tmp")  # mode from the umask
    summary = []
    _kernel()  # compiling or loading it is not hashing time
    start = time.perf_counter()
    try:
        with zipfile.ZipFile(tmp, "x", zipfile.ZIP_STORED, allowZip64=True) as archive, \
                progress() as bar:
            task = bar.add_task("hashing", total=len(pieces) * len(layer_ids))
            for layer_id in layer_ids:
                shape = ids.shape + (hasher.head_sizes(layer_id).size,)
                low, high = None, None
                with archive.open(f"layer_{layer_id}.npy", "w", force_zip64=True) as entry:
                    np.lib.format.write_array_header_2_0(
                        entry, {"descr": "<i8", "fortran_order": False, "shape": shape})
                    for b0, b1, t0, t1 in pieces:
                        first = max(0, t0 - context)
                        piece = np.asarray(batch[b0:b1, first:t1])
                        out = (hasher.rows if rows else hasher.hash)(piece, layers=[layer_id])[layer_id]
                        out = np.ascontiguousarray(out[:, t0 - first:])
                        if out.size:
                            low = int(out.min()) if low is None else min(low, int(out.min()))
                            high = int(out.max()) if high is None else max(high, int(out.max()))
                            entry.write(memoryview(out.astype("<i8", copy=False)).cast("B"))
                        bar.advance(task)
                summary.append({"layer_id": layer_id, "key": f"layer_{layer_id}", "shape": list(shape),
                                "min": low, "max": high})
        os.replace(tmp, output)
    except OSError as exc:
        raise EngramError(f"cannot write {output}: {exc.strerror or exc}") from None
    finally:
        Path(tmp).unlink(missing_ok=True)
    return HashFileReport(input=str(ids_path), output=str(output), shape=list(ids.shape),
                          dtype=str(ids.dtype), rows=rows, layers=summary,
                          seconds=time.perf_counter() - start)


def run_hash(text: str | None, *, spec: str | Path = "demo", projection: str | Path | None = None,
             ids: str | Path | None = None, output: str | Path | None = None,
             layers: Iterable[int] | None = None, rows: bool = False, special_tokens: bool = True,
             overwrite: bool = False) -> HashTextReport | HashFileReport:
    """The whole `engram hash` job: TEXT shows its n-grams; --ids FILE.npy -o OUT.npz writes arrays."""
    if (text is None) == (ids is None):
        raise EngramError("give either TEXT to tokenize or --ids FILE.npy, not both" if text is not None
                          else "give TEXT to tokenize, or --ids FILE.npy with -o OUT.npz")
    if ids is not None and output is None:
        raise EngramError("--ids needs -o OUT.npz, the archive to write one array per layer into")
    if text is not None and output is not None:
        raise EngramError("-o is for --ids; TEXT is shown, not written (use --json for scripts)")
    table_spec = load_spec(spec)
    vocab = resolve_projection(projection)
    layers = None if not layers else list(layers)
    if ids is not None:
        return hash_ids_file(ids, output, table_spec, vocab, layers=layers, rows=rows,
                             overwrite=overwrite)
    return hash_text(text, table_spec, vocab, layers=layers, rows=rows, special_tokens=special_tokens)
