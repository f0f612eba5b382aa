"""Uncertainty evaluation: AUROC, selective prediction, calibration, and the report on transcripts."""

from __future__ import annotations

import itertools
import json
import math
from dataclasses import replace

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy import stats

from pyro_blora.predict.transcripts import UtteranceTranscript, word_confidences
from pyro_blora.evaluation.uncertainty import (
    UncertaintyReport,
    auroc,
    evaluate_uncertainty,
    expected_calibration_error,
    reliability_bins,
    selective_curve,
    word_correctness,
)
from pyro_blora.report.plots import write_uncertainty_plots


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
    from pyro_blora.predict.monte_carlo import minimum_bayes_risk

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
    paths = write_uncertainty_plots(report, tmp_path, prefix="x-")
    assert [p.name for p in paths] == ["x-selective.png", "x-reliability.png"]
    assert all(p.read_bytes()[:4] == b"\x89PNG" for p in paths)
    saved = json.dumps(report.to_dict())  # NaN bins: compared as written
    assert json.dumps(UncertaintyReport.from_dict(json.loads(saved)).to_dict()) == saved


def test_report_needs_references():
    t = transcript("a", "a", ["a"], None)
    no_reference = UtteranceTranscript(**{**t.__dict__, "reference": None})
    with pytest.raises(ValueError, match="no reference"):
        evaluate_uncertainty([no_reference])
    with pytest.raises(ValueError, match="one reference per transcript"):
        evaluate_uncertainty([t], references=["a", "b"])


# ----------------------------------------------------------------------------------- bootstrap intervals
@settings(max_examples=40, deadline=None)
@given(st.lists(st.tuples(st.integers(0, 3), st.booleans(), st.integers(1, 3)), min_size=3, max_size=10))
def test_weighted_scores_equal_the_plain_ones_on_the_repeated_utterances(rows):
    from pyro_blora.evaluation.uncertainty import weighted_auroc, weighted_selective_area

    scores = np.array([s for s, _, _ in rows], float)
    labels = np.array([y for _, y, _ in rows])
    counts = np.array([c for _, _, c in rows], float)
    errors, lengths = labels * 2.0, np.full(len(rows), 4.0)
    repeated = lambda values: np.repeat(values, counts.astype(int))  # noqa: E731
    expected = auroc(repeated(scores), repeated(labels))
    got = weighted_auroc(scores, labels, counts[None])[0]
    assert (math.isnan(expected) and math.isnan(got)) or got == pytest.approx(expected)
    assert weighted_auroc(scores, labels, np.ones((1, len(rows))))[0] == pytest.approx(auroc(scores, labels), nan_ok=True)
    plain = np.nanmean(selective_curve(repeated(scores), repeated(errors), repeated(lengths)))
    assert weighted_selective_area(scores, errors, lengths, counts[None])[0] == pytest.approx(plain)


def test_report_intervals_contain_the_estimate_and_pin_a_perfect_score():
    rng = np.random.default_rng(0)
    references = [f"w{i} x{i} y{i} z{i}" for i in range(40)]
    wrong = rng.uniform(size=40) < 0.4
    texts = [f"v{i} x{i} y{i} z{i}" if bad else ref for i, (bad, ref) in enumerate(zip(wrong, references))]
    transcripts = [transcript(t, r, [t], -0.1) for t, r in zip(texts, references)]
    noisy = wrong + rng.normal(scale=0.8, size=40)
    report = evaluate_uncertainty(transcripts, extra_scores={"perfect": wrong.astype(float), "noisy": noisy},
                                  bootstrap_samples=500)
    perfect, noisy_quality = report.scores["perfect"], report.scores["noisy"]
    assert perfect.auroc == 1.0 and (perfect.auroc_interval.low, perfect.auroc_interval.high) == (1.0, 1.0)
    assert noisy_quality.auroc_interval.low < noisy_quality.auroc < noisy_quality.auroc_interval.high
    assert noisy_quality.auroc_interval.high - noisy_quality.auroc_interval.low > 0.05
    area = noisy_quality.selective_area_interval
    assert area.low <= noisy_quality.selective_area <= area.high
    assert area.estimate == pytest.approx(noisy_quality.selective_area)


