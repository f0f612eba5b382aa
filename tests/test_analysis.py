"""inspect, sweep and report on a one-layer Whisper: train -> evaluate -> inspect -> report through the CLI."""

from __future__ import annotations

import csv
import json
import re
import shutil
import struct
import zlib

import pytest
import torch
import typer
from typer.testing import CliRunner

from pyro_blora.report.summaries import load_run_weights, run_summary
from pyro_blora.runs import find_runs, read_log
from pyro_blora.cli import app
from pyro_blora.commands.options import comma_values
from pyro_blora.config import BLoRAConfig
from pyro_blora.runs import load_run_model
from pyro_blora.metrics import sparsity_report
from pyro_blora.report.tables import markdown_table
from pyro_blora.experiments.sweep import SweepConfig, SweepPoint, sweep_points
from pyro_blora.base_models.loading import load_whisper
from tests.experiment_fixtures import fake_testbed, small_whisper_folder

runner = CliRunner()
TRAIN = ("--steps", "2", "--batch-size", "2", "--rank", "2", "--warmup-steps", "1", "--targets", "all-linear",
         "--no-progress")
EVAL = ("--domains", "zh-en", "--domains", "backward-es", "--decode-limit", "0", "--batch-size", "2", "--no-progress")


def invoke(*args):
    result = runner.invoke(app, [str(a) for a in args])
    assert result.exit_code == 0, f"{result.output}\n{result.exception!r}"
    return result


def assert_png(path):
    """A complete PNG: signature, a non-empty IHDR and an IEND chunk, every chunk's CRC correct."""
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n", path
    position, chunks = 8, []
    while position < len(data):
        (length,) = struct.unpack(">I", data[position:position + 4])
        kind, body = data[position + 4:position + 8], data[position + 8:position + 8 + length]
        (crc,) = struct.unpack(">I", data[position + 8 + length:position + 12 + length])
        assert zlib.crc32(kind + body) == crc, f"{path}: bad CRC in {kind}"
        chunks.append((kind, body))
        position += 12 + length
    assert chunks[0][0] == b"IHDR" and chunks[-1][0] == b"IEND"
    width, height = struct.unpack(">II", chunks[0][1][:8])
    assert width > 50 and height > 50


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    """blora and lora runs (two steps, dev curves at step 2), evaluated against the base model; the
    dataclass defaults (--preset default: alpha = 2 * rank), which the checks below assume."""
    root = tmp_path_factory.mktemp("analysis")
    model, testbed, cache = small_whisper_folder(root / "model"), fake_testbed(root / "testbed"), root / "cache"
    invoke("evaluate", model, "--testbed", testbed, *EVAL, "--cache-dir", cache, "--out", root / "base.json")
    for method in ("blora", "lora"):
        invoke("train", "--method", method, "--data", testbed / "zh-en", "--out", root / "runs" / method,
               "--model", model, "--cache-dir", cache, "--eval-every", "2", "--eval-testbed", testbed,
               "--eval-domains", "backward-es", "--eval-utterances", "1", "--eval-decoded", "0", "--preset", "default",
               *TRAIN)
        invoke("evaluate", root / "runs" / method, "--testbed", testbed, *EVAL, "--cache-dir", cache,
               "--base", root / "base.json")
    return {"root": root, "model": model, "testbed": testbed, "cache": cache}


