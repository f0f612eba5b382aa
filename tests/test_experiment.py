"""Training methods, run folders, evaluation and the main job's pieces on a one-layer Whisper."""

from __future__ import annotations

import json
import math
import shutil

import pytest
import torch

from pyro_blora.config import BLoRAConfig, RetentionBudget, TrainConfig
from pyro_blora.evaluation.scoring import EvalOptions, evaluate_whisper, load_eval_sets, relative_changes
from pyro_blora.report.tables import evaluation_table
from pyro_blora.experiments.main_job import ALL_LINEAR_TARGETS, ensure_testbed
from pyro_blora.experiments.step import run_evaluation
from pyro_blora.runs import read_eval
from pyro_blora.model.guide import BLoRAMAPGuide, build_guide
from pyro_blora.model.injection import find_target_modules
from pyro_blora.data.training_data import load_training_data
from pyro_blora.runs import METHODS, load_run_model
from pyro_blora.training.methods import run_training
from pyro_blora.model.whisper import wrap_whisper
from pyro_blora.model.objective import elbo_scaling, elbo_terms
from pyro_blora.base_models.loading import load_processor, load_whisper
from tests.experiment_fixtures import fake_testbed, small_whisper_folder

ADAPTER = BLoRAConfig(rank=4, target_modules=ALL_LINEAR_TARGETS)
STEPS = TrainConfig(steps=2, batch_size=2, lr=1e-2, warmup_steps=1, checkpoint_every=1, eval_every=2, progress=False)
EVAL = EvalOptions(batch_size=2, decode_limit=1, extra_new_tokens=2, progress=False)
# A budget loose enough for a tiny random model: the job only has to choose and export a scale.
STEPS_BUDGET = RetentionBudget(1.0, utterances=2, scale_grid=2, scale_refine=1)


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    root = tmp_path_factory.mktemp("experiment")
    model = small_whisper_folder(root / "model")
    testbed = fake_testbed(root / "testbed")
    processor = load_processor(model)
    data = load_training_data(testbed / "zh-en", processor, cache_dir=root / "cache")
    sets = load_eval_sets(testbed, ["zh-en", "en", "backward-es"], processor, cache_dir=root / "cache")
    return {"root": root, "model": model, "testbed": testbed, "processor": processor, "data": data, "sets": sets}


@pytest.fixture(scope="module")
def curve_sets(workspace):
    return {"backward-es": workspace["sets"]["backward-es"]}


@pytest.fixture(scope="module")
def runs(workspace, curve_sets):
    """One finished run per method (two steps each), with dev curves every second step."""
    out = {}
    for method in METHODS:
        run_dir = workspace["root"] / "runs" / method
        run_training(method, workspace["model"], workspace["data"], run_dir, ADAPTER, STEPS,
                     curve_sets=curve_sets, curve_options=EVAL)
        out[method] = run_dir
    return out


WEIGHTS = {"blora": "posterior", "map": "posterior", "lora": "adapter", "full": "model"}


