"""The beta-scaled ELBO: how the likelihood and the KL are normalised, and both terms separately.

The textbook ELBO for N utterances with token sequences y_n is

    ELBO = sum_n sum_t log p(y_nt | x_n, W) - KL(q(A, B) || p(A, B)),

estimated on a mini-batch of B utterances by scaling the batch likelihood by N / B (the
``pyro.plate`` over utterances does that). With sigma_p = 0.01 and a million adapter entries the
KL is of order 1e6-1e7 nats against a few nats of likelihood per token, and the posterior
collapses onto the prior. The normalisation is therefore an explicit option; the loss minimised is

    "dataset":    sum-NLL(data) + beta * KL                       (the textbook ELBO)
    "token":      [sum-NLL(data) + beta * KL] / T                 (T = number of training tokens)
    "parameter":  sum-NLL(data) / T + beta * KL / P               (P = number of adapter entries)
    "matrix":     sum-NLL(data) / T + beta * sum_m KL_m / P_m      (m: adapter matrices, P_m their entries)

"matrix" is the normalisation of the paper's authors' code. With M matrices of equal size it is M
times "parameter" at the same beta: on Whisper base, q/k (M = 72 matrices of 16,384 entries) makes
the paper's beta = 0.5 equal to beta = 36 under "parameter"; all linear layers (M = 192, matrices of
16,384 or 65,536 entries, P = 4,325,376) put the equivalent between 33 and 132.

"token" has the same optimum as "dataset" (it only rescales the loss, which Adam all but ignores);
under it beta keeps its textbook meaning. Under "parameter" beta weighs the average KL per adapter
entry against the average NLL per token, which is far weaker. The model and the guide read the
two factors from one :class:`ElboScaling`; nothing else scales the objective.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Literal

import torch
from pyro.infer import Trace_ELBO
from pyro.poutine.messenger import Messenger

from pyro_blora.config import BLoRAConfig

if TYPE_CHECKING:  # pragma: no cover
    from pyro_blora.model.guide import BLoRAGuide
    from pyro_blora.model.whisper import BLoRAWhisper

__all__ = ["ElboScaling", "ElboTerms", "KLWeights", "elbo_scaling", "elbo_terms", "analytic_kl"]


@dataclass(frozen=True)
class ElboScaling:
    """The two factors of the objective: on the token log-likelihood and on the adapter sites."""

    # Size N of the plate over utterances: the batch likelihood is scaled by N / B.
    num_utterances: int
    # Further factor on the likelihood (1 / T for the "token" and "parameter" normalisations).
    likelihood: float
    # Weight on the adapter sites in the model and in the guide, i.e. on the KL: beta / Z.
    kl: float
    normalization: str = "dataset"
    # Divide each adapter matrix's KL further by its number of entries ("matrix" normalisation).
    per_matrix: bool = False
    # The beta that ``kl`` was computed from (None: not known, so beta cannot be changed).
    beta: float | None = None

    def __post_init__(self) -> None:
        if self.num_utterances <= 0:
            raise ValueError(f"num_utterances must be > 0, got {self.num_utterances}")
        if not (self.likelihood > 0 and self.kl > 0):
            raise ValueError(f"likelihood and kl scales must be > 0, got {self.likelihood}, {self.kl}")

    def with_beta(self, beta: float) -> "ElboScaling":
        """The same objective with the KL weighted by ``beta`` instead (kl rescaled by beta / self.beta)."""
        if self.beta is None:
            raise ValueError("this ElboScaling does not record its beta; build it with elbo_scaling(...) or give beta=")
        if not beta > 0:
            raise ValueError(f"beta must be > 0, got {beta!r}")
        return replace(self, kl=self.kl * beta / self.beta, beta=float(beta))

    def site_weight(self, num_entries: int) -> float:
        """The KL weight of one adapter matrix with ``num_entries`` entries."""
        return self.kl / num_entries if self.per_matrix else self.kl


class KLWeights(Messenger):
    """Scales each named adapter site's log-density by its KL weight.

    Used around the model's adapter draws and around the whole guide, so log p and log q of a site
    carry the same factor and the KL term of the ELBO is weighted site by site. The guide's
    ``<site>_unconstrained`` draw takes its site's weight."""

    def __init__(self, weights: dict[str, float]) -> None:
        super().__init__()
        self.weights = weights

    def _process_message(self, msg) -> None:
        if msg["type"] != "sample":
            return
        weight = self.weights.get(msg["name"].removesuffix("_unconstrained"))
        if weight is not None:
            msg["scale"] = weight * msg["scale"]