def test_inspect_writes_table_and_plots(workspace):
    out = workspace["root"] / "inspection"
    result = invoke("inspect", workspace["root"] / "runs", "--out", out)
    page = (out / "inspect.md").read_text()
    for name in ("magnitudes.png", "energy.png", "layers.png", "scales.png"):
        assert_png(out / name)
        assert f"]({name})" in page
    [scales] = json.loads((out / "inspect.json").read_text())["scales"]
    weights = load_run_weights(workspace["root"] / "runs" / "blora")
    sigma_B = torch.cat([v.flatten() for v in weights.stddev_B.values()]).double()
    assert scales["run"] == "blora" and scales["sigma_B_q50"] == pytest.approx(float(sigma_B.quantile(0.5)))
    near = ((sigma_B > weights.prior_scale / 2) & (sigma_B < 2 * weights.prior_scale)).double().mean()
    assert scales["sigma_B_near_prior"] == pytest.approx(float(near))
    rows = json.loads((out / "inspect.json").read_text())["sparsity"]
    assert {(r["run"], r["matrix"]) for r in rows} == {(m, x) for m in ("blora", "lora") for x in ("A", "B", "dW")}
    assert "hoyer_index" in result.output and "| blora | blora | dW |" in result.output
    layers = json.loads((out / "inspect.json").read_text())["layers"]
    assert len(layers["blora"]) == 16 and all(row["kl"] > 0 for row in layers["blora"])
    assert "kl" not in layers["lora"][0]


def test_blora_delta_is_what_the_merged_model_adds(workspace):
    weights = load_run_weights(workspace["root"] / "runs" / "blora")
    merged, _, _ = load_run_model(workspace["root"] / "runs" / "blora")
    base, _ = load_whisper(workspace["model"])
    merged_modules, base_modules = dict(merged.named_modules()), dict(base.named_modules())
    for path, delta in weights.delta.items():
        torch.testing.assert_close(merged_modules[path].weight - base_modules[path].weight, delta, atol=1e-6, rtol=1e-4)
    assert weights.bayesian and set(weights.kl) == set(weights.delta)


def test_lora_delta_comes_from_the_peft_adapter(workspace):
    from safetensors.torch import load_file

    run = workspace["root"] / "runs" / "lora"
    weights = load_run_weights(run)
    tensors = load_file(str(run / "adapter" / "adapter_model.safetensors"))
    layer = "model.decoder.layers.0.fc1"
    A = next(v for k, v in tensors.items() if f".{layer}.lora_A" in k)
    B = next(v for k, v in tensors.items() if f".{layer}.lora_B" in k)
    torch.testing.assert_close(weights.delta[layer], 2.0 * B @ A)  # alpha = 2 * rank by default
    assert weights.sparsity()["dW"] == sparsity_report(weights.delta)


def test_report_writes_markdown_plots_and_summary(workspace):
    out = workspace["root"] / "report"
    invoke("report", workspace["root"] / "runs", "--out", out)
    page = (out / "report.md").read_text()
    images = re.findall(r"\]\(([^)]+\.png)\)", page)
    assert set(images) == {"frontier.png", "sparsity.png", "forgetting.png", "curves-blora.png", "curves-lora.png"}
    for name in images:
        assert_png(out / name)
    with (out / "summary.csv").open() as handle:
        rows = list(csv.DictReader(handle))
    assert [r["method"] for r in rows] == ["blora", "lora"]
    summary = run_summary(workspace["root"] / "runs" / "blora")
    expected = (summary["backward_ce"] / json.loads((workspace["root"] / "base.json").read_text())["results"]
                ["backward-es"]["ce"]) - 1
    assert summary["backward_ce_change"] == pytest.approx(expected)
    assert summary["in_domain"] == "zh-en" and summary["beta"] == 0.5
    assert run_summary(workspace["root"] / "runs" / "lora", sparsity=False)["beta"] is None


