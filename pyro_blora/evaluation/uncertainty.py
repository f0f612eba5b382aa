"""How well uncertainty scores predict transcription errors, and how calibrated word confidences are.

For a set of transcripts with references, each utterance-level score (higher = less certain) is
judged by:

- Spearman's rank correlation with the utterance error rate;
- AUROC for flagging the utterances that contain at least one error (Mann-Whitney U, ties
  counted as one half);
- the selective-prediction curve: the corpus error rate of the utterances kept when the given
  fraction of the most uncertain ones is rejected (ties in the score are broken by input order);
  its mean over the rejection grid is the area under the curve (lower is better).

Word confidences (the fraction of samples that agree with a word) are judged by their reliability
diagram and expected calibration error (ECE) against word correctness: a word of the chosen
hypothesis is correct when the alignment with the normalised reference matches it. Other word
confidences (e.g. the entropy confidence of :mod:`pyro_blora.predict.confidence`) get their ECE and the AUROC
of flagging wrong words.

AUROC and the selective area come with bootstrap percentile intervals over utterances (the
resamples of :mod:`pyro_blora.metrics.bootstrap`).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Mapping, Sequence

import numpy as np
from scipy import stats

from pyro_blora.metrics import normalize_text, scoring_unit, utterance_error_counts
from pyro_blora.metrics.bootstrap import DEFAULT_SAMPLES, Interval, bootstrap_weighted
from pyro_blora.predict.transcripts import UtteranceTranscript, agreement, word_keys

__all__ = [
    "ReliabilityBin",
    "ScoreQuality",
    "UncertaintyReport",
    "WordConfidenceQuality",
    "auroc",
    "utterance_errors",
    "weighted_auroc",
    "weighted_selective_area",
    "evaluate_uncertainty",
    "expected_calibration_error",
    "reliability_bins",
    "selective_curve",
    "word_correctness",
]

DEFAULT_REJECTION = tuple(np.round(np.arange(0.0, 0.91, 0.05), 2))


def auroc(scores: Sequence[float], positives: Sequence[bool]) -> float:
    """Probability that a random positive scores higher than a random negative (ties: 1/2).

    nan when either class is empty."""
    scores = np.asarray(scores, dtype=float)
    positives = np.asarray(positives, dtype=bool)
    if scores.shape != positives.shape:
        raise ValueError(f"got {scores.size} scores but {positives.size} labels")
    n_pos, n_neg = int(positives.sum()), int((~positives).sum())
    if n_pos == 0 or n_neg == 0:
        return math.nan
    ranks = stats.rankdata(scores)  # average ranks: ties count one half
    return float((ranks[positives].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def selective_curve(
    uncertainty: Sequence[float],
    errors: Sequence[int],
    reference_lengths: Sequence[int],
    rejection: Sequence[float] = DEFAULT_REJECTION,
) -> np.ndarray:
    """Corpus error rate of the kept utterances after rejecting each fraction of the most uncertain."""
    uncertainty = np.asarray(uncertainty, dtype=float)
    errors = np.asarray(errors, dtype=float)
    lengths = np.asarray(reference_lengths, dtype=float)
    if not (uncertainty.shape == errors.shape == lengths.shape):
        raise ValueError("uncertainty, errors and reference_lengths need one entry per utterance")
    if any(not 0.0 <= r < 1.0 for r in rejection):
        raise ValueError("rejection fractions must lie in [0, 1)")
    order = np.argsort(uncertainty, kind="stable")  # most certain first
    n = len(order)
    rates = []
    for fraction in rejection:
        kept = order[: max(1, n - int(math.floor(fraction * n)))]
        total = lengths[kept].sum()
        rates.append(errors[kept].sum() / total if total > 0 else math.nan)
    return np.asarray(rates)


def weighted_auroc(scores: Sequence[float], positives: Sequence[bool], weights: np.ndarray) -> np.ndarray:
    """:func:`auroc` with every utterance counted ``weights[r, i]`` times, for each row r of weights."""
    scores = np.asarray(scores, dtype=float)
    positives = np.asarray(positives, dtype=bool)
    weights = np.atleast_2d(np.asarray(weights, dtype=float))
    pos, neg = scores[positives], scores[~positives]
    wins = (pos[:, None] > neg[None, :]) + 0.5 * (pos[:, None] == neg[None, :])  # (positives, negatives)
    w_pos, w_neg = weights[:, positives], weights[:, ~positives]
    with np.errstate(divide="ignore", invalid="ignore"):
        return ((w_pos @ wins) * w_neg).sum(1) / (w_pos.sum(1) * w_neg.sum(1))


def weighted_selective_area(uncertainty: Sequence[float], errors: Sequence[float], reference_lengths: Sequence[float],
                            weights: np.ndarray, rejection: Sequence[float] = DEFAULT_REJECTION) -> np.ndarray:
    """The mean of :func:`selective_curve` over ``rejection`` with every utterance counted
    ``weights[r, i]`` times (copies of one utterance are rejected one by one), per row r."""
    order = np.argsort(np.asarray(uncertainty, dtype=float), kind="stable")
    errors, lengths = np.asarray(errors, float)[order], np.asarray(reference_lengths, float)[order]
    weights = np.atleast_2d(np.asarray(weights, dtype=float))[:, order]
    before = np.cumsum(weights, axis=1) - weights
    total = weights.sum(1, keepdims=True)
    rates = []
    for fraction in rejection:
        keep = np.maximum(1, total - np.floor(fraction * total))
        kept = np.clip(keep - before, 0, weights)
        with np.errstate(divide="ignore", invalid="ignore"):
            rates.append((kept @ errors) / (kept @ lengths))
    return np.nanmean(np.stack(rates, axis=1), axis=1)


@dataclass(frozen=True)
class ReliabilityBin:
    lower: float
    upper: float
    count: int
    mean_confidence: float
    accuracy: float


def reliability_bins(confidences: Sequence[float], correct: Sequence[bool], num_bins: int = 10) -> list[ReliabilityBin]:
    """Equal-width confidence bins over [0, 1]; a confidence of exactly 1 falls in the last bin."""
    confidences = np.asarray(confidences, dtype=float)
    correct = np.asarray(correct, dtype=float)
    if confidences.shape != correct.shape:
        raise ValueError(f"got {confidences.size} confidences but {correct.size} correctness labels")
    if confidences.size and (confidences.min() < 0 or confidences.max() > 1):
        raise ValueError("confidences must lie in [0, 1]")
    edges = np.linspace(0.0, 1.0, num_bins + 1)
    index = np.clip(np.digitize(confidences, edges[1:-1], right=False), 0, num_bins - 1)
    bins = []
    for b in range(num_bins):
        mask = index == b
        count = int(mask.sum())
        bins.append(
            ReliabilityBin(
                float(edges[b]),
                float(edges[b + 1]),
                count,
                float(confidences[mask].mean()) if count else math.nan,
                float(correct[mask].mean()) if count else math.nan,
            )
        )
    return bins


def expected_calibration_error(bins: Sequence[ReliabilityBin]) -> float:
    """Count-weighted mean |accuracy - confidence| over the bins."""
    total = sum(b.count for b in bins)
    if total == 0:
        return math.nan
    return sum(b.count * abs(b.accuracy - b.mean_confidence) for b in bins if b.count) / total


def word_correctness(hypothesis: str, reference: str, language: str | None = None) -> list[bool]:
    """Whether each word of ``hypothesis`` (as :func:`pyro_blora.predict.transcripts.word_keys` splits it) is
    matched by the reference under edit-distance alignment."""
    _, keys = word_keys(hypothesis, language)
    _, reference_keys = word_keys(reference, language)
    return agreement(keys, [reference_keys])[0]


@dataclass(frozen=True)
class ScoreQuality:
    """How well one uncertainty score predicts errors."""

    spearman: float
    spearman_p: float
    auroc: float
    selective_error: list[float]
    # Mean of selective_error over the rejection grid (lower: the score ranks errors better).
    selective_area: float
    # Bootstrap percentile intervals over utterances (None: not asked for).
    auroc_interval: Interval | None = None
    selective_area_interval: Interval | None = None


@dataclass(frozen=True)
class WordConfidenceQuality:
    """How well one word confidence is calibrated and flags the wrong words."""

    ece: float
    # AUROC of 1 - confidence for "the word is wrong".
    auroc: float
    auroc_interval: Interval | None
    reliability: list[ReliabilityBin]


@dataclass
class UncertaintyReport:
    num_utterances: int
    # Corpus error rate of the chosen hypotheses (word or mixed error rate, per language).
    error_rate: float
    # Fraction of utterances with at least one error.
    error_utterance_fraction: float
    rejection: list[float]
    scores: dict[str, ScoreQuality]
    # Selective curve of an oracle that rejects the utterances with the highest error rate.
    oracle_selective_error: list[float]
    num_words: int
    word_accuracy: float
    ece: float
    reliability: list[ReliabilityBin] = field(default_factory=list)
    # Every word confidence by name: "sample_agreement" (the one above, with its AUROC) and any other
    # given (e.g. "entropy_mean_model").
    word_scores: dict[str, WordConfidenceQuality] = field(default_factory=dict)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping) -> "UncertaintyReport":
        """A report from its :meth:`to_dict` (e.g. a payoff ``summary.json``): drawn again without re-scoring."""
        def interval(found: Mapping | None) -> Interval | None:
            return None if found is None else Interval(**found)

        def bins(rows: Sequence[Mapping]) -> list[ReliabilityBin]:
            return [ReliabilityBin(**row) for row in rows]

        scores = {name: ScoreQuality(**{**q, "auroc_interval": interval(q.get("auroc_interval")),
                                        "selective_area_interval": interval(q.get("selective_area_interval"))})
                  for name, q in data["scores"].items()}
        words = {name: WordConfidenceQuality(w["ece"], w["auroc"], interval(w.get("auroc_interval")), bins(w["reliability"]))
                 for name, w in data.get("word_scores", {}).items()}
        return cls(**{**data, "scores": scores, "reliability": bins(data.get("reliability", [])), "word_scores": words})


def utterance_errors(hypotheses: Sequence[str], references: Sequence[str],
                     languages: Sequence[str | None]) -> tuple[np.ndarray, np.ndarray]:
    """Errors and reference lengths per utterance, each in its language's unit (mixed for CJK)."""
    counts = []
    for hypothesis, reference, language in zip(hypotheses, references, languages, strict=True):
        code = language or "und"
        ref, hyp = normalize_text(reference, code), normalize_text(hypothesis, code)
        counts.append(utterance_error_counts([ref], [hyp], scoring_unit(code, [ref]))[0])
    return (np.array([c.errors for c in counts], dtype=float), np.array([c.reference_length for c in counts], dtype=float))


