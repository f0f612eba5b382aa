"""Sequential adaptation on a one-layer Whisper: posterior as prior, run chains, the sequence runner."""

from __future__ import annotations

import json
from dataclasses import replace

import pytest
import torch

from pyro_blora.config import BLoRAConfig, TrainConfig
from pyro_blora.evaluation.scoring import EvalOptions
from pyro_blora.experiments.main_job import ALL_LINEAR_TARGETS
from pyro_blora.data.training_data import load_training_data
from pyro_blora.runs import base_model_of, load_run_model
from pyro_blora.training.continual import PriorTransfer
from pyro_blora.training.methods import run_training
from pyro_blora.posterior import read_posterior_config
from pyro_blora.model.objective import analytic_kl
from pyro_blora.posterior import load_posterior
from pyro_blora.experiments.sequence import STRATEGIES, SequenceConfig, plan_sequence, run_sequence
from pyro_blora.experiments.sequence_results import SequenceResult, matrix_page, write_comparison
from pyro_blora.metrics.continual import average_final, backward_transfer, forgetting
from pyro_blora.report.plots import plot_matrix
from pyro_blora.base_models.loading import load_processor, load_whisper
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


def test_map_prior_from_is_a_penalty_towards_the_previous_point_with_its_scales(workspace, first_blora, tmp_path):
    one_step = STEPS.replace(steps=1)
    run_training("map", workspace["model"], workspace["data"]["es-en"], tmp_path / "map", ADAPTER, one_step,
                 prior_from=first_blora)
    model, guide = load_posterior(tmp_path / "map" / "posterior", load_whisper(workspace["model"])[0])
    _, first_guide = load_posterior(first_blora / "posterior", load_whisper(workspace["model"])[0])
    site = model.site_names()[0]
    prior = model.site_prior(site).base_dist
    assert torch.equal(prior.loc, first_guide.means()[site])
    assert torch.equal(prior.scale, first_guide.stddevs()[site])  # the posterior's own scales, per entry
    # After a point estimate there are no scales to copy: the prior's width around that point.
    run_training("map", workspace["model"], workspace["data"]["zh-en"], tmp_path / "map2", ADAPTER, one_step,
                 prior_from=tmp_path / "map")
    second, _ = load_posterior(tmp_path / "map2" / "posterior", load_whisper(workspace["model"])[0])
    prior = second.site_prior(site).base_dist
    assert torch.equal(prior.loc, guide.means()[site])
    assert torch.allclose(prior.scale, torch.tensor(ADAPTER.prior_scale))


def test_map_anchor_is_an_isotropic_prior_on_the_previous_adapters_at_their_mean_precision(workspace, first_blora,
                                                                                            tmp_path):
    data, steps = workspace["data"]["es-en"], STEPS.replace(steps=4, warmup_steps=0)
    run_training("map", workspace["model"], data, tmp_path / "anchor", ADAPTER, steps, prior_from=first_blora,
                 prior_transfer=PriorTransfer(scales="mean-precision"))
    run_training("map", workspace["model"], data, tmp_path / "fresh", ADAPTER, steps, init_from=first_blora)
    _, first_guide = load_posterior(first_blora / "posterior", load_whisper(workspace["model"])[0])
    anchor_model, _ = load_posterior(tmp_path / "anchor" / "posterior", load_whisper(workspace["model"])[0])
    stds = torch.cat([s.double().flatten() for s in first_guide.stddevs().values()])
    expected = float((1.0 / stds.square()).mean()) ** -0.5
    previous = first_guide.means()
    for site in anchor_model.site_names():
        prior = anchor_model.site_prior(site).base_dist
        assert torch.equal(prior.loc, previous[site])
        assert torch.allclose(prior.scale.double(), torch.tensor(expected, dtype=torch.float64), rtol=1e-6)
    summary = read_posterior_config(tmp_path / "anchor" / "posterior")["metadata"]["prior"]
    assert summary["isotropic_scale"] == pytest.approx(expected) and summary["floored_fraction"] == 0.0
    config = json.loads((tmp_path / "anchor" / "config.json").read_text())["run"]
    assert config["prior_transfer"]["scales"] == "mean-precision"
    assert config["prior_transfer"]["precision_from"] == str(first_blora)

    def distance(folder) -> float:
        values = load_posterior(folder / "posterior", load_whisper(workspace["model"])[0])[1].means()
        return float(sum((values[s] - previous[s]).square().sum() for s in previous)) ** 0.5

    assert 0 < distance(tmp_path / "anchor") < 0.5 * distance(tmp_path / "fresh")


