"""Sampling: SamplingParams checks itself and names the bad field; greedy, temperature, top-k,
min-p, top-p; the distribution `sample` draws from equals `processed_probs`, and `draw` never lands
on zero mass (chi-square goodness of fit)."""

from __future__ import annotations

import numpy as np
import pytest

from dsv3_export.core.errors import ExportError
from dsv3_export.engines.sampling import (
    NonFiniteLogits,
    SamplingError,
    SamplingParams,
    draw,
    processed_probs,
    sample,
    token_logprob,
)
from tests.helpers import chi2_sf, chi_square


def test_chi2_sf_matches_known_quantiles():
    assert chi2_sf(3.841458820694124, 1) == pytest.approx(0.05, rel=1e-6)
    assert chi2_sf(20.515005652432873, 5) == pytest.approx(0.001, rel=1e-6)
    assert chi2_sf(124.34211340400407, 100) == pytest.approx(0.05, rel=1e-5)


@pytest.mark.parametrize("temperature,top_k,top_p,min_p", [(1.0, 0, 1.0, 0.0), (0.7, 3, 1.0, 0.0), (1.3, 0, 0.8, 0.0),
                                                         (0.9, 5, 0.6, 0.0), (1.0, 0, 1.0, 0.2), (1.2, 6, 0.9, 0.1)])
def test_processed_probs_is_what_sample_draws_from(temperature, top_k, top_p, min_p):
    rng = np.random.default_rng(0)
    logits = rng.normal(size=8) * 2
    params = SamplingParams(temperature=temperature, top_k=top_k, top_p=top_p, min_p=min_p)
    p = processed_probs(logits, params)
    assert p.sum() == pytest.approx(1.0) and (p >= 0).all()
    if top_k:
        assert (p > 0).sum() <= top_k
    n = 20000
    draws = sample(np.tile(logits, (n, 1)), np.random.default_rng(1), params)
    stat, df, pval = chi_square(np.bincount(draws, minlength=8), p)
    assert pval > 1e-3, (stat, df, pval)


def test_draw_follows_the_distribution_and_never_picks_zero_mass():
    p = np.array([0.0, 0.5, 0.0, 0.25, 0.25, 0.0])
    rng = np.random.default_rng(3)
    counts = np.bincount([draw(p, rng) for _ in range(8000)], minlength=6)
    assert counts[p == 0].sum() == 0
    assert chi_square(counts, p)[2] > 1e-3


def test_sample_distribution():
    """top-k / top-p restrict the support; frequencies follow the softmax."""
    logits = np.log(np.array([[0.5, 0.3, 0.15, 0.05]] * 20000))
    rng = np.random.default_rng(0)
    draws = sample(logits, rng, SamplingParams(temperature=1.0))
    freq = np.bincount(draws, minlength=4) / draws.size
    assert np.allclose(freq, [0.5, 0.3, 0.15, 0.05], atol=0.015)
    assert set(sample(logits, rng, SamplingParams(temperature=1.0, top_k=2))) == {0, 1}
    assert set(sample(logits, rng, SamplingParams(temperature=1.0, top_p=0.7))) == {0, 1}  # 0.5 < 0.7 <= 0.8
    assert set(sample(logits, rng, SamplingParams(temperature=1.0, top_p=0.5))) == {0}


@pytest.mark.parametrize("min_p,kept", [(0.0, {0, 1, 2, 3}), (0.09, {0, 1, 2, 3}), (0.12, {0, 1, 2}), (0.31, {0, 1}), (0.61, {0}),
                                        (1.0, {0})])
def test_min_p_removes_what_is_less_likely_than_min_p_times_the_top(min_p, kept):
    """probabilities 0.5, 0.3, 0.15, 0.05: min_p x 0.5 is the bar. The kept tokens keep their
    relative odds (renormalized), the rest never come out."""
    probs = np.array([0.5, 0.3, 0.15, 0.05])
    logits = np.log(np.tile(probs, (20000, 1)))
    params = SamplingParams(temperature=1.0, min_p=min_p)
    p = processed_probs(logits[0], params)
    assert set(np.flatnonzero(p)) == kept
    want = np.where(np.isin(np.arange(4), list(kept)), probs, 0.0)
    np.testing.assert_allclose(p, want / want.sum(), rtol=1e-12)
    draws = sample(logits, np.random.default_rng(0), params)
    assert set(draws.tolist()) == kept
    assert chi_square(np.bincount(draws, minlength=4)[list(kept)], p[list(kept)])[2] > 1e-3