def evaluate_uncertainty(
    transcripts: Sequence[UtteranceTranscript],
    references: Sequence[str] | None = None,
    extra_scores: Mapping[str, Sequence[float]] | None = None,
    rejection: Sequence[float] = DEFAULT_REJECTION,
    num_bins: int = 10,
    word_confidences: Mapping[str, Sequence[Sequence[float]]] | None = None,
    bootstrap_samples: int = DEFAULT_SAMPLES,
    seed: int = 0,
) -> UncertaintyReport:
    """Judge the transcripts' uncertainty scores and word confidences against references.

    ``references`` default to each transcript's own ``reference``. Scored by default:
    ``"disagreement"`` (the transcript's ``uncertainty``) and ``"token_entropy"``; when every
    transcript has ``mean_log_prob``, also ``"mean_model_neg_log_prob"``. ``extra_scores`` adds
    more, one value per utterance, higher meaning less certain (e.g. a LoRA's negative mean token
    log-probability). Utterances are scored in their own language's unit (mixed for CJK).
    ``word_confidences`` adds other confidences of the transcripts' words (one list per transcript, one
    value per word); AUROC and selective area get ``bootstrap_samples`` resamples (0: no intervals)."""
    if references is None:
        references = [t.reference for t in transcripts]
    if len(references) != len(transcripts) or not transcripts:
        raise ValueError(f"need one reference per transcript; got {len(references)} references for {len(transcripts)} transcripts")
    if any(r is None for r in references):
        raise ValueError("some transcripts have no reference; pass references= (one transcript per utterance)")
    errors, lengths = utterance_errors([t.text for t in transcripts], references, [t.language for t in transcripts])
    if lengths.sum() == 0:
        raise ValueError("every reference is empty after normalisation; nothing to score")
    rates = np.where(lengths > 0, errors / np.maximum(lengths, 1), np.where(errors > 0, 1.0, 0.0))
    has_error = errors > 0

    scores: dict[str, Sequence[float]] = {
        "disagreement": [t.uncertainty for t in transcripts],
        "token_entropy": [t.mean_token_entropy for t in transcripts],
    }
    if all(t.mean_log_prob is not None for t in transcripts):
        scores["mean_model_neg_log_prob"] = [-t.mean_log_prob for t in transcripts]
    for name, values in (extra_scores or {}).items():
        if len(values) != len(transcripts):
            raise ValueError(f"extra score {name!r} has {len(values)} values for {len(transcripts)} transcripts")
        scores[name] = values

    qualities = {}
    for name, values in scores.items():
        values = np.asarray(values, dtype=float)
        if np.ptp(values) == 0 or np.ptp(rates) == 0:
            rho, p = math.nan, math.nan  # a constant score (or error rate) has no rank correlation
        else:
            result = stats.spearmanr(values, rates)
            rho, p = float(result.statistic), float(result.pvalue)
        curve = selective_curve(values, errors, lengths, rejection)
        intervals = (None, None)
        if bootstrap_samples:
            intervals = tuple(bootstrap_weighted(len(values), statistic, samples=bootstrap_samples, seed=seed) for statistic in (
                lambda w, v=values: weighted_auroc(v, has_error, w),
                lambda w, v=values: weighted_selective_area(v, errors, lengths, w, rejection)))
        qualities[name] = ScoreQuality(rho, p, auroc(values, has_error), curve.tolist(), float(np.nanmean(curve)),
                                       *intervals)

    confidences, correct = [], []
    for transcript, reference in zip(transcripts, references):
        confidences.extend(w.confidence for w in transcript.words)
        correct.extend(word_correctness(transcript.text, reference, transcript.language))
    bins = reliability_bins(confidences, correct, num_bins)
    wrong = ~np.asarray(correct, dtype=bool)

    def quality(flat: Sequence[float]) -> WordConfidenceQuality:
        doubt = 1.0 - np.asarray(flat, dtype=float)
        interval = bootstrap_weighted(len(flat), lambda w: weighted_auroc(doubt, wrong, w), samples=bootstrap_samples,
                                      seed=seed) if bootstrap_samples and len(flat) else None
        word_bins = reliability_bins(flat, correct, num_bins)
        return WordConfidenceQuality(expected_calibration_error(word_bins), auroc(doubt, wrong), interval, word_bins)

    # The transcripts' own word confidence (the share of samples agreeing) is judged like the others,
    # when there were samples to disagree.
    sampled = confidences and any(t.num_samples > 1 for t in transcripts)
    word_scores = {"sample_agreement": quality(confidences)} if sampled else {}
    for name, values in (word_confidences or {}).items():
        flat = [float(v) for per_utterance in values for v in per_utterance]
        if len(values) != len(transcripts) or len(flat) != len(correct):
            raise ValueError(f"word confidence {name!r}: give one value per word of every transcript "
                             f"({len(correct)} words in {len(transcripts)} transcripts), got {len(flat)} in {len(values)}")
        word_scores[name] = quality(flat)
    return UncertaintyReport(
        num_utterances=len(transcripts),
        error_rate=float(errors.sum() / lengths.sum()),
        error_utterance_fraction=float(has_error.mean()),
        rejection=[float(r) for r in rejection],
        scores=qualities,
        oracle_selective_error=selective_curve(rates, errors, lengths, rejection).tolist(),
        num_words=len(confidences),
        word_accuracy=float(np.mean(correct)) if correct else math.nan,
        ece=expected_calibration_error(bins),
        reliability=bins,
        word_scores=word_scores,
    )
