"""The curvature estimate and the scales it calls for, checked by brute force on the tiny model."""

import math

import pytest
import torch

from pyro_blora import BLoRAConfig, build_guide, wrap_whisper
from pyro_blora.metrics.scales import log_ratio_summary, scale_group, scale_quantiles
from pyro_blora.model.curvature import diagonal_fisher, optimal_scales
from pyro_blora.model.objective import elbo_scaling
from tests.tiny import TinyTask, collate, tiny_whisper


def _model_and_means(seed: int = 0):
    model = wrap_whisper(tiny_whisper(seed), BLoRAConfig(rank=2, kl_normalization="matrix", target_modules=(r".*fc2$",)))
    guide = build_guide(model, seed=seed)
    means = guide.means()
    generator = torch.Generator().manual_seed(1)
    for site in means:  # away from B = 0, where A carries no curvature at all
        means[site] = means[site] + 0.3 * torch.randn(means[site].shape, generator=generator)
    return model, means


def _brute_force_fisher(model, means, batch, site: str, entries: list[tuple[int, int]], h: float = 1e-3):
    """sum_t J_t^T (diag p_t - p_t p_t^T) J_t / T for single entries, the Jacobian J of the logits by
    central differences: the Gauss-Newton second derivative, with no sampling anywhere."""
    mask = batch["labels"] != -100
    with torch.no_grad(), model.hold_adapters(means):
        probs = model.logits(batch).double().softmax(-1)
    values = []
    for entry in entries:
        def logits_at(shift: float):
            moved = {k: v.clone() for k, v in means.items()}
            moved[site][entry] += shift
            with torch.no_grad(), model.hold_adapters(moved):
                return model.logits(batch).double()

        jacobian = (logits_at(h) - logits_at(-h)) / (2 * h)  # (batch, positions, vocab)
        quadratic = (probs * jacobian**2).sum(-1) - (probs * jacobian).sum(-1) ** 2
        values.append(float((quadratic * mask).sum() / mask.sum()))
    return torch.tensor(values, dtype=torch.float64)


def test_fisher_matches_the_brute_force_second_derivative():
    model, means = _model_and_means()
    batch = collate([TinyTask(n=4)[i] for i in range(4)])
    site = next(s for s in model.site_names() if s.endswith("lora_B"))
    entries = [(0, 0), (3, 1), (17, 0), (40, 1)]
    exact = _brute_force_fisher(model, means, batch, site, entries)
    estimate = diagonal_fisher(model, means, [batch], samples=500, generator=torch.Generator().manual_seed(0))
    sampled = torch.tensor([float(estimate.per_token[site][entry]) for entry in entries], dtype=torch.float64)
    assert (exact > 0).all()
    # 500 draws: a relative standard error of about 6% per entry
    assert torch.allclose(sampled, exact, rtol=0.2), (sampled, exact)
    assert estimate.tokens == int((batch["labels"] != -100).sum()) and estimate.batches == 1


def test_optimal_scale_is_the_minimum_of_the_quadratic_objective():
    """For one entry: likelihood_factor * T * H * sigma^2 / 2 + w * KL(N(mu, sigma^2) || N(0, sigma_p^2)),
    minimised over a fine grid of sigma, lands on sigma*."""
    model, means = _model_and_means()
    num_tokens = 200
    model.configure_objective(elbo_scaling(model.config, num_utterances=40, num_tokens=num_tokens,
                                           num_parameters=model.num_adapter_parameters()))
    site = model.site_names()[1]
    for curvature_value in (0.0, 1e-3, 0.5):
        curvature = {s: torch.full(m.shape, curvature_value) for s, m in means.items()}
        sigma_star = float(optimal_scales(model, curvature, num_tokens)[site][0, 0])
        weight, sigma_p = model.kl_weights()[site], model.config.prior_scale
        grid = torch.logspace(-6, 0, 200001, dtype=torch.float64)
        likelihood = model.elbo_scaling.likelihood * num_tokens * curvature_value * grid**2 / 2
        kl = torch.log(sigma_p / grid) + grid**2 / (2 * sigma_p**2) - 0.5
        best = float(grid[torch.argmin(likelihood + weight * kl)])
        assert best == pytest.approx(sigma_star, rel=1e-3)
    assert float(optimal_scales(model, {s: torch.zeros(m.shape) for s, m in means.items()}, 10)[site].max()) \
        == pytest.approx(model.config.prior_scale)


def test_more_curvature_means_smaller_scales_and_the_summaries_read_them():
    model, means = _model_and_means()
    batch = collate([TinyTask(n=4)[i] for i in range(4)])
    estimate = diagonal_fisher(model, means, [batch], generator=torch.Generator().manual_seed(0))
    model.configure_objective(elbo_scaling(model.config, 4, estimate.tokens, model.num_adapter_parameters()))
    sigma_star = optimal_scales(model, estimate.per_token, estimate.tokens)
    for site, curvature in estimate.per_token.items():
        order = curvature.flatten().argsort()
        assert sigma_star[site].flatten()[order[0]] >= sigma_star[site].flatten()[order[-1]]
        assert (sigma_star[site] <= model.config.prior_scale + 1e-12).all()
    assert scale_group("whisper.model.decoder.layers.1.fc2.lora_B") == "decoder.B"
    quantiles = scale_quantiles(sigma_star)
    assert set(quantiles) == {f"sigma/{g}/q{q}" for g in ("encoder.A", "encoder.B", "decoder.A", "decoder.B")
                              for q in ("05", "50", "95")}
    same = log_ratio_summary(sigma_star, sigma_star)
    assert same["median_abs_log_ratio"] == 0 and same["share_within"] == 1
    doubled = log_ratio_summary({s: 2 * v for s, v in sigma_star.items()}, sigma_star)
    assert doubled["median_ratio"] == pytest.approx(2) and doubled["share_within"] == 0
    assert doubled["p90_abs_log_ratio"] == pytest.approx(math.log(2))