def test_prior_scale_floor_raises_the_copied_scales_and_says_by_how_much(workspace, first_blora, tmp_path):
    _, first_guide = load_posterior(first_blora / "posterior", load_whisper(workspace["model"])[0])
    stds = torch.cat([s.flatten() for s in first_guide.stddevs().values()])
    floor = float(stds.median())
    run_training("blora", workspace["model"], workspace["data"]["es-en"], tmp_path / "floored", ADAPTER,
                 STEPS.replace(steps=1), prior_from=first_blora, prior_transfer=PriorTransfer(scale_floor=floor))
    model, _ = load_posterior(tmp_path / "floored" / "posterior", load_whisper(workspace["model"])[0])
    for site, std in first_guide.stddevs().items():
        assert torch.equal(model.site_prior(site).base_dist.scale, std.clamp(min=floor))
    summary = read_posterior_config(tmp_path / "floored" / "posterior")["metadata"]["prior"]
    assert summary["floored_fraction"] == pytest.approx(float((stds < floor).double().mean()))
    assert summary["mean_precision"] < summary["mean_precision_copied"]
    assert summary["scale_quantiles"]["q05"] >= floor * (1 - 1e-6)
    with pytest.raises(ValueError, match="give prior_from too"):
        run_training("blora", workspace["model"], workspace["data"]["es-en"], tmp_path / "x", ADAPTER, STEPS,
                     prior_transfer=PriorTransfer(scale_floor=floor))
    with pytest.raises(ValueError, match="scale_floor must be > 0"):
        PriorTransfer(scale_floor=0.0)


def test_a_run_folder_is_a_model_source(workspace, first_blora, tmp_path):
    # A fresh BLoRA on the first run's posterior mean merged into its base; evaluation loads run -> run -> base.
    fresh = tmp_path / "fresh"
    run_training("blora", first_blora, workspace["data"]["es-en"], fresh, ADAPTER, STEPS.replace(steps=1))
    merged_first, _, _ = load_run_model(first_blora)
    chained, _, description = load_run_model(fresh)
    assert "blora run fresh" in description and base_model_of(fresh) == str(workspace["model"])
    assert any(not torch.equal(p, merged_first.state_dict()[n]) for n, p in chained.state_dict().items())


# ----------------------------------------------------------------------------------- sequences
def sequence_config(workspace, strategy: str, **changes) -> SequenceConfig:
    values = dict(strategy=strategy, domains=("zh-en", "es-en"), model=str(workspace["model"]), blora=ADAPTER,
                  train=STEPS, replay_size=2, eval_limit=1, evaluation=EVAL)
    values.update(changes)
    return SequenceConfig(**values)


def test_metrics_of_a_hand_made_matrix():
    # Columns: en (original, step 0), d1 (step 1), d2 (step 2); rows: start, after d1, after d2.
    matrix = [[0.10, 0.80, 0.90],
              [0.20, 0.30, 0.70],
              [0.25, 0.50, 0.40]]
    learned_at = [0, 1, 2]
    assert average_final(matrix) == pytest.approx((0.25 + 0.50 + 0.40) / 3)
    assert backward_transfer(matrix, learned_at) == pytest.approx(((0.25 - 0.10) + (0.50 - 0.30)) / 2)
    assert forgetting(matrix, learned_at) == pytest.approx([0.25 - 0.10, 0.50 - 0.30, None])
    improving = [[0.5, 0.9], [0.4, 0.3], [0.35, 0.2]]  # en keeps improving; d1 learned at step 2 only
    assert backward_transfer(improving, [0, 2]) == pytest.approx(0.35 - 0.5)  # negative: later steps helped
    assert forgetting(improving, [0, 2]) == pytest.approx([0.35 - 0.4, None])


