"""The curvature of the likelihood at the posterior mean, and the scales it calls for.

For a Gaussian mean-field posterior q = N(mu, sigma^2) and a likelihood term that is locally
quadratic around mu with diagonal curvature H, the objective minimised in training,

    likelihood_factor * sum-NLL(data) + sum_sites w_site * KL(q_site || N(m, sigma_p^2)),

is stationary in each sigma_i at

    1 / sigma_i*^2 = likelihood_factor * T * H_ii / w_site + 1 / sigma_p^2,

with H the curvature of the NLL per training token and T the training set's token count. Under the
paper's "matrix" normalisation (likelihood_factor = 1/T, w = beta / P_m) that is
(P_m / beta) * H_ii + 1 / sigma_p^2; under "token" it is (T / beta) * H_ii + 1 / sigma_p^2. Where the
data barely constrain an entry, sigma* is the prior's width; where they do, it shrinks.

H is the generalised Gauss-Newton (Fisher) diagonal of the NLL per token, estimated as in the
"true Fisher" of Martens (2020): the decoder reads the real labels (teacher forcing), the targets are
drawn from the model's own predictive distribution at each position, and the squared gradient of
their summed loss is, in expectation, the sum of the per-token Fisher diagonals (the cross terms
have mean zero). It is never negative, unlike the Hessian's own diagonal.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable, Mapping

import torch

from pyro_blora.model.objective import IGNORE_INDEX
from pyro_blora.model.whisper import BLoRAWhisper

__all__ = ["Curvature", "diagonal_fisher", "optimal_scales"]


@dataclass
class Curvature:
    """The Fisher diagonal of the NLL per label token, per adapter site, and what it was measured on."""

    per_token: dict[str, torch.Tensor]
    tokens: int
    batches: int
    samples: int


def diagonal_fisher(
    model: BLoRAWhisper,
    values: Mapping[str, torch.Tensor],
    batches: Iterable[Mapping],
    samples: int = 1,
    generator: torch.Generator | None = None,
) -> Curvature:
    """Estimate the Fisher diagonal of the teacher-forced NLL per label token, with the adapters held at
    ``values`` (e.g. the posterior mean), over ``batches``: ``samples`` label draws per batch, one
    forward and backward pass each. Unbiased; its noise falls as 1/sqrt(batches * samples)."""
    if samples < 1:
        raise ValueError(f"samples must be >= 1, got {samples}")
    device = next(model.whisper.parameters()).device
    held = {site: value.detach().to(device=device, dtype=torch.float32).clone().requires_grad_(True)
            for site, value in values.items()}
    sums = {site: torch.zeros_like(value) for site, value in held.items()}
    tokens = count = 0
    with model.hold_adapters(held):
        for batch in batches:
            batch = {key: batch[key].to(device) for key in ("input_features", "labels")}
            mask = batch["labels"] != IGNORE_INDEX
            tokens += int(mask.sum())
            count += 1
            for _ in range(samples):
                logits = model.logits(batch).float()
                with torch.no_grad():
                    drawn = torch.multinomial(logits.softmax(-1).flatten(0, 1), 1, generator=generator)
                drawn = drawn.view(mask.shape)
                loss = torch.nn.functional.cross_entropy(logits.transpose(1, 2), drawn, reduction="none")
                grads = torch.autograd.grad((loss * mask).sum(), list(held.values()))
                for site, grad in zip(held, grads):
                    sums[site] += grad.detach() ** 2
    if tokens == 0:
        raise ValueError("the batches hold no label tokens; give batches with transcripts")
    per_token = {site: total / (tokens * samples) for site, total in sums.items()}
    return Curvature(per_token=per_token, tokens=tokens, batches=count, samples=samples)


def optimal_scales(model: BLoRAWhisper, curvature: Mapping[str, torch.Tensor], num_training_tokens: int,
                   ) -> dict[str, torch.Tensor]:
    """sigma* of every adapter entry under the model's objective as configured now
    (:meth:`BLoRAWhisper.configure_objective`): ``curvature`` is the NLL's curvature per token
    (:func:`diagonal_fisher`), ``num_training_tokens`` the T of the training set."""
    if num_training_tokens <= 0:
        raise ValueError(f"num_training_tokens must be > 0, got {num_training_tokens}")
    likelihood = model.elbo_scaling.likelihood * num_training_tokens
    weights = model.kl_weights()
    scales = {}
    for site, per_token in curvature.items():
        prior_scale = model.site_prior(site).base_dist.scale.detach().to(per_token)
        precision = likelihood * per_token / weights[site] + prior_scale.pow(-2)
        scales[site] = precision.rsqrt()
    return scales