def test_other_word_confidences_get_their_ece_and_auroc():
    transcripts = [transcript("a b c d", "a b x d", ["a b c d", "a b y d"], -0.1), transcript("e f", "e f", ["e f"], -0.1)]
    # Words: a b c d e f; only c is wrong.
    sharp = [[0.9, 0.9, 0.1, 0.9], [0.9, 0.9]]
    report = evaluate_uncertainty(transcripts, word_confidences={"sharp": sharp, "flat": [[0.5] * 4, [0.5] * 2]},
                                  bootstrap_samples=200)
    assert report.word_scores["sharp"].auroc == 1.0 and report.word_scores["flat"].auroc == 0.5
    assert report.word_scores["sharp"].ece == pytest.approx((5 * 0.1 + 0.1) / 6)
    # the transcripts' own confidence (samples agreeing) is judged the same way, AUROC included
    agreement = report.word_scores["sample_agreement"]
    assert agreement.ece == pytest.approx(report.ece) and agreement.reliability == report.reliability
    assert agreement.auroc == 1.0  # the one wrong word, c, is the only one a sample disagrees with
    with pytest.raises(ValueError, match="one value per word"):
        evaluate_uncertainty(transcripts, word_confidences={"short": [[0.5], [0.5]]})


# ----------------------------------------------------------------------------------- entropy confidence, temperature
def test_entropy_confidence_is_one_for_certain_zero_for_uniform_and_orders_sharpness():
    import torch

    from pyro_blora.predict.confidence import entropy_confidence

    vocab = 50
    certain = torch.full((vocab,), -1e4).index_fill(0, torch.tensor([3]), 0.0).log_softmax(-1)
    uniform = torch.zeros(vocab).log_softmax(-1)
    sharp, flat = torch.randn(vocab).mul(6).log_softmax(-1), torch.randn(vocab).mul(0.5).log_softmax(-1)
    for alpha in (1 / 3, 1.0):
        values = entropy_confidence(torch.stack([certain, uniform, sharp, flat]), alpha)
        assert values[0] == pytest.approx(1.0, abs=1e-5) and values[1] == pytest.approx(0.0, abs=1e-5)
        assert values[2] > values[3]
    # Gibbs (alpha 1): (V exp(-H) - 1) / (V - 1).
    entropy = float(-(sharp.exp() * sharp).sum())
    assert float(entropy_confidence(sharp, 1.0)) == pytest.approx((vocab * math.exp(-entropy) - 1) / (vocab - 1), rel=1e-4)


def test_the_default_entropy_confidence_separates_tokens_on_whispers_vocabulary():
    """A chosen token of probability 0.99 to 0.5 over a long tail of 51,864 others, as Whisper's
    distributions are: the default gives distinct, ordered confidences; Tsallis 1/3 gives every one 0."""
    import torch

    from pyro_blora.predict.confidence import entropy_confidence

    tail = torch.randn(51864, generator=torch.Generator().manual_seed(0)) * 2
    rows = []
    for chosen in (0.99, 0.9, 0.7, 0.5):
        tail_probs = tail.softmax(-1) * (1 - chosen)
        rows.append(torch.cat([torch.tensor([chosen]), tail_probs]).log())
    default = entropy_confidence(torch.stack(rows))
    assert default[0] > 0.5 and all(a > b > 0 for a, b in zip(default, default[1:]))
    assert torch.all(entropy_confidence(torch.stack(rows), 1 / 3) < 1e-6)  # why 1/3 is not the default


