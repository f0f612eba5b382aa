"""The core promises of BLoRA on a tiny random Whisper."""

from __future__ import annotations

import shutil
import warnings

import pyro
import pytest
import torch
from pyro import poutine
from pyro.infer import Trace_ELBO, TraceMeanField_ELBO
from pyro.poutine.util import site_is_subsample

from pyro_blora import (
    BLoRAConfig,
    TrainConfig,
    build_guide,
    elbo_scaling,
    elbo_terms,
    load_posterior,
    posterior_mean_model,
    sample_posterior,
    save_posterior,
    train,
    wrap_whisper,
)
from pyro_blora.model.adapters import BayesianLoRALinear
from pyro_blora.checkpoint import CheckpointDir
from pyro_blora.training.loop import NonFiniteLossError
from pyro_blora.metrics import thresh_fraction
from tests.tiny import FRAMES, MELS, TinyTask, collate, tiny_whisper

ALL_LINEAR = (r".*_proj$", r".*fc\d$", r"proj_out")


def make(config: BLoRAConfig | None = None, seed: int = 0):
    model = wrap_whisper(tiny_whisper(seed), config or BLoRAConfig(rank=4))
    pyro.set_rng_seed(seed)
    return model, build_guide(model)


def batch_of(task: TinyTask, idx=(0, 1, 2, 3)) -> dict:
    batch = collate([task[i] for i in idx])
    batch["index"] = torch.tensor(idx)
    return batch


def configure(model, task):
    model.configure_objective(elbo_scaling(model.config, len(task), 40, model.num_adapter_parameters()))


# ---------------------------------------------------------------- structure
def test_site_names_follow_module_paths():
    model, _ = make()
    expected = []
    for stack, n, blocks in (("encoder", 2, ("self_attn",)), ("decoder", 2, ("self_attn", "encoder_attn"))):
        for layer in range(n):
            for block in blocks:
                for proj in ("k_proj", "q_proj"):
                    for m in ("A", "B"):
                        expected.append(f"whisper.model.{stack}.layers.{layer}.{block}.{proj}.lora_{m}")
    assert sorted(model.site_names()) == sorted(expected)
    trace = poutine.trace(model).get_trace(batch_of(TinyTask(4)))
    latent = {
        name
        for name, site in trace.nodes.items()
        if site["type"] == "sample" and not site["is_observed"] and not site_is_subsample(site)
    }
    assert latent == set(expected)


def test_base_weights_frozen_and_guide_holds_all_trainable_parameters():
    model, guide = make()
    assert not any(p.requires_grad for p in model.parameters())
    names = {n for n, _ in guide.named_parameters()}
    assert len(names) == 2 * len(model.site_names())


def test_unmatched_pattern_is_an_error():
    with pytest.raises(ValueError, match="matches no linear layer"):
        wrap_whisper(tiny_whisper(), BLoRAConfig(rank=4, target_modules=(r".*\.q_proj$", r".*\.query$")))


@pytest.mark.parametrize(
    "kwargs, message",
    [({"rank": 0}, "rank"), ({"prior_scale": 0.0}, "prior_scale"), ({"beta": 0.0}, "beta"), ({"beta": -1.0}, "beta")],
)
def test_config_validation_names_the_field(kwargs, message):
    with pytest.raises(ValueError, match=message):
        BLoRAConfig(**kwargs)


def test_rank_above_layer_dimensions_is_refused():
    with pytest.raises(ValueError, match="exceeds the layer's dimensions"):
        wrap_whisper(tiny_whisper(), BLoRAConfig(rank=65))