@pytest.mark.parametrize("method", METHODS)
def test_run_folder_layout(runs, method):
    run_dir = runs[method]
    config = json.loads((run_dir / "config.json").read_text())
    assert config["run"]["method"] == method and config["train"]["seed"] == 0
    records = [json.loads(line) for line in (run_dir / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [1, 2]
    assert all({"loss", "nll", "kl", "lr"} <= set(r) for r in records)
    if method in ("lora", "full"):
        assert all(r["kl"] == 0 for r in records)
    assert {"backward-es/ce", "backward-es/language_id", "backward-es/error_rate"} <= set(records[1])
    assert "backward-es/ce" not in records[0]
    assert (run_dir / "checkpoints" / "step-00000002.pt").is_file()
    assert json.loads((run_dir / "result.json").read_text())["final_nll"] is not None
    assert (run_dir / WEIGHTS[method]).is_dir()


@pytest.mark.parametrize("method", METHODS)
def test_trained_model_differs_from_base_and_training_lowered_the_loss(workspace, runs, method):
    result = json.loads((runs[method] / "result.json").read_text())
    assert result["final_nll"] < result["base_nll"]
    trained, _, description = load_run_model(runs[method])
    base, _ = load_whisper(workspace["model"])
    assert method in description
    changed = [n for n, p in trained.state_dict().items() if not torch.equal(p, base.state_dict()[n])]
    assert changed


def test_lora_targets_the_same_layers_as_blora(workspace, runs):
    from peft import PeftConfig

    adapter = PeftConfig.from_pretrained(str(runs["lora"] / "adapter"))
    base, _ = load_whisper(workspace["model"])
    assert sorted(adapter.target_modules) == sorted(find_target_modules(base, ADAPTER.target_modules))
    posterior = json.loads((runs["blora"] / "posterior" / "posterior.json").read_text())
    assert {site.rsplit(".", 1)[0].removeprefix("whisper.") for site in posterior["sites"]} == set(adapter.target_modules)


def test_map_guide_penalty_is_the_scaled_negative_log_prior(workspace):
    whisper, _ = load_whisper(workspace["model"])
    model = wrap_whisper(whisper, ADAPTER)
    guide = build_guide(model, "delta")
    assert isinstance(guide, BLoRAMAPGuide)
    data = workspace["data"]
    model.configure_objective(elbo_scaling(model.config, len(data), 100, model.num_adapter_parameters()))
    batch = data.collate([data.dataset[0], data.dataset[1]])
    terms = elbo_terms(model, guide, batch)
    means = guide.means()
    sigma = ADAPTER.prior_scale
    neg_log_prior = sum(
        float((v.double() ** 2).sum()) / (2 * sigma**2) + v.numel() * math.log(sigma * math.sqrt(2 * math.pi))
        for v in means.values()
    )
    assert float(terms.kl.detach()) == pytest.approx(model.elbo_scaling.kl * neg_log_prior, rel=1e-4)


def test_map_posterior_round_trip(workspace, runs):
    merged, _, _ = load_run_model(runs["map"])
    posterior = json.loads((runs["map"] / "posterior" / "posterior.json").read_text())
    assert posterior["guide"] == "delta"
    assert not any(torch.isnan(p).any() for p in merged.parameters())


def test_resume_continues_a_plain_run_exactly(workspace, runs, curve_sets, tmp_path):
    killed = tmp_path / "killed"
    shutil.copytree(runs["lora"], killed)
    (killed / "checkpoints" / "step-00000002.pt").unlink()
    lines = (killed / "log.jsonl").read_text().splitlines()
    (killed / "log.jsonl").write_text(lines[0] + "\n")
    shutil.rmtree(killed / "adapter")
    torch.manual_seed(123)
    resumed = run_training("lora", workspace["model"], workspace["data"], killed, ADAPTER, STEPS,
                           curve_sets=curve_sets, curve_options=EVAL, resume=True)
    full = [json.loads(line) for line in (runs["lora"] / "log.jsonl").read_text().splitlines()]
    assert [r["loss"] for r in resumed.history] == pytest.approx([r["loss"] for r in full], rel=1e-6)


def test_a_finished_run_is_not_overwritten(workspace, runs):
    with pytest.raises(ValueError, match="resume"):
        run_training("lora", workspace["model"], workspace["data"], runs["lora"], ADAPTER, STEPS)


def test_unknown_method_is_refused(workspace, tmp_path):
    with pytest.raises(ValueError, match="method must be one of"):
        run_training("dora", workspace["model"], workspace["data"], tmp_path, ADAPTER, STEPS)


def test_evaluation_writes_eval_json_with_relative_changes(workspace, runs):
    base = run_evaluation(workspace["model"], workspace["sets"], options=EVAL, out=workspace["root"] / "base.json")
    assert set(base["results"]) == {"zh-en", "en", "backward-es"}
    assert "language_id" in base["results"]["backward-es"] and "language_id" not in base["results"]["zh-en"]
    assert base["results"]["zh-en"]["unit"] == "mixed" and base["results"]["en"]["unit"] == "word"
    report = run_evaluation(runs["lora"], workspace["sets"], options=EVAL, base=base)
    saved = read_eval(runs["lora"])
    assert saved["results"] == report["results"]
    expected = (report["results"]["en"]["ce"] - base["results"]["en"]["ce"]) / base["results"]["en"]["ce"]
    assert saved["relative_to_base"]["en"]["ce"] == pytest.approx(expected)
    against = run_evaluation(runs["full"], workspace["sets"], options=EVAL, against=runs["lora"])
    assert against["against_source"] == str(runs["lora"])


def test_per_utterance_records_add_up_to_the_aggregates(workspace):
    from pyro_blora.data import SpeechCollator, decoder_start_token_id
    from pyro_blora.model.objective import token_nll

    whisper, processor = load_whisper(workspace["model"])
    options = EvalOptions(batch_size=2, extra_new_tokens=2, progress=False)
    results = evaluate_whisper(whisper, processor, workspace["sets"], options)
    collate = SpeechCollator(decoder_start_token_id(processor.tokenizer))
    for domain, entry in results.items():
        records, prepared = entry["per_utterance"], workspace["sets"][domain].prepared
        assert records["ids"] == prepared["id"] and entry["ce_scope"] == "transcript"
        assert sum(records["errors"]) / sum(records["ref_tokens"]) == pytest.approx(entry["error_rate"])
        assert sum(records["ce_sum"]) / sum(records["ce_tokens"]) == pytest.approx(entry["ce"])
        assert sum(records["prompt_ce_sum"]) / sum(records["prompt_tokens"]) == pytest.approx(entry["prompt_ce"])
        # Multilingual labels: <|sot|> (dropped), language, task, no-timestamps, then the transcript.
        assert records["prompt_tokens"] == [3] * len(prepared)
        assert [c + 3 for c in records["ce_tokens"]] == [len(labels) - 1 for labels in prepared["labels"]]
        dataset = workspace["sets"][domain].dataset
        everything = token_nll(whisper, [collate([dataset[i] for i in range(len(dataset))])])
        assert entry["ce_all_tokens"] == pytest.approx(everything, rel=1e-5)
        if "language_id" in entry:
            assert sum(records["language_id_hit"]) / len(records["language_id_hit"]) == entry["language_id"]
    old = {domain: {"ce": entry["ce_all_tokens"]} for domain, entry in results.items()}  # before ce_scope
    changes = relative_changes(results, old)["en"]
    assert "ce" not in changes and changes["ce_all_tokens"] == pytest.approx(0.0, abs=1e-12)
    assert "(all)" in evaluation_table({"old": old, "new": results}) and "(all)" not in evaluation_table({"new": results})


def test_relative_changes_and_table():
    result = {"en": {"error_rate": 0.2, "ce": 0.3}, "es": {"language_id": 0.5}}
    reference = {"en": {"error_rate": 0.1, "ce": 0.3}, "es": {"language_id": 1.0}}
    # Results without ce_scope are older ones: their ce covered every label token.
    assert relative_changes(result, reference) == {"en": {"error_rate": 1.0, "ce": 0.0, "ce_all_tokens": 0.0},
                                                   "es": {"language_id": -0.5}}
    table = evaluation_table({"base": reference, "lora": result}, baseline="base")
    assert "+100%" in table and "50.0%" in table
    lines = table.splitlines()  # an aligned Markdown table: every line as wide as the header
    assert lines[0].startswith("| model | domain | error rate") and lines[1].startswith("|-------|")
    assert len({len(line) for line in lines}) == 1


def test_eval_sets_name_missing_domains(workspace):
    with pytest.raises(FileNotFoundError, match="backward-fr.*testbed"):
        load_eval_sets(workspace["testbed"], ["backward-fr"], workspace["processor"])


def test_ensure_testbed_reuses_a_build_with_the_same_config(tmp_path, monkeypatch):
    from pyro_blora.experiments import main_job as experiment
    from pyro_blora.testbed import TestbedConfig

    calls = []
    monkeypatch.setattr(experiment, "build_testbed", lambda folder, config, seed, overwrite: calls.append(seed))
    config = TestbedConfig.small()
    ensure_testbed(tmp_path, config, seed=1)
    ensure_testbed(tmp_path, config, seed=1)
    ensure_testbed(tmp_path, config, seed=2)
    assert calls == [1, 2]


def test_main_job_writes_the_comparison_and_report(workspace, tmp_path):
    from dataclasses import replace

    from pyro_blora.experiments.main_job import MainJobConfig, run_main_job
    from pyro_blora.predict.transcripts import read_jsonl
    from pyro_blora.testbed import TestbedConfig
    from transformers import WhisperForConditionalGeneration

    config = MainJobConfig(out=tmp_path, model=str(workspace["model"]), testbed=TestbedConfig.small(),
                           eval_domains=("zh-en", "en", "backward-es"),
                           blora=ADAPTER, train=replace(STEPS, steps=1, eval_every=1, encoder_window_seconds=10),
                           curve_utterances=1, curve_decoded=1, eval_limit=1,
                           real_english=(("en-spontaneous", 1), ("en-digits", 1)), frontier_scales=(0.5,),
                           budget=STEPS_BUDGET, transcript_clips=1, transcript_samples=2)
    # A testbed stamped with the job's config and seed is reused instead of synthesised.
    shutil.copytree(workspace["testbed"], tmp_path / "testbed")
    ensure_stamp = {"settings": config.testbed.settings(), "seed": config.testbed_seed}
    (tmp_path / "testbed" / "build-config.json").write_text(json.dumps(ensure_stamp, default=str))
    lines = []
    outcome = run_main_job(config, echo=lines.append)
    assert set(outcome["evaluations"]) == {"base", "lora", "blora", "lora (budget)", "blora (budget)"}
    report = (tmp_path / "report.md").read_text()
    assert "backward-es" in report and "Dev curves during training: blora" in report
    comparison = json.loads((tmp_path / "comparison.json").read_text())
    assert comparison["lora"]["zh-en"]["ce"] > 0
    # Real English is scored (error, CE and language ID) for every model.
    assert all(comparison[name]["real-en"]["utterances"] == 2 and "language_id" in comparison[name]["real-en"]
               for name in comparison)
    # Scored at the training window (10 s); the real clips fit it, the synthetic ones too.
    assert read_eval(tmp_path / "runs" / "blora")["encoder_window_seconds"] == 10
    assert read_eval(tmp_path / "budgeted" / "lora.json")["encoder_window_seconds"] == 10
    assert any("[3/8] training lora" in line for line in lines) and any("[8/8]" in line for line in lines)
    # The frontier: base at 0, the CE-only scale, the run as trained at 1; the plot is written.
    assert list(outcome["frontiers"]["blora"]) == [0.0, 0.5, 1.0]
    assert "decoded" not in outcome["frontiers"]["blora"][0.5]["zh-en"]
    assert set(outcome["frontiers"]["blora"][0.5]) == {"zh-en", "en", "real-en"}  # the backward set is not traced
    assert (tmp_path / "frontier.png").stat().st_size > 0 and "![frontier](frontier.png)" in report
    # The budget's choice, exported as a plain Whisper at Whisper's own 30 s, and scored as a row of the table.
    for method in ("lora", "blora"):
        chosen = json.loads((tmp_path / "export" / method / "budget.json").read_text())["retention_budget"]
        assert 0 <= chosen["scale"] <= 1 and f"scales {method} by {chosen['scale']:.2f}" in report
        exported = WhisperForConditionalGeneration.from_pretrained(tmp_path / "export" / method)
        assert exported.config.max_source_positions == 1500
    # Monte Carlo transcripts with word confidence, JSONL and SRT: one test clip and one real clip.
    transcripts = read_jsonl(tmp_path / "transcripts" / "transcripts.jsonl")
    assert len(transcripts) == 2 and all(t.num_samples == 2 and len(t.samples) == 2 for t in transcripts)
    assert len(list((tmp_path / "transcripts" / "srt").glob("*.srt"))) == 2
    # The posterior's scales and the update's sparsity; the recommendation is computed, not written in.
    posterior = json.loads((tmp_path / "posterior" / "blora.json").read_text())
    assert posterior["sigma"] and 0 <= posterior["dW"]["thresh_fraction"] <= 1
    assert "sigma" not in json.loads((tmp_path / "posterior" / "lora.json").read_text())
    assert "## Recommendation" in report and outcome["recommendation"] in report
    assert "Posterior scales σ of blora" in report
    # Done unless done: a second run reads every stage back and trains, scores and exports nothing.
    stamps = {p: p.stat().st_mtime_ns for p in tmp_path.rglob("*.json") if p.name != "main-config.json"
              and p.name != "comparison.json"}
    run_main_job(config, echo=lambda line: None)
    assert {p: p.stat().st_mtime_ns for p in stamps} == stamps


@pytest.mark.parametrize("method", METHODS)
def test_interpolation_scales_the_update_of_every_method(workspace, runs, method):
    from pyro_blora.model.interpolation import interpolate_weights

    trained, _, _ = load_run_model(runs[method])
    base, _ = load_whisper(workspace["model"])
    before = {name: value.clone() for name, value in trained.state_dict().items()}
    scaled = interpolate_weights(base, trained, 0.25)
    changed = [name for name, value in before.items() if not torch.equal(value, base.state_dict()[name])]
    assert changed
    for name in changed:
        start = base.state_dict()[name]
        torch.testing.assert_close(scaled.state_dict()[name], start + 0.25 * (before[name] - start))
    for name, value in interpolate_weights(base, trained, 0.0).state_dict().items():
        torch.testing.assert_close(value, base.state_dict()[name])


def test_delta_scale_writes_its_own_eval_file_and_zero_is_the_base_model(workspace, runs):
    ce_only = EvalOptions(batch_size=2, decode_limit=0, progress=False)
    base = run_evaluation(workspace["model"], workspace["sets"], options=ce_only)
    zero = run_evaluation(runs["blora"], workspace["sets"], options=ce_only, delta_scale=0.0)
    half = run_evaluation(runs["blora"], workspace["sets"], options=ce_only, delta_scale=0.5)
    assert read_eval(runs["blora"] / "eval-scale0.5.json")["results"] == half["results"]
    assert half["delta_scale"] == 0.5 and "scaled by 0.5" in half["model"]
    assert (runs["blora"] / "eval-scale0.json").is_file() and zero["results"] != half["results"]
    for domain, entry in base["results"].items():
        assert zero["results"][domain]["ce"] == pytest.approx(entry["ce"], rel=1e-5)
    with pytest.raises(ValueError, match="not a run folder"):
        run_evaluation(workspace["model"], workspace["sets"], options=ce_only, delta_scale=0.5)


def test_a_base_model_is_scored_with_the_runs_encoder_window(workspace, runs):
    ce_only = EvalOptions(batch_size=2, decode_limit=0, progress=False)
    windowed = run_evaluation(workspace["model"], workspace["sets"], options=ce_only, encoder_window_seconds=10)
    full = run_evaluation(workspace["model"], workspace["sets"], options=ce_only)
    assert (windowed["encoder_window_seconds"], full["encoder_window_seconds"]) == (10, 30)
    assert windowed["results"]["en"]["ce"] != full["results"]["en"]["ce"]
    with pytest.raises(ValueError, match="trained with a 30 s encoder window"):
        run_evaluation(runs["lora"], workspace["sets"], options=ce_only, encoder_window_seconds=10)


def test_a_windowed_run_is_scored_at_its_window_or_at_whispers_own(workspace, tmp_path):
    """The adapters act on linear layers, not on the positions a window cuts: a 10 s run can be used at 30 s."""
    ce_only = EvalOptions(batch_size=2, decode_limit=0, progress=False)
    run_training("lora", workspace["model"], workspace["data"], tmp_path / "lora10", ADAPTER,
                 STEPS.replace(encoder_window_seconds=10))
    own = run_evaluation(tmp_path / "lora10", workspace["sets"], options=ce_only)
    wide = run_evaluation(tmp_path / "lora10", workspace["sets"], options=ce_only, encoder_window_seconds=30,
                          out=tmp_path / "eval-window30.json")
    assert (own["encoder_window_seconds"], wide["encoder_window_seconds"]) == (10, 30)
    assert own["results"]["en"]["ce"] != wide["results"]["en"]["ce"]
    with pytest.raises(ValueError, match="or a wider one"):
        run_evaluation(tmp_path / "lora10", workspace["sets"], options=ce_only, encoder_window_seconds=5)


def test_frontier_choice_and_recommendation_follow_the_measured_numbers():
    from pyro_blora.experiments.main_job_report import recommendation
    from pyro_blora.experiments.post_hoc import frontier_choice

    points = {0.0: {"zh-en": {"ce": 2.0}, "en": {"ce": 1.0}}, 0.5: {"zh-en": {"ce": 1.0}, "en": {"ce": 1.02}},
              1.0: {"zh-en": {"ce": 0.5}, "en": {"ce": 1.5}}}
    assert frontier_choice(points, "zh-en", "en", 0.03)["scale"] == 0.5
    assert frontier_choice(points, "zh-en", "en", 0.6)["scale"] == 1.0
    assert frontier_choice(points, "zh-en", "en", 0.01) is None

    def scored(error, lid):
        return {"results": {"zh-en": {"error_rate": error, "ce": 1.0}, "en": {"error_rate": 0.1, "ce": 1.0,
                                                                               "language_id": lid}}}

    budgets = {"lora": {"retention_budget": {"scale": 0.4, "described": "3%"}}}
    evaluations = {"base": scored(0.7, 1.0), "lora": scored(0.05, 0.0), "lora (budget)": scored(0.08, 0.95),
                   "blora": scored(0.09, 1.0)}
    lines = recommendation(evaluations, {"lora": points}, budgets, "zh-en", 0.03)
    assert "lora × 0.5 reaches zh-en CE 1.000" in lines[0] and "scales lora by 0.40: zh-en 8.0%" in lines[1]
    assert "**Use lora (budget)**" in lines[-1]  # lora as trained is better in-domain, but lost English LID
    evaluations["blora"] = scored(0.07, 1.0)
    assert "**Use blora**" in recommendation(evaluations, {"lora": points}, budgets, "zh-en", 0.03)[-1]
    evaluations = {name: scored(0.1, 0.5) for name in evaluations}
    assert "No adapted model keeps" in recommendation(evaluations, {}, budgets, "zh-en", 0.03)[-1]
