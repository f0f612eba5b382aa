"""The forgetting budget: a bound on the retention loss, enforced during training and after it."""

from __future__ import annotations

import json
import math
import shutil
import warnings

import pyro
import pytest
import torch
from transformers.models.whisper.modeling_whisper import shift_tokens_right

from pyro_blora import BLoRAConfig, TrainConfig, build_guide, elbo_scaling, train, wrap_whisper
from pyro_blora.training.budget import BASE_MODEL_LABELS, RetentionSet, choose_scale, transcript_ce
from pyro_blora.training.budget_bound import retention_bound, retention_losses
from pyro_blora.config import RetentionBudget
from tests.tiny import VOCAB, TinyTask, collate, tiny_whisper

ALL_LINEAR = (r".*_proj$", r".*fc\d$")
FAST = dict(lr=1e-2, batch_size=4, warmup_steps=2, progress=False, checkpoint_every=0)


class KnownTask(TinyTask):
    """The domain the base model already knows: other phrases than TinyTask's new domain."""

    PHRASES = ((20, 21, 22, 23), (24, 25, 26, 27), (20, 25, 22, 27))


@pytest.fixture(scope="module")
def base_state():
    """A tiny Whisper trained on KnownTask, so adapting to TinyTask makes it forget."""
    torch.manual_seed(0)
    whisper = tiny_whisper(0)
    known = KnownTask(8, seed=1)
    batch = collate([known[i] for i in range(len(known))])
    optimizer = torch.optim.Adam(whisper.parameters(), lr=3e-3)
    for _ in range(30):
        inputs = shift_tokens_right(batch["labels"], 0, 1)
        logits = whisper(input_features=batch["input_features"], decoder_input_ids=inputs).logits
        loss = torch.nn.functional.cross_entropy(logits.transpose(1, 2), batch["labels"], ignore_index=-100)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return {k: v.detach().clone() for k, v in whisper.state_dict().items()}


def base_whisper(state):
    whisper = tiny_whisper(0)
    whisper.load_state_dict(state)
    # Prompt tokens are the label ids above the end-of-text id; every tiny label is a transcript token.
    whisper.config.eos_token_id = VOCAB - 1
    return whisper.eval().requires_grad_(False)


def retention() -> RetentionSet:
    return RetentionSet.from_dataset(KnownTask(8, seed=1), collate, 8)


def run(state, budget=None, steps=40, run_dir=None, resume=False, config=None, kind="normal"):
    pyro.set_rng_seed(0)
    model = wrap_whisper(base_whisper(state), BLoRAConfig(rank=4, target_modules=ALL_LINEAR))
    guide = build_guide(model, kind)
    config = config or TrainConfig(steps=steps, **FAST)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        result = train(model, guide, TinyTask(8), collate, config, budget=budget,
                       retention=retention() if budget else None, run_dir=run_dir, resume=resume)
    with model.hold_adapters(guide.means()):
        retained = retention_losses(model.whisper, retention().batches)
    return result, model, guide, retained


def bound_of(state, losses, budget):
    """The budget's verdict on ``losses``, against the base model's losses on the same utterances."""
    return retention_bound(budget, losses, retention_losses(base_whisper(state), retention().batches))


# ---------------------------------------------------------------- options
@pytest.mark.parametrize("changes, message", [
    (dict(budget=-0.1), "relative budget must be >= 0"), (dict(budget=0.0, kind="absolute"), "absolute budget"),
    (dict(budget=0.1, kind="percent"), "kind must be one of"), (dict(budget=0.1, every=0), "every"),
    (dict(budget=0.1, decay=1.0), "decay"), (dict(budget=0.1, beta_min=2.0, beta_max=1.0), "beta_min <= beta_max"),
    (dict(budget=0.1, lr=0.0), "dual-ascent"), (dict(budget=0.1, precision="fp16"), "precision must be one of"),
])
def test_budget_options_are_checked_and_name_the_field(changes, message):
    with pytest.raises(ValueError, match=message):
        RetentionBudget(**changes)


