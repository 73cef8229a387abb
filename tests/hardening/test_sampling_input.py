"""Sampling settings from every surface: a tiny temperature is greedy (never NaN, never token -1),
and a bad seed is the field's own error, not numpy's."""

from __future__ import annotations

import pytest
from click.testing import CliRunner

from dsv3_export import engines
from dsv3_export.cli.main import main
from dsv3_export.engines.sampling import SamplingError
from tests.helpers import assert_clean_error

PROMPT = [0, 17, 301, 5]


@pytest.fixture(scope="module")
def engine(tiny_build):
    return engines.load(tiny_build, threads=1)


@pytest.mark.parametrize("temperature", [1e-308, 5e-324, 1e-9])
def test_a_tiny_temperature_gives_the_greedy_tokens(engine, tiny_build, temperature):
    greedy = engine.generate(PROMPT, max_new_tokens=8)
    assert engine.generate(PROMPT, max_new_tokens=8, temperature=temperature, seed=3).ids == greedy.ids
    r = CliRunner().invoke(main, ["run", str(tiny_build), "--ids", ",".join(map(str, PROMPT)), "--max-new-tokens", "8",
                                  "--temperature", repr(temperature)])
    assert r.exit_code == 0 and r.stdout == greedy.text + "\n", r.output


@pytest.mark.parametrize("seed", [-1, 2**63, 1.5, True])
def test_a_bad_seed_is_named(engine, tiny_build, seed):
    with pytest.raises(SamplingError) as e:
        engine.generate(PROMPT, max_new_tokens=2, seed=seed)
    assert e.value.param == "seed" and "numpy" not in str(e.value)
    if isinstance(seed, int) and not isinstance(seed, bool):
        assert_clean_error(CliRunner().invoke(main, ["run", str(tiny_build), "--ids", "0,1", "--seed", str(seed)]),
                           "--seed: seed must be in [0, 9223372036854775807]")
