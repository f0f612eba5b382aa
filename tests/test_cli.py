"""The experiment's commands through Typer's runner: train (each method) -> evaluate -> files."""

from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

from pyro_blora.cli import app
from tests.experiment_fixtures import fake_testbed, small_whisper_folder

runner = CliRunner()


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    root = tmp_path_factory.mktemp("cli")
    return {"root": root, "model": small_whisper_folder(root / "model"), "testbed": fake_testbed(root / "testbed")}


def invoke(*args: str):
    result = runner.invoke(app, [str(a) for a in args])
    assert result.exit_code == 0, f"{result.output}\n{result.exception!r}"
    return result


TRAIN = ("--steps", "2", "--batch-size", "2", "--rank", "2", "--warmup-steps", "1", "--no-progress")


@pytest.mark.parametrize("method,weights,curves", [("blora", "posterior", True), ("lora", "adapter", True),
                                                   ("map", "posterior", False), ("full", "model", False)])
def test_train_then_evaluate_writes_the_run_files(inputs, method, weights, curves):
    run = inputs["root"] / method
    curve = ("--eval-every", "2", "--eval-testbed", inputs["testbed"], "--eval-domains", "backward-es",
             "--eval-utterances", "1", "--eval-decoded", "1") if curves else ()
    invoke("train", "--method", method, "--data", inputs["testbed"] / "zh-en", "--out", run, "--model", inputs["model"],
           "--targets", "all-linear", "--cache-dir", inputs["root"] / "cache", *curve, *TRAIN)
    for name in ("config.json", "log.jsonl", "result.json", "checkpoints", weights):
        assert (run / name).exists(), name
    last = json.loads((run / "log.jsonl").read_text().splitlines()[-1])
    assert ("backward-es/language_id" in last) == curves
    result = invoke("evaluate", run, "--testbed", inputs["testbed"], "--domains", "zh-en", "--domains", "backward-es",
                    "--decode-limit", "1" if curves else "0", "--batch-size", "2", "--cache-dir",
                    inputs["root"] / "cache", "--no-progress")
    report = json.loads((run / "eval.json").read_text())
    assert set(report["results"]) == {"zh-en", "backward-es"}
    assert "backward-es" in result.output and "LID" in result.output


def test_evaluate_against_base_and_another_run(inputs):
    base = inputs["root"] / "base-eval.json"
    invoke("evaluate", inputs["model"], "--testbed", inputs["testbed"], "--domains", "zh-en", "--decode-limit", "0",
           "--out", base, "--no-progress")
    run = inputs["root"] / "lora-2"
    invoke("train", "--method", "lora", "--data", inputs["testbed"] / "zh-en", "--out", run, "--model", inputs["model"],
           *TRAIN)
    result = invoke("evaluate", run, "--testbed", inputs["testbed"], "--domains", "zh-en", "--decode-limit", "0",
                    "--base", base, "--against", inputs["root"] / "lora", "--no-progress")
    report = json.loads((run / "eval.json").read_text())
    assert "ce" in report["relative_to_base"]["zh-en"] and "ce" in report["relative_to_against"]["zh-en"]
    assert "relative change against base" in result.output


def test_bad_method_and_resume_messages(inputs):
    result = runner.invoke(app, ["train", "--method", "adapterx", "--data", str(inputs["testbed"] / "zh-en"),
                                 "--out", str(inputs["root"] / "x"), "--model", str(inputs["model"]), *TRAIN])
    assert result.exit_code == 2 and "Invalid value for --method: use one of blora" in result.output


def test_main_and_commands_are_registered():
    result = invoke("--help")
    for command in ("train", "evaluate", "main", "testbed"):
        assert command in result.output
    assert "--steps" in invoke("main", "--help").output


def test_help_shows_the_config_defaults_and_presets():
    from pyro_blora.config import BLoRAConfig, RetentionBudget

    text = " ".join(runner.invoke(app, ["train", "--help"], env={"COLUMNS": "300"}).output.split())
    assert f"[{BLoRAConfig().rank}]" in text and f"[{RetentionBudget.every}]" in text
    assert "[converged, paper: matrix; default: parameter]" in text and "qk, attention, all-linear" in text
    assert "[converged: all-linear; paper, default: qk]" in text  # the adapted layers, by preset


def test_target_presets_are_one_definition():
    from pyro_blora.commands.options import preset_configs
    from pyro_blora.config import ALL_LINEAR_TARGETS, TARGET_PRESETS, target_patterns
    from pyro_blora.experiments.main_job import MainJobConfig

    assert MainJobConfig().blora.target_modules == ALL_LINEAR_TARGETS == TARGET_PRESETS["all-linear"]
    for name, patterns in TARGET_PRESETS.items():
        assert preset_configs("default", {"targets": name}, {})[0].target_modules == patterns == target_patterns(name)
    assert target_patterns(r".*\.v_proj$") == (r".*\.v_proj$",)


def test_testbed_options_change_the_build(monkeypatch, tmp_path):
    import pyro_blora.commands.testbed as command

    built = {}
    monkeypatch.setattr(command, "build_testbed", lambda out, config, seed, overwrite: built.update(config=config) or {})
    invoke("testbed", "--out", tmp_path, "--small", "--pairs", "es-en", "--codeswitch-sizes", "3", "1", "1",
           "--backward-language", "de", "--backward-language", "fr", "--english-noise-fraction", "0")
    config = built["config"]
    assert config.pairs == ("es-en",) and config.codeswitch_sizes == (3, 1, 1)
    assert config.backward_languages == ("de", "fr") and config.english_noise_fraction == 0.0
    assert config.english_sizes == command.TestbedConfig.small().english_sizes
    invoke("testbed", "--out", tmp_path)
    assert built["config"] == command.TestbedConfig()