def elbo_scaling(config: BLoRAConfig, num_utterances: int, num_tokens: int, num_parameters: int) -> ElboScaling:
    """The factors for ``config.kl_normalization`` on a training set of the given size."""
    if num_tokens <= 0:
        raise ValueError(f"the training set has {num_tokens} label tokens; it needs at least one transcript")
    norm = config.kl_normalization
    if norm == "dataset":
        likelihood, kl = 1.0, config.beta
    elif norm == "token":
        likelihood, kl = 1.0 / num_tokens, config.beta / num_tokens
    elif norm == "parameter":
        likelihood, kl = 1.0 / num_tokens, config.beta / num_parameters
    else:  # "matrix": the per-matrix division is ElboScaling.site_weight's
        likelihood, kl = 1.0 / num_tokens, config.beta
    return ElboScaling(num_utterances=num_utterances, likelihood=likelihood, kl=kl, normalization=norm,
                       per_matrix=norm == "matrix", beta=config.beta)


@dataclass
class ElboTerms:
    """One ELBO estimate: loss = nll + kl, each already scaled as the objective says."""

    loss: torch.Tensor
    nll: torch.Tensor
    kl: torch.Tensor
    num_tokens: int
    # What the loss is an average over (utterances for the ELBO, label tokens for a mean
    # cross-entropy): data-parallel ranks weight their gradients by it (pyro_blora.training.distributed).
    weight: float = 1.0

    def detached(self) -> dict[str, float]:
        return {name: float(torch.as_tensor(getattr(self, name)).detach()) for name in ("loss", "nll", "kl")}


def analytic_kl(model: "BLoRAWhisper", guide: "BLoRAGuide") -> dict[str, torch.Tensor]:
    """Closed-form KL(q || p) of every adapter site, summed over its entries, unscaled (nats)."""
    return {
        site: torch.distributions.kl_divergence(guide.posterior(site), model.site_prior(site))
        for site in model.site_names()
    }


def elbo_terms(
    model: "BLoRAWhisper",
    guide: "BLoRAGuide",
    batch: dict,
    estimator: Literal["trace", "analytic"] = "trace",
    num_particles: int = 1,
) -> ElboTerms:
    """Estimate the scaled negative ELBO and its two terms in one forward pass per particle.

    ``"trace"`` is exactly ``Trace_ELBO().differentiable_loss`` (a single-sample Monte Carlo KL);
    ``"analytic"`` keeps the sampled likelihood and uses the closed-form Gaussian KL, which is what a
    mean-field ELBO would do if AutoNormal exposed its Normal at the latent site (it exposes a
    Delta of the sampled value, so Pyro's TraceMeanField_ELBO can only make the entropy analytic).
    """
    traces = Trace_ELBO(num_particles=num_particles, max_plate_nesting=1)._get_traces(model, guide, (batch,), {})
    nll = kl = 0.0
    num_tokens = int((batch["labels"] != -100).sum())
    for model_trace, guide_trace in traces:
        nll_particle = kl_particle = 0.0
        log_q = {name: site["log_prob_sum"] for name, site in guide_trace.nodes.items()
                 if site["type"] == "sample" and not site["is_observed"]}
        for name, site in model_trace.nodes.items():
            if site["type"] != "sample":
                continue
            if site["is_observed"]:
                nll_particle = nll_particle - site["log_prob_sum"]
            elif estimator == "trace":
                # log q - log p site by site (AutoNormal's density sits at "<site>_unconstrained"), so a
                # prior equal to the posterior gives exactly 0 rather than a difference of large sums.
                q = log_q.pop(name, 0.0) + log_q.pop(f"{name}_unconstrained", 0.0)
                kl_particle = kl_particle + (q - site["log_prob_sum"])
        if estimator == "trace":
            kl_particle = kl_particle + sum(log_q.values())
        nll = nll + nll_particle / num_particles
        kl = kl + kl_particle / num_particles
    if estimator == "analytic":
        weights = model.kl_weights()
        kl = sum(weights[site] * value for site, value in analytic_kl(model, guide).items())
    elif estimator != "trace":
        raise ValueError(f"estimator must be 'trace' or 'analytic', got {estimator!r}")
    return ElboTerms(loss=nll + kl, nll=nll, kl=kl, num_tokens=num_tokens, weight=float(batch["labels"].shape[0]))
