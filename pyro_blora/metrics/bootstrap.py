"""Paired bootstrap intervals for differences between models scored on the same utterances.

Every evaluation metric is a ratio of sums over utterances: error rate = Σ errors / Σ reference
tokens, CE = Σ summed NLL / Σ tokens, language ID = mean of 0/1 hits. Two models evaluated on the
same test set are compared by resampling *utterances* (with replacement) and recomputing both
ratios on each resample: the spread of the difference then reflects which utterances happened to
be in the test set, while the pairing removes the variation the two models share. Intervals are
percentile intervals of the resampled statistic.

Resampling is vectorised: a stratum of n utterances is resampled once as a (samples, n) matrix of
counts, and every ratio of every model is a matrix-vector product with it. The counts depend only
on (n, samples, seed, stratum), so every metric of one stratum reuses the same resamples.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Any, Callable, Mapping, Sequence

import numpy as np

__all__ = [
    "DEFAULT_SAMPLES",
    "RECORDED_METRICS",
    "Interval",
    "backward_gain",
    "bootstrap_evals",
    "bootstrap_ratios",
    "bootstrap_sequences",
    "bootstrap_weighted",
    "compare_evals",
    "degradation_reduction",
    "difference",
    "has_records",
    "paired_bootstrap",
    "relative_change",
    "resample_counts",
    "utterance_records",
]

# Per-utterance records (``entry["per_utterance"]`` of an eval result) that make each metric:
# numerator fields and denominator fields (summed), or None for a plain mean of the numerator.
RECORDED_METRICS: dict[str, tuple[tuple[str, ...], tuple[str, ...] | None]] = {
    "error_rate": (("errors",), ("ref_tokens",)),
    "ce": (("ce_sum",), ("ce_tokens",)),
    "prompt_ce": (("prompt_ce_sum",), ("prompt_tokens",)),
    "ce_all_tokens": (("ce_sum", "prompt_ce_sum"), ("ce_tokens", "prompt_tokens")),
    "language_id": (("language_id_hit",), None),
}

# Resamples drawn unless told otherwise: enough for stable 95% percentile bounds.
DEFAULT_SAMPLES = 2000

Statistic = Callable[[np.ndarray], np.ndarray]


@dataclass(frozen=True)
class Interval:
    """A point estimate on all utterances and its bootstrap percentile interval."""

    estimate: float
    low: float
    high: float
    level: float
    samples: int

    def contains(self, value: float) -> bool:
        return self.low <= value <= self.high

    def to_dict(self) -> dict[str, float]:
        return {"estimate": self.estimate, "low": self.low, "high": self.high, "level": self.level,
                "samples": self.samples}


# ----------------------------------------------------------------------------------- statistics
def difference(values: np.ndarray) -> np.ndarray:
    """Systems (a, b): b − a."""
    return values[..., 1] - values[..., 0]


def relative_change(values: np.ndarray) -> np.ndarray:
    """Systems (a, b): (b − a) / a, e.g. the in-domain drop of M against LoRA (positive: M adapts less)."""
    return (values[..., 1] - values[..., 0]) / values[..., 0]


def backward_gain(values: np.ndarray) -> np.ndarray:
    """Systems (LoRA, M): the paper's (LoRA − M) / LoRA (positive: M forgets less)."""
    return -relative_change(values)


def degradation_reduction(values: np.ndarray) -> np.ndarray:
    """Systems (base, LoRA, M): 1 − (M − base) / (LoRA − base), the share of LoRA's degradation
    against the base model that M avoids (1: none of it, 0: all of it)."""
    base, lora, method = values[..., 0], values[..., 1], values[..., 2]
    return 1.0 - (method - base) / (lora - base)


# ----------------------------------------------------------------------------------- resampling
@functools.lru_cache(maxsize=32)
def resample_counts(units: int, samples: int, seed: int, stratum: int) -> np.ndarray:
    """How often each of ``units`` utterances is drawn in each of ``samples`` resamples."""
    rng = np.random.default_rng([seed, stratum])
    counts = rng.multinomial(units, np.full(units, 1.0 / units), size=samples).astype(np.float64)
    counts.setflags(write=False)
    return counts