def test_the_limit_is_relative_to_the_base_model_or_absolute():
    assert RetentionBudget(0.03).limit(2.0) == pytest.approx(2.06)
    assert RetentionBudget(0.9, kind="absolute").limit(2.0) == 0.9
    assert "3%" in RetentionBudget(0.03).describe()


def test_set_beta_rescales_the_kl_weights_exactly(base_state):
    model = wrap_whisper(base_whisper(base_state), BLoRAConfig(rank=4, kl_normalization="matrix"))
    model.configure_objective(elbo_scaling(model.config, 8, 40, model.num_adapter_parameters()))
    model.set_beta(7.5)
    expected = wrap_whisper(base_whisper(base_state), BLoRAConfig(rank=4, kl_normalization="matrix", beta=7.5))
    expected.configure_objective(elbo_scaling(expected.config, 8, 40, expected.num_adapter_parameters()))
    assert model.beta == 7.5
    assert model.kl_weights() == pytest.approx(expected.kl_weights(), rel=1e-12)


def test_choose_scale_returns_the_largest_measured_scale_inside():
    scale, tried = choose_scale(lambda s: 1.0 + s, limit=1.43, grid=10, refine=4)
    assert 0.4 <= scale <= 0.43 and (scale, 1.0 + scale) in tried
    assert all(loss <= 1.43 for s, loss in tried if s <= scale)
    assert choose_scale(lambda s: 2.0, limit=1.0)[0] is None
    assert choose_scale(lambda s: 0.0, limit=1.0) == (1.0, [(1.0, 0.0)])


def test_transcript_ce_leaves_the_prompt_out(base_state):
    whisper = base_whisper(base_state)
    batch = retention().batches[0]
    whisper.config.eos_token_id = 21  # labels 22.. count as prompt tokens now
    mask = (batch["labels"] != -100) & (batch["labels"] <= 21)
    inputs = shift_tokens_right(batch["labels"], 0, 1)
    with torch.no_grad():
        logits = whisper(input_features=batch["input_features"], decoder_input_ids=inputs).logits
    losses = torch.nn.functional.cross_entropy(logits.transpose(1, 2), batch["labels"], ignore_index=-100,
                                               reduction="none")
    assert transcript_ce(whisper, [batch]) == pytest.approx(float(losses[mask].mean()), rel=1e-5)


def test_language_id_comes_from_the_ce_pass_as_detect_language_finds_it_and_joins_the_line(base_state):
    whisper = base_whisper(base_state)
    # KnownTask's transcripts begin with 20 or 24: as language tokens, each row's label is its language.
    whisper.generation_config.lang_to_id = {"<|aa|>": 20, "<|bb|>": 24, "<|cc|>": 14}
    batches = retention().batches
    losses = retention_losses(whisper, batches)
    with torch.no_grad():
        found = torch.cat([whisper.detect_language(b["input_features"]) for b in batches])
    labels = torch.cat([b["labels"][:, 0] for b in batches])
    assert losses.language_kept == (found.flatten() == labels).tolist()
    # A model that ranks another language token first loses the language ID.
    with torch.no_grad():
        whisper.proj_out.weight[14] += 50 * whisper.model.decoder.layer_norm.weight.sign()
    shifted = retention_losses(whisper, batches)
    assert shifted.languages_kept < losses.languages_kept
    verdict = retention_bound(RetentionBudget(0.05), shifted, losses)
    assert verdict.language_kept == shifted.languages_kept and verdict.base_language_kept == losses.languages_kept
    assert verdict.line().endswith(f"; language ID right on {shifted.languages_kept} of 8 "
                                   f"(base model {losses.languages_kept})")
    # An English-only model (no language tokens) reports none, and the line says nothing of it.
    english = retention_losses(base_whisper(base_state), batches)
    assert english.language_kept is None and "language ID" not in retention_bound(RetentionBudget(0.05), english,
                                                                                 english).line()