@pytest.mark.slow
def test_sweep_skips_finished_points_on_rerun(workspace):
    out = workspace["root"] / "sweep"
    args = ("sweep", "--data", workspace["testbed"] / "zh-en", "--testbed", workspace["testbed"], "--out", out,
            "--model", workspace["model"], "--domains", "zh-en", "--domains", "en", "--betas", "0.5,2",
            "--ranks", "2", "--steps", "1", "--batch-size", "2", "--warmup-steps", "0", "--decode-limit", "0",
            "--cache-dir", workspace["cache"], "--no-progress", "--delta-scales", "0.5,1", "--ce-only-scales", "0.25",
            "--encoder-window", "10")
    first = invoke(*args)
    assert first.output.count(": training") == 2
    assert first.output.count("at delta scale 0.5") == 2 and first.output.count("at delta scale 0.25 (CE only)") == 2
    names = ["blora-r2-beta0.5-sp0.01-parameter", "blora-r2-beta2-sp0.01-parameter"]
    # The base model is scored with the runs' encoder window.
    assert json.loads((out / "base" / "eval.json").read_text())["encoder_window_seconds"] == 10
    assert json.loads((out / "runs" / names[0] / "config.json").read_text())["train"]["encoder_window_seconds"] == 10
    scaled = json.loads((out / "runs" / names[0] / "eval-scale0.25.json").read_text())
    assert scaled["delta_scale"] == 0.25 and scaled["options"]["decode_limit"] == 0
    assert not (out / "runs" / names[0] / "eval-scale1.json").exists()
    (out / "runs" / names[0] / "eval-scale0.5.json").unlink()
    results = json.loads((out / "results.json").read_text())
    assert [r["point"] for r in results] == names
    assert results[0]["dW_hoyer_index"] >= 0 and results[0]["backward_ce"] > 0 and "backward_ce_change" in results[0]
    stamp = (out / "runs" / names[0] / "result.json").stat().st_mtime_ns
    (out / "runs" / names[1] / "eval.json").unlink()
    second = invoke(*args)
    assert second.output.count("finished, skipped") == 1 and ": training" not in second.output
    assert f"{names[1]}: evaluating" in second.output
    assert second.output.count("delta scale") == 1 and f"{names[0]}: evaluating at delta scale 0.5" in second.output
    assert (out / "runs" / names[0] / "result.json").stat().st_mtime_ns == stamp
    with (out / "results.csv").open() as handle:
        assert len(list(csv.DictReader(handle))) == 2
    by_setting = (out / "by-setting.md").read_text()
    assert "blora-r2-beta2-sp0.01-parameter | 0 |" in by_setting and "backward CE Δ vs base (95% CI)" in by_setting
    row = json.loads((out / "by-setting.json").read_text())[0]
    assert row["backward_ce_vs_base_low"] <= row["backward_ce_vs_base"] <= row["backward_ce_vs_base_high"]


@pytest.mark.slow
def test_sweep_with_baselines_curves_and_the_domain_table(workspace):
    out = workspace["root"] / "sweep-table"
    invoke("sweep", "--data", workspace["testbed"] / "zh-en", "--testbed", workspace["testbed"], "--out", out,
           "--model", workspace["model"], "--domains", "zh-en", "--domains", "en", "--methods", "blora,lora,full",
           "--betas", "0.5", "--ranks", "2", "--seeds", "0,1", "--steps", "2", "--batch-size", "2",
           "--warmup-steps", "0", "--full-lr", "3e-5", "--eval-every", "1", "--curve-utterances", "2",
           "--curve-decoded", "1", "--decode-limit", "1", "--cache-dir", workspace["cache"], "--no-progress")
    runs = out / "runs"
    assert json.loads((runs / "full-r2" / "config.json").read_text())["train"]["lr"] == 3e-5
    assert json.loads((runs / "lora-r2-s1" / "config.json").read_text())["train"]["lr"] == 1e-3
    start = json.loads((out / "base" / "dev-curves.json").read_text())["results"]
    assert set(start) == {"zh-en", "en"} and start["en"]["ce"] > 0
    log = read_log(runs / "blora-r2-beta0.5-sp0.01-parameter")
    assert [r["step"] for r in log if "en/ce" in r] == [1, 2] and all("zh-en/error_rate" in r for r in log)

    result = invoke("table", out, "--out", workspace["root"] / "table")
    rows = json.loads((workspace["root"] / "table.json").read_text())
    assert [r["method"] for r in rows] == ["base", "blora-r2-beta0.5-sp0.01-parameter", "lora-r2", "full-r2"]
    assert all(r["domain"] == "zh-en" for r in rows) and rows[1]["seeds"] == "0,1"
    base = json.loads((out / "base" / "eval.json").read_text())["results"]
    assert rows[0]["backward error"] == f"{100 * base['en']['error_rate']:.1f}%"
    assert rows[1]["backward gain vs LoRA"].endswith("%") and rows[2]["backward gain vs LoRA"] == "-"
    assert "[" in rows[1]["backward gain (95% CI)"] and rows[2]["backward gain (95% CI)"] == "-"
    assert "[" in rows[3]["backward Δ vs base (95% CI)"] and "degradation reduction vs LoRA" in rows[1]
    assert "CE scope" not in rows[0]  # every eval.json of the table has the same CE scope
    assert "| zh-en | base |" in result.output
    assert rows[0]["backward language ID"] == f"{base['en']['language_id']:.0%}"

    invoke("report", out, "--out", out / "report")
    assert "![forgetting curves](forgetting.png)" in (out / "report" / "report.md").read_text()
    assert_png(out / "report" / "forgetting.png")


