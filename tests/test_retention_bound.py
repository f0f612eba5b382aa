"""The confidence bound of the forgetting budget: its coverage on synthetic losses with a known ratio."""

from __future__ import annotations

import math

import numpy as np
import pytest

from pyro_blora.metrics.retention_bound import coverage_interval, ratio_upper_bound


def _paired_losses(rng, n: int, ratio: float):
    """Per-utterance summed CE of a base model and of a model whose expected CE is ``ratio`` times it:
    utterances of 5-40 tokens, skewed per-token difficulty, noise growing with the length."""
    tokens = rng.integers(5, 40, n)
    base = tokens * rng.gamma(2.0, 0.15, n)
    adapted = ratio * base + rng.normal(0.0, 0.05, n) * np.sqrt(tokens)
    return adapted, base


@pytest.mark.parametrize("n, confidence", [(16, 0.95), (64, 0.95), (64, 0.8)])
def test_the_upper_bound_reaches_its_nominal_coverage(n, confidence):
    rng = np.random.default_rng(n)
    draws, ratio = 2000, 1.03
    covered = sum(ratio_upper_bound(*_paired_losses(rng, n, ratio), confidence).upper >= ratio for _ in range(draws))
    margin = 3.3 * math.sqrt(confidence * (1 - confidence) / draws)  # two-sided binomial 99.9%
    assert abs(covered / draws - confidence) <= margin


def test_the_bound_is_the_ratio_plus_a_t_multiple_of_its_paired_standard_error():
    adapted, base = np.array([2.0, 4.0, 6.5]), np.array([2.0, 4.0, 6.0])
    bound = ratio_upper_bound(adapted, base, 0.95)
    assert bound.estimate == pytest.approx(12.5 / 12.0)
    residuals = adapted - bound.estimate * base
    se = math.sqrt((residuals ** 2).sum() / 6) / 4.0
    assert bound.standard_error == pytest.approx(se) and bound.upper == pytest.approx(bound.estimate + 2.919986 * se)
    same = ratio_upper_bound(base, base)  # an unchanged model: no change, no width
    assert same.estimate == same.upper == 1.0


@pytest.mark.parametrize("args, message", [
    (([1.0], [1.0]), "at least 2 retention utterances"), (([1.0, 2.0], [1.0]), "paired"),
    (([1.0, 2.0], [0.0, 0.0]), "sum to zero"), (([1.0, float("nan")], [1.0, 1.0]), "finite"),
    (([1.0, 2.0], [1.0, 2.0], 1.0), "confidence"),
])
def test_bad_input_names_the_problem(args, message):
    with pytest.raises(ValueError, match=message):
        ratio_upper_bound(*args)


def test_the_coverage_interval_is_exact_clopper_pearson():
    low, high = coverage_interval(45, 45)
    assert high == 1.0 and low == pytest.approx(0.025 ** (1 / 45))  # all covered: the lower end solves p^n = 2.5%
    low, high = coverage_interval(0, 10)
    assert low == 0.0 and high == pytest.approx(1 - 0.025 ** (1 / 10))
    low, high = coverage_interval(27, 30)
    assert low < 0.9 < high
    # exact: the binomial tail at each end is the level's half
    binomial = lambda k, n, p: sum(math.comb(n, i) * p ** i * (1 - p) ** (n - i) for i in range(k, n + 1))
    assert binomial(27, 30, low) == pytest.approx(0.025, rel=1e-6)
    assert 1 - binomial(28, 30, high) == pytest.approx(0.025, rel=1e-6)
    with pytest.raises(ValueError, match="covered <= runs"):
        coverage_interval(4, 3)