# ---------------------------------------------------------------- during training
def test_budgeted_run_keeps_the_bound_inside_where_an_unbudgeted_one_breaks_it(base_state):
    budget = RetentionBudget(0.2, every=2, far_every=1)
    free, _, _, free_retained = run(base_state)
    result, model, guide, retained = run(base_state, budget)
    summary = result.budget
    limit = summary["retain_limit"]
    assert limit == pytest.approx(1.2 * transcript_ce(base_whisper(base_state), retention().batches))
    free_bound, kept_bound = bound_of(base_state, free_retained, budget), bound_of(base_state, retained, budget)
    assert not free_bound.inside and free_bound.change_upper > 0.5  # without a budget the known domain is forgotten
    assert kept_bound.inside and kept_bound.change_upper <= 0.2 and summary["met"]  # with one, its bound stays inside
    assert kept_bound.change_upper > kept_bound.change  # the bound, not the point estimate, is what is held
    assert summary["retain_ce_upper"] == pytest.approx(kept_bound.ce_upper, rel=1e-5)
    assert summary["retention_bound"]["line"] == kept_bound.line() and "inside the 20% budget" in summary["line"]
    assert summary["utterances"] == 8 and summary["confidence"] == 0.95
    assert result.final_nll < 0.8 * result.base_nll  # and it still adapted
    records = [r for r in result.history if "retain_ce" in r]
    assert [r["step"] for r in records] == list(range(2, 41, 2))
    betas = [BLoRAConfig().beta] + [r["beta"] for r in records]
    for before, after, record in zip(betas, betas[1:], records):  # beta rises exactly while violated
        assert (after > before) == (record["retain_ce_avg"] > limit)
        assert record["retain_slack"] == pytest.approx(limit - record["retain_ce_upper"])
        assert record["retain_ce_upper"] >= record["retain_ce"]
    assert max(betas) > 10 * betas[0]
    assert summary["final_beta"] == pytest.approx(model.beta) == pytest.approx(betas[-1])


@pytest.mark.parametrize("upper, with_prior, due_at_20", [
    (1.06, False, True), (1.06, True, True),     # near the limit (1.05): every 10 steps
    (1.01, False, False), (1.01, True, False),   # far below it: every 40
    (1.50, False, False), (1.50, True, True),    # far above: every 40 for early stopping, every 10 under beta
])
def test_measurements_thin_out_far_from_the_limit(upper, with_prior, due_at_20):
    from pyro_blora.training.budget import BudgetTracker
    from pyro_blora.training.budget_bound import RetentionBound

    tracker = BudgetTracker(RetentionBudget(0.05, every=10, far_every=4), retention(), update=None, total_steps=150,
                            model=object() if with_prior else None)
    last = RetentionBound(0.05, "relative", 0.95, 8, 1.0, upper - 0.02, upper, upper - 1.02, upper - 1.0, 1.05,
                          upper <= 1.05)
    tracker.last = {"step": 10, "bound": last.to_dict()}
    assert tracker.due(20) is due_at_20
    assert tracker.due(40) and tracker.due(150) and not tracker.due(45)


def test_a_budget_that_cannot_be_met_says_so(base_state):
    budget = RetentionBudget(1e-3, kind="absolute", every=5, scale_at_end=False)
    with pytest.warns(UserWarning, match="never met"):
        result = train(*_model_and_guide(base_state), TinyTask(8), collate, TrainConfig(steps=5, **FAST),
                       budget=budget, retention=retention())
    assert result.budget["met"] is False and result.budget["met_during_training"] is False
    assert "never met" in result.budget["message"]


def _model_and_guide(state):
    model = wrap_whisper(base_whisper(state), BLoRAConfig(rank=4, target_modules=ALL_LINEAR))
    return model, build_guide(model)


