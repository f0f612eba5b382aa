"""The paper's BLoRA as its authors ran it: per-matrix KL, wide initial scales, flipout and LRT."""

from __future__ import annotations

import math

import pyro
import pytest
import torch
from pyro import poutine

from pyro_blora import BLoRAConfig, TrainConfig, build_guide, elbo_scaling, elbo_terms, train, wrap_whisper
from pyro_blora.config import ALL_LINEAR_TARGETS
from pyro_blora.model.noise import LocalNoise, flipout_linear, lrt_linear
from pyro_blora.model.objective import analytic_kl
from tests.tiny import TinyTask, collate, tiny_whisper

TARGETS = (r".*\.q_proj$", r".*fc1$")  # matrices of different sizes: 4x64 / 64x4 and 4x64 / 128x4


def make(config: BLoRAConfig, seed: int = 0):
    model = wrap_whisper(tiny_whisper(seed), config)
    return model, build_guide(model, seed=seed)


def batch_of(task: TinyTask, idx=(0, 1, 2, 3)) -> dict:
    batch = collate([task[i] for i in idx])
    batch["index"] = torch.tensor(idx)
    return batch


# ---------------------------------------------------------------- the KL per matrix
def test_matrix_normalisation_weights_each_matrix_by_beta_over_its_entries():
    config = BLoRAConfig(rank=4, target_modules=TARGETS, kl_normalization="matrix", beta=0.5)
    model, guide = make(config)
    model.configure_objective(elbo_scaling(config, 4, 40, model.num_adapter_parameters()))
    weights = model.kl_weights()
    sizes = {site: math.prod(model.site_prior(site).event_shape) for site in model.site_names()}
    assert len(set(sizes.values())) > 1  # the test covers matrices of different sizes
    assert weights == {site: 0.5 / n for site, n in sizes.items()}
    # The analytic estimator is the written formula: beta * sum_m KL_m / P_m.
    batch = batch_of(TinyTask(4))
    kl = elbo_terms(model, guide, batch, estimator="analytic").kl
    expected = sum(0.5 * value / sizes[site] for site, value in analytic_kl(model, guide).items())
    assert torch.allclose(kl, expected, rtol=1e-6)


def test_matrix_monte_carlo_kl_uses_the_same_weights_in_model_and_guide():
    config = BLoRAConfig(rank=4, target_modules=TARGETS, kl_normalization="matrix", beta=0.5)
    model, guide = make(config)
    model.configure_objective(elbo_scaling(config, 4, 40, model.num_adapter_parameters()))
    batch = batch_of(TinyTask(4))
    pyro.set_rng_seed(7)
    terms = elbo_terms(model, guide, batch)
    pyro.set_rng_seed(7)
    guide_trace = poutine.trace(guide).get_trace(batch)
    model_trace = poutine.trace(poutine.replay(model, trace=guide_trace)).get_trace(batch)
    weights = model.kl_weights()
    by_hand = 0.0
    for site in model.site_names():
        log_q = guide_trace.nodes[f"{site}_unconstrained"]["fn"].log_prob(guide_trace.nodes[f"{site}_unconstrained"]["value"])
        log_p = model.site_prior(site).log_prob(model_trace.nodes[site]["value"])
        by_hand = by_hand + weights[site] * (log_q - log_p)
    assert torch.allclose(terms.kl, by_hand, rtol=1e-4)


def test_matrix_is_m_times_parameter_for_equal_matrices():
    targets = (r".*\.q_proj$", r".*\.k_proj$")  # every matrix 4 x 64 or 64 x 4: equal sizes
    per_matrix = BLoRAConfig(rank=4, target_modules=targets, kl_normalization="matrix", beta=0.5)
    model, guide = make(per_matrix)
    num_matrices = len(model.site_names())
    batch = batch_of(TinyTask(4))
    model.configure_objective(elbo_scaling(per_matrix, 4, 40, model.num_adapter_parameters()))
    strong = elbo_terms(model, guide, batch, estimator="analytic").kl
    per_entry = per_matrix.replace(kl_normalization="parameter", beta=0.5 * num_matrices)
    model.configure_objective(elbo_scaling(per_entry, 4, 40, model.num_adapter_parameters()))
    equivalent = elbo_terms(model, guide, batch, estimator="analytic").kl
    assert torch.allclose(strong, equivalent, rtol=1e-6)