def test_matrix_reports_of_a_hand_made_result(tmp_path):
    result = SequenceResult("blora-prior", ("d1", "d2"), ["start", "step1-d1", "step2-d2"], ["en", "d1", "d2"],
                            [0, 1, 2], {"error_rate": [[0.1, 0.8, 0.9], [0.2, 0.3, 0.7], [0.25, 0.5, 0.4]]})
    assert result.to_dict()["metrics"]["error_rate"]["bwt"] == pytest.approx(0.175)
    figure = plot_matrix(result.matrices["error_rate"], result.rows, result.columns, "error_rate", "title")
    assert [t.get_text() for t in figure.axes[0].texts][:3] == ["10.0%", "80.0%", "90.0%"]
    page = write_comparison([result], tmp_path / "comparison.md").read_text()
    assert "| blora-prior | error_rate | 38.3% | 17.5% | 15.0% | 20.0% | - |" in page
    assert "| step1-d1 | 20.0% | 30.0% | 70.0% |" in matrix_page(result)
    (tmp_path / "matrix.json").write_text(json.dumps(result.to_dict()))
    assert SequenceResult.load(tmp_path / "matrix.json") == result


def test_strategies_plan_their_steps_and_share_first_steps(workspace, tmp_path):
    plans = {s: plan_sequence(sequence_config(workspace, s), tmp_path) for s in STRATEGIES}
    order = tmp_path / "zh-en_es-en"
    assert plans["blora-prior"][0] == plans["blora-fresh"][0]
    assert plans["lora-replay"][0] == plans["lora"][0]
    assert plans["blora-prior"][1].prior_from == order / "blora-fresh" / "step1-zh-en"
    assert plans["blora-fresh"][1].model_source == str(order / "blora-fresh" / "step1-zh-en")
    assert plans["lora"][1].init_from == order / "lora" / "step1-zh-en" and plans["lora"][1].replay == ()
    assert plans["lora-replay"][1].replay == ("zh-en",)
    assert plans["lora-replay"][1].run_dir == order / "lora-replay" / "step2-es-en"
    assert plans["map-anchor"][0] == plans["blora-fresh"][0]
    assert plans["map-anchor"][1].method == "map" and plans["map-anchor"][1].prior_transfer.scales == "mean-precision"
    assert plans["map-anchor"][1].prior_transfer.precision_from == order / "blora-fresh" / "step1-zh-en"
    # Three domains: step 3 is anchored on map-anchor's step 2, as strong as blora-prior's step-3 prior.
    three = plan_sequence(sequence_config(workspace, "map-anchor", domains=("zh-en", "es-en", "en-x"),
                                          original_domains=(), prior_scale_floor=1e-3), tmp_path)
    folder = tmp_path / "zh-en_es-en_en-x"
    assert three[2].prior_from == folder / "map-anchor-floor0.001" / "step2-es-en"
    assert three[2].prior_transfer.precision_from == folder / "blora-prior-floor0.001" / "step2-es-en"
    assert three[2].prior_transfer.scale_floor == 1e-3
    assert plans["blora-prior"][1].prior_transfer == PriorTransfer()
    # laplace-prior: MAP at every step; the next step's prior is the Laplace posterior around the last.
    first, second = plans["laplace-prior"]
    assert first.method == second.method == "map" and first.run_dir == order / "laplace-prior" / "step1-zh-en"
    assert first.laplace_out == order / "laplace-prior" / "step1-zh-en-laplace" and second.laplace_out is None
    assert second.prior_from == first.laplace_out and second.prior_transfer == PriorTransfer()