@pytest.mark.parametrize("true_temperature", [0.6, 1.0, 2.0])
def test_fit_temperature_recovers_the_temperature_the_labels_were_drawn_at(true_temperature):
    import torch

    from pyro_blora.predict.confidence import fit_temperature

    generator = torch.Generator().manual_seed(0)
    logits = torch.randn(20000, 30, generator=generator) * 3
    labels = torch.multinomial(torch.softmax(logits / true_temperature, -1), 1, generator=generator).squeeze(-1)
    fit = fit_temperature([(logits[:10000], labels[:10000]), (logits[10000:], labels[10000:])])
    assert fit.temperature == pytest.approx(true_temperature, rel=0.05)
    assert fit.tokens == 20000 and fit.nll <= fit.nll_at_one + 1e-9
    with pytest.raises(ValueError, match="contain 1.0"):
        fit_temperature([(logits, labels)], temperatures=(0.5, 2.0))


def test_word_entropy_confidence_groups_tokens_into_words():
    from pyro_blora.predict.confidence import word_entropy_confidences, word_token_groups
    from pyro_blora.base_models.loading import load_processor

    tokenizer = load_processor("tiny.en").tokenizer
    ids = tokenizer.encode(" Hello world, 我们 go", add_special_tokens=False)
    words, groups = word_token_groups(tokenizer, ids, "zh")
    assert words == ["Hello", "world,", "我", "们", "go"]
    assert sorted(i for g in groups for i in g) == list(range(len(ids)))  # every token in one word
    spelled = ["".join(tokenizer.decode([ids[i] for i in g]).split()) for g in groups]
    assert spelled == ["Hello", "world,", "我", "们", "go"]
    confidences = [0.9] * len(ids)
    confidences[groups[1][-1]] = 0.2
    assert word_entropy_confidences(tokenizer, ids, confidences, "zh") == pytest.approx([0.9, 0.2, 0.9, 0.9, 0.9])


# ----------------------------------------------------------------------------------- sampling remedies, mutual information
def test_posterior_temperature_scales_the_draws_and_sites_hold_the_rest_at_the_mean():
    import pyro

    from pyro_blora.predict.monte_carlo import sample_posterior, widest_sites
    from tests.test_transcribe import noisy_posterior

    model, guide = noisy_posterior(stddev=0.01)
    means = guide.means()
    pyro.set_rng_seed(3)
    plain = sample_posterior(guide, 3)
    pyro.set_rng_seed(3)
    hot = sample_posterior(guide, 3, temperature=4.0)
    for site in means:
        assert torch_allclose(hot[site] - means[site], 4.0 * (plain[site] - means[site]))
    stds = guide.stddevs()
    stds[model.site_names()[0]] = stds[model.site_names()[0]] * 10
    guide.set_stddevs(stds)
    chosen = widest_sites(guide, 1)
    assert chosen == [model.site_names()[0]]
    partial = sample_posterior(guide, 2, sites=chosen)
    assert all((partial[s] == means[s]).all() for s in means if s not in chosen)
    assert not (partial[chosen[0]] == means[chosen[0]]).all()
    with pytest.raises(ValueError, match="temperature must be > 0"):
        sample_posterior(guide, 2, temperature=0.0)


def torch_allclose(a, b) -> bool:
    import torch

    return torch.allclose(a, b, atol=1e-6, rtol=1e-5)


def test_mutual_information_vanishes_for_a_collapsed_posterior_and_grows_with_its_width():
    import pyro
    import torch

    from pyro_blora import monte_carlo_transcribe
    from tests.test_transcribe import WordTokenizer, noisy_posterior
    from tests.tiny import FRAMES, MELS

    model, guide = noisy_posterior(stddev=0.3)
    features = torch.randn(2, MELS, FRAMES, generator=torch.Generator().manual_seed(1))
    runs = {}
    for tau in (1e-6, 1.0):
        pyro.set_rng_seed(0)
        runs[tau] = monte_carlo_transcribe(model, guide, features, WordTokenizer(), num_samples=4,
                                           posterior_temperature=tau, generate_kwargs={"max_new_tokens": 5})
    for cold, warm in zip(runs[1e-6], runs[1.0]):
        assert cold.mutual_information == pytest.approx(0.0, abs=1e-4)
        assert cold.predictive_entropy == pytest.approx(cold.expected_entropy, abs=1e-4)
        assert warm.mutual_information > 1e-3
        assert warm.predictive_entropy == pytest.approx(warm.expected_entropy + warm.mutual_information, rel=1e-5)
        assert len(warm.token_confidences) == len(warm.token_ids)
        assert all(0.0 <= c <= 1.0 for c in warm.token_confidences)