def _check_level(samples: int, level: float) -> None:
    if samples < 1:
        raise ValueError(f"samples must be >= 1, got {samples}")
    if not 0 < level < 1:
        raise ValueError(f"level must lie in (0, 1), e.g. 0.95, got {level}")


def bootstrap_ratios(
    strata: Sequence[tuple[np.ndarray, np.ndarray]],
    statistic: Statistic,
    *,
    samples: int = DEFAULT_SAMPLES,
    seed: int = 0,
    level: float = 0.95,
) -> Interval:
    """Interval of ``statistic`` of K systems' values, each value the mean over strata of a ratio.

    ``strata`` holds per stratum (e.g. per domain) the numerators and denominators, arrays of shape
    (K, n): system k's records of the stratum's n utterances, in the same utterance order for
    every system. Utterances are resampled within each stratum, jointly for all systems (paired).
    ``statistic`` maps values (..., K) to (...)."""
    _check_level(samples, level)
    if not strata:
        raise ValueError("no strata to resample: give at least one domain's records")
    point, draws = [], []
    for index, (num, den) in enumerate(strata):
        num, den = np.atleast_2d(np.asarray(num, np.float64)), np.atleast_2d(np.asarray(den, np.float64))
        if num.shape != den.shape or num.shape[1] == 0:
            raise ValueError(f"stratum {index}: numerators {num.shape} and denominators {den.shape} must match "
                             "and hold at least one utterance")
        counts = resample_counts(num.shape[1], samples, seed, index)
        with np.errstate(divide="ignore", invalid="ignore"):
            point.append(num.sum(1) / den.sum(1))
            draws.append((counts @ num.T) / (counts @ den.T))
    with np.errstate(divide="ignore", invalid="ignore"):
        estimate = float(statistic(np.mean(point, axis=0)))
        resampled = statistic(np.mean(draws, axis=0))
    low, high = np.nanpercentile(resampled, [50 * (1 - level), 50 * (1 + level)])
    return Interval(estimate, float(low), float(high), level, samples)


def bootstrap_weighted(units: int, statistic: Callable[[np.ndarray], np.ndarray], *, samples: int = DEFAULT_SAMPLES,
                       seed: int = 0, level: float = 0.95) -> Interval:
    """Interval of a statistic that is not a ratio of sums (e.g. an AUROC): ``statistic`` maps (R, units)
    weights, how often each utterance is drawn in each of R resamples, to R values; its value on
    all-ones weights is the estimate. Resamples are those of :func:`bootstrap_ratios` (stratum 0)."""
    _check_level(samples, level)
    if units < 1:
        raise ValueError("no utterances to resample")
    estimate = float(statistic(np.ones((1, units)))[0])
    with np.errstate(divide="ignore", invalid="ignore"):
        resampled = np.asarray(statistic(resample_counts(units, samples, seed, 0)), dtype=float)
    if np.isnan(resampled).all():  # e.g. an AUROC when every utterance is of one class
        return Interval(estimate, float("nan"), float("nan"), level, samples)
    low, high = np.nanpercentile(resampled, [50 * (1 - level), 50 * (1 + level)])
    return Interval(estimate, float(low), float(high), level, samples)


def paired_bootstrap(a_num, a_den, b_num, b_den, *, samples: int = DEFAULT_SAMPLES, seed: int = 0,
                     level: float = 0.95) -> Interval:
    """The difference b − a of two ratio metrics Σnum / Σden over the same utterances (position i
    of every array is utterance i), with its paired bootstrap interval. A den of None is all ones
    (a plain mean, e.g. language-ID hits)."""
    a_num, b_num = np.asarray(a_num, np.float64), np.asarray(b_num, np.float64)
    a_den = np.ones_like(a_num) if a_den is None else np.asarray(a_den, np.float64)
    b_den = np.ones_like(b_num) if b_den is None else np.asarray(b_den, np.float64)
    if not a_num.shape == a_den.shape == b_num.shape == b_den.shape or a_num.ndim != 1:
        raise ValueError(f"give four 1-D arrays over the same utterances, got shapes {a_num.shape}, {a_den.shape}, "
                         f"{b_num.shape}, {b_den.shape}")
    return bootstrap_ratios([(np.stack([a_num, b_num]), np.stack([a_den, b_den]))], difference,
                            samples=samples, seed=seed, level=level)