def test_bad_sequences_are_refused(workspace, tmp_path):
    with pytest.raises(ValueError, match="unknown strategy 'ewc'"):
        sequence_config(workspace, "ewc")
    with pytest.raises(ValueError, match=r"unknown domains \['fr-en'\]"):
        run_sequence(sequence_config(workspace, "lora", domains=("zh-en", "fr-en")), workspace["testbed"], tmp_path)
    with pytest.raises(ValueError, match="once"):
        sequence_config(workspace, "lora", domains=("zh-en", "en"))
    with pytest.raises(ValueError, match="prior_scale_floor acts on the copied priors"):
        sequence_config(workspace, "lora", prior_scale_floor=1e-3)
    with pytest.raises(ValueError, match="run the blora-prior strategy on this order first"):
        run_sequence(sequence_config(workspace, "map-anchor", domains=("zh-en", "es-en", "en"), original_domains=()),
                     workspace["testbed"], tmp_path / "anchor", echo=lambda line: None)


def test_a_killed_sequence_resumes_to_the_same_matrix(workspace, tmp_path):
    config = sequence_config(workspace, "blora-prior", evaluation=replace(EVAL, decode_limit=0))  # CE only: quicker
    whole = run_sequence(config, workspace["testbed"], tmp_path / "whole", echo=lambda line: None)

    def kill_after_first(step):
        if step.number == 1:
            raise KeyboardInterrupt("killed")

    with pytest.raises(KeyboardInterrupt):
        run_sequence(config, workspace["testbed"], tmp_path / "killed", after_step=kill_after_first, echo=lambda line: None)
    lines = []
    resumed = run_sequence(config, workspace["testbed"], tmp_path / "killed", echo=lines.append)
    assert not any("step 1/2: blora" in line for line in lines)  # the first step was not trained again
    assert resumed.matrices == whole.matrices
    assert set(whole.matrices) == {"ce"} and len(whole.matrices["ce"]) == 3
    assert whole.columns == ["en", "zh-en", "es-en"] and whole.rows == ["start", "step1-zh-en", "step2-es-en"]
    # A step killed mid-training resumes from its checkpoint: drop step 2's end and run again.
    step2 = tmp_path / "killed" / "zh-en_es-en" / "blora-prior" / "step2-es-en"
    for name in ("result.json", "checkpoints/step-00000002.pt"):
        (step2 / name).unlink()
    for stale in list(step2.glob("eval-*.json")):
        stale.unlink()
    again = run_sequence(config, workspace["testbed"], tmp_path / "killed", echo=lambda line: None)
    assert again.matrices == whole.matrices


def test_laplace_prior_trains_map_under_the_laplace_posterior_of_the_previous_step(workspace, tmp_path):
    config = sequence_config(workspace, "laplace-prior", evaluation=replace(EVAL, decode_limit=0),
                             train=STEPS.replace(curvature_batches=1))
    lines = []
    result = run_sequence(config, workspace["testbed"], tmp_path, echo=lines.append)
    folder = tmp_path / "zh-en_es-en" / "laplace-prior"
    laplace = folder / "step1-zh-en-laplace"
    assert json.loads((laplace / "config.json").read_text())["run"]["laplace_of"] == str(folder / "step1-zh-en")
    assert any("Laplace posterior around it" in line for line in lines)
    whisper = load_whisper(workspace["model"])[0]
    _, laplace_guide = load_posterior(laplace / "posterior", whisper)
    second, _ = load_posterior(folder / "step2-es-en" / "posterior", load_whisper(workspace["model"])[0])
    for site, scale in laplace_guide.stddevs().items():
        prior = second.site_prior(site).base_dist
        assert torch.equal(prior.loc, laplace_guide.means()[site]) and torch.equal(prior.scale, scale)
    assert result.rows == ["start", "step1-zh-en", "step2-es-en"]
    assert json.loads((folder / "step2-es-en" / "config.json").read_text())["run"]["method"] == "map"