def test_greedy_is_argmax_and_ties_go_to_the_lower_id():
    logits = np.array([[0.1, 2.0, 2.0, -1.0], [3.0, 0.0, 0.0, 3.0]])
    assert sample(logits, None, SamplingParams()).tolist() == [1, 0]
    assert sample(logits, np.random.default_rng(0), SamplingParams(temperature=1.0, top_k=1)).tolist() == [1, 0]


@pytest.mark.parametrize("field,value,wording", [
    ("max_tokens", 0, "max_tokens must be >= 1, got 0"),
    ("temperature", -1, "temperature must be >= 0.0 (0 = greedy), got -1.0"),
    ("temperature", float("nan"), "temperature must be a finite number, got nan"),
    ("temperature", "hot", "temperature must be a finite number, got 'hot'"),
    ("top_k", -2, "top_k must be >= 0 (0 or -1 = no limit), got -2"),
    ("top_k", 2.5, "top_k must be an integer, got 2.5"),
    ("top_k", True, "top_k must be an integer, got True"),
    ("top_p", 0, "top_p must be in (0, 1], got 0.0"),
    ("top_p", 1.5, "top_p must be in (0, 1], got 1.5"),
    ("min_p", -0.1, "min_p must be in [0.0, 1.0], got -0.1"),
    ("min_p", 1.5, "min_p must be in [0.0, 1.0], got 1.5"),
    ("seed", -1, "seed must be in [0, 9223372036854775807], got -1"),
    ("repetition_penalty", 0, "repetition_penalty must be > 0.0, got 0.0"),
    ("presence_penalty", 2.5, "presence_penalty must be in [-2.0, 2.0], got 2.5"),
    ("frequency_penalty", -3, "frequency_penalty must be in [-2.0, 2.0], got -3.0"),
])
def test_bad_fields_are_named(field, value, wording):
    """One wording per bad field, the one every surface shows (CLI, API, OpenAI server, Triton)."""
    with pytest.raises(SamplingError) as e:
        SamplingParams(**{field: value})
    assert e.value.param == field and str(e.value) == wording and isinstance(e.value, ExportError)


def test_wire_fields_map_by_name_and_top_k_minus_one_is_no_limit():
    params = SamplingParams.from_wire({"temperature": np.float32(0.5), "top_k": -1, "min_p": None, "other": 3})
    assert params.temperature == 0.5 and params.top_k == 0 and params.min_p == 0.0
    assert [f.name for f in SamplingParams.wire_fields()] == ["max_tokens", "temperature", "top_k", "top_p", "min_p",
                                                              "seed", "repetition_penalty", "presence_penalty",
                                                              "frequency_penalty"]


@pytest.mark.parametrize("temperature", [1e-308, 5e-324, 1e-6])
def test_a_tiny_temperature_is_greedy_never_nan(temperature):
    logits = np.random.default_rng(0).normal(size=(4, 50)) * 5
    got = sample(logits, np.random.default_rng(0), SamplingParams(temperature=temperature))
    assert got.tolist() == logits.argmax(-1).tolist()


def test_token_logprob_is_the_models_own_log_softmax():
    logits = np.array([2.0, 1.0, 1.0, -3.0])
    lp = logits - np.log(np.exp(logits).sum())
    got = token_logprob(logits, 2, top=2)
    assert got.logprob == pytest.approx(lp[2]) and [t for t, _ in got.top] == [0, 1]
    assert got.top[1][1] == pytest.approx(lp[1])


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_non_finite_logits_are_an_error_not_token_0(bad):
    logits = np.zeros((2, 5))
    logits[1, 3] = bad
    for temperature in (0.0, 1.0):
        with pytest.raises(NonFiniteLogits, match="non-finite logits"):
            sample(logits, np.random.default_rng(0), SamplingParams(temperature=temperature))


def test_penalties_by_hand():
    """The repetition penalty on what the prompt or the output holds (divide a positive logit,
    multiply a negative one), then presence once and frequency per occurrence in the output."""
    from dsv3_export.engines.sampling import apply_penalties

    logits = np.array([1.0, -1.0, 3.0, 0.5, 2.0])
    params = SamplingParams(repetition_penalty=2.0, presence_penalty=0.5, frequency_penalty=0.25)
    got = apply_penalties(logits, params, prompt=[0], output=[1, 1, 3])
    np.testing.assert_allclose(got, [1.0 / 2, -1.0 * 2 - 0.5 - 0.25 * 2, 3.0, 0.5 / 2 - 0.5 - 0.25, 2.0])
    assert apply_penalties(logits, SamplingParams(), [0], [1]) is logits  # none set: untouched
    only_output = apply_penalties(logits, SamplingParams(presence_penalty=1.0), prompt=[2], output=[])
    np.testing.assert_array_equal(only_output, logits)  # presence counts the output only