# ----------------------------------------------------------------------------------- eval results
def _results(evaluation: Mapping[str, Any]) -> Mapping[str, Any]:
    """The per-domain results of an eval.json (or the results themselves)."""
    return evaluation["results"] if "results" in evaluation else evaluation


def has_records(evaluation: Mapping[str, Any], domain: str, metric: str) -> bool:
    """Whether the result has the per-utterance records of ``metric`` on ``domain`` (eval.json files
    written before per-utterance records have none)."""
    records = _results(evaluation).get(domain, {}).get("per_utterance") or {}
    fields, denominators = RECORDED_METRICS[metric]
    return all(f in records for f in fields + (denominators or ()))


def utterance_records(evaluation: Mapping[str, Any], domain: str, metric: str) -> tuple[list[str], np.ndarray, np.ndarray]:
    """Utterance ids, numerators and denominators of ``metric`` on ``domain`` of an eval result."""
    if metric not in RECORDED_METRICS:
        raise ValueError(f"metric must be one of {sorted(RECORDED_METRICS)}, got {metric!r}")
    if domain not in _results(evaluation):
        raise KeyError(f"the evaluation has no domain {domain!r}; it has {sorted(_results(evaluation))}")
    if not has_records(evaluation, domain, metric):
        raise ValueError(f"the evaluation of {domain!r} has no per-utterance records of {metric!r}: it was written "
                         "before they existed, or without decoding; evaluate the model again (`pyro-blora evaluate`)")
    records = _results(evaluation)[domain]["per_utterance"]
    fields, denominators = RECORDED_METRICS[metric]
    num = np.sum([np.asarray(records[f], np.float64) for f in fields], axis=0)
    den = np.ones_like(num) if denominators is None else \
        np.sum([np.asarray(records[f], np.float64) for f in denominators], axis=0)
    return list(records["ids"][:len(num)]), num, den


def _matched(evaluations: Sequence[Mapping[str, Any]], domain: str, metric: str) -> tuple[np.ndarray, np.ndarray]:
    """(K, n) numerators and denominators of K evaluations, in the first one's utterance order."""
    records = [utterance_records(e, domain, metric) for e in evaluations]
    first_ids = records[0][0]
    position = {utterance: i for i, utterance in enumerate(first_ids)}
    nums, dens = [], []
    for number, (ids, num, den) in enumerate(records):
        if len(ids) != len(first_ids) or set(ids) != set(first_ids):
            only_here, only_first = sorted(set(ids) - set(first_ids)), sorted(set(first_ids) - set(ids))
            raise ValueError(
                f"{metric} on {domain!r}: evaluation {number} does not cover the same utterances as evaluation 0 "
                f"({len(ids)} vs {len(first_ids)} utterances; only in {number}: {only_here[:3]}, only in 0: "
                f"{only_first[:3]}); evaluate both on the same test set with the same --limit and --decode-limit"
            )
        order = np.argsort([position[u] for u in ids])
        nums.append(num[order])
        dens.append(den[order])
    return np.stack(nums), np.stack(dens)