def test_forgetting_curves_start_at_the_base_model(workspace):
    from pyro_blora.report.plots import plot_forgetting_curves

    runs = {m: workspace["root"] / "runs" / m for m in ("blora", "lora")}
    figure = plot_forgetting_curves(runs, start={"backward-es": {"ce": 9.0}})
    ce_panel = next(a for a in figure.axes if a.get_title() == "backward-es: CE (nats/token)")
    for line in ce_panel.get_lines():
        assert line.get_xdata()[0] == 0 and line.get_ydata()[0] == 9.0 and list(line.get_xdata()[1:]) == [2]
    with pytest.raises(ValueError, match="eval_every"):
        plot_forgetting_curves({}, None)


def test_sweep_grid_points():
    points = sweep_points(SweepConfig(betas=(0.5, 1.0), prior_scales=(0.01, 0.1), ranks=(4, 8),
                                      kl_normalizations=("parameter",), methods=("blora", "lora")))
    assert len(points) == 2 * 2 * 2 + 2
    assert SweepPoint("lora", 4) in points and len({p.name for p in points}) == len(points)
    adapter = SweepPoint("blora", 8, 1.0, 0.1, "token").adapter(BLoRAConfig(target_modules=("x",)))
    assert (adapter.rank, adapter.beta, adapter.prior_scale, adapter.kl_normalization) == (8, 1.0, 0.1, "token")


@pytest.mark.parametrize("changes,message", [({"betas": (0.0,)}, "beta must be > 0"), ({"ranks": ()}, "ranks is empty"),
                                             ({"methods": ("dora",)}, "methods must be among"),
                                             ({"kl_normalizations": ("batch",)}, "kl_normalizations must be among")])
def test_sweep_config_names_the_problem(changes, message):
    with pytest.raises(ValueError, match=message):
        SweepConfig(**changes)


def test_bad_inputs_say_what_to_do(tmp_path):
    with pytest.raises(typer.BadParameter, match="comma-separated"):
        comma_values("0.1,x", float, "--betas")
    with pytest.raises(FileNotFoundError, match="pyro-blora train"):
        find_runs([tmp_path])
    assert markdown_table([{"a": 1.23456, "b": None}]) == "| a | b |\n|---|---|\n| 1.235 | - |"


def test_sweep_seeds_multiply_the_grid_and_keep_seed_zero_names():
    points = sweep_points(SweepConfig(betas=(0.5,), methods=("blora", "lora"), seeds=(0, 1, 2)))
    assert [p.name for p in points[:2]] == ["blora-r32-beta0.5-sp0.01-parameter", "lora-r32"]
    assert "blora-r32-beta0.5-sp0.01-parameter-s2" in {p.name for p in points} and len(points) == 6
    assert {p.setting for p in points} == {"blora-r32-beta0.5-sp0.01-parameter", "lora-r32"}
    with pytest.raises(ValueError, match="seeds must be integers"):
        SweepConfig(seeds=(-1,))


