"""N-gram hashing against a brute-force reference written here from the published facts."""

from __future__ import annotations

import json
import multiprocessing
import zipfile
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
import torch
from engram_cli import EngramError, NgramHasher
from engram_cli.hash_jobs import hash_ids_file
from engram_cli.hashing import PARALLEL_MIN_TOKENS
from engram_cli.kernels import FLOAT_REDUCTION_MIN_PRIME
from engram_cli.spec import TableSpec, load_spec
from engram_cli.vocab import VocabProjection, compress_vocab, default_projection
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from conftest import ROOT, engram_json, make_byte_level_tokenizer, run_engram

INT64_MAX = (1 << 63) - 1
SENTENCE = "Only Alexander the Great could tame the horse Bucephalus."


def wrap64(value: int) -> int:
    value &= (1 << 64) - 1
    return value - (1 << 64) if value >= 1 << 63 else value


def draw_multipliers(seed: int, layer_id: int, compressed_size: int, max_ngram: int) -> list[int]:
    """The reference's draw, as the issue states it."""
    rng = np.random.default_rng(seed + 10007 * layer_id)
    bound = max(1, (INT64_MAX // compressed_size) // 2)
    return [2 * int(r) + 1 for r in rng.integers(0, bound, size=max_ngram, dtype=np.int64)]


def brute_force(ids, spec: TableSpec, lookup: np.ndarray, with_offsets: bool = False) -> dict:
    """Python ints, one position, order and head at a time; int64 wrap made explicit."""
    ids = np.asarray(ids)
    batch = ids.reshape(1, -1) if ids.ndim == 1 else ids
    compressed = int(lookup.max()) + 1
    pad = int(lookup[spec.pad_id])
    proj = [[int(lookup[v]) if v >= 0 else int(v) for v in row.tolist()] for row in batch]
    result = {}
    for layer in spec.layer_ids:
        mults = draw_multipliers(spec.seed, layer, compressed, spec.max_ngram_size)
        primes = spec.head_sizes(layer)
        offsets = spec.offsets(layer) if with_offsets else [0] * len(primes)
        out = np.zeros(batch.shape + (len(primes),), dtype=np.int64)
        for b, row in enumerate(proj):
            for t in range(len(row)):
                for n in spec.orders:
                    mix = 0
                    for k in range(n):
                        token = row[t - k] if t - k >= 0 else pad
                        mix ^= wrap64(token * mults[k])
                    for j in range(spec.n_head_per_ngram):
                        h = (n - 2) * spec.n_head_per_ngram + j
                        out[b, t, h] = mix % primes[h] + offsets[h]
        result[layer] = out[0] if ids.ndim == 1 else out
    return result


HEAD_SIZES = st.one_of(
    st.integers(1, 60),  # toy primes: the exact `%` path
    st.integers(FLOAT_REDUCTION_MIN_PRIME - 40, FLOAT_REDUCTION_MIN_PRIME + 40),  # both sides of it
    st.integers(50_000, 700_000),
    st.integers(2**31 - 300, 2**31 + 300),  # near 2**31
    st.integers(2**45, 2**45 + 300),
)


@st.composite
def specs(draw, max_vocab: int) -> TableSpec:
    max_ngram = draw(st.integers(2, 5))
    heads = draw(st.integers(1, 4))
    return TableSpec(
        layer_ids=tuple(draw(st.lists(st.integers(0, 5000), min_size=1, max_size=3, unique=True))),
        max_ngram_size=max_ngram,
        n_head_per_ngram=heads,
        engram_vocab_size=tuple(draw(HEAD_SIZES) for _ in range(max_ngram - 1)),
        n_embed_per_ngram=heads * 4,
        pad_id=draw(st.integers(0, max_vocab - 1)),
        seed=draw(st.integers(0, 2**32)),
    )


@st.composite
def projections(draw) -> VocabProjection:
    vocab = draw(st.integers(1, 400))
    compressed = draw(st.integers(1, vocab))
    rng = np.random.default_rng(draw(st.integers(0, 2**32)))
    lookup = rng.integers(0, compressed, size=vocab)
    lookup[rng.integers(vocab)] = compressed - 1
    return VocabProjection(lookup=lookup, metadata={})


DTYPES = [np.int16, np.int32, np.int64, np.uint8, np.uint16, np.uint32, np.uint64]


@st.composite
def token_ids(draw, vocab: int) -> np.ndarray:
    dtype = np.dtype(draw(st.sampled_from(DTYPES)))
    info = np.iinfo(dtype)
    valid = st.integers(0, min(vocab - 1, int(info.max)))
    elements = st.one_of(valid, st.integers(int(info.min), -1)) if info.min < 0 else valid
    shape = draw(
        st.one_of(
            st.tuples(st.integers(0, 12)),
            st.tuples(st.integers(0, 3), st.integers(0, 12)),
            st.tuples(st.integers(1, 2), st.integers(500, 1100)),
        )
    )  # across blocks
    return draw(arrays(dtype, shape, elements=elements))


@st.composite
def cases(draw):
    projection = draw(projections())
    spec = draw(specs(projection.vocab_size))
    return spec, projection, draw(token_ids(projection.vocab_size))


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(cases())
def test_hash_and_rows_match_brute_force(case):
    spec, projection, ids = case
    hasher = NgramHasher(spec, projection)
    buckets, rows = hasher.hash(ids), hasher.rows(ids)
    expected = brute_force(ids, spec, projection.lookup)
    with_offsets = brute_force(ids, spec, projection.lookup, with_offsets=True)
    assert list(buckets) == list(spec.layer_ids)
    for layer in spec.layer_ids:
        assert buckets[layer].dtype == np.int64
        assert buckets[layer].shape == ids.shape + (spec.heads_per_layer,)
        np.testing.assert_array_equal(buckets[layer], expected[layer])
        np.testing.assert_array_equal(rows[layer], with_offsets[layer])


@settings(max_examples=40, deadline=None)
@given(size=HEAD_SIZES, seed=st.integers(0, 2**32), extra=st.lists(st.integers(-(2**63), 2**63 - 1), max_size=20))
def test_reduction_is_floor_mod_for_any_mix(size, seed, extra):
    """Drive the mix to any int64: a negative id passes the projection unchanged, and an odd
    multiplier is invertible mod 2**64. Multiples of the prime and their neighbours are where
    a quotient off by one or two would show."""
    spec = TableSpec(
        layer_ids=(0,),
        max_ngram_size=2,
        n_head_per_ngram=2,
        engram_vocab_size=(size,),
        n_embed_per_ngram=2,
        pad_id=0,
        seed=seed % 1000,
    )
    projection = VocabProjection(lookup=np.array([0, 5, 7]), metadata={})  # pad projects to 0
    hasher = NgramHasher(spec, projection)
    inverse = pow(int(hasher.multipliers(0)[0]), -1, 1 << 64)
    primes = spec.head_sizes(0)
    rng = np.random.default_rng(seed)
    targets = [int(v) for v in rng.integers(-(2**63), 2**63 - 1, size=3000, dtype=np.int64)]
    mixes = {wrap64(v) for v in extra + [-(2**63), 2**63 - 1, -1, 0, 1]}
    mixes |= {wrap64(v // primes[0] * primes[0] + near) for v in targets for near in (-2, -1, 0, 1, 2)}
    tokens = {wrap64(mix * inverse): mix for mix in mixes}
    usable = {token: mix for token, mix in tokens.items() if token < 0}
    got = hasher.hash(np.array(list(usable), dtype=np.int64)[:, None])[0][:, 0]  # one token per row
    expected = np.array([[mix % p for p in primes] for mix in usable.values()])
    np.testing.assert_array_equal(got, expected)


def test_published_multipliers_and_demo_v1_head_sizes():
    spec = load_spec("engram-demo-v1")
    projection = default_projection()
    hasher = NgramHasher(spec, projection)
    assert projection.compressed_size == 98_627
    assert hasher.multipliers(1).tolist() == [76993395940407, 4862694818241, 36129212583461]
    for layer in spec.layer_ids:
        sizes = hasher.head_sizes(layer).tolist()
        assert sizes == spec.head_sizes(layer) and len(sizes) == 16 and min(sizes) > 646_400
        assert hasher.offsets(layer).tolist() == [sum(sizes[:i]) for i in range(16)]


def test_published_vector_by_hand():
    """Layer 1 of engram-demo-v1 on the sentence, from the published multipliers alone."""
    spec = load_spec("engram-demo-v1")
    projection = default_projection()
    ids = projection.tokenizer().encode(SENTENCE, add_special_tokens=False).ids
    m = [76993395940407, 4862694818241, 36129212583461]
    x = [int(projection.lookup[i]) for i in ids]
    pad = int(projection.lookup[spec.pad_id])
    primes = spec.head_sizes(1)
    got = NgramHasher(spec, projection).hash(np.array(ids, dtype=np.int32))[1]
    for t in range(len(x)):
        prev = x[t - 1] if t >= 1 else pad
        prev2 = x[t - 2] if t >= 2 else pad
        bigram = (x[t] * m[0]) ^ (prev * m[1])
        trigram = bigram ^ (prev2 * m[2])
        assert got[t].tolist() == [bigram % p for p in primes[:8]] + [trigram % p for p in primes[8:]]


@settings(max_examples=300, deadline=None)
@given(
    st.one_of(
        st.integers(1, 2**63 - 1),
        st.sampled_from(
            [
                1,
                2,
                3,
                98_627,
                129_280,
                2**31,
                2**62,
                2**62 + 1,
                INT64_MAX // 2,
                INT64_MAX // 2 + 1,
                INT64_MAX // 3,
                INT64_MAX - 1,
                INT64_MAX,
            ]
        ),
    )
)
def test_id_times_multiplier_never_overflows(compressed):
    """bound = max(1, (MAX // C) // 2) gives multipliers <= 2*bound - 1 <= MAX // C - 1 (or 1 when
    the bound is clamped), so (C - 1) * multiplier < C * (MAX // C) <= MAX for every C."""
    bound = max(1, (INT64_MAX // compressed) // 2)
    largest = 2 * (bound - 1) + 1
    assert (compressed - 1) * largest <= INT64_MAX
    spec = TableSpec(
        layer_ids=(7,), max_ngram_size=5, n_head_per_ngram=1, engram_vocab_size=(3,) * 4, n_embed_per_ngram=1, pad_id=0
    )
    drawn = spec.multipliers(7, compressed)
    assert all(int(v) % 2 == 1 and 0 < int(v) <= largest for v in drawn)
    assert all((compressed - 1) * int(v) <= INT64_MAX for v in drawn)


def test_largest_ids_hash_without_wrapping():
    """Every id at the top of the compressed vocab: the exact (unbounded) arithmetic agrees."""
    compressed = 7
    lookup = np.arange(20) % compressed
    spec = TableSpec(
        layer_ids=(2, 4000),
        max_ngram_size=5,
        n_head_per_ngram=2,
        engram_vocab_size=(2**31,) * 4,
        n_embed_per_ngram=2,
        pad_id=6,
    )
    hasher = NgramHasher(spec, VocabProjection(lookup=lookup, metadata={}))
    ids = np.full((2, 9), 6)
    for layer, got in hasher.hash(ids).items():
        m = [int(v) for v in hasher.multipliers(layer)]
        for n in spec.orders:
            products = [6 * m[k] for k in range(n)]
            assert max(products) <= INT64_MAX
            mix = 0
            for p in products:
                mix ^= p
            for j, prime in enumerate(spec.head_sizes(layer)[(n - 2) * 2 : (n - 1) * 2]):
                assert (got[:, :, (n - 2) * 2 + j] == mix % prime).all()


@pytest.fixture(scope="module")
def small():
    spec = TableSpec(
        layer_ids=(1, 3),
        max_ngram_size=3,
        n_head_per_ngram=4,
        engram_vocab_size=(50_000, 50_000),
        n_embed_per_ngram=16,
        pad_id=2,
    )
    rng = np.random.default_rng(5)
    lookup = rng.integers(0, 700, size=1000)
    return spec, VocabProjection(lookup=lookup, metadata={})


def test_shapes_and_edge_sizes(small):
    spec, projection = small
    hasher = NgramHasher(spec, projection)
    for shape in [(0,), (1,), (2,), (0, 5), (3, 0), (1, 1), (4, 2), (2, 1500)]:
        ids = np.random.default_rng(len(shape)).integers(0, 1000, size=shape)
        got = hasher.hash(ids)
        expected = brute_force(ids, spec, projection.lookup)
        for layer in spec.layer_ids:
            assert got[layer].shape == shape + (8,)
            np.testing.assert_array_equal(got[layer], expected[layer])


def test_sequences_never_mix_across_rows_and_slices_work(small):
    """The batch runs on all threads, each row alone on the calling thread: both must agree."""
    spec, projection = small
    hasher = NgramHasher(spec, projection)
    ids = np.random.default_rng(1).integers(0, 1000, size=(4, 9000))
    assert ids.size >= PARALLEL_MIN_TOKENS > ids.shape[1]
    batch = hasher.hash(ids)
    for layer, got in brute_force(ids[2:3], spec, projection.lookup).items():
        np.testing.assert_array_equal(batch[layer][2:3], got)
    strided = hasher.hash(ids[:, ::2])
    for b in range(4):
        alone = hasher.hash(ids[b])
        again = hasher.hash(ids[b, ::2].copy())
        for layer in spec.layer_ids:
            np.testing.assert_array_equal(batch[layer][b], alone[layer])
            np.testing.assert_array_equal(strided[layer][b], again[layer])


def test_layers_subset_and_list_input(small):
    spec, projection = small
    hasher = NgramHasher(spec, projection)
    ids = [[5, 6, 7], [8, 9, 10]]
    assert list(hasher.hash(ids, layers=[3])) == [3]
    np.testing.assert_array_equal(hasher.hash(ids, layers=[3])[3], hasher.hash(np.array(ids))[3])
    with pytest.raises(EngramError, match="layer 2 is not in the spec"):
        hasher.hash(ids, layers=[2])


def test_bad_input_is_refused_with_a_clear_message(small):
    spec, projection = small
    hasher = NgramHasher(spec, projection)
    ids = np.zeros((3, 6), dtype=np.int64)
    ids[1, 4] = 1000
    ids[2, 0] = 5000
    with pytest.raises(EngramError, match=r"1000 at position \[1, 4\].*vocab size 1000"):
        hasher.hash(ids)
    with pytest.raises(EngramError, match="must be integers"):
        hasher.hash(np.zeros((2, 3), dtype=np.float32))
    with pytest.raises(EngramError, match="must be integers"):
        hasher.hash(np.zeros((2, 3), dtype=bool))
    with pytest.raises(EngramError, match="1-D .* or 2-D"):
        hasher.hash(np.zeros((2, 3, 4), dtype=np.int64))
    with pytest.raises(EngramError, match="1-D .* or 2-D"):
        hasher.hash(np.int64(4))
    with pytest.raises(EngramError):
        hasher.hash([2**70])
    with pytest.raises(EngramError, match=r"position \[2\]"):
        hasher.hash(np.array([0, 1, 2**64 - 1], dtype=np.uint64))
    with pytest.raises(EngramError, match="pad_id 2000 is not a token id"):
        NgramHasher(spec.replace(pad_id=2000), projection)


def test_projected_pad_is_used(small):
    spec, projection = small
    lookup = projection.lookup.copy()
    lookup[spec.pad_id] = 123
    other = VocabProjection(lookup=lookup, metadata={})
    ids = np.array([[7, 8, 9]])
    assert NgramHasher(spec, other).pad == 123
    np.testing.assert_array_equal(NgramHasher(spec, other).hash(ids)[1], brute_force(ids, spec, lookup)[1])


@pytest.mark.parametrize("dtype", [torch.int64, torch.int32, torch.int16, torch.uint8])
def test_torch_in_torch_out(small, dtype):
    spec, projection = small
    hasher = NgramHasher(spec, projection)
    ids = np.random.default_rng(2).integers(0, 250, size=(3, 40))
    tensor = torch.from_numpy(ids).to(dtype)
    got, rows = hasher.hash(tensor), hasher.rows(tensor.t().contiguous().t())
    expected, expected_rows = hasher.hash(ids), hasher.rows(ids)
    for layer in spec.layer_ids:
        assert isinstance(got[layer], torch.Tensor) and got[layer].dtype == torch.int64
        assert got[layer].device == tensor.device
        np.testing.assert_array_equal(got[layer].numpy(), expected[layer])
        np.testing.assert_array_equal(rows[layer].numpy(), expected_rows[layer])


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(cases())
def test_torch_ops_path_matches_kernel(case):
    """The plain-torch path that accelerator tensors take, run here on CPU tensors."""
    spec, projection, ids = case
    assume(ids.dtype != np.uint64 or ids.size == 0 or ids.max() <= INT64_MAX)
    hasher = NgramHasher(spec, projection)
    tensor = torch.from_numpy(ids.astype(np.int64))
    for with_offsets in (False, True):
        got = hasher._run_torch(tensor, list(spec.layer_ids), with_offsets, None)
        expected = hasher.rows(ids) if with_offsets else hasher.hash(ids)
        for layer in spec.layer_ids:
            np.testing.assert_array_equal(got[layer].numpy(), expected[layer])


def test_out_buffers_are_filled_and_returned(small):
    spec, projection = small
    hasher = NgramHasher(spec, projection)
    for shape in [(3, 5000), (700,), (12_000, 3)]:
        ids = np.random.default_rng(8).integers(-2, 1000, size=shape)
        expected = hasher.rows(ids)
        out = {layer: np.full(shape + (8,), -7, dtype=np.int64) for layer in spec.layer_ids}
        got = hasher.rows(ids, out=out)
        for layer in spec.layer_ids:
            assert got[layer] is out[layer]
            np.testing.assert_array_equal(out[layer], expected[layer])
    tensor = torch.from_numpy(ids)
    buffers = {3: torch.empty(shape + (8,), dtype=torch.int64)}
    assert hasher.hash(tensor, layers=[3], out=buffers)[3] is buffers[3]
    np.testing.assert_array_equal(buffers[3].numpy(), hasher.hash(ids)[3])
    via_ops = {3: torch.empty(shape + (8,), dtype=torch.int64)}
    hasher._run_torch(tensor, [3], False, via_ops)
    np.testing.assert_array_equal(via_ops[3].numpy(), hasher.hash(ids)[3])


def test_bad_out_buffers_are_refused(small):
    spec, projection = small
    hasher = NgramHasher(spec, projection)
    ids = np.zeros((2, 5), dtype=np.int64)
    good = np.empty((2, 5, 8), dtype=np.int64)
    for out, message in [
        ({1: good}, "no array for layer 3"),
        ({1: good, 3: np.empty((2, 5, 8), dtype=np.int32)}, r"out\[3\] must be .* int64 .* \(2, 5, 8\)"),
        ({1: good, 3: np.empty((2, 5, 7), dtype=np.int64)}, r"got ndarray int64 \(2, 5, 7\)"),
        ({1: good, 3: np.empty((2, 8, 5), dtype=np.int64).transpose(0, 2, 1)}, "C-contiguous"),
        ({1: good, 3: torch.empty((2, 5, 8), dtype=torch.int64)}, "writable numpy"),
    ]:
        with pytest.raises(EngramError, match=message):
            hasher.hash(ids, out=out)
    with pytest.raises(EngramError, match=r"torch \(cpu\)"):
        hasher.hash(torch.from_numpy(ids), layers=[1], out={1: good})
    shared = np.zeros(2 * 5 * 8, dtype=np.int64)
    with pytest.raises(EngramError, match="overlaps the token ids"):
        hasher.hash(shared[:10].reshape(2, 5), layers=[1], out={1: shared.reshape(2, 5, 8)})


def test_torch_bad_input(small):
    hasher = NgramHasher(*small)
    with pytest.raises(EngramError, match="must be integers"):
        hasher.hash(torch.zeros(2, 3))
    with pytest.raises(EngramError, match="must be integers"):
        hasher.hash(torch.zeros(2, 3, dtype=torch.bool))
    with pytest.raises(EngramError, match=r"position \[0, 1\]"):
        hasher.hash(torch.tensor([[1, 1000]]))


def test_concurrent_threads_agree(small):
    """Python threads launching the multi-threaded kernel at once: no abort, same results."""
    spec, projection = small
    hasher = NgramHasher(spec, projection)
    inputs = [np.random.default_rng(i).integers(-5, 1000, size=(8, 5000)) for i in range(8)]
    expected = [hasher.hash(ids) for ids in inputs]
    with ThreadPoolExecutor(4) as pool:
        results = list(pool.map(hasher.hash, inputs * 3))
    assert inputs[0].size >= PARALLEL_MIN_TOKENS
    for i, got in enumerate(results):
        for layer in spec.layer_ids:
            np.testing.assert_array_equal(got[layer], expected[i % 8][layer])


def _hash_in_child(spec_dict: dict, lookup: np.ndarray, ids: np.ndarray) -> dict:
    from engram_cli.spec import spec_from_dict

    return NgramHasher(spec_from_dict(spec_dict), VocabProjection(lookup=lookup, metadata={})).hash(ids)


def test_forked_child_can_hash_after_parent(small):
    """A DataLoader forks workers after the main process may have hashed: they must not die."""
    spec, projection = small
    ids = np.random.default_rng(3).integers(0, 1000, size=(4, 10_000))  # big enough for threads
    assert ids.size >= PARALLEL_MIN_TOKENS
    expected = NgramHasher(spec, projection).hash(ids)
    with multiprocessing.get_context("fork").Pool(1) as pool:
        got = pool.apply_async(_hash_in_child, (spec.to_dict(), projection.lookup, ids)).get(timeout=120)
    for layer in spec.layer_ids:
        np.testing.assert_array_equal(got[layer], expected[layer])


@pytest.mark.parametrize("shape,chunk", [((5, 7), 16), ((3, 50), 16), ((40,), 7), ((0, 9), 4), ((2, 0), 4)])
def test_ids_file_streams_in_pieces(tmp_path, small, shape, chunk):
    spec, projection = small
    ids = np.random.default_rng(4).integers(-3, 1000, size=shape).astype(np.int32)
    np.save(tmp_path / "ids.npy", ids)
    out = tmp_path / "out.npz"
    report = hash_ids_file(tmp_path / "ids.npy", out, spec, projection, chunk_tokens=chunk, rows=True)
    expected = NgramHasher(spec, projection).rows(ids)
    with np.load(out) as archive:
        assert sorted(archive.files) == ["layer_1", "layer_3"]
        for layer in spec.layer_ids:
            np.testing.assert_array_equal(archive[f"layer_{layer}"], expected[layer])
    assert report.to_json()["tokens"] == ids.size
    assert [entry["shape"] for entry in report.layers] == [list(shape) + [8]] * 2


def test_cli_hash_text_json():
    spec, projection = load_spec("demo"), default_projection()
    data = engram_json("hash", SENTENCE)
    tokens = data["tokens"]
    ids = np.array([t["id"] for t in tokens])
    assert "".join(t["text"] for t in tokens).endswith(SENTENCE)
    expected = NgramHasher(spec, projection).hash(ids)
    assert [layer["layer_id"] for layer in data["layers"]] == list(spec.layer_ids)
    assert data["layers"][0]["head_sizes"] == spec.head_sizes(1)
    for t, token in enumerate(tokens):
        assert token["compressed_id"] == projection.lookup[token["id"]]
        for ngram in token["ngrams"]:
            n = ngram["n"]
            assert ngram["pads"] == max(0, n - 1 - t)
            assert ngram["ids"][ngram["pads"] :] == ids[max(0, t - n + 1) : t + 1].tolist()
            heads = slice((n - 2) * 4, (n - 1) * 4)
            for layer in spec.layer_ids:
                assert ngram["buckets"][str(layer)] == expected[layer][t, heads].tolist()
    assert tokens[3]["ngrams"][1]["text"] == " Alexander the Great"


def test_cli_hash_text_custom_projection_rows_and_layer(tmp_path):
    tokenizer = make_byte_level_tokenizer(["a", "b", "c", " ", "ab", "abc", "x", "y"])
    projection = compress_vocab(tokenizer)
    projection.save(tmp_path / "p.safetensors")
    text = (ROOT / "tables" / "demo.toml").read_text()
    own = ("tokenizer =", "compressed_vocab_size =")
    (tmp_path / "any.toml").write_text("\n".join(line for line in text.splitlines() if not line.startswith(own)))
    spec = load_spec(tmp_path / "any.toml")  # the demo spec without a tokenizer of its own
    proc = run_engram(
        "hash",
        "abc ab xy",
        "--spec",
        str(tmp_path / "any.toml"),
        "--projection",
        str(tmp_path / "p.safetensors"),
        "--rows",
        "--layer",
        "3",
        "--json",
        check=True,
    )
    data = json.loads(proc.stdout)
    ids = np.array([t["id"] for t in data["tokens"]])
    assert data["values"] == "rows" and [layer["layer_id"] for layer in data["layers"]] == [3]
    expected = NgramHasher(spec, projection).rows(ids)[3]
    got = [sum((g["rows"]["3"] for g in t["ngrams"]), []) for t in data["tokens"]]  # noqa: RUF017
    np.testing.assert_array_equal(np.array(got), expected)
    assert "abc" in proc.stderr and "layer 3" in proc.stderr


def test_cli_hash_ids_file(tmp_path):
    spec, projection = load_spec("demo"), default_projection()
    ids = np.random.default_rng(6).integers(0, projection.vocab_size, size=(3, 700)).astype(np.uint32)
    np.save(tmp_path / "ids.npy", ids)
    out = tmp_path / "h.npz"
    data = engram_json("hash", "--ids", str(tmp_path / "ids.npy"), "-o", str(out))
    assert data["shape"] == [3, 700] and data["tokens"] == 2100 and data["values"] == "buckets"
    expected = NgramHasher(spec, projection).hash(ids)
    with np.load(out) as archive:
        for layer in spec.layer_ids:
            np.testing.assert_array_equal(archive[f"layer_{layer}"], expected[layer])
    assert zipfile.is_zipfile(out)
    refused = run_engram("hash", "--ids", str(tmp_path / "ids.npy"), "-o", str(out))
    assert refused.returncode == 1 and "exists; pass --overwrite" in refused.stderr
    assert (
        run_engram("hash", "--ids", str(tmp_path / "ids.npy"), "-o", str(out), "--overwrite", "--rows").returncode == 0
    )
    with np.load(out) as archive:
        np.testing.assert_array_equal(archive["layer_3"], NgramHasher(spec, projection).rows(ids)[3])


def test_cli_hash_errors(tmp_path):
    np.save(tmp_path / "f.npy", np.zeros((2, 3), dtype=np.float32))
    bad = np.zeros((2, 3), dtype=np.int64)
    bad[1, 2] = 10**9
    np.save(tmp_path / "big.npy", bad)
    for args, message in [
        ((), "give TEXT to tokenize"),
        (("x", "--ids", str(tmp_path / "f.npy")), "not both"),
        (("--ids", str(tmp_path / "f.npy")), "needs -o"),
        (("x", "-o", str(tmp_path / "o.npz")), "-o is for --ids"),
        (("--ids", str(tmp_path / "f.npy"), "-o", str(tmp_path / "o.npz")), "must be integers"),
        (("--ids", str(tmp_path / "big.npy"), "-o", str(tmp_path / "o.npz")), r"position [1, 2]"),
        (("--ids", str(tmp_path / "none.npy"), "-o", str(tmp_path / "o.npz")), "no such token-id file"),
        (("x", "--spec", "nope"), "no spec file or preset"),
        (("x", "--layer", "2"), "layer 2 is not in the spec"),
    ]:
        proc = run_engram("hash", *args)
        assert proc.returncode == 1, args
        assert proc.stderr.startswith("engram: error: ") and message in proc.stderr, (args, proc.stderr)
        assert proc.stderr.count("\n") == 1 and "Traceback" not in proc.stderr
    assert not (tmp_path / "o.npz").exists() and list(tmp_path.glob(".o.npz*")) == []


def test_read_only_memory_mapped_int64_input(tmp_path):
    """`np.load(..., mmap_mode="r")` gives a read-only int64 array, the commonest loader input."""
    spec = load_spec("demo").replace(compressed_vocab_size=None)
    projection = VocabProjection(np.arange(1000) % 311)
    ids = np.random.default_rng(3).integers(-2, 1000, size=(3, 40)).astype(np.int64)
    np.save(tmp_path / "ids.npy", ids)
    mapped = np.load(tmp_path / "ids.npy", mmap_mode="r")
    assert not mapped.flags.writeable
    hasher = NgramHasher(spec, projection)
    expected = hasher.rows(ids.copy())
    got = hasher.rows(mapped)
    assert all(np.array_equal(got[layer], expected[layer]) for layer in spec.layer_ids)