def test_convention_matches_peft_lora():
    peft = pytest.importorskip("peft")
    torch.manual_seed(0)
    base = torch.nn.Linear(16, 12)
    adapter = BayesianLoRALinear(torch.nn.Linear(16, 12), rank=4, scaling=8 / 4, prior_scale=0.01)
    adapter.base.load_state_dict(base.state_dict())
    lora_A, lora_B = torch.randn(4, 16), torch.randn(12, 4)
    wrapped = peft.get_peft_model(
        torch.nn.Sequential(base), peft.LoraConfig(r=4, lora_alpha=8, target_modules=["0"], lora_dropout=0.0)
    )
    layer = wrapped.base_model.model[0]
    layer.lora_A["default"].weight.data.copy_(lora_A)
    layer.lora_B["default"].weight.data.copy_(lora_B)
    x = torch.randn(5, 16)
    with adapter.hold(lora_A, lora_B):
        ours = adapter(x)
    assert torch.allclose(ours, wrapped(x), atol=1e-5)


# ---------------------------------------------------------------- objective
def test_loss_equals_pyro_trace_elbo():
    task = TinyTask(4)
    model, guide = make()
    configure(model, task)
    batch = batch_of(task)
    pyro.set_rng_seed(3)
    ours = elbo_terms(model, guide, batch)
    pyro.set_rng_seed(3)
    theirs = Trace_ELBO(max_plate_nesting=1).differentiable_loss(model, guide, batch)
    assert torch.allclose(ours.loss, theirs, rtol=1e-5)
    assert torch.allclose(ours.loss, ours.nll + ours.kl)
    # With AutoNormal the latent site is a Delta: Pyro's mean-field ELBO gives the same estimate.
    pyro.set_rng_seed(3)
    meanfield = TraceMeanField_ELBO(max_plate_nesting=1).differentiable_loss(model, guide, batch)
    assert torch.allclose(meanfield, theirs, rtol=1e-5)


def test_map_loss_equals_pyro_trace_elbo_without_scoring_the_guides_deltas():
    """The point guide's Delta sites score log 1 = 0, so leaving them unscored changes nothing;
    the point values are perturbed off the start so that every prior term depends on them."""
    task = TinyTask(4)
    model = wrap_whisper(tiny_whisper(0), BLoRAConfig(rank=4))
    guide = build_guide(model, "delta", seed=0)
    guide.set_means({name: torch.randn_like(value) * 0.01 for name, value in guide.means().items()})
    configure(model, task)
    batch = batch_of(task)
    ours = elbo_terms(model, guide, batch)
    theirs = Trace_ELBO(max_plate_nesting=1).differentiable_loss(model, guide, batch)
    assert torch.allclose(ours.loss, theirs, rtol=1e-5)
    assert torch.allclose(ours.loss, ours.nll + ours.kl)


def test_beta_scales_exactly_the_kl_term():
    task = TinyTask(4)
    model, guide = make()
    batch = batch_of(task)
    terms = {}
    for beta in (0.5, 0.05):
        model.configure_objective(elbo_scaling(model.config.replace(beta=beta), 4, 40, model.num_adapter_parameters()))
        pyro.set_rng_seed(5)
        terms[beta] = elbo_terms(model, guide, batch)
    assert torch.allclose(terms[0.05].kl / terms[0.5].kl, torch.tensor(0.1), rtol=1e-5)
    assert torch.allclose(terms[0.05].nll, terms[0.5].nll)


def test_plate_scales_likelihood_by_dataset_size_over_batch():
    task = TinyTask(4)
    model, guide = make(BLoRAConfig(rank=4, kl_normalization="dataset"))
    batch = batch_of(task, (0, 1))
    nll = {}
    for n in (2, 20):
        model.configure_objective(elbo_scaling(model.config, n, 40, model.num_adapter_parameters()))
        pyro.set_rng_seed(1)
        nll[n] = elbo_terms(model, guide, batch).nll
    assert torch.allclose(nll[20] / nll[2], torch.tensor(10.0), rtol=1e-5)


def test_analytic_kl_agrees_with_monte_carlo_on_average():
    task = TinyTask(4)
    model, guide = make()
    configure(model, task)
    batch = batch_of(task)
    analytic = elbo_terms(model, guide, batch, estimator="analytic").kl
    mc = torch.stack([elbo_terms(model, guide, batch).kl.detach() for _ in range(30)]).mean()
    assert torch.allclose(mc, analytic.detach(), rtol=0.02)