def test_seed_summary_and_the_papers_two_comparisons():
    from pyro_blora.experiments.sweep import by_setting_markdown, paper_comparisons, summarize_seeds

    def row(method, setting, seed, in_domain, backward):
        return {"method": method, "setting": setting, "seed": seed, "rank": 32,
                "in_domain_error": in_domain, "backward_error": backward}

    rows = [row("lora", "lora-r32", 0, 0.10, 0.30), row("lora", "lora-r32", 1, 0.14, 0.50),
            row("blora", "blora-x", 0, 0.11, 0.20), row("blora", "blora-x", 1, 0.13, 0.20)]
    summary = summarize_seeds(rows)
    lora = next(s for s in summary if s["setting"] == "lora-r32")
    assert lora["seeds"] == "0,1"
    assert lora["backward_error_mean"] == pytest.approx(0.40) and lora["backward_error_std"] == pytest.approx(0.1414, abs=1e-4)
    (comparison,) = paper_comparisons(summary)
    # Backward: LoRA 0.40 vs BLoRA 0.20 -> gain 50%; in-domain: 0.12 vs 0.12 -> drop 0%.
    assert comparison["backward_gain"] == pytest.approx(0.5) and comparison["in_domain_drop"] == pytest.approx(0.0)
    page = by_setting_markdown(summary, [comparison])
    assert "| blora-x | 0,1 | 12.0 ± 1.4% | 20.0 ± 0.0% |" in page and "+50.0%" in page
    single = by_setting_markdown(summarize_seeds(rows[:1]), [])
    assert "| lora-r32 | 0 | 10.0% | 30.0% |" in single  # one seed: no ± 0.0


def test_report_labels_name_the_sweep_where_run_names_collide(tmp_path):
    from pyro_blora.report.pages import _labels

    paths = [tmp_path / "zh-en" / "runs" / "full-r32", tmp_path / "zh-en-lr" / "runs" / "full-r32",
             tmp_path / "a" / "lora", tmp_path / "b" / "lora", tmp_path / "runs" / "blora"]
    assert _labels(paths) == ["zh-en/full-r32", "zh-en-lr/full-r32", "a/lora", "b/lora", "blora"]


def test_report_draws_delta_scale_curves_and_paired_differences(workspace):
    run = workspace["root"] / "runs" / "blora"
    invoke("evaluate", run, "--testbed", workspace["testbed"], *EVAL, "--cache-dir", workspace["cache"],
           "--base", workspace["root"] / "base.json", "--delta-scale", "0.5,1")
    from pyro_blora.report.summaries import interpolation_curve

    curve = interpolation_curve(run)
    assert [p["scale"] for p in curve] == [0.5, 1.0] and all(p["ce_scope"] == "transcript" for p in curve)
    out = workspace["root"] / "report-scaled"
    invoke("report", workspace["root"] / "runs", "--out", out, "--base", workspace["root"] / "base.json")
    page = (out / "report.md").read_text()
    assert "## Paired differences" in page and "![frontier](frontier.png)" in page
    paired = page.split("## Paired differences")[1]
    row = next(line for line in paired.splitlines() if line.startswith("| blora |"))
    assert row.count("[") == 1  # backward CE against base; error intervals need decoding (decode limit 0)
    assert_png(out / "frontier.png")


def test_frontier_draws_one_line_per_run_from_the_base_point(tmp_path):
    from pyro_blora.report.plots import plot_frontier, save_figure

    def point(scale, error, ce):
        return {"scale": scale, "in_domain_error": 0.5 - 0.2 * scale, "backward_error": 0.1 + error * scale,
                "in_domain_ce": 2.0 - scale, "backward_ce": 1.0 + ce * scale, "ce_scope": "transcript"}

    curves = {"lora": {"method": "lora", "points": [point(s, 0.3, 1.0) for s in (0.5, 1.0)]},
              "blora": {"method": "blora", "points": [point(s, 0.1, 0.2) for s in (0.25, 0.5, 1.0)]}}
    base = {"in_domain_error": 0.5, "backward_error": 0.1, "in_domain_ce": 2.0, "backward_ce": 1.0}
    figure = plot_frontier(curves, base)
    error_panel, ce_panel = figure.axes
    for panel, x_key, y_key in ((error_panel, "in_domain_error", "backward_error"), (ce_panel, "in_domain_ce", "backward_ce")):
        lines = panel.get_lines()
        assert [len(line.get_xdata()) for line in lines] == [3, 4]
        for line, curve in zip(lines, curves.values()):
            assert (line.get_xdata()[0], line.get_ydata()[0]) == (base[x_key], base[y_key])
            assert list(line.get_xdata()[1:]) == [p[x_key] for p in curve["points"]]
    assert {t.get_text() for t in error_panel.get_legend().get_texts()} == {"lora", "blora", "base (λ = 0)"}
    assert "transcript tokens" in ce_panel.get_xlabel()
    assert_png(save_figure(figure, tmp_path / "frontier.png"))
    with pytest.raises(ValueError, match="evaluate"):
        plot_frontier({"x": {"method": "lora", "points": []}})