def bootstrap_sequences(evaluations: Mapping[str, Sequence[Mapping[str, Any]]], columns: Sequence[str],
                        learned_at: Sequence[int], metric: str, *, reference: str | None = None,
                        all_pairs: bool = False, samples: int = DEFAULT_SAMPLES, seed: int = 0,
                        level: float = 0.95) -> dict[str, dict[str, Interval]]:
    """Average final error and BWT (:mod:`pyro_blora.metrics.continual`) of sequences that share their
    test utterances, with bootstrap intervals.

    ``evaluations[name]`` is one sequence's eval results row by row (row 0: the start model), each
    covering ``columns``. Utterances are resampled within each domain with the same draws for every
    row and every sequence, so the difference of a sequence to ``reference`` (key ``"<name> − <reference>"``)
    is paired. ``all_pairs`` gives the difference of every sequence to every one before it instead."""
    _check_level(samples, level)
    names = list(evaluations)
    if reference is not None and reference not in evaluations:
        raise KeyError(f"reference {reference!r} is not among the sequences {names}")
    lengths = {len(rows) for rows in evaluations.values()}
    if len(lengths) != 1 or 0 in lengths:
        raise ValueError(f"every sequence needs the same, non-zero number of evaluated rows, got {sorted(lengths)}")
    num_rows = lengths.pop()
    flat = [evaluation for name in names for evaluation in evaluations[name]]
    # matrices[k, i, j, r]: sequence k, row i, domain j; r = 0 on all utterances, then the resamples
    matrices = np.empty((len(names), num_rows, len(columns), samples + 1))
    for j, domain in enumerate(columns):
        num, den = _matched(flat, domain, metric)
        counts = np.vstack([np.ones((1, num.shape[1])), resample_counts(num.shape[1], samples, seed, j)])
        with np.errstate(divide="ignore", invalid="ignore"):
            matrices[:, :, j, :] = ((counts @ num.T) / (counts @ den.T)).T.reshape(len(names), num_rows, samples + 1)
    last = num_rows - 1
    average = matrices[:, last].mean(axis=1)
    learned = [j for j, step in enumerate(learned_at) if step < last]
    bwt = np.mean([matrices[:, last, j] - matrices[:, learned_at[j], j] for j in learned], axis=0) if learned \
        else np.full_like(average, np.nan)

    def interval(values: np.ndarray) -> Interval:
        low, high = np.nanpercentile(values[1:], [50 * (1 - level), 50 * (1 + level)]) if np.isfinite(values[1:]).any() \
            else (np.nan, np.nan)
        return Interval(float(values[0]), float(low), float(high), level, samples)

    out = {name: {"average_final": interval(average[k]), "bwt": interval(bwt[k])} for k, name in enumerate(names)}
    if all_pairs:
        pairs = [(k, r) for k in range(len(names)) for r in range(k)]
    elif reference is not None:
        pairs = [(k, names.index(reference)) for k, name in enumerate(names) if name != reference]
    else:
        pairs = []
    for k, r in pairs:
        out[f"{names[k]} − {names[r]}"] = {"average_final": interval(average[k] - average[r]),
                                           "bwt": interval(bwt[k] - bwt[r])}
    return out


def bootstrap_evals(
    systems: Sequence[Sequence[Mapping[str, Any]]],
    domains: Sequence[str],
    metric: str,
    statistic: Statistic,
    *,
    samples: int = DEFAULT_SAMPLES,
    seed: int = 0,
    level: float = 0.95,
) -> Interval:
    """Interval of ``statistic`` over K systems, each system's value the mean over ``domains`` of
    its ``metric`` (as evaluation_fields averages backward domains).

    ``systems[k]`` lists system k's eval results, one per pairing position (seed): position s of
    every system is matched by utterance id, and the positions are pooled by concatenating their
    utterances, so the resampled unit is one utterance of one seed (a system with one result for
    all seeds, e.g. the base model, is given as that result repeated)."""
    lengths = {len(results) for results in systems}
    if len(lengths) != 1 or 0 in lengths:
        raise ValueError(f"every system needs one eval result per pairing position, got {sorted(lengths)}")
    strata = []
    for domain in domains:
        pairs = [_matched([results[s] for results in systems], domain, metric) for s in range(len(systems[0]))]
        strata.append((np.concatenate([p[0] for p in pairs], axis=1), np.concatenate([p[1] for p in pairs], axis=1)))
    return bootstrap_ratios(strata, statistic, samples=samples, seed=seed, level=level)


def compare_evals(a: Mapping[str, Any], b: Mapping[str, Any], domain: str, metric: str, *, samples: int = DEFAULT_SAMPLES,
                  seed: int = 0, level: float = 0.95) -> Interval:
    """b − a on ``domain`` for ``metric`` (error_rate, ce, language_id, ...) of two eval results,
    matched by utterance id; refuses two results that do not cover the same utterances."""
    return bootstrap_evals([[a], [b]], [domain], metric, difference, samples=samples, seed=seed, level=level)