# ---------------------------------------------------------------- training
FAST = dict(lr=3e-2, batch_size=4, warmup_steps=2, progress=False, checkpoint_every=0)


def test_elbo_decreases_and_default_settings_adapt():
    task = TinyTask(8)
    model, guide = make(BLoRAConfig(rank=4, target_modules=ALL_LINEAR))
    result = train(model, guide, task, collate, TrainConfig(steps=40, **FAST))
    losses = [r["loss"] for r in result.history]
    assert sum(losses[-5:]) / 5 < sum(losses[:5]) / 5
    assert result.final_nll < 0.5 * result.base_nll
    assert not result.collapsed


def test_textbook_elbo_collapses_and_is_reported():
    task = TinyTask(8)
    model, guide = make(BLoRAConfig(rank=4, kl_normalization="dataset", beta=1.0))
    with pytest.warns(UserWarning, match="posterior collapse"):
        result = train(model, guide, task, collate, TrainConfig(steps=40, **FAST))
    assert result.collapsed


def test_large_beta_shrinks_means_toward_zero():
    task = TinyTask(8)
    sparsity = {}
    for beta in (0.01, 100.0):
        model, guide = make(BLoRAConfig(rank=4, beta=beta))
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            train(model, guide, task, collate, TrainConfig(steps=40, **FAST))
        means = guide.means()
        sparsity[beta] = thresh_fraction(list(means.values()), threshold=1e-3)
        sparsity[f"norm{beta}"] = float(torch.cat([m.flatten() for m in means.values()]).norm())
    assert sparsity[100.0] > sparsity[0.01]
    assert sparsity["norm100.0"] < sparsity["norm0.01"]


def test_resumed_run_matches_uninterrupted_run(tmp_path):
    task = TinyTask(8)
    config = TrainConfig(steps=6, **{**FAST, "checkpoint_every": 3})
    model, guide = make()
    full = train(model, guide, task, collate, config, run_dir=tmp_path / "full")
    # The same run, killed after its step-3 checkpoint: copy the folder without what came later.
    shutil.copytree(tmp_path / "full", tmp_path / "killed")
    (tmp_path / "killed" / "checkpoints" / "step-00000006.pt").unlink()
    model, guide = make()  # a fresh process: same base model, but the guide is overwritten and
    pyro.set_rng_seed(123)  # the RNG state must come from the checkpoint
    guide.set_stddevs(0.5)
    resumed = train(model, guide, task, collate, config, run_dir=tmp_path / "killed", resume=True)
    assert len(resumed.history) == 6
    assert [r["loss"] for r in resumed.history] == [r["loss"] for r in full.history]
    assert all(torch.equal(a, b) for a, b in zip(guide.state_dict().values(), full_guide_state(tmp_path)))


def full_guide_state(tmp_path):
    state = torch.load(tmp_path / "full" / "checkpoints" / "step-00000006.pt", weights_only=False)
    return state["guide"].values()


def test_run_folder_of_another_run_is_refused(tmp_path):
    task = TinyTask(4)
    model, guide = make()
    train(model, guide, task, collate, TrainConfig(steps=1, **FAST), run_dir=tmp_path)
    model, guide = make()
    with pytest.raises(ValueError, match="different run"):
        train(model, guide, task, collate, TrainConfig(steps=2, **FAST), run_dir=tmp_path)


def test_non_finite_loss_names_step_and_causes(tmp_path):
    task = TinyTask(8)
    task.features[5, 0, 0] = float("nan")  # one corrupt utterance
    model, guide = make()
    config = TrainConfig(steps=8, **{**FAST, "checkpoint_every": 1, "batch_size": 2})
    with pytest.raises(NonFiniteLossError, match=r"not finite at step \d+.*rows.*5") as caught:
        train(model, guide, task, collate, config, run_dir=tmp_path)
    bad_step = int(str(caught.value).split("step ")[1].split(":")[0])
    assert CheckpointDir(tmp_path / "checkpoints").steps()[-1] == bad_step  # the last good one is kept