def test_sweep_preset_paper_builds_its_configs_from_the_paper_classmethods(workspace, monkeypatch):
    import pyro_blora.commands.analysis
    from pyro_blora.config import DEFAULT_TARGETS, TrainConfig

    calls = {}
    monkeypatch.setattr(pyro_blora.commands.analysis, "run_sweep", lambda grid, *args, **kwargs: calls.update(grid=grid, **kwargs))
    invoke("sweep", "--data", workspace["testbed"] / "zh-en", "--testbed", workspace["testbed"], "--model",
           workspace["model"], "--domains", "zh-en", "--preset", "paper", "--betas", "0.5", "--steps", "3",
           "--encoder-window", "10", "--delta-scales", "0.5,1", "--ce-only-scales", "0.2", "--cache-dir",
           workspace["cache"], "--no-progress")
    paper = BLoRAConfig.paper(target_modules=DEFAULT_TARGETS)
    assert calls["adapter"] == paper
    assert calls["train"] == TrainConfig.paper(steps=3, batch_size=2 * 2, lr=1e-3, warmup_steps=10, precision="fp32",
                                               checkpoint_every=50, eval_every=0, progress=False,
                                               encoder_window_seconds=10)
    grid = calls["grid"]
    assert (grid.kl_normalizations, grid.ranks, grid.prior_scales) == ((paper.kl_normalization,), (paper.rank,),
                                                                       (paper.prior_scale,))
    assert (calls["delta_scales"], calls["ce_only_scales"]) == ((0.5, 1.0), (0.2,))
    calls.clear()
    invoke("sweep", "--data", workspace["testbed"] / "zh-en", "--testbed", workspace["testbed"], "--model",
           workspace["model"], "--domains", "zh-en", "--cache-dir", workspace["cache"], "--no-progress")
    assert calls["adapter"] == BLoRAConfig(target_modules=DEFAULT_TARGETS) and calls["train"].steps == 200


def test_seed_summary_does_not_average_ce_over_scopes():
    from pyro_blora.experiments.sweep import by_setting_markdown, summarize_seeds

    rows = [{"method": "lora", "setting": "lora-r32", "seed": seed, "rank": 32, "backward_ce": ce, "ce_scope": scope}
            for seed, (ce, scope) in enumerate(((2.0, "all"), (3.0, "transcript")))]
    (mixed,) = summarize_seeds(rows)
    assert mixed["ce_scope"] == "mixed: all, transcript" and "backward_ce_mean" not in mixed
    (single,) = summarize_seeds(rows[1:])
    assert single["ce_scope"] == "transcript" and single["backward_ce_mean"] == rows[1]["backward_ce"]
    assert "CE scope" in by_setting_markdown([mixed], []) and "CE scope" not in by_setting_markdown([single], [])


def synthetic_evaluations(seed: int, utterances: int):
    """A function rate -> an eval result on zh-en and en whose per-utterance errors are binomial at that rate."""
    import numpy as np

    rng = np.random.default_rng(seed)
    ids, ref = [f"u{i}" for i in range(utterances)], rng.integers(2, 10, size=utterances)

    def evaluation(rate):
        errors = rng.binomial(ref, rate)
        return {"results": {d: {"error_rate": errors.sum() / ref.sum(), "per_utterance": {
            "ids": ids, "errors": errors.tolist(), "ref_tokens": ref.tolist()}} for d in ("zh-en", "en")}}

    return evaluation


