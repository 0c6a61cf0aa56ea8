"""Welch's t-test, its interval and the t distribution against scipy."""

from __future__ import annotations

import math

import numpy as np
import pytest

from spacedkd_fast.analysis.stats import (
    spread,
    student_t_cdf,
    student_t_ppf,
    welch_ttest,
)

scipy_stats = pytest.importorskip("scipy.stats")


@pytest.mark.parametrize("trial", range(12))
def test_welch_matches_scipy_on_random_samples(trial):
    rng = np.random.default_rng(trial)
    a = rng.normal(rng.uniform(-1, 1), rng.uniform(0.1, 3), int(rng.integers(2, 12)))
    b = rng.normal(rng.uniform(-1, 1), rng.uniform(0.1, 3), int(rng.integers(2, 12)))
    ours = welch_ttest(a, b)
    ref = scipy_stats.ttest_ind(a, b, equal_var=False)
    ci = ref.confidence_interval(0.95)
    assert ours.diff == pytest.approx(a.mean() - b.mean(), rel=1e-12, abs=1e-12)
    assert ours.t == pytest.approx(ref.statistic, rel=1e-10)
    assert ours.df == pytest.approx(ref.df, rel=1e-10)
    assert ours.p == pytest.approx(ref.pvalue, rel=1e-8, abs=1e-14)
    assert ours.low == pytest.approx(ci.low, rel=1e-8)
    assert ours.high == pytest.approx(ci.high, rel=1e-8)
    assert (ours.n_a, ours.n_b) == (len(a), len(b))


@pytest.mark.parametrize("df", [1.0, 2.0, 2.7, 4.0, 9.3, 30.0, 400.0])
def test_t_distribution_matches_scipy(df):
    for t in (-40.0, -3.1, -0.7, 0.0, 0.4, 2.2, 12.0):
        assert student_t_cdf(t, df) == pytest.approx(scipy_stats.t.cdf(t, df), rel=1e-9,
                                                     abs=1e-14)
    for q in (0.001, 0.025, 0.3, 0.5, 0.8, 0.975, 0.9995):
        assert student_t_ppf(q, df) == pytest.approx(scipy_stats.t.ppf(q, df), rel=1e-9,
                                                     abs=1e-12)


def test_spread_and_degenerate_cases():
    s = spread([1.0, 2.0, None, float("nan"), 4.0])
    assert (s.n, s.mean) == (3, pytest.approx(7 / 3))
    assert s.std == pytest.approx(np.std([1, 2, 4], ddof=1))
    assert math.isnan(spread([5.0]).std) and spread([]).n == 0
    one = welch_ttest([1.0], [2.0, 3.0])  # one run: a difference, but no test
    assert one.diff == -1.5 and math.isnan(one.p) and math.isnan(one.low)
    flat = welch_ttest([1.0, 1.0], [1.0, 1.0])  # no spread at all
    assert flat.diff == 0.0 and math.isnan(flat.p)
