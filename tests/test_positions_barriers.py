"""Sequence positions and barrier tokens in hashing, against the engines' rule written out here.

The rule: for token t and shift s, the id at t-s is the projected pad when position[t] - s < 0,
or when any of the tokens t, t-1, ..., t-s is a barrier; then the usual multiply-XOR mix and
modulo. The brute force below follows it token by token, blocking cumulatively.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from engram_cli import EngramError, NgramHasher
from engram_cli.collisions import collision_statistics
from engram_cli.collisions.counting import map_order
from engram_cli.collisions.keys import WindowKeys, mix_keys
from engram_cli.corpus.base import DocBatch
from engram_cli.hash_jobs import hash_ids_file
from engram_cli.hashing import _as_tensor
from engram_cli.spec import TableSpec, load_spec
from engram_cli.vocab import VocabProjection
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from conftest import engram_json, run_engram
from test_hashing import brute_force, draw_multipliers, projections, specs, wrap64


def gated_brute_force(ids, spec: TableSpec, lookup: np.ndarray, positions, blocked, with_offsets=False) -> dict:
    """Python ints, one token, order and head at a time, each shift checked against the rule."""
    ids = np.asarray(ids)
    batch = ids.reshape(1, -1) if ids.ndim == 1 else ids
    pos = np.asarray(positions).reshape(batch.shape)
    bar = np.asarray(blocked).reshape(batch.shape)
    compressed = int(lookup.max()) + 1
    pad = int(lookup[spec.pad_id])
    result = {}
    for layer in spec.layer_ids:
        mults = draw_multipliers(spec.seed, layer, compressed, spec.max_ngram_size)
        primes = spec.head_sizes(layer)
        offsets = spec.offsets(layer) if with_offsets else [0] * len(primes)
        out = np.zeros(batch.shape + (len(primes),), dtype=np.int64)
        for b in range(batch.shape[0]):
            for t in range(batch.shape[1]):
                for n in spec.orders:
                    mix = 0
                    stopped = False
                    for s in range(n):
                        stopped = stopped or bool(bar[b, t - s]) if t - s >= 0 else stopped
                        if int(pos[b, t]) - s < 0 or stopped:
                            token = pad
                        else:
                            v = int(batch[b, t - s])
                            token = int(lookup[v]) if v >= 0 else v
                        mix ^= wrap64(token * mults[s])
                    for j in range(spec.n_head_per_ngram):
                        h = (n - 2) * spec.n_head_per_ngram + j
                        out[b, t, h] = mix % primes[h] + offsets[h]
        result[layer] = out[0] if ids.ndim == 1 else out
    return result


def packed_positions(rng: np.random.Generator, shape: tuple[int, ...], mean_length: float) -> np.ndarray:
    """Several sequences per row: 0 at each start (always at the row's start), +1 within."""
    rows = (1, shape[0]) if len(shape) == 1 else shape
    starts = rng.random(rows) < 1 / mean_length
    starts[:, :1] = True
    positions = np.zeros(rows, np.int64)
    for b in range(rows[0]):
        for t in range(1, rows[1]):
            positions[b, t] = 0 if starts[b, t] else positions[b, t - 1] + 1
    return positions.reshape(shape)


@st.composite
def gated_cases(draw):
    projection = draw(projections())
    spec = draw(specs(projection.vocab_size))
    rng = np.random.default_rng(draw(st.integers(0, 2**32)))
    shape = draw(
        st.one_of(
            st.tuples(st.integers(0, 30)),
            st.tuples(st.integers(0, 3), st.integers(0, 30)),
            st.tuples(st.integers(1, 2), st.integers(500, 1100)),  # across kernel blocks
        )
    )
    low = draw(st.sampled_from([0, -3]))  # negative ids pass the projection (and are never barriers)
    ids = rng.integers(low, projection.vocab_size, size=shape)
    positions = packed_positions(rng, shape, draw(st.sampled_from([2.0, 7.0, 1e9])))
    barrier_rate = draw(st.sampled_from([0.0, 0.05, 0.3]))
    mask = rng.random(shape) < barrier_rate
    barrier_ids = sorted(set(rng.integers(0, projection.vocab_size, size=draw(st.integers(0, 3))).tolist()))
    return spec, projection, ids, positions, mask, barrier_ids


def id_mask(ids: np.ndarray, barrier_ids: list[int]) -> np.ndarray:
    return np.isin(ids, barrier_ids) & (ids >= 0)


@settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(gated_cases())
def test_kernel_matches_the_rule_with_positions_and_barriers(case):
    spec, projection, ids, positions, mask, barrier_ids = case
    hasher = NgramHasher(spec, projection)
    by_mask = hasher.hash(ids, positions=positions, barrier=mask)
    by_ids = hasher.rows(ids, positions=positions, barrier_ids=barrier_ids)
    expected_mask = gated_brute_force(ids, spec, projection.lookup, positions, mask)
    expected_ids = gated_brute_force(ids, spec, projection.lookup, positions, id_mask(ids, barrier_ids), True)
    for layer in spec.layer_ids:
        np.testing.assert_array_equal(by_mask[layer], expected_mask[layer])
        np.testing.assert_array_equal(by_ids[layer], expected_ids[layer])


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(gated_cases())
def test_torch_ops_path_matches_the_rule(case):
    """The plain-torch path that accelerator tensors take, run here on CPU tensors."""
    spec, projection, ids, positions, mask, barrier_ids = case
    hasher = NgramHasher(spec, projection)
    tensor = torch.from_numpy(ids)
    got = hasher._run_torch(
        tensor,
        list(spec.layer_ids),
        True,
        None,
        positions=torch.from_numpy(positions),
        barrier=torch.from_numpy(mask),
        barrier_vocab=hasher.barrier_vocab(barrier_ids),
    )
    expected = gated_brute_force(ids, spec, projection.lookup, positions, mask | id_mask(ids, barrier_ids), True)
    for layer in spec.layer_ids:
        np.testing.assert_array_equal(got[layer].numpy(), expected[layer])
    plain = hasher._run_torch(tensor, list(spec.layer_ids), False, None)
    for layer, values in hasher.hash(ids).items():
        np.testing.assert_array_equal(plain[layer].numpy(), values)


@pytest.fixture(scope="module")
def small():
    spec = TableSpec(
        layer_ids=(1, 3),
        max_ngram_size=4,
        n_head_per_ngram=2,
        engram_vocab_size=(50_000, 50_000, 60_000),
        n_embed_per_ngram=16,
        pad_id=2,
    )
    rng = np.random.default_rng(5)
    return spec, VocabProjection(lookup=rng.integers(0, 700, size=1000))


def test_defaults_are_todays_hashing(small):
    """Positions counting from 0 per row and no barriers are exactly the ungated hasher."""
    spec, projection = small
    hasher = NgramHasher(spec, projection)
    ids = np.random.default_rng(0).integers(0, 1000, size=(3, 1500))
    plain = brute_force(ids, spec, projection.lookup)
    for got in (
        hasher.hash(ids),
        hasher.hash(ids, positions=np.tile(np.arange(1500), (3, 1))),
        hasher.hash(ids, barrier=np.zeros(ids.shape, bool)),
        hasher.hash(ids, barrier_ids=[]),
        hasher.hash(ids, barrier_ids=[999]) if 999 not in ids else hasher.hash(ids),
    ):
        for layer in spec.layer_ids:
            np.testing.assert_array_equal(got[layer], plain[layer])


def test_packed_sequences_hash_as_if_alone(small):
    """Two sequences packed in one row hash like each in a row of its own; a barrier token's
    n-grams are all pad, and the n-grams after it start afresh."""
    spec, projection = small
    hasher = NgramHasher(spec, projection)
    rng = np.random.default_rng(1)
    a, b = rng.integers(0, 1000, size=40), rng.integers(0, 1000, size=25)
    packed = hasher.hash(np.concatenate([a, b]), positions=np.concatenate([np.arange(40), np.arange(25)]))
    alone_a, alone_b = hasher.hash(a), hasher.hash(b)
    for layer in spec.layer_ids:
        np.testing.assert_array_equal(packed[layer][:40], alone_a[layer])
        np.testing.assert_array_equal(packed[layer][40:], alone_b[layer])
    mask = np.zeros(40, bool)
    mask[10] = True
    split = hasher.hash(a, barrier=mask)
    all_pad = hasher.hash(np.full(1, spec.pad_id))
    after = hasher.hash(a[11:])
    for layer in spec.layer_ids:
        np.testing.assert_array_equal(split[layer][:10], alone_a[layer][:10])
        np.testing.assert_array_equal(split[layer][10], all_pad[layer][0])
        np.testing.assert_array_equal(split[layer][11:], after[layer])


def test_numpy_and_torch_in_and_out_with_buffers(small):
    spec, projection = small
    hasher = NgramHasher(spec, projection)
    rng = np.random.default_rng(2)
    ids = rng.integers(0, 1000, size=(2, 900))
    positions = packed_positions(rng, ids.shape, 50)
    mask = rng.random(ids.shape) < 0.05
    expected = hasher.rows(ids, positions=positions, barrier=mask)
    tensors = hasher.rows(
        torch.from_numpy(ids).int(), positions=torch.from_numpy(positions), barrier=torch.from_numpy(mask)
    )
    buffers = {layer: np.empty(ids.shape + (6,), np.int64) for layer in spec.layer_ids}
    filled = hasher.rows(ids, positions=positions.astype(np.int32), barrier=mask, out=buffers)
    read_only = {"positions": positions.copy(), "barrier": mask.copy()}  # as np.load(mmap_mode="r") gives
    for array in read_only.values():
        array.flags.writeable = False
    mapped = hasher.rows(ids, **read_only)
    for layer in spec.layer_ids:
        assert isinstance(tensors[layer], torch.Tensor)
        np.testing.assert_array_equal(tensors[layer].numpy(), expected[layer])
        assert filled[layer] is buffers[layer]
        np.testing.assert_array_equal(buffers[layer], expected[layer])
        np.testing.assert_array_equal(mapped[layer], expected[layer])


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs an accelerator (run on a GPU machine)")
def test_accelerator_tensors_in_and_out(small):
    """CUDA ids, positions and mask (or barrier ids) hash on the device to the kernel's numbers."""
    spec, projection = small
    hasher = NgramHasher(spec, projection)
    rng = np.random.default_rng(3)
    ids = rng.integers(0, 1000, size=(3, 700))
    positions = packed_positions(rng, ids.shape, 30)
    mask = rng.random(ids.shape) < 0.05
    expected = hasher.rows(ids, positions=positions, barrier=mask)
    got = hasher.rows(
        torch.from_numpy(ids).cuda(),
        positions=torch.from_numpy(positions).cuda(),
        barrier=torch.from_numpy(mask).cuda(),
    )
    by_ids = hasher.hash(torch.from_numpy(ids).cuda(), positions=positions, barrier_ids=[5, 9])
    for layer in spec.layer_ids:
        assert got[layer].device.type == "cuda"
        np.testing.assert_array_equal(got[layer].cpu().numpy(), expected[layer])
        np.testing.assert_array_equal(
            by_ids[layer].cpu().numpy(), hasher.hash(ids, positions=positions, barrier_ids=[5, 9])[layer]
        )


def test_bad_positions_and_barriers_are_one_line_errors(small):
    spec, projection = small
    hasher = NgramHasher(spec, projection)
    ids = np.zeros((2, 600), np.int64)
    positions = np.tile(np.arange(600), (2, 1))
    positions[1, 517] = 3
    positions[1, 530] = 9
    with pytest.raises(EngramError, match=r"positions\[1, 517\] = 3 neither starts a sequence \(0\) nor follows"):
        hasher.hash(ids, positions=positions)
    with pytest.raises(EngramError, match=r"positions\[1, 517\] = 3"):
        hasher._run_torch(torch.from_numpy(ids), [1], False, None, positions=torch.from_numpy(positions))
    with pytest.raises(EngramError, match=r"positions\[517\] = 3"):
        hasher.hash(ids[1], positions=positions[1])
    with pytest.raises(EngramError, match=r"positions\[0\] = 1 does not start a sequence"):
        hasher.hash(ids[0, :5], positions=np.arange(1, 6))
    for kwargs, message in [
        ({"positions": np.arange(5)}, "must have the token ids' shape"),
        ({"positions": np.zeros((2, 600))}, "positions must be integers"),
        ({"barrier": np.zeros((2, 600), np.int8)}, "boolean mask"),
        ({"barrier": np.zeros((2, 600), bool), "barrier_ids": [1]}, "not both"),
        ({"barrier_ids": [1000]}, "barrier id 1000 is not a token id below the vocab size 1000"),
        ({"barrier_ids": [-1]}, "barrier id -1"),
    ]:
        with pytest.raises(EngramError, match=message):
            hasher.hash(ids, **kwargs)
    # what tensors beside accelerator ids go through before the torch path
    assert torch.equal(_as_tensor(positions, "positions", ids.shape, "cpu"), torch.from_numpy(positions))
    for value, name, message in [
        (np.arange(5), "positions", "must have the token ids' shape"),
        (torch.zeros(2, 600), "positions", "positions must be integers"),
        (torch.zeros(2, 600, dtype=torch.int8), "barrier", "boolean mask"),
        (torch.zeros(2, 5, dtype=torch.bool), "barrier", "must have the token ids' shape"),
    ]:
        with pytest.raises(EngramError, match=message):
            _as_tensor(value, name, ids.shape, "cpu")


@pytest.mark.parametrize("shape,chunk", [((3, 50), 16), ((40,), 7), ((2, 0), 4)])
def test_ids_file_with_positions_streams_in_pieces(tmp_path, small, shape, chunk):
    spec, projection = small
    rng = np.random.default_rng(4)
    ids = rng.integers(0, 1000, size=shape).astype(np.int32)
    ids[ids % 9 == 0] = 7  # a barrier id, often
    positions = packed_positions(rng, shape, 6)
    np.save(tmp_path / "ids.npy", ids)
    np.save(tmp_path / "pos.npy", positions)
    out = tmp_path / "out.npz"
    hash_ids_file(
        tmp_path / "ids.npy", out, spec, projection, positions=tmp_path / "pos.npy", barrier_ids=[7], chunk_tokens=chunk
    )
    expected = gated_brute_force(ids, spec, projection.lookup, positions, ids == 7)
    with np.load(out) as archive:
        for layer in spec.layer_ids:
            np.testing.assert_array_equal(archive[f"layer_{layer}"], expected[layer])


def test_cli_hash_ids_with_positions_and_barrier_ids(tmp_path):
    spec = load_spec("demo")
    hasher = NgramHasher(spec)
    rng = np.random.default_rng(6)
    ids = rng.integers(0, hasher.projection.vocab_size, size=(2, 300))
    ids[:, ::17] = 128_001
    positions = packed_positions(rng, ids.shape, 40)
    np.save(tmp_path / "ids.npy", ids)
    np.save(tmp_path / "pos.npy", positions)
    out = tmp_path / "h.npz"
    args = ("--ids", str(tmp_path / "ids.npy"), "--positions", str(tmp_path / "pos.npy"), "-o", str(out))
    engram_json("hash", *args, "--barrier-id", "128001", "--barrier-id", "5")
    expected = hasher.hash(ids, positions=positions, barrier_ids=[128_001, 5])
    with np.load(out) as archive:
        for layer in spec.layer_ids:
            np.testing.assert_array_equal(archive[f"layer_{layer}"], expected[layer])
    positions[1, 100] = 7
    np.save(tmp_path / "pos.npy", positions)
    proc = run_engram("hash", *args, "--overwrite")
    assert proc.returncode == 1 and proc.stderr.count("\n") == 1
    assert "positions[1, 100] = 7 neither starts a sequence" in proc.stderr
    np.save(tmp_path / "short.npy", positions[:, :10])
    proc = run_engram(
        "hash",
        "--ids",
        str(tmp_path / "ids.npy"),
        "--positions",
        str(tmp_path / "short.npy"),
        "-o",
        str(out),
        "--overwrite",
    )
    assert proc.returncode == 1 and "shape" in proc.stderr
    proc = run_engram("hash", "hello", "--positions", str(tmp_path / "pos.npy"))
    assert proc.returncode == 1 and "--positions" in proc.stderr


def test_cli_hash_text_with_a_barrier_id():
    """A barrier's own n-grams are all pad, and the next token's n-grams start afresh."""
    spec = load_spec("demo")
    hasher = NgramHasher(spec)
    tokenizer = hasher.projection.tokenizer()
    text = "one two three four five"
    ids = tokenizer.encode(text).ids
    barrier = ids[3]
    data = engram_json("hash", text, "--barrier-id", str(barrier))
    got_ids = [t["id"] for t in data["tokens"]]
    assert got_ids == ids
    expected = hasher.hash(np.array(ids), barrier_ids=[barrier])
    pad = spec.pad_id
    for t, token in enumerate(data["tokens"]):
        reach = -1 if ids[t] == barrier else min(t, t - 1 - max((k for k in range(t) if ids[k] == barrier), default=-1))
        for ngram in token["ngrams"]:
            n = ngram["n"]
            real = max(0, min(n, reach + 1))
            assert ngram["pads"] == n - real
            assert ngram["ids"] == [pad] * (n - real) + ids[t - real + 1 : t + 1]
            heads = slice((n - 2) * 4, (n - 1) * 4)
            assert ngram["buckets"]["1"] == expected[1][t, heads].tolist()


# inspect: the collision keys must be the windows the hasher hashes ---------------------------------


WIDE = TableSpec(
    layer_ids=(2,), max_ngram_size=5, n_head_per_ngram=1, engram_vocab_size=(70_000,) * 4, n_embed_per_ngram=4, pad_id=3
)


@pytest.mark.parametrize("wide", [False, True], ids=["one-word keys", "two-word keys"])
def test_window_keys_with_barriers_are_the_hashers_windows(small, wide):
    """Every packed key, mixed as the statistics mix it, is the pre-modulo mix the rule gives that
    token; a batch that continues a document carries a barrier in its left context like the hasher."""
    spec, projection = (WIDE, VocabProjection(np.arange(1 << 17)[::-1].copy())) if wide else small
    rng = np.random.default_rng(7)
    ids = rng.integers(0, 1000, size=400)
    ids[rng.random(400) < 0.1] = 11
    ids[134:140] = [5, 11, 7, 8, 9, 10]  # a barrier in the context the second batch carries
    starts = np.union1d([0, 300], np.flatnonzero(rng.random(400) < 0.03))
    starts = starts[starts != 137]
    positions = np.zeros(400, np.int64)
    for t in range(1, 400):
        positions[t] = 0 if t in starts else positions[t - 1] + 1
    window = WindowKeys.of(spec, projection, barrier_ids=[11])
    hasher = NgramHasher(spec, projection)
    batches = [
        DocBatch(ids[:137], starts[starts < 137]),
        DocBatch(ids[137:], starts[starts >= 137] - 137, context=ids[137 - spec.max_ngram_size + 1 : 137]),
    ]
    pad = int(projection.lookup[spec.pad_id])
    for layer in spec.layer_ids:
        mults = [int(m) for m in hasher.multipliers(layer)]
        for n in spec.orders:
            layout = window.layout(n)
            assert layout.words == (2 if wide and n >= 4 else 1)
            seen: dict[int, int] = {}
            for batch in batches:
                counts = map_order(batch, window, n)
                mixes = np.empty(counts.rows, np.int64)
                mix_keys(counts.keys, n, layout.bits, layout.per_word, layout.mask, np.array(mults[:n]), mixes)
                for mix, count in zip(mixes.tolist(), counts.counts.tolist()):
                    seen[mix] = seen.get(mix, 0) + count
            want: dict[int, int] = {}
            for t in range(400):
                mix, stopped = 0, False
                for s in range(n):
                    stopped = stopped or (t - s >= 0 and ids[t - s] == 11)
                    token = pad if positions[t] - s < 0 or stopped else int(projection.lookup[ids[t - s]])
                    mix ^= wrap64(token * mults[s])
                want[mix] = want.get(mix, 0) + 1
            assert seen == want
    expected = gated_brute_force(ids, spec, projection.lookup, positions, ids == 11)
    got = hasher.hash(ids, positions=positions, barrier_ids=[11])
    for layer in spec.layer_ids:
        np.testing.assert_array_equal(got[layer], expected[layer])


def test_inspect_counts_ngrams_the_way_the_hasher_does(tmp_path):
    """`engram inspect --barrier-id` on a .npy corpus (a document per row): every head's used
    buckets are exactly the distinct buckets the hasher gives with that barrier."""
    spec = load_spec("demo")
    hasher = NgramHasher(spec)
    rng = np.random.default_rng(9)
    docs = rng.integers(0, 400, size=(6, 200))
    docs[rng.random(docs.shape) < 0.08] = 128_000
    np.save(tmp_path / "docs.npy", docs)
    results = {}
    for barrier in ([], [128_000]):
        flags = [arg for b in barrier for arg in ("--barrier-id", str(b))]
        data = engram_json("inspect", "demo", "--corpus", str(tmp_path / "docs.npy"), *flags)
        assert data["barrier_ids"] == barrier
        rows = hasher.hash(docs, barrier_ids=barrier)
        for layer in spec.layer_ids:
            for n in spec.orders:
                stats = data["layers"][str(layer)]["orders"][str(n)]
                heads = rows[layer][:, :, (n - 2) * 4 : (n - 1) * 4].reshape(-1, 4)
                assert stats["occurrences"] == docs.size
                assert [h["buckets_used"] for h in stats["heads"]] == [len(set(h)) for h in heads.T.tolist()]
                assert stats["all_heads_colliding"] == 0
                assert stats["distinct"] == len({tuple(r) for r in heads.tolist()})
        results[bool(barrier)] = data["layers"]["1"]["orders"]["3"]["distinct"]
    assert results[True] != results[False]
    layers, _, _ = collision_statistics(
        spec, hasher.projection, [DocBatch(docs.reshape(-1), np.arange(0, docs.size, 200))], barrier_ids=[128_000]
    )
    assert layers[1][3].distinct == results[True]
    proc = run_engram("inspect", "demo", "--corpus", str(tmp_path / "docs.npy"), "--barrier-id", "10000000")
    assert proc.returncode == 1 and "barrier id 10000000 is not a token id" in proc.stderr