# ---------------------------------------------------------------- inference
def trained(steps: int = 10):
    task = TinyTask(8)
    model, guide = make()
    train(model, guide, task, collate, TrainConfig(steps=steps, **FAST))
    return task, model, guide


def test_merged_posterior_mean_equals_pyro_model_at_the_mean(tmp_path):
    task, model, guide = trained()
    batch = batch_of(task)
    with model.hold_adapters(guide.means()):
        expected = model.logits(batch)
    merged = posterior_mean_model(model, guide)
    assert type(merged).__name__ == "WhisperForConditionalGeneration"
    assert "pyro" not in type(merged).__module__
    from transformers.models.whisper.modeling_whisper import shift_tokens_right

    decoder_ids = shift_tokens_right(batch["labels"], 0, 1)
    got = merged(input_features=batch["input_features"], decoder_input_ids=decoder_ids).logits
    assert torch.allclose(got, expected, atol=1e-5)
    merged.save_pretrained(tmp_path)
    from transformers import WhisperForConditionalGeneration

    reloaded = WhisperForConditionalGeneration.from_pretrained(tmp_path)
    assert torch.allclose(reloaded(input_features=batch["input_features"], decoder_input_ids=decoder_ids).logits, expected, atol=1e-5)


def test_monte_carlo_samples_differ_and_spread_grows_with_scale():
    _, model, guide = trained(steps=3)
    spreads = []
    for factor in (1.0, 10.0):
        guide.set_stddevs(1e-3 * factor)
        samples = sample_posterior(guide, 6)
        stack = torch.cat([v.flatten(1) for v in samples.values()], dim=1)
        assert not torch.allclose(stack[0], stack[1])
        spreads.append(float(stack.std(0).mean()))
    assert spreads[1] > 5 * spreads[0]


def test_one_adapter_sample_per_generate_call():
    _, model, _ = trained(steps=1)
    adapter = model.adapters()["whisper.model.decoder.layers.0.self_attn.q_proj"]
    seen: list[torch.Tensor] = []
    hook = adapter.register_forward_hook(lambda module, args, out: seen.append(module.draw()[0].detach().clone()))
    try:
        features = torch.randn(1, MELS, FRAMES)
        calls = []
        for _ in range(2):
            seen.clear()
            model.generate(features, max_new_tokens=5, min_new_tokens=5)
            calls.append(list(seen))
    finally:
        hook.remove()
    for steps in calls:
        assert len(steps) >= 5
        assert all(torch.equal(steps[0], s) for s in steps[1:])
    assert not torch.equal(calls[0][0], calls[1][0])


def test_save_load_round_trip_reproduces_outputs(tmp_path):
    task, model, guide = trained()
    save_posterior(tmp_path / "posterior", model, guide, metadata={"base": "tiny"})
    batch = batch_of(task)
    with model.hold_adapters(guide.means()):
        expected = model.logits(batch)
    pyro.set_rng_seed(7)
    expected_samples = sample_posterior(guide, 3)
    loaded_model, loaded_guide = load_posterior(tmp_path / "posterior", tiny_whisper(0))
    with loaded_model.hold_adapters(loaded_guide.means()):
        got = loaded_model.logits(batch)
    assert torch.equal(got, expected)
    pyro.set_rng_seed(7)
    got_samples = sample_posterior(loaded_guide, 3)
    assert all(torch.equal(got_samples[k], expected_samples[k]) for k in expected_samples)


def test_stacked_samples_equal_sequential_samples():
    task, model, guide = trained(steps=3)
    samples = sample_posterior(guide, 3)
    batch = batch_of(task, (0, 1))
    with model.hold_adapters(samples):
        stacked = model.logits({"input_features": batch["input_features"].repeat(3, 1, 1), "labels": batch["labels"].repeat(3, 1)})
    for s in range(3):
        with model.hold_adapters({k: v[s] for k, v in samples.items()}):
            single = model.logits(batch)
        assert torch.allclose(stacked[2 * s:2 * s + 2], single, atol=1e-5)
