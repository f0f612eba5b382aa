"""Does the posterior learn? The convergence diagnostic, and recipes that reach sigma* where the old one does not."""

from __future__ import annotations

import json
import pyro
import pytest

from pyro_blora import BLoRAConfig, TrainConfig, build_guide, train, wrap_whisper
from pyro_blora.base_models.loading import load_processor
from pyro_blora.data.training_data import load_training_data
from pyro_blora.experiments.main_job import ALL_LINEAR_TARGETS
from pyro_blora.report.pages import write_inspection
from pyro_blora.training.convergence import RULE, kl_change
from pyro_blora.training.methods import run_training
from tests.experiment_fixtures import sequence_testbed, small_whisper_folder
from tests.tiny import TinyTask, collate, tiny_whisper

# The paper preset's start: softplus(rho), rho ~ U(-5.5, -4.5), i.e. sigma in about [4e-3, 1.1e-2].
PAPER = BLoRAConfig.paper(rank=2, target_modules=(r".*fc[12]$",))


def _trained(config: TrainConfig, adapter: BLoRAConfig = PAPER):
    pyro.clear_param_store()
    model = wrap_whisper(tiny_whisper(0), adapter)
    guide = build_guide(model, seed=0)
    return train(model, guide, TinyTask(n=16), collate, config)


RECIPE = TrainConfig.paper(steps=40, batch_size=4, lr=1e-3, warmup_steps=0, eval_every=5, progress=False,
                           curvature_batches=2)


def test_the_log_carries_the_scales_and_the_kl_and_the_result_a_verdict():
    result = _trained(RECIPE)
    evaluated = [r for r in result.history if "eval_nll" in r]
    assert [r["step"] for r in evaluated] == list(range(5, 41, 5))
    assert all(f"sigma/{g}/q{q}" in r for r in evaluated for g in ("encoder.A", "decoder.B") for q in ("05", "50", "95"))
    assert all(r["kl_analytic"] > r["kl_means"] > 0 for r in evaluated)
    verdict = result.posterior
    assert verdict["rule"] == RULE and isinstance(verdict["converged"], bool)
    assert verdict["entries"] == sum(sum(counts) for counts in verdict["histogram_log10_sigma_over_optimum"].values())
    assert set(verdict["by_group"]) == {"encoder.A", "encoder.B", "decoder.A", "decoder.B"}


def test_the_old_recipe_stays_at_its_start_and_the_converged_recipes_reach_sigma_star():
    """sigma* is about sigma_p here (the tiny model's curvature is weak), and the start is spread over
    [0.4, 1.1] sigma_p: one learning rate for means and scales leaves it spread there."""
    old = _trained(RECIPE).posterior
    assert old["sigma_vs_optimum/median_ratio"] < 0.75 and old["sigma_vs_optimum/share_within"] < 0.6
    assert not old["scales_near_optimum"]
    fast = _trained(RECIPE.replace(scale_lr_multiplier=100.0)).posterior
    assert 1 / 1.1 <= fast["sigma_vs_optimum/median_ratio"] <= 1.1 and fast["sigma_vs_optimum/share_within"] > 0.85
    started = _trained(RECIPE.replace(scale_init="curvature")).posterior
    assert started["scales_near_optimum"] and started["sigma_vs_optimum/median_abs_log_ratio"] < 0.05


def test_kl_change_reads_the_last_fifth_only():
    history = [{"step": s, "kl_analytic": kl} for s, kl in ((10, 100.0), (80, 50.0), (90, 50.5), (100, 51.0))]
    assert kl_change(history, 100) == pytest.approx(1 / 51)
    assert kl_change(history[:2], 100) is None


def test_inspect_sets_a_finished_run_against_sigma_star(tmp_path):
    model = small_whisper_folder(tmp_path / "model")
    data = load_training_data(sequence_testbed(tmp_path / "testbed") / "zh-en", load_processor(model))
    run_training("blora", model, data, tmp_path / "runs" / "blora", BLoRAConfig.paper(rank=2, target_modules=ALL_LINEAR_TARGETS),
                 TrainConfig.paper(steps=5, batch_size=2, warmup_steps=0, checkpoint_every=0, eval_every=1,
                                   curvature_batches=1, progress=False))
    result = json.loads((tmp_path / "runs" / "blora" / "result.json").read_text())
    assert result["posterior"]["kl_settled"] is not None
    page = write_inspection([tmp_path / "runs"], tmp_path / "inspection", curvature_batches=1)
    text = page.read_text()
    assert "Convergence: scales against the curvature optimum" in text
    assert f"{result['posterior']['pinned_by_data']['all']} of {result['posterior']['entries']}" in text
    assert (tmp_path / "inspection" / "optimum.png").is_file() and (tmp_path / "inspection" / "trajectories.png").is_file()
    summary = json.loads((tmp_path / "inspection" / "inspect.json").read_text())["convergence"]["blora"]
    assert summary["entries"] == result["posterior"]["entries"]