# ----------------------------------------------------------------------------------- the payoff pass, end to end
from tests.test_transcribe import real_sized_tiny  # noqa: E402,F401  (fixture)


def test_payoff_records_and_summary_on_a_real_vocabulary(real_sized_tiny, tmp_path):
    import torch

    from pyro_blora.data.training_data import load_training_data
    from pyro_blora.evaluation.payoff import (
        PayoffOptions,
        decode_payoff_records,
        fit_model_temperatures,
        summarise_payoff,
        write_records,
    )
    from pyro_blora.predict.transcribe import collect_utterances

    model, guide, processor, folder = real_sized_tiny
    lora = {site: value + 0.05 * torch.randn_like(value) for site, value in guide.means().items()}
    dev = load_training_data(folder / "manifest.csv", processor, split="train")
    fits = fit_model_temperatures(model, {"mean": guide.means(), "lora": lora}, [dev])
    assert set(fits) == {"mean", "lora"} and all(f.tokens > 0 and f.nll <= f.nll_at_one + 1e-9 for f in fits.values())
    options = PayoffOptions(samples=(2, 1), posterior_temperature=2.0, widest_sites=2, max_new_tokens=4)
    assert options.samples == (1, 2)
    utterances = collect_utterances(folder / "manifest.csv")
    records = list(decode_payoff_records(model, guide, processor, utterances, options, lora,
                                         {"mean": 2.0, "lora": 0.5}))
    assert [r["id"] for r in records] == [u.id for u in utterances] and all(len(r["samples"]) == 2 for r in records)
    for record in records:
        assert record["mean"]["scaled_log_prob"] != record["mean"]["log_prob"]
        assert record["mutual_information"] >= 0
        words = word_correctness(record["mean"]["text"], record["reference"], "en")
        assert len(record["mean"]["word_entropy_confidence"]) == len(words)
    write_records(iter(records), tmp_path / "rows.jsonl", {"domain": "en"})
    rows = [json.loads(line) for line in (tmp_path / "rows.jsonl").open()]
    summary = summarise_payoff(rows, options, fits, bootstrap_samples=50)
    assert set(summary["error_rate"]) == {"mean", "mbr@1", "mbr@2", "lora"}
    assert set(summary["against_mean"]) == {"mbr@1", "mbr@2", "lora"}
    largest = summary["uncertainty"]["S=2"]
    assert {"mutual_information", "mean_neg_log_prob_scaled", "lora_neg_log_prob_on_mean_errors"} <= set(largest["scores"])
    assert set(largest["word_scores"]) == {"sample_agreement", "entropy_mean_model", "entropy_ensemble"}
    assert "mutual_information" not in summary["uncertainty"]["S=1"]["scores"]
    assert "lora_neg_log_prob_scaled" in summary["uncertainty"]["lora_own_errors"]["scores"]
    assert "sample_agreement" not in summary["uncertainty"]["lora_own_errors"]["word_scores"]  # one hypothesis
    write_uncertainty_plots(UncertaintyReport.from_dict(largest), tmp_path, prefix="S2-")
    assert (tmp_path / "S2-reliability.png").is_file()
    # the entropy confidence's alpha reaches the records: Gibbs (1) scores the same words otherwise
    gibbs = list(decode_payoff_records(model, guide, processor, utterances[:1], replace(options, entropy_alpha=1.0), lora))
    assert gibbs[0]["mean"]["text"] == records[0]["mean"]["text"]
    assert gibbs[0]["mean"]["word_entropy_confidence"] != records[0]["mean"]["word_entropy_confidence"]
