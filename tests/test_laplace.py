"""A Laplace posterior around a finished LoRA loads wherever a trained posterior does."""

from __future__ import annotations

import pytest
import torch

from pyro_blora.config import BLoRAConfig, TrainConfig
from pyro_blora.experiments.main_job import ALL_LINEAR_TARGETS
from pyro_blora.experiments.step import export_run
from pyro_blora.data.training_data import load_training_data
from pyro_blora.base_models.loading import load_processor
from pyro_blora.posterior import load_posterior
from pyro_blora.runs import finished, load_for_transcription, load_run_model, read_run_config
from pyro_blora.training.laplace import laplace_posterior
from pyro_blora.training.methods import run_training
from tests.experiment_fixtures import sequence_testbed, small_whisper_folder

ADAPTER = BLoRAConfig(rank=2, target_modules=ALL_LINEAR_TARGETS)
# A wide prior, so that the small random model's weak curvature shows against it.
PRIOR = BLoRAConfig.paper(prior_scale=0.5)
STEPS = TrainConfig(steps=2, batch_size=2, lr=1e-2, warmup_steps=1, checkpoint_every=0, progress=False)


@pytest.fixture(scope="module")
def lora_and_laplace(tmp_path_factory):
    root = tmp_path_factory.mktemp("laplace")
    model = small_whisper_folder(root / "model")
    processor = load_processor(model)
    data = load_training_data(sequence_testbed(root / "testbed") / "zh-en", processor, cache_dir=root / "cache")
    run_training("lora", model, data, root / "lora", ADAPTER, STEPS)
    result = laplace_posterior(root / "lora", data, root / "laplace", prior=PRIOR, batches=2, batch_size=2)
    return root, data, result


def test_the_mean_is_the_lora_and_the_scales_come_from_the_curvature(lora_and_laplace):
    root, _, result = lora_and_laplace
    assert finished(root / "laplace")
    assert read_run_config(root / "laplace")["run"]["laplace_of"] == str(root / "lora")
    lora, _, _ = load_run_model(root / "lora")
    laplace, _, _ = load_run_model(root / "laplace")  # what evaluate scores: the posterior mean
    for (name, a), (_, b) in zip(lora.state_dict().items(), laplace.state_dict().items()):
        assert torch.allclose(a, b, atol=1e-6), name
    whisper, _, _ = load_run_model(read_run_config(root / "lora")["run"]["model_source"])
    model, guide = load_posterior(root / "laplace" / "posterior", whisper)
    sigma = torch.cat([s.flatten() for s in guide.stddevs().values()])
    prior = PRIOR.prior_scale
    assert (sigma <= prior * (1 + 1e-5)).all() and (sigma < 0.99 * prior).any()  # the data pin some entries
    assert model.config.kl_normalization == "matrix" and model.config.rank == ADAPTER.rank
    pinned = result["laplace"]["pinned_by_data"]
    assert pinned["all"] == int((sigma**2 < prior**2 / 2).sum()) == pinned["encoder.A"] + pinned["encoder.B"] + \
        pinned["decoder.A"] + pinned["decoder.B"]


def test_it_transcribes_exports_and_becomes_a_prior(lora_and_laplace, tmp_path):
    root, data, _ = lora_and_laplace
    model, guide, processor = load_for_transcription(root / "laplace" / "posterior")
    assert set(guide.stddevs()) == set(model.site_names())
    export_run(root / "laplace", tmp_path / "export")
    assert (tmp_path / "export" / "config.json").is_file()
    run_training("blora", read_run_config(root / "lora")["run"]["model_source"], data, tmp_path / "next",
                 PRIOR.replace(rank=2, alpha=None, target_modules=ALL_LINEAR_TARGETS), STEPS, prior_from=root / "laplace")
    assert finished(tmp_path / "next")


def test_unfinished_or_full_runs_are_refused(lora_and_laplace, tmp_path):
    root, data, _ = lora_and_laplace
    with pytest.raises(ValueError, match="not a finished run"):
        laplace_posterior(tmp_path / "nothing", data, tmp_path / "out")


def test_the_command_writes_a_laplace_run_from_the_runs_own_data(lora_and_laplace, tmp_path, monkeypatch):
    from typer.testing import CliRunner

    from pyro_blora.cli import app

    root, _, _ = lora_and_laplace
    config = read_run_config(root / "lora")["run"]
    monkeypatch.chdir(root)  # the run names its data relative to where it was trained
    outcome = CliRunner().invoke(app, ["laplace", str(root / "lora"), "--out", str(tmp_path / "cli"),
                                       "--curvature-batches", "1", "--batch-size", "2", "--prior-scale", "0.5",
                                       "--data", config["train_data"]])
    assert outcome.exit_code == 0, outcome.output
    assert "pinned_by_data" in outcome.output and finished(tmp_path / "cli")
    missing = CliRunner().invoke(app, ["laplace", str(tmp_path), "--out", str(tmp_path / "x")])
    assert missing.exit_code == 2 and "Traceback" not in missing.output