# ---------------------------------------------------------------- initial scales and the preset
def test_rho_initialised_scales_lie_in_the_authors_range_for_a_and_b():
    model, guide = make(BLoRAConfig(rank=4, target_modules=TARGETS, init_scale_A=None, init_scale_B=None))
    low, high = (torch.nn.functional.softplus(torch.tensor(v)).item() for v in (-5.5, -4.5))
    for site, scale in guide.stddevs().items():
        assert scale.min() >= low * (1 - 1e-5) and scale.max() <= high * (1 + 1e-5), site
        assert scale.std() > 0, f"{site}: scales are drawn per entry"


def test_fixed_initial_scales_and_a_near_deterministic_b():
    model, guide = make(BLoRAConfig(rank=4, target_modules=TARGETS, init_scale_A=None, init_scale_B=1e-8))
    for site, scale in guide.stddevs().items():
        if site.endswith("lora_B"):
            assert torch.allclose(scale, torch.full_like(scale, 1e-8), rtol=1e-3)
        else:
            assert scale.min() > 1e-3


def test_paper_preset_is_what_the_readme_says():
    adapter, training = BLoRAConfig.paper(), TrainConfig.paper()
    assert (adapter.rank, adapter.scaling, adapter.prior_scale, adapter.beta) == (32, 2.0, 0.01, 0.5)
    assert adapter.target_modules == (r".*\.q_proj$", r".*\.k_proj$")
    assert adapter.kl_normalization == "matrix"
    assert (adapter.init_scale_A, adapter.init_scale_B, adapter.init_rho_range) == (None, None, (-5.5, -4.5))
    assert adapter.scale_parameterization == "softplus"
    assert (training.lr, training.weight_decay, training.scale_lr_multiplier) == (1e-3, 5e-4, 1.0)
    assert training.weight_noise == "flipout"
    # Overrides go over the preset; the earlier defaults are unchanged.
    assert BLoRAConfig.paper(beta=2.0).beta == 2.0
    assert BLoRAConfig().kl_normalization == "parameter" and TrainConfig().weight_noise == "shared"


def test_old_configs_load_unchanged():
    saved = BLoRAConfig(rank=4).to_dict()
    saved.pop("init_rho_range")  # a run folder written before the option existed
    assert BLoRAConfig.from_dict(saved) == BLoRAConfig(rank=4)


# ---------------------------------------------------------------- flipout and the local reparameterisation trick
def _mean_gradients(linear, x, loc, scale, draws: int):
    """Monte Carlo mean of d/d(loc, scale) of a nonlinear per-example loss."""
    loc = loc.clone().requires_grad_(True)
    scale = scale.clone().requires_grad_(True)
    total = 0.0
    for _ in range(draws):
        total = total + torch.tanh(linear(x, loc, scale)).pow(2).sum()
    total = total / draws
    return torch.autograd.grad(total, (loc, scale))


def _shared_linear(x, loc, scale):
    weight = loc + scale * torch.randn_like(scale)
    return x @ weight.T


@pytest.mark.parametrize("estimator", [flipout_linear, lrt_linear])
def test_estimator_expected_gradient_matches_plain_sampling(estimator):
    torch.manual_seed(0)
    x = torch.randn(6, 5, 3)  # examples, positions, inputs
    loc = torch.randn(4, 3) * 0.5
    scale = torch.rand(4, 3) * 0.5 + 0.2
    draws = 4000
    plain = _mean_gradients(_shared_linear, x, loc, scale, draws)
    other = _mean_gradients(estimator, x, loc, scale, draws)
    for a, b in zip(plain, other):
        assert torch.allclose(a, b, atol=0.05 * a.abs().max()), (a, b)