def test_sequence_command_writes_matrices_markdown_and_heatmaps(workspace, tmp_path):
    from typer.testing import CliRunner

    from pyro_blora.cli import app

    args = ["sequence", "--testbed", workspace["testbed"], "--out", tmp_path, "--domains", "zh-en", "--domains", "es-en",
            "--strategy", "lora-replay", "--model", workspace["model"], "--rank", "2",
            "--steps", "1", "--batch-size", "2", "--warmup-steps", "1", "--replay-size", "1", "--eval-limit", "1",
            "--decode-limit", "0", "--encoder-window", "10", "--no-progress"]
    result = CliRunner().invoke(app, [str(a) for a in args])
    assert result.exit_code == 0, f"{result.output}\n{result.exception!r}"
    order = tmp_path / "zh-en_es-en"
    folder = order / "lora-replay"
    # the window cuts every step's run, and the start model is scored with the same cut
    assert [json.loads(path.read_text())["encoder_window_seconds"] for path in (tmp_path / "start").glob("eval-*.json")] == [10]
    assert json.loads((folder / "step2-es-en" / "config.json").read_text())["train"]["encoder_window_seconds"] == 10
    assert [json.loads(path.read_text())["encoder_window_seconds"]
            for path in (folder / "step2-es-en").glob("eval-*.json")] == [10]
    matrix = json.loads((folder / "matrix.json").read_text())
    assert matrix["rows"] == ["start", "step1-zh-en", "step2-es-en"] and matrix["columns"] == ["en", "zh-en", "es-en"]
    assert len(matrix["matrices"]["ce"]) == 3 and "bwt" in matrix["metrics"]["ce"]
    assert (folder / "heatmap.png").read_bytes().startswith(b"\x89PNG")
    assert "| after |" in (folder / "matrix.md").read_text()
    assert json.loads((folder / "sequence.json").read_text())["seed"] == 0
    assert not (folder / "step1-zh-en").exists() and (order / "lora" / "step1-zh-en" / "adapter").is_dir()
    replayed = json.loads((folder / "step2-es-en" / "config.json").read_text())["run"]
    assert "replay(zh-en:1)" in replayed["train_data"]
    assert replayed["init_from"] == str(order / "lora" / "step1-zh-en")  # the same LoRA adapter, trained on
    assert "| lora-replay |" in (order / "comparison.md").read_text()
    intervals = json.loads((order / "comparison-intervals.json").read_text())
    bwt = intervals["sequences"]["lora-replay"]["bwt"]
    assert intervals["metric"] == "ce" and bwt["estimate"] == pytest.approx(matrix["metrics"]["ce"]["bwt"])
    assert "95% bootstrap intervals" in (order / "comparison.md").read_text()
    bad = CliRunner().invoke(app, [str(a) for a in args[:-1]] + ["--strategy", "ewc"])
    assert bad.exit_code != 0 and "unknown strategies" in bad.output


