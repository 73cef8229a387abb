"""benchmarks.speculative.measure: plain vs speculative decoding on one engine, what bench reports."""

from __future__ import annotations

import pytest

from dsv3_export import engines
from dsv3_export.benchmarks.speculative import measure

PROMPTS = [[0, 17, 301, 42, 9, 255, 77], [0, 5]]


@pytest.fixture(scope="module")
def engine(tiny_build):
    return engines.load(tiny_build, threads=1)


def test_measure_reports_what_bench_needs(engine):
    m = measure(engine, PROMPTS, max_new_tokens=16)
    assert m["greedy_equal"] is True
    for key in ("acceptance_rate", "tokens_per_step", "speedup"):
        assert m[key] is not None
    assert m["plain"]["tokens_per_s"] > 0 and m["speculative"]["tokens_per_s"] > 0
    assert m["plain"]["decode_tokens"] == m["speculative"]["decode_tokens"] == 2 * 15
