"""The run folder's one "finished" test, and experiments that resume a run killed before its weights."""

from __future__ import annotations

import json
import shutil

import pytest

from pyro_blora.config import ALL_LINEAR_TARGETS, BLoRAConfig, TrainConfig
from pyro_blora.data.training_data import load_training_data
from pyro_blora.evaluation.scoring import EvalOptions, load_eval_sets
from pyro_blora.experiments.main_job import MainJobConfig, run_main_job
from pyro_blora.experiments.sweep import SweepConfig, run_sweep
from pyro_blora.base_models.loading import load_processor
from pyro_blora.runs import RESULT_FILE, find_runs, finished, has_checkpoints, load_run_model, posterior_encoder_window
from pyro_blora.testbed import TestbedConfig
from pyro_blora.training import methods
from tests.experiment_fixtures import fake_testbed, small_whisper_folder

ADAPTER = BLoRAConfig(rank=2, target_modules=ALL_LINEAR_TARGETS)
STEPS = TrainConfig(steps=2, batch_size=2, lr=1e-2, warmup_steps=1, checkpoint_every=1, progress=False)
EVAL = EvalOptions(batch_size=2, decode_limit=0, progress=False)


class Killed(BaseException):
    """What a kill looks like to the code it interrupts: nothing catches it."""


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    root = tmp_path_factory.mktemp("runs")
    model = small_whisper_folder(root / "model")
    testbed = fake_testbed(root / "testbed")
    processor = load_processor(model)
    return {"root": root, "model": model, "testbed": testbed, "processor": processor}


def main_job_config(workspace, out):
    config = MainJobConfig(out=out, model=str(workspace["model"]), testbed=TestbedConfig.small(),
                           eval_domains=("zh-en", "backward-es"), methods=("blora",), blora=ADAPTER,
                           train=STEPS, curve_utterances=1, curve_decoded=0, eval_limit=1,
                           real_english=(("en-digits", 1),), frontier_scales=(0.5,), transcript_clips=1,
                           transcript_samples=2)
    shutil.copytree(workspace["testbed"], out / "testbed")  # reused: stamped with the job's config and seed
    stamp = {"settings": config.testbed.settings(), "seed": config.testbed_seed}
    (out / "testbed" / "build-config.json").write_text(json.dumps(stamp, default=str))
    return config


def test_main_job_finishes_a_blora_run_killed_before_its_posterior(workspace, monkeypatch):
    out = workspace["root"] / "main"
    config = main_job_config(workspace, out)
    run_dir = out / "runs" / "blora"

    def kill(*args, **kwargs):
        raise Killed()

    with monkeypatch.context() as patch:
        patch.setattr(methods, "save_posterior", kill)
        with pytest.raises(Killed):
            run_main_job(config, echo=lambda line: None)
    assert not finished(run_dir) and has_checkpoints(run_dir) and not (run_dir / RESULT_FILE).exists()

    lines = []
    outcome = run_main_job(config, echo=lines.append)
    assert finished(run_dir) and (run_dir / "posterior" / "posterior.safetensors").is_file()
    assert "blora" in outcome["evaluations"] and (run_dir / "eval.json").is_file()
    assert len(json.loads((run_dir / RESULT_FILE).read_text())) > 0
    load_run_model(run_dir)  # the model loads: what used to fail

    # A folder an older version left with its result written before its posterior: not finished,
    # and the next run of the job trains on from the last checkpoint instead of failing to load it.
    shutil.rmtree(run_dir / "posterior")
    (run_dir / "eval.json").unlink()
    assert not finished(run_dir) and (run_dir / RESULT_FILE).is_file()
    with pytest.raises(FileNotFoundError, match="--resume"):
        load_run_model(run_dir)
    run_main_job(config, echo=lines.append)
    assert finished(run_dir) and (run_dir / "eval.json").is_file()
    load_run_model(run_dir)


def test_sweep_finishes_a_point_whose_result_outlived_its_posterior(workspace):
    processor = workspace["processor"]
    cache = workspace["root"] / "cache"
    data = load_training_data(workspace["testbed"] / "zh-en", processor, cache_dir=cache)
    sets = load_eval_sets(workspace["testbed"], ["zh-en", "en"], processor, limit=1, cache_dir=cache)
    out = workspace["root"] / "sweep"
    grid = SweepConfig(betas=(0.5,), ranks=(2,), methods=("blora",))
    lines = []
    sweep = lambda: run_sweep(grid, workspace["model"], data, sets, out, adapter=ADAPTER,  # noqa: E731
                              train=STEPS, eval_options=EVAL, echo=lines.append)
    sweep()
    [run_dir] = find_runs([out / "runs"])
    shutil.rmtree(run_dir / "posterior")
    assert not finished(run_dir)
    lines.clear()
    rows = sweep()
    assert any(line.endswith(": training") for line in lines) and finished(run_dir)
    assert len(rows) == 1 and rows[0]["in_domain_ce"] > 0


def test_finished_needs_config_weights_and_result(tmp_path):
    run_dir = tmp_path / "run"
    assert not finished(run_dir)
    run_dir.mkdir()
    (run_dir / "config.json").write_text(json.dumps({"run": {"method": "lora"}}))
    (run_dir / "log.jsonl").write_text("")
    assert not finished(run_dir)
    (run_dir / "adapter").mkdir()
    assert not finished(run_dir)  # weights without a result: killed while writing them
    (run_dir / RESULT_FILE).write_text("{}")
    assert finished(run_dir)
    (run_dir / "config.json").write_text(json.dumps({"run": {"method": "nonsense"}}))
    assert not finished(run_dir)
    # Reports read results, not weights: a run folder published without its weights is still found.
    shutil.rmtree(run_dir / "adapter")
    assert find_runs([tmp_path]) == [run_dir]
    (run_dir / RESULT_FILE).unlink()
    assert find_runs([tmp_path], with_result=False) == [run_dir]
    with pytest.raises(FileNotFoundError, match="pyro-blora train"):
        find_runs([tmp_path])


def test_a_posterior_without_its_window_takes_the_window_of_its_run(tmp_path):
    """Posteriors saved before the window was put in their metadata read it from the run holding them."""
    posterior = tmp_path / "run" / "posterior"
    posterior.mkdir(parents=True)
    (posterior / "posterior.json").write_text(json.dumps({"metadata": {}}))
    assert posterior_encoder_window(posterior) == 30.0  # no run folder around it: Whisper's window
    (tmp_path / "run" / "config.json").write_text(json.dumps({"run": {"method": "blora"},
                                                              "train": {"encoder_window_seconds": 10.0}}))
    assert posterior_encoder_window(posterior) == 10.0
    (posterior / "posterior.json").write_text(json.dumps({"metadata": {"encoder_window_seconds": 8.0}}))
    assert posterior_encoder_window(posterior) == 8.0  # its own metadata first
