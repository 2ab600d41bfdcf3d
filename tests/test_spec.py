"""Table specs: validation, the reference's prime walk, preset totals, `engram plan`."""

from __future__ import annotations

import pytest
from engram_cli import EngramError, load_spec
from engram_cli.spec import TableSpec, preset_names, spec_from_dict
from hypothesis import given, settings
from hypothesis import strategies as st

from conftest import engram_json, run_engram


def brute_primes(limit: int) -> list[int]:
    sieve = bytearray([1]) * (limit + 1)
    sieve[:2] = b"\x00\x00"
    for i in range(2, int(limit**0.5) + 1):
        if sieve[i]:
            sieve[i * i :: i] = bytearray(len(sieve[i * i :: i]))
    return [i for i, v in enumerate(sieve) if v]


@settings(max_examples=40, deadline=None)
@given(
    layers=st.lists(st.integers(0, 50), min_size=1, max_size=3, unique=True),
    max_n=st.integers(2, 5),
    heads=st.integers(1, 4),
    data=st.data(),
)
def test_prime_walk_against_a_sieve(layers, max_n, heads, data):
    sizes = data.draw(st.lists(st.integers(1, 300), min_size=max_n - 1, max_size=max_n - 1))
    spec = TableSpec(
        layer_ids=tuple(layers),
        max_ngram_size=max_n,
        n_head_per_ngram=heads,
        engram_vocab_size=tuple(sizes),
        n_embed_per_ngram=heads * 2,
        pad_id=0,
    )
    primes = brute_primes(5000)
    taken: set[int] = set()
    for layer in layers:
        expected = []
        for n in range(2, max_n + 1):
            start = sizes[n - 2] - 1
            for _ in range(heads):
                p = next(q for q in primes if q > start and q not in taken)
                taken.add(p)
                expected.append(p)
                start = p
        assert spec.head_sizes(layer) == expected
        offsets = spec.offsets(layer)
        assert offsets[0] == 0 and all(offsets[i + 1] - offsets[i] == expected[i] for i in range(len(expected) - 1))
        assert spec.rows(layer) == sum(expected)


def test_reference_demo_primes():
    spec = load_spec("engram-demo-v1")
    sizes = spec.head_sizes(1)
    assert sizes[:8] == [646403, 646411, 646421, 646423, 646433, 646453, 646519, 646523]
    assert sizes[8] == 646537
    assert spec.head_sizes(15)[0] == 646631


@pytest.mark.parametrize(
    "preset,params",
    [
        ("engram-demo-v1", 1_324_313_984),
        ("engram-27b", 5_792_338_560),
        ("engram-40b", 18_534_311_360),
        ("deepseek-v4.1-flash", 196_613_849_600),
    ],
)
def test_preset_totals(preset, params):
    assert load_spec(preset).parameters == params


def test_v41_flash_rows_per_layer():
    spec = load_spec("deepseek-v4.1-flash")
    assert (spec.rows(1), spec.rows(14)) == (384_006_168, 384_016_682)
    assert spec.dim == 256


def test_multipliers_published_vector():
    assert load_spec("engram-demo-v1").multipliers(1, 98_627).tolist() == [
        76993395940407,
        4862694818241,
        36129212583461,
    ]


def test_plan_command_reproduces_totals():
    out = engram_json("plan", "engram-27b")
    assert out["total"]["parameters"] == 5_792_338_560
    assert out["total"]["bytes"]["bfloat16"] == 2 * 5_792_338_560
    assert sum(v["rows"] for v in out["layers"].values()) == out["total"]["rows"]


def test_all_presets_load():
    assert {"demo", "engram-demo-v1", "engram-27b", "engram-40b", "deepseek-v4.1-flash"} <= set(preset_names())


def test_round_trip_through_dict():
    spec = load_spec("demo")
    assert spec_from_dict(spec.to_dict()) == spec


