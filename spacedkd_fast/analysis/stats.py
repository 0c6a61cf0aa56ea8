"""Small-sample statistics for comparing runs: mean and spread, Welch's t-test, its 95% interval.

Pure Python (``math`` only): the Student t distribution comes from the regularised incomplete beta
function (continued fraction, as in Numerical Recipes 6.4), so neither scipy nor numpy is needed.
The tests check every number here against scipy.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass

__all__ = ["Spread", "WelchResult", "spread", "student_t_cdf", "student_t_ppf", "welch_ttest"]


@dataclass(frozen=True)
class Spread:
    """Mean, sample standard deviation (``ddof=1``; NaN for one value) and count of some values."""

    mean: float
    std: float
    n: int

    def as_dict(self) -> dict[str, float | int]:
        return asdict(self)


def spread(values: Sequence[float]) -> Spread:
    """``Spread`` of the finite values among ``values`` (``mean`` NaN when there are none)."""
    xs = [float(v) for v in values if v is not None and math.isfinite(float(v))]
    n = len(xs)
    if n == 0:
        return Spread(math.nan, math.nan, 0)
    mean = math.fsum(xs) / n
    std = math.sqrt(math.fsum((x - mean) ** 2 for x in xs) / (n - 1)) if n > 1 else math.nan
    return Spread(mean, std, n)


# ----------------------------------------------------------------------- Student t distribution
def _betacf(a: float, b: float, x: float) -> float:
    """Continued fraction of the incomplete beta function (modified Lentz)."""
    tiny = 1e-300
    qab, qap, qam = a + b, a + 1.0, a - 1.0
    c, d = 1.0, 1.0 - qab * x / qap
    d = 1.0 / (d if abs(d) > tiny else tiny)
    h = d
    for m in range(1, 10_000):
        m2 = 2 * m
        aa = m * (b - m) * x / ((qam + m2) * (a + m2))
        d = 1.0 + aa * d
        d = 1.0 / (d if abs(d) > tiny else tiny)
        c = 1.0 + aa / c
        c = c if abs(c) > tiny else tiny
        h *= d * c
        aa = -(a + m) * (qab + m) * x / ((a + m2) * (qap + m2))
        d = 1.0 + aa * d
        d = 1.0 / (d if abs(d) > tiny else tiny)
        c = 1.0 + aa / c
        c = c if abs(c) > tiny else tiny
        delta = d * c
        h *= delta
        if abs(delta - 1.0) < 1e-15:
            break
    return h


def _betainc(a: float, b: float, x: float) -> float:
    """Regularised incomplete beta function ``I_x(a, b)`` for ``a, b > 0``, ``0 <= x <= 1``."""
    if x <= 0.0:
        return 0.0
    if x >= 1.0:
        return 1.0
    log_front = (math.lgamma(a + b) - math.lgamma(a) - math.lgamma(b)
                 + a * math.log(x) + b * math.log1p(-x))
    front = math.exp(log_front)
    if x < (a + 1.0) / (a + b + 2.0):
        return front * _betacf(a, b, x) / a
    return 1.0 - front * _betacf(b, a, 1.0 - x) / b


def _two_sided_tail(t: float, df: float) -> float:
    """``P(|T| >= |t|)`` for Student's t with ``df`` degrees of freedom."""
    if math.isnan(t) or math.isnan(df):
        return math.nan
    if math.isinf(t):
        return 0.0
    return _betainc(df / 2.0, 0.5, df / (df + t * t))


def student_t_cdf(t: float, df: float) -> float:
    """``P(T <= t)`` for Student's t with ``df > 0`` (real-valued) degrees of freedom."""
    tail = 0.5 * _two_sided_tail(t, df)
    return tail if t < 0 else 1.0 - tail


def student_t_ppf(q: float, df: float) -> float:
    """The ``q`` quantile of Student's t with ``df`` degrees of freedom (bisection on the CDF)."""
    if not 0.0 < q < 1.0:
        raise ValueError(f"quantile must be in (0, 1), got {q}")
    if math.isnan(df):
        return math.nan
    if q == 0.5:
        return 0.0
    upper = q > 0.5
    tail = 2.0 * (1.0 - q if upper else q)  # two-sided tail probability of |T| >= t
    lo, hi = 0.0, 1.0
    while _two_sided_tail(hi, df) > tail:
        hi *= 2.0
        if hi > 1e300:
            return math.inf if upper else -math.inf
    for _ in range(200):
        mid = 0.5 * (lo + hi)
        if _two_sided_tail(mid, df) > tail:
            lo = mid
        else:
            hi = mid
        if hi - lo <= 1e-15 * max(1.0, hi):
            break
    t = 0.5 * (lo + hi)
    return t if upper else -t


# ----------------------------------------------------------------------------- Welch's t-test
@dataclass(frozen=True)
class WelchResult:
    """Welch's unequal-variance t-test of ``mean(a) - mean(b)``.

    ``diff``: the difference of the means; ``low``/``high``: its two-sided ``confidence`` interval
    (``diff +- t_{df} * se``); ``t``, ``df`` (Welch-Satterthwaite), ``p`` (two-sided). NaN where
    the data cannot say (fewer than two values in a group, or no spread in either).
    """

    diff: float
    low: float
    high: float
    se: float
    t: float
    df: float
    p: float
    n_a: int
    n_b: int
    confidence: float = 0.95

    def as_dict(self) -> dict[str, float | int]:
        return asdict(self)


def welch_ttest(a: Sequence[float], b: Sequence[float], *, confidence: float = 0.95) -> WelchResult:
    """Welch's t-test and interval for ``mean(a) - mean(b)`` (non-finite values are dropped)."""
    sa, sb = spread(a), spread(b)
    diff = sa.mean - sb.mean
    nan = math.nan
    if sa.n < 2 or sb.n < 2:
        return WelchResult(diff, nan, nan, nan, nan, nan, nan, sa.n, sb.n, confidence)
    va, vb = sa.std ** 2 / sa.n, sb.std ** 2 / sb.n
    se = math.sqrt(va + vb)
    if se == 0.0:
        return WelchResult(diff, nan, nan, 0.0, nan, nan, nan, sa.n, sb.n, confidence)
    df = (va + vb) ** 2 / (va ** 2 / (sa.n - 1) + vb ** 2 / (sb.n - 1))
    t = diff / se
    p = _two_sided_tail(t, df)
    half = student_t_ppf(0.5 + confidence / 2.0, df) * se
    return WelchResult(diff, diff - half, diff + half, se, t, df, p, sa.n, sb.n, confidence)
