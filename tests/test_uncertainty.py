"""Uncertainty evaluation: AUROC, selective prediction, calibration, and the report on transcripts."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy import stats

from pyro_blora.transcribe import UtteranceTranscript, word_confidences
from pyro_blora.uncertainty import (
    auroc,
    evaluate_uncertainty,
    expected_calibration_error,
    plot_report,
    reliability_bins,
    selective_curve,
    word_correctness,
)


@settings(max_examples=60, deadline=None)
@given(st.lists(st.tuples(st.integers(0, 4), st.booleans()), min_size=2, max_size=12))
def test_auroc_equals_the_pair_count_with_half_ties(pairs):
    scores = [s for s, _ in pairs]
    labels = [y for _, y in pairs]
    pos = [s for s, y in pairs if y]
    neg = [s for s, y in pairs if not y]
    if not pos or not neg:
        assert math.isnan(auroc(scores, labels))
        return
    expected = sum((p > n) + 0.5 * (p == n) for p, n in itertools.product(pos, neg)) / (len(pos) * len(neg))
    assert auroc(scores, labels) == pytest.approx(expected)


def test_auroc_extremes():
    assert auroc([0.1, 0.2, 0.8, 0.9], [False, False, True, True]) == 1.0
    assert auroc([0.9, 0.8, 0.2, 0.1], [False, False, True, True]) == 0.0


def test_selective_curve_starts_at_corpus_rate_and_falls_for_a_perfect_ranking():
    errors = np.array([0, 0, 1, 3])
    lengths = np.array([4, 4, 4, 4])
    curve = selective_curve([0.0, 0.1, 0.5, 0.9], errors, lengths, rejection=(0.0, 0.25, 0.5))
    assert curve.tolist() == pytest.approx([4 / 16, 1 / 12, 0.0])
    reversed_curve = selective_curve([0.9, 0.5, 0.1, 0.0], errors, lengths, rejection=(0.0, 0.25, 0.5))
    assert reversed_curve[-1] > reversed_curve[0]
    with pytest.raises(ValueError, match="rejection"):
        selective_curve([0.0], [0], [1], rejection=(1.0,))


def test_reliability_and_ece():
    bins = reliability_bins([1.0, 1.0, 0.0, 0.0], [False, False, True, True], num_bins=4)
    assert [b.count for b in bins] == [2, 0, 0, 2]  # a confidence of exactly 1 falls in the last bin
    assert expected_calibration_error(bins) == pytest.approx(1.0)
    rng = np.random.default_rng(0)
    confidence = rng.uniform(size=20000)
    correct = rng.uniform(size=20000) < confidence  # calibrated by construction
    assert expected_calibration_error(reliability_bins(confidence, correct)) < 0.02
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        reliability_bins([1.5], [True])


def test_word_correctness_aligns_with_the_reference():
    assert word_correctness("The cat sat down", "the hat sat") == [True, False, True, False]
    assert word_correctness("我爱 python", "我喜欢 python", language="zh") == [True, False, True]


def transcript(text: str, reference: str, samples: list[str], log_prob: float | None) -> UtteranceTranscript:
    from pyro_blora.inference import minimum_bayes_risk

    _, disagreement = minimum_bayes_risk(samples)
    return UtteranceTranscript(
        id=text, source=None, language="en", text=text, chooser="mean", num_samples=len(samples), samples=samples,
        uncertainty=disagreement, mean_token_entropy=disagreement + 0.1, mean_log_prob=log_prob,
        words=word_confidences(text, samples, "en"), reference=reference,
    )


def test_report_on_transcripts(tmp_path):
    transcripts = [
        transcript("a b c d", "a b c d", ["a b c d"] * 4, -0.1),
        transcript("e f g h", "e f g h", ["e f g h"] * 3 + ["e f g x"], -0.3),
        transcript("i j k l", "i j x l", ["i j k l", "i j x l", "i y k l", "i j x l"], -0.5),
        transcript("m n o p", "q r s t", ["m n o p", "m z", "w n", "v"], -1.2),
    ]
    lora = [0.6, 0.1, 0.9, 0.5]  # positives 0.9 and 0.5 against negatives 0.6 and 0.1: 3 of 4 pairs
    report = evaluate_uncertainty(transcripts, extra_scores={"lora_neg_log_prob": lora})
    assert set(report.scores) == {"disagreement", "token_entropy", "mean_model_neg_log_prob", "lora_neg_log_prob"}
    assert report.num_utterances == 4
    assert report.error_rate == pytest.approx(5 / 16)
    assert report.error_utterance_fraction == 0.5
    rates = [0.0, 0.0, 0.25, 1.0]
    expected = stats.spearmanr([t.uncertainty for t in transcripts], rates).statistic
    assert report.scores["disagreement"].spearman == pytest.approx(expected)
    assert report.scores["disagreement"].auroc == 1.0
    assert report.scores["lora_neg_log_prob"].auroc == pytest.approx(0.75)
    assert report.num_words == 16
    assert 0.0 <= report.ece <= 1.0
    assert sum(b.count for b in report.reliability) == 16
    paths = plot_report(report, tmp_path, prefix="x-")
    assert [p.name for p in paths] == ["x-selective.png", "x-reliability.png"]
    assert all(p.read_bytes()[:4] == b"\x89PNG" for p in paths)


def test_report_needs_references():
    t = transcript("a", "a", ["a"], None)
    no_reference = UtteranceTranscript(**{**t.__dict__, "reference": None})
    with pytest.raises(ValueError, match="no reference"):
        evaluate_uncertainty([no_reference])
    with pytest.raises(ValueError, match="one reference per transcript"):
        evaluate_uncertainty([t], references=["a", "b"])
