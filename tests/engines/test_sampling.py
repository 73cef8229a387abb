"""Sampling: greedy, temperature, top-k, top-p; the distribution `sample` draws from equals
`processed_probs`, and `draw` never lands on zero mass (chi-square goodness of fit)."""

from __future__ import annotations

import numpy as np
import pytest

from dsv3_export.core.errors import ExportError
from dsv3_export.engines.sampling import NonFiniteLogits, check_generation_args, draw, processed_probs, sample
from tests.helpers import chi2_sf, chi_square


def test_chi2_sf_matches_known_quantiles():
    assert chi2_sf(3.841458820694124, 1) == pytest.approx(0.05, rel=1e-6)
    assert chi2_sf(20.515005652432873, 5) == pytest.approx(0.001, rel=1e-6)
    assert chi2_sf(124.34211340400407, 100) == pytest.approx(0.05, rel=1e-5)


@pytest.mark.parametrize("temperature,top_k,top_p", [(1.0, 0, 1.0), (0.7, 3, 1.0), (1.3, 0, 0.8), (0.9, 5, 0.6)])
def test_processed_probs_is_what_sample_draws_from(temperature, top_k, top_p):
    rng = np.random.default_rng(0)
    logits = rng.normal(size=8) * 2
    p = processed_probs(logits, temperature=temperature, top_k=top_k, top_p=top_p)
    assert p.sum() == pytest.approx(1.0) and (p >= 0).all()
    if top_k:
        assert (p > 0).sum() <= top_k
    n = 20000
    draws = sample(np.tile(logits, (n, 1)), np.random.default_rng(1), temperature=temperature, top_k=top_k, top_p=top_p)
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
    draws = sample(logits, rng, temperature=1.0)
    freq = np.bincount(draws, minlength=4) / draws.size
    assert np.allclose(freq, [0.5, 0.3, 0.15, 0.05], atol=0.015)
    assert set(sample(logits, rng, temperature=1.0, top_k=2)) == {0, 1}
    assert set(sample(logits, rng, temperature=1.0, top_p=0.7)) == {0, 1}  # 0.5 < 0.7 <= 0.8
    assert set(sample(logits, rng, temperature=1.0, top_p=0.5)) == {0}


def test_greedy_is_argmax_and_ties_go_to_the_lower_id():
    logits = np.array([[0.1, 2.0, 2.0, -1.0], [3.0, 0.0, 0.0, 3.0]])
    assert sample(logits, None).tolist() == [1, 0]
    assert sample(logits, np.random.default_rng(0), temperature=1.0, top_k=1).tolist() == [1, 0]


@pytest.mark.parametrize("kwargs,match", [({"max_new_tokens": 0}, "max_new_tokens"), ({"temperature": -1}, "temperature"),
                                          ({"top_k": -2}, "top_k"), ({"top_p": 0}, "top_p"), ({"top_p": 1.5}, "top_p")])
def test_bad_settings_are_named(kwargs, match):
    with pytest.raises(ExportError, match=match):
        check_generation_args(**kwargs)


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_non_finite_logits_are_an_error_not_token_0(bad):
    logits = np.zeros((2, 5))
    logits[1, 3] = bad
    for temperature in (0.0, 1.0):
        with pytest.raises(NonFiniteLogits, match="non-finite logits"):
            sample(logits, np.random.default_rng(0), temperature=temperature)