def test_flipout_decorrelates_examples_and_keeps_each_examples_marginal():
    torch.manual_seed(0)
    x = torch.ones(2, 1, 3)
    loc, scale = torch.zeros(1, 3), torch.ones(1, 3)
    outputs = torch.stack([flipout_linear(x, loc, scale).flatten() for _ in range(4000)])
    assert abs(outputs.var(0).mean().item() - 3.0) < 0.3  # each example: Var(sum of 3 N(0, 1)) = 3
    assert abs(torch.corrcoef(outputs.T)[0, 1].item()) < 0.5  # shared draws would give correlation 1


@pytest.mark.parametrize("kind", ["flipout", "lrt"])
def test_training_under_local_noise_adapts_and_tiny_scales_give_the_mean(kind):
    task = TinyTask(8)
    config = BLoRAConfig(rank=4, target_modules=TARGETS, init_scale_A=1e-9, init_scale_B=1e-9)
    model, guide = make(config)
    batch = batch_of(task)
    model.configure_objective(elbo_scaling(config, len(task), 40, model.num_adapter_parameters()))
    with torch.no_grad():
        means = guide.means()
        guide.set_means({s: torch.randn_like(v) * 0.1 for s, v in means.items()})
        means = guide.means()
        with model.hold_adapters(means):
            expected = model.logits(batch)
        with LocalNoise(kind):
            guide_trace = poutine.trace(guide).get_trace(batch)
            noisy = poutine.replay(model.logits, trace=guide_trace)(batch)
    assert torch.allclose(noisy, expected, atol=1e-4)
    # The paper's scales and optimiser; on matrices this small the per-matrix prior of beta = 0.5 would
    # dominate (256 entries a matrix), so the KL is weighed per entry here.
    fresh_model, fresh_guide = make(BLoRAConfig.paper(rank=4, target_modules=TARGETS, kl_normalization="parameter"))
    result = train(fresh_model, fresh_guide, task, collate,
                   TrainConfig.paper(lr=3e-2, steps=25, batch_size=4, warmup_steps=2, progress=False,
                                     checkpoint_every=0, weight_noise=kind))
    assert result.final_nll < 0.9 * result.base_nll


def test_local_noise_leaves_a_map_guide_alone():
    model = wrap_whisper(tiny_whisper(0), BLoRAConfig(rank=4, target_modules=TARGETS))
    guide = build_guide(model, kind="delta", seed=0)
    batch = batch_of(TinyTask(4))
    with LocalNoise("flipout"):
        pyro.set_rng_seed(1)
        first = poutine.replay(model.logits, trace=poutine.trace(guide).get_trace(batch))(batch)
    pyro.set_rng_seed(1)
    second = poutine.replay(model.logits, trace=poutine.trace(guide).get_trace(batch))(batch)
    assert torch.equal(first, second)


def test_gradient_checkpointing_with_local_noise_is_refused():
    model, guide = make(BLoRAConfig(rank=4, target_modules=TARGETS))
    with pytest.raises(ValueError, match="weight_noise='shared'"):
        train(model, guide, TinyTask(4), collate,
              TrainConfig(steps=1, progress=False, weight_noise="flipout", gradient_checkpointing=True))


def test_converged_preset_is_the_paper_preset_on_all_linear_layers_with_fast_scales():
    adapter, training = BLoRAConfig.converged(), TrainConfig.converged()
    assert adapter == BLoRAConfig.paper(target_modules=ALL_LINEAR_TARGETS)
    assert training == TrainConfig.paper(scale_lr_multiplier=30.0)
    assert BLoRAConfig.converged(rank=8).rank == 8 and TrainConfig.converged(steps=7).steps == 7
