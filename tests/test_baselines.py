"""The non-Bayesian decoders at S passes (beam, temperature samples) and their rows in the payoff study."""

from __future__ import annotations

import json
from dataclasses import replace

import pytest
import torch

from pyro_blora.data import load_audio
from pyro_blora.evaluation.payoff import PayoffOptions, decode_payoff_records, summarise_payoff
from pyro_blora.features import log_mel_features
from pyro_blora.predict.baselines import beam_transcribe, temperature_transcribe, utterance_seed
from pyro_blora.predict.monte_carlo import point_transcribe
from pyro_blora.predict.transcribe import collect_utterances
from tests.test_laplace import lora_and_laplace  # noqa: F401 - a fixture
from tests.test_transcribe import real_sized_tiny  # noqa: F401 - a fixture

KWARGS = {"max_new_tokens": 4}


@pytest.fixture(scope="module")
def features(real_sized_tiny):
    _, _, processor, folder = real_sized_tiny
    utterances = collect_utterances(folder / "manifest.csv")
    return log_mel_features(processor.feature_extractor, [load_audio(u.audio) for u in utterances])


def test_one_beam_is_greedy_and_more_beams_search(real_sized_tiny, features, monkeypatch):
    model, guide, processor, _ = real_sized_tiny
    greedy = [p.text for p in point_transcribe(model, guide.means(), features, processor.tokenizer, generate_kwargs=KWARGS)]
    assert beam_transcribe(model, guide.means(), features, processor.tokenizer, [1], generate_kwargs=KWARGS) == {1: greedy}
    widths = []
    search = type(model.whisper)._beam_search

    def counted(self, input_ids, *args, **kwargs):
        widths.append(input_ids.shape[0])
        return search(self, input_ids, *args, **kwargs)

    monkeypatch.setattr(type(model.whisper), "_beam_search", counted)
    decoded = beam_transcribe(model, guide.means(), features, processor.tokenizer, [1, 3, 2], generate_kwargs=KWARGS)
    assert decoded[1] == greedy and all(len(texts) == len(greedy) for texts in decoded.values())
    assert widths == [3 * len(greedy), 2 * len(greedy)]  # one search per width, its beams per utterance
    with pytest.raises(ValueError, match="numbers of beams >= 1"):
        beam_transcribe(model, guide.means(), features, processor.tokenizer, [0])


def test_temperature_samples_are_seeded_per_utterance_and_differ_across_draws(real_sized_tiny, features):
    model, guide, processor, _ = real_sized_tiny
    tokenizer, means = processor.tokenizer, guide.means()
    seeds = [utterance_seed(0, "a.wav"), utterance_seed(0, "b.wav")]
    torch.manual_seed(123)
    first = temperature_transcribe(model, means, features, tokenizer, 3, seeds, generate_kwargs=KWARGS)
    after = torch.rand(3)  # the global random state is left as it was
    torch.manual_seed(123)
    assert torch.equal(torch.rand(3), after)
    assert temperature_transcribe(model, means, features, tokenizer, 3, seeds, generate_kwargs=KWARGS) == first
    alone = temperature_transcribe(model, means, features[1:], tokenizer, 3, seeds[1:], generate_kwargs=KWARGS)
    assert alone == first[1:]  # the same samples whatever the batch
    assert all(len(rows) == 3 and len(set(rows)) > 1 for rows in first)  # the draws differ
    other = temperature_transcribe(model, means, features[:1], tokenizer, 3, [utterance_seed(1, "a.wav")],
                                   generate_kwargs=KWARGS)
    assert other != first[:1]
    assert utterance_seed(0, "a.wav") == utterance_seed(0, "a.wav") != utterance_seed(0, "b.wav")
    with pytest.raises(ValueError, match="one seed per row"):
        temperature_transcribe(model, means, features, tokenizer, 2, seeds[:1])
    with pytest.raises(ValueError, match="temperature must be > 0"):
        temperature_transcribe(model, means, features, tokenizer, 2, seeds, temperature=0.0)