def test_resumed_budgeted_run_matches_uninterrupted_run(base_state, tmp_path):
    budget = RetentionBudget(0.2, every=2)
    config = TrainConfig(steps=12, **{**FAST, "checkpoint_every": 6})
    full, _, full_guide, _ = run(base_state, budget, run_dir=tmp_path / "full", config=config)
    shutil.copytree(tmp_path / "full", tmp_path / "killed")
    (tmp_path / "killed" / "checkpoints" / "step-00000012.pt").unlink()
    (tmp_path / "killed" / "result.json").unlink()
    saved = torch.load(tmp_path / "killed" / "checkpoints" / "step-00000006.pt", weights_only=False)["budget"]
    assert saved["log_beta"] != math.log(BLoRAConfig().beta) and saved["average"] is not None
    resumed, model, guide, _ = run(base_state, budget, run_dir=tmp_path / "killed", resume=True, config=config)
    # the overhead spans the run's processes: the measuring and training time before the checkpoint count too
    assert saved["loop_seconds"] > saved["seconds"] > 0
    assert resumed.budget["estimate_seconds"] > saved["seconds"]
    assert [r.get("beta") for r in resumed.history] == [r.get("beta") for r in full.history]
    assert [r["loss"] for r in resumed.history] == [r["loss"] for r in full.history]
    assert [r.get("retain_ce_avg") for r in resumed.history] == [r.get("retain_ce_avg") for r in full.history]
    assert all(torch.equal(a, b) for a, b in zip(guide.state_dict().values(), full_guide.state_dict().values()))
    config_json = json.loads((tmp_path / "full" / "config.json").read_text())
    assert config_json["retention"]["budget"]["budget"] == 0.2 and config_json["retention"]["labels"] == "transcripts"
    logged = [json.loads(line) for line in (tmp_path / "killed" / "log.jsonl").read_text().splitlines()]
    assert [r.get("beta") for r in logged] == [r.get("beta") for r in full.history]
    # `report` draws beta, the retention loss and the in-domain loss of a budgeted run.
    from pyro_blora.report.pages import budget_rows
    from pyro_blora.report.plots import plot_budget_curves

    figure = plot_budget_curves(tmp_path / "full")
    assert [axes.get_title() for axes in figure.axes][:2] == ["β (KL weight)", "retention loss (CE / transcript token)"]
    [row] = budget_rows([tmp_path / "full"], ["full"])
    assert row["final_beta"] == pytest.approx(full.budget["final_beta"]) and row["met"] == full.budget["met"]


def test_bf16_measurements_follow_fp32_and_the_budget_measures_in_its_precision(base_state, monkeypatch):
    whisper, batches = base_whisper(base_state), retention().batches
    full, half = retention_losses(whisper, batches), retention_losses(whisper, batches, "bf16")
    assert full.ids == half.ids and full.tokens == half.tokens and full.ce_sum != half.ce_sum
    assert half.ce == pytest.approx(full.ce, rel=0.05)
    import pyro_blora.training.budget as budget_module

    seen = []
    measure = budget_module.retention_losses
    monkeypatch.setattr(budget_module, "retention_losses", lambda w, b, precision: seen.append(precision) or measure(w, b, precision))
    result, *_ = run(base_state, RetentionBudget(0.2, every=2, precision="bf16"), steps=4)
    assert seen and set(seen) == {"bf16"} and result.budget["budget"]["precision"] == "bf16"


def test_a_budgeted_run_written_before_the_precision_option_still_resumes(base_state, tmp_path):
    budget = RetentionBudget(0.2, every=2)
    config = TrainConfig(steps=6, **{**FAST, "checkpoint_every": 3})
    run(base_state, budget, run_dir=tmp_path / "old", config=config)
    saved = json.loads((tmp_path / "old" / "config.json").read_text())
    del saved["retention"]["budget"]["precision"]  # as an older version wrote it
    (tmp_path / "old" / "config.json").write_text(json.dumps(saved))
    (tmp_path / "old" / "checkpoints" / "step-00000006.pt").unlink()
    run(base_state, budget, run_dir=tmp_path / "old", resume=True, config=config)
    with pytest.raises(ValueError, match="holds a different run"):
        run(base_state, RetentionBudget(0.2, every=2, precision="bf16"), run_dir=tmp_path / "old", resume=True,
            config=config)


def test_map_adapts_beta_too(base_state):
    budget = RetentionBudget(0.2, every=4)
    result, model, _, retained = run(base_state, budget, steps=12, kind="delta")
    assert any("beta" in r for r in result.history) and bound_of(base_state, retained, budget).inside


