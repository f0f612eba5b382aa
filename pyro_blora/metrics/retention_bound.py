"""A one-sided upper confidence bound on a ratio of sums over paired utterances.

The forgetting budget constrains the relative change of the retention set's cross-entropy per
transcript token: sum_i c_i / sum_i b_i - 1, where c_i is the adapted model's summed CE on utterance i
and b_i the base model's on the same utterance and labels (so the token counts cancel, and this is
exactly the change of the per-token CE). A point estimate on a few utterances moves by more than a
2-10% budget between measurements, so the budget holds the *upper bound* instead.

The estimator is the paired ratio estimator r = sum c / sum b with its delta-method standard error
and a Student t quantile with n - 1 degrees of freedom (Cochran, "Sampling Techniques", ch. 6):

    e_i = c_i - r b_i,    se(r) = sqrt(sum e_i^2 / (n (n - 1))) / mean(b),    upper = r + t_{n-1, conf} se(r)

Why this one: pairing removes the difference in difficulty between utterances, which is most of the
variance of an unpaired mean (a hard utterance is hard for both models), so e_i carries only the
change. It costs nothing beyond the n per-utterance losses already measured, and is deterministic,
so training, early stopping and the post-hoc lambda agree on the same losses. A percentile bootstrap
of the same ratio is narrower by about sqrt((n - 1) / n) and a normal quantile, and under-covers at
the small n a training loop can afford. ``tests/test_retention_bound.py`` measures the coverage.
"""

from __future__ import annotations

import math
from functools import lru_cache
from dataclasses import asdict, dataclass
from typing import Any, Sequence

import numpy as np
from scipy import stats

__all__ = ["RatioBound", "coverage_interval", "ratio_upper_bound"]


@dataclass(frozen=True)
class RatioBound:
    """sum(numerator) / sum(denominator), with its one-sided upper bound at ``confidence``."""

    estimate: float
    upper: float
    standard_error: float
    n: int
    confidence: float

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@lru_cache(maxsize=256)
def _t_quantile(confidence: float, degrees: int) -> float:
    return float(stats.t.ppf(confidence, degrees))


def ratio_upper_bound(numerator: Sequence[float], denominator: Sequence[float],
                      confidence: float = 0.95) -> RatioBound:
    """The paired ratio estimate sum(numerator) / sum(denominator) over n >= 2 units and its
    one-sided upper confidence bound (delta method, t with n - 1 degrees of freedom; see the module)."""
    c = np.asarray(numerator, dtype=np.float64)
    b = np.asarray(denominator, dtype=np.float64)
    if c.shape != b.shape or c.ndim != 1:
        raise ValueError(f"numerator and denominator must be paired 1-D sequences of the same length, got shapes "
                         f"{c.shape} and {b.shape}")
    if not 0.5 <= confidence < 1:
        raise ValueError(f"confidence must lie in [0.5, 1) (0.95: a 95% upper bound), got {confidence!r}")
    n = c.shape[0]
    if n < 2:
        raise ValueError(f"a confidence bound needs at least 2 retention utterances, got {n}; give more "
                         "(--retain-utterances)")
    if not np.all(np.isfinite(c)) or not np.all(np.isfinite(b)):
        raise ValueError("the retention losses are not all finite; check the model and the retention data")
    if b.sum() <= 0:
        raise ValueError("the base losses sum to zero or less, so a relative change is undefined; give utterances "
                         "with transcript tokens, or use an absolute budget")
    ratio = float(c.sum() / b.sum())
    residuals = c - ratio * b
    se = math.sqrt(float(np.sum(residuals ** 2)) / (n * (n - 1))) / float(b.mean())
    upper = ratio + _t_quantile(confidence, n - 1) * se
    return RatioBound(ratio, upper, se, n, confidence)


def coverage_interval(covered: int, runs: int, level: float = 0.95) -> tuple[float, float]:
    """Clopper-Pearson interval of the share of ``runs`` whose bound held out of sample, ``covered``
    of them: exact, so it stays honest at the few dozen runs a coverage study can afford."""
    if not 0 <= covered <= runs or runs < 1:
        raise ValueError(f"need 0 <= covered <= runs and runs >= 1, got {covered} of {runs}")
    if not 0 < level < 1:
        raise ValueError(f"level must lie in (0, 1), got {level!r}")
    tail = (1 - level) / 2
    low = 0.0 if covered == 0 else float(stats.beta.ppf(tail, covered, runs - covered + 1))
    high = 1.0 if covered == runs else float(stats.beta.ppf(1 - tail, covered + 1, runs - covered))
    return low, high