def test_paired_intervals_pool_seeds_and_skip_old_evaluations():
    from pyro_blora.report.summaries import paired_intervals
    from pyro_blora.experiments.sweep import paper_comparisons, summarize_seeds

    evaluation = synthetic_evaluations(0, 30)

    base = evaluation(0.1)
    runs, rows = [], []
    for method, setting, rate in (("lora", "lora-r32", 0.5), ("blora", "blora-x", 0.3)):
        for seed in (0, 1):
            e = evaluation(rate)
            row = {"method": method, "setting": setting, "seed": seed, "rank": 32, "in_domain": "zh-en",
                   "backward_domains": "en", "in_domain_error": e["results"]["zh-en"]["error_rate"],
                   "backward_error": e["results"]["en"]["error_rate"]}
            runs.append((row, e))
            rows.append(row)
    intervals = paired_intervals(runs, base, samples=200)
    (comparison,) = paper_comparisons(summarize_seeds(rows), {"backward_error": base["results"]["en"]["error_rate"]})
    for name in ("backward_gain", "degradation_reduction", "in_domain_drop"):
        assert intervals["blora-x"][name].estimate == pytest.approx(comparison[name])
    assert set(intervals["lora-r32"]) == {"in_domain_error_vs_base", "backward_error_vs_base"}  # no CE records
    old = [(row, {"results": {d: {"error_rate": 0.2} for d in ("zh-en", "en")}}) for row, _ in runs]
    assert paired_intervals(old, base) == {"lora-r32": {}, "blora-x": {}}


def test_paired_intervals_compare_blora_with_the_lora_of_the_same_targets():
    from pyro_blora.report.summaries import paired_intervals

    evaluation = synthetic_evaluations(1, 40)

    runs = []
    for method, setting, targets, rate in (("lora", "lora-all", ("all",), 0.6), ("lora", "lora-qk", ("q", "k"), 0.1),
                                           ("blora", "blora-qk", ("q", "k"), 0.1)):
        runs.append(({"method": method, "setting": setting, "seed": 0, "rank": 32, "targets": targets,
                      "in_domain": "zh-en", "backward_domains": "en"}, evaluation(rate)))
    intervals = paired_intervals(runs, evaluation(0.1), samples=200)
    # Against the q/k LoRA (about the same error), not the all-linear one (0.6): no large difference.
    assert abs(intervals["blora-qk"]["backward_error_vs_lora"].estimate) < 0.15


def test_report_of_run_folders_published_without_weights(workspace, tmp_path):
    """A run folder copied without its trained weights still reports: frontier, intervals, curves; no sparsity."""
    published = tmp_path / "published"
    for method in ("blora", "lora"):
        shutil.copytree(workspace["root"] / "runs" / method, published / f"{method}-s0",
                        ignore=shutil.ignore_patterns("posterior", "adapter", "checkpoints"))
    invoke("report", published, "--base", workspace["root"] / "base.json", "--out", tmp_path / "report")
    page = (tmp_path / "report" / "report.md").read_text()
    assert "## Stability-plasticity frontier" in page and "## Paired differences" in page
    assert "2 of the runs have no trained weights" in page and not (tmp_path / "report" / "sparsity.png").exists()


def test_early_stopping_step_is_the_lowest_dev_ce(tmp_path):
    from pyro_blora.report.summaries import early_stopping_step

    records = [{"step": 1, "loss": 3.0}, {"step": 25, "zh-en/ce": 0.48, "en/ce": 0.2},
               {"step": 50, "zh-en/ce": 0.31}, {"step": 75, "zh-en/ce": 0.36}]
    (tmp_path / "log.jsonl").write_text("\n".join(json.dumps(r) for r in records) + "\n")
    assert early_stopping_step(tmp_path, "zh-en") == 50
    assert early_stopping_step(tmp_path, "es-en") is None
