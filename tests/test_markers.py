"""The markers tests/conftest.py gives from what a test reaches, which `make test-fast` leaves out:
through helpers of the test suite, nested code, string constants and fixtures, never through the library."""

from __future__ import annotations

import pytest

from conftest import REACHES, TESTS, reached, run_engram


def marks_of(source: str) -> set[str]:
    """The markers a test named `test` in `source` (a module of the test suite) gets."""
    namespace: dict = {}
    exec(compile(source, str(TESTS / "sample_module.py"), "exec"), namespace)
    names = reached([namespace["test"]])
    return {marker for marker, uses in REACHES.items() if names & uses}


@pytest.mark.parametrize(
    ("source", "expected"),
    [
        ("def test():\n    return sum(range(3))\n", set()),
        ("def helper():\n    return run_engram('plan')\ndef test():\n    return helper()\n", {"subprocess"}),
        ("def test():\n    return [subprocess.run(a) for a in ()]\n", {"subprocess"}),
        ("def test():\n    import multiprocessing\n    return multiprocessing\n", {"multiprocess"}),
        ("def test():\n    return ['inspect', '--dask-workers', '2']\n", {"dask"}),
        ("import json\ndef test():\n    return json.dumps(1)\n", set()),  # the library's code is not followed
    ],
)
def test_markers_follow_helpers_nested_code_and_constants(source, expected):
    assert marks_of(source) == expected


@pytest.fixture
def engram_runner():
    return lambda *args: run_engram(*args)


def test_a_fixture_passes_its_marker_on(request, engram_runner):
    assert request.node.get_closest_marker("subprocess") is not None
    assert request.node.get_closest_marker("dask") is None