def test_options_name_known_baselines_and_a_positive_temperature():
    assert PayoffOptions(baselines="temperature, beam").baselines == ("beam", "temperature")
    assert PayoffOptions(baselines="").baselines == ()
    with pytest.raises(ValueError, match=r"--baselines beam,temperature"):
        PayoffOptions(baselines=("beams",))
    with pytest.raises(ValueError, match="sample_temperature must be > 0"):
        PayoffOptions(sample_temperature=0.0)


def test_payoff_records_the_baselines_and_summarises_them_against_the_posterior_draws(real_sized_tiny):
    model, guide, processor, folder = real_sized_tiny
    utterances = collect_utterances(folder / "manifest.csv")
    options = PayoffOptions(samples=(1, 3), max_new_tokens=4, baselines=("beam", "temperature"), sample_temperature=1.5)
    records = [json.loads(json.dumps(r)) for r in decode_payoff_records(model, guide, processor, utterances, options)]
    for record in records:
        assert set(record["beam"]) == {"1", "3"} and record["beam"]["1"] == record["mean"]["text"]
        assert len(record["temperature_samples"]) == 3
    again = list(decode_payoff_records(model, guide, processor, utterances[1:], options))
    assert again[0]["temperature_samples"] == records[1]["temperature_samples"]  # seeded by utterance, not position

    summary = summarise_payoff(records, options, bootstrap_samples=20)
    new = {"beam@1", "beam@3", "temperature_mbr@1", "temperature_mbr@3"}
    assert new <= set(summary["error_rate"]) and new <= set(summary["against_mean"])
    assert set(summary["against_posterior_mbr"]) == new
    for interval in summary["against_posterior_mbr"].values():
        assert interval["low"] <= interval["estimate"] <= interval["high"]
    largest = summary["uncertainty"]["S=3"]
    assert {"disagreement", "temperature_disagreement", "mean_neg_log_prob"} <= set(largest["scores"])
    assert largest["scores"]["temperature_disagreement"]["auroc_interval"] is not None
    assert "temperature_sample_agreement" in largest["word_scores"]
    assert "temperature_disagreement" in summary["uncertainty"]["S=1"]["scores"]

    old = [{k: v for k, v in r.items() if k not in ("beam", "temperature_samples")} for r in records]
    before = summarise_payoff(old, options, bootstrap_samples=20)
    assert set(before["error_rate"]) == {"mean", "mbr@1", "mbr@3"} and before["against_posterior_mbr"] == {}
    assert "temperature_disagreement" not in before["uncertainty"]["S=3"]["scores"]
    assert before["error_rate"] == {k: v for k, v in summary["error_rate"].items() if k not in new}


@pytest.mark.slow
def test_the_study_runs_the_baselines_on_a_laplace_posterior_of_a_multilingual_model(lora_and_laplace, tmp_path):
    """A Laplace run is an ordinary posterior folder; the language reaches beam search and sampling."""
    from pyro_blora.evaluation.payoff import run_payoff_study

    root, _, _ = lora_and_laplace
    options = PayoffOptions(samples=(1, 2), max_new_tokens=3, baselines="beam,temperature")
    summary = run_payoff_study(root / "testbed", root / "laplace", tmp_path, options, lora=root / "lora",
                               domains=["zh-en"], clips_per_domain=2, dev_clips=0, bootstrap_samples=20)
    assert set(summary["against_posterior_mbr"]) == {"beam@1", "beam@2", "temperature_mbr@1", "temperature_mbr@2"}
    assert summary["error_rate"]["beam@1"] == summary["error_rate"]["mean"]

    without = tmp_path / "without"
    run_payoff_study(root / "testbed", root / "laplace", without, replace(options, baselines=()), domains=["zh-en"],
                     clips_per_domain=2, dev_clips=0, bootstrap_samples=10)
    with pytest.raises(ValueError, match=r"without the \['beam', 'temperature'\] baseline.*new output folder"):
        run_payoff_study(root / "testbed", root / "laplace", without, options, domains=["zh-en"], dev_clips=0)