def test_sequence_command_takes_the_paper_preset_a_floor_and_map_anchor(workspace, tmp_path):
    from typer.testing import CliRunner

    from pyro_blora.cli import app

    args = ["sequence", "--testbed", workspace["testbed"], "--out", tmp_path, "--domains", "zh-en", "--domains", "es-en",
            "--strategy", "map-anchor", "--strategy", "blora-prior", "--model", workspace["model"], "--preset", "paper",
            "--rank", "2", "--prior-scale-floor", "1e-3", "--steps", "1", "--batch-size", "2", "--warmup-steps", "1",
            "--eval-limit", "1", "--decode-limit", "0", "--no-progress"]
    result = CliRunner().invoke(app, [str(a) for a in args])
    assert result.exit_code == 0, f"{result.output}\n{result.exception!r}"
    order = tmp_path / "zh-en_es-en"
    recorded = json.loads((order / "map-anchor-floor0.001" / "sequence.json").read_text())
    assert recorded["blora"]["kl_normalization"] == "matrix" and recorded["train"]["weight_noise"] == "flipout"
    assert recorded["blora"]["target_modules"] == list(BLoRAConfig.paper().target_modules)
    assert recorded["prior_scale_floor"] == 1e-3
    anchor = json.loads((order / "map-anchor-floor0.001" / "step2-es-en" / "config.json").read_text())["run"]
    assert anchor["method"] == "map" and anchor["prior_from"] == str(order / "blora-fresh" / "step1-zh-en")
    assert anchor["prior_transfer"] == {"scales": "mean-precision", "scale_floor": 1e-3,
                                        "precision_from": str(order / "blora-fresh" / "step1-zh-en")}
    assert (order / "blora-prior-floor0.001" / "matrix.json").is_file()
    assert "| map-anchor-floor0.001 |" in (order / "comparison.md").read_text()
    # a strategy added later: the comparison keeps the ones run before it
    again = [a if a != "map-anchor" else "blora-prior" for a in args]
    again[again.index("--prior-scale-floor"):again.index("--prior-scale-floor") + 2] = []
    result = CliRunner().invoke(app, [str(a) for a in again])
    assert result.exit_code == 0, f"{result.output}\n{result.exception!r}"
    strategies = [line.split(" | ")[0][2:] for line in (order / "comparison.md").read_text().splitlines()
                  if line.startswith("| ") and " | ce | " in line]
    assert strategies == ["blora-prior", "blora-prior-floor0.001", "map-anchor-floor0.001"]


def test_sequence_intervals_are_paired_and_centred_on_the_matrix_metrics():
    from pyro_blora.metrics.bootstrap import bootstrap_sequences
    from pyro_blora.metrics.continual import sequence_metrics
    from tests.test_analysis import synthetic_evaluations

    evaluation = synthetic_evaluations(1, 40)
    columns, learned_at = ("en", "zh-en"), (0, 1)
    a = [evaluation(rate) for rate in (0.1, 0.3, 0.2)]
    b = [a[0], evaluation(0.05), evaluation(0.4)]
    found = bootstrap_sequences({"a": a, "b": b}, columns, learned_at, "error_rate", reference="a", samples=300)
    expected = {}
    for name, rows in (("a", a), ("b", b)):
        matrix = [[row["results"][d]["error_rate"] for d in columns] for row in rows]
        expected[name] = sequence_metrics(matrix, columns, learned_at)
        for key in ("average_final", "bwt"):
            interval = found[name][key]
            assert interval.estimate == pytest.approx(expected[name][key])
            assert interval.low <= interval.estimate <= interval.high and interval.low < interval.high
    difference = found["b − a"]["average_final"]
    assert difference.estimate == pytest.approx(expected["b"]["average_final"] - expected["a"]["average_final"])
    # the same rows under another name: every resample moves both alike, so the paired difference is exactly 0
    same = bootstrap_sequences({"a": a, "copy": a}, columns, learned_at, "error_rate", reference="a", samples=300)
    assert (same["copy − a"]["bwt"].low, same["copy − a"]["bwt"].high) == (0.0, 0.0)
    # every pair: each sequence against every one before it, the same draws as against one reference
    c = [a[0], evaluation(0.2), evaluation(0.1)]
    pairs = bootstrap_sequences({"a": a, "b": b, "c": c}, columns, learned_at, "error_rate", all_pairs=True, samples=300)
    assert {key for key in pairs if " − " in key} == {"b − a", "c − a", "c − b"}
    assert pairs["b − a"]["bwt"] == found["b − a"]["bwt"]
    assert pairs["c − b"]["average_final"].estimate == pytest.approx(
        sequence_metrics([[row["results"][d]["error_rate"] for d in columns] for row in c], columns, learned_at)["average_final"]
        - expected["b"]["average_final"])
    with pytest.raises(ValueError, match="same, non-zero number of evaluated rows"):
        bootstrap_sequences({"a": a, "b": b[:2]}, columns, learned_at, "error_rate")
