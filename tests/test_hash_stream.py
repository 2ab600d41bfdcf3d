"""The streaming hasher against hashing the whole sequences at once, and against the rule written out here.

A stream's rows must be those `NgramHasher.rows` gives the whole history of each row, where each
`reset(row)` starts a new sequence (position 0) in that row, bit for bit, whatever the chunking.
The window brute force below follows docs/hash.md on its own: for token t, order n and shift s,
the id at t - s is the projected pad when t - s lies before the sequence start or any of the tokens
t, ..., t - s is a barrier; the mix is the multiply-XOR in int64 and each head takes `mix mod p`
plus its offset.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from engram_cli import EngramError, NgramHasher
from engram_cli.errors import UsageError
from engram_cli.hashing import PARALLEL_MIN_TOKENS
from engram_cli.spec import TableSpec, load_spec
from engram_cli.vocab import default_projection
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from test_hashing import draw_multipliers, projections, specs, wrap64

KINDS = ("numpy", "torch", "device path")


def window_rows(spec: TableSpec, lookup: np.ndarray, layer: int, ids: list[int], blocked: list[bool]) -> list[int]:
    """Rows of the last token of `ids` (a sequence from its start), one order and head at a time."""
    compressed = int(lookup.max()) + 1
    pad = int(lookup[spec.pad_id])
    mults = draw_multipliers(spec.seed, layer, compressed, spec.max_ngram_size)
    primes, offsets = spec.head_sizes(layer), spec.offsets(layer)
    t = len(ids) - 1
    rows = []
    for n in spec.orders:
        mix, stopped = 0, False
        for s in range(n):
            if t - s < 0:
                token = pad
            else:
                stopped = stopped or blocked[t - s]
                token = pad if stopped else (int(lookup[ids[t - s]]) if ids[t - s] >= 0 else ids[t - s])
            mix ^= wrap64(token * mults[s])
        for j in range(spec.n_head_per_ngram):
            h = (n - 2) * spec.n_head_per_ngram + j
            rows.append(mix % primes[h] + offsets[h])
    return rows


def feed(state, chunk: np.ndarray, mask: np.ndarray | None, kind: str, use_out: bool, heads: dict[int, int]) -> dict:
    """One chunk through the stream as numpy, a CPU tensor, or the accelerator path (run on CPU tensors)."""
    layers = list(heads)
    if kind == "numpy":
        out = {k: np.full(chunk.shape + (h,), -7, np.int64) for k, h in heads.items()} if use_out else None
        got = state.rows(chunk, barrier=mask, out=out)
        if use_out:
            assert got.keys() == out.keys() and all(got[k] is out[k] for k in out)
        return got
    tensor = torch.from_numpy(chunk)
    barrier = None if mask is None else torch.from_numpy(mask)
    out = {k: torch.full(chunk.shape + (h,), -7, dtype=torch.int64) for k, h in heads.items()} if use_out else None
    if kind == "torch":
        got = state.rows(tensor, barrier=barrier, out=out)
    else:  # what a CUDA tensor takes; CPU tensors here, so the hash itself runs the kernel
        got = state._rows_torch(tensor, layers, barrier, out)
    assert all(isinstance(v, torch.Tensor) for v in got.values())
    if use_out:
        assert all(got[k] is out[k] for k in out)
    return {k: v.numpy() for k, v in got.items()}


@st.composite
def streams(draw):
    projection = draw(projections())
    spec = draw(specs(projection.vocab_size))
    batch = draw(st.integers(1, 3))
    rng = np.random.default_rng(draw(st.integers(0, 2**32)))
    barrier_ids = sorted(set(rng.integers(0, projection.vocab_size, size=draw(st.integers(0, 2))).tolist()))
    step = st.one_of(
        st.tuples(st.just("chunk"), st.integers(0, 6), st.sampled_from(KINDS), st.booleans(), st.booleans()),
        st.tuples(st.just("chunk"), st.just(1), st.sampled_from(KINDS), st.booleans(), st.booleans()),
        st.tuples(st.just("reset"), st.one_of(st.none(), st.integers(0, batch - 1))),
    )
    steps = draw(st.lists(step, min_size=1, max_size=14))
    if draw(st.booleans()):  # a long prefill chunk: across the kernel's blocks of 512 tokens
        steps.insert(draw(st.integers(0, len(steps))), ("chunk", 700, "numpy", False, True))
    low = draw(st.sampled_from([0, -3]))  # negative ids pass the projection and are never barriers
    rate = draw(st.sampled_from([0.0, 0.1, 0.4]))
    return spec, projection, batch, barrier_ids, steps, rng, low, rate


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(streams())
def test_stream_equals_whole_sequences_and_the_rule(case):
    spec, projection, batch, barrier_ids, steps, rng, low, rate = case
    hasher = NgramHasher(spec, projection)
    state = hasher.stream(batch, barrier_ids=barrier_ids)
    heads = {layer: len(spec.head_sizes(layer)) for layer in spec.layer_ids}
    ids_seen, mask_seen, starts, got = [], [], [], {layer: [] for layer in spec.layer_ids}
    start_next = np.ones(batch, bool)  # every row starts a sequence
    for step in steps:
        if step[0] == "reset":
            state.reset(step[1])
            start_next[:] = True if step[1] is None else start_next
            if step[1] is not None:
                start_next[step[1]] = True
            continue
        _, length, kind, with_mask, use_out = step
        chunk = rng.integers(low, projection.vocab_size, size=(batch, length))
        mask = rng.random((batch, length)) < rate
        rows = feed(state, chunk, mask if with_mask else None, kind, use_out, heads)
        for layer in spec.layer_ids:
            assert rows[layer].shape == (batch, length, heads[layer])
            got[layer].append(rows[layer])
        first = np.zeros((batch, length), bool)
        if length:
            first[:, 0] = start_next
            start_next[:] = False
        ids_seen.append(chunk)
        mask_seen.append(mask if with_mask else np.zeros_like(mask))
        starts.append(first)
    if not ids_seen:
        return
    ids = np.concatenate(ids_seen, axis=1)
    given_mask = np.concatenate(mask_seen, axis=1)
    start = np.concatenate(starts, axis=1)
    if ids.shape[1] == 0:
        return
    # positions: 0 at every (re)start, +1 within; the whole history of a row at once
    positions = np.zeros(ids.shape, np.int64)
    for t in range(1, ids.shape[1]):
        positions[:, t] = np.where(start[:, t], 0, positions[:, t - 1] + 1)
    blocked = given_mask | (np.isin(ids, barrier_ids) & (ids >= 0))
    whole = hasher.rows(ids, positions=positions, barrier=blocked)
    for layer in spec.layer_ids:
        np.testing.assert_array_equal(np.concatenate(got[layer], axis=1), whole[layer])
    # a few windows by the rule itself
    for _ in range(4):
        b, t = int(rng.integers(batch)), int(rng.integers(ids.shape[1]))
        begin = t - int(positions[b, t])
        sequence, flags = ids[b, begin : t + 1].tolist(), blocked[b, begin : t + 1].tolist()
        for layer in spec.layer_ids:
            expected = window_rows(spec, projection.lookup, layer, sequence, flags)
            assert np.concatenate(got[layer], axis=1)[b, t].tolist() == expected


@pytest.fixture(scope="module")
def demo():
    return NgramHasher(load_spec("engram-demo-v1"), default_projection())


@pytest.mark.parametrize("kind", KINDS)
def test_decode_steps_on_the_demo_spec(demo, kind):
    """One token at a time after a prefill chunk, real primes (the float reduction), resets between requests."""
    rng = np.random.default_rng(5)
    ids = rng.integers(0, demo.projection.vocab_size, size=(64, 40))
    heads = {layer: len(demo.spec.head_sizes(layer)) for layer in demo.spec.layer_ids}
    state = demo.stream(64)
    parts = [feed(state, ids[:, :17], None, kind, False, heads)]
    parts += [feed(state, ids[:, t : t + 1], None, kind, t % 2 == 0, heads) for t in range(17, 40)]
    whole = demo.rows(ids)
    for layer in demo.spec.layer_ids:
        np.testing.assert_array_equal(np.concatenate([p[layer] for p in parts], axis=1), whole[layer])
    state.reset()  # every slot takes a new request: as a fresh stream
    again = feed(state, ids[:, :5], None, kind, False, heads)
    for layer in demo.spec.layer_ids:
        np.testing.assert_array_equal(again[layer], whole[layer][:, :5])


def test_a_prefill_chunk_large_enough_for_the_parallel_kernel(demo):
    ids = np.random.default_rng(6).integers(0, demo.projection.vocab_size, size=(4, 2 * PARALLEL_MIN_TOKENS // 4))
    state = demo.stream(4)
    first, second = state.rows(ids[:, :100], layers=[15]), state.rows(ids[:, 100:], layers=[15])
    assert list(first) == [15]
    np.testing.assert_array_equal(np.concatenate([first[15], second[15]], axis=1), demo.rows(ids, layers=[15])[15])


def test_reset_starts_one_row_only(demo):
    ids = np.random.default_rng(7).integers(0, demo.projection.vocab_size, size=(3, 6))
    state = demo.stream(3)
    state.rows(ids[:, :4])
    state.reset(1)
    got = state.rows(ids[:, 4:])
    whole = demo.rows(ids)
    fresh = demo.rows(ids[1:2, 4:])
    for layer in demo.spec.layer_ids:
        np.testing.assert_array_equal(got[layer][[0, 2]], whole[layer][[0, 2], 4:])
        np.testing.assert_array_equal(got[layer][1], fresh[layer][0])


def test_bad_input_leaves_the_state_unchanged(demo):
    vocab = demo.projection.vocab_size
    ids = np.random.default_rng(8).integers(0, vocab, size=(2, 5))
    state = demo.stream(2)
    state.rows(ids[:, :3])
    with pytest.raises(EngramError, match=r"is not below the vocab size"):
        state.rows(np.array([[1], [vocab]]))
    with pytest.raises(EngramError, match=r"takes ids of shape \(2, t\), got \(3, 1\)"):
        state.rows(np.zeros((3, 1), np.int64))
    with pytest.raises(EngramError, match=r"takes ids of shape \(2, t\), got \(2,\)"):
        state.rows(np.zeros(2, np.int64))
    with pytest.raises(EngramError, match="must be integers"):
        state.rows(np.zeros((2, 1)))
    with pytest.raises(UsageError, match="boolean mask"):
        state.rows(ids[:, 3:4], barrier=np.zeros((2, 1), np.int64))
    with pytest.raises(UsageError, match="barrier must have the token ids' shape"):
        state.rows(ids[:, 3:4], barrier=np.zeros((2, 2), bool))
    with pytest.raises(EngramError, match=r"out\[1\] must be"):
        state.rows(ids[:, 3:4], out={1: np.zeros((2, 1, 3), np.int64), 15: np.zeros((2, 1, 16), np.int64)})
    got = state.rows(ids[:, 3:])
    whole = demo.rows(ids)
    for layer in demo.spec.layer_ids:
        np.testing.assert_array_equal(got[layer], whole[layer][:, 3:])
    with pytest.raises(UsageError, match=r"row must be an integer in \[0, 2\), got 2"):
        state.reset(2)
    with pytest.raises(UsageError, match="batch_size must be a positive integer, got 0"):
        demo.stream(0)
    with pytest.raises(UsageError, match="barrier id"):
        demo.stream(1, barrier_ids=[vocab])


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs an accelerator (run on a GPU machine)")
def test_accelerator_tensors_stream_on_the_device(demo):
    """CUDA ids and masks: the context stays on the device, the rows equal the kernel's."""
    rng = np.random.default_rng(9)
    ids = rng.integers(0, demo.projection.vocab_size, size=(8, 30))
    mask = rng.random(ids.shape) < 0.1
    state = demo.stream(8, barrier_ids=[int(ids[0, 3])])
    chunks = [(0, 11), (11, 12), (12, 13), (13, 30)]
    parts = [
        state.rows(torch.from_numpy(ids[:, a:b]).cuda(), barrier=torch.from_numpy(mask[:, a:b]).cuda())
        for a, b in chunks
    ]
    blocked = mask | (ids == ids[0, 3])
    whole = demo.rows(ids, barrier=blocked)
    for layer in demo.spec.layer_ids:
        assert all(p[layer].device.type == "cuda" for p in parts)
        np.testing.assert_array_equal(torch.cat([p[layer] for p in parts], dim=1).cpu().numpy(), whole[layer])