GOOD = {
    "engram": {
        "layer_ids": [1, 15],
        "max_ngram_size": 3,
        "n_head_per_ngram": 8,
        "engram_vocab_size": [100, 100],
        "n_embed_per_ngram": 512,
        "pad_id": 2,
        "seed": 0,
    },
    "table": {"dtype": "bfloat16", "init": {"distribution": "normal", "std": 1.0}},
}


def mutate(section, key, value):
    raw = {"engram": dict(GOOD["engram"]), "table": dict(GOOD["table"])}
    if value is None:
        del raw[section][key]
    else:
        raw[section][key] = value
    return raw


@pytest.mark.parametrize(
    "section,key,value,field",
    [
        ("engram", "colour", 3, "engram.colour"),
        ("engram", "max_ngram_size", 1, "max_ngram_size"),
        ("engram", "engram_vocab_size", [100], "engram_vocab_size"),
        ("engram", "engram_vocab_size", [100, 0], "engram_vocab_size"),
        ("engram", "engram_vocab_size", [100, 10**20], "engram_vocab_size"),
        ("engram", "n_embed_per_ngram", 100, "n_embed_per_ngram"),
        ("engram", "n_head_per_ngram", 0, "n_head_per_ngram"),
        ("engram", "layer_ids", [1, 1], "layer_ids"),
        ("engram", "layer_ids", [], "layer_ids"),
        ("engram", "pad_id", None, "engram.pad_id"),
        ("table", "dtype", "int8", "table.dtype"),
        ("table", "init", {"distribution": "cauchy"}, "table.init.distribution"),
        ("table", "init", {"distribution": "uniform", "std": 1.0}, "table.init.std"),
        ("table", "init", {"distribution": "normal", "std": -1.0}, "table.init.std"),
        ("table", "init", {"distribution": "normal", "std": True}, "table.init.std"),
        ("table", "init", {"distribution": "normal", "std": float("inf")}, "table.init.std"),
        ("table", "init", {"distribution": "normal", "std": float("nan")}, "table.init.std"),
        ("table", "init", {"distribution": "uniform", "bound": float("inf")}, "table.init.bound"),
        ("table", "init", {"distribution": "normal", "std": 1e39}, "table.init.std"),
    ],
)
def test_each_bad_field_is_named(section, key, value, field):
    with pytest.raises(EngramError) as info:
        spec_from_dict(mutate(section, key, value))
    message = str(info.value)
    assert field in message and "\n" not in message


def test_bad_spec_files_give_one_line_errors(tmp_path):
    broken = tmp_path / "broken.toml"
    broken.write_text("[engram\nlayer_ids = [1]")
    wrong = tmp_path / "wrong.toml"
    wrong.write_text(
        "[engram]\nlayer_ids = [1]\nmax_ngram_size = 3\nn_head_per_ngram = 8\n"
        "engram_vocab_size = [10]\nn_embed_per_ngram = 64\npad_id = 2\n"
    )
    for target, expected in (
        (broken, "not valid TOML"),
        (wrong, "engram_vocab_size"),
        (tmp_path / "nope.toml", "no spec file or preset"),
    ):
        proc = run_engram("plan", str(target))
        assert proc.returncode == 1
        lines = proc.stderr.strip().splitlines()
        assert len(lines) == 1 and expected in lines[0] and "Traceback" not in proc.stderr


def test_scaling_past_the_size_limit_is_refused():
    with pytest.raises(EngramError, match="scaling head sizes"):
        load_spec("demo").scaled(1e308)


def test_init_scale_must_stay_finite_in_the_table_dtype():
    """std 2e4 is fine in bfloat16 but would overflow float16 (max 65504) at a few sigma."""
    raw = mutate("table", "init", {"distribution": "normal", "std": 2e4})
    assert spec_from_dict(raw).init.std == 2e4
    raw["table"]["dtype"] = "float16"
    with pytest.raises(EngramError, match="table.init.std.*float16"):
        spec_from_dict(raw)
