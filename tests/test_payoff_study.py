"""The uncertainty study end to end: a blora run, its matching LoRA run, and a resumable study on a testbed."""

from __future__ import annotations

import json

import datasets
import pytest

from pyro_blora.config import BLoRAConfig, TrainConfig
from pyro_blora.data import load_speech_dataset
from pyro_blora.data.training_data import load_training_data
from pyro_blora.evaluation.payoff import PayoffOptions, run_payoff_study
from pyro_blora.experiments.uncertainty import train_matching_lora, uncertainty_study
from pyro_blora.runs import finished, read_run_config
from pyro_blora.training.methods import run_training
from tests.test_transcribe import real_sized_tiny  # noqa: F401 - a fixture


@pytest.mark.slow
def test_study_trains_the_matching_lora_and_resumes(real_sized_tiny, tmp_path):
    _, _, processor, folder = real_sized_tiny
    base = str(folder / "model")
    data = load_training_data(folder / "manifest.csv", processor, split="train")
    adapter = BLoRAConfig(rank=2, target_modules=(r".*\.q_proj$",))
    training = TrainConfig(steps=2, batch_size=2, warmup_steps=0, checkpoint_every=0, progress=False)
    run_training("blora", base, data, tmp_path / "blora", adapter, training)

    lora = train_matching_lora(tmp_path / "blora" / "posterior", tmp_path / "lora")
    assert finished(lora)
    blora_config, lora_config = read_run_config(tmp_path / "blora"), read_run_config(lora)
    assert lora_config["run"]["method"] == "lora"
    for key in ("blora", "train"):
        assert lora_config[key] == blora_config[key]
    assert {k: lora_config["run"][k] for k in ("model_source", "train_data", "train_split", "train_utterances")} == \
        {k: blora_config["run"][k] for k in ("model_source", "train_data", "train_split", "train_utterances")}

    rows = load_speech_dataset(folder / "manifest.csv", split="train")
    testbed = tmp_path / "testbed"
    datasets.DatasetDict({"dev": rows, "test": rows}).save_to_disk(str(testbed / "en"))
    datasets.DatasetDict({"test": rows}).save_to_disk(str(testbed / "backward-en"))  # no dev split: no temperature
    options = PayoffOptions(samples=(1, 2), max_new_tokens=3)
    out = tmp_path / "study"
    summary = run_payoff_study(testbed, tmp_path / "blora", out, options, lora=lora, dev_clips=2,
                               bootstrap_samples=20)
    assert summary["utterances"] == 2 * len(rows)
    assert set(summary["error_rate"]) == {"mean", "mbr@1", "mbr@2", "lora"}
    assert set(json.loads((out / "temperatures.json").read_text())) == {"mean", "lora"}
    records = (out / "utterances.jsonl").read_text().splitlines()
    assert sorted({json.loads(line)["domain"] for line in records}) == ["backward-en", "en"]

    again = uncertainty_study(testbed, tmp_path / "blora", out, options, lora=lora, dev_clips=2, bootstrap_samples=20)
    assert (out / "utterances.jsonl").read_text().splitlines() == records  # nothing decoded twice
    assert again["error_rate"] == summary["error_rate"]
    assert (out / "S2-reliability.png").is_file()
    with pytest.raises(ValueError, match="matched to a finished blora run"):
        train_matching_lora(lora, tmp_path / "other")


@pytest.mark.slow
def test_a_posterior_trained_with_a_cut_encoder_is_studied_with_its_window(real_sized_tiny, tmp_path):
    """Transcription refuses such a posterior (it runs 30 s windows); the study scores short test
    utterances with the window the posterior and its LoRA were trained with, and refuses a LoRA of
    another window."""
    from pyro_blora.runs import load_for_transcription

    _, _, processor, folder = real_sized_tiny
    base = str(folder / "model")
    data = load_training_data(folder / "manifest.csv", processor, split="train")
    adapter = BLoRAConfig(rank=2, target_modules=(r".*\.q_proj$",))
    training = TrainConfig(steps=1, batch_size=2, warmup_steps=0, checkpoint_every=0, progress=False,
                           encoder_window_seconds=10)
    run_training("blora", base, data, tmp_path / "blora", adapter, training)
    with pytest.raises(ValueError, match="10 s encoder window"):
        load_for_transcription(tmp_path / "blora" / "posterior")
    lora = train_matching_lora(tmp_path / "blora" / "posterior", tmp_path / "lora")
    run_training("lora", base, data, tmp_path / "lora-full", adapter, training.replace(encoder_window_seconds=30))

    rows = load_speech_dataset(folder / "manifest.csv", split="train")
    testbed = tmp_path / "testbed"
    datasets.DatasetDict({"dev": rows, "test": rows}).save_to_disk(str(testbed / "en"))
    options = PayoffOptions(samples=(1,), max_new_tokens=3)
    summary = run_payoff_study(testbed, tmp_path / "blora", tmp_path / "study", options, lora=lora, dev_clips=2,
                               bootstrap_samples=20)
    assert summary["utterances"] == len(rows) and set(summary["error_rate"]) == {"mean", "mbr@1", "lora"}
    with pytest.raises(ValueError, match="trained with a 30 s encoder window and the posterior with 10 s"):
        run_payoff_study(testbed, tmp_path / "blora", tmp_path / "other", options, lora=tmp_path / "lora-full",
                         dev_clips=0)
