"""Sequential adaptation on a one-layer Whisper: posterior as prior, run chains, the sequence runner."""

from __future__ import annotations

import json

import pytest
import torch

from pyro_blora.config import BLoRAConfig, TrainConfig
from pyro_blora.evaluation import EvalOptions
from pyro_blora.experiment import ALL_LINEAR_TARGETS
from pyro_blora.methods import load_run_model, load_training_data, run_training
from pyro_blora.objective import analytic_kl
from pyro_blora.posterior import load_posterior
from pyro_blora.weights import load_processor, load_whisper
from tests.experiment_fixtures import sequence_testbed, small_whisper_folder

ADAPTER = BLoRAConfig(rank=2, target_modules=ALL_LINEAR_TARGETS, kl_normalization="token")
STEPS = TrainConfig(steps=2, batch_size=2, lr=1e-2, warmup_steps=1, checkpoint_every=1, progress=False)
EVAL = EvalOptions(batch_size=2, decode_limit=1, extra_new_tokens=2, progress=False)


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    root = tmp_path_factory.mktemp("sequential")
    model = small_whisper_folder(root / "model")
    testbed = sequence_testbed(root / "testbed")
    processor = load_processor(model)
    data = {d: load_training_data(testbed / d, processor, cache_dir=root / "cache") for d in ("zh-en", "es-en")}
    return {"root": root, "model": model, "testbed": testbed, "processor": processor, "data": data}


@pytest.fixture(scope="module")
def first_blora(workspace):
    run_dir = workspace["root"] / "first-blora"
    run_training("blora", workspace["model"], workspace["data"]["zh-en"], run_dir, ADAPTER, STEPS)
    return run_dir


def test_posterior_as_prior_starts_at_zero_kl(workspace, first_blora, tmp_path):
    data = workspace["data"]["es-en"]
    # The guide starts at run 1's posterior in both runs; only the prior differs.
    as_prior = run_training("blora", workspace["model"], data, tmp_path / "prior", ADAPTER, STEPS, prior_from=first_blora)
    default = run_training("blora", workspace["model"], data, tmp_path / "init", ADAPTER, STEPS, init_from=first_blora)
    assert as_prior.history[0]["kl"] == 0.0  # Trace_ELBO's estimate at the copied posterior
    assert default.history[0]["kl"] > 1.0
    assert as_prior.history[-1]["kl"] > 0.0  # training on the new domain moved the posterior off its prior

    # The closed-form KL: zero for run 1's posterior against the prior run 2 saved, positive against N(0, sigma_p).
    first_model, first_guide = load_posterior(first_blora / "posterior", load_whisper(workspace["model"])[0])
    second_model, second_guide = load_posterior(tmp_path / "prior" / "posterior", load_whisper(workspace["model"])[0])
    def kl(model, guide) -> float:
        return float(sum(analytic_kl(model, guide).values()).detach())

    assert kl(second_model, first_guide) == 0.0
    assert kl(first_model, first_guide) > 1.0
    assert kl(second_model, second_guide) > 0.0
    site = second_model.site_names()[0]
    assert torch.equal(second_model.site_prior(site).base_dist.scale, first_guide.stddevs()[site])
    config = json.loads((tmp_path / "prior" / "config.json").read_text())
    assert config["run"]["prior_from"] == str(first_blora)


def test_prior_from_refuses_unfinished_runs_other_methods_and_other_adapters(workspace, first_blora, tmp_path):
    data = workspace["data"]["es-en"]
    with pytest.raises(ValueError, match="not a finished blora run"):
        run_training("blora", workspace["model"], data, tmp_path / "a", ADAPTER, STEPS, prior_from=tmp_path)
    with pytest.raises(ValueError, match="other adapters: rank 2 there, 4 here"):
        run_training("blora", workspace["model"], data, tmp_path / "b", ADAPTER.replace(rank=4), STEPS,
                     prior_from=first_blora)
    with pytest.raises(ValueError, match="share their base model"):
        run_training("blora", "tiny.en", data, tmp_path / "c", ADAPTER, STEPS, prior_from=first_blora)
    with pytest.raises(ValueError, match="prior_from works with the methods blora, map"):
        run_training("lora", workspace["model"], data, tmp_path / "d", ADAPTER, STEPS, prior_from=first_blora)


def test_map_prior_from_is_a_penalty_towards_the_previous_point(workspace, first_blora, tmp_path):
    run_training("map", workspace["model"], workspace["data"]["es-en"], tmp_path / "map", ADAPTER,
                 STEPS.replace(steps=1), prior_from=first_blora)
    model, guide = load_posterior(tmp_path / "map" / "posterior", load_whisper(workspace["model"])[0])
    _, first_guide = load_posterior(first_blora / "posterior", load_whisper(workspace["model"])[0])
    site = model.site_names()[0]
    prior = model.site_prior(site).base_dist
    assert torch.equal(prior.loc, first_guide.means()[site])
    assert torch.allclose(prior.scale, torch.tensor(ADAPTER.prior_scale))


def test_a_run_folder_is_a_model_source_and_lora_continues_its_adapter(workspace, tmp_path):
    data = workspace["data"]
    first = tmp_path / "lora1"
    run_training("lora", workspace["model"], data["zh-en"], first, ADAPTER, STEPS)
    second = tmp_path / "lora2"
    run_training("lora", workspace["model"], data["es-en"], second, ADAPTER, STEPS, init_from=first)
    merged_first, _, _ = load_run_model(first)
    merged_second, _, _ = load_run_model(second)
    changed = [n for n, p in merged_second.state_dict().items() if not torch.equal(p, merged_first.state_dict()[n])]
    assert changed
    # A fresh BLoRA on top of the first run's merged model: evaluation loads the chain run -> run -> base.
    fresh = tmp_path / "fresh"
    run_training("blora", first, data["es-en"], fresh, ADAPTER, STEPS)
    chained, _, description = load_run_model(fresh)
    assert "blora" in description
    assert any(not torch.equal(p, merged_first.state_dict()[n]) for n, p in chained.state_dict().items())