# ---------------------------------------------------------------- runs, evaluate, export
def test_lora_run_with_unlabelled_retention_set_evaluate_export_and_frontier(tmp_path, monkeypatch):
    from pyro_blora.commands.experiment import budget_line
    from pyro_blora.evaluation.scoring import EvalOptions, load_eval_sets
    from pyro_blora.experiments.main_job import ALL_LINEAR_TARGETS
    from pyro_blora.experiments.step import export_run, run_evaluation
    from pyro_blora.runs import read_eval
    from pyro_blora.data.training_data import load_training_data
    from pyro_blora.runs import load_run_model
    from pyro_blora.training.methods import run_training
    from pyro_blora.testbed.manifest import save_domain
    from pyro_blora.base_models.loading import load_processor
    from tests.experiment_fixtures import _rows, fake_testbed, small_whisper_folder

    model = small_whisper_folder(tmp_path / "model")
    testbed = fake_testbed(tmp_path / "testbed")
    save_domain(testbed / "unlabelled", {"dev": [{**row, "text": ""} for row in _rows("en", "en", 3, 60)]})
    processor = load_processor(model)
    data = load_training_data(testbed / "zh-en", processor, cache_dir=tmp_path / "cache")
    budget = RetentionBudget(0.05, every=1, utterances=3, far_every=1)
    steps = TrainConfig(steps=3, batch_size=2, lr=3e-2, warmup_steps=1, checkpoint_every=0, progress=False)
    adapter = BLoRAConfig(rank=4, target_modules=ALL_LINEAR_TARGETS)
    out = tmp_path / "runs" / "lora"
    import pyro_blora.training.budget_bound as bound_module

    estimates = []  # every bound, in training and after it, comes from the one estimator
    estimator = bound_module.ratio_upper_bound
    monkeypatch.setattr(bound_module, "ratio_upper_bound", lambda *a: estimates.append(estimator(*a)) or estimates[-1])
    result = run_training("lora", model, data, out, adapter, steps, budget=budget, retain=testbed / "unlabelled",
                          cache_dir=tmp_path / "cache")
    assert len(estimates) >= 3
    config = json.loads((out / "config.json").read_text())
    assert config["retention"]["labels"] == BASE_MODEL_LABELS and config["retention"]["utterances"] == 3
    labels = json.loads((out / "retention-labels.json").read_text())
    assert len(labels["texts"]) == 3
    records = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    assert all("retain_ce" in r and "beta" not in r for r in records)  # no prior: early stopping only
    saved = json.loads((out / "result.json").read_text())["budget"]
    assert saved["kept"] in ("final", "checkpoint", "scaled") and saved["met"]
    assert saved["retain_ce"] <= saved["retain_ce_upper"] <= saved["retain_limit"]
    assert "keeps" in budget_line(saved) and saved["line"] in budget_line(saved)
    assert saved["line"].startswith("unlabelled CE ") and "95% upper bound" in saved["line"]
    assert "3 utterances): inside the 5% budget" in saved["line"]
    # the overhead counts the search for lambda at the end too
    assert saved["estimate_seconds"] >= saved["search_seconds"] >= 0 and saved["overhead"] > 0
    assert (saved["search_seconds"] > 0) == (saved["kept"] == "scaled" or "scales_tried" in saved)
    # Early stopping and the post-hoc lambda judge the same losses with the same bound.
    from pyro_blora.experiments.budget_frontier import scaled_run

    trained, _, _ = load_run_model(out)
    posthoc = scaled_run(out, trained, processor, testbed / "unlabelled", 3).bound(1.0, budget)
    assert posthoc.ce_upper == pytest.approx(saved["retain_ce_upper"], rel=1e-4)  # the kept model, as saved
    assert posthoc.change_upper == pytest.approx(saved["retain_change_upper"], abs=1e-4)
    count = len(estimates)
    # The kept model, measured again, is inside the budget.
    from pyro_blora.training.budget import load_retention_set

    whisper, _, _ = load_run_model(out)
    base, _, _ = load_run_model(model)
    again = load_retention_set(testbed / "unlabelled", processor, base, 3, labels_file=out / "retention-labels.json",
                               model_name=str(model))
    assert transcript_ce(whisper, again.batches) == pytest.approx(saved["retain_ce"], rel=1e-4)
    # A source with one split (here dev) is read whatever split is asked for.
    only = load_retention_set(testbed / "unlabelled", processor, base, 3, split="train",
                              labels_file=out / "retention-labels.json", model_name=str(model))
    assert only.split == "dev" and only.ids == again.ids
    # After training, with no retraining: the update scaled into a tighter budget.
    tight = RetentionBudget(0.005, utterances=3)
    sets = load_eval_sets(testbed, ["en"], processor, cache_dir=tmp_path / "cache")
    report = run_evaluation(out, sets, options=EvalOptions(batch_size=2, decode_limit=0, progress=False),
                            retain=testbed / "unlabelled", retain_budget=tight)
    chosen = report["retention_budget"]
    assert len(estimates) > count  # the post-hoc lambda went through the same estimator
    assert chosen["retain_ce_upper"] <= chosen["retain_limit"] and 0 <= chosen["scale"] <= 1
    assert "inside the 0.5% budget" in chosen["line"] and chosen["utterances"] == 3
    assert read_eval(out / "eval-budget0.005.json")["delta_scale"] == chosen["scale"]
    info = export_run(out, tmp_path / "export", retain=testbed / "unlabelled", retain_budget=tight)
    assert info["retention_budget"]["scale"] == chosen["scale"]
    from transformers import WhisperForConditionalGeneration

    exported = WhisperForConditionalGeneration.from_pretrained(tmp_path / "export")
    assert transcript_ce(exported, again.batches) == pytest.approx(chosen["retain_ce"], rel=1e-4)
    card = (tmp_path / "export" / "README.md").read_text()
    assert chosen["line"] in card and "## Forgetting budget" in card
    # Train once, choose later: the frontier names the lambda that export picks for each budget.
    from pyro_blora.experiments.budget_frontier import frontier

    curve = frontier(out, testbed / "unlabelled", tmp_path / "frontier", budgets=(0.005, 0.5), utterances=3)
    assert [p["scale"] for p in curve["points"]][:2] == [0.0, pytest.approx(0.1)]
    assert curve["points"][0]["change"] == 0.0 == curve["points"][0]["change_upper"]
    assert all(p["change_upper"] >= p["change"] for p in curve["points"])
    assert curve["budgets"][0]["scale"] == chosen["scale"]
    assert {"frontier.json", "frontier.md", "frontier.png"} <= {f.name for f in (tmp_path / "frontier").iterdir()}
    assert "--retain-budget 0.005" in (tmp_path / "frontier" / "frontier.md").read_text()
    from typer.testing import CliRunner

    from pyro_blora.cli import app

    printed = CliRunner().invoke(app, ["frontier", str(out), "--retain", str(testbed / "unlabelled"), "--out",
                                       str(tmp_path / "cli"), "--retain-utterances", "3", "--budgets", "0.005"])
    assert printed.exit_code == 0 and f"budget 0.5%: λ {chosen['scale']:.4g}: {chosen['line']}" in printed.output
    # The variance study's script on the same run: one bound per size, with its time.
    import importlib.util
    import sys
    from pathlib import Path

    script = Path(__file__).resolve().parent.parent / "scripts" / "budget_variance.py"
    spec = importlib.util.spec_from_file_location("budget_variance", script)
    variance = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(variance)
    monkeypatch.setattr(sys, "argv", ["budget_variance.py", str(out), "--retain", str(testbed / "unlabelled"),
                                      "--sizes", "2,3", "--repeats", "1", "--out", str(tmp_path / "variance")])
    variance.main()
    study = json.loads((tmp_path / "variance" / "variance.json").read_text())
    assert [r["utterances"] for r in study["sizes"]] == [2, 3] and study["available"] == 3
    three = study["sizes"][1]
    assert three["width"] == pytest.approx(curve["points"][-1]["change_upper"] - curve["points"][-1]["change"])
    assert all(r["seconds_per_measurement"] > 0 for r in study["sizes"])
